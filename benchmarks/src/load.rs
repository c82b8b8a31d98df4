//! The pod-churn load and its measurement, on one arm: the two-tier storage
//! thesis' open-loop Deployment client (the churn suite's and the members
//! scenario's pod half).
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
use k8s_openapi::api::apps::v1::ReplicaSet;
use serde::Serialize;

use crate::api::{
    clear_namespace, client_for, create, current_resource_version, delete_deployment,
};
use crate::arms::{parse_qps, qps_name};
use crate::cluster::{self, Arm, ClusterRecord};
use crate::measure::{cpu_by_component, cpu_used, watch_objects, watch_pods};
use crate::progress::Progress;
use crate::stats::Samples;

pub mod hops;
pub mod router_time;
pub mod store_time;
use hops::{Hop, Moments};

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
    /// Times the whole run is repeated on this machine. Arms are interleaved:
    /// repeat r runs every arm once, each on a fresh cluster, in the order of
    /// `--arms` on even repeats and reversed on odd ones. The report gives
    /// each repeat's ratios and the ratios of the percentiles over every
    /// repeat's samples pooled.
    #[arg(long, env = "STE_CHURN_REPEATS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub repeats: u64,
    #[command(flatten)]
    pub topology: crate::arms::Topology,
    #[command(flatten)]
    pub external: crate::external::ExternalArgs,
}

#[derive(Serialize, Clone, Debug)]
pub struct ArmResult {
    pub arm: Arm,
    /// Which repeat (0-based) of `--repeats` this is.
    pub repeat: u64,
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
    /// Where the time went, hop by hop ([`hops`]).
    pub hops: Vec<Hop>,
    /// On the ste arm, ste-router's own share of the step ([`router_time`]).
    pub router: Option<router_time::RouterTime>,
    /// kube-apiserver's calls to the pod store, on every arm ([`store_time`]).
    pub pod_store: Vec<store_time::StoreCalls>,
}

impl ChurnArgs {
    /// The local runs, in `--arms` order: every arm at each client limit.
    pub fn local_runs(&self) -> Vec<(Arm, Option<u32>)> {
        self.client_qps
            .iter()
            .flat_map(|qps| self.arms.iter().map(move |arm| (*arm, *qps)))
            .collect()
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
    let record = crate::cluster::up_arm(arm, &env, dir).await?;
    let results = run_steps(args, arm, client_qps, &record).await;
    cluster::stop(&record).await?;
    results
}

/// Every step (rate) of the run on one cluster, from an empty namespace each.
pub async fn run_steps(
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

/// Watches the namespace's ReplicaSets into `times`; None (and a line
/// saying so) when they cannot be listed, e.g. an external cluster's RBAC:
/// only the hops from them go unmeasured.
async fn watch_replicasets(
    record: &ClusterRecord,
    times: Arc<Mutex<Moments>>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let version = match crate::api::current_version_of::<ReplicaSet>(record).await {
        Ok(version) => version,
        Err(err) => {
            eprintln!("  (ReplicaSets not watched: {err:#}; their hops are not measured)");
            return Ok(None);
        }
    };
    let resource = crate::api::resource_of::<ReplicaSet>();
    let watcher = watch_objects(record, &resource, &version, move |replicaset, now| {
        let mut times = times.lock().expect("times lock");
        times.see_replicaset(replicaset, now)
    })?;
    Ok(Some(watcher))
}

/// The metrics read before and after a step, below the pod hops. Each is
/// optional: a cluster that does not expose one (an external cluster's
/// RBAC on kube-apiserver's /metrics) loses only that table.
struct Readings {
    store: Option<String>,
    router: Option<router_time::Counters>,
}

impl Readings {
    async fn take(http: &kube::Client, metrics: &reqwest::Client, record: &ClusterRecord) -> Self {
        let store = store_time::read(http).await.map_err(|err| {
            eprintln!("  (kube-apiserver's /metrics not read: {err:#}; no pod-store timing)")
        });
        let router = match &record.router_admin {
            Some(admin) => router_time::read(metrics, admin)
                .await
                .map_err(|err| {
                    eprintln!("  (ste-router's /metrics not read: {err:#}; no router timing)")
                })
                .ok(),
            None => None,
        };
        Readings {
            store: store.ok(),
            router,
        }
    }

    /// What happened from `self` to `after`, for `deployments` sent.
    fn between(
        self,
        after: Readings,
        deployments: usize,
    ) -> (Vec<store_time::StoreCalls>, Option<router_time::RouterTime>) {
        let pod_store = match (self.store, after.store) {
            (Some(before), Some(after)) => store_time::between(&before, &after, deployments),
            _ => Vec::new(),
        };
        let router = match (self.router, after.router) {
            (Some(before), Some(after)) => Some(router_time::between(&before, &after, deployments)),
            _ => None,
        };
        (pod_store, router)
    }
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
    let times = Arc::new(Mutex::new(Moments::default()));
    let pods = times.clone();
    let watcher = watch_pods(record, &resource_version, move |pod, now| {
        pods.lock().expect("times lock").see_pod(pod, now)
    })?;
    let replicaset_watcher = watch_replicasets(record, times.clone()).await?;

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
    let metrics_http = reqwest::Client::new();
    let readings_before = Readings::take(&http, &metrics_http, record).await;
    let total = (args.duration.as_secs_f64() / interarrival.as_secs_f64()).floor() as usize;
    eprintln!(
        "  {arm:?}: {:.1} Deployments/s for {:?}",
        1.0 / interarrival.as_secs_f64(),
        args.duration
    );
    let mut progress = Progress::new(
        format!(
            "{arm:?} ({}), {prefix}, {:.1}/s: sent",
            qps_name(crate::arms::client_qps(arm, client_qps)),
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
        let accepted = times.clone();
        let victim = if args.mode == Mode::Steady {
            live.pop_front()
        } else {
            None
        };
        live.push_back(name.clone());
        requests.push(tokio::spawn(async move {
            match create(&http, &record, &name).await {
                Ok(()) => {
                    let now = Instant::now();
                    accepted
                        .lock()
                        .expect("times lock")
                        .accepted
                        .insert(name, now);
                }
                Err(err) => errors.lock().expect("errors").push(err.to_string()),
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
    let readings_after = Readings::take(&http, &metrics_http, record).await;
    let (pod_store, router) = readings_before.between(readings_after, total);
    watcher.abort();
    if let Some(replicaset_watcher) = replicaset_watcher {
        replicaset_watcher.abort();
    }
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
    let cpu_seconds = cpu_used(&cpu_before, &cpu_after);
    let hops = hops::split(&sent_at, &times);
    bound_samples.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(ArmResult {
        arm,
        repeat: 0,
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
        hops,
        router,
        pod_store,
    })
}
