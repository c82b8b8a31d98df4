use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ste_router::leader::LeaderConfig;
use ste_router::membership::MembershipConfig;
use ste_router::tls::{ClientTls, ServerTls, TlsFiles};
use ste_router::{RouterConfig, ShardSpec, StoreConfig};
use tokio::net::TcpListener;

/// ste-router: one etcd, seen from kube-apiserver, over many RAM etcd shards.
///
/// Serves the etcd v3 gRPC API (KV, Watch, Lease, Maintenance.Status,
/// Cluster.MemberList and gRPC health) for the keys kube-apiserver sends it
/// with `--etcd-servers-overrides=/pods#http://<listen>`, spreads them over
/// the shards by consistent hashing, and gives every write one global
/// revision. Shards must be dedicated to the router.
#[derive(Parser, Debug)]
#[command(name = "ste-router", version, about, long_about)]
struct Args {
    /// Address of the etcd gRPC API.
    #[arg(long, env = "STE_ROUTER_LISTEN", default_value = "127.0.0.1:2479")]
    listen: SocketAddr,

    /// Also serve the etcd API on this Unix socket, for a kube-apiserver on
    /// the same host (`--etcd-servers=unix:///path` or an override); the file
    /// exists while this router serves (leader) and is removed when it stops.
    #[arg(long, env = "STE_ROUTER_LISTEN_UNIX")]
    listen_unix: Option<PathBuf>,

    /// Where a client connection's gRPC calls run: `inline` on the
    /// connection's own task (no task per call; the fastest on a small
    /// control plane), or `spawn`, each call on a task of its own (one
    /// connection's calls on several cores at once, as tonic's server did).
    #[arg(
        long,
        env = "STE_ROUTER_REQUEST_TASKS",
        value_enum,
        default_value = "inline"
    )]
    request_tasks: ste_router::serve::RequestTasks,

    /// How to speak gRPC to shards: `h2` (the router's own HTTP/2 connections, one for
    /// writes and one for reads per shard) or `tonic` (tonic's Channel, the transport before;
    /// kept to compare the two in `ste-bench router`).
    #[arg(
        long,
        env = "STE_ROUTER_SHARD_TRANSPORT",
        value_enum,
        default_value = "h2"
    )]
    shard_transport: ste_router::shard::ShardTransport,

    /// Address of the admin HTTP server (/livez, /readyz, /metrics).
    #[arg(
        long,
        env = "STE_ROUTER_ADMIN_LISTEN",
        default_value = "127.0.0.1:2480"
    )]
    admin_listen: SocketAddr,

    /// Shards, comma separated: `name=URL` or a bare URL (then the URL is its name). URL:
    /// `http://host:port`, `https://host:port`, or `unix:///path/to.sock` for an etcd on this
    /// host (etcd: `--listen-client-urls unix:///path/to.sock`).
    /// Placement hashes the name, so keep names stable when addresses change.
    #[arg(
        long,
        env = "STE_ROUTER_SHARDS",
        value_delimiter = ',',
        required_unless_present = "watch_shards"
    )]
    shards: Vec<String>,

    /// Watch `Shard` registrations (shards.ste.dev, written by ste-shard-agent)
    /// through kube-apiserver: registered shards join the ring, drain when their
    /// agent stops, and are declared lost when unreachable. Needs get/list/watch
    /// on shards and patch on shards/status.
    #[arg(long, env = "STE_ROUTER_WATCH_SHARDS")]
    watch_shards: bool,

    /// Kubeconfig for --watch-shards (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, env = "STE_ROUTER_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,

    /// A registered shard unreachable this long, whose agent also stopped
    /// heartbeating, is declared lost: its keys are deleted with DELETE events
    /// so controllers recreate those pods elsewhere.
    #[arg(long, env = "STE_ROUTER_SHARD_LOST_AFTER", default_value = "30s", value_parser = humantime::parse_duration)]
    shard_lost_after: Duration,

    /// Copies of each key. 1: a shard lost with its data loses its keys (they
    /// are deleted with DELETE events, so controllers recreate the pods). 2:
    /// each key also has a copy on a second shard, and losing one shard loses
    /// nothing (every write also writes the copy, in parallel).
    #[arg(long, env = "STE_ROUTER_REPLICATION_FACTOR", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    replication_factor: u8,

    /// Run several routers (one per control-plane node) with one writer:
    /// the leader serves the etcd API, the others refuse connections until
    /// they take over. The election runs in the durable etcd (kube-apiserver's
    /// own: it is up before kube-apiserver, which needs the router to start).
    /// Every shard write is fenced with the leader's epoch, so a router that
    /// lost leadership cannot write.
    #[arg(long, env = "STE_ROUTER_LEADER_ELECT", requires = "leader_elect_etcd")]
    leader_elect: bool,

    /// The durable etcd for the election, e.g. https://127.0.0.1:2379.
    #[arg(long, env = "STE_ROUTER_LEADER_ELECT_ETCD")]
    leader_elect_etcd: Option<String>,

    /// CA bundle of the durable etcd's serving certificate (e.g. /etc/kubernetes/pki/etcd/ca.crt).
    #[arg(long, env = "STE_ROUTER_LEADER_ELECT_ETCD_CA_FILE")]
    leader_elect_etcd_ca_file: Option<PathBuf>,

    /// Client certificate for the durable etcd (e.g. kube-apiserver's apiserver-etcd-client.crt).
    #[arg(
        long,
        env = "STE_ROUTER_LEADER_ELECT_ETCD_CERT_FILE",
        requires = "leader_elect_etcd_key_file"
    )]
    leader_elect_etcd_cert_file: Option<PathBuf>,

    /// Private key of --leader-elect-etcd-cert-file.
    #[arg(
        long,
        env = "STE_ROUTER_LEADER_ELECT_ETCD_KEY_FILE",
        requires = "leader_elect_etcd_cert_file"
    )]
    leader_elect_etcd_key_file: Option<PathBuf>,

    /// The election key in the durable etcd.
    #[arg(
        long,
        env = "STE_ROUTER_LEADER_ELECT_KEY",
        default_value = "/ste/router/leader"
    )]
    leader_elect_key: String,

    /// This router's name in the election (default: $NODE_NAME, else the host name).
    #[arg(long, env = "STE_ROUTER_LEADER_ELECT_IDENTITY")]
    leader_elect_identity: Option<String>,

    /// How long a dead leader blocks a takeover (the TTL of its etcd lease).
    #[arg(long, env = "STE_ROUTER_LEADER_ELECT_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    leader_elect_lease_duration: Duration,

    /// A leader that could not renew for this long stops serving (must be shorter than the lease duration).
    #[arg(long, env = "STE_ROUTER_LEADER_ELECT_RENEW_DEADLINE", default_value = "10s", value_parser = humantime::parse_duration)]
    leader_elect_renew_deadline: Duration,

    /// How often the leader renews and standbys check.
    #[arg(long, env = "STE_ROUTER_LEADER_ELECT_RETRY_PERIOD", default_value = "2s", value_parser = humantime::parse_duration)]
    leader_elect_retry_period: Duration,

    /// File remembering the registered shards across router restarts (loaded
    /// at startup like --shards, so their keys are visible before the
    /// registrations are read again). Keep it on the node's disk.
    #[arg(long, env = "STE_ROUTER_MEMBERSHIP_CACHE")]
    membership_cache: Option<PathBuf>,

    /// Deadline of one request to a shard.
    #[arg(long, env = "STE_ROUTER_SHARD_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    shard_timeout: Duration,

    /// How long startup waits for unreachable shards before serving without them
    /// (their keys answer Unavailable until they are back).
    #[arg(long, env = "STE_ROUTER_LOAD_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    load_timeout: Duration,

    /// Virtual nodes per shard on the hash ring.
    #[arg(long, env = "STE_ROUTER_VNODES", default_value_t = 128)]
    vnodes: u32,

    /// Events kept for watches; older ones are compacted automatically even if
    /// no client compacts (kube-apiserver compacts every 5 minutes).
    #[arg(long, env = "STE_ROUTER_HISTORY_MAX_EVENTS", default_value_t = 200_000)]
    history_max_events: usize,

    /// Memory bound of the value cache, in bytes (keys, values and 256
    /// bytes of bookkeeping per value): single-key reads, a Txn's read of one
    /// key and value compares are answered from it when it holds the key's
    /// current version. 0 turns it off (every read goes to a shard).
    #[arg(long, env = "STE_ROUTER_VALUE_CACHE_BYTES", default_value_t = ste_router::store::DEFAULT_VALUE_CACHE_BYTES)]
    value_cache_bytes: usize,

    /// Threads serving requests. One is the default: a write costs the router
    /// 25–45 µs of CPU, so one core serves 20 000+ writes/s, and with a
    /// second thread each write woke threads 2.5× as often (9 context
    /// switches per write instead of 3.6 at 200 writes/s, 17–29 % more CPU per
    /// write; docs/benchmarks.md, "CPU per write at a churn rate"). Raise it
    /// when one kube-apiserver's pod store needs more than one core.
    #[arg(long, env = "STE_ROUTER_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    worker_threads: u16,

    /// Interval of progress notifications for watches that request them (etcd's default is 10m).
    #[arg(long, env = "STE_ROUTER_PROGRESS_INTERVAL", default_value = "10m", value_parser = humantime::parse_duration)]
    progress_interval: Duration,

    /// Serve the etcd API over TLS with this certificate (PEM). Files are
    /// re-read when they change: a rotated certificate applies to new
    /// connections without a restart.
    #[arg(long, env = "STE_ROUTER_CERT_FILE", requires = "key_file")]
    cert_file: Option<PathBuf>,

    /// The private key of --cert-file (PEM).
    #[arg(long, env = "STE_ROUTER_KEY_FILE", requires = "cert_file")]
    key_file: Option<PathBuf>,

    /// CA bundle (PEM) that signs client certificates: with it, clients
    /// without a valid certificate are refused (kube-apiserver presents its
    /// --etcd-certfile).
    #[arg(long, env = "STE_ROUTER_TRUSTED_CA_FILE", requires = "cert_file")]
    trusted_ca_file: Option<PathBuf>,

    /// CA bundle (PEM) that signs the shards' server certificates; required
    /// for `https://` shards.
    #[arg(long, env = "STE_ROUTER_SHARD_CA_FILE")]
    shard_ca_file: Option<PathBuf>,

    /// Client certificate (PEM) the router presents to shards.
    #[arg(long, env = "STE_ROUTER_SHARD_CERT_FILE", requires_all = ["shard_key_file", "shard_ca_file"])]
    shard_cert_file: Option<PathBuf>,

    /// Name the shards' certificates are checked against, instead of the
    /// host in each shard's URL (worker shards register pod IPs; give their
    /// shared certificate this name, e.g. `ste-shard`).
    #[arg(long, env = "STE_ROUTER_SHARD_SERVER_NAME", requires = "shard_ca_file")]
    shard_server_name: Option<String>,

    /// Private key of --shard-cert-file (PEM).
    #[arg(long, env = "STE_ROUTER_SHARD_KEY_FILE", requires = "shard_cert_file")]
    shard_key_file: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // One TLS implementation for the shards, the etcd API and the Kubernetes client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(usize::from(args.worker_threads))
        .build()
        .context("starting the async runtime")?
        .block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let shards = args
        .shards
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| ShardSpec::parse(s).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()
        .context("invalid --shards")?;
    let server_tls = match &args.cert_file {
        Some(_) => Some(
            ServerTls::load(TlsFiles {
                cert: args.cert_file.clone(),
                key: args.key_file.clone(),
                ca: args.trusted_ca_file.clone(),
            })
            .context("loading the router's TLS files")?,
        ),
        None => None,
    };
    let shard_tls = match &args.shard_ca_file {
        Some(_) => Some(
            ClientTls::load(TlsFiles {
                cert: args.shard_cert_file.clone(),
                key: args.shard_key_file.clone(),
                ca: args.shard_ca_file.clone(),
            })
            .context("loading the TLS files for shards")?
            .with_server_name(args.shard_server_name.clone()),
        ),
        None => None,
    };
    let kube = if args.watch_shards {
        Some(kube_client(args.kubeconfig.as_ref()).await?)
    } else {
        None
    };
    let leader = match (&args.leader_elect_etcd, args.leader_elect) {
        (Some(endpoint), true) => {
            anyhow::ensure!(
                args.leader_elect_renew_deadline < args.leader_elect_lease_duration,
                "--leader-elect-renew-deadline must be shorter than --leader-elect-lease-duration"
            );
            let identity = match &args.leader_elect_identity {
                Some(identity) => identity.clone(),
                None => std::env::var("NODE_NAME")
                    .ok()
                    .filter(|n| !n.is_empty())
                    .or_else(|| {
                        std::fs::read_to_string("/proc/sys/kernel/hostname")
                            .ok()
                            .map(|h| h.trim().to_string())
                    })
                    .context("no --leader-elect-identity, NODE_NAME or host name")?,
            };
            let tls = match &args.leader_elect_etcd_ca_file {
                Some(_) => Some(
                    ClientTls::load(TlsFiles {
                        cert: args.leader_elect_etcd_cert_file.clone(),
                        key: args.leader_elect_etcd_key_file.clone(),
                        ca: args.leader_elect_etcd_ca_file.clone(),
                    })
                    .context("loading the TLS files for the durable etcd")?,
                ),
                None => None,
            };
            anyhow::ensure!(
                !endpoint.starts_with("https://") || tls.is_some(),
                "--leader-elect-etcd is https:// but no --leader-elect-etcd-ca-file is given"
            );
            Some(LeaderConfig {
                endpoint: endpoint.clone(),
                tls,
                key: args.leader_elect_key.clone(),
                identity,
                lease_duration: args.leader_elect_lease_duration,
                renew_deadline: args.leader_elect_renew_deadline,
                retry_period: args.leader_elect_retry_period,
            })
        }
        _ => None,
    };
    let config = RouterConfig {
        server_tls,
        leader,
        membership: MembershipConfig {
            kube,
            lost_after: args.shard_lost_after,
            cache_file: args.membership_cache.clone(),
            ..MembershipConfig::default()
        },
        store: StoreConfig {
            shard_tls,
            replication_factor: args.replication_factor,
            shard_timeout: args.shard_timeout,
            vnodes: args.vnodes,
            history_max_events: args.history_max_events,
            value_cache_bytes: args.value_cache_bytes,
            load_timeout: args.load_timeout,
            shard_transport: args.shard_transport,
            ..StoreConfig::default()
        },
        shards,
        progress_interval: args.progress_interval,
        listen_unix: args.listen_unix.clone(),
        serve: ste_router::serve::ServeOptions {
            requests: args.request_tasks,
            ..Default::default()
        },
        ..RouterConfig::default()
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let admin = TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding {}", args.admin_listen))?;
    // The process's one shutdown token: SIGTERM or Ctrl-C cancels it.
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    ste_router::run_until(config, listener, Some(admin), shutdown).await?;
    Ok(())
}

async fn kube_client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no kubeconfig found (give --kubeconfig, set KUBECONFIG, or run in a cluster)",
        )?,
    };
    kube::Client::try_from(config).context("creating the Kubernetes client")
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C.
async fn cancel_on_signal(shutdown: tokio_util::sync::CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(term) => term,
            Err(err) => {
                tracing::warn!(error = %err, "cannot install the SIGTERM handler; only Ctrl-C stops the router");
                let _ = ctrl_c.await;
                shutdown.cancel();
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    shutdown.cancel();
}
