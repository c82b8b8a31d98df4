//! `ste-bench jobs`: Kubeλess' job bursts on each arm of a real local
//! control plane — 100 Jobs × 1 pod, and 1 Job × 100 pods — timing from the
//! burst's start until all pods were created, bound and Running (kwok runs
//! them, then completes them).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;
use serde_json::json;

use anyhow::Context;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{DeleteParams, ListParams, PostParams};

use crate::api::{clear_namespace, client_for, current_resource_version, namespaced};
use crate::cluster::{self, Arm, ClusterRecord};
use crate::measure::watch_pods;
use crate::progress::Progress;

#[derive(clap::Args, Clone, Debug)]
pub struct JobsArgs {
    /// Arms to run, one after the other, each on a fresh cluster.
    #[arg(
        long,
        env = "STE_JOBS_ARMS",
        value_enum,
        value_delimiter = ',',
        default_value = "stock,tuned,ste"
    )]
    pub arms: Vec<Arm>,
    /// Pods per burst: N Jobs × 1 pod, then 1 Job × N pods.
    #[arg(long, env = "STE_JOBS_PODS", default_value_t = 100)]
    pub pods: usize,
    /// Fake nodes.
    #[arg(long, env = "STE_JOBS_NODES", default_value_t = 20)]
    pub nodes: usize,
    /// RAM shards of the ste arm.
    #[arg(long, env = "STE_JOBS_SHARDS", default_value_t = 2)]
    pub shards: usize,
    /// Client QPS of controller-manager and scheduler (omit for Kubernetes' defaults).
    #[arg(long, env = "STE_JOBS_CLIENT_QPS")]
    pub client_qps: Option<u32>,
    /// Delay added to every fsync/fdatasync of the durable etcd (e.g. 8ms).
    #[arg(long, env = "STE_JOBS_FSYNC_DELAY", value_parser = humantime::parse_duration)]
    pub fsync_delay: Option<Duration>,
    #[command(flatten)]
    pub topology: crate::arms::Topology,
    /// Where clusters, logs and results go.
    #[arg(long, env = "STE_JOBS_OUTPUT", default_value = "target/bench/jobs")]
    pub output: PathBuf,
    #[command(flatten)]
    pub external: crate::external::ExternalArgs,
}

/// Both bursts on one cluster.
async fn bursts(
    args: &JobsArgs,
    arm: Arm,
    record: &ClusterRecord,
) -> anyhow::Result<Vec<BurstResult>> {
    let many = burst(record, arm, "jobs-x1", args.pods, 1).await?;
    delete_jobs(record).await?;
    let wide = burst(record, arm, "job-x-pods", 1, args.pods).await?;
    Ok(vec![many, wide])
}

#[derive(Serialize, Clone, Debug)]
pub struct BurstResult {
    pub arm: Arm,
    pub scenario: String,
    pub pods: usize,
    /// Seconds from the start of the burst until the last pod was seen, bound, Running.
    pub all_created_s: f64,
    pub all_bound_s: f64,
    pub all_running_s: f64,
}

#[derive(Default)]
struct Seen {
    created: HashMap<String, Instant>,
    bound: HashMap<String, Instant>,
    running: HashMap<String, Instant>,
}

fn job(name: &str, pods: usize) -> anyhow::Result<Job> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "parallelism": pods, "completions": pods, "backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never",
                                  "containers": [{"name": "work", "image": "busybox"}]}}
        }
    }))?)
}

async fn burst(
    record: &ClusterRecord,
    arm: Arm,
    scenario: &str,
    jobs: usize,
    pods_per_job: usize,
) -> anyhow::Result<BurstResult> {
    let http = client_for(record)?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watcher = {
        let seen = seen.clone();
        watch_pods(
            record,
            &current_resource_version(record).await?,
            move |pod, now| {
                let Some(name) = pod["metadata"]["name"].as_str() else {
                    return;
                };
                if pod["metadata"]["labels"]["batch.kubernetes.io/job-name"].is_null() {
                    return;
                }
                let mut seen = seen.lock().expect("seen lock");
                seen.created.entry(name.to_string()).or_insert(now);
                if pod["spec"]["nodeName"].is_string() {
                    seen.bound.entry(name.to_string()).or_insert(now);
                }
                // kwok may run and complete a pod between two events: either counts as started.
                if matches!(
                    pod["status"]["phase"].as_str(),
                    Some("Running" | "Succeeded")
                ) {
                    seen.running.entry(name.to_string()).or_insert(now);
                }
            },
        )?
    };
    let total = jobs * pods_per_job;
    let start = Instant::now();
    let api = namespaced::<Job>(&http, record);
    let creates = (0..jobs).map(|i| {
        let api = api.clone();
        let body = job(&format!("{scenario}-{i}"), pods_per_job);
        tokio::spawn(async move {
            api.create(&PostParams::default(), &body?)
                .await
                .context("creating a Job")?;
            anyhow::Ok(())
        })
    });
    for create in futures::future::join_all(creates).await {
        create??;
    }
    let deadline = start + Duration::from_secs(300);
    let mut progress = Progress::new(format!("{arm:?} {scenario}: pods started"), total as u64);
    loop {
        let (bound, running) = {
            let seen = seen.lock().expect("seen lock");
            (seen.bound.len(), seen.running.len())
        };
        let message = format!("bound {bound}");
        progress.update(running as u64, &message);
        if running >= total {
            progress.finish(running as u64, &message);
            break;
        }
        if Instant::now() > deadline {
            progress.finish(running as u64, &message);
            bail!("{arm:?} {scenario}: only {running} of {total} pods started within 300s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watcher.abort();
    let seen = seen.lock().expect("seen lock");
    let last = |times: &HashMap<String, Instant>| {
        times
            .values()
            .max()
            .map(|t| t.duration_since(start).as_secs_f64())
            .unwrap_or(f64::NAN)
    };
    Ok(BurstResult {
        arm,
        scenario: scenario.to_string(),
        pods: total,
        all_created_s: last(&seen.created),
        all_bound_s: last(&seen.bound),
        all_running_s: last(&seen.running),
    })
}

async fn delete_jobs(record: &ClusterRecord) -> anyhow::Result<()> {
    namespaced::<Job>(&client_for(record)?, record)
        .delete_collection(&DeleteParams::background(), &ListParams::default())
        .await
        .context("deleting the Jobs")?;
    clear_namespace(record).await
}

pub async fn run(args: JobsArgs) -> anyhow::Result<Vec<BurstResult>> {
    if args.pods == 0 || args.arms.is_empty() {
        bail!("--pods must be positive and --arms not empty");
    }
    std::fs::create_dir_all(&args.output)?;
    let mut results = Vec::new();
    let external = args.external.kubeconfig.is_some();
    if external {
        eprintln!(
            "[1/1] the cluster of {}",
            args.external
                .kubeconfig
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
        let args = &args;
        results = crate::external::run(&args.external, move |record| async move {
            bursts(args, Arm::External, &record).await
        })
        .await?;
    }
    for (i, arm) in args.arms.iter().enumerate().filter(|_| !external) {
        eprintln!("[{}/{}] {arm:?} arm", i + 1, args.arms.len());
        let env = crate::arms::Environment {
            shards: args.shards,
            nodes: args.nodes,
            client_qps: args.client_qps,
            fsync_delay: args.fsync_delay,
            topology: args.topology.clone(),
        };
        let dir = std::path::absolute(args.output.join(crate::arms::dir_name(*arm, &env)))?;
        let record = crate::cluster::up_arm(*arm, &env, dir).await?;
        let outcome = bursts(&args, *arm, &record).await;
        cluster::stop(&record).await?;
        results.extend(outcome?);
    }
    println!();
    println!(
        "Job bursts: {n} Jobs × 1 pod (jobs-x1) and 1 Job × {n} pods (job-x-pods), {}",
        args.external
            .heading()
            .unwrap_or_else(|| crate::arms::local_heading(
                args.nodes,
                args.client_qps,
                args.fsync_delay
            )),
        n = args.pods,
    );
    println!();
    println!("| arm | scenario | pods | all created s | all bound s | all Running s | × stock (Running) |");
    println!("|---|---|---|---|---|---|---|");
    for r in &results {
        let stock = results
            .iter()
            .find(|b| b.arm == Arm::Stock && b.scenario == r.scenario);
        println!(
            "| {:?} | {} | {} | {:.2} | {:.2} | {:.2} | {} |",
            r.arm,
            r.scenario,
            r.pods,
            r.all_created_s,
            r.all_bound_s,
            r.all_running_s,
            stock
                .map(|s| format!("{:.2}", r.all_running_s / s.all_running_s))
                .unwrap_or_else(|| "–".into())
        );
    }
    let path = args.output.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    crate::plots::write_suite(
        crate::plots::Suite::Jobs,
        "jobs",
        serde_json::to_value(&results)?,
        &args.output,
    )?;
    eprintln!("raw results: {}", path.display());
    Ok(results)
}
