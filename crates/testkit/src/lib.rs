//! Real etcd processes and in-process routers on 127.0.0.1, with free ports,
//! for tests and benchmarks. Every wait has a deadline and says what it waited for.

pub mod workload;

use std::net::TcpListener as StdTcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ste_etcd_proto::pb::{
    kv_client::KvClient, maintenance_client::MaintenanceClient, StatusRequest,
};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tonic::transport::Channel;

#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error("{what} not found at {path}: run `hack/build-upstream.sh` (or set {env})")]
    MissingBinary {
        what: &'static str,
        path: PathBuf,
        env: &'static str,
    },
    #[error("starting {what} failed: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} was not ready within {seconds:.0}s (log: {log})")]
    NotReady {
        what: String,
        seconds: f64,
        log: String,
    },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("router failed: {0}")]
    Router(#[from] ste_router::RouterError),
    #[error("gRPC connection failed: {0}")]
    Connect(#[from] tonic::transport::Error),
}

pub type Result<T> = std::result::Result<T, TestkitError>;

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// Where `hack/build-upstream.sh` puts the pinned upstream binaries.
pub fn upstream_dir() -> PathBuf {
    std::env::var_os("STE_UPSTREAM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/upstream/bin"))
}

/// An upstream binary by name (`STE_<NAME>_BIN` overrides its path).
pub fn upstream_binary(name: &'static str, env: &'static str) -> Result<PathBuf> {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| upstream_dir().join(name));
    if path.is_file() {
        Ok(path)
    } else {
        Err(TestkitError::MissingBinary {
            what: name,
            path,
            env,
        })
    }
}

pub fn etcd_binary() -> Result<PathBuf> {
    upstream_binary("etcd", "STE_ETCD_BIN")
}

pub fn etcdctl_binary() -> Result<PathBuf> {
    upstream_binary("etcdctl", "STE_ETCDCTL_BIN")
}

/// A port nobody listens on right now, for a process started next to
/// listen on.
///
/// Chosen at random **below the kernel's ephemeral range**
/// (`net.ipv4.ip_local_port_range`, 32768–60999 by default), not with
/// `bind(:0)`: a port the kernel hands out for `:0` comes from that range,
/// and between this call and the process's own bind an outgoing connection
/// of any process (kube-apiserver's to etcd, a test's client) can be given
/// the same port, so the process fails with "address already in use" — a
/// kube-apiserver exiting at start-up in parallel tests. Below the range
/// only another caller of this function can pick it, at random among
/// thousands, and it is checked free first. Falls back to `:0` when the
/// range leaves no room below it.
pub fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low > 12000 {
        for _ in 0..200 {
            let port = rand::random_range(10000..low);
            if StdTcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    StdTcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

/// Whether process `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            !stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// The body of a GET of `url` with curl (2 s at most); None unless 2xx.
pub fn http_get(url: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "2", url])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A fresh directory for a test's cluster and logs, and its guard: removed
/// when the guard drops, unless STE_KEEP_TEST_DIR is set (then kept for a
/// post-mortem, its path printed, and the guard is None).
pub fn test_dir(prefix: &str) -> (PathBuf, Option<TempDir>) {
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("a temporary directory");
    let dir = tmp.path().to_path_buf();
    if std::env::var_os("STE_KEEP_TEST_DIR").is_some() {
        eprintln!("keeping {}", tmp.keep().display());
        (dir, None)
    } else {
        (dir, Some(tmp))
    }
}

/// A single-member etcd on loopback, the way shards run: no fsync.
pub struct Etcd {
    pub name: String,
    pub client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    _dir: TempDir,
    child: Option<Child>,
    log: PathBuf,
    extra: Vec<String>,
    tls: Option<EtcdTls>,
    /// Plain-HTTP port of /health, used to wait for a TLS member.
    metrics_port: u16,
}

/// Server certificate and client CA of an etcd that requires client certificates.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl Etcd {
    pub async fn start(name: &str) -> Result<Etcd> {
        Self::start_with(name, &[]).await
    }

    /// Starts etcd with extra flags (e.g. `--unsafe-no-fsync`).
    pub async fn start_with(name: &str, extra: &[&str]) -> Result<Etcd> {
        Self::start_in(name, &std::env::temp_dir(), extra).await
    }

    /// Starts etcd with its data under `base` (e.g. /dev/shm for a RAM disk).
    pub async fn start_in(name: &str, base: &Path, extra: &[&str]) -> Result<Etcd> {
        Self::start_full(name, base, extra, None).await
    }

    /// Starts etcd serving clients over TLS only, refusing clients without a
    /// certificate signed by `tls.ca`.
    pub async fn start_tls(name: &str, tls: EtcdTls, extra: &[&str]) -> Result<Etcd> {
        Self::start_full(name, &std::env::temp_dir(), extra, Some(tls)).await
    }

    async fn start_full(
        name: &str,
        base: &Path,
        extra: &[&str],
        tls: Option<EtcdTls>,
    ) -> Result<Etcd> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("ste-etcd-{name}-"))
            .tempdir_in(base)?;
        let mut etcd = Etcd {
            name: name.to_string(),
            client_port: free_port(),
            peer_port: free_port(),
            data_dir: dir.path().join("data"),
            log: dir.path().join("etcd.log"),
            _dir: dir,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            tls,
            metrics_port: free_port(),
        };
        // free_port() only borrows a port: another process may take it before
        // etcd binds it. Such a lost race is retried on fresh ports.
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let log_before = std::fs::metadata(&etcd.log).map(|m| m.len()).unwrap_or(0);
            match etcd.spawn().await {
                Ok(()) => return Ok(etcd),
                Err(err) if attempt < ATTEMPTS && etcd.lost_a_port_race(log_before) => {
                    etcd.kill();
                    let _ = std::fs::remove_dir_all(&etcd.data_dir);
                    (etcd.client_port, etcd.peer_port, etcd.metrics_port) =
                        (free_port(), free_port(), free_port());
                    eprintln!("etcd {name}: a port was taken before etcd bound it ({err}); retrying on other ports");
                }
                Err(err) => return Err(err),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// etcd exited because one of its ports was in use (log written since `from`).
    fn lost_a_port_race(&mut self, from: u64) -> bool {
        let exited = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
            .is_some();
        let log = std::fs::read(&self.log).unwrap_or_default();
        let written = log.get(from as usize..).unwrap_or_default();
        exited && String::from_utf8_lossy(written).contains("address already in use")
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The Unix socket a plain (non-TLS) member also serves clients on, as
    /// a co-located router reaches it: `unix:///…/client.sock`.
    pub fn unix_endpoint(&self) -> String {
        format!("unix://{}", self.unix_socket().display())
    }

    fn unix_socket(&self) -> PathBuf {
        self.data_dir.with_file_name("client.sock")
    }

    /// `--listen-client-urls`: TCP, and for a plain member its Unix socket.
    fn listen_client_urls(&self) -> String {
        match self.tls {
            Some(_) => self.endpoint(),
            None => format!("{},{}", self.endpoint(), self.unix_endpoint()),
        }
    }

    async fn spawn(&mut self) -> Result<()> {
        let binary = etcd_binary()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(&binary)
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(self.listen_client_urls())
            .arg("--advertise-client-urls")
            .arg(self.endpoint())
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("{}={}", self.name, peer))
            .arg("--log-level")
            .arg("warn")
            .arg("--listen-metrics-urls")
            .arg(format!("http://127.0.0.1:{}", self.metrics_port))
            .args(self.tls.iter().flat_map(|tls| {
                [
                    "--cert-file".into(),
                    tls.cert.clone().into_os_string(),
                    "--key-file".into(),
                    tls.key.clone().into_os_string(),
                    "--trusted-ca-file".into(),
                    tls.ca.clone().into_os_string(),
                    "--client-cert-auth".into(),
                ]
            }))
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|source| TestkitError::Spawn {
                what: format!("etcd {}", self.name),
                source,
            })?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(30)).await
    }

    async fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if self.tls.is_some() {
                if http_get_ok(self.metrics_port, "/health").await {
                    return Ok(());
                }
            } else if let Ok(channel) = Channel::from_shared(self.endpoint())
                .expect("url")
                .connect()
                .await
            {
                if MaintenanceClient::new(channel)
                    .status(StatusRequest {})
                    .await
                    .is_ok()
                {
                    return Ok(());
                }
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .is_some();
            if exited || Instant::now() >= deadline {
                return Err(TestkitError::NotReady {
                    what: format!("etcd {}", self.name),
                    seconds: within.as_secs_f64(),
                    log: self.log.display().to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, like a crashed node. The data directory stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same ports, with the data it had.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn().await
    }

    /// Starts again on the same ports with an empty data directory, like a
    /// RAM disk after a node reboot.
    pub async fn restart_empty(&mut self) -> Result<()> {
        self.kill();
        std::fs::remove_dir_all(&self.data_dir).or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        self.spawn().await
    }

    pub async fn kv(&self) -> Result<KvClient<Channel>> {
        Ok(KvClient::new(
            Channel::from_shared(self.endpoint())
                .expect("url")
                .connect()
                .await?,
        ))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

/// True when `GET path` on 127.0.0.1:port answers 200.
async fn http_get_ok(port: u16, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer)).await;
    matches!(read, Ok(Ok(_))) && answer.starts_with(b"HTTP/1.1 200")
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `n` shards named shard-0… as the router is given them.
pub async fn start_shards(n: usize) -> Result<Vec<Etcd>> {
    let mut shards = Vec::new();
    for i in 0..n {
        shards.push(Etcd::start_with(&format!("shard-{i}"), &["--unsafe-no-fsync"]).await?);
    }
    Ok(shards)
}

pub fn shard_specs(shards: &[Etcd]) -> Vec<ste_router::ShardSpec> {
    shards
        .iter()
        .map(|s| {
            ste_router::ShardSpec::parse(&format!("{}={}", s.name, s.endpoint())).expect("spec")
        })
        .collect()
}

/// A router running in this process (tokio's mini-redis style: a real
/// listener on port 0 and the real `run`).
pub struct Router {
    pub addr: std::net::SocketAddr,
    pub admin_addr: std::net::SocketAddr,
    tls: bool,
    via_admin: bool,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::result::Result<(), ste_router::RouterError>>>,
}

impl Router {
    pub async fn start(shards: Vec<ste_router::ShardSpec>) -> Result<Router> {
        Self::start_with(Self::test_config(shards)).await
    }

    /// Short timeouts, so tests of failures finish quickly.
    pub fn test_config(shards: Vec<ste_router::ShardSpec>) -> ste_router::RouterConfig {
        ste_router::RouterConfig {
            shards,
            store: ste_router::StoreConfig {
                load_timeout: Duration::from_secs(3),
                shard_timeout: Duration::from_secs(3),
                ..Default::default()
            },
            maintain_interval: Duration::from_millis(100),
            ..Default::default()
        }
    }

    pub async fn start_with(config: ste_router::RouterConfig) -> Result<Router> {
        Self::start_at(config, "127.0.0.1:0".parse().expect("addr")).await
    }

    /// Starts on a given address (a restarted router keeps its clients' endpoint).
    pub async fn start_at(
        config: ste_router::RouterConfig,
        addr: std::net::SocketAddr,
    ) -> Result<Router> {
        let listener = TcpListener::bind(addr).await?;
        let admin = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let admin_addr = admin.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let tls = config.server_tls.is_some();
        // A standby under leader election does not serve gRPC: wait on its admin port.
        let via_admin = tls || config.leader.is_some();
        let task = tokio::spawn(ste_router::run(config, listener, Some(admin), async {
            let _ = stopped.await;
        }));
        let router = Router {
            addr,
            admin_addr,
            tls,
            via_admin,
            stop: Some(stop),
            task: Some(task),
        };
        router.wait_serving(Duration::from_secs(30)).await?;
        Ok(router)
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    async fn wait_serving(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if self.via_admin {
                // The gRPC port needs a client certificate, or serves only as
                // leader; the admin port says it is up.
                if http_get_ok(self.admin_addr.port(), "/livez").await {
                    return Ok(());
                }
            } else if let Ok(channel) = Channel::from_shared(self.endpoint())
                .expect("url")
                .connect()
                .await
            {
                if MaintenanceClient::new(channel)
                    .status(StatusRequest {})
                    .await
                    .is_ok()
                {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(TestkitError::NotReady {
                    what: "ste-router".into(),
                    seconds: within.as_secs_f64(),
                    log: "test output".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn channel(&self) -> Result<Channel> {
        Ok(Channel::from_shared(self.endpoint())
            .expect("url")
            .connect()
            .await?)
    }

    /// Stops the router gracefully and waits for it to finish.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(result) => result?,
                Err(join) => panic!("router task panicked: {join}"),
            }
        }
        Ok(())
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Waits for `condition` with a deadline, polling every 20 ms.
pub async fn wait_until<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` every 100 ms until it gives a value, which it returns;
/// panics naming `what` when `within` has passed without one.
pub async fn wait_for<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn kubectl_binary() -> Result<PathBuf> {
    upstream_binary("kubectl", "STE_KUBECTL_BIN")
}

pub fn kube_apiserver_binary() -> Result<PathBuf> {
    upstream_binary("kube-apiserver", "STE_KUBE_APISERVER_BIN")
}

/// A real kube-apiserver on 127.0.0.1 with a static admin token, its pods
/// (optionally) stored through a router: `--etcd-servers-overrides=/pods#…`.
pub struct KubeApiserver {
    pub port: u16,
    pub token: String,
    dir: TempDir,
    child: Option<Child>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl KubeApiserver {
    pub async fn start(etcd: &str, pods: Option<&str>) -> Result<KubeApiserver> {
        Self::start_with_flags(etcd, pods, &[]).await
    }

    /// Like [`KubeApiserver::start`], with extra flags appended (e.g.
    /// `--etcd-cafile`, `--etcd-certfile`, `--etcd-keyfile` for TLS storage).
    pub async fn start_with_flags(
        etcd: &str,
        pods: Option<&str>,
        extra: &[String],
    ) -> Result<KubeApiserver> {
        Self::start_with_env(etcd, pods, extra, &[]).await
    }

    /// Like [`KubeApiserver::start_with_flags`], with environment variables
    /// for the process (e.g. `KUBE_WATCHCACHE_CONSISTENCY_CHECKER=true`).
    pub async fn start_with_env(
        etcd: &str,
        pods: Option<&str>,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> Result<KubeApiserver> {
        let dir = tempfile::Builder::new()
            .prefix("ste-kube-apiserver-")
            .tempdir()?;
        let (key, public) = service_account_keys(dir.path())?;
        let token = "ste-test-token".to_string();
        std::fs::write(
            dir.path().join("tokens.csv"),
            format!("{token},admin,admin,system:masters\n"),
        )?;
        let port = free_port();
        let args = kube_apiserver_args(&KubeApiserverFlags {
            port,
            dir: dir.path(),
            service_account_key: &key,
            service_account_public_key: &public,
            etcd,
            overrides: pods.map(|p| vec![format!("/pods#{p}")]).unwrap_or_default(),
        });
        let args = args.into_iter().chain(extra.iter().cloned()).collect();
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut server = KubeApiserver {
            port,
            token,
            dir,
            child: None,
            args,
            env,
        };
        server.spawn().await?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("kube-apiserver.log")
    }

    async fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(kube_apiserver_binary()?)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|source| TestkitError::Spawn {
                what: "kube-apiserver".into(),
                source,
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok((200, _)) = self.curl(&["/readyz"]) {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .is_some();
            if exited || Instant::now() >= deadline {
                return Err(TestkitError::NotReady {
                    what: "kube-apiserver".into(),
                    seconds: 90.0,
                    log: self.log_path().display().to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Stops and starts it again with the same flags and port.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn().await
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// None while running; the exit status once the process has ended by itself.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn api(&self) -> Api {
        Api {
            url: self.url(),
            token: self.token.clone(),
        }
    }

    /// See [`Api::curl`].
    pub fn curl(&self, args: &[&str]) -> std::io::Result<(u16, String)> {
        self.api().curl(args)
    }
}

impl Drop for KubeApiserver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Kubernetes API endpoint and a bearer token, spoken to with `curl`.
#[derive(Clone, Debug)]
pub struct Api {
    pub url: String,
    pub token: String,
}

impl Api {
    /// `curl` against the API: (HTTP status, body); `args` is the path
    /// followed by extra curl arguments.
    pub fn curl(&self, args: &[&str]) -> std::io::Result<(u16, String)> {
        let (path, extra) = args.split_first().expect("a path");
        let out = Command::new("curl")
            .args(["-sk", "--max-time", "30", "-w", "\n%{http_code}", "-H"])
            .arg(format!("Authorization: Bearer {}", self.token))
            .args(extra)
            .arg(format!("{}{}", self.url, path))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        Ok((code.trim().parse().unwrap_or(0), body.to_string()))
    }

    /// Writes a kubeconfig for this endpoint and token (loopback, self-signed
    /// serving certificate: TLS verification is skipped), e.g. for kubectl.
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: ste-test\n  cluster:\n    server: {}\n    insecure-skip-tls-verify: true\n\
                 users:\n- name: admin\n  user:\n    token: {}\ncontexts:\n- name: ste-test\n  context:\n    cluster: ste-test\n    user: admin\n\
                 current-context: ste-test\n",
                self.url, self.token
            ),
        )
    }

    /// POSTs (or otherwise sends) a JSON body; returns (status, body).
    pub fn send_json(
        &self,
        method: &str,
        path: &str,
        body: &str,
    ) -> std::io::Result<(u16, String)> {
        let content_type = if method == "PATCH" {
            "Content-Type: application/merge-patch+json"
        } else {
            "Content-Type: application/json"
        };
        self.curl(&[path, "-X", method, "-H", content_type, "-d", body])
    }

    /// Creates Deployment `name` in `default` with `replicas` pods labelled
    /// `app: <name>` (image `nginx`, which fake nodes never pull); panics
    /// unless kube-apiserver answers 201.
    pub fn create_deployment(&self, name: &str, replicas: u32) {
        let deployment = deployment_json(name, replicas);
        let (code, body) = self
            .send_json(
                "POST",
                "/apis/apps/v1/namespaces/default/deployments",
                &deployment,
            )
            .expect("POST deployment");
        assert_eq!(code, 201, "creating Deployment {name}: {body}");
    }
}

/// Deployment `name` in `default`: `replicas` pods labelled `app: <name>`,
/// one container of image `nginx` (fake nodes never pull it), as JSON.
pub fn deployment_json(name: &str, replicas: u32) -> String {
    serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                         "spec": {"containers": [{"name": "c", "image": "nginx"}]}}
        }
    })
    .to_string()
}

/// What kube-apiserver needs to run on one machine for tests and the local cluster.
pub struct KubeApiserverFlags<'a> {
    pub port: u16,
    /// Holds tokens.csv (written by the caller) and receives the serving certs.
    pub dir: &'a Path,
    pub service_account_key: &'a Path,
    pub service_account_public_key: &'a Path,
    pub etcd: &'a str,
    /// `--etcd-servers-overrides` entries, e.g. `/pods#http://127.0.0.1:2479`.
    pub overrides: Vec<String>,
}

pub fn kube_apiserver_args(flags: &KubeApiserverFlags) -> Vec<String> {
    let mut args = vec![
        "--bind-address=127.0.0.1".to_string(),
        format!("--secure-port={}", flags.port),
        format!("--cert-dir={}", flags.dir.join("certs").display()),
        format!(
            "--token-auth-file={}",
            flags.dir.join("tokens.csv").display()
        ),
        "--authorization-mode=RBAC".into(),
        format!("--etcd-servers={}", flags.etcd),
        format!(
            "--service-account-key-file={}",
            flags.service_account_public_key.display()
        ),
        format!(
            "--service-account-signing-key-file={}",
            flags.service_account_key.display()
        ),
        "--service-account-issuer=https://kubernetes.default.svc".into(),
        "--service-cluster-ip-range=10.0.0.0/16".into(),
        // No kubelet mounts tokens here (kwok is the kubelet).
        "--disable-admission-plugins=ServiceAccount".into(),
    ];
    if !flags.overrides.is_empty() {
        args.push(format!(
            "--etcd-servers-overrides={}",
            flags.overrides.join(",")
        ));
    }
    args
}

/// An RSA service-account key pair (openssl), as kube-apiserver and the controller-manager need.
pub fn service_account_keys(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let key = dir.join("sa.key");
    let public = dir.join("sa.pub");
    for args in [
        vec![
            "genrsa".to_string(),
            "-out".into(),
            key.display().to_string(),
            "2048".into(),
        ],
        vec![
            "rsa".into(),
            "-pubout".into(),
            "-in".into(),
            key.display().to_string(),
            "-out".into(),
            public.display().to_string(),
        ],
    ] {
        let status = Command::new("openssl")
            .args(&args)
            .stderr(Stdio::null())
            .status()
            .map_err(|source| TestkitError::Spawn {
                what: "openssl".into(),
                source,
            })?;
        if !status.success() {
            return Err(TestkitError::Spawn {
                what: format!("openssl {}", args[0]),
                source: std::io::Error::other("openssl failed"),
            });
        }
    }
    Ok((key, public))
}

/// The request shapes kube-apiserver sends, for tests and benchmarks.
pub mod shapes {
    use bytes::Bytes;
    use ste_etcd_proto::pb::{
        compare::{CompareResult, CompareTarget, TargetUnion},
        request_op::Request,
        Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
    };

    /// `ModRevision(key) == revision` (0: the key does not exist).
    pub fn mod_revision_is(key: &Bytes, revision: i64) -> Compare {
        Compare {
            key: key.clone(),
            target: CompareTarget::Mod as i32,
            result: CompareResult::Equal as i32,
            target_union: Some(TargetUnion::ModRevision(revision)),
            ..Default::default()
        }
    }

    pub fn put(key: &Bytes, value: &Bytes) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: key.clone(),
                value: value.clone(),
                ..Default::default()
            })),
        }
    }

    pub fn get(key: &Bytes) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestRange(RangeRequest {
                key: key.clone(),
                ..Default::default()
            })),
        }
    }

    /// Create: put only if the key does not exist.
    pub fn create(key: &Bytes, value: &Bytes) -> TxnRequest {
        TxnRequest {
            compare: vec![mod_revision_is(key, 0)],
            success: vec![put(key, value)],
            failure: vec![],
        }
    }

    /// Delete (kube-apiserver's conditional delete): delete if unchanged since `revision`, else read the current value.
    pub fn delete(key: &Bytes, revision: i64) -> TxnRequest {
        let delete = RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: key.clone(),
                ..Default::default()
            })),
        };
        TxnRequest {
            compare: vec![mod_revision_is(key, revision)],
            success: vec![delete],
            failure: vec![get(key)],
        }
    }

    /// Update (GuaranteedUpdate): put if unchanged since `revision`, else read the current value.
    pub fn update(key: &Bytes, revision: i64, value: &Bytes) -> TxnRequest {
        TxnRequest {
            compare: vec![mod_revision_is(key, revision)],
            success: vec![put(key, value)],
            failure: vec![get(key)],
        }
    }
}

#[cfg(test)]
mod deployment_json_tests {
    #[test]
    fn is_a_deployment_whose_selector_matches_its_pods() {
        let text = super::deployment_json("web", 5);
        let d: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(d["kind"], "Deployment");
        assert_eq!(d["metadata"]["name"], "web");
        assert_eq!(d["spec"]["replicas"], 5);
        assert_eq!(d["spec"]["selector"]["matchLabels"]["app"], "web");
        assert_eq!(d["spec"]["template"]["metadata"]["labels"]["app"], "web");
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["image"],
            "nginx"
        );
    }
}
