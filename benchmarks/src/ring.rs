//! `ste-bench ring`: the router's live ring under load. For each key count,
//! real RAM etcd shards and an in-process router are loaded with pod-sized
//! keys; then an open-loop client (kube-shaped compare-and-swap updates and
//! Gets at a fixed rate) runs through three phases: a baseline, a shard
//! joining (keys move to it), and a shard draining (its keys move off until
//! it leaves the ring). Each phase reports how long it took, the keys moved
//! and the client's latency; the p99 during a move is compared with the
//! baseline's. A plain etcd then times the three shard Txns one move chunk
//! is made of, to say which hop holds the time.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use ste_etcd_proto::pb::{
    kv_client::KvClient, request_op::Request, response_op::Response, DeleteRangeRequest,
    RangeRequest, RequestOp, TxnRequest,
};
use ste_testkit::{shapes, shard_specs, Etcd, Router};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::measure::prometheus::{labeled, metric, scrape};
use crate::progress::Progress;
use crate::stats::Samples;

/// Keys one move chunk carries (the router's MOVE_CHUNK: etcd's default
/// limit of operations per Txn).
const MOVE_CHUNK: usize = 128;
/// A request slower than this counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the router's /metrics and /shards are read during a move.
const POLL: Duration = Duration::from_millis(100);

#[derive(clap::Args)]
pub struct RingArgs {
    /// Key counts to run, one fresh set of shards and router each.
    #[arg(
        long,
        env = "STE_BENCH_RING_KEYS",
        value_delimiter = ',',
        default_value = "10000,100000"
    )]
    keys: Vec<usize>,
    /// Value size in bytes (a small pod is 1–4 KiB).
    #[arg(long, env = "STE_BENCH_VALUE_BYTES", default_value_t = 2048)]
    value_bytes: usize,
    /// Shards the router starts with; one more joins, then one drains.
    #[arg(long, env = "STE_BENCH_RING_SHARDS", default_value_t = 3)]
    shards: usize,
    /// Open-loop client requests per second during every phase, half
    /// compare-and-swap updates (kube-apiserver's GuaranteedUpdate), half Gets.
    #[arg(long, env = "STE_BENCH_RING_RATE", default_value_t = 200)]
    rate: u32,
    /// Length of the baseline phase (no ring change).
    #[arg(long, env = "STE_BENCH_RING_BASELINE", default_value = "15s", value_parser = humantime::parse_duration)]
    baseline: Duration,
    /// Period of the router's membership control loop.
    #[arg(long, env = "STE_BENCH_RING_MEMBERSHIP_INTERVAL", default_value = "100ms", value_parser = humantime::parse_duration)]
    membership_interval: Duration,
    /// Concurrent creates while loading the keys.
    #[arg(long, env = "STE_BENCH_RING_LOAD_CONCURRENCY", default_value_t = 32)]
    load_concurrency: usize,
    /// Give up on a join or drain that has not finished after this long.
    #[arg(long, env = "STE_BENCH_RING_PHASE_TIMEOUT", default_value = "15m", value_parser = humantime::parse_duration)]
    phase_timeout: Duration,
    /// Chunk-sized Txn triples (read 128, put 128, delete 128) timed on a plain etcd.
    #[arg(long, env = "STE_BENCH_RING_CHUNK_SAMPLES", default_value_t = 50)]
    chunk_samples: usize,
    /// Where the etcd data directories go (a RAM disk, like the shards').
    #[arg(long, env = "STE_BENCH_DATA_DIR", default_value = "/dev/shm")]
    data_dir: PathBuf,
    /// JSON results file (none: only the table).
    #[arg(long, env = "STE_BENCH_RING_JSON")]
    json: Option<PathBuf>,
}

#[derive(Serialize, Clone)]
pub struct PhaseResult {
    pub phase: String,
    /// Baseline: the load's length. Join: from the request until no key is
    /// misplaced. Drain: from the request until the shard left `GET /shards`.
    pub duration_s: f64,
    /// From the request until the first key moved (control loop pick-up, scan of the joining shard).
    pub first_move_after_s: Option<f64>,
    pub keys_moved: u64,
    /// Keys moved per second of `duration_s`.
    pub keys_per_s: f64,
    /// Value megabytes (10^6) moved per second of `duration_s`.
    pub mb_per_s: f64,
    /// Milliseconds per chunk of 128 keys, from the first move to the end.
    pub ms_per_chunk: Option<f64>,
    pub requests: usize,
    pub updates: usize,
    pub gets: usize,
    /// Updates whose ModRevision compare failed (none expected: moves keep revisions).
    pub conflicts: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// p99 of this phase / p99 of the baseline.
    pub p99_vs_baseline: f64,
    /// Which hop holds the time, over the phase: the client's mean latency,
    /// the router's own mean for the same RPCs (its rpc_duration histogram),
    /// and the shards' mean per Txn and per Range (etcd's server-side gRPC
    /// histogram; includes the moves' Txns).
    pub hops: Hops,
}

#[derive(Serialize, Clone, Default)]
pub struct Hops {
    pub client_mean_ms: f64,
    pub router_txn_mean_ms: f64,
    pub router_range_mean_ms: f64,
    pub shard_txns: f64,
    pub shard_txn_mean_ms: f64,
    pub shard_ranges: f64,
    pub shard_range_mean_ms: f64,
}

/// Cumulative sums and counts of the histograms `Hops` is made of.
#[derive(Clone, Copy, Default)]
struct HopCounters {
    router_txn: (f64, f64),
    router_range: (f64, f64),
    shard_txn: (f64, f64),
    shard_range: (f64, f64),
}

impl HopCounters {
    async fn read(
        http: &reqwest::Client,
        admin: &str,
        shards: &[&Etcd],
    ) -> anyhow::Result<HopCounters> {
        let text = scrape(http, admin).await?;
        let router = |method: &str| {
            let labels = format!("{{method=\"{method}\"}}");
            (
                labeled(&text, "ste_router_rpc_duration_seconds_sum", &labels),
                labeled(&text, "ste_router_rpc_duration_seconds_count", &labels),
            )
        };
        let mut counters = HopCounters {
            router_txn: router("Txn"),
            router_range: router("Range"),
            ..Default::default()
        };
        for shard in shards {
            let text = http
                .get(format!("{}/metrics", shard.endpoint()))
                .send()
                .await?
                .error_for_status()?
                .text()
                .await?;
            for (method, total) in [
                ("Txn", &mut counters.shard_txn),
                ("Range", &mut counters.shard_range),
            ] {
                let labels = format!("grpc_method=\"{method}\"");
                total.0 += labeled(&text, "grpc_server_handling_seconds_sum", &labels);
                total.1 += labeled(&text, "grpc_server_handling_seconds_count", &labels);
            }
        }
        Ok(counters)
    }

    fn since(&self, before: &HopCounters, client: &LoadOutcome) -> Hops {
        let mean = |now: (f64, f64), then: (f64, f64)| (now.0 - then.0) * 1000.0 / (now.1 - then.1);
        Hops {
            client_mean_ms: client.latency_sum.as_secs_f64() * 1000.0 / client.latency.len() as f64,
            router_txn_mean_ms: mean(self.router_txn, before.router_txn),
            router_range_mean_ms: mean(self.router_range, before.router_range),
            shard_txns: self.shard_txn.1 - before.shard_txn.1,
            shard_txn_mean_ms: mean(self.shard_txn, before.shard_txn),
            shard_ranges: self.shard_range.1 - before.shard_range.1,
            shard_range_mean_ms: mean(self.shard_range, before.shard_range),
        }
    }
}

#[derive(Serialize, Clone)]
pub struct ChunkTxns {
    pub samples: usize,
    pub read_p50_ms: f64,
    pub read_p99_ms: f64,
    pub put_p50_ms: f64,
    pub put_p99_ms: f64,
    pub delete_p50_ms: f64,
    pub delete_p99_ms: f64,
    /// read + put + delete at p50: what one move chunk costs at the shards.
    pub sum_p50_ms: f64,
}

#[derive(Serialize, Clone)]
pub struct RunResult {
    pub keys: usize,
    pub value_bytes: usize,
    pub shards: usize,
    pub rate: u32,
    pub load_s: f64,
    pub load_keys_per_s: f64,
    /// p50 of `GET /shards` after loading (one pass over the router's index).
    pub shards_api_ms: f64,
    pub phases: Vec<PhaseResult>,
    /// The same Txns on a plain RAM etcd, no router, no client load.
    pub chunk_txns: ChunkTxns,
}

pub async fn run(args: RingArgs) -> anyhow::Result<Vec<RunResult>> {
    if args.keys.is_empty() || args.keys.contains(&0) {
        bail!("--keys must list positive key counts, e.g. --keys 10000,100000");
    }
    if args.shards == 0 {
        bail!("--shards must be at least 1 (one joins and one drains on top)");
    }
    if args.rate == 0 {
        bail!("--rate must be positive (requests per second)");
    }
    if args.value_bytes < 64 {
        bail!("--value-bytes must be at least 64");
    }
    if args.load_concurrency == 0 {
        bail!("--load-concurrency must be positive");
    }
    if !args.data_dir.is_dir() {
        bail!("--data-dir {} is not a directory", args.data_dir.display());
    }
    eprintln!(
        "timing chunk-sized Txns on a plain etcd ({} samples)",
        args.chunk_samples
    );
    let chunk_txns = chunk_txns(&args).await?;
    let mut results = Vec::new();
    for &keys in &args.keys {
        let mut result = run_one(&args, keys).await?;
        result.chunk_txns = chunk_txns.clone();
        print_table(&result);
        results.push(result);
    }
    if let Some(path) = &args.json {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
        let dir = path.parent().unwrap_or(Path::new("."));
        crate::plots::write_suite(
            crate::plots::Suite::Ring,
            "ring",
            serde_json::to_value(&results)?,
            dir,
        )?;
    }
    Ok(results)
}

async fn start_etcd(name: &str, data_dir: &Path) -> anyhow::Result<Etcd> {
    Etcd::start_in(
        name,
        data_dir,
        &[
            "--unsafe-no-fsync",
            "--quota-backend-bytes",
            "8589934592",
            "--metrics",
            "extensive",
        ],
    )
    .await
    .with_context(|| format!("starting etcd {name} (build upstream with hack/build-upstream.sh)"))
}

fn key(i: usize) -> Bytes {
    Bytes::from(format!("/registry/pods/ns-{:03}/pod-{i:07}", i % 100))
}

/// A pod-sized value that names its key and version.
fn value(i: usize, version: u64, size: usize) -> Bytes {
    let mut v =
        format!("{{\"kind\":\"Pod\",\"name\":\"pod-{i:07}\",\"version\":{version},\"pad\":\"")
            .into_bytes();
    v.resize(size.saturating_sub(2), b'x');
    v.extend_from_slice(b"\"}");
    Bytes::from(v)
}

/// The client's view of the keys: each key's mod revision, as an informer
/// cache would hold it.
struct KeyTable {
    revisions: Vec<AtomicI64>,
}

async fn run_one(args: &RingArgs, n: usize) -> anyhow::Result<RunResult> {
    eprintln!(
        "== {n} keys of {} bytes over {} shards",
        args.value_bytes, args.shards
    );
    let mut shards = Vec::new();
    for s in 0..args.shards {
        shards.push(start_etcd(&format!("shard-{s}"), &args.data_dir).await?);
    }
    let joining = start_etcd(&format!("shard-{}", args.shards), &args.data_dir).await?;
    let mut config = Router::test_config(shard_specs(&shards));
    config.membership.interval = args.membership_interval;
    let router = Router::start_with(config)
        .await
        .context("starting the router")?;
    let kv = KvClient::new(router.channel().await?);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let admin = format!("http://{}", router.admin_addr);

    let table = Arc::new(KeyTable {
        revisions: (0..n).map(|_| AtomicI64::new(0)).collect(),
    });
    let (load_s, load_keys_per_s) = load_keys(kv.clone(), &table, n, args).await?;

    // What one pass over the index costs: GET /shards counts keys per
    // shard the way every membership step does.
    let mut shards_api = Samples::default();
    for _ in 0..5 {
        let started = Instant::now();
        member_keys(&http, &admin, &shards[0].name).await?;
        shards_api.push(started.elapsed());
    }
    let shards_api_ms = shards_api.percentile(50.0) / 1000.0;
    eprintln!("GET /shards (counts keys per shard): p50 {shards_api_ms:.1} ms at {n} keys");

    let mut phases = Vec::new();

    eprintln!("baseline: {} req/s for {:?}", args.rate, args.baseline);
    let all: Vec<&Etcd> = shards.iter().chain([&joining]).collect();
    let before = HopCounters::read(&http, &admin, &all).await?;
    let started = Instant::now();
    let load = Load::start(kv.clone(), table.clone(), args.rate, args.value_bytes);
    tokio::time::sleep(args.baseline).await;
    let outcome = load.finish().await;
    let duration = started.elapsed();
    let hops = HopCounters::read(&http, &admin, &all)
        .await?
        .since(&before, &outcome);
    let baseline = phase_result(
        "baseline",
        duration,
        None,
        0,
        None,
        outcome,
        hops,
        args.value_bytes,
        f64::NAN,
    );
    let baseline_p99 = baseline.p99_ms;
    phases.push(PhaseResult {
        p99_vs_baseline: 1.0,
        ..baseline
    });

    // Join: the new shard takes its share of the ring and keys move to it.
    let new_name = joining.name.clone();
    eprintln!("join: {new_name} at {}", joining.endpoint());
    let moved_before = metric(&scrape(&http, &admin).await?, "ste_router_keys_moved_total")?;
    let before = HopCounters::read(&http, &admin, &all).await?;
    let load = Load::start(kv.clone(), table.clone(), args.rate, args.value_bytes);
    let started = Instant::now();
    let answer = http
        .post(format!("{admin}/shards"))
        .json(&serde_json::json!({ "name": new_name, "endpoint": joining.endpoint() }))
        .send()
        .await?;
    if !answer.status().is_success() {
        bail!(
            "POST /shards answered {}: {}",
            answer.status(),
            answer.text().await.unwrap_or_default()
        );
    }
    let mut first_move = None;
    let mut progress = Progress::new(format!("join of {new_name}: keys moved"), 0);
    loop {
        let text = scrape(&http, &admin).await?;
        let moved = metric(&text, "ste_router_keys_moved_total")? - moved_before;
        let to_move = metric(&text, "ste_router_keys_to_move")?;
        if moved > 0.0 && first_move.is_none() {
            first_move = Some(started.elapsed());
        }
        if moved > 0.0
            && to_move == 0.0
            && member_keys(&http, &admin, &new_name)
                .await?
                .is_some_and(|k| k > 0)
        {
            progress.set_total(moved as u64);
            progress.finish(moved as u64, "joined");
            break;
        }
        progress.set_total((moved + to_move) as u64);
        progress.update(moved as u64, &format!("{to_move} still to move"));
        if started.elapsed() > args.phase_timeout {
            bail!(
                "the join did not finish within {:?} ({moved} keys moved)",
                args.phase_timeout
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let duration = started.elapsed();
    let moved = (metric(&scrape(&http, &admin).await?, "ste_router_keys_moved_total")?
        - moved_before) as u64;
    let outcome = load.finish().await;
    let hops = HopCounters::read(&http, &admin, &all)
        .await?
        .since(&before, &outcome);
    let on_new = member_keys(&http, &admin, &new_name).await?.unwrap_or(0);
    eprintln!(
        "  joined in {:.2}s: {moved} keys moved, {on_new} on {new_name}",
        duration.as_secs_f64()
    );
    phases.push(phase_result(
        "join",
        duration,
        first_move,
        moved,
        first_move.map(|f| duration - f),
        outcome,
        hops,
        args.value_bytes,
        baseline_p99,
    ));

    // Drain: the first shard leaves; its keys move to the others.
    let drained = shards[0].name.clone();
    let keys_on_drained = member_keys(&http, &admin, &drained).await?.unwrap_or(0);
    eprintln!("drain: {drained} ({keys_on_drained} keys)");
    let moved_before = metric(&scrape(&http, &admin).await?, "ste_router_keys_moved_total")?;
    let before = HopCounters::read(&http, &admin, &all).await?;
    let load = Load::start(kv.clone(), table.clone(), args.rate, args.value_bytes);
    let started = Instant::now();
    let answer = http
        .post(format!("{admin}/shards/{drained}/drain"))
        .send()
        .await?;
    if !answer.status().is_success() {
        bail!(
            "POST /shards/{drained}/drain answered {}: {}",
            answer.status(),
            answer.text().await.unwrap_or_default()
        );
    }
    let mut first_move = None;
    let mut last_moved_at = None;
    let mut progress = Progress::new(
        format!("drain of {drained}: keys moved"),
        keys_on_drained as u64,
    );
    let mut last_moved = 0.0;
    loop {
        let text = scrape(&http, &admin).await?;
        let moved = metric(&text, "ste_router_keys_moved_total")? - moved_before;
        let to_move = metric(&text, "ste_router_keys_to_move")?;
        if moved > 0.0 && first_move.is_none() {
            first_move = Some(started.elapsed());
        }
        if moved > last_moved {
            last_moved = moved;
            last_moved_at = Some(started.elapsed());
        }
        // GET /shards also counts every key: read it only once nothing is left to move.
        if moved > 0.0 && to_move == 0.0 && member_keys(&http, &admin, &drained).await?.is_none() {
            progress.set_total(moved as u64);
            progress.finish(moved as u64, "drained");
            break;
        }
        progress.set_total((moved + to_move) as u64);
        progress.update(moved as u64, &format!("{to_move} still to move"));
        if started.elapsed() > args.phase_timeout {
            bail!(
                "the drain did not finish within {:?} ({moved} keys moved)",
                args.phase_timeout
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let duration = started.elapsed();
    let moved = (metric(&scrape(&http, &admin).await?, "ste_router_keys_moved_total")?
        - moved_before) as u64;
    let outcome = load.finish().await;
    let hops = HopCounters::read(&http, &admin, &all)
        .await?
        .since(&before, &outcome);
    eprintln!(
        "  drained in {:.2}s: {moved} keys moved (last move at {:.2}s)",
        duration.as_secs_f64(),
        last_moved_at.unwrap_or_default().as_secs_f64()
    );
    let moving = match (first_move, last_moved_at) {
        (Some(first), Some(last)) if last > first => Some(last - first),
        _ => None,
    };
    phases.push(phase_result(
        "drain",
        duration,
        first_move,
        moved,
        moving,
        outcome,
        hops,
        args.value_bytes,
        baseline_p99,
    ));

    drop(all);
    router.stop().await.context("stopping the router")?;
    drop((shards, joining));
    Ok(RunResult {
        keys: n,
        value_bytes: args.value_bytes,
        shards: args.shards,
        rate: args.rate,
        load_s,
        load_keys_per_s,
        shards_api_ms,
        phases,
        chunk_txns: ChunkTxns {
            samples: 0,
            read_p50_ms: f64::NAN,
            read_p99_ms: f64::NAN,
            put_p50_ms: f64::NAN,
            put_p99_ms: f64::NAN,
            delete_p50_ms: f64::NAN,
            delete_p99_ms: f64::NAN,
            sum_p50_ms: f64::NAN,
        },
    })
}

#[allow(clippy::too_many_arguments)]
fn phase_result(
    phase: &str,
    duration: Duration,
    first_move: Option<Duration>,
    moved: u64,
    moving: Option<Duration>,
    outcome: LoadOutcome,
    hops: Hops,
    value_bytes: usize,
    baseline_p99_ms: f64,
) -> PhaseResult {
    let secs = duration.as_secs_f64();
    let chunks = moved.div_ceil(MOVE_CHUNK as u64);
    let p99_ms = outcome.latency.percentile(99.0) / 1000.0;
    PhaseResult {
        phase: phase.to_string(),
        duration_s: secs,
        first_move_after_s: first_move.map(|d| d.as_secs_f64()),
        keys_moved: moved,
        keys_per_s: moved as f64 / secs,
        mb_per_s: moved as f64 * value_bytes as f64 / 1e6 / secs,
        ms_per_chunk: moving
            .filter(|_| chunks > 0)
            .map(|d| d.as_secs_f64() * 1000.0 / chunks as f64),
        requests: outcome.latency.len(),
        updates: outcome.updates,
        gets: outcome.gets,
        conflicts: outcome.conflicts,
        errors: outcome.errors,
        first_error: outcome.first_error,
        p50_ms: outcome.latency.percentile(50.0) / 1000.0,
        p99_ms,
        p999_ms: outcome.latency.percentile(99.9) / 1000.0,
        max_ms: outcome.latency.percentile(100.0) / 1000.0,
        p99_vs_baseline: p99_ms / baseline_p99_ms,
        hops,
    }
}

/// Creates the keys through the router, `load_concurrency` at a time.
async fn load_keys(
    kv: KvClient<Channel>,
    table: &Arc<KeyTable>,
    n: usize,
    args: &RingArgs,
) -> anyhow::Result<(f64, f64)> {
    eprintln!(
        "loading {n} keys ({:.0} MB of values), {} at a time",
        (n * args.value_bytes) as f64 / 1e6,
        args.load_concurrency
    );
    let started = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let progress = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut progress = Progress::new("loading keys", n as u64);
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let d = done.load(Ordering::Relaxed) as u64;
                progress.update(d, "created");
            }
        })
    };
    let value_bytes = args.value_bytes;
    let mut creates = futures::stream::iter(0..n)
        .map(|i| {
            let mut kv = kv.clone();
            let (table, done) = (table.clone(), done.clone());
            async move {
                let answer = kv
                    .txn(shapes::create(&key(i), &value(i, 0, value_bytes)))
                    .await
                    .with_context(|| format!("creating key {i}"))?
                    .into_inner();
                if !answer.succeeded {
                    bail!("key {i} already existed");
                }
                let revision = answer.header.map(|h| h.revision).unwrap_or(0);
                table.revisions[i].store(revision, Ordering::Relaxed);
                done.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        })
        .buffer_unordered(args.load_concurrency);
    let mut result = Ok(());
    while let Some(created) = creates.next().await {
        if let Err(err) = created {
            result = Err(err);
            break;
        }
    }
    progress.abort();
    result?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!("  loaded in {secs:.1}s ({:.0} keys/s)", n as f64 / secs);
    Ok((secs, n as f64 / secs))
}

#[derive(Default)]
struct LoadOutcome {
    /// From each request's scheduled start (open loop: a late send counts) to its answer.
    latency: Samples,
    latency_sum: Duration,
    updates: usize,
    gets: usize,
    conflicts: usize,
    errors: usize,
    first_error: Option<String>,
}

enum Answer {
    Updated,
    Conflict,
    Got,
    Failed(String),
}

/// An open-loop client: requests are sent on a fixed schedule whether or
/// not earlier ones have answered.
struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<LoadOutcome>,
}

impl Load {
    fn start(kv: KvClient<Channel>, table: Arc<KeyTable>, rate: u32, value_bytes: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(Self::generate(kv, table, rate, value_bytes, stop.clone()));
        Load { stop, task }
    }

    async fn generate(
        kv: KvClient<Channel>,
        table: Arc<KeyTable>,
        rate: u32,
        value_bytes: usize,
        stop: Arc<AtomicBool>,
    ) -> LoadOutcome {
        let period = Duration::from_secs_f64(1.0 / rate as f64);
        let (tx, mut rx) = mpsc::unbounded_channel::<(Duration, Answer)>();
        let start = tokio::time::Instant::now();
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ start.elapsed().as_nanos() as u64 | 1);
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let scheduled = start + period * sent as u32;
            tokio::time::sleep_until(scheduled).await;
            let i = (rng.next() % table.revisions.len() as u64) as usize;
            let is_update = sent.is_multiple_of(2);
            sent += 1;
            let (mut kv, table, tx) = (kv.clone(), table.clone(), tx.clone());
            let version = sent;
            tokio::spawn(async move {
                let k = key(i);
                let answer = if is_update {
                    let revision = table.revisions[i].load(Ordering::Relaxed);
                    let request = shapes::update(&k, revision, &value(i, version, value_bytes));
                    match tokio::time::timeout(REQUEST_TIMEOUT, kv.txn(request)).await {
                        Err(_) => Answer::Failed(format!("update of {i} timed out")),
                        Ok(Err(status)) => Answer::Failed(format!("update of {i}: {status}")),
                        Ok(Ok(answer)) => {
                            let answer = answer.into_inner();
                            if answer.succeeded {
                                let new = answer.header.map(|h| h.revision).unwrap_or(0);
                                table.revisions[i].fetch_max(new, Ordering::Relaxed);
                                Answer::Updated
                            } else {
                                // Like kube-apiserver: the failure branch reads the current revision.
                                let current =
                                    answer.responses.into_iter().find_map(|r| match r.response {
                                        Some(Response::ResponseRange(range)) => {
                                            range.kvs.into_iter().next()
                                        }
                                        _ => None,
                                    });
                                match current {
                                    Some(kv) => {
                                        table.revisions[i]
                                            .fetch_max(kv.mod_revision, Ordering::Relaxed);
                                        Answer::Conflict
                                    }
                                    None => {
                                        Answer::Failed(format!("update of {i}: the key is gone"))
                                    }
                                }
                            }
                        }
                    }
                } else {
                    let request = RangeRequest {
                        key: k,
                        ..Default::default()
                    };
                    match tokio::time::timeout(REQUEST_TIMEOUT, kv.range(request)).await {
                        Err(_) => Answer::Failed(format!("get of {i} timed out")),
                        Ok(Err(status)) => Answer::Failed(format!("get of {i}: {status}")),
                        Ok(Ok(answer)) if answer.get_ref().kvs.len() == 1 => Answer::Got,
                        Ok(Ok(_)) => Answer::Failed(format!("get of {i}: the key is missing")),
                    }
                };
                let _ = tx.send((scheduled.elapsed(), answer));
            });
        }
        drop(tx);
        let mut outcome = LoadOutcome::default();
        while let Some((latency, answer)) = rx.recv().await {
            outcome.latency.push(latency);
            outcome.latency_sum += latency;
            match answer {
                Answer::Updated => outcome.updates += 1,
                Answer::Conflict => {
                    outcome.updates += 1;
                    outcome.conflicts += 1;
                }
                Answer::Got => outcome.gets += 1,
                Answer::Failed(why) => {
                    outcome.errors += 1;
                    outcome.first_error.get_or_insert(why);
                }
            }
        }
        outcome
    }

    /// Stops sending and waits for every request in flight.
    async fn finish(self) -> LoadOutcome {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The key count `GET /shards` gives for a member (None: not a member).
async fn member_keys(
    http: &reqwest::Client,
    admin: &str,
    name: &str,
) -> anyhow::Result<Option<u64>> {
    let members: serde_json::Value = http
        .get(format!("{admin}/shards"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let shards = members["shards"]
        .as_array()
        .context("GET /shards has no \"shards\" list")?;
    Ok(shards
        .iter()
        .find(|s| s["name"] == name)
        .map(|s| s["keys"].as_u64().unwrap_or(0)))
}

/// The three shard Txns of one move chunk, on a plain RAM etcd with no
/// router and no other load: read 128 keys, put 128 fenced on absence,
/// delete 128 fenced on their revision.
async fn chunk_txns(args: &RingArgs) -> anyhow::Result<ChunkTxns> {
    let etcd = start_etcd("chunk", &args.data_dir).await?;
    let mut kv = etcd.kv().await?;
    let (mut read, mut put, mut delete) =
        (Samples::default(), Samples::default(), Samples::default());
    for s in 0..args.chunk_samples.max(1) {
        let keys: Vec<Bytes> = (0..MOVE_CHUNK).map(|j| key(s * MOVE_CHUNK + j)).collect();
        let started = Instant::now();
        let answer = kv
            .txn(TxnRequest {
                compare: keys.iter().map(|k| shapes::mod_revision_is(k, 0)).collect(),
                success: keys
                    .iter()
                    .enumerate()
                    .map(|(j, k)| shapes::put(k, &value(j, 0, args.value_bytes)))
                    .collect(),
                failure: Vec::new(),
            })
            .await?
            .into_inner();
        put.push(started.elapsed());
        if !answer.succeeded {
            bail!("chunk put on the plain etcd failed its compare");
        }
        let revision = answer.header.map(|h| h.revision).unwrap_or(0);
        let started = Instant::now();
        kv.txn(TxnRequest {
            success: keys.iter().map(shapes::get).collect(),
            ..Default::default()
        })
        .await?;
        read.push(started.elapsed());
        let started = Instant::now();
        let answer = kv
            .txn(TxnRequest {
                compare: keys
                    .iter()
                    .map(|k| shapes::mod_revision_is(k, revision))
                    .collect(),
                success: keys
                    .iter()
                    .map(|k| RequestOp {
                        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                            key: k.clone(),
                            ..Default::default()
                        })),
                    })
                    .collect(),
                failure: Vec::new(),
            })
            .await?
            .into_inner();
        delete.push(started.elapsed());
        if !answer.succeeded {
            bail!("chunk delete on the plain etcd failed its compare");
        }
    }
    let ms = |s: &Samples, p: f64| s.percentile(p) / 1000.0;
    Ok(ChunkTxns {
        samples: read.len(),
        read_p50_ms: ms(&read, 50.0),
        read_p99_ms: ms(&read, 99.0),
        put_p50_ms: ms(&put, 50.0),
        put_p99_ms: ms(&put, 99.0),
        delete_p50_ms: ms(&delete, 50.0),
        delete_p99_ms: ms(&delete, 99.0),
        sum_p50_ms: ms(&read, 50.0) + ms(&put, 50.0) + ms(&delete, 50.0),
    })
}

fn print_table(r: &RunResult) {
    println!(
        "\n{} keys × {} B over {} shards (+1 joins, then shard-0 drains); client {} req/s; loaded in {:.1}s ({:.0} keys/s); GET /shards p50 {:.1} ms",
        r.keys, r.value_bytes, r.shards, r.rate, r.load_s, r.load_keys_per_s, r.shards_api_ms
    );
    println!(
        "| phase | s | first move s | keys moved | keys/s | MB/s | ms/chunk | requests | conflicts | errors | p50 ms | p99 ms | p99.9 ms | max ms | p99 × baseline |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for p in &r.phases {
        println!(
            "| {} | {:.2} | {} | {} | {:.0} | {:.2} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            p.phase,
            p.duration_s,
            p.first_move_after_s.map(|s| format!("{s:.2}")).unwrap_or_else(|| "–".into()),
            p.keys_moved,
            p.keys_per_s,
            p.mb_per_s,
            p.ms_per_chunk.map(|s| format!("{s:.1}")).unwrap_or_else(|| "–".into()),
            p.requests,
            p.conflicts,
            p.errors,
            p.p50_ms,
            p.p99_ms,
            p.p999_ms,
            p.max_ms,
            p.p99_vs_baseline
        );
        if let Some(err) = &p.first_error {
            println!("  first error in {}: {err}", p.phase);
        }
    }
    println!("| phase | client mean ms | router Txn mean ms | router Range mean ms | shard Txns | shard Txn mean ms | shard Ranges | shard Range mean ms |");
    println!("|---|---|---|---|---|---|---|---|");
    for p in &r.phases {
        let h = &p.hops;
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} |",
            p.phase,
            h.client_mean_ms,
            h.router_txn_mean_ms,
            h.router_range_mean_ms,
            h.shard_txns,
            h.shard_txn_mean_ms,
            h.shard_ranges,
            h.shard_range_mean_ms
        );
    }
    let c = &r.chunk_txns;
    println!(
        "one chunk's shard Txns on a plain RAM etcd ({} samples): read 128 p50 {:.2} ms (p99 {:.2}), put 128 p50 {:.2} ms (p99 {:.2}), delete 128 p50 {:.2} ms (p99 {:.2}); sum p50 {:.2} ms",
        c.samples, c.read_p50_ms, c.read_p99_ms, c.put_p50_ms, c.put_p99_ms, c.delete_p50_ms, c.delete_p99_ms, c.sum_p50_ms
    );
}
