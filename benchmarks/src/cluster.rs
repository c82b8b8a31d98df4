//! `ste-bench cluster up|down`: a real local control plane on 127.0.0.1, in
//! one of two arms. `stock`: one durable etcd (on disk, fsync on) holds
//! everything. `ste`: the durable etcd holds everything but pods (and, with
//! `--events-to-ste`, events), which kube-apiserver stores through ste-router
//! over N RAM etcd shards (`--etcd-servers-overrides`). Both: kube-apiserver,
//! kube-controller-manager, kube-scheduler and kwok with M fake Ready nodes.
//!
//! Processes outlive the command (their own process group, logs in D/logs);
//! `down` stops exactly the ones `up` recorded in D/cluster.json.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ste_testkit::{
    free_port, kube_apiserver_args, service_account_keys, upstream_binary, KubeApiserverFlags,
};

const KWOK_STAGES: &str = include_str!("../../hack/kwok/stages.yaml");
const TOKEN: &str = "ste-admin-token";
/// Environment variable with kube-apiserver's klog verbosity (`-v`) for
/// every cluster the benchmarks bring up; unset: its default (0).
pub const APISERVER_VERBOSITY_ENV: &str = "STE_KUBE_APISERVER_VERBOSITY";

pub use crate::arms::Arm;
use crate::arms::Environment;
use crate::record::default_namespace;
pub use crate::record::{ClusterRecord, ProcessRecord};
use k8s_openapi::api::core::v1::Node;

#[derive(clap::Args, Clone, Debug)]
pub struct UpArgs {
    /// Which storage arm to start.
    #[arg(long, value_enum, env = "STE_CLUSTER_ARM", default_value = "ste")]
    pub arm: Arm,
    /// RAM etcd shards behind the router (ste arm).
    #[arg(long, env = "STE_CLUSTER_SHARDS", default_value_t = 3)]
    pub shards: usize,
    /// Fake (kwok) nodes, all Ready.
    #[arg(long, env = "STE_CLUSTER_NODES", default_value_t = 100)]
    pub nodes: usize,
    /// Store events through the router too (ste arm).
    #[arg(long, env = "STE_CLUSTER_EVENTS_TO_STE")]
    pub events_to_ste: bool,
    /// Client QPS and burst of kube-controller-manager and kube-scheduler
    /// (Kubernetes' defaults are 20/30 and 50/100).
    #[arg(long, env = "STE_CLUSTER_CLIENT_QPS")]
    pub client_qps: Option<u32>,
    /// Delay added to every fsync/fdatasync of the durable etcd (e.g. 8ms),
    /// injected with strace; this VM's disk makes fsync nearly free, cloud
    /// block storage does not.
    #[arg(long, env = "STE_CLUSTER_FSYNC_DELAY", value_parser = humantime::parse_duration)]
    pub fsync_delay: Option<Duration>,
    /// Environment variables added to kube-apiserver's, NAME=VALUE (comma
    /// separated), e.g. KUBE_WATCHCACHE_CONSISTENCY_CHECKER=true; kept when
    /// it is restarted by `crash_and_restart`.
    #[arg(long, env = "STE_CLUSTER_APISERVER_ENV", value_delimiter = ',', value_parser = parse_env_var)]
    pub apiserver_env: Vec<(String, String)>,
    /// kube-apiserver binary to run instead of the pinned upstream build
    /// (target/upstream/bin/kube-apiserver, or STE_KUBE_APISERVER_BIN), e.g.
    /// target/upstream/bin/kube-apiserver-checked (the same server with its
    /// watch-cache consistency check period read from
    /// STE_WATCHCACHE_CHECK_PERIOD, see hack/k8s/kube-apiserver-checked);
    /// `crash_and_restart` restarts the binary that was started.
    #[arg(long, env = "STE_CLUSTER_APISERVER_BIN")]
    pub apiserver_bin: Option<PathBuf>,
    /// kube-apiserver's audit log of every write (create, update, patch,
    /// delete, deletecollection; metadata only) in D/audit.log, JSON lines,
    /// written in batches ([`crate::audit`]); reads are not logged.
    #[arg(long, env = "STE_CLUSTER_AUDIT")]
    pub audit: bool,
    /// Directory for data, logs, PID records and the kubeconfig.
    #[arg(long, env = "STE_CLUSTER_DIR", default_value = "target/cluster")]
    pub dir: PathBuf,
}

fn parse_env_var(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("{text:?} is not NAME=VALUE")),
    }
}

/// Shards registered by ste-shard-agent processes (ste arm), besides the
/// static bootstrap shard(s): the router watches `Shard` objects.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AgentArgs {
    /// ste-shard-agent processes to start (ste arm), each with a RAM etcd
    /// under /dev/shm, registered as `Shard` shard-agent-<i>; with any, the
    /// router runs with --watch-shards (lost after 10s) and the Shard CRD is
    /// applied. 0: static shards only.
    #[arg(long, env = "STE_CLUSTER_SHARD_AGENTS", default_value_t = 0)]
    pub shard_agents: usize,
}

/// `cluster up`'s flags: [`UpArgs`] and [`AgentArgs`].
#[derive(clap::Args, Clone, Debug)]
pub struct UpCommand {
    #[command(flatten)]
    pub up: UpArgs,
    #[command(flatten)]
    pub agents: AgentArgs,
    #[command(flatten)]
    pub real: crate::real_node::RealNodeArgs,
    #[command(flatten)]
    pub topology: crate::arms::Topology,
}

impl UpArgs {
    /// `arm` with `shards` and `nodes` kwok nodes in `dir`, everything else
    /// as Kubernetes ships it: no fsync delay, default client limits, events
    /// in the durable etcd, the built kube-apiserver.
    pub fn plain(arm: Arm, shards: usize, nodes: usize, dir: PathBuf) -> UpArgs {
        UpArgs {
            arm,
            shards,
            nodes,
            events_to_ste: false,
            client_qps: None,
            fsync_delay: None,
            apiserver_env: Vec::new(),
            apiserver_bin: None,
            audit: false,
            dir,
        }
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct DownArgs {
    /// The directory given to `cluster up`.
    #[arg(long, env = "STE_CLUSTER_DIR", default_value = "target/cluster")]
    pub dir: PathBuf,
}

struct Launcher {
    dir: PathBuf,
    record: ClusterRecord,
}

impl Launcher {
    fn log(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    fn spawn(&mut self, name: &str, binary: &Path, args: &[String]) -> anyhow::Result<()> {
        self.spawn_with_env(name, binary, args, &[])
    }

    /// [`Self::spawn`] with `env` added to the inherited environment.
    fn spawn_with_env(
        &mut self,
        name: &str,
        binary: &Path,
        args: &[String],
        env: &[(String, String)],
    ) -> anyhow::Result<()> {
        use std::os::unix::process::CommandExt;
        let log_path = self.log(name);
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new(binary)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: Ctrl-C on `cluster up` must not stop the cluster.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name} ({})", binary.display()))?;
        let record = ProcessRecord {
            name: name.to_string(),
            pid: child.id(),
            binary: binary.display().to_string(),
            args: args.to_vec(),
            env: env.to_vec(),
            log: log_path,
        };
        match self.record.processes.iter_mut().find(|p| p.name == name) {
            Some(existing) => *existing = record,
            None => self.record.processes.push(record),
        }
        self.save()?;
        Ok(())
    }

    fn save(&self) -> anyhow::Result<()> {
        std::fs::write(
            self.dir.join("cluster.json"),
            serde_json::to_string_pretty(&self.record)?,
        )?;
        Ok(())
    }

    fn alive(&self, name: &str) -> bool {
        self.record.pid_of(name).is_some_and(process_alive)
    }

    /// Waits for `check`, failing early if the process died, and naming its log.
    async fn wait<F>(
        &self,
        name: &str,
        within: Duration,
        mut check: impl FnMut() -> F,
    ) -> anyhow::Result<()>
    where
        F: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + within;
        loop {
            if check().await {
                return Ok(());
            }
            if !self.alive(name) {
                bail!(
                    "{name} exited during startup; see {}",
                    self.log(name).display()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{name} was not ready within {}s; see {}",
                    within.as_secs(),
                    self.log(name).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A RAM etcd (no fsync; tuned's store, override's, each STE shard): its
    /// TCP endpoint, and the one the store's client dials — with
    /// `local_socket`, the Unix socket it also serves beside its data
    /// directory (`unix:///…/<name>.sock`).
    fn start_ram_store(
        &mut self,
        name: &str,
        data: &Path,
        local_socket: bool,
        gomaxprocs: u16,
    ) -> anyhow::Result<(String, String)> {
        let socket = local_socket.then(|| data.with_extension("sock"));
        let members = [(name.to_string(), data.to_path_buf())];
        let env = crate::arms::Topology::gomaxprocs_env(gomaxprocs);
        let tcp = self
            .start_etcd_members(&members, true, None, socket.as_deref(), &env)?
            .remove(0);
        let dial = match &socket {
            Some(path) => format!("unix://{}", path.display()),
            None => tcp.clone(),
        };
        Ok((tcp, dial))
    }

    /// Starts one etcd cluster of `members` (name, data directory) on
    /// loopback, each with its own client and peer ports; returns their
    /// client URLs.
    fn start_etcd_members(
        &mut self,
        members: &[(String, PathBuf)],
        ram: bool,
        fsync_delay: Option<Duration>,
        socket: Option<&Path>,
        env: &[(String, String)],
    ) -> anyhow::Result<Vec<String>> {
        let ports: Vec<(u16, u16)> = members.iter().map(|_| (free_port(), free_port())).collect();
        let initial_cluster = members
            .iter()
            .zip(&ports)
            .map(|((name, _), (_, peer))| format!("{name}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut endpoints = Vec::new();
        for ((name, data), (client, peer)) in members.iter().zip(&ports) {
            let endpoint = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut args = vec![
                format!("--name={name}"),
                format!("--data-dir={}", data.display()),
                match socket {
                    // etcd 3.6 creates the socket at an absolute unix:/// path.
                    Some(path) => {
                        format!("--listen-client-urls={endpoint},unix://{}", path.display())
                    }
                    None => format!("--listen-client-urls={endpoint}"),
                },
                format!("--advertise-client-urls={endpoint}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster={initial_cluster}"),
                "--initial-cluster-state=new".into(),
                "--log-level=warn".into(),
                "--quota-backend-bytes=4294967296".into(),
            ];
            if ram {
                args.push("--unsafe-no-fsync".into());
            }
            self.spawn_etcd(name, args, fsync_delay, env)?;
            endpoints.push(endpoint);
        }
        Ok(endpoints)
    }

    /// etcd with `args`, under strace when each fsync is to be delayed.
    fn spawn_etcd(
        &mut self,
        name: &str,
        args: Vec<String>,
        fsync_delay: Option<Duration>,
        env: &[(String, String)],
    ) -> anyhow::Result<()> {
        let etcd = upstream_binary("etcd", "STE_ETCD_BIN")?;
        let Some(delay) = fsync_delay else {
            return self.spawn_with_env(name, &etcd, &args, env);
        };
        // Only fsync and fdatasync are stopped, each for `delay` on exit.
        let us = delay.as_micros();
        let mut traced = vec![
            "-f".to_string(),
            "--seccomp-bpf".into(),
            "-qq".into(),
            "-o".into(),
            "/dev/null".into(),
            "-e".into(),
            "trace=fdatasync,fsync".into(),
            "-e".into(),
            format!("inject=fdatasync:delay_exit={us}"),
            "-e".into(),
            format!("inject=fsync:delay_exit={us}"),
            etcd.display().to_string(),
        ];
        traced.extend(args);
        let strace =
            which("strace").context("--fsync-delay needs strace (apt-get install strace)")?;
        self.spawn_with_env(name, &strace, &traced, env)
    }

    /// The durable etcd: `members` processes named etcd-main, etcd-main-1, …
    /// with their data under the cluster directory; returns the client URLs.
    fn start_durable(
        &mut self,
        members: usize,
        fsync_delay: Option<Duration>,
    ) -> anyhow::Result<Vec<String>> {
        let members: Vec<(String, PathBuf)> = (0..members)
            .map(|i| {
                let name = durable_member_name(i);
                let data = self.dir.join(&name);
                (name, data)
            })
            .collect();
        let endpoints = self.start_etcd_members(&members, false, fsync_delay, None, &[])?;
        self.record.durable_etcd = endpoints.clone();
        self.save()?;
        Ok(endpoints)
    }
}

/// Process name of the durable etcd's i-th member: etcd-main, etcd-main-1, …
pub fn durable_member_name(i: usize) -> String {
    if i == 0 {
        "etcd-main".into()
    } else {
        format!("etcd-main-{i}")
    }
}

/// A directory of its own on the RAM disk (/dev/shm, or under `dir` where
/// there is none): several clusters may run at once (tests do).
fn ram_directory(dir: &Path, prefix: &str) -> anyhow::Result<PathBuf> {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        dir.to_path_buf()
    };
    Ok(tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&base)
        .with_context(|| format!("creating a directory in {}", base.display()))?
        .keep())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
}

fn process_alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped) is not alive, once all its threads are
    // gone: after SIGKILL the main thread shows as a zombie while the other
    // threads still exit, and the process's sockets stay open until the last
    // one has (a restart on the same port then failed with "Address already
    // in use", 9 times in 20 on etcd).
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    });
    match zombie {
        Err(_) => false,
        Ok(false) => true,
        Ok(true) => {
            std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| tasks.count() > 1)
        }
    }
}

fn http_ok(url: &str) -> bool {
    Command::new("curl")
        .args(["-skf", "--max-time", "2", url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Process (and Shard) names of the shard agents: shard-agent-<i>.
pub const SHARD_AGENT_PREFIX: &str = "shard-agent-";
const SHARD_CRD: &str = include_str!("../../manifests/00-crd-shards.yaml");

fn shard_agent_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("STE_SHARD_AGENT_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    // Beside ste-bench, or one level up from a test binary (target/<profile>/deps).
    let candidates = [
        exe.with_file_name("ste-shard-agent"),
        exe.parent()
            .and_then(|p| p.parent())
            .map(|p| p.join("ste-shard-agent"))
            .unwrap_or_default(),
    ];
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .context("ste-shard-agent not found next to ste-bench: build it (cargo build -p ste-shard-agent) or set STE_SHARD_AGENT_BIN")
}

/// Applies the Shard CRD and starts `n` ste-shard-agent processes with RAM
/// data dirs, waiting until the router has taken each shard in.
async fn start_shard_agents(
    launcher: &mut Launcher,
    n: usize,
    gomaxprocs: u16,
) -> anyhow::Result<()> {
    eprintln!("• the Shard CRD and {n} ste-shard-agent(s)");
    let kubeconfig = launcher.record.kubeconfig.display().to_string();
    let crd = launcher.dir.join("crd-shards.yaml");
    std::fs::write(&crd, SHARD_CRD)?;
    let kubectl = upstream_binary("kubectl", "STE_KUBECTL_BIN")?;
    let out = Command::new(&kubectl)
        .args(["--kubeconfig", &kubeconfig, "apply", "-f"])
        .arg(&crd)
        .output()?;
    if !out.status.success() {
        bail!(
            "applying the Shard CRD: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let shards = kube::Api::<kube::api::DynamicObject>::all_with(
        crate::api::client_for(&launcher.record)?,
        &crate::api::resource("ste.dev", "v1alpha1", "Shard", "shards"),
    );
    launcher
        .wait("kube-apiserver", Duration::from_secs(60), || {
            let shards = shards.clone();
            async move {
                shards
                    .list(&kube::api::ListParams::default().limit(1))
                    .await
                    .is_ok()
            }
        })
        .await?;
    let ram = launcher
        .record
        .ram_dir
        .clone()
        .context("the ste arm has a RAM directory")?;
    let etcd = upstream_binary("etcd", "STE_ETCD_BIN")?;
    let binary = shard_agent_binary()?;
    for i in 0..n {
        let name = format!("{SHARD_AGENT_PREFIX}{i}");
        let args = vec![
            "run".to_string(),
            format!("--shard-name={name}"),
            format!("--node-name={name}"),
            format!("--etcd-binary={}", etcd.display()),
            format!("--data-dir={}", ram.join(&name).join("data").display()),
            format!("--listen-client=http://127.0.0.1:{}", free_port()),
            format!("--listen-peer=http://127.0.0.1:{}", free_port()),
            format!("--admin-listen=127.0.0.1:{}", free_port()),
            format!("--kubeconfig={kubeconfig}"),
            "--heartbeat-interval=2s".into(),
            format!("--etcd-gomaxprocs={gomaxprocs}"),
        ];
        launcher.spawn(&name, &binary, &args)?;
    }
    let admin = launcher
        .record
        .router_admin
        .clone()
        .context("the router's admin address")?;
    for i in 0..n {
        let name = format!("{SHARD_AGENT_PREFIX}{i}");
        launcher
            .wait(&name, Duration::from_secs(60), || {
                std::future::ready(router_members(&admin).is_some_and(|m| m.contains(&name)))
            })
            .await?;
    }
    Ok(())
}

/// Names of the router's members (its admin GET /shards), None if it does not answer.
pub fn router_members(admin: &str) -> Option<Vec<String>> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "2", &format!("{admin}/shards")])
        .output()
        .ok()?;
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        body["shards"]
            .as_array()?
            .iter()
            .filter_map(|s| s["name"].as_str().map(String::from))
            .collect(),
    )
}

fn router_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("STE_ROUTER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let beside = std::env::current_exe()?.with_file_name("ste-router");
    if beside.is_file() {
        return Ok(beside);
    }
    // Test binaries live one level below the binaries (target/<profile>/deps).
    let above = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("ste-router"));
    match above {
        Some(path) if path.is_file() => Ok(path),
        _ => bail!("ste-router not found next to ste-bench: build it (cargo build -p ste-router) or set STE_ROUTER_BIN"),
    }
}

/// Only the durable etcd (`members` members, each fsync delayed by
/// `fsync_delay`) in `dir`, for measuring etcd alone; stop it with [`stop`].
pub async fn durable_etcd_only(
    dir: &Path,
    members: usize,
    fsync_delay: Option<Duration>,
) -> anyhow::Result<ClusterRecord> {
    let dir = std::path::absolute(dir)?;
    for i in 0..5 {
        let _ = std::fs::remove_dir_all(dir.join(durable_member_name(i)));
    }
    std::fs::create_dir_all(dir.join("logs"))?;
    let mut launcher = Launcher {
        dir: dir.clone(),
        record: ClusterRecord {
            arm: Arm::Stock,
            api_url: String::new(),
            token: String::new(),
            kubeconfig: dir.join("kubeconfig"),
            router: None,
            router_admin: None,
            processes: Vec::new(),
            ram_dir: None,
            ram_etcd: None,
            durable_etcd: Vec::new(),
            namespace: default_namespace(),
            kube_config: None,
        },
    };
    if let Err(err) = launcher.start_durable(members, fsync_delay) {
        let _ = stop(&launcher.record).await;
        return Err(err);
    }
    Ok(launcher.record)
}

pub async fn up(args: &UpArgs) -> anyhow::Result<ClusterRecord> {
    up_with(args, &AgentArgs::default()).await
}

/// [`up`] with shard agents (see [`AgentArgs`]).
pub async fn up_with(args: &UpArgs, agents: &AgentArgs) -> anyhow::Result<ClusterRecord> {
    up_with_real(args, agents, &crate::real_node::RealNodeArgs::default()).await
}

/// [`up_with`] and real nodes (see [`crate::real_node`]).
pub async fn up_with_real(
    args: &UpArgs,
    agents: &AgentArgs,
    real: &crate::real_node::RealNodeArgs,
) -> anyhow::Result<ClusterRecord> {
    up_full(args, agents, real, &crate::arms::Topology::default()).await
}

/// [`up_with_real`] with the durable etcd's members and the router's
/// replication factor (see [`crate::arms::Topology`]).
pub async fn up_full(
    args: &UpArgs,
    agents: &AgentArgs,
    real: &crate::real_node::RealNodeArgs,
    topology: &crate::arms::Topology,
) -> anyhow::Result<ClusterRecord> {
    if agents.shard_agents > 0 && args.arm != Arm::Ste {
        bail!("--shard-agents needs the ste arm");
    }
    if args.arm == Arm::Ste && args.shards == 0 {
        bail!("--shards must be at least 1 for the ste arm");
    }
    if args.arm == Arm::Ste && usize::from(topology.replication_factor) > args.shards {
        bail!(
            "--replication-factor {} needs at least as many --shards ({})",
            topology.replication_factor,
            args.shards
        );
    }
    if args.arm == Arm::Tuned && topology.etcd_members != 1 {
        bail!("the tuned arm has one RAM etcd: --etcd-members must be 1");
    }
    let dir = std::path::absolute(&args.dir)?;
    if let Ok(existing) = read_record(&dir) {
        if existing.processes.iter().any(|p| process_alive(p.pid)) {
            bail!(
                "a cluster is already up in {}; run `ste-bench cluster down --dir {}` first",
                dir.display(),
                args.dir.display()
            );
        }
    }
    // The durable etcd's members start empty.
    for i in 0..5 {
        let path = dir.join(durable_member_name(i));
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
    }
    std::fs::create_dir_all(dir.join("logs"))?;
    let api_port = free_port();
    let mut launcher = Launcher {
        dir: dir.clone(),
        record: ClusterRecord {
            arm: args.arm,
            api_url: format!("https://127.0.0.1:{api_port}"),
            token: TOKEN.into(),
            kubeconfig: dir.join("kubeconfig"),
            router: None,
            router_admin: None,
            processes: Vec::new(),
            ram_dir: None,
            ram_etcd: None,
            durable_etcd: Vec::new(),
            namespace: default_namespace(),
            kube_config: None,
        },
    };
    let result = start_all(&mut launcher, args, agents, real, topology, api_port).await;
    if let Err(err) = result {
        eprintln!("startup failed, stopping what was started…");
        if let Err(e) = crate::real_node::down(&dir).await {
            eprintln!("{e:#}");
        }
        let _ = stop(&launcher.record).await;
        return Err(err);
    }
    Ok(launcher.record)
}

async fn start_all(
    launcher: &mut Launcher,
    args: &UpArgs,
    agents: &AgentArgs,
    real: &crate::real_node::RealNodeArgs,
    topology: &crate::arms::Topology,
    api_port: u16,
) -> anyhow::Result<()> {
    let dir = launcher.dir.clone();
    let step = |text: &str| eprintln!("• {text}");

    let durable = if args.arm == Arm::Tuned {
        step("etcd on a RAM disk, no fsync");
        let ram = ram_directory(&dir, "ste-tuned-")?;
        launcher.record.ram_dir = Some(ram.clone());
        // --local-sockets is for the pod store; tuned's one etcd stays on TCP.
        let (endpoint, _) = launcher.start_ram_store("etcd-main", &ram.join("etcd"), false, 0)?;
        // Tuned's one etcd holds what the durable etcd holds on other arms.
        launcher.record.durable_etcd = vec![endpoint.clone()];
        endpoint
    } else {
        step(&format!(
            "durable etcd (on disk, fsync on), {} member(s)",
            topology.etcd_members
        ));
        launcher
            .start_durable(topology.etcd_members, args.fsync_delay)?
            .join(",")
    };
    let mut overrides = Vec::new();
    if args.arm == Arm::Override {
        step("override: pods and events in one etcd on a RAM disk, no fsync");
        let ram = ram_directory(&dir, "ste-override-")?;
        launcher.record.ram_dir = Some(ram.clone());
        let (endpoint, dial) = launcher.start_ram_store(
            "etcd-override",
            &ram.join("etcd"),
            topology.local_sockets,
            topology.override_gomaxprocs,
        )?;
        overrides.push(format!("/pods#{dial}"));
        overrides.push(format!("/events#{dial}"));
        launcher.record.ram_etcd = Some(endpoint);
        launcher.save()?;
    }
    if args.arm == Arm::Ste {
        step(&format!("{} RAM etcd shard(s) and ste-router", args.shards));
        let ram = ram_directory(&dir, "ste-shards-")?;
        launcher.record.ram_dir = Some(ram.clone());
        let mut shard_specs = Vec::new();
        for i in 0..args.shards {
            let name = format!("shard-{i}");
            let (_, dial) = launcher.start_ram_store(
                &name,
                &ram.join(&name),
                topology.local_sockets,
                topology.shard_gomaxprocs,
            )?;
            shard_specs.push(format!("{name}={dial}"));
        }
        let listen = format!("127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let mut router_args = vec![
            format!("--listen={listen}"),
            format!("--admin-listen={admin}"),
            format!("--shards={}", shard_specs.join(",")),
            format!("--replication-factor={}", topology.replication_factor),
        ];
        // kube-apiserver dials the router's socket; the TCP listener stays
        // for the bench's own clients.
        let store = if topology.local_sockets {
            let socket = ram.join("router.sock");
            router_args.push(format!("--listen-unix={}", socket.display()));
            format!("unix://{}", socket.display())
        } else {
            format!("http://{listen}")
        };
        if agents.shard_agents > 0 {
            // The kubeconfig exists before kube-apiserver does: the router
            // serves pods first, and its Shard watcher retries until the API is up.
            write_kubeconfig(&launcher.record)?;
            router_args.extend([
                "--watch-shards".to_string(),
                format!("--kubeconfig={}", launcher.record.kubeconfig.display()),
                format!("--membership-cache={}", dir.join("members.json").display()),
                "--shard-lost-after=10s".into(),
            ]);
        }
        launcher.spawn("ste-router", &router_binary()?, &router_args)?;
        let ready = format!("http://{admin}/readyz");
        launcher
            .wait("ste-router", Duration::from_secs(60), || {
                std::future::ready(http_ok(&ready))
            })
            .await?;
        overrides.push(format!("/pods#{store}"));
        if args.events_to_ste {
            overrides.push(format!("/events#{store}"));
        }
        launcher.record.router = Some(format!("http://{listen}"));
        launcher.record.router_admin = Some(format!("http://{admin}"));
        launcher.save()?;
    }

    step("kube-apiserver");
    let (key, public) = service_account_keys(&dir)?;
    std::fs::write(
        dir.join("tokens.csv"),
        format!("{TOKEN},admin,admin,system:masters\n"),
    )?;
    let api_args = kube_apiserver_args(&KubeApiserverFlags {
        port: api_port,
        dir: &dir,
        service_account_key: &key,
        service_account_public_key: &public,
        etcd: &durable,
        overrides,
    });
    let mut api_args = api_args;
    // Log verbosity of kube-apiserver (klog -v), e.g. 3 to see why it ends
    // watches; set for every command that brings a cluster up.
    if let Ok(level) = std::env::var(APISERVER_VERBOSITY_ENV) {
        let level: u8 = level.trim().parse().with_context(|| {
            format!("{APISERVER_VERBOSITY_ENV}={level:?} is not a klog level (0-10)")
        })?;
        api_args.push(format!("-v={level}"));
    }
    if real.real_nodes > 0 {
        crate::real_node::apiserver_args(&dir, &mut api_args)?;
    }
    if args.audit {
        api_args.extend(crate::audit::apiserver_args(&dir)?);
    }
    let apiserver = match &args.apiserver_bin {
        Some(path) if path.is_file() => std::path::absolute(path)?,
        Some(path) => bail!("--apiserver-bin {}: no such file", path.display()),
        None => upstream_binary("kube-apiserver", "STE_KUBE_APISERVER_BIN")?,
    };
    launcher.spawn_with_env("kube-apiserver", &apiserver, &api_args, &args.apiserver_env)?;
    let client = crate::api::client_for(&launcher.record)?;
    launcher
        .wait("kube-apiserver", Duration::from_secs(120), || {
            let client = client.clone();
            async move { readyz(&client).await }
        })
        .await?;
    write_kubeconfig(&launcher.record)?;
    if agents.shard_agents > 0 {
        start_shard_agents(launcher, agents.shard_agents, topology.shard_gomaxprocs).await?;
    }

    step("kube-controller-manager and kube-scheduler");
    let kubeconfig = launcher.record.kubeconfig.display().to_string();
    // What both need: the admin kubeconfig for everything, one instance, loopback.
    let common = || {
        vec![
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--leader-elect=false".to_string(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", free_port()),
        ]
    };
    let mut kcm = common();
    kcm.extend([
        format!("--service-account-private-key-file={}", key.display()),
        "--use-service-account-credentials=false".into(),
        // No cloud, no real node IPAM: the rest of the controllers run as in any cluster.
        "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller".into(),
    ]);
    if real.real_nodes > 0 {
        kcm.extend(crate::real_node::controller_manager_args(&dir));
    }
    let mut scheduler = common();
    if let Some(qps) = args.client_qps {
        kcm.push(format!("--kube-api-qps={qps}"));
        kcm.push(format!("--kube-api-burst={}", qps + qps / 2));
        scheduler.push(format!("--kube-api-qps={qps}"));
        scheduler.push(format!("--kube-api-burst={}", qps * 2));
    }
    launcher.spawn(
        "kube-controller-manager",
        &upstream_binary("kube-controller-manager", "STE_KCM_BIN")?,
        &kcm,
    )?;
    launcher.spawn(
        "kube-scheduler",
        &upstream_binary("kube-scheduler", "STE_KUBE_SCHEDULER_BIN")?,
        &scheduler,
    )?;

    step(&format!("kwok and {} fake node(s)", args.nodes));
    let stages = dir.join("kwok-stages.yaml");
    std::fs::write(&stages, KWOK_STAGES)?;
    let kwok = vec![
        format!("--kubeconfig={kubeconfig}"),
        format!("--config={}", stages.display()),
        // With real nodes, kwok must leave them (and their pods) to their kubelets.
        if real.real_nodes > 0 {
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake"
        } else {
            "--manage-all-nodes=true"
        }
        .into(),
        format!("--server-address=127.0.0.1:{}", free_port()),
        "--cidr=10.244.0.1/16".into(),
        "--node-ip=10.0.0.2".into(),
        // Without node leases kube-controller-manager marks every node
        // NotReady ~50 s after start (and their pods not Ready).
        "--node-lease-duration-seconds=40".into(),
    ];
    launcher.spawn("kwok", &upstream_binary("kwok", "STE_KWOK_BIN")?, &kwok)?;
    let nodes_api = kube::Api::<Node>::all(crate::api::client_for(&launcher.record)?);
    for i in 0..args.nodes {
        let node = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {
                "name": format!("kwok-node-{i}"),
                "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {"type": "kwok", "kubernetes.io/hostname": format!("kwok-node-{i}")}
            },
            "status": {
                "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"}
            }
        });
        let node: Node = serde_json::from_value(node)?;
        match nodes_api
            .create(&kube::api::PostParams::default(), &node)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("creating node kwok-node-{i}")))
            }
        }
    }
    let nodes = args.nodes;
    launcher
        .wait("kwok", Duration::from_secs(120), || {
            let nodes_api = nodes_api.clone();
            async move { ready_nodes(&nodes_api).await.is_ok_and(|n| n >= nodes) }
        })
        .await?;
    if real.real_nodes > 0 {
        crate::real_node::start(&dir, &launcher.record.api(), real).await?;
    }
    // The controllers must be serving too before anyone relies on them.
    for name in ["kube-controller-manager", "kube-scheduler"] {
        if !launcher.alive(name) {
            bail!("{name} exited; see {}", launcher.log(name).display());
        }
    }
    launcher.save()?;
    Ok(())
}

/// Nodes whose Ready condition is True.
pub async fn ready_nodes(nodes: &kube::Api<Node>) -> anyhow::Result<usize> {
    let list = nodes.list(&kube::api::ListParams::default()).await?;
    Ok(list
        .items
        .iter()
        .filter(|node| {
            node.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count())
}

/// Whether kube-apiserver answers `/readyz` with 200.
async fn readyz(client: &kube::Client) -> bool {
    match http::Request::get("/readyz").body(Vec::new()) {
        Ok(request) => client.request_text(request).await.is_ok(),
        Err(_) => false,
    }
}

fn write_kubeconfig(record: &ClusterRecord) -> anyhow::Result<()> {
    // Everything is on loopback with a self-signed serving certificate.
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: ste-local
  cluster:
    server: {}
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: {}
contexts:
- name: ste-local
  context:
    cluster: ste-local
    user: admin
current-context: ste-local
",
        record.api_url, record.token
    );
    std::fs::write(&record.kubeconfig, text)?;
    Ok(())
}

pub fn read_record(dir: &Path) -> anyhow::Result<ClusterRecord> {
    let path = dir.join("cluster.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("no cluster recorded in {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// Kills one component with SIGKILL (a crash) and starts it again with the
/// same flags; `wipe` first deletes its `--data-dir` (a RAM disk lost with its
/// node). Returns the updated record.
pub async fn crash_and_restart(
    dir: &Path,
    name: &str,
    wipe: bool,
) -> anyhow::Result<ClusterRecord> {
    let dir = std::path::absolute(dir)?;
    let record = read_record(&dir)?;
    let process = record
        .processes
        .iter()
        .find(|p| p.name == name)
        .with_context(|| format!("no component named {name} in {}", dir.display()))?
        .clone();
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", process.pid)])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(process.pid) {
        if Instant::now() >= deadline {
            bail!("{name} (pid {}) did not die", process.pid);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if wipe {
        if let Some(data) = process
            .args
            .iter()
            .find_map(|a| a.strip_prefix("--data-dir="))
        {
            std::fs::remove_dir_all(data).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
        }
    }
    let mut launcher = Launcher { dir, record };
    launcher.spawn_with_env(
        name,
        Path::new(&process.binary),
        &process.args,
        &process.env,
    )?;
    Ok(launcher.record)
}

/// Stops the recorded processes, newest first: SIGTERM, then SIGKILL after 10 s.
pub async fn stop(record: &ClusterRecord) -> anyhow::Result<()> {
    for process in record.processes.iter().rev() {
        // Only a process that still runs the recorded binary (PIDs get reused).
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", process.pid)).unwrap_or_default();
        let binary_name = Path::new(&process.binary)
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if !process_alive(process.pid) || !String::from_utf8_lossy(&cmdline).contains(&binary_name)
        {
            continue;
        }
        // The whole process group: a component may run under strace.
        let group = format!("-{}", process.pid);
        // A shard agent would drain its shard into shards about to stop too:
        // it goes at once (its etcd dies with it; the RAM data goes anyway).
        let signal = if process.name.starts_with(SHARD_AGENT_PREFIX) {
            "-KILL"
        } else {
            "-TERM"
        };
        let _ = Command::new("kill").args([signal, "--", &group]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_alive(process.pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if process_alive(process.pid) {
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        }
        crate::real_node::say(format_args!(
            "stopped {} (pid {})",
            process.name, process.pid
        ));
    }
    if let Some(ram) = &record.ram_dir {
        let _ = std::fs::remove_dir_all(ram);
    }
    Ok(())
}

pub async fn down(args: &DownArgs) -> anyhow::Result<()> {
    let dir = std::path::absolute(&args.dir)?;
    let record = read_record(&dir)?;
    // Real nodes first: their pods are torn down while their runtime runs.
    let real = crate::real_node::down(&dir).await;
    stop(&record).await?;
    real?;
    crate::real_node::say(format_args!(
        "cluster in {} is down; logs kept in {}",
        dir.display(),
        dir.join("logs").display()
    ));
    Ok(())
}

pub fn print_summary(record: &ClusterRecord, dir: &Path) {
    println!("STE local cluster ({:?} arm) is up", record.arm);
    println!("  kubeconfig:     {}", record.kubeconfig.display());
    println!("  kube-apiserver: {}", record.api_url);
    if let (Some(router), Some(admin)) = (&record.router, &record.router_admin) {
        println!("  ste-router:     {router} (admin {admin}/metrics)");
    }
    if let Some(ram) = &record.ram_etcd {
        println!("  RAM etcd:       {ram} (pods and events)");
    }
    println!("  durable etcd:   {}", record.durable_etcd.join(","));
    println!("  logs:           {}", dir.join("logs").display());
    println!(
        "  stop it with:   ste-bench cluster down --dir {}",
        dir.display()
    );
}

/// A started cluster whose drop stops it: the obligation to call [`stop`] as
/// a value, so a test that fails an assertion still leaves nothing running.
/// Dropping it blocks while the processes stop, on a runtime of its own (so
/// it may be dropped inside or outside of one).
pub struct RunningCluster(ClusterRecord);

impl RunningCluster {
    pub fn new(record: ClusterRecord) -> Self {
        Self(record)
    }

    pub fn record(&self) -> &ClusterRecord {
        &self.0
    }
}

impl std::ops::Deref for RunningCluster {
    type Target = ClusterRecord;

    fn deref(&self) -> &ClusterRecord {
        &self.0
    }
}

/// A cluster restarted in place (`crash_and_restart`) is recorded anew.
impl std::ops::DerefMut for RunningCluster {
    fn deref_mut(&mut self) -> &mut ClusterRecord {
        &mut self.0
    }
}

impl Drop for RunningCluster {
    fn drop(&mut self) {
        let record = self.0.clone();
        let _ = std::thread::spawn(move || {
            tokio::runtime::Runtime::new().map(|runtime| runtime.block_on(stop(&record)))
        })
        .join();
    }
}

/// `cluster up`'s arguments for `arm` in `env`: pods and events go to RAM
/// on the override and ste arms alike.
/// `stock-qps` is a stock cluster with raised client limits.
pub fn arm_up_args(arm: Arm, env: &Environment, dir: PathBuf) -> UpArgs {
    UpArgs {
        arm: if arm == Arm::StockQps {
            Arm::Stock
        } else {
            arm
        },
        shards: env.shards,
        nodes: env.nodes,
        events_to_ste: arm == Arm::Ste,
        client_qps: crate::arms::client_qps(arm, env.client_qps),
        fsync_delay: env.fsync_delay,
        apiserver_env: Vec::new(),
        apiserver_bin: None,
        audit: false,
        dir,
    }
}

/// Starts `arm` in `env` in `dir`, waiting until every component is ready.
pub async fn up_arm(arm: Arm, env: &Environment, dir: PathBuf) -> anyhow::Result<ClusterRecord> {
    up_full(
        &arm_up_args(arm, env, dir),
        &AgentArgs::default(),
        &crate::real_node::RealNodeArgs::default(),
        &env.topology,
    )
    .await
}
