//! `ste-bench churn`: the two-tier storage thesis' pod-churn client, run on
//! each arm of a real local control plane side by side (the load and its
//! measurement: [`crate::load`]); tables, ratios, CSV, JSON and plots.

use anyhow::bail;

use crate::arms::qps_name;
use crate::cluster::Arm;
use crate::load::run_steps;
pub use crate::load::{run_arm, ArmResult, ChurnArgs, Mode};
use crate::measure::cpu_per_100;

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
    let runs: Vec<(Arm, Option<u32>)> = if args.external.kubeconfig.is_some() {
        Vec::new()
    } else {
        args.client_qps
            .iter()
            .flat_map(|qps| args.arms.iter().map(move |arm| (*arm, *qps)))
            .collect()
    };
    for (i, (arm, qps)) in runs.iter().enumerate() {
        eprintln!(
            "[{}/{}] {arm:?} arm, client QPS {}: {:?} churn",
            i + 1,
            runs.len(),
            qps.map(|q| q.to_string())
                .unwrap_or_else(|| "default".into()),
            args.mode
        );
        results.extend(run_arm(&args, *arm, *qps).await?);
    }
    let plotted = serde_json::to_value(&results)?;
    let suite = crate::plots::Suite::Churn;
    crate::plots::write_suite(suite, "churn", plotted, &args.output)?;
    print_report(&args, &results);
    let json_path = args.output.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&results)?)?;
    let mut csv = String::from("arm,etcd_members,mode,client_qps,offered_per_s,sustained,sent,bound,achieved_per_s,bound_p50_ms,bound_p99_ms,bound_p999_ms,running_p50_ms,running_p99_ms\n");
    for r in &results {
        csv.push_str(&format!(
            "{:?},{},{:?},{},{:.2},{},{},{},{:.2},{:.1},{:.1},{:.1},{:.1},{:.1}\n",
            r.arm,
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

fn print_report(args: &ChurnArgs, results: &[ArmResult]) {
    println!();
    println!(
        "Pod churn ({:?}): {} for {:?} per step, {}",
        args.mode,
        if args.sweep.is_empty() {
            format!("a Deployment every {:?}", args.interarrival)
        } else {
            format!("sweep {:?}/s", args.sweep)
        },
        args.duration,
        match &args.external.kubeconfig {
            Some(path) => format!(
                "on the cluster of {} (namespace {})",
                path.display(),
                args.external.namespace
            ),
            None => format!(
                "{} fake nodes, durable etcd of {} member(s) with fsync delay {}, STE replication factor {}",
                args.nodes,
                args.topology.etcd_members,
                args.fsync_delay
                    .map(|d| format!("{d:?}"))
                    .unwrap_or_else(|| "none".into()),
                args.topology.replication_factor
            ),
        },
    );
    println!();
    println!("| arm | etcd members | client limits (every arm) | offered/s | achieved/s | sustained | bound | create→bound p50 / p99 / p99.9 ms | create→Running p50 / p99 ms | CPU s per 100 Deployments |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let cpu = cpu_per_100(r.arm, &r.cpu_seconds, r.sent);
        println!(
            "| {:?} | {} | {} | {:.1} | {:.1} | {} | {}/{} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} | {} |",
            r.arm, r.etcd_members, if r.arm == Arm::External { "the cluster's own".into() } else { qps_name(r.client_qps) }, r.offered_per_s, r.achieved_per_s, if r.sustained { "yes" } else { "no" },
            r.bound, r.sent, r.bound_p50_ms, r.bound_p99_ms, r.bound_p999_ms, r.running_p50_ms, r.running_p99_ms, cpu
        );
    }
    println!();
    // Ratios against stock and tuned, at the same client limits and offered rate.
    for r in results.iter().filter(|r| r.arm == Arm::Ste) {
        for base_arm in [Arm::Stock, Arm::Tuned, Arm::Override] {
            let base = results.iter().find(|b| {
                b.arm == base_arm
                    && b.client_qps == r.client_qps
                    && b.etcd_members == r.etcd_members
                    && (b.offered_per_s - r.offered_per_s).abs() < 1e-6
            });
            if let Some(base) = base {
                println!(
                    "Ste vs {:?} ({}, {:.1}/s offered): create→bound p50 ×{:.2}, p99 ×{:.2}, achieved ×{:.2}",
                    base_arm, qps_name(r.client_qps), r.offered_per_s,
                    r.bound_p50_ms / base.bound_p50_ms, r.bound_p99_ms / base.bound_p99_ms, r.achieved_per_s / base.achieved_per_s
                );
            }
        }
    }
    if !args.sweep.is_empty() {
        let runs: Vec<(Arm, Option<u32>)> = if args.external.kubeconfig.is_some() {
            vec![(Arm::External, None)]
        } else {
            args.client_qps
                .iter()
                .flat_map(|qps| args.arms.iter().map(move |arm| (*arm, *qps)))
                .collect()
        };
        for (arm, qps) in runs {
            let best = results
                .iter()
                .filter(|r| r.arm == arm && r.client_qps == qps && r.sustained)
                .map(|r| r.offered_per_s)
                .fold(f64::NAN, f64::max);
            let limits = if arm == Arm::External {
                "the cluster's own limits".into()
            } else {
                qps_name(qps)
            };
            println!(
                "highest sustained rate, {arm:?}, {limits}: {}",
                if best.is_nan() {
                    "none of the swept rates".into()
                } else {
                    format!("{best:.1}/s")
                }
            );
        }
    }
}
