//! `ste-bench failure`: what STE buys over the override arm when the RAM
//! store dies. In the middle of churn, the override arm's one RAM etcd, or
//! one STE shard (replication factor 1 or 2), is killed with SIGKILL and its
//! data directory wiped (a RAM disk lost with its node), then restarted
//! empty. Per arm: pods of the steady Deployments lost and recreated, time
//! until every steady ReplicaSet is whole again, errors and relists seen by
//! a client watch on pods, and errors of the churn client.
//!
//! Steady set: --deployments Deployments × --replicas pods, all Running
//! before the kill. Churn: every --churn-interval a Deployment (replicas 1)
//! is created and the one created 5 intervals earlier deleted, from
//! --before the kill until the end of the --observe window. "Whole" is
//! polled every 250 ms: each steady Deployment has --replicas Running,
//! undeleted pods; the time reported is from the kill until the last poll
//! that was not whole (0 if none), None if not whole at the window's end.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use futures::StreamExt;
use serde::Serialize;
use serde_json::json;

use anyhow::Context;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};

use crate::api::{
    client_for, create, delete_deployment, dynamic, list_json, namespaced, resource_of,
};
use crate::arms::{self, Arm, Environment, Topology};
use crate::cluster::{self, ClusterRecord};
use crate::progress::Progress;

/// Which RAM store dies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Victim {
    /// The override arm's one RAM etcd (pods and events of the whole cluster).
    Override,
    /// One of the STE arm's shards, replication factor 1.
    SteRf1,
    /// One of the STE arm's shards, replication factor 2.
    SteRf2,
}

impl Victim {
    fn arm(self) -> Arm {
        match self {
            Victim::Override => Arm::Override,
            Victim::SteRf1 | Victim::SteRf2 => Arm::Ste,
        }
    }

    fn replication_factor(self) -> u8 {
        if self == Victim::SteRf2 {
            2
        } else {
            1
        }
    }

    /// The process killed.
    fn process(self) -> &'static str {
        match self {
            Victim::Override => "etcd-override",
            Victim::SteRf1 | Victim::SteRf2 => "shard-0",
        }
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct FailureArgs {
    /// Arms to run, each on a fresh cluster.
    #[arg(
        long,
        env = "STE_FAILURE_ARMS",
        value_enum,
        value_delimiter = ',',
        default_value = "override,ste-rf1,ste-rf2"
    )]
    pub arms: Vec<Victim>,
    /// Steady Deployments whose pods are counted.
    #[arg(long, env = "STE_FAILURE_DEPLOYMENTS", default_value_t = 10)]
    pub deployments: usize,
    /// Pods of each steady Deployment.
    #[arg(long, env = "STE_FAILURE_REPLICAS", default_value_t = 5)]
    pub replicas: usize,
    /// Time between two churn Deployments (each deletes the one 5 before it).
    #[arg(long, env = "STE_FAILURE_CHURN_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub churn_interval: Duration,
    /// Churn before the kill.
    #[arg(long, env = "STE_FAILURE_BEFORE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub before: Duration,
    /// Observation after the kill (churn goes on).
    #[arg(long, env = "STE_FAILURE_OBSERVE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub observe: Duration,
    /// Fake nodes.
    #[arg(long, env = "STE_FAILURE_NODES", default_value_t = 10)]
    pub nodes: usize,
    /// RAM shards of the ste arms.
    #[arg(long, env = "STE_FAILURE_SHARDS", default_value_t = 3)]
    pub shards: usize,
    /// Client QPS of controller-manager and scheduler, on every arm: a
    /// number, or `default` for Kubernetes' own limits.
    #[arg(long, env = "STE_FAILURE_CLIENT_QPS", default_value = "200", value_parser = crate::arms::parse_qps)]
    pub client_qps: ::std::option::Option<u32>,
    /// Where clusters, logs and results go.
    #[arg(
        long,
        env = "STE_FAILURE_OUTPUT",
        default_value = "target/bench/failure"
    )]
    pub output: PathBuf,
}

#[derive(Serialize, Clone, Debug)]
pub struct FailureResult {
    pub arm: Victim,
    pub killed: String,
    pub client_qps: Option<u32>,
    /// Steady pods Running before the kill.
    pub pods_before: usize,
    /// Steady pods before the kill that no longer exist at the window's end.
    pub pods_lost: usize,
    /// Steady pods at the window's end that did not exist before the kill.
    pub pods_recreated: usize,
    /// Seconds from the kill until every steady ReplicaSet was whole for
    /// good; None: not whole at the end of the window.
    pub whole_after_s: Option<f64>,
    /// Polls of the steady pods that kube-apiserver answered with an error.
    pub list_errors: usize,
    pub watch_errors: usize,
    pub watch_relists: usize,
    /// Steady pods kube-apiserver lists at the window's end.
    pub pods_listed_after: usize,
    /// Steady pod keys the pods' store really holds then (the override's
    /// RAM etcd, or the router's key space), read with the etcd API: fewer
    /// than listed means kube-apiserver serves pods that no longer exist.
    pub pods_in_store_after: Option<usize>,
    /// The first few watch errors, as seen.
    pub watch_error_samples: Vec<String>,
    pub churn_requests: usize,
    pub churn_errors: usize,
}

/// What a client watch on pods saw.
#[derive(Default, Debug)]
struct WatchCounts {
    errors: usize,
    relists: usize,
    samples: Vec<String>,
}

impl WatchCounts {
    fn error(&mut self, text: String) {
        self.errors += 1;
        if self.samples.len() < 5 {
            self.samples.push(text);
        }
    }
}

/// A reflector-like watch on the namespace's pods: lists, watches from the
/// list, re-watches from the last resourceVersion when a watch ends, relists
/// on 410 Gone; counts every error (HTTP error, ERROR event, broken stream).
fn client_watch(
    record: &ClusterRecord,
    counts: Arc<Mutex<WatchCounts>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let pods = namespaced::<Pod>(&client_for(record)?, record);
    Ok(tokio::spawn(async move {
        let mut from: Option<String> = None;
        let mut first = true;
        loop {
            let Some(rv) = from.clone() else {
                match list_rv(&pods).await {
                    Ok(rv) => {
                        counts.lock().expect("counts").relists += usize::from(!first);
                        first = false;
                        from = Some(rv);
                    }
                    Err(err) => {
                        counts.lock().expect("counts").error(format!("list: {err}"));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                continue;
            };
            let stream = match pods.watch(&WatchParams::default(), &rv).await {
                Ok(stream) => stream,
                Err(err) => {
                    if matches!(&err, kube::Error::Api(e) if e.code == 410) {
                        from = None;
                    }
                    counts
                        .lock()
                        .expect("counts")
                        .error(format!("watch: {err}"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            from = follow(stream, rv, &counts).await;
        }
    }))
}

/// Reads one watch stream; returns the resourceVersion to watch from next,
/// None to relist.
async fn follow(
    stream: impl futures::Stream<Item = kube::Result<WatchEvent<Pod>>>,
    mut rv: String,
    counts: &Mutex<WatchCounts>,
) -> Option<String> {
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        let pod = match event {
            Ok(WatchEvent::Added(pod) | WatchEvent::Modified(pod) | WatchEvent::Deleted(pod)) => {
                pod
            }
            Ok(WatchEvent::Bookmark(bookmark)) => {
                rv = bookmark.metadata.resource_version;
                continue;
            }
            Ok(WatchEvent::Error(status)) => {
                counts
                    .lock()
                    .expect("counts")
                    .error(format!("ERROR event {}: {}", status.code, status.message));
                return (status.code != 410).then_some(rv);
            }
            Err(err) => {
                counts
                    .lock()
                    .expect("counts")
                    .error(format!("stream: {err}"));
                return Some(rv);
            }
        };
        if let Some(v) = pod.metadata.resource_version {
            rv = v;
        }
    }
    Some(rv)
}

async fn list_rv(pods: &Api<Pod>) -> anyhow::Result<String> {
    pods.list_metadata(&ListParams::default().limit(1))
        .await?
        .metadata
        .resource_version
        .context("list without resourceVersion")
}

fn steady_deployment(name: &str, replicas: usize) -> anyhow::Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name, "set": "steady"}},
                         "spec": {"containers": [{"name": "nginx", "image": "nginx"}]}}
        }
    }))?)
}

/// The steady pods now: (UIDs of live pods, whether every Deployment is whole).
async fn steady_pods(
    client: &kube::Client,
    record: &ClusterRecord,
    args: &FailureArgs,
) -> anyhow::Result<(BTreeSet<String>, bool)> {
    let list = list_json(
        &dynamic(client, &record.namespace, &resource_of::<Pod>()),
        &ListParams::default().labels("set=steady"),
    )
    .await
    .context("listing steady pods")?;
    let mut uids = BTreeSet::new();
    let mut running = std::collections::HashMap::<String, usize>::new();
    for pod in list["items"].as_array().into_iter().flatten() {
        if !pod["metadata"]["deletionTimestamp"].is_null() {
            continue;
        }
        if let Some(uid) = pod["metadata"]["uid"].as_str() {
            uids.insert(uid.to_string());
        }
        if pod["status"]["phase"] == "Running" && pod["spec"]["nodeName"].is_string() {
            let app = pod["metadata"]["labels"]["app"].as_str().unwrap_or("");
            *running.entry(app.to_string()).or_default() += 1;
        }
    }
    let whole = (0..args.deployments)
        .all(|i| running.get(&format!("steady-{i}")).copied() == Some(args.replicas));
    Ok((uids, whole))
}

/// Creates a churn Deployment every interval and deletes the one 5 before it.
fn churn(
    record: &ClusterRecord,
    interval: Duration,
    counts: Arc<Mutex<(usize, usize)>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let http = client_for(record)?;
    let record = record.clone();
    Ok(tokio::spawn(async move {
        let start = Instant::now();
        for i in 0usize.. {
            tokio::time::sleep_until((start + interval.mul_f64(i as f64)).into()).await;
            let mut ok = create(&http, &record, &format!("churn-{i}")).await.is_ok();
            let mut sent = 1;
            if i >= 5 {
                let victim = format!("churn-{}", i - 5);
                ok &= delete_deployment(&http, &record, &victim).await.is_ok();
                sent += 1;
            }
            let mut c = counts.lock().expect("churn counts");
            c.0 += sent;
            c.1 += usize::from(!ok);
        }
    }))
}

async fn steady_set_up(
    client: &kube::Client,
    record: &ClusterRecord,
    args: &FailureArgs,
) -> anyhow::Result<BTreeSet<String>> {
    for i in 0..args.deployments {
        let body = steady_deployment(&format!("steady-{i}"), args.replicas)?;
        namespaced::<Deployment>(client, record)
            .create(&PostParams::default(), &body)
            .await
            .with_context(|| format!("creating steady-{i}"))?;
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (uids, whole) = steady_pods(client, record, args).await?;
        if whole {
            return Ok(uids);
        }
        if Instant::now() > deadline {
            bail!("the steady Deployments were not Running within 180 s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn measure(
    args: &FailureArgs,
    victim: Victim,
    record: &ClusterRecord,
    dir: &std::path::Path,
) -> anyhow::Result<FailureResult> {
    let http = client_for(record)?;
    let before = steady_set_up(&http, record, args).await?;
    let watch_counts = Arc::new(Mutex::new(WatchCounts::default()));
    let watcher = client_watch(record, watch_counts.clone())?;
    let churn_counts = Arc::new(Mutex::new((0, 0)));
    let churner = churn(record, args.churn_interval, churn_counts.clone())?;
    tokio::time::sleep(args.before).await;

    eprintln!(
        "  {victim:?}: SIGKILL {} and wipe its data",
        victim.process()
    );
    let killed_at = Instant::now();
    let restarted = cluster::crash_and_restart(dir, victim.process(), true).await;
    let mut last_not_whole: Option<Instant> = None;
    let mut list_errors = 0;
    let mut last_uids = None;
    let mut whole_now = false;
    let window = args.observe.as_secs();
    let mut progress = Progress::new(format!("{victim:?}: seconds after the kill"), window);
    while killed_at.elapsed() < args.observe {
        let whole = if whole_now { "whole" } else { "not whole" };
        progress.update(killed_at.elapsed().as_secs().min(window), whole);
        match steady_pods(&http, record, args).await {
            Ok((uids, whole)) => {
                if !whole {
                    last_not_whole = Some(Instant::now());
                }
                whole_now = whole;
                last_uids = Some(uids);
            }
            Err(_) => {
                list_errors += 1;
                whole_now = false;
                last_not_whole = Some(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    progress.finish(window, if whole_now { "whole" } else { "not whole" });
    churner.abort();
    watcher.abort();
    restarted?;
    let after = last_uids.unwrap_or_default();
    let store = record.ram_etcd.clone().or_else(|| record.router.clone());
    let prefix = format!("/registry/pods/{}/steady-", record.namespace);
    let pods_in_store_after = match store {
        Some(endpoint) => count_keys(&endpoint, &prefix).await.ok(),
        None => None,
    };
    let watch = std::mem::take(&mut *watch_counts.lock().expect("counts"));
    let (churn_requests, churn_errors) = *churn_counts.lock().expect("churn counts");
    Ok(FailureResult {
        arm: victim,
        killed: victim.process().into(),
        client_qps: args.client_qps,
        pods_before: before.len(),
        pods_lost: before.difference(&after).count(),
        pods_listed_after: after.len(),
        pods_in_store_after,
        pods_recreated: after.difference(&before).count(),
        whole_after_s: whole_now.then(|| {
            last_not_whole
                .map(|t| t.saturating_duration_since(killed_at).as_secs_f64())
                .unwrap_or(0.0)
        }),
        list_errors,
        watch_errors: watch.errors,
        watch_relists: watch.relists,
        watch_error_samples: watch.samples,
        churn_requests,
        churn_errors,
    })
}

/// Keys under `prefix` in the etcd API at `endpoint`.
async fn count_keys(endpoint: &str, prefix: &str) -> anyhow::Result<usize> {
    use ste_etcd_proto::pb::{kv_client::KvClient, RangeRequest};
    let channel = tonic::transport::Channel::from_shared(endpoint.to_string())?
        .connect()
        .await?;
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let response = KvClient::new(channel)
        .range(RangeRequest {
            key: prefix.as_bytes().to_vec().into(),
            range_end: end.into(),
            keys_only: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(response.kvs.len())
}

async fn run_arm(args: &FailureArgs, victim: Victim) -> anyhow::Result<FailureResult> {
    let env = Environment {
        shards: args.shards,
        nodes: args.nodes,
        client_qps: args.client_qps,
        fsync_delay: None,
        topology: Topology {
            etcd_members: 1,
            replication_factor: victim.replication_factor(),
            ..Default::default()
        },
    };
    let dir = std::path::absolute(args.output.join(arms::dir_name(victim.arm(), &env)))?;
    let record = cluster::up_arm(victim.arm(), &env, dir.clone()).await?;
    let outcome = measure(args, victim, &record, &dir).await;
    // The restarted victim has a new pid: stop what the directory records now.
    let record = cluster::read_record(&dir).unwrap_or(record);
    cluster::stop(&record).await?;
    outcome
}

pub async fn run(args: FailureArgs) -> anyhow::Result<Vec<FailureResult>> {
    if args.arms.is_empty() || args.deployments == 0 || args.replicas == 0 {
        bail!("--arms, --deployments and --replicas must not be empty or 0");
    }
    if args.churn_interval.is_zero() || args.observe.is_zero() {
        bail!("--churn-interval and --observe must be positive");
    }
    if args.shards < 2 {
        bail!("--shards must be at least 2 (RF 2 needs a second shard)");
    }
    std::fs::create_dir_all(&args.output)?;
    let mut results = Vec::new();
    for (i, victim) in args.arms.iter().enumerate() {
        eprintln!("[{}/{}] {victim:?}", i + 1, args.arms.len());
        results.push(run_arm(&args, *victim).await?);
    }
    print_report(&args, &results);
    let path = args.output.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    crate::plots::write_suite(
        crate::plots::Suite::Failure,
        "failure",
        serde_json::to_value(&results)?,
        &args.output,
    )?;
    eprintln!("raw results: {}", path.display());
    Ok(results)
}

fn print_report(args: &FailureArgs, results: &[FailureResult]) {
    println!();
    println!(
        "RAM store killed (SIGKILL, data wiped, restarted empty) {:?} into churn (a Deployment every {:?}); {} steady Deployments × {} pods; {} fake nodes, {} on every arm; observed {:?}",
        args.before,
        args.churn_interval,
        args.deployments,
        args.replicas,
        args.nodes,
        crate::arms::qps_name(args.client_qps),
        args.observe
    );
    println!();
    println!("| arm | killed | steady pods lost / before | recreated | listed / in the store after | whole again after | list errors | client watch errors / relists | churn errors / requests |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in results {
        println!(
            "| {:?} | {} | {} / {} | {} | {} / {} | {} | {} | {} / {} | {} / {} |",
            r.arm,
            r.killed,
            r.pods_lost,
            r.pods_before,
            r.pods_recreated,
            r.pods_listed_after,
            r.pods_in_store_after
                .map(|n| n.to_string())
                .unwrap_or_else(|| "?".into()),
            r.whole_after_s
                .map(|s| format!("{s:.1} s"))
                .unwrap_or_else(|| format!("not within {:?}", args.observe)),
            r.list_errors,
            r.watch_errors,
            r.watch_relists,
            r.churn_errors,
            r.churn_requests
        );
    }
    for r in results.iter().filter(|r| !r.watch_error_samples.is_empty()) {
        println!(
            "{:?}: first watch errors: {}",
            r.arm,
            r.watch_error_samples.join("; ")
        );
    }
}
