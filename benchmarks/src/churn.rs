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

use anyhow::{bail, Context};
use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};

use crate::arms::qps_name;
use crate::cluster::{self, Arm, ClusterRecord};
use crate::stats::{process_group_cpu_seconds, Samples};

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

pub fn parse_qps(text: &str) -> Result<Option<u32>, String> {
    match text.trim() {
        "default" => Ok(None),
        n => n
            .parse()
            .map(Some)
            .map_err(|_| format!("{n:?} is neither `default` nor a number")),
    }
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

pub fn client() -> anyhow::Result<reqwest::Client> {
    // Loopback, self-signed serving certificate.
    Ok(reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .tcp_nodelay(true)
        .build()?)
}

/// A client for `record`'s API server: [`client`] for a local cluster; for
/// one given by kubeconfig, its CA, client certificate and TLS verification.
pub fn client_for(record: &ClusterRecord) -> anyhow::Result<reqwest::Client> {
    let Some(tls) = &record.tls else {
        return client();
    };
    let mut builder = reqwest::Client::builder()
        .tcp_nodelay(true)
        .danger_accept_invalid_certs(tls.insecure);
    if let Some(ca) = &tls.ca_pem {
        for cert in reqwest::Certificate::from_pem_bundle(ca)
            .context("the kubeconfig's certificate authority is not PEM")?
        {
            builder = builder.add_root_certificate(cert);
        }
    }
    if let Some(identity) = &tls.identity_pem {
        builder = builder.identity(
            reqwest::Identity::from_pem(identity)
                .context("the kubeconfig's client certificate and key are not PEM")?,
        );
    }
    Ok(builder.build()?)
}

/// Authenticates a request as `record`'s user: its bearer token, if any (a
/// client certificate is in the client itself).
pub trait Authed {
    fn auth(self, record: &ClusterRecord) -> Self;
}

impl Authed for reqwest::RequestBuilder {
    fn auth(self, record: &ClusterRecord) -> Self {
        if record.token.is_empty() {
            self
        } else {
            self.bearer_auth(&record.token)
        }
    }
}

/// Follows pods from `resource_version` on and records bound/Running times per `app` label.
/// Follows pods of the default namespace from `resource_version` on and calls
/// `on_pod` with each event's pod and its arrival time (sub-millisecond, unlike
/// the 1-second condition timestamps). Like a reflector, it re-watches from the
/// last resourceVersion when kube-apiserver ends the watch, and relists on 410.
pub fn watch_pods<F>(
    record: &ClusterRecord,
    resource_version: &str,
    on_pod: F,
) -> anyhow::Result<tokio::task::JoinHandle<()>>
where
    F: FnMut(&Value, Instant) + Send + 'static,
{
    watch_objects(
        record,
        &format!("/api/v1/namespaces/{}/pods", record.namespace),
        resource_version,
        on_pod,
    )
}

/// [`watch_pods`] for any collection path (e.g. `/apis/apps/v1/namespaces/default/deployments`).
pub fn watch_objects<F>(
    record: &ClusterRecord,
    path: &str,
    resource_version: &str,
    mut on_pod: F,
) -> anyhow::Result<tokio::task::JoinHandle<()>>
where
    F: FnMut(&Value, Instant) + Send + 'static,
{
    let http = client_for(record)?;
    let base = format!("{}{path}", record.api_url);
    let record = record.clone();
    let mut last = resource_version.to_string();
    Ok(tokio::spawn(async move {
        loop {
            let url = format!("{base}?watch=1&resourceVersion={last}&allowWatchBookmarks=true&timeoutSeconds=3600");
            let mut gone = false;
            if let Ok(response) = http.get(&url).auth(&record).send().await {
                let mut stream = response.bytes_stream();
                let mut buffer = Vec::new();
                while let Some(Ok(chunk)) = stream.next().await {
                    let now = Instant::now();
                    buffer.extend_from_slice(&chunk);
                    while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buffer.drain(..=end).collect();
                        let Ok(event) = serde_json::from_slice::<Value>(&line) else {
                            continue;
                        };
                        if event["type"] == "ERROR" {
                            gone |= event["object"]["code"] == 410;
                            continue;
                        }
                        if let Some(rv) = event["object"]["metadata"]["resourceVersion"].as_str() {
                            last = rv.to_string();
                        }
                        if event["type"] != "BOOKMARK" {
                            on_pod(&event["object"], now);
                        }
                    }
                }
            }
            if gone {
                // Too old: relist, report what is there now, and watch from the list.
                let Ok(response) = http.get(&base).auth(&record).send().await else {
                    continue;
                };
                let Ok(list) = response.json::<Value>().await else {
                    continue;
                };
                let now = Instant::now();
                for pod in list["items"].as_array().into_iter().flatten() {
                    on_pod(pod, now);
                }
                if let Some(rv) = list["metadata"]["resourceVersion"].as_str() {
                    last = rv.to_string();
                }
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }))
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

/// The first page (one pod) of the namespace's pods: its resourceVersion and
/// how many pods there are.
async fn first_pod_page(http: &reqwest::Client, record: &ClusterRecord) -> anyhow::Result<Value> {
    Ok(http
        .get(format!(
            "{}/api/v1/namespaces/{}/pods?limit=1",
            record.api_url, record.namespace
        ))
        .auth(record)
        .send()
        .await?
        .json()
        .await?)
}

/// The namespace's current resourceVersion, to watch from.
pub async fn current_resource_version(record: &ClusterRecord) -> anyhow::Result<String> {
    let list = first_pod_page(&client_for(record)?, record).await?;
    Ok(list["metadata"]["resourceVersion"]
        .as_str()
        .context("list without resourceVersion")?
        .to_string())
}

fn deployment(name: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                         "spec": {"containers": [{"name": "nginx", "image": "nginx"}]}}
        }
    })
}

/// Creates Deployment `name` (replicas 1, nginx, label `app: name`).
pub async fn create(
    http: &reqwest::Client,
    record: &ClusterRecord,
    name: &str,
) -> anyhow::Result<()> {
    let response = http
        .post(format!(
            "{}/apis/apps/v1/namespaces/{}/deployments",
            record.api_url, record.namespace
        ))
        .auth(record)
        .json(&deployment(name))
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("creating {name}: HTTP {}", response.status());
    }
    Ok(())
}

/// DELETE on an API path (background propagation), failing on any non-2xx answer.
pub async fn delete_path(
    http: &reqwest::Client,
    record: &ClusterRecord,
    path: &str,
) -> anyhow::Result<()> {
    let response = http
        .delete(format!(
            "{}{path}?propagationPolicy=Background",
            record.api_url
        ))
        .auth(record)
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("DELETE {path}: HTTP {}", response.status());
    }
    Ok(())
}

async fn delete(http: &reqwest::Client, record: &ClusterRecord, name: &str) -> anyhow::Result<()> {
    delete_path(
        http,
        record,
        &format!(
            "/apis/apps/v1/namespaces/{}/deployments/{name}",
            record.namespace
        ),
    )
    .await
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

/// Deletes every Deployment in the namespace and waits until no pod is left.
pub async fn clear_namespace(record: &ClusterRecord) -> anyhow::Result<()> {
    let http = client_for(record)?;
    delete_path(
        &http,
        record,
        &format!("/apis/apps/v1/namespaces/{}/deployments", record.namespace),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let pods = first_pod_page(&http, record).await?;
        let left = pods["items"].as_array().map(|i| i.len()).unwrap_or(0)
            + pods["metadata"]["remainingItemCount"].as_u64().unwrap_or(0) as usize;
        if left == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{left} pods still there 180s after deleting their Deployments");
        }
        eprint!("\r  waiting for {left} pods to go…   ");
        tokio::time::sleep(Duration::from_millis(500)).await;
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
                if let Err(err) = delete(&http, &record, &victim).await {
                    errors.lock().expect("errors").push(err.to_string());
                }
            }
        }));
        if i % 50 == 0 {
            eprint!(
                "\r  {arm:?}: sent {i}/{total}, bound {}   ",
                times.lock().expect("times").bound.len()
            );
        }
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
        eprint!("\r  {arm:?}: sent {total}/{total}, bound {bound}   ");
        if bound == total || Instant::now() > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!();
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
        client_qps,
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

/// CPU seconds used so far by each component (its whole process group).
pub fn cpu_by_component(record: &ClusterRecord) -> Vec<(String, f64)> {
    let mut by_kind: Vec<(String, f64)> = Vec::new();
    for process in &record.processes {
        // Shards are summed as one "shards" component, the durable etcd's
        // members as one "etcd-main".
        let kind = if process.name.starts_with("shard-") {
            "shards".to_string()
        } else if process.name.starts_with("etcd-main") {
            "etcd-main".to_string()
        } else {
            process.name.clone()
        };
        let cpu = process_group_cpu_seconds(process.pid);
        match by_kind.iter_mut().find(|(k, _)| *k == kind) {
            Some(entry) => entry.1 += cpu,
            None => by_kind.push((kind, cpu)),
        }
    }
    by_kind
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
    crate::plots::churn(&results, &args.output)?;
    crate::plots::churn_throughput(&results, &args.output)?;
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
        "plots: {dir}/churn-latency-cdf.svg, {dir}/churn-bound-over-time.svg, {dir}/churn-throughput-<arm>-<qps>-<rate>.svg",
        dir = args.output.display()
    );
    Ok(results)
}

/// CPU seconds per 100 Deployments, per component ("n/a" on a cluster the tool did not start).
pub fn cpu_per_100(arm: Arm, cpu_seconds: &[(String, f64)], deployments: usize) -> String {
    if arm == Arm::External {
        return "n/a".into();
    }
    cpu_seconds
        .iter()
        .filter(|(_, s)| *s > 0.0)
        .map(|(n, s)| format!("{n} {:.1}", s * 100.0 / deployments.max(1) as f64))
        .collect::<Vec<_>>()
        .join(", ")
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
