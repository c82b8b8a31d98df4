//! `ste-bench coldstart-real`: N Knative cold starts on a real node, each
//! one request through Knative's activator ([`super::real`]), per arm, and
//! the per-hop table.
//!
//! Arms run one after another in one run, each on a cluster of its own
//! (one real node, no kwok node): Knative's autoscaler (:8080) and activator
//! (:8012) listen on fixed ports, so two clusters cannot run Knative at once
//! and the arms cannot be interleaved.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use super::real::{self, ActivatorProcess, RealWake};
use super::real_image::{self, ImageState, ImageWake};
use crate::audit::{Window, WritesPerWake};
use crate::cluster::{self, AgentArgs, Arm, UpArgs};
use crate::knative::processes::{BridgeProcess, Knative};
use crate::real_node::{RealNodeArgs, FUNCTION_IMAGE};

/// One arm of the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RealArm {
    /// One durable etcd for everything.
    Stock,
    /// Pods in STE's shards.
    Ste,
    /// STE, and ste-activator-bridge's admission webhook binding every
    /// revision pod at creation (`--mode=webhook`).
    SteWebhook,
}

impl RealArm {
    fn storage(self) -> Arm {
        match self {
            RealArm::Stock => Arm::Stock,
            RealArm::Ste | RealArm::SteWebhook => Arm::Ste,
        }
    }

    fn name(self) -> &'static str {
        match self {
            RealArm::Stock => "stock",
            RealArm::Ste => "ste",
            RealArm::SteWebhook => "ste+webhook",
        }
    }

    /// The arm's cluster directory under --dir: short, because containerd's
    /// socket path below it must stay under 104 bytes.
    fn dir_name(self) -> &'static str {
        match self {
            RealArm::Stock => "stock",
            RealArm::Ste => "ste",
            RealArm::SteWebhook => "ste-wh",
        }
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct RealArgs {
    /// Arms, run one after another.
    #[arg(
        long,
        env = "STE_COLDSTART_REAL_ARMS",
        value_enum,
        value_delimiter = ',',
        default_value = "stock,ste,ste-webhook"
    )]
    pub arms: Vec<RealArm>,
    /// Cold starts per arm (each: one request, then back to zero).
    #[arg(long, env = "STE_COLDSTART_REAL_COLD_STARTS", default_value_t = 3)]
    pub cold_starts: usize,
    /// RAM etcd shards (STE arms).
    #[arg(long, env = "STE_COLDSTART_REAL_SHARDS", default_value_t = 2)]
    pub shards: usize,
    /// Images imported into the real node (hack/build-images.sh: pause,
    /// function, queue-proxy at least).
    #[arg(
        long,
        env = "STE_COLDSTART_REAL_IMAGES_DIR",
        default_value = "target/images"
    )]
    pub images_dir: PathBuf,
    /// ste-activator-bridge binary (ste-webhook arm); default: next to ste-bench.
    #[arg(long, env = "STE_ACTIVATOR_BRIDGE_BIN")]
    pub bridge_bin: Option<PathBuf>,
    /// Image scenarios (comma-separated; none: the function image imported
    /// into the node, as always): `present`, `absent` (the kubelet pulls it
    /// from a loopback registry), `one-node` (only real-node-1 holds it;
    /// needs --real-nodes 2). Each cold start runs once per scenario, interleaved.
    #[arg(
        long,
        env = "STE_COLDSTART_REAL_IMAGES",
        value_enum,
        value_delimiter = ','
    )]
    pub images: Vec<ImageState>,
    /// Real nodes per arm's cluster.
    #[arg(long, env = "STE_COLDSTART_REAL_NODES", default_value_t = 1)]
    pub real_nodes: usize,
    /// Working directory: one cluster directory per arm, logs kept.
    #[arg(
        long,
        env = "STE_COLDSTART_REAL_DIR",
        default_value = "target/bench/coldstart-real"
    )]
    pub dir: PathBuf,
}

/// One arm's cold starts.
#[derive(Clone, Debug, Serialize)]
pub struct ArmResult {
    pub arm: RealArm,
    pub wakes: Vec<RealWake>,
    /// kube-apiserver's writes during the cold starts (each from just
    /// before its request to its last hop seen), per component, ÷ the cold
    /// starts.
    pub api_writes: Option<WritesPerWake>,
}

fn bridge_binary(args: &RealArgs) -> anyhow::Result<PathBuf> {
    if let Some(b) = &args.bridge_bin {
        return Ok(b.clone());
    }
    let candidate = std::env::current_exe()?.with_file_name("ste-activator-bridge");
    anyhow::ensure!(
        candidate.exists(),
        "ste-activator-bridge not found next to ste-bench: build it (cargo build -p ste-activator-bridge) or set STE_ACTIVATOR_BRIDGE_BIN"
    );
    Ok(candidate)
}

/// The bridge as an admission webhook only, on a free loopback port with a
/// certificate it makes and registers itself.
async fn start_webhook(
    args: &RealArgs,
    record: &cluster::ClusterRecord,
    logs: &Path,
) -> anyhow::Result<BridgeProcess> {
    let listen = format!("--webhook-listen=127.0.0.1:{}", ste_testkit::free_port());
    let flags = [
        "--mode=webhook",
        listen.as_str(),
        "--webhook-self-signed",
        "--webhook-unregister-on-exit",
        "--webhook-timeout=1s",
    ];
    BridgeProcess::start(
        &bridge_binary(args)?,
        record,
        &logs.join("ste-activator-bridge.log"),
        &flags,
    )
    .await
}

/// Knative, the activator (and the webhook) on a started cluster; the
/// Service made and taken to zero once; then the cold starts, and the
/// writes they cost (the cluster in `dir` is audited).
async fn cold_starts(
    args: &RealArgs,
    arm: RealArm,
    record: &cluster::ClusterRecord,
    dir: &Path,
) -> anyhow::Result<ArmWakes> {
    let logs = &dir.join("logs");
    let mut knative = Knative::start(record, logs).await?;
    super::configure_autoscaler(record).await?;
    let mut activator = ActivatorProcess::start(record, logs, Duration::from_secs(90)).await?;
    let bridge = match arm {
        RealArm::SteWebhook => Some(start_webhook(args, record, logs).await?),
        _ => None,
    };
    let service = "fn-real";
    // The image scenarios: the function image from a loopback registry.
    let pushed = match args.images.is_empty() {
        true => None,
        false => {
            let pushed = real_image::push_function(&args.images_dir, logs)?;
            crate::real_node::trust_registry(dir, &pushed.registry.host)?;
            Some(pushed)
        }
    };
    let image = pushed.as_ref().map(|p| p.image.as_str());
    real::create_function_service_of(record, service, image.unwrap_or(FUNCTION_IMAGE)).await?;
    real::wait_up_then_zero(record, service, Duration::from_secs(180)).await?;
    let mut wakes = Vec::new();
    let mut writes: Option<WritesPerWake> = None;
    let audit_log = crate::audit::log_path(dir);
    if let Some(image) = image {
        // The image scenarios' own loop (they set the nodes up between
        // wakes); their writes are not counted per wake.
        let image_wakes =
            real_image::cold_starts(dir, record, service, image, &args.images, args.cold_starts)
                .await
                .with_context(|| format!("{}: image scenarios", arm.name()))?;
        wakes.extend(image_wakes.iter().map(|w| w.wake.clone()));
        activator.check()?;
        knative.check()?;
        if let Some(b) = bridge {
            b.stop();
        }
        return Ok(ArmWakes {
            wakes,
            writes: None,
            images: image_wakes,
        });
    }
    for i in 0..args.cold_starts {
        let from = std::time::Instant::now();
        let wake = real::cold_start(record, service, Duration::from_secs(120)).await?;
        anyhow::ensure!(
            wake.answered(),
            "{}: cold start {i}: the activator answered {} {:?}",
            arm.name(),
            wake.status,
            wake.body
        );
        eprintln!(
            "  {} cold start {i}: first response {:?} ms",
            arm.name(),
            wake.ms.get("first response")
        );
        wakes.push(wake);
        let window = Window::since(from);
        real::back_to_zero(record, service, Duration::from_secs(120)).await?;
        let counted =
            crate::audit::count_writes_flushed(&audit_log, &window, Duration::from_secs(15))
                .await?;
        let one = WritesPerWake::new(&counted, 1, window.length());
        match &mut writes {
            Some(all) => all.merge(&one),
            None => writes = Some(one),
        }
    }
    activator.check()?;
    knative.check()?;
    if let Some(b) = bridge {
        b.stop();
    }
    Ok(ArmWakes {
        wakes,
        writes,
        images: Vec::new(),
    })
}

/// One arm's cold starts, the writes they cost, and the image scenarios'
/// wakes (with `--images`).
struct ArmWakes {
    wakes: Vec<RealWake>,
    writes: Option<WritesPerWake>,
    images: Vec<ImageWake>,
}

async fn run_arm(args: &RealArgs, arm: RealArm) -> anyhow::Result<ArmWakes> {
    let dir = std::path::absolute(args.dir.join(arm.dir_name()))?;
    let _ = std::fs::remove_dir_all(&dir);
    let mut up = UpArgs::plain(arm.storage(), args.shards, 0, dir.clone());
    // Every arm audits its writes: the audit log's cost is the same everywhere.
    up.audit = true;
    let real = RealNodeArgs {
        real_nodes: args.real_nodes,
        images_dir: args.images_dir.clone(),
    };
    let record = cluster::up_with_real(&up, &AgentArgs::default(), &real)
        .await
        .with_context(|| format!("{}: cluster up with one real node", arm.name()))?;
    let result = cold_starts(args, arm, &record, &dir).await;
    let down = cluster::down(&cluster::DownArgs { dir }).await;
    let wakes = result?;
    down?;
    Ok(wakes)
}

/// Runs every arm, prints the table and writes `<dir>/results.json`.
pub async fn run(args: RealArgs) -> anyhow::Result<Vec<ArmResult>> {
    anyhow::ensure!(args.cold_starts > 0, "--cold-starts must be at least 1");
    anyhow::ensure!(args.real_nodes > 0, "--real-nodes must be at least 1");
    anyhow::ensure!(
        !args.images.contains(&ImageState::OneNode) || args.real_nodes >= 2,
        "--images one-node needs --real-nodes 2 or more"
    );
    let mut results = Vec::new();
    let mut image_results = Vec::new();
    for arm in &args.arms {
        eprintln!("arm {}", arm.name());
        let ArmWakes {
            wakes,
            writes,
            images,
        } = run_arm(&args, *arm).await?;
        results.push(ArmResult {
            arm: *arm,
            wakes,
            api_writes: writes,
        });
        if !images.is_empty() {
            image_results.push((arm.name().to_string(), images));
        }
    }
    let table: Vec<(String, Vec<RealWake>)> = results
        .iter()
        .map(|r| (r.arm.name().to_string(), r.wakes.clone()))
        .collect();
    let writes: Vec<(String, &WritesPerWake)> = results
        .iter()
        .filter_map(|r| r.api_writes.as_ref().map(|w| (r.arm.name().to_string(), w)))
        .collect();
    let table = format!(
        "{}\nAPI writes per cold start (kube-apiserver's audit log, request → last hop seen):\n\n{}",
        real::markdown(&table),
        crate::audit::table::markdown(&writes)
    );
    println!("{table}");
    std::fs::create_dir_all(&args.dir)?;
    std::fs::write(args.dir.join("coldstart-real.md"), &table)?;
    let out = args.dir.join("results.json");
    std::fs::write(&out, serde_json::to_string_pretty(&results)?)?;
    println!("results: {}", out.display());
    if !image_results.is_empty() {
        println!("{}", real_image::markdown(&image_results));
        let out = args.dir.join("images.json");
        std::fs::write(&out, serde_json::to_string_pretty(&image_results)?)?;
        println!("image scenarios: {}", out.display());
    }
    let figures = crate::plots::write_suite(
        crate::plots::Suite::Coldstart,
        "coldstart-real",
        plotted_wakes(&results),
        &args.dir,
    )?;
    for figure in figures {
        println!("plot: {}", figure.display());
    }
    Ok(results)
}

/// The path to the first response, in the cold-start figures' hop names
/// (`ste-bench plot --suite coldstart` reads this list): the hops after it
/// (the pod's Ready, its ready addresses) are left out, so every bar stacks
/// up to the first response.
fn plotted_wakes(results: &[ArmResult]) -> serde_json::Value {
    const NAMES: [(&str, &str); 6] = [
        ("deployment scaled", "scaled"),
        ("pod created", "created"),
        ("pod bound", "bound"),
        ("container started", "container started"),
        (real::IP_LISTED, "IP listed"),
        (real::FIRST_RESPONSE, "first response"),
    ];
    let wakes: Vec<serde_json::Value> = results
        .iter()
        .flat_map(|r| {
            r.wakes.iter().enumerate().map(|(i, w)| {
                let hops: Vec<(&str, f64)> = std::iter::once(("wake", 0.0))
                    .chain(
                        NAMES
                            .iter()
                            .filter_map(|(key, name)| w.ms.get(*key).map(|ms| (*name, *ms))),
                    )
                    .collect();
                serde_json::json!({
                    "arm": r.arm.name(),
                    "revisions": 1,
                    "repeat": i,
                    "hops_ms": hops,
                })
            })
        })
        .collect();
    serde_json::Value::Array(wakes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wake(ms: &[(&str, f64)]) -> RealWake {
        RealWake {
            revision: "fn-00001".into(),
            ms: ms.iter().map(|(h, t)| (h.to_string(), *t)).collect(),
            status: 200,
            body: crate::real_node::FUNCTION_BODY.into(),
        }
    }

    #[test]
    fn figures_stack_the_hops_up_to_the_first_response_in_order() {
        let results = vec![ArmResult {
            arm: RealArm::Ste,
            wakes: vec![
                wake(&[
                    ("deployment scaled", 20.0),
                    ("pod created", 116.0),
                    ("pod bound", 143.0),
                    ("container started", 1599.0),
                    (real::IP_LISTED, 1615.0),
                    (real::FIRST_RESPONSE, 1624.0),
                    ("pod Ready", 1643.0),
                ]),
                wake(&[("pod bound", 90.0), (real::FIRST_RESPONSE, 1500.0)]),
            ],
            api_writes: None,
        }];
        let plots = crate::plots::Suite::Coldstart
            .read("coldstart-real", &[("run".into(), plotted_wakes(&results))])
            .expect("the cold-start reader takes the list");
        assert_eq!(plots.wakes.len(), 2);
        let hops: Vec<&str> = plots.wakes[0]
            .hops_ms
            .iter()
            .map(|(h, _)| h.as_str())
            .collect();
        // Pod Ready comes after the response on a real node: left out.
        assert_eq!(
            hops,
            [
                "wake",
                "scaled",
                "created",
                "bound",
                "container started",
                "IP listed",
                "first response"
            ]
        );
        assert_eq!(plots.wakes[1].hops_ms.last().unwrap().1, 1500.0);
        assert_eq!(
            (plots.wakes[0].repeat, plots.wakes[1].repeat),
            (0, 1),
            "each cold start is one repeat (the spread)"
        );
    }
}
