//! `ste-bench startup`: STE's own measurement of pod startup — pod creation
//! latency and Deployment throughput at increasing parallelism — on each arm
//! of a real local control plane, side by side in one run.
//!
//! For each parallelism P: P Deployments (replicas 1) are sent at once; a
//! watch on pods records when each Deployment's pod is first seen, bound to a
//! node and Running, and a watch on Deployments when each first reports an
//! available replica. Latency counts from the start of the burst (every
//! Deployment is due then); the level's wall time runs until the last
//! Deployment is available. Then all Deployments are deleted and the next
//! level waits until their pods are gone.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use k8s_openapi::api::apps::v1::Deployment;
use serde::Serialize;

use crate::api::{
    clear_namespace, client_for, collection_version, create, current_resource_version, dynamic,
    resource_of,
};
use crate::arms::parse_qps;
use crate::cluster::{self, Arm, ClusterRecord};
use crate::measure::{cpu_by_component, cpu_used, watch_objects, watch_pods};
use crate::progress::Progress;
use crate::stats::Samples;

#[derive(clap::Args, Clone, Debug)]
pub struct StartupArgs {
    /// Arms to run, one after the other on this machine, each on a fresh cluster.
    #[arg(
        long,
        env = "STE_STARTUP_ARMS",
        value_enum,
        value_delimiter = ',',
        default_value = "stock,tuned,ste"
    )]
    pub arms: Vec<Arm>,
    /// Deployments (replicas 1) created at once, one level after the other.
    #[arg(
        long,
        env = "STE_STARTUP_PARALLELISM",
        value_delimiter = ',',
        default_value = "1,10,50,100"
    )]
    pub parallelism: Vec<usize>,
    /// Fake nodes (110 pods each).
    #[arg(long, env = "STE_STARTUP_NODES", default_value_t = 20)]
    pub nodes: usize,
    /// RAM shards of the ste arm.
    #[arg(long, env = "STE_STARTUP_SHARDS", default_value_t = 2)]
    pub shards: usize,
    /// Client QPS of controller-manager and scheduler: a number, or `default`
    /// for Kubernetes' own limits (20 and 50 QPS).
    #[arg(long, env = "STE_STARTUP_CLIENT_QPS", default_value = "200", value_parser = parse_client_qps)]
    pub client_qps: ClientQps,
    /// Delay added to every fsync/fdatasync of the durable etcd (e.g. 8ms), as
    /// cloud block storage has; this VM's disk makes fsync nearly free.
    #[arg(long, env = "STE_STARTUP_FSYNC_DELAY", value_parser = humantime::parse_duration)]
    pub fsync_delay: Option<Duration>,
    #[command(flatten)]
    pub topology: crate::arms::Topology,
    /// Longest wait for one level's Deployments to become available.
    #[arg(long, env = "STE_STARTUP_TIMEOUT", default_value = "180s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Where clusters, logs and results go.
    #[arg(
        long,
        env = "STE_STARTUP_OUTPUT",
        default_value = "target/bench/startup"
    )]
    pub output: PathBuf,
    #[command(flatten)]
    pub external: crate::external::ExternalArgs,
}

/// Client QPS of the controllers; None: Kubernetes' defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientQps(pub Option<u32>);

fn parse_client_qps(text: &str) -> Result<ClientQps, String> {
    parse_qps(text).map(ClientQps)
}

/// One arm at one parallelism.
#[derive(Serialize, Clone, Debug)]
pub struct LevelResult {
    pub arm: Arm,
    pub parallelism: usize,
    /// Deployments whose pod reached Running / that became available.
    pub running: usize,
    pub available: usize,
    pub created_p50_ms: f64,
    pub created_p99_ms: f64,
    pub bound_p50_ms: f64,
    pub bound_p99_ms: f64,
    pub running_p50_ms: f64,
    pub running_p99_ms: f64,
    /// Seconds from the start of the burst until the last Deployment was available.
    pub wall_s: f64,
    /// Deployments fully available per second of wall time.
    pub deployments_per_s: f64,
    /// CPU seconds per component during the level.
    pub cpu_seconds: Vec<(String, f64)>,
    /// Raw data: create→Running ms per Deployment, sorted.
    pub running_ms: Vec<f64>,
}

/// When each Deployment's pod was first seen, bound and Running, and when the
/// Deployment first reported an available replica.
#[derive(Default)]
struct Times {
    created: HashMap<String, Instant>,
    bound: HashMap<String, Instant>,
    running: HashMap<String, Instant>,
    available: HashMap<String, Instant>,
}

/// The Deployments collection's resourceVersion, to watch from (in the ste
/// arm it is not the pods' one: they live in different etcds).
async fn deployments_resource_version(record: &ClusterRecord) -> anyhow::Result<String> {
    let client = client_for(record)?;
    collection_version(&dynamic(
        &client,
        &record.namespace,
        &resource_of::<Deployment>(),
    ))
    .await
}

async fn level(
    args: &StartupArgs,
    arm: Arm,
    index: usize,
    parallelism: usize,
    record: &ClusterRecord,
) -> anyhow::Result<LevelResult> {
    // Deployment `l<index>-p<parallelism>-<i>`: unique per level, matched with its dash.
    let prefix = format!("l{index}-p{parallelism}-");
    let times = Arc::new(Mutex::new(Times::default()));
    let pods = {
        let times = times.clone();
        let prefix = prefix.clone();
        watch_pods(
            record,
            &current_resource_version(record).await?,
            move |pod, now| {
                let Some(app) = pod["metadata"]["labels"]["app"].as_str() else {
                    return;
                };
                if !app.starts_with(&prefix) {
                    return;
                }
                let mut times = times.lock().expect("times lock");
                times.created.entry(app.to_string()).or_insert(now);
                if pod["spec"]["nodeName"].is_string() {
                    times.bound.entry(app.to_string()).or_insert(now);
                }
                if pod["status"]["phase"] == "Running" {
                    times.running.entry(app.to_string()).or_insert(now);
                }
            },
        )?
    };
    let deployments = {
        let (times, prefix) = (times.clone(), prefix.clone());
        watch_objects(
            record,
            &resource_of::<Deployment>(),
            &deployments_resource_version(record).await?,
            move |deployment, now| {
                let Some(name) = deployment["metadata"]["name"].as_str() else {
                    return;
                };
                if name.starts_with(&prefix)
                    && deployment["status"]["availableReplicas"]
                        .as_u64()
                        .unwrap_or(0)
                        >= 1
                {
                    times
                        .lock()
                        .expect("times lock")
                        .available
                        .entry(name.to_string())
                        .or_insert(now);
                }
            },
        )?
    };
    let outcome = measure_level(args, arm, parallelism, &prefix, record, &times).await;
    pods.abort();
    deployments.abort();
    outcome
}

async fn measure_level(
    args: &StartupArgs,
    arm: Arm,
    parallelism: usize,
    prefix: &str,
    record: &ClusterRecord,
    times: &Arc<Mutex<Times>>,
) -> anyhow::Result<LevelResult> {
    let http = client_for(record)?;
    let cpu_before = cpu_by_component(record);
    let start = Instant::now();
    let creates = (0..parallelism).map(|i| {
        let (http, record, name) = (http.clone(), record.clone(), format!("{prefix}{i}"));
        tokio::spawn(async move { create(&http, &record, &name).await })
    });
    for created in futures::future::join_all(creates).await {
        created??;
    }
    let deadline = start + args.timeout;
    let total = parallelism as u64;
    let mut progress = Progress::new(format!("{arm:?} P={parallelism}: pods Running"), total);
    loop {
        let (bound, running, available) = {
            let times = times.lock().expect("times lock");
            (
                times.bound.len(),
                times.running.len(),
                times.available.len(),
            )
        };
        let message = format!("bound {bound}, Deployments available {available}");
        progress.update(running as u64, &message);
        if running >= parallelism && available >= parallelism {
            progress.finish(running as u64, &message);
            break;
        }
        if Instant::now() > deadline {
            progress.finish(running as u64, &message);
            bail!("{arm:?} P={parallelism}: only {running} pods Running and {available} Deployments available within {:?}", args.timeout);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu_after = cpu_by_component(record);
    let times = times.lock().expect("times lock");
    let samples = |map: &HashMap<String, Instant>| {
        let mut samples = Samples::default();
        for at in map.values() {
            samples.push(at.saturating_duration_since(start));
        }
        samples
    };
    let (created, bound, running) = (
        samples(&times.created),
        samples(&times.bound),
        samples(&times.running),
    );
    let wall = times
        .available
        .values()
        .max()
        .map(|t| t.saturating_duration_since(start))
        .unwrap_or_default();
    let mut running_ms: Vec<f64> = times
        .running
        .values()
        .map(|t| t.saturating_duration_since(start).as_secs_f64() * 1e3)
        .collect();
    running_ms.sort_by(|a, b| a.total_cmp(b));
    let cpu_seconds = cpu_used(&cpu_before, &cpu_after);
    Ok(LevelResult {
        arm,
        parallelism,
        running: running.len(),
        available: times.available.len(),
        created_p50_ms: created.percentile(50.0) / 1e3,
        created_p99_ms: created.percentile(99.0) / 1e3,
        bound_p50_ms: bound.percentile(50.0) / 1e3,
        bound_p99_ms: bound.percentile(99.0) / 1e3,
        running_p50_ms: running.percentile(50.0) / 1e3,
        running_p99_ms: running.percentile(99.0) / 1e3,
        wall_s: wall.as_secs_f64(),
        deployments_per_s: times.available.len() as f64 / wall.as_secs_f64().max(1e-9),
        cpu_seconds,
        running_ms,
    })
}

async fn run_arm(args: &StartupArgs, arm: Arm) -> anyhow::Result<Vec<LevelResult>> {
    let env = crate::arms::Environment {
        shards: args.shards,
        nodes: args.nodes,
        client_qps: args.client_qps.0,
        fsync_delay: args.fsync_delay,
        topology: args.topology.clone(),
    };
    let dir = std::path::absolute(args.output.join(crate::arms::dir_name(arm, &env)))?;
    let record = crate::cluster::up_arm(arm, &env, dir).await?;
    let outcome = levels(args, arm, &record).await;
    cluster::stop(&record).await?;
    outcome
}

/// Every level of the run on one cluster, from an empty namespace each.
async fn levels(
    args: &StartupArgs,
    arm: Arm,
    record: &ClusterRecord,
) -> anyhow::Result<Vec<LevelResult>> {
    {
        let mut results = Vec::new();
        for (i, parallelism) in args.parallelism.iter().enumerate() {
            if i > 0 {
                clear_namespace(record).await?;
                eprintln!();
            }
            let result = level(args, arm, i, *parallelism, record).await?;
            eprintln!(
                "  {arm:?} P={parallelism}: create→Running p50 {:.0} ms, p99 {:.0} ms; all available after {:.2} s ({:.1} Deployments/s)",
                result.running_p50_ms, result.running_p99_ms, result.wall_s, result.deployments_per_s
            );
            results.push(result);
        }
        Ok(results)
    }
}

pub async fn run(args: StartupArgs) -> anyhow::Result<Vec<LevelResult>> {
    if args.arms.is_empty() {
        bail!("--arms needs at least one arm");
    }
    if args.parallelism.is_empty() || args.parallelism.contains(&0) {
        bail!("--parallelism needs one or more positive numbers of Deployments, e.g. 1,10,50,100");
    }
    let external = args.external.kubeconfig.is_some();
    if let Some(most) = args
        .parallelism
        .iter()
        .max()
        .filter(|most| !external && **most > args.nodes * 110)
    {
        bail!(
            "--parallelism {most} exceeds what {} fake nodes hold (110 pods each); raise --nodes",
            args.nodes
        );
    }
    if args.timeout.is_zero() {
        bail!("--timeout must be positive");
    }
    std::fs::create_dir_all(&args.output)?;
    let mut results = Vec::new();
    if external {
        eprintln!(
            "[1/1] the cluster of {}: parallelism {:?}",
            args.external
                .kubeconfig
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            args.parallelism
        );
        let args = &args;
        results = crate::external::run(&args.external, move |record| async move {
            levels(args, Arm::External, &record).await
        })
        .await?;
    }
    for (i, arm) in args.arms.iter().enumerate().filter(|_| !external) {
        eprintln!(
            "[{}/{}] {arm:?} arm: parallelism {:?}",
            i + 1,
            args.arms.len(),
            args.parallelism
        );
        results.extend(run_arm(&args, *arm).await?);
    }
    let plotted = serde_json::to_value(&results)?;
    let suite = crate::plots::Suite::Startup;
    crate::plots::write_suite(suite, "startup", plotted, &args.output)?;
    print_report(&args, &results);
    let json_path = args.output.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&results)?)?;
    let mut csv = String::from("arm,parallelism,running,available,created_p50_ms,created_p99_ms,bound_p50_ms,bound_p99_ms,running_p50_ms,running_p99_ms,wall_s,deployments_per_s\n");
    for r in &results {
        csv.push_str(&format!(
            "{:?},{},{},{},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.3},{:.2}\n",
            r.arm,
            r.parallelism,
            r.running,
            r.available,
            r.created_p50_ms,
            r.created_p99_ms,
            r.bound_p50_ms,
            r.bound_p99_ms,
            r.running_p50_ms,
            r.running_p99_ms,
            r.wall_s,
            r.deployments_per_s
        ));
    }
    std::fs::write(args.output.join("results.csv"), csv)?;
    eprintln!(
        "raw results: {}, results.csv, startup-latency-cdf.svg, startup-p50-p99.svg, startup-lines.svg",
        json_path.display()
    );
    Ok(results)
}

fn print_report(args: &StartupArgs, results: &[LevelResult]) {
    println!();
    println!(
        "Pod startup: parallelism {:?}, {}",
        args.parallelism,
        args.external
            .heading()
            .unwrap_or_else(|| crate::arms::local_heading(
                args.nodes,
                args.client_qps.0,
                args.fsync_delay
            )),
    );
    println!();
    println!("| arm | parallelism | create→pod p50 / p99 ms | create→bound p50 / p99 ms | create→Running p50 / p99 ms | all available s | Deployments available/s | CPU s per 100 Deployments |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in results {
        let cpu = crate::measure::cpu_per_100(r.arm, &r.cpu_seconds, r.parallelism);
        println!(
            "| {:?} | {} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {:.2} | {:.1} | {} |",
            r.arm,
            r.parallelism,
            r.created_p50_ms,
            r.created_p99_ms,
            r.bound_p50_ms,
            r.bound_p99_ms,
            r.running_p50_ms,
            r.running_p99_ms,
            r.wall_s,
            r.deployments_per_s,
            cpu
        );
    }
    println!();
    for r in results.iter().filter(|r| r.arm == Arm::Ste) {
        for base_arm in [Arm::Stock, Arm::Tuned] {
            if let Some(base) = results
                .iter()
                .find(|b| b.arm == base_arm && b.parallelism == r.parallelism)
            {
                println!(
                    "Ste vs {base_arm:?} (P={}): create→Running p50 ×{:.2}, p99 ×{:.2}; Deployments available/s ×{:.2}",
                    r.parallelism,
                    r.running_p50_ms / base.running_p50_ms,
                    r.running_p99_ms / base.running_p99_ms,
                    r.deployments_per_s / base.deployments_per_s
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: StartupArgs,
    }

    #[test]
    fn flags_parse_with_defaults_and_kubernetes_default_qps() {
        let cli = Cli::try_parse_from(["startup"]).expect("defaults parse");
        assert_eq!(cli.args.parallelism, vec![1, 10, 50, 100]);
        assert_eq!(cli.args.arms, vec![Arm::Stock, Arm::Tuned, Arm::Ste]);
        assert_eq!(cli.args.client_qps, ClientQps(Some(200)));
        let cli = Cli::try_parse_from([
            "startup",
            "--client-qps",
            "default",
            "--parallelism",
            "5,7",
            "--fsync-delay",
            "8ms",
        ])
        .expect("flags parse");
        assert_eq!(cli.args.client_qps, ClientQps(None));
        assert_eq!(cli.args.parallelism, vec![5, 7]);
        assert_eq!(cli.args.fsync_delay, Some(Duration::from_millis(8)));
        assert!(Cli::try_parse_from(["startup", "--client-qps", "fast"]).is_err());
    }

    #[test]
    fn bad_levels_are_refused_before_any_cluster_starts() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        for (flags, expected) in [
            (vec!["startup", "--parallelism", "0"], "positive"),
            (
                vec!["startup", "--parallelism", "300", "--nodes", "2"],
                "raise --nodes",
            ),
        ] {
            let args = Cli::try_parse_from(flags).expect("flags parse").args;
            let err = runtime.block_on(run(args)).expect_err("refused");
            assert!(err.to_string().contains(expected), "{err}");
        }
    }
}
