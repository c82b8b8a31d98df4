//! `ste-bench coldstart`: Knative revisions woken from zero at once, with
//! and without ste-activator-bridge, on the stock and STE arms, in one run.
//!
//! Also the launcher the activator-bridge tests use: Knative Serving's own
//! controller and autoscaler (built by hack/build-upstream.sh from the
//! release pinned in hack/knative/go.mod), its CRDs and config maps
//! (vendored in hack/knative/), against the local control plane.
//!
//! Knative's webhook and activator do not run (docs/activator-bridge.md
//! says why): Services are created fully defaulted, and revisions are woken
//! as the activator wakes them, by request stats to the autoscaler
//! (`--wake stats`, crate::knative), or by the exact JSON patch the
//! autoscaler's KPA scaler sends to the revision's Deployment (`--wake patch`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;

use crate::api::{client_for, current_resource_version};
use crate::cluster::{self, Arm, ClusterRecord};
pub use crate::knative::objects::{
    create_service, deployment_of, keep_node_leases, revision_of, scale_revision, service,
    wait_at_zero, REVISION_LABEL,
};
pub use crate::knative::processes::{metric_sum, BridgeProcess, Knative};
use crate::measure::watch_pods_started;
use crate::progress::Progress;

/// How long a round waits for its pod watch to open before waking anything.
const WATCH_OPEN_WITHIN: Duration = Duration::from_secs(10);
use crate::stats::Samples;

pub mod spread;
pub mod sweep;

pub const BRIDGE_ANNOTATION: &str = "ste.dev/activator-bridge";

// ---------------------------------------------------------------- benchmark

#[derive(clap::Args, Clone, Debug)]
pub struct ColdstartArgs {
    /// Storage arms to run, one after the other.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        env = "STE_COLDSTART_ARMS",
        default_value = "stock,ste"
    )]
    pub arms: Vec<Arm>,
    /// How many revisions to wake at once, one round per value.
    #[arg(
        long,
        value_delimiter = ',',
        env = "STE_COLDSTART_REVISIONS",
        default_value = "1,5,25,100"
    )]
    pub revisions: Vec<usize>,
    /// Fake (kwok) nodes.
    #[arg(long, env = "STE_COLDSTART_NODES", default_value_t = 20)]
    pub nodes: usize,
    /// RAM etcd shards (ste arm).
    #[arg(long, env = "STE_COLDSTART_SHARDS", default_value_t = 3)]
    pub shards: usize,
    /// kube-controller-manager/kube-scheduler client QPS (unset: Kubernetes' defaults).
    #[arg(long, env = "STE_COLDSTART_CLIENT_QPS")]
    pub client_qps: Option<u32>,
    /// Delay added to every fsync/fdatasync of the durable etcd (e.g. 8ms).
    #[arg(long, env = "STE_COLDSTART_FSYNC_DELAY", value_parser = humantime::parse_duration)]
    pub fsync_delay: Option<Duration>,
    #[command(flatten)]
    pub topology: crate::arms::Topology,
    /// Bridge modes to run after each round without the bridge (default:
    /// act on the ReplicaSet's 0→N; aggressive: on the Deployment's 0→N;
    /// webhook: create nothing, bind pods at admission; aggressive+webhook:
    /// both, late duplicates gated; aggressive+webhook+burst: the same, pods
    /// created only when 10 revisions woke within the burst window).
    #[arg(
        long,
        value_delimiter = ',',
        env = "STE_COLDSTART_BRIDGE_MODES",
        default_value = "default,aggressive"
    )]
    pub bridge_modes: Vec<String>,
    /// The ste-activator-bridge binary (default: next to ste-bench).
    #[arg(long, env = "STE_ACTIVATOR_BRIDGE_BIN")]
    pub bridge_bin: Option<PathBuf>,
    /// Seconds to wait after a round for the bridge's race accounting (its --settle).
    #[arg(long, env = "STE_COLDSTART_SETTLE", default_value_t = 5)]
    pub settle: u64,
    /// How revisions are woken: stats (as Knative's activator, through the
    /// autoscaler; src/knative) or patch (the scale patch sent by the bench).
    #[arg(long, value_enum, env = "STE_COLDSTART_WAKE", default_value = "stats")]
    pub wake: crate::knative::Wake,
    /// Times every arm's rounds are repeated. Arms are interleaved: repeat
    /// r runs every arm once, each on a fresh cluster, in the order of
    /// `--arms` on even repeats and reversed on odd ones (one Knative
    /// autoscaler at a time on this machine: it binds :8080).
    #[arg(long, env = "STE_COLDSTART_REPEATS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub repeats: u64,
    /// Wake every revision once, unrecorded, on each fresh cluster before
    /// the measured rounds. A revision's first wake after it was created
    /// is slower at the autoscaler (≈ 110 ms more from the stat to the
    /// Deployment's patch in a 10-repeat run, on every arm), and without a
    /// warm-up that penalty fell on whichever round came first — always
    /// the round without the bridge.
    #[arg(long, env = "STE_COLDSTART_WARMUP", default_value_t = true, action = clap::ArgAction::Set)]
    pub warmup: bool,
    /// The open-loop cold-starts-per-second sweep (`--sweep 1,2,5,10`), run
    /// instead of the rounds when given.
    #[command(flatten)]
    pub sweep: sweep::SweepArgs,
    /// Output directory (clusters, logs, coldstart.json, coldstart.md).
    #[arg(
        long,
        env = "STE_COLDSTART_OUTPUT",
        default_value = "target/bench/coldstart"
    )]
    pub output: PathBuf,
}

#[derive(Serialize, Debug, Clone)]
pub struct RoundResult {
    pub arm: Arm,
    /// Which repeat (0-based) of `--repeats` this round belongs to.
    #[serde(default)]
    pub repeat: u64,
    /// "none", or the bridge's mode.
    pub bridge: String,
    pub revisions: usize,
    /// Milliseconds from the scale patch to the revision's first pod bound / Ready.
    pub bound_p50_ms: f64,
    pub bound_p95_ms: f64,
    pub bound_p99_ms: f64,
    pub ready_p50_ms: f64,
    pub ready_p95_ms: f64,
    pub ready_p99_ms: f64,
    /// Pods of the woken revisions that existed at some point in the round
    /// (more than `revisions` means duplicates were created and deleted).
    pub pods_seen: usize,
    /// Of those, the pods that ever had a node (`spec.nodeName`): the ones
    /// that reached a kubelet. More than `revisions` means a duplicate got
    /// to a node; a gated duplicate never does.
    pub pods_bound: usize,
    pub bridge_pods_created: f64,
    pub races_won: f64,
    pub races_lost: f64,
    pub duplicates_deleted: f64,
    pub rejections: f64,
    /// The ReplicaSet controller's late pods the webhook gated (never bound).
    #[serde(default)]
    pub duplicates_gated: f64,
    /// Gated pods the sweep found still wanted and released to the scheduler.
    #[serde(default)]
    pub gates_removed: f64,
    /// Deployments the bridge's stat tap scaled 0→1 (`tap+` modes).
    #[serde(default)]
    pub tap_scaled: f64,
    /// Of those, seen back at 0 within its revert window.
    #[serde(default)]
    pub tap_reverts: f64,
    /// Per-hop times of a wake through the autoscaler (`--wake stats`).
    pub hops: Option<crate::knative::hops::WakeRound>,
    /// kube-apiserver's writes from the first wake to the end of the round
    /// (before the way back to zero), per component, ÷ the wakes.
    pub api_writes: Option<crate::audit::WritesPerWake>,
}

/// The bridge's own flags for one `--bridge-modes` entry. The webhook is
/// served on a free loopback port with a certificate the bridge makes at
/// start and registers itself (removed again when the bridge stops).
///
/// `tap+MODE`: MODE with the bridge's stat tap on a free loopback port,
/// forwarding to the autoscaler's stat server; the bench's activator then
/// sends its stats to the tap ([`tap_address`]).
fn bridge_flags(mode: &str) -> Result<Vec<String>, String> {
    if let Some(rest) = mode.strip_prefix("tap+") {
        let mut flags = bridge_flags(rest)?;
        flags.push(format!(
            "--stat-tap-listen=127.0.0.1:{}",
            ste_testkit::free_port()
        ));
        flags.push(format!(
            "--stat-tap-upstream=ws://{}/",
            crate::knative::stats::AUTOSCALER_STATS_ADDR
        ));
        return Ok(flags);
    }
    let webhook = [
        format!("--webhook-listen=127.0.0.1:{}", ste_testkit::free_port()),
        "--webhook-self-signed".to_string(),
        "--webhook-unregister-on-exit".to_string(),
        "--webhook-timeout=1s".to_string(),
    ];
    let (base, extra): (&str, &[String]) = match mode {
        "default" | "aggressive" => (mode, &[]),
        "webhook" => ("webhook", &webhook),
        "aggressive+webhook" => ("aggressive", &webhook),
        "aggressive+webhook+burst" => {
            let mut flags = vec!["--mode=aggressive".to_string(), "--burst-threshold=10".into()];
            flags.extend(webhook);
            return Ok(flags);
        }
        other => {
            return Err(format!(
                "{other:?} is not a bridge mode (default, aggressive, webhook, aggressive+webhook, aggressive+webhook+burst, each also as tap+MODE)"
            ))
        }
    };
    Ok([vec![format!("--mode={base}")], extra.to_vec()].concat())
}

/// Starts the bridge in one `--bridge-modes` mode, with the flags every
/// run gives it (lease namespace, `--settle`), and returns it with the
/// address of its stat tap when the mode has one: the rounds and the sweep
/// both start it here, so they cannot drift apart.
pub(crate) async fn start_bridge(
    bin: &Path,
    record: &ClusterRecord,
    log: &Path,
    mode: &str,
    settle: u64,
) -> anyhow::Result<(BridgeProcess, Option<String>)> {
    let mode_flags = bridge_flags(mode).map_err(anyhow::Error::msg)?;
    let tap = tap_address(&mode_flags);
    let flags = [
        vec![
            "--lease-namespace=default".to_string(),
            format!("--settle={}s", settle.max(1)),
        ],
        mode_flags,
    ]
    .concat();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let bridge = BridgeProcess::start(bin, record, log, &flags).await?;
    Ok((bridge, tap))
}

/// Where the bridge's stat tap listens, if its flags start one.
fn tap_address(flags: &[String]) -> Option<String> {
    flags
        .iter()
        .find_map(|f| f.strip_prefix("--stat-tap-listen="))
        .map(str::to_string)
}

#[cfg(test)]
mod bridge_modes {
    use super::{bridge_flags, tap_address};

    #[test]
    fn tap_modes_add_the_tap_in_front_of_the_autoscaler() {
        let flags = bridge_flags("tap+aggressive+webhook").unwrap();
        assert_eq!(flags[0], "--mode=aggressive");
        assert!(flags
            .iter()
            .any(|f| f == "--stat-tap-upstream=ws://127.0.0.1:8080/"));
        assert!(tap_address(&flags).unwrap().starts_with("127.0.0.1:"));
        assert_eq!(tap_address(&bridge_flags("webhook").unwrap()), None);
        assert!(bridge_flags("tap+fast").is_err());
    }

    #[test]
    fn every_mode_maps_to_the_bridge_flags_it_needs() {
        assert_eq!(bridge_flags("default").unwrap(), ["--mode=default"]);
        let webhook = bridge_flags("webhook").unwrap();
        assert_eq!(webhook[0], "--mode=webhook");
        assert!(webhook.iter().any(|f| f == "--webhook-self-signed"));
        let both = bridge_flags("aggressive+webhook").unwrap();
        assert_eq!(both[0], "--mode=aggressive");
        assert!(both
            .iter()
            .any(|f| f.starts_with("--webhook-listen=127.0.0.1:")));
        let burst = bridge_flags("aggressive+webhook+burst").unwrap();
        assert!(burst.iter().any(|f| f == "--burst-threshold=10"));
        assert!(bridge_flags("fast")
            .unwrap_err()
            .contains("not a bridge mode"));
    }
}

fn bridge_binary(args: &ColdstartArgs) -> anyhow::Result<PathBuf> {
    if let Some(b) = &args.bridge_bin {
        return Ok(b.clone());
    }
    let exe = std::env::current_exe()?;
    let candidate = exe.with_file_name("ste-activator-bridge");
    if candidate.exists() {
        return Ok(candidate);
    }
    bail!("ste-activator-bridge not found next to ste-bench: build it (cargo build --release -p ste-activator-bridge) or set STE_ACTIVATOR_BRIDGE_BIN")
}

#[derive(Default)]
struct Times {
    bound: HashMap<String, Instant>,
    ready: HashMap<String, Instant>,
    pods: std::collections::HashSet<String>,
    /// Pods seen with a node.
    bound_pods: std::collections::HashSet<String>,
}

fn ms(us: f64) -> f64 {
    (us / 1000.0 * 10.0).round() / 10.0
}

async fn round(
    args: &ColdstartArgs,
    record: &ClusterRecord,
    dir: &Path,
    services: &[String],
    bridge: Option<(&Path, &str)>,
    arm: Arm,
) -> anyhow::Result<RoundResult> {
    let client = client_for(record)?;
    let k = services.len();
    let label = match bridge {
        Some((_, mode)) => format!("with the bridge ({mode} mode)"),
        None => "without the bridge".to_string(),
    };
    eprintln!("  {arm:?}: waking {k} revision(s) {label}…");
    let mode = bridge.map_or("none", |(_, m)| m).to_string();
    let (bridge, tap) = match bridge {
        Some((bin, mode)) => {
            let log = dir.join("logs").join(format!("bridge-{k}-{mode}.log"));
            let (b, tap) = start_bridge(bin, record, &log, mode, args.settle).await?;
            (Some(b), tap)
        }
        None => (None, None),
    };
    // With the tap, the bench's activator sends its stats through the bridge.
    let stats_addr =
        tap.unwrap_or_else(|| crate::knative::stats::AUTOSCALER_STATS_ADDR.to_string());
    let times = Arc::new(Mutex::new(Times::default()));
    let rv = current_resource_version(record).await?;
    let t = times.clone();
    let (watcher, started) = watch_pods_started(record, &rv, move |pod, now| {
        let Some(rev) = pod["metadata"]["labels"][REVISION_LABEL].as_str() else {
            return;
        };
        let mut t = t.lock().expect("times");
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        t.pods.insert(name.to_string());
        if pod["spec"]["nodeName"].is_string() {
            t.bound_pods.insert(name.to_string());
            t.bound.entry(rev.to_string()).or_insert(now);
        }
        let ready = pod["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        if ready {
            t.ready.entry(rev.to_string()).or_insert(now);
        }
    })?;
    // The watch is open (kube-apiserver answered it) before the first wake.
    match tokio::time::timeout(WATCH_OPEN_WITHIN, started).await {
        Ok(Ok(())) => {}
        _ => bail!("the pod watch did not open within {WATCH_OPEN_WITHIN:?}"),
    }
    let mut triggers = HashMap::new();
    let woken = match args.wake {
        crate::knative::Wake::Stats => Some(
            crate::knative::wake_through_autoscaler(
                record,
                services,
                &format!("{arm:?}, bridge {mode}"),
                &stats_addr,
            )
            .await?,
        ),
        crate::knative::Wake::Patch => None,
    };
    triggers.extend(woken.iter().flat_map(|w| w.sent()));
    let patches = services.iter().filter(|_| woken.is_none()).map(|s| {
        let client = client.clone();
        async move {
            let at = Instant::now();
            scale_revision(&client, s, 1)
                .await
                .map(|()| (revision_of(s), at))
        }
    });
    for result in futures::future::join_all(patches).await {
        let (rev, at) = result?;
        triggers.insert(rev, at);
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut progress = Progress::new(format!("{arm:?} {label}: revisions Ready"), k as u64);
    loop {
        let (bound, ready) = {
            let t = times.lock().expect("times");
            (t.bound.len(), t.ready.len())
        };
        let message = format!("bound {bound}");
        progress.update(ready as u64, &message);
        if ready >= k {
            progress.finish(ready as u64, &message);
            break;
        }
        if Instant::now() > deadline {
            progress.finish(ready as u64, &message);
            watcher.abort();
            bail!("{arm:?} {label}: only {ready}/{k} revisions Ready after 180s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut bound, mut ready) = (Samples::default(), Samples::default());
    {
        let t = times.lock().expect("times");
        for (rev, at) in &triggers {
            if let Some(b) = t.bound.get(rev) {
                bound.push(b.saturating_duration_since(*at));
            }
            if let Some(r) = t.ready.get(rev) {
                ready.push(r.saturating_duration_since(*at));
            }
        }
    }
    let mut result = RoundResult {
        arm,
        repeat: 0,
        bridge: mode,
        revisions: k,
        bound_p50_ms: ms(bound.percentile(50.0)),
        bound_p95_ms: ms(bound.percentile(95.0)),
        bound_p99_ms: ms(bound.percentile(99.0)),
        ready_p50_ms: ms(ready.percentile(50.0)),
        ready_p95_ms: ms(ready.percentile(95.0)),
        ready_p99_ms: ms(ready.percentile(99.0)),
        pods_seen: 0,
        pods_bound: 0,
        bridge_pods_created: 0.0,
        races_won: 0.0,
        races_lost: 0.0,
        duplicates_deleted: 0.0,
        rejections: 0.0,
        duplicates_gated: 0.0,
        gates_removed: 0.0,
        tap_scaled: 0.0,
        tap_reverts: 0.0,
        hops: woken.as_ref().map(|w| w.round.clone()),
        api_writes: None,
    };
    // Let duplicates be removed and the bridge close its race accounting.
    tokio::time::sleep(Duration::from_secs(args.settle.max(1) + 1)).await;
    let window = triggers
        .values()
        .min()
        .map(|first| crate::audit::Window::since(*first));
    if let Some(bridge) = &bridge {
        let m = bridge.metrics().await?;
        result.bridge_pods_created = metric_sum(&m, "ste_activator_bridge_pods_created_total");
        result.races_won = m
            .get("ste_activator_bridge_races_total{result=\"won\"}")
            .copied()
            .unwrap_or(0.0);
        result.races_lost = m
            .get("ste_activator_bridge_races_total{result=\"lost\"}")
            .copied()
            .unwrap_or(0.0);
        result.duplicates_deleted = metric_sum(&m, "ste_activator_bridge_duplicates_deleted_total");
        result.rejections = metric_sum(&m, "ste_activator_bridge_rejections_total");
        result.duplicates_gated = metric_sum(&m, "ste_activator_bridge_duplicates_gated_total");
        result.gates_removed = metric_sum(&m, "ste_activator_bridge_gates_removed_total");
        result.tap_scaled = m
            .get("ste_activator_bridge_tap_wakes_total{result=\"scaled\"}")
            .copied()
            .unwrap_or(0.0);
        result.tap_reverts = metric_sum(&m, "ste_activator_bridge_tap_reverts_total");
    }
    {
        let t = times.lock().expect("times");
        result.pods_seen = t.pods.len();
        result.pods_bound = t.bound_pods.len();
    }
    watcher.abort();
    if let Some(woken) = woken {
        // Back to zero by the autoscaler itself, once the requests are
        // answered; the bridge still runs (with the tap, the activator's
        // stats go through it).
        let back = woken.back_to_zero(record, services).await;
        if let Some(bridge) = bridge {
            bridge.stop();
        }
        back?;
        result.api_writes = api_writes(dir, window, k).await?;
        return Ok(result);
    }
    if let Some(bridge) = bridge {
        bridge.stop();
    }
    // Back to zero, as the autoscaler would after its grace period.
    for s in services {
        scale_revision(&client, s, 0).await?;
    }
    wait_at_zero(&client, services, Duration::from_secs(120)).await?;
    result.api_writes = api_writes(dir, window, k).await?;
    Ok(result)
}

/// The writes of the cluster in `dir` (audited) in `window`, ÷ `wakes`.
async fn api_writes(
    dir: &Path,
    window: Option<crate::audit::Window>,
    wakes: usize,
) -> anyhow::Result<Option<crate::audit::WritesPerWake>> {
    let Some(window) = window else {
        return Ok(None);
    };
    let log = crate::audit::log_path(dir);
    let writes = crate::audit::count_writes_flushed(&log, &window, Duration::from_secs(15)).await?;
    Ok(Some(crate::audit::WritesPerWake::new(
        &writes,
        wakes,
        window.length(),
    )))
}

impl ColdstartArgs {
    /// The cluster every arm of the run gets (rounds and sweep alike).
    pub(crate) fn environment(&self) -> crate::arms::Environment {
        crate::arms::Environment {
            shards: self.shards,
            nodes: self.nodes,
            client_qps: self.client_qps,
            fsync_delay: self.fsync_delay,
            topology: self.topology.clone(),
        }
    }
}

async fn run_arm(
    args: &ColdstartArgs,
    arm: Arm,
    repeat: u64,
    bridge_bin: Option<&Path>,
) -> anyhow::Result<Vec<RoundResult>> {
    let env = args.environment();
    let mut name = crate::arms::dir_name(arm, &env);
    if args.repeats > 1 {
        name.push_str(&format!("-r{repeat}"));
    }
    let dir = std::path::absolute(args.output.join(name))?;
    eprintln!(
        "== {arm:?} arm, repeat {}/{}: cluster with {} nodes, {}",
        repeat + 1,
        args.repeats,
        args.nodes,
        crate::arms::qps_name(crate::arms::client_qps(arm, env.client_qps))
    );
    // Every arm audits its writes: the audit log's cost is the same everywhere.
    let mut up = cluster::arm_up_args(arm, &env, dir.clone());
    up.audit = true;
    let record = cluster::up_full(
        &up,
        &cluster::AgentArgs::default(),
        &crate::real_node::RealNodeArgs::default(),
        &env.topology,
    )
    .await?;
    let leases = keep_node_leases(&record)?;
    let result = async {
        let mut knative = Knative::start(&record, &dir.join("logs")).await?;
        if args.wake == crate::knative::Wake::Stats {
            // Before the Services: a later change resyncs every PodAutoscaler.
            crate::knative::configure_autoscaler(&record).await?;
        }
        let client = client_for(&record)?;
        let max = args.revisions.iter().copied().max().unwrap_or(0);
        let services: Vec<String> = (0..max).map(|i| format!("cold-{i}")).collect();
        let mut progress = Progress::new(format!("{arm:?}: Knative Services created"), max as u64);
        for (i, s) in services.iter().enumerate() {
            create_service(&client, s, "100m").await?;
            progress.update(i as u64 + 1, "at zero");
        }
        progress.finish(max as u64, "waiting for their revisions at zero");
        wait_at_zero(&client, &services, Duration::from_secs(300)).await?;
        if args.warmup && args.wake == crate::knative::Wake::Stats {
            eprintln!("  {arm:?}: warm-up, every revision woken once (not recorded)");
            round(args, &record, &dir, &services, None, arm).await?;
        }
        let mut results = Vec::new();
        for &k in &args.revisions {
            let variants = std::iter::once(None).chain(bridge_bin.into_iter().flat_map(|bin| {
                args.bridge_modes
                    .iter()
                    .map(move |m| Some((bin, m.as_str())))
            }));
            for variant in variants {
                knative.check()?;
                let mut r = round(args, &record, &dir, &services[..k], variant, arm).await?;
                r.repeat = repeat;
                eprintln!(
                    "    bound p50 {} ms p99 {} ms, Ready p50 {} ms p99 {} ms",
                    r.bound_p50_ms, r.bound_p99_ms, r.ready_p50_ms, r.ready_p99_ms
                );
                results.push(r);
            }
        }
        anyhow::Ok(results)
    }
    .await;
    leases.abort();
    cluster::stop(&record).await?;
    result
}

pub fn markdown(results: &[RoundResult]) -> String {
    let mut out = String::from(
        "| arm | repeat | revisions | bridge | bound p50 / p95 / p99 (ms) | Ready p50 / p95 / p99 (ms) | pods seen / bound | bridge pods | races won / lost | duplicates deleted / gated | rejections |\n|---|---:|---:|---|---|---|---|---:|---|---:|---:|\n",
    );
    for r in results {
        out.push_str(&format!(
            "| {:?} | {} | {} | {} | {} / {} / {} | {} / {} / {} | {} / {} | {} | {} | {} | {} |\n",
            r.arm,
            r.repeat,
            r.revisions,
            r.bridge,
            r.bound_p50_ms,
            r.bound_p95_ms,
            r.bound_p99_ms,
            r.ready_p50_ms,
            r.ready_p95_ms,
            r.ready_p99_ms,
            r.pods_seen,
            r.pods_bound,
            if r.bridge != "none" {
                format!("{}", r.bridge_pods_created)
            } else {
                "–".into()
            },
            if r.bridge != "none" {
                format!("{} / {}", r.races_won, r.races_lost)
            } else {
                "–".into()
            },
            if r.bridge != "none" {
                format!("{} / {}", r.duplicates_deleted, r.duplicates_gated)
            } else {
                "–".into()
            },
            if r.bridge != "none" {
                format!("{}", r.rejections)
            } else {
                "–".into()
            },
        ));
    }
    out
}

/// The rounds' API writes per wake, one table (see [`crate::audit::table`]).
pub fn writes_markdown(results: &[RoundResult]) -> String {
    let rounds: Vec<(String, &crate::audit::WritesPerWake)> = results
        .iter()
        .filter_map(|r| {
            let label = format!(
                "{:?} r{} ×{} bridge {}",
                r.arm, r.repeat, r.revisions, r.bridge
            );
            r.api_writes.as_ref().map(|w| (label, w))
        })
        .collect();
    crate::audit::table::markdown(&rounds)
}

/// The rounds of `args`; with `--sweep`, the open-loop sweep instead
/// ([`sweep::run`]), which writes its own results and returns no round.
pub async fn run(args: ColdstartArgs) -> anyhow::Result<Vec<RoundResult>> {
    if args.sweep.requested() {
        sweep::run(&args).await?;
        return Ok(Vec::new());
    }
    if args.revisions.is_empty() || args.revisions.contains(&0) {
        bail!("--revisions needs positive counts, e.g. 1,5,25,100");
    }
    let mut args = args;
    args.bridge_modes.retain(|m| !m.is_empty() && m != "none");
    if let Some(bad) = args.bridge_modes.iter().find(|m| bridge_flags(m).is_err()) {
        bail!("--bridge-modes: {}", bridge_flags(bad).unwrap_err());
    }
    let bridge_bin = match args.bridge_modes.is_empty() {
        true => None,
        false => Some(bridge_binary(&args)?),
    };
    std::fs::create_dir_all(&args.output)?;
    let mut results = Vec::new();
    for repeat in 0..args.repeats {
        for arm in crate::arms::arm_order(&args.arms, repeat) {
            results.extend(run_arm(&args, arm, repeat, bridge_bin.as_deref()).await?);
            // Kept after every arm, so a long run that fails later keeps its rounds.
            std::fs::write(
                args.output.join("coldstart.json"),
                serde_json::to_string_pretty(&results)?,
            )?;
        }
    }
    let mut table = markdown(&results);
    if args.repeats > 1 {
        table.push('\n');
        table.push_str(&spread::markdown(&results));
    }
    table.push_str(
        "\nAPI writes per wake (kube-apiserver's audit log, first wake → end of the round):\n\n",
    );
    table.push_str(&writes_markdown(&results));
    std::fs::write(
        args.output.join("coldstart.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(args.output.join("coldstart.md"), &table)?;
    let hops: Vec<_> = results.iter().filter_map(|r| r.hops.clone()).collect();
    std::fs::write(args.output.join("hops.md"), crate::knative::markdown(&hops))?;
    let plotted = serde_json::to_value(&results)?;
    crate::plots::write_suite(
        crate::plots::Suite::Coldstart,
        "coldstart",
        plotted,
        &args.output,
    )?;
    println!("{table}");
    eprintln!(
        "results in {}",
        args.output.join("coldstart.json").display()
    );
    Ok(results)
}
