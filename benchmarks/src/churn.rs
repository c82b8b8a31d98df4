//! `ste-bench churn`: the two-tier storage thesis' pod-churn client, run on
//! each arm of a real local control plane side by side.
//!
//! Open loop (no coordinated omission): the i-th Deployment (replicas 1,
//! nginx, `app: <its name>`) is sent at start + i·T whether or not earlier
//! ones were answered. A watch on pods records when each Deployment's pod is
//! first bound to a node and first Running; latency is from sending the
//! Deployment to those moments. `steady` first creates an initial set, then
//! alternates creating a new Deployment and deleting the oldest every T.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;
use serde_json::Value;

use crate::api::{clear_namespace, create, current_resource_version, delete_deployment};
use crate::arms::{parse_qps, qps_name};
use crate::cluster::{self, Arm, ClusterRecord};
use crate::measure::{cpu_by_component, cpu_per_100, watch_pods};
use crate::progress::Progress;
use crate::stats::Samples;

// Kept for modules that still import these from here (knative); the
// definitions live in `api` and `measure`, which suites import directly.
pub use crate::api::{client, client_for, Authed};
pub use crate::measure::watch_objects;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Mode {
    /// A Deployment every T.
    Burst,
    /// An initial set, then create one and delete the oldest every T.
    Steady,
}

#[derive(clap::Args, Clone, Debug)]
pub struct ChurnArgs {
    /// Arms to run, one after the other on this machine, each on a fresh cluster.
    #[arg(
        long,
        env = "STE_CHURN_ARMS",
        value_enum,
        value_delimiter = ',',
        default_value = "stock,ste"
    )]
    pub arms: Vec<Arm>,
    #[arg(long, env = "STE_CHURN_MODE", value_enum, default_value = "burst")]
    pub mode: Mode,
    /// Time between two Deployments (the offered rate is 1/T).
    #[arg(long, env = "STE_CHURN_INTERARRIVAL", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub interarrival: Duration,
    /// How long Deployments are sent.
    #[arg(long, env = "STE_CHURN_DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Deployments created before the measured phase in steady mode.
    #[arg(long, env = "STE_CHURN_INITIAL", default_value_t = 50)]
    pub initial: usize,
    /// Fake nodes (110 pods each).
    #[arg(long, env = "STE_CHURN_NODES", default_value_t = 50)]
    pub nodes: usize,
    /// RAM shards of the ste arm.
    #[arg(long, env = "STE_CHURN_SHARDS", default_value_t = 2)]
    pub shards: usize,
    /// Client rate limits of the controller-manager and scheduler to run under,
    /// comma separated: `default` (Kubernetes' own, which cap churn at a few
    /// Deployments/s) and/or a QPS to raise them to. Each is a separate run.
    #[arg(long, env = "STE_CHURN_CLIENT_QPS", value_delimiter = ',', default_value = "200", value_parser = parse_qps)]
    pub client_qps: Vec<Option<u32>>,
    /// Instead of one rate, offered rates (Deployments/s) to try in turn on each
    /// arm until one is not sustained (fewer than 95% of its pods bound within
    /// the window); reports the highest sustained rate. Overrides --interarrival.
    #[arg(long, env = "STE_CHURN_SWEEP", value_delimiter = ',')]
    pub sweep: Vec<f64>,
    /// Delay added to every fsync/fdatasync of the durable etcd (e.g. 8ms), as
    /// cloud block storage has; this VM's disk makes fsync nearly free.
    #[arg(long, env = "STE_CHURN_FSYNC_DELAY", value_parser = humantime::parse_duration)]
    pub fsync_delay: Option<Duration>,
    /// Where clusters, logs and results go.
    #[arg(long, env = "STE_CHURN_OUTPUT", default_value = "target/bench/churn")]
    pub output: PathBuf,
    #[command(flatten)]
    pub topology: crate::arms::Topology,
    #[command(flatten)]
    pub external: crate::external::ExternalArgs,
}

#[derive(Serialize, Clone, Debug)]
pub struct ArmResult {
    pub arm: Arm,
    pub mode: Mode,
    /// None: Kubernetes' default client limits (on every arm alike).
    pub client_qps: Option<u32>,
    /// Members of the durable etcd.
    pub etcd_members: usize,
    /// At least 95% of the Deployments sent had their pod bound within the window.
    pub sustained: bool,
    pub offered_per_s: f64,
    pub sent: usize,
    pub bound: usize,
    pub achieved_per_s: f64,
    pub bound_p50_ms: f64,
    pub bound_p99_ms: f64,
    pub bound_p999_ms: f64,
    pub running_p50_ms: f64,
    pub running_p99_ms: f64,
    /// CPU seconds per component during the measured phase.
    pub cpu_seconds: Vec<(String, f64)>,
    /// Raw data: per bound Deployment, (seconds from start to bound, create→bound ms).
    pub bound_samples: Vec<(f64, f64)>,
}

/// When each Deployment's first pod was bound and Running, by Deployment name.
#[derive(Default)]
struct PodTimes {
    bound: HashMap<String, Instant>,
    running: HashMap<String, Instant>,
}

/// Records when each Deployment's (`app` label) first pod was bound and Running.
fn track_deployments(times: Arc<Mutex<PodTimes>>) -> impl FnMut(&Value, Instant) + Send + 'static {
    move |pod, now| {
        let Some(app) = pod["metadata"]["labels"]["app"].as_str() else {
            return;
        };
        let mut times = times.lock().expect("times lock");
        if pod["spec"]["nodeName"].is_string() {
            times.bound.entry(app.to_string()).or_insert(now);
        }
        if pod["status"]["phase"] == "Running" {
            times.running.entry(app.to_string()).or_insert(now);
        }
    }
}

/// The cluster settings of one run of `args` at `client_qps`.
pub fn environment(args: &ChurnArgs, client_qps: Option<u32>) -> crate::arms::Environment {
    crate::arms::Environment {
        shards: args.shards,
        nodes: args.nodes,
        client_qps,
        fsync_delay: args.fsync_delay,
        topology: args.topology.clone(),
    }
}

/// One arm of `args` at `client_qps` on a fresh cluster: every step (rate).
pub async fn run_arm(
    args: &ChurnArgs,
    arm: Arm,
    client_qps: Option<u32>,
) -> anyhow::Result<Vec<ArmResult>> {
    let env = environment(args, client_qps);
    let dir = std::path::absolute(args.output.join(crate::arms::dir_name(arm, &env)))?;
    let record = crate::arms::up(arm, &env, dir).await?;
    let results = run_steps(args, arm, client_qps, &record).await;
    cluster::stop(&record).await?;
    results
}

/// Every step (rate) of the run on one cluster, from an empty namespace each.
async fn run_steps(
    args: &ChurnArgs,
    arm: Arm,
    client_qps: Option<u32>,
    record: &ClusterRecord,
) -> anyhow::Result<Vec<ArmResult>> {
    let rates: Vec<f64> = if args.sweep.is_empty() {
        vec![1.0 / args.interarrival.as_secs_f64()]
    } else {
        args.sweep.clone()
    };
    let mut results = Vec::new();
    for (step, rate) in rates.iter().enumerate() {
        if step > 0 {
            // Each step starts from an empty namespace: leftovers would fill the nodes.
            clear_namespace(record).await?;
        }
        let interarrival = Duration::from_secs_f64(1.0 / rate);
        let result = measure(
            args,
            arm,
            client_qps,
            interarrival,
            &format!("s{step}"),
            record,
        )
        .await?;
        let sustained = result.sustained;
        results.push(result);
        if !sustained {
            break;
        }
    }
    Ok(results)
}

async fn measure(
    args: &ChurnArgs,
    arm: Arm,
    client_qps: Option<u32>,
    interarrival: Duration,
    prefix: &str,
    record: &ClusterRecord,
) -> anyhow::Result<ArmResult> {
    let http = client_for(record)?;
    let resource_version = current_resource_version(record).await?;
    let times = Arc::new(Mutex::new(PodTimes::default()));
    let watcher = watch_pods(record, &resource_version, track_deployments(times.clone()))?;

    let mut live: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    if args.mode == Mode::Steady {
        eprintln!("  creating {} initial Deployments…", args.initial);
        for i in 0..args.initial {
            let name = format!("{prefix}-init-{i}");
            create(&http, record, &name).await?;
            live.push_back(name);
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while live
            .iter()
            .filter(|n| times.lock().expect("times").running.contains_key(*n))
            .count()
            < args.initial
        {
            if Instant::now() > deadline {
                bail!("initial Deployments not Running within 120s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let cpu_before = cpu_by_component(record);
    let total = (args.duration.as_secs_f64() / interarrival.as_secs_f64()).floor() as usize;
    eprintln!(
        "  {arm:?}: {:.1} Deployments/s for {:?}",
        1.0 / interarrival.as_secs_f64(),
        args.duration
    );
    let mut progress = Progress::new(
        format!(
            "{arm:?} ({}), {prefix}, {:.1}/s: sent",
            qps_name(client_qps),
            1.0 / interarrival.as_secs_f64()
        ),
        total as u64,
    );
    let start = Instant::now();
    let mut sent_at = HashMap::new();
    let mut requests = Vec::with_capacity(total);
    let errors = Arc::new(Mutex::new(Vec::new()));
    for i in 0..total {
        let due = start + interarrival.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let name = format!("{prefix}-churn-{i}");
        // Latency counts from when the Deployment was due (open loop).
        sent_at.insert(name.clone(), due);
        let (http, record, errors) = (http.clone(), record.clone(), errors.clone());
        let victim = if args.mode == Mode::Steady {
            live.pop_front()
        } else {
            None
        };
        live.push_back(name.clone());
        requests.push(tokio::spawn(async move {
            if let Err(err) = create(&http, &record, &name).await {
                errors.lock().expect("errors").push(err.to_string());
            }
            if let Some(victim) = victim {
                if let Err(err) = delete_deployment(&http, &record, &victim).await {
                    errors.lock().expect("errors").push(err.to_string());
                }
            }
        }));
        let bound = times.lock().expect("times").bound.len();
        progress.update(i as u64 + 1, &format!("bound {bound}"));
    }
    for request in requests {
        request.await?;
    }
    // Let the backlog drain (bounded), then stop measuring.
    let drain_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let bound = sent_at
            .keys()
            .filter(|n| times.lock().expect("times").bound.contains_key(*n))
            .count();
        progress.update(total as u64, &format!("bound {bound} (draining)"));
        if bound == total || Instant::now() > drain_deadline {
            progress.finish(total as u64, &format!("bound {bound}"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cpu_after = cpu_by_component(record);
    watcher.abort();
    let errors = errors.lock().expect("errors").clone();
    if !errors.is_empty() {
        eprintln!("  {} request errors, first: {}", errors.len(), errors[0]);
    }

    let times = times.lock().expect("times");
    let window_end = start + args.duration;
    let mut bound = Samples::default();
    let mut running = Samples::default();
    let mut bound_in_window = 0;
    let mut bound_samples = Vec::new();
    for (name, due) in &sent_at {
        if let Some(at) = times.bound.get(name) {
            let latency = at.saturating_duration_since(*due);
            bound.push(latency);
            bound_samples.push((
                at.saturating_duration_since(start).as_secs_f64(),
                latency.as_secs_f64() * 1e3,
            ));
            // Sustained: bound within the window, or within one interarrival after it.
            bound_in_window += (*at <= window_end + interarrival) as usize;
        }
        if let Some(at) = times.running.get(name) {
            running.push(at.saturating_duration_since(*due));
        }
    }
    let cpu_seconds = cpu_after
        .iter()
        .map(|(name, after)| {
            let before = cpu_before
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, b)| *b)
                .unwrap_or(0.0);
            (name.clone(), after - before)
        })
        .collect();
    bound_samples.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(ArmResult {
        arm,
        mode: args.mode,
        client_qps: crate::arms::client_qps(arm, client_qps),
        etcd_members: record.durable_etcd.len(),
        sustained: bound_in_window as f64 >= 0.95 * total as f64,
        bound_samples,
        offered_per_s: 1.0 / interarrival.as_secs_f64(),
        sent: total,
        bound: bound.len(),
        achieved_per_s: bound_in_window as f64 / args.duration.as_secs_f64(),
        bound_p50_ms: bound.percentile(50.0) / 1e3,
        bound_p99_ms: bound.percentile(99.0) / 1e3,
        bound_p999_ms: bound.percentile(99.9) / 1e3,
        running_p50_ms: running.percentile(50.0) / 1e3,
        running_p99_ms: running.percentile(99.0) / 1e3,
        cpu_seconds,
    })
}

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
