//! `ste-bench router`: the router over 1, 2, 4 RAM shards against one plain
//! etcd on a RAM disk with `--unsafe-no-fsync`, side by side in one run.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use serde::Serialize;
use ste_etcd_proto::pb::{
    kv_client::KvClient, maintenance_client::MaintenanceClient, watch_client::WatchClient,
    watch_request::RequestUnion, AlarmRequest, PutRequest, RangeRequest, StatusRequest,
    WatchCreateRequest, WatchRequest,
};
use ste_testkit::{free_port, shapes, Etcd};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::host::IdlePolicy;
use crate::stats::{process_context_switches, process_cpu_seconds, Samples};

#[derive(clap::Args)]
pub struct Args {
    /// Router arms to run, by number of shards (a plain etcd arm always runs first).
    #[arg(
        long,
        env = "STE_BENCH_SHARD_COUNTS",
        value_delimiter = ',',
        default_value = "1,2,4"
    )]
    shard_counts: Vec<usize>,
    /// Router arms per shard count: `tonic` (TCP to shards through tonic's
    /// Channel, the transport before), `tcp` (the router's own HTTP/2
    /// connections), `unix-shards` (those over the shards' Unix sockets),
    /// `unix` (also the client on the router's Unix socket; adds a plain
    /// etcd arm with the client on etcd's Unix socket).
    #[arg(
        long,
        env = "STE_BENCH_TRANSPORTS",
        value_delimiter = ',',
        value_enum,
        default_value = "tonic,tcp,unix-shards,unix"
    )]
    transports: Vec<Transport>,
    /// Keys loaded before the List measurement (kube-apiserver pages by 500).
    #[arg(long, env = "STE_BENCH_KEYS", default_value_t = 10_000)]
    keys: usize,
    /// Value size in bytes (a small pod is 1–4 KiB).
    #[arg(long, env = "STE_BENCH_VALUE_SIZE", default_value_t = 1024)]
    value_size: usize,
    /// Sequential creates and updates timed one by one (one client, no queueing).
    #[arg(long, env = "STE_BENCH_LATENCY_OPS", default_value_t = 2000)]
    latency_ops: usize,
    /// Concurrent clients for the saturation phase.
    #[arg(long, env = "STE_BENCH_CONCURRENCY", default_value_t = 64)]
    concurrency: usize,
    /// Writes timed from send to their watch event.
    #[arg(long, env = "STE_BENCH_WATCH_OPS", default_value_t = 500)]
    watch_ops: usize,
    /// Writes at --paced-rate, each watched, for the CPU per write at a
    /// control plane's churn rate (0 skips the phase). At 30 Deployments/s
    /// kube-apiserver sends the pod store ~180 writes/s, one at a time; the
    /// saturation phase's CPU per write says nothing about that regime.
    #[arg(long, env = "STE_BENCH_PACED_OPS", default_value_t = 1000)]
    paced_ops: usize,
    /// Writes per second of the paced phase.
    #[arg(long, env = "STE_BENCH_PACED_RATE", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    paced_rate: u32,
    /// Where the etcd data directories go (a RAM disk, like the shards').
    #[arg(long, env = "STE_BENCH_DATA_DIR", default_value = "/dev/shm")]
    data_dir: PathBuf,
    /// The ste-router binary (default: next to this one).
    #[arg(long, env = "STE_ROUTER_BIN")]
    router_bin: Option<PathBuf>,
    /// A second ste-router binary (e.g. built from an older commit): each
    /// router arm then also runs with it, just before, named `… (baseline)`.
    #[arg(long, env = "STE_BENCH_BASELINE_ROUTER_BIN")]
    baseline_router_bin: Option<PathBuf>,
    /// Worker threads of the router (its --worker-threads; default: the router's own, 1).
    #[arg(long, env = "STE_BENCH_ROUTER_THREADS")]
    router_threads: Option<usize>,
    /// JSON results file.
    #[arg(
        long,
        env = "STE_BENCH_OUTPUT",
        default_value = "target/bench/router.json"
    )]
    output: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Tonic,
    Tcp,
    UnixShards,
    Unix,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Tonic => "tonic",
            Transport::Tcp => "tcp",
            Transport::UnixShards => "unix-shards",
            Transport::Unix => "unix",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Transport::Tonic => "shards over TCP through tonic's Channel",
            Transport::Tcp => "shards over TCP on the router's own HTTP/2 connections",
            Transport::UnixShards => "shards over Unix sockets",
            Transport::Unix => "shards and client over Unix sockets",
        }
    }
}

/// What one arm measures: plain etcd (0 shards) or the router, and how it is reached.
struct Arm {
    shards: usize,
    transport: String,
    /// The router's /metrics URL (where the time of a write is split).
    admin: Option<String>,
}

impl Arm {
    fn etcd(transport: &str) -> Arm {
        Arm {
            shards: 0,
            transport: transport.to_string(),
            admin: None,
        }
    }

    fn name(&self) -> String {
        match self.shards {
            0 => format!("plain etcd ({})", self.transport),
            n => format!("router, {n} shard(s), {}", self.transport),
        }
    }
}

#[derive(Serialize, Clone)]
struct ArmResult {
    arm: String,
    shards: usize,
    transport: String,
    /// Sequential creates and updates, mean µs: inside the router (its Txn
    /// handler, from the request decoded to the answer ready) and the
    /// shard's Txn (the committer's call, sent to answered).
    router_txn_mean_us: Option<f64>,
    shard_txn_mean_us: Option<f64>,
    get_p50_us: f64,
    get_p99_us: f64,
    create_p50_us: f64,
    create_p99_us: f64,
    update_p50_us: f64,
    update_p99_us: f64,
    list_all_ms: f64,
    watch_p50_us: f64,
    watch_p99_us: f64,
    saturated_writes_per_s: f64,
    router_cpu_us_per_write: Option<f64>,
    etcd_cpu_us_per_write: f64,
    /// CPU per write at --paced-rate, each write watched (None: phase skipped).
    paced_router_cpu_us_per_write: Option<f64>,
    paced_etcd_cpu_us_per_write: Option<f64>,
    /// Context switches per write in the paced phase (every thread).
    paced_router_switches_per_write: Option<f64>,
    paced_etcd_switches_per_write: Option<f64>,
}

struct RouterProcess(Child);

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.latency_ops >= args.keys {
        bail!(
            "--latency-ops ({}) must be smaller than --keys ({})",
            args.latency_ops,
            args.keys
        );
    }
    if args.shard_counts.contains(&0) {
        bail!("--shard-counts must be positive");
    }
    if args.transports.is_empty() {
        bail!("--transports names no arm");
    }
    let router_bin = match &args.router_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("ste-router"),
    };
    if !router_bin.is_file() {
        bail!("ste-router binary not found at {} (build it with `cargo build --release -p ste-router` or pass --router-bin)", router_bin.display());
    }
    if let Some(baseline) = &args.baseline_router_bin {
        if !baseline.is_file() {
            bail!("--baseline-router-bin {} is not a file", baseline.display());
        }
    }
    let binaries: Vec<(&std::path::Path, &str)> = args
        .baseline_router_bin
        .iter()
        .map(|b| (b.as_path(), " (baseline)"))
        .chain([(router_bin.as_path(), "")])
        .collect();
    let unix_client = args.transports.contains(&Transport::Unix);
    let arms = args.shard_counts.len() * args.transports.len() * binaries.len()
        + 1
        + usize::from(unix_client);
    let mut step = 0;
    let mut results = Vec::new();

    step += 1;
    eprintln!("[{step}/{arms}] plain etcd (RAM disk, --unsafe-no-fsync)");
    {
        let etcd = start_etcd("plain", &args).await?;
        let pids = vec![etcd.pid().context("etcd pid")?];
        let arm = Arm::etcd("tcp");
        results.push(measure(&arm, &etcd.endpoint(), None, &pids, &args).await?);
    }
    if unix_client {
        step += 1;
        eprintln!("[{step}/{arms}] plain etcd, client on its Unix socket");
        let etcd = start_etcd("plain-unix", &args).await?;
        let pids = vec![etcd.pid().context("etcd pid")?];
        let arm = Arm::etcd("unix");
        results.push(measure(&arm, &etcd.unix_endpoint(), None, &pids, &args).await?);
    }
    for &count in &args.shard_counts {
        for &transport in &args.transports {
            for &(binary, suffix) in &binaries {
                step += 1;
                eprintln!(
                    "[{step}/{arms}] ste-router{suffix} over {count} shard(s), {}",
                    transport.describe()
                );
                results.push(router_arm(binary, suffix, count, transport, &args).await?);
            }
        }
    }

    print_report(&results, &args);
    if let Some(parent) = args.output.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.output, serde_json::to_string_pretty(&results)?)?;
    eprintln!("raw results: {}", args.output.display());
    let dir = args.output.parent().unwrap_or(std::path::Path::new("."));
    crate::plots::write_suite(
        crate::plots::Suite::Router,
        "router",
        serde_json::to_value(&results)?,
        dir,
    )?;
    Ok(())
}

/// One router arm: `count` fresh shards, a router process, the phases.
async fn router_arm(
    router_bin: &std::path::Path,
    suffix: &str,
    count: usize,
    transport: Transport,
    args: &Args,
) -> anyhow::Result<ArmResult> {
    let mut shards = Vec::new();
    for s in 0..count {
        shards.push(start_etcd(&format!("shard-{s}"), args).await?);
    }
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let spec: Vec<String> = shards
        .iter()
        .map(|s| match transport {
            Transport::Tonic | Transport::Tcp => format!("{}={}", s.name, s.endpoint()),
            Transport::UnixShards | Transport::Unix => {
                format!("{}={}", s.name, s.unix_endpoint())
            }
        })
        .collect();
    let socket_dir = tempfile::tempdir()?;
    let socket = socket_dir.path().join("router.sock");
    let shard_transport = match transport {
        Transport::Tonic => "tonic",
        _ => "h2",
    };
    let child = Command::new(router_bin)
        .args(["--listen", &listen, "--admin-listen", &admin])
        .args(["--shards", &spec.join(",")])
        .args(["--shard-transport", shard_transport])
        .args((transport == Transport::Unix).then(|| format!("--listen-unix={}", socket.display())))
        .args(args.router_threads.map(|n| format!("--worker-threads={n}")))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", router_bin.display()))?;
    let router = RouterProcess(child);
    wait_ready(&format!("http://{listen}")).await?;
    let endpoint = match transport {
        Transport::Unix => format!("unix://{}", socket.display()),
        _ => format!("http://{listen}"),
    };
    let pids: Vec<u32> = shards.iter().filter_map(|s| s.pid()).collect();
    let arm = Arm {
        shards: count,
        transport: format!("{}{suffix}", transport.name()),
        admin: Some(format!("http://{admin}/metrics")),
    };
    measure(&arm, &endpoint, Some(router.0.id()), &pids, args).await
}

async fn start_etcd(name: &str, args: &Args) -> anyhow::Result<Etcd> {
    Etcd::start_in(
        name,
        &args.data_dir,
        &["--unsafe-no-fsync", "--quota-backend-bytes", "4294967296"],
    )
    .await
    .with_context(|| format!("starting etcd {name} in {}", args.data_dir.display()))
}

async fn wait_ready(endpoint: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(channel) = Channel::from_shared(endpoint.to_string())?.connect().await {
            if MaintenanceClient::new(channel)
                .status(StatusRequest {})
                .await
                .is_ok()
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("ste-router at {endpoint} not ready within 30s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn key(i: usize) -> Bytes {
    Bytes::from(format!("/registry/pods/bench/pod-{i:06}"))
}

/// CPU seconds and context switches of the router and of the etcds so far.
struct Usage {
    router: Option<(f64, u64)>,
    etcd: (f64, u64),
}

/// What a process spent per write between two [`Usage`]s.
#[derive(Clone, Copy)]
struct PerWrite {
    cpu_us: f64,
    switches: f64,
}

impl Usage {
    fn now(router_pid: Option<u32>, etcd_pids: &[u32]) -> Usage {
        let of = |pid: u32| Some((process_cpu_seconds(pid)?, process_context_switches(pid)?));
        let etcds = etcd_pids.iter().filter_map(|p| of(*p));
        Usage {
            router: router_pid.and_then(of),
            etcd: etcds.fold((0.0, 0), |(c, s), (c1, s1)| (c + c1, s + s1)),
        }
    }

    /// Per write since `before`: the router's (None without one) and the etcds'.
    fn since(&self, before: &Usage, writes: f64) -> (Option<PerWrite>, PerWrite) {
        let per_write = |(c1, s1): (f64, u64), (c0, s0): (f64, u64)| PerWrite {
            cpu_us: (c1 - c0) / writes * 1e6,
            // Threads that exit take their counts with them: never below zero.
            switches: s1.saturating_sub(s0) as f64 / writes,
        };
        (
            self.router.zip(before.router).map(|(a, b)| per_write(a, b)),
            per_write(self.etcd, before.etcd),
        )
    }
}

/// A gRPC channel to `http://…` or `unix:///…`.
async fn connect(endpoint: &str) -> anyhow::Result<Channel> {
    let Some(path) = endpoint.strip_prefix("unix://") else {
        return Ok(Channel::from_shared(endpoint.to_string())?
            .tcp_nodelay(true)
            .connect()
            .await?);
    };
    let path = PathBuf::from(path);
    Ok(Channel::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await?)
}

/// (sum, count) of a histogram in a Prometheus text page.
fn histogram_sum_count(page: &str, name: &str, labels: &str) -> Option<(f64, f64)> {
    let value = |suffix: &str| {
        let prefix = format!("{name}_{suffix}{labels} ");
        page.lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    Some((value("sum")?, value("count")?))
}

/// Mean µs of the router's Txn handler and of its shard Txns, from two scrapes.
fn split_of_a_write(before: &str, after: &str) -> (Option<f64>, Option<f64>) {
    let mean = |name: &str, labels: &str| {
        let (s0, c0) = histogram_sum_count(before, name, labels).unwrap_or((0.0, 0.0));
        let (s1, c1) = histogram_sum_count(after, name, labels)?;
        (c1 > c0).then(|| (s1 - s0) / (c1 - c0) * 1e6)
    };
    (
        mean("ste_router_rpc_duration_seconds", "{method=\"Txn\"}"),
        mean("ste_router_shard_txn_duration_seconds", ""),
    )
}

async fn measure(
    arm: &Arm,
    endpoint: &str,
    router_pid: Option<u32>,
    etcd_pids: &[u32],
    args: &Args,
) -> anyhow::Result<ArmResult> {
    let name = arm.name();
    let shards = arm.shards;
    let channel = connect(endpoint).await?;
    let scrape = || {
        arm.admin
            .as_deref()
            .and_then(ste_testkit::http_get)
            .unwrap_or_default()
    };
    let metrics_before = scrape();
    let mut kv = KvClient::new(channel.clone()).max_decoding_message_size(usize::MAX);
    let value = Bytes::from(vec![b'x'; args.value_size]);

    // Sequential creates and updates: the latency of one request with no queueing.
    let mut create = Samples::default();
    let mut revisions = Vec::with_capacity(args.latency_ops);
    for i in 0..args.latency_ops {
        let started = Instant::now();
        let r = kv.txn(shapes::create(&key(i), &value)).await?.into_inner();
        create.push(started.elapsed());
        if !r.succeeded {
            bail!("{name}: create of {:?} failed", key(i));
        }
        revisions.push(r.header.map(|h| h.revision).unwrap_or(0));
    }
    let mut update = Samples::default();
    for (i, revision) in revisions.iter().enumerate() {
        let txn = shapes::update(&key(i), *revision, &value);
        let started = Instant::now();
        let r = kv.txn(txn).await?.into_inner();
        update.push(started.elapsed());
        if !r.succeeded {
            bail!("{name}: update {i} lost its compare");
        }
    }
    let (router_txn_mean_us, shard_txn_mean_us) = split_of_a_write(&metrics_before, &scrape());
    if let (Some(router), Some(shard)) = (router_txn_mean_us, shard_txn_mean_us) {
        eprintln!("  sequential Txns, mean: {router:.0} µs in the router, of which {shard:.0} µs the shard Txn");
    }
    // An RPC the server answers by itself (Maintenance.Alarm list): the bare gRPC hop.
    let mut maintenance = MaintenanceClient::new(channel.clone());
    let mut bare = Samples::default();
    for _ in 0..args.latency_ops {
        let started = Instant::now();
        maintenance.alarm(AlarmRequest::default()).await?;
        bare.push(started.elapsed());
    }
    eprintln!("  bare gRPC round trip p50 {:.0} µs", bare.percentile(50.0));
    // Sequential single-key reads: the cost of the extra hop without the write path.
    let mut get = Samples::default();
    for i in 0..args.latency_ops {
        let started = Instant::now();
        kv.range(RangeRequest {
            key: key(i),
            ..Default::default()
        })
        .await?;
        get.push(started.elapsed());
    }
    eprintln!(
        "  gets p50 {:.0} µs, creates p50 {:.0} µs, updates p50 {:.0} µs",
        get.percentile(50.0),
        create.percentile(50.0),
        update.percentile(50.0)
    );

    // Saturation: the rest of the keys from many concurrent clients.
    let usage_before = Usage::now(router_pid, etcd_pids);
    let next = Arc::new(AtomicUsize::new(args.latency_ops));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let next = next.clone();
        let mut kv = kv.clone();
        let value = value.clone();
        let total = args.keys;
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<(), tonic::Status>(());
                }
                kv.txn(shapes::create(&key(i), &value)).await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let writes = (args.keys - args.latency_ops) as f64;
    let (router_spent, etcd_spent) = Usage::now(router_pid, etcd_pids).since(&usage_before, writes);
    eprintln!(
        "  saturated: {:.0} writes/s with {} clients",
        writes / elapsed,
        args.concurrency
    );

    // Paged List of every key, as kube-apiserver pages (limit 500, one revision).
    let mut best = f64::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        let mut from = Bytes::from_static(b"/registry/pods/bench/");
        let end = Bytes::from_static(b"/registry/pods/bench0");
        let mut revision = 0;
        let mut seen = 0;
        loop {
            let r = kv
                .range(RangeRequest {
                    key: from.clone(),
                    range_end: end.clone(),
                    limit: 500,
                    revision,
                    ..Default::default()
                })
                .await?
                .into_inner();
            if revision == 0 {
                revision = r.header.map(|h| h.revision).unwrap_or(0);
            }
            seen += r.kvs.len();
            match (r.more, r.kvs.last()) {
                (true, Some(last)) => {
                    let mut next = last.key.to_vec();
                    next.push(0);
                    from = Bytes::from(next);
                }
                _ => break,
            }
        }
        if seen != args.keys {
            bail!(
                "{name}: paged list returned {seen} keys, expected {}",
                args.keys
            );
        }
        best = best.min(started.elapsed().as_secs_f64() * 1e3);
    }
    eprintln!("  paged list of {} keys: {best:.1} ms", args.keys);

    // Watch delivery: from sending a write to receiving its event.
    let (req_tx, mut stream) = open_watch(&name, &channel, "/registry/pods/watch/").await?;
    let mut watch = Samples::default();
    for i in 0..args.watch_ops {
        let k = Bytes::from(format!("/registry/pods/watch/{i}"));
        let started = Instant::now();
        let put = kv.put(PutRequest {
            key: k.clone(),
            value: value.clone(),
            ..Default::default()
        });
        let event = async {
            loop {
                let r = stream.message().await?.context("watch stream closed")?;
                if r.events
                    .iter()
                    .any(|e| e.kv.as_ref().is_some_and(|kv| kv.key == k))
                {
                    return anyhow::Ok(started.elapsed());
                }
            }
        };
        let (put, delivered) = tokio::join!(put, event);
        put?;
        watch.push(delivered?);
    }
    drop(req_tx);
    eprintln!("  watch delivery p99 {:.0} µs", watch.percentile(99.0));
    let paced = match args.paced_ops {
        0 => None,
        _ => Some(paced(&name, &channel, &value, router_pid, etcd_pids, args).await?),
    };

    Ok(ArmResult {
        arm: name,
        shards,
        transport: arm.transport.to_string(),
        router_txn_mean_us,
        shard_txn_mean_us,
        get_p50_us: get.percentile(50.0),
        get_p99_us: get.percentile(99.0),
        create_p50_us: create.percentile(50.0),
        create_p99_us: create.percentile(99.0),
        update_p50_us: update.percentile(50.0),
        update_p99_us: update.percentile(99.0),
        list_all_ms: best,
        watch_p50_us: watch.percentile(50.0),
        watch_p99_us: watch.percentile(99.0),
        saturated_writes_per_s: writes / elapsed,
        router_cpu_us_per_write: router_spent.map(|r| r.cpu_us),
        etcd_cpu_us_per_write: etcd_spent.cpu_us,
        paced_router_cpu_us_per_write: paced.and_then(|(r, _)| r).map(|r| r.cpu_us),
        paced_etcd_cpu_us_per_write: paced.map(|(_, e)| e.cpu_us),
        paced_router_switches_per_write: paced.and_then(|(r, _)| r).map(|r| r.switches),
        paced_etcd_switches_per_write: paced.map(|(_, e)| e.switches),
    })
}

/// A watch on every key under `prefix` (which ends in '/'), created: the
/// request sender (the stream lives while it does) and the answers.
async fn open_watch(
    name: &str,
    channel: &Channel,
    prefix: &'static str,
) -> anyhow::Result<(
    mpsc::Sender<WatchRequest>,
    tonic::Streaming<ste_etcd_proto::pb::WatchResponse>,
)> {
    let range_end = format!("{}0", prefix.trim_end_matches('/'));
    let (req_tx, req_rx) = mpsc::channel(1);
    req_tx
        .send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: Bytes::from_static(prefix.as_bytes()),
                range_end: Bytes::from(range_end),
                ..Default::default()
            })),
        })
        .await?;
    let mut stream = WatchClient::new(channel.clone())
        .watch(ReceiverStream::new(req_rx))
        .await?
        .into_inner();
    let created = stream.message().await?.context("watch stream closed")?;
    if !created.created {
        bail!("{name}: watch on {prefix} not created");
    }
    Ok((req_tx, stream))
}

/// Creates at `--paced-rate`, one at a time, with a watch on their prefix
/// (as kube-apiserver's watch cache): the CPU each process spends per write
/// when writes arrive one by one, not in a saturated stream.
async fn paced(
    name: &str,
    channel: &Channel,
    value: &Bytes,
    router_pid: Option<u32>,
    etcd_pids: &[u32],
    args: &Args,
) -> anyhow::Result<(Option<PerWrite>, PerWrite)> {
    let prefix = "/registry/pods/paced/";
    let (req_tx, mut stream) = open_watch(name, channel, prefix).await?;
    let ops = args.paced_ops;
    let seen = tokio::spawn(async move {
        let mut events = 0;
        while events < ops {
            let Some(r) = stream.message().await? else {
                break;
            };
            events += r.events.len();
        }
        anyhow::Ok(events)
    });
    let mut kv = KvClient::new(channel.clone());
    let usage_before = Usage::now(router_pid, etcd_pids);
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / args.paced_rate);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    for i in 0..ops {
        ticker.tick().await;
        let key = Bytes::from(format!("{prefix}pod-{i:06}"));
        if !kv
            .txn(shapes::create(&key, value))
            .await?
            .into_inner()
            .succeeded
        {
            bail!("{name}: paced create of {key:?} failed");
        }
    }
    let events = tokio::time::timeout(Duration::from_secs(30), seen)
        .await
        .with_context(|| {
            format!("{name}: paced writes' watch events not all seen within 30 s")
        })???;
    if events < ops {
        bail!("{name}: paced watch closed after {events} of {ops} events");
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(req_tx);
    let (router, etcd) = Usage::now(router_pid, etcd_pids).since(&usage_before, ops as f64);
    eprintln!(
        "  paced: {ops} watched creates at {:.0}/s: per write, router {}, etcd {:.0} µs CPU and {:.1} context switches",
        ops as f64 / elapsed,
        router
            .map(|r| format!("{:.0} µs CPU and {:.1} context switches", r.cpu_us, r.switches))
            .unwrap_or_else(|| "–".into()),
        etcd.cpu_us,
        etcd.switches
    );
    Ok((router, etcd))
}

fn print_report(results: &[ArmResult], args: &Args) {
    let base = &results[0];
    println!();
    println!(
        "Router benchmark: {} keys of {} B, {} sequential ops, {} clients at saturation, {} watched writes",
        args.keys, args.value_size, args.latency_ops, args.concurrency, args.watch_ops
    );
    println!("Machine: {}", IdlePolicy::read());
    println!();
    println!("| arm | get p50/p99 µs | create p50/p99 µs | update p50/p99 µs | List {} keys (limit 500) ms | watch p50/p99 µs | writes/s saturated | × etcd | router CPU µs/write | etcd CPU µs/write | Txn in router / shard Txn, mean µs |", args.keys);
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let split = match (r.router_txn_mean_us, r.shard_txn_mean_us) {
            (Some(router), Some(shard)) => format!("{router:.0} / {shard:.0}"),
            _ => "–".into(),
        };
        println!(
            "| {} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {:.1} | {:.0} / {:.0} | {:.0} | {:.2} | {} | {:.0} | {split} |",
            r.arm, r.get_p50_us, r.get_p99_us, r.create_p50_us, r.create_p99_us, r.update_p50_us, r.update_p99_us, r.list_all_ms,
            r.watch_p50_us, r.watch_p99_us, r.saturated_writes_per_s,
            r.saturated_writes_per_s / base.saturated_writes_per_s,
            r.router_cpu_us_per_write.map(|c| format!("{c:.0}")).unwrap_or_else(|| "–".into()),
            r.etcd_cpu_us_per_write,
        );
    }
    if args.paced_ops > 0 {
        print_paced(results, args);
    }
    println!();
    for r in results.iter().filter(|r| r.shards > 0) {
        // A router arm against the plain etcd reached the same way (TCP or Unix).
        let client_on_unix = r.transport.split(' ').next() == Some("unix");
        let etcd = results
            .iter()
            .find(|e| e.shards == 0 && (e.transport == "unix") == client_on_unix)
            .unwrap_or(base);
        println!(
            "{} vs {}, p50: get {:+.0} µs ({:.2}×), create {:+.0} µs, update {:+.0} µs, watch p99 {:.0} µs",
            r.arm,
            etcd.arm,
            r.get_p50_us - etcd.get_p50_us,
            r.get_p50_us / etcd.get_p50_us,
            r.create_p50_us - etcd.create_p50_us,
            r.update_p50_us - etcd.update_p50_us,
            r.watch_p99_us,
        );
    }
}

/// The paced phase: CPU per write at a churn-like rate, the pod store's whole
/// cost (router and shards) against plain etcd's.
fn print_paced(results: &[ArmResult], args: &Args) {
    println!();
    println!(
        "Paced: {} creates at {}/s, one at a time, each watched. CPU µs per write:",
        args.paced_ops, args.paced_rate
    );
    println!();
    println!("| arm | router | etcd (the shards) | pod store in all | × plain etcd | context switches per write: router / etcd |");
    println!("|---|---|---|---|---|---|");
    let base = results[0].paced_etcd_cpu_us_per_write;
    for r in results {
        let Some(etcd) = r.paced_etcd_cpu_us_per_write else {
            continue;
        };
        let total = etcd + r.paced_router_cpu_us_per_write.unwrap_or(0.0);
        let router_switches = r
            .paced_router_switches_per_write
            .map(|s| format!("{s:.1}"))
            .unwrap_or_else(|| "–".into());
        println!(
            "| {} | {} | {etcd:.0} | {total:.0} | {} | {router_switches} / {:.1} |",
            r.arm,
            r.paced_router_cpu_us_per_write
                .map(|c| format!("{c:.0}"))
                .unwrap_or_else(|| "–".into()),
            base.map(|b| format!("{:.2}", total / b))
                .unwrap_or_else(|| "–".into()),
            r.paced_etcd_switches_per_write.unwrap_or(f64::NAN),
        );
    }
}
