//! The processes the Knative suites run next to a local cluster: Knative
//! Serving's own controller and autoscaler (built by hack/build-upstream.sh
//! from the release pinned in hack/knative/go.mod; its CRDs and config maps
//! vendored in hack/knative/) and ste-activator-bridge. Shared by
//! `ste-bench coldstart`, `coldstart-real` and the activator-bridge tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use k8s_openapi::api::coordination::v1::Lease;

use crate::api::client_for;
use crate::cluster::ClusterRecord;

const CRDS: &str = include_str!("../../../hack/knative/serving-crds.yaml");
const CONFIG: &str = include_str!("../../../hack/knative/serving-config.yaml");
const STE_CONFIG: &str = include_str!("../../../hack/knative/serving-ste.yaml");

fn kubectl(record: &ClusterRecord, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    use std::io::Write;
    let binary = ste_testkit::kubectl_binary()?;
    let mut child = Command::new(&binary)
        .arg(format!("--kubeconfig={}", record.kubeconfig.display()))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", binary.display()))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(input.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A child process killed (and reaped) on drop.
struct Owned {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long Knative's controller and autoscaler get to take their leases.
const LEAD_WITHIN: Duration = Duration::from_secs(180);

/// Knative's components: name, binary, its environment override, metrics domain.
type Component = (&'static str, &'static str, &'static str, &'static str);
const COMPONENTS: [Component; 2] = [
    (
        "knative-controller",
        "knative-controller",
        "STE_KNATIVE_CONTROLLER_BIN",
        "knative.dev/internal/serving",
    ),
    (
        "knative-autoscaler",
        "knative-autoscaler",
        "STE_KNATIVE_AUTOSCALER_BIN",
        "knative.dev/serving",
    ),
];

/// Starts one of [`COMPONENTS`] with its log in `logs/<name>.log`
/// (appended to with `append`), in a process group of its own.
fn spawn_component(
    record: &ClusterRecord,
    logs: &Path,
    (name, binary, env_name, domain): Component,
    append: bool,
) -> anyhow::Result<Owned> {
    use std::os::unix::process::CommandExt;
    let binary = ste_testkit::upstream_binary(binary, env_name)?;
    let log = logs.join(format!("{name}.log"));
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(&log)?;
    let child = Command::new(&binary)
        .arg(format!("--kubeconfig={}", record.kubeconfig.display()))
        .env("SYSTEM_NAMESPACE", "knative-serving")
        .env("POD_NAME", format!("{name}-0"))
        // Published in the autoscaler's bucket Endpoints, which refuse loopback
        // addresses; with one autoscaler nothing ever connects to it.
        .env("POD_IP", "10.0.0.3")
        .env("CONFIG_LOGGING_NAME", "config-logging")
        .env("CONFIG_OBSERVABILITY_NAME", "config-observability")
        .env("METRICS_DOMAIN", domain)
        // Profiling is off (config-observability) but its server always listens: any free port.
        .env("PROFILING_PORT", "0")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    Ok(Owned {
        name: name.into(),
        child,
        log,
    })
}

/// Whether the autoscaler's log, from byte `from` on (its current start),
/// says it gave up leading.
fn gave_up(log: &Path, from: usize) -> bool {
    std::fs::read(log).is_ok_and(|bytes| {
        bytes.len() > from
            && String::from_utf8_lossy(&bytes[from..]).contains("has stopped leading")
    })
}

/// The last `n` lines of a log file (or why it could not be read).
fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(err) => format!("({}: {err})", path.display()),
    }
}

/// The autoscaler's stat server port (`statsServerAddr = ":8080"`).
const STAT_PORT: u16 = 8080;

/// Waits (at most 30 s) until the autoscaler can bind its stat port, or
/// says which process holds it: if the bind fails the autoscaler cancels
/// itself at start without saying why (see [`super::port`]).
async fn stat_port_free() -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !super::port::free(STAT_PORT) {
        if Instant::now() > deadline {
            bail!(
                "Knative's autoscaler needs :{STAT_PORT}, which has been taken for 30 s by {:?}",
                super::port::listeners(STAT_PORT)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Knative Serving's controller and autoscaler, running against a local cluster.
pub struct Knative {
    processes: Vec<Owned>,
    // Knative's autoscaler binds its stat server to :8080 (a constant in
    // cmd/autoscaler): one at a time on this machine.
    _port_lock: std::fs::File,
}

impl Knative {
    /// Installs the CRDs and config (vendored release YAML plus
    /// hack/knative/serving-ste.yaml), starts the controller and the
    /// autoscaler with their logs in `logs`, and waits until both lead.
    pub async fn start(record: &ClusterRecord, logs: &Path) -> anyhow::Result<Knative> {
        let lock_path = std::env::temp_dir().join("ste-knative-autoscaler-8080.lock");
        let lock = std::fs::File::create(&lock_path)
            .with_context(|| format!("creating {}", lock_path.display()))?;
        if lock.try_lock().is_err() {
            eprintln!(
                "  (another Knative autoscaler holds :8080 on this machine; waiting for {})",
                lock_path.display()
            );
            let lock = lock.try_clone()?;
            tokio::task::spawn_blocking(move || lock.lock()).await??;
        }
        kubectl(record, &["apply", "--server-side", "-f", "-"], Some(CRDS))
            .context("installing Knative's CRDs")?;
        kubectl(
            record,
            &[
                "wait",
                "--for=condition=Established",
                "crd",
                "--all",
                "--timeout=60s",
            ],
            None,
        )?;
        kubectl(record, &["apply", "--server-side", "-f", "-"], Some(CONFIG))
            .context("installing Knative's config maps")?;
        kubectl(
            record,
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=ste",
                "-f",
                "-",
            ],
            Some(STE_CONFIG),
        )
        .context("applying hack/knative/serving-ste.yaml")?;

        std::fs::create_dir_all(logs)?;
        let mut knative = Knative {
            processes: Vec::new(),
            _port_lock: lock,
        };
        stat_port_free().await?;
        for component in COMPONENTS {
            let process = spawn_component(record, logs, component, false)?;
            knative.processes.push(process);
        }
        let leases = kube::Api::<Lease>::namespaced(client_for(record)?, "knative-serving");
        // 90 s is plenty on a quiet machine (both lead within 1 s of start);
        // a CI machine under a parallel build has been seen to need more.
        let deadline = Instant::now() + LEAD_WITHIN;
        let mut restarts = 0;
        let mut log_from = 0;
        loop {
            knative.check()?;
            let holders: Vec<String> = leases
                .list(&kube::api::ListParams::default())
                .await
                .map(|l| l.items)
                .unwrap_or_default()
                .into_iter()
                .filter(|l| l.spec.as_ref().is_some_and(|s| s.holder_identity.is_some()))
                .filter_map(|l| l.metadata.name)
                .collect();
            let controller = holders
                .iter()
                .any(|h| h.starts_with("controller.knative.dev.serving.pkg.reconciler.revision"));
            let autoscaler = holders.iter().any(|h| h == "autoscaler-bucket-00-of-01");
            if controller && autoscaler {
                return Ok(knative);
            }
            let autoscaler_log = logs.join("knative-autoscaler.log");
            if !autoscaler && restarts < 2 && gave_up(&autoscaler_log, log_from) {
                // Seen a few times in hundreds of starts: the autoscaler
                // stops its controllers at once after starting (its root
                // context cancelled; cause not found yet) and never leads.
                // It leads when started again.
                restarts += 1;
                log_from = std::fs::metadata(&autoscaler_log).map_or(0, |m| m.len() as usize);
                // Kept in this output: the log may be in a test's temporary directory.
                eprintln!(
                    "  (Knative's autoscaler stopped leading at start; restarting it, {restarts} of 2; :8080 held by {:?}; its last lines:\n{})",
                    super::port::listeners(STAT_PORT),
                    log_tail(&autoscaler_log, 15)
                );
                knative.processes.retain(|p| p.name != COMPONENTS[1].0);
                stat_port_free().await?;
                let process = spawn_component(record, logs, COMPONENTS[1], true)?;
                knative.processes.push(process);
            }
            if Instant::now() > deadline {
                // The logs may live in a test's temporary directory: say
                // what the autoscaler last logged here.
                let tail = log_tail(&logs.join("knative-autoscaler.log"), 15);
                bail!("Knative did not take its leases within {LEAD_WITHIN:?} (controller: {controller}, autoscaler: {autoscaler}); see {}; the autoscaler's last lines:\n{tail}", logs.display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Fails if a component exited.
    pub fn check(&mut self) -> anyhow::Result<()> {
        for p in &mut self.processes {
            if let Some(status) = p.child.try_wait()? {
                bail!("{} exited ({status}); see {}", p.name, p.log.display());
            }
        }
        Ok(())
    }
}

/// ste-activator-bridge as a child process with its admin port.
pub struct BridgeProcess {
    process: Owned,
    pub admin: String,
}

impl BridgeProcess {
    /// Starts the bridge (extra flags appended) and waits for /readyz.
    pub async fn start(
        binary: &Path,
        record: &ClusterRecord,
        log: &Path,
        extra: &[&str],
    ) -> anyhow::Result<BridgeProcess> {
        let admin = format!("127.0.0.1:{}", ste_testkit::free_port());
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(binary)
            .arg(format!("--kubeconfig={}", record.kubeconfig.display()))
            .arg(format!("--admin-listen={admin}"))
            .args(extra)
            .env("RUST_LOG", "info,ste_activator_bridge=debug")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut bridge = BridgeProcess {
            process: Owned {
                name: "ste-activator-bridge".into(),
                child,
                log: log.to_path_buf(),
            },
            admin,
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = bridge.process.child.try_wait()? {
                bail!(
                    "ste-activator-bridge exited ({status}); see {}",
                    log.display()
                );
            }
            if let Ok(r) = http
                .get(format!("http://{}/readyz", bridge.admin))
                .send()
                .await
            {
                if r.status().is_success() {
                    return Ok(bridge);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "ste-activator-bridge not ready within 30s; see {}",
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.process.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// Its /metrics as (series with labels → value), e.g.
    /// `ste_activator_bridge_races_total{result="won"}`.
    pub async fn metrics(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let body = reqwest::Client::new()
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await?
            .text()
            .await?;
        Ok(body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                l.rsplit_once(' ')
                    .and_then(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v)))
            })
            .collect())
    }

    /// Stops it (SIGTERM, so it releases its Lease) and waits up to 5 s, then kills.
    pub fn stop(mut self) {
        let pid = self.process.child.id() as i32;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.process.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Sum of a metric family's series (all label values).
pub fn metric_sum(metrics: &BTreeMap<String, f64>, prefix: &str) -> f64 {
    metrics
        .iter()
        .filter(|(k, _)| *k == prefix || k.starts_with(&format!("{prefix}{{")))
        .map(|(_, v)| v)
        // Not `.sum()`: an empty float sum is -0.0, printed "-0".
        .fold(0.0, |total, v| total + v)
}

#[cfg(test)]
mod tests {
    use super::log_tail;

    #[test]
    fn gave_up_reads_only_the_current_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        std::fs::write(&path, "start\n\"x\" has stopped leading \"bucket\"\n").unwrap();
        assert!(super::gave_up(&path, 0));
        let len = std::fs::metadata(&path).unwrap().len() as usize;
        assert!(!super::gave_up(&path, len));
        assert!(!super::gave_up(&dir.path().join("none.log"), 0));
    }

    #[test]
    fn log_tail_keeps_the_last_lines_and_names_an_unreadable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        std::fs::write(&path, "one\ntwo\nthree\n").unwrap();
        assert_eq!(log_tail(&path, 2), "two\nthree");
        assert_eq!(log_tail(&path, 10), "one\ntwo\nthree");
        let missing = log_tail(&dir.path().join("none.log"), 2);
        assert!(missing.contains("none.log"), "{missing}");
    }
}
