//! `ste-bench churn`: the two-tier storage thesis' pod-churn client, run on
//! each arm of a real local control plane side by side (the load and its
//! measurement: [`crate::load`]); tables, ratios, CSV, JSON and plots.

use anyhow::bail;

use crate::cluster::Arm;
use crate::load::run_steps;
pub use crate::load::{run_arm, ArmResult, ChurnArgs, Mode};

mod report;
use report::print_report;

pub async fn run(args: ChurnArgs) -> anyhow::Result<Vec<ArmResult>> {
    if args.interarrival.is_zero() || args.duration.is_zero() {
        bail!("--interarrival and --duration must be positive");
    }
    if args.arms.is_empty() {
        bail!("--arms needs at least one arm");
    }
    std::fs::create_dir_all(&args.output)?;
    if args.sweep.iter().any(|r| r.is_nan() || *r <= 0.0) {
        bail!("--sweep rates must be positive");
    }
    if args.client_qps.is_empty() {
        bail!("--client-qps needs at least one setting");
    }
    let mut results = Vec::new();
    if args.external.kubeconfig.is_some() {
        eprintln!(
            "[1/1] the cluster of {}: {:?} churn",
            args.external
                .kubeconfig
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            args.mode
        );
        let args = &args;
        results = crate::external::run(&args.external, move |record| async move {
            run_steps(args, Arm::External, None, &record).await
        })
        .await?;
    }
    if args.external.kubeconfig.is_some() && args.repeats > 1 {
        bail!("--repeats applies to the local arms; run the external cluster again instead");
    }
    let runs = if args.external.kubeconfig.is_some() {
        Vec::new()
    } else {
        args.local_runs()
    };
    let total = runs.len() as u64 * args.repeats;
    for repeat in 0..args.repeats {
        for (i, (arm, qps)) in crate::arms::arm_order(&runs, repeat).iter().enumerate() {
            eprintln!(
                "[{}/{total}] {arm:?} arm, client QPS {}: {:?} churn{}",
                repeat * runs.len() as u64 + i as u64 + 1,
                qps.map(|q| q.to_string())
                    .unwrap_or_else(|| "default".into()),
                args.mode,
                if args.repeats > 1 {
                    format!(", repeat {}/{}", repeat + 1, args.repeats)
                } else {
                    String::new()
                }
            );
            for mut result in run_arm(&args, *arm, *qps).await? {
                result.repeat = repeat;
                results.push(result);
            }
            // Kept after every arm, so a long run that fails later keeps what it measured.
            std::fs::write(
                args.output.join("results.json"),
                serde_json::to_string_pretty(&results)?,
            )?;
        }
    }
    let mut repeats = Vec::new();
    for repeat in 0..args.repeats {
        let of_repeat: Vec<&ArmResult> = results.iter().filter(|r| r.repeat == repeat).collect();
        repeats.push((
            format!("repeat {}", repeat + 1),
            serde_json::to_value(of_repeat)?,
        ));
    }
    let suite = crate::plots::Suite::Churn;
    crate::plots::write_suite_repeats(suite, "churn", &repeats, &args.output)?;
    print_report(&args, &results);
    let json_path = args.output.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&results)?)?;
    let mut csv = String::from("arm,repeat,etcd_members,mode,client_qps,offered_per_s,sustained,sent,bound,achieved_per_s,bound_p50_ms,bound_p99_ms,bound_p999_ms,running_p50_ms,running_p99_ms\n");
    for r in &results {
        csv.push_str(&format!(
            "{:?},{},{},{:?},{},{:.2},{},{},{},{:.2},{:.1},{:.1},{:.1},{:.1},{:.1}\n",
            r.arm,
            r.repeat,
            r.etcd_members,
            r.mode,
            r.client_qps
                .map(|q| q.to_string())
                .unwrap_or_else(|| "default".into()),
            r.offered_per_s,
            r.sustained,
            r.sent,
            r.bound,
            r.achieved_per_s,
            r.bound_p50_ms,
            r.bound_p99_ms,
            r.bound_p999_ms,
            r.running_p50_ms,
            r.running_p99_ms
        ));
    }
    std::fs::write(args.output.join("results.csv"), csv)?;
    eprintln!("raw results: {} and results.csv", json_path.display());
    eprintln!(
        "plots: {dir}/churn-latency-cdf.svg, {dir}/churn-p50-p99.svg, {dir}/churn-lines.svg",
        dir = args.output.display()
    );
    Ok(results)
}
