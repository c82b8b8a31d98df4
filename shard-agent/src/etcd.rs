//! Running, health-checking and restarting the shard's etcd.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::state::AgentState;

/// Backoff between restarts: doubles from 1s up to 30s; reset once etcd
/// has been healthy for a minute.
pub const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);
/// Health checks of a starting etcd (until its first success) come this often.
const STARTUP_POLL: Duration = Duration::from_millis(200);
/// The log is rotated at a (re)start once it is larger than this.
const LOG_ROTATE_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("creating etcd's data directory {path:?}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening etcd's log {path:?}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting {binary:?}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("loading TLS files for health checks: {0}")]
    Tls(String),
}

/// How to start etcd.
#[derive(Debug, Clone)]
pub struct EtcdCommand {
    pub binary: PathBuf,
    pub args: Vec<String>,
    /// Set in etcd's environment (on top of the agent's own).
    pub env: Vec<(String, String)>,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

impl EtcdCommand {
    pub fn from_config(config: &Config) -> EtcdCommand {
        let name = &config.shard_name;
        let mut listen = config
            .listen_client
            .as_str()
            .trim_end_matches('/')
            .to_string();
        if let Some(path) = &config.listen_client_unix {
            // etcd 3.6 creates the socket at an absolute unix:/// path.
            listen.push_str(&format!(",unix://{}", path.display()));
        }
        let mut args: Vec<String> = vec![
            format!("--name={name}"),
            format!("--data-dir={}", config.data_dir.display()),
            format!("--listen-client-urls={listen}"),
            format!("--advertise-client-urls={}", config.advertise_client),
            format!("--listen-peer-urls={}", config.listen_peer),
            format!("--initial-advertise-peer-urls={}", config.listen_peer),
            format!("--initial-cluster={name}={}", config.listen_peer),
            "--initial-cluster-state=new".into(),
            // RAM disk: durability comes from the router's placement, not from fsync.
            "--unsafe-no-fsync".into(),
            format!("--quota-backend-bytes={}", config.quota_bytes),
            format!("--max-txn-ops={}", config.max_txn_ops),
            format!("--max-request-bytes={}", config.max_request_bytes),
            // The router compacts (it owns the revision space).
            "--auto-compaction-retention=0".into(),
        ];
        if let Some(tls) = &config.tls {
            args.push(format!("--cert-file={}", tls.cert.display()));
            args.push(format!("--key-file={}", tls.key.display()));
            if let Some(ca) = &tls.trusted_ca {
                args.push(format!("--trusted-ca-file={}", ca.display()));
                args.push("--client-cert-auth".into());
            }
        }
        args.extend(config.etcd_args.iter().cloned());
        let env = match config.etcd_gomaxprocs {
            0 => Vec::new(),
            n => vec![("GOMAXPROCS".to_string(), n.to_string())],
        };
        EtcdCommand {
            binary: config.etcd_binary.clone(),
            args,
            env,
            data_dir: config.data_dir.clone(),
            log: config.etcd_log.clone(),
        }
    }

    /// Creates the data directory (mode 0700, as etcd wants) and the log's directory.
    pub fn prepare(&self) -> Result<(), EtcdError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if !self.data_dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.data_dir)
                .map_err(|source| EtcdError::DataDir {
                    path: self.data_dir.clone(),
                    source,
                })?;
        } else {
            let _ =
                std::fs::set_permissions(&self.data_dir, std::fs::Permissions::from_mode(0o700));
        }
        if let Some(parent) = self.log.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| EtcdError::Log {
                path: self.log.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Starts etcd in its own process group (a terminal's Ctrl-C reaches
    /// only the agent, which drains first), with PR_SET_PDEATHSIG so that it
    /// gets SIGKILL if the agent dies.
    pub fn spawn(&self) -> Result<Child, EtcdError> {
        rotate_log(&self.log);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|source| EtcdError::Log {
                path: self.log.clone(),
                source,
            })?;
        let stderr = log.try_clone().map_err(|source| EtcdError::Log {
            path: self.log.clone(),
            source,
        })?;
        let mut command = Command::new(&self.binary);
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true);
        // The parent-death signal is tied to the thread that forks: tokio's
        // worker threads live as long as the runtime, i.e. the agent.
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The agent died before prctl took effect.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        command.spawn().map_err(|source| EtcdError::Spawn {
            binary: self.binary.clone(),
            source,
        })
    }
}

fn rotate_log(log: &Path) {
    if std::fs::metadata(log)
        .map(|m| m.len() > LOG_ROTATE_BYTES)
        .unwrap_or(false)
    {
        let mut rotated = log.as_os_str().to_owned();
        rotated.push(".1");
        if let Err(err) = std::fs::rename(log, &rotated) {
            warn!(log = %log.display(), "rotating etcd's log failed: {err}");
        }
    }
}

/// The last `lines` lines of a file (at most its last 16 KiB).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(16 << 10)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

/// GET <client URL>/health against the local listener.
pub struct HealthChecker {
    client: reqwest::Client,
    url: reqwest::Url,
}

impl HealthChecker {
    pub fn new(config: &Config) -> Result<HealthChecker, EtcdError> {
        let mut url = config.listen_client.clone();
        // A wildcard listener is checked on loopback.
        match url.host_str() {
            Some("0.0.0.0") => {
                let _ = url.set_host(Some("127.0.0.1"));
            }
            Some("[::]") => {
                let _ = url.set_host(Some("[::1]"));
            }
            _ => {}
        }
        url.set_path("/health");
        // A full shard (NOSPACE alarm) still serves reads and deletes, and a
        // restart would not clear the alarm: it is not a reason to restart.
        url.set_query(Some("exclude=NOSPACE"));
        let mut builder = reqwest::Client::builder()
            .timeout(config.health_timeout)
            .no_proxy();
        if let Some(tls) = &config.tls {
            builder = builder.use_rustls_tls().tls_built_in_root_certs(false);
            match &tls.trusted_ca {
                Some(ca) => {
                    let pem = std::fs::read(ca)
                        .map_err(|e| EtcdError::Tls(format!("{}: {e}", ca.display())))?;
                    for cert in reqwest::Certificate::from_pem_bundle(&pem)
                        .map_err(|e| EtcdError::Tls(format!("{}: {e}", ca.display())))?
                    {
                        builder = builder.add_root_certificate(cert);
                    }
                    // The certificate names the advertised address, the check uses the local one.
                    builder = builder.danger_accept_invalid_hostnames(true);
                }
                // Without a CA there is nothing to verify etcd's certificate
                // with; the check goes to our own child on the local listener.
                None => builder = builder.danger_accept_invalid_certs(true),
            }
        }
        if let Some(client) = &config.client_tls {
            let mut pem = std::fs::read(&client.cert)
                .map_err(|e| EtcdError::Tls(format!("{}: {e}", client.cert.display())))?;
            pem.push(b'\n');
            pem.extend(
                std::fs::read(&client.key)
                    .map_err(|e| EtcdError::Tls(format!("{}: {e}", client.key.display())))?,
            );
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                EtcdError::Tls(format!(
                    "{} / {}: {e}",
                    client.cert.display(),
                    client.key.display()
                ))
            })?;
            builder = builder.identity(identity);
        }
        let client = builder.build().map_err(|e| EtcdError::Tls(e.to_string()))?;
        Ok(HealthChecker { client, url })
    }

    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }

    /// `Ok` when etcd answers `{"health":"true"}`; else why not.
    pub async fn check(&self) -> Result<(), String> {
        let response = self
            .client
            .get(self.url.clone())
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        let status = response.status();
        let body = response.text().await.map_err(|e| error_chain(&e))?;
        let parsed: Option<serde_json::Value> = serde_json::from_str(&body).ok();
        let healthy = parsed
            .as_ref()
            .and_then(|v| v.get("health"))
            .and_then(|h| h.as_str())
            == Some("true");
        if status.is_success() && healthy {
            Ok(())
        } else {
            Err(format!("HTTP {status}: {}", body.trim()))
        }
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// How to stop etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// SIGTERM, then SIGKILL after the grace period.
    Graceful,
    /// SIGKILL now.
    Kill,
}

pub struct SupervisorSettings {
    pub health_interval: Duration,
    pub unhealthy_after: Duration,
    pub stop_grace: Duration,
}

/// Runs etcd until told to stop: restarts it (with backoff) when it exits
/// or stays unhealthy. Publishes health on `healthy`.
pub struct Supervisor {
    pub command: EtcdCommand,
    pub health: HealthChecker,
    pub settings: SupervisorSettings,
    pub state: Arc<AgentState>,
    pub healthy: watch::Sender<bool>,
}

enum RunEnd {
    Stopped,
    Failed,
}

impl Supervisor {
    pub async fn run(self, mut stop: watch::Receiver<Option<StopMode>>) {
        let mut backoff = BACKOFF_INITIAL;
        let mut first = true;
        loop {
            self.state.tick();
            if !first {
                self.state.metrics.etcd_restarts.inc();
            }
            first = false;
            if stop.borrow().is_some() {
                return;
            }
            let (end, healthy_for) = match self.command.spawn() {
                Ok(child) => self.supervise(child, &mut stop).await,
                Err(err) => {
                    error!(shard = %self.state.shard_name, "{err}");
                    (RunEnd::Failed, Duration::ZERO)
                }
            };
            self.set_health(false);
            self.state.set_etcd_pid(None);
            if let RunEnd::Stopped = end {
                return;
            }
            if healthy_for >= BACKOFF_RESET_AFTER {
                backoff = BACKOFF_INITIAL;
            }
            warn!(shard = %self.state.shard_name, "restarting etcd in {}", humantime::format_duration(backoff));
            let sleep = tokio::time::sleep(backoff);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    _ = stop.changed() => return,
                    // Stay live while waiting.
                    _ = tokio::time::sleep(self.settings.health_interval) => self.state.tick(),
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn set_health(&self, healthy: bool) {
        self.state.set_etcd_healthy(healthy);
        self.healthy.send_replace(healthy);
    }

    /// Watches one etcd process. Returns how it ended and how long it was
    /// continuously healthy before that.
    async fn supervise(
        &self,
        mut child: Child,
        stop: &mut watch::Receiver<Option<StopMode>>,
    ) -> (RunEnd, Duration) {
        let pid = child.id();
        self.state.set_etcd_pid(pid);
        info!(
            shard = %self.state.shard_name,
            pid = pid.unwrap_or(0),
            log = %self.command.log.display(),
            "started etcd: {} {}",
            self.command.binary.display(),
            self.command.args.join(" ")
        );
        let started = Instant::now();
        let mut last_healthy: Option<Instant> = None;
        let mut healthy_since: Option<Instant> = None;
        let mut last_error = String::new();
        let mut ticker = tokio::time::interval(self.settings.health_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first check waits a little: etcd needs a moment to listen.
        ticker.reset_after(STARTUP_POLL.min(self.settings.health_interval));
        loop {
            self.state.tick();
            let healthy_for = healthy_since.map(|s| s.elapsed()).unwrap_or_default();
            tokio::select! {
                status = child.wait() => {
                    self.report_exit(status, pid);
                    return (RunEnd::Failed, healthy_for);
                }
                _ = stop.changed() => {
                    self.set_health(false);
                    self.stop_child(&mut child, stop).await;
                    return (RunEnd::Stopped, healthy_for);
                }
                _ = ticker.tick() => {
                    self.state.metrics.health_checks.inc();
                    match self.health.check().await {
                        Ok(()) => {
                            if !*self.healthy.borrow() {
                                info!(shard = %self.state.shard_name, url = %self.health.url(), "etcd is healthy");
                            }
                            last_healthy = Some(Instant::now());
                            healthy_since.get_or_insert_with(Instant::now);
                            last_error.clear();
                            self.set_health(true);
                        }
                        Err(err) => {
                            self.state.metrics.health_check_failures.inc();
                            let since = last_healthy.unwrap_or(started);
                            let was_healthy = *self.healthy.borrow();
                            healthy_since = None;
                            self.set_health(false);
                            // Before the first success, failures are the startup: log them once.
                            if was_healthy || (last_healthy.is_some() && err != last_error) {
                                warn!(shard = %self.state.shard_name, url = %self.health.url(), "etcd health check failed: {err}");
                            }
                            last_error = err;
                            if last_healthy.is_none() {
                                // Starting: look again soon, so readiness follows etcd closely.
                                ticker.reset_after(STARTUP_POLL.min(self.settings.health_interval));
                            }
                            if since.elapsed() >= self.settings.unhealthy_after {
                                error!(
                                    shard = %self.state.shard_name,
                                    pid = pid.unwrap_or(0),
                                    "etcd has not been healthy for {} (last check: {last_error}); restarting it. Last lines of {}:\n{}",
                                    humantime::format_duration(Duration::from_secs(since.elapsed().as_secs())),
                                    self.command.log.display(),
                                    log_tail(&self.command.log, 20)
                                );
                                let (_keep, mut graceful) = watch::channel(Some(StopMode::Graceful));
                                self.stop_child(&mut child, &mut graceful).await;
                                return (RunEnd::Failed, healthy_for);
                            }
                        }
                    }
                }
            }
        }
    }

    fn report_exit(&self, status: std::io::Result<ExitStatus>, pid: Option<u32>) {
        let status = match status {
            Ok(status) => describe_exit(status),
            Err(err) => format!("could not be waited for: {err}"),
        };
        error!(
            shard = %self.state.shard_name,
            pid = pid.unwrap_or(0),
            "etcd exited ({status}). Last lines of {}:\n{}",
            self.command.log.display(),
            log_tail(&self.command.log, 20)
        );
    }

    /// Stops etcd as `stop` says; a later `Kill` cuts the grace period short.
    async fn stop_child(&self, child: &mut Child, stop: &mut watch::Receiver<Option<StopMode>>) {
        let Some(pid) = child.id() else { return };
        let mode = stop.borrow_and_update().unwrap_or(StopMode::Graceful);
        if mode == StopMode::Graceful {
            info!(shard = %self.state.shard_name, pid, "stopping etcd (SIGTERM, SIGKILL after {})", humantime::format_duration(self.settings.stop_grace));
            // SAFETY: plain kill(2) on our own child, which has not been reaped (id() is Some).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            let grace = tokio::time::sleep(self.settings.stop_grace);
            tokio::pin!(grace);
            loop {
                tokio::select! {
                    status = child.wait() => {
                        info!(shard = %self.state.shard_name, pid, "etcd stopped ({})", status.map(describe_exit).unwrap_or_else(|e| e.to_string()));
                        return;
                    }
                    _ = &mut grace => {
                        warn!(shard = %self.state.shard_name, pid, "etcd did not stop within the grace period: SIGKILL");
                        break;
                    }
                    changed = stop.changed() => {
                        if changed.is_err() || *stop.borrow() == Some(StopMode::Kill) {
                            warn!(shard = %self.state.shard_name, pid, "killing etcd now (SIGKILL)");
                            break;
                        }
                    }
                }
            }
        } else {
            warn!(shard = %self.state.shard_name, pid, "killing etcd (SIGKILL)");
        }
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}
