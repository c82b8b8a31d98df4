//! ste-router: an etcd v3 server that spreads keys over single-member RAM
//! etcd shards and presents one revision space.
//!
//! Where things are (docs/router.md, "Code layout"):
//! - `api/`: one file per etcd service (KV, Watch, Lease, Maintenance, Cluster);
//! - `txn_shapes`: which Txn shapes are accepted, and the errors for the rest;
//! - `store/`: the narrow interface the services call, one file per phase;
//! - `revision/`: where a revision comes from, and when it becomes visible;
//! - `history/`: where watch events come from, and compaction;
//! - `placement/`: where a key is placed (ring) and where it is (index);
//! - `shard/`: how a shard etcd is reached (`ShardClient`), fences, cuts, scans;
//! - `ring_changes/`: shards joining, draining, lost; `replication/`: copies;
//! - `membership/`: which shards are members; `leader`: one writer at a time;
//! - `serve/`: the gRPC server (a connection's calls on its own task);
//! - `keys`, `envelope`, `leases`, `retry`, `admin`, `metrics`, `tls`.

pub mod admin;
pub mod api;
pub mod coalesce;
pub mod envelope;
pub mod error;
pub mod history;
pub mod keys;
pub mod leader;
pub mod leases;
pub mod membership;
pub mod metrics;
pub mod placement;
pub mod replication;
pub mod retry;
pub mod revision;
pub mod ring_changes;
pub mod serve;
pub mod shard;
pub mod store;
pub mod tls;
pub mod txn_shapes;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ste_etcd_proto::pb::{
    cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use error::{StoreError, StoreResult};
/// `ste_router::ring` (the ring is part of `placement`).
pub use placement::ring;
pub use shard::ShardSpec;
pub use store::{Store, StoreConfig};

#[derive(Clone, Debug)]
pub struct RouterConfig {
    pub store: StoreConfig,
    pub shards: Vec<ShardSpec>,
    /// Interval of progress notifications for watches that ask for them.
    pub progress_interval: Duration,
    /// Interval of shard health checks, reconciliation and lease expiry.
    pub maintain_interval: Duration,
    /// Serve the etcd API over TLS (client certificates required when a CA is given).
    pub server_tls: Option<tls::ServerTls>,
    /// Registered shards: where they come from and when one is lost.
    pub membership: membership::MembershipConfig,
    /// One writer at a time across routers (None: this router is the only one).
    pub leader: Option<leader::LeaderConfig>,
    /// Also serve the etcd API on this Unix socket (a kube-apiserver on the
    /// same host); bound while this router serves, removed when it stops.
    pub listen_unix: Option<std::path::PathBuf>,
    /// How client connections are served (where their calls run).
    pub serve: serve::ServeOptions,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            store: StoreConfig::default(),
            shards: Vec::new(),
            progress_interval: Duration::from_secs(600),
            maintain_interval: Duration::from_millis(500),
            server_tls: None,
            membership: membership::MembershipConfig::default(),
            leader: None,
            listen_unix: None,
            serve: serve::ServeOptions::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("no shards given: pass at least one with --shards (or watch Shard registrations with --watch-shards)")]
    NoShards,
    #[error(transparent)]
    Membership(#[from] membership::MembershipError),
    #[error(transparent)]
    Leader(#[from] leader::LeaderError),
    #[error("opening the store failed: {0}")]
    Store(#[from] StoreError),
    #[error("admin server failed: {0}")]
    Admin(#[from] std::io::Error),
}

/// Accepted connections, with Nagle's algorithm off: gRPC sends small
/// frames and waits for answers, so a delayed ACK would add ~40 ms to each.
/// The listener is shared: a router that loses leadership keeps its port.
fn incoming(
    listener: Arc<TcpListener>,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.and_then(|(stream, _)| {
            stream.set_nodelay(true)?;
            Ok(stream)
        });
        Some((accepted, listener))
    })
}

/// Serves `services` on a Unix socket at `path` (a stale socket file from an
/// earlier run is replaced) until `stop`, then removes the file. Plain
/// gRPC: a local peer is trusted by the socket's file permissions.
fn serve_unix<H: serve::Health>(
    services: serve::Services<H>,
    options: serve::ServeOptions,
    path: &std::path::Path,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, RouterError> {
    let bind_error = |e: std::io::Error| {
        RouterError::Admin(std::io::Error::new(
            e.kind(),
            format!("binding the Unix socket {}: {e}", path.display()),
        ))
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_error(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(bind_error)?;
    info!(path = %path.display(), "ste-router serving etcd v3 gRPC on a Unix socket");
    let path = path.to_path_buf();
    Ok(tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        serve::serve(incoming, services, options, stop).await;
        let _ = std::fs::remove_file(&path);
    }))
}

/// `run_until`, stopped when `shutdown` completes.
pub async fn run(
    config: RouterConfig,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    let token = CancellationToken::new();
    let cancel = token.clone();
    let signal = tokio::spawn(async move {
        shutdown.await;
        cancel.cancel();
    });
    let result = run_until(config, listener, admin, token).await;
    signal.abort();
    result
}

/// Serves the router on `listener` (gRPC) and `admin` (HTTP) until
/// `shutdown`, the process's one cancellation token, is cancelled: streams
/// end, the server stops, leadership is released. With leader election
/// configured, only the leader serves the etcd API; the others wait for
/// leadership and refuse connections meanwhile.
pub async fn run_until(
    config: RouterConfig,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), RouterError> {
    let listener = Arc::new(listener);
    let slot = admin::Slot::default();
    let admin_task = match admin {
        Some(admin) => {
            let app = admin::router(slot.clone());
            info!(address = %admin.local_addr()?, "admin server listening");
            let stopped = shutdown.clone().cancelled_owned();
            Some(tokio::spawn(async move {
                if let Err(err) = axum::serve(admin, app)
                    .with_graceful_shutdown(stopped)
                    .await
                {
                    warn!(error = %err, "admin server stopped");
                }
            }))
        }
        None => None,
    };
    let result = match config.leader.clone() {
        None => serve(config, listener, slot, shutdown.child_token()).await,
        Some(leader) => elect_and_serve(config, leader, listener, slot, shutdown).await,
    };
    if let Some(task) = admin_task {
        task.abort();
    }
    info!("ste-router stopped");
    result
}

/// Standby until the election key is ours, then leader until it is lost
/// (back to standby) or `shutdown` (leadership is released for a standby).
async fn elect_and_serve(
    config: RouterConfig,
    leader: leader::LeaderConfig,
    listener: Arc<TcpListener>,
    slot: admin::Slot,
    shutdown: CancellationToken,
) -> Result<(), RouterError> {
    let mut elector = leader::Elector::new(leader.clone())?;
    loop {
        // Follower: connections are refused at once, so clients go elsewhere.
        let refuse = {
            let listener = listener.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    drop(stream);
                }
            })
        };
        slot.set_follower(&leader.identity);
        let epoch = loop {
            match elector.try_acquire_or_renew().await {
                Ok(leader::Role::Leader { epoch }) => break Some(epoch),
                Ok(leader::Role::Follower) => {}
                Err(err) => warn!(error = %err, "leader election failed; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(leader.retry_period) => {}
                _ = shutdown.cancelled() => break None,
            }
        };
        refuse.abort();
        let Some(epoch) = epoch else { return Ok(()) };

        let deposed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tenure = Arc::new(leader::Tenure::new(
            elector
                .last_renewed()
                .unwrap_or_else(std::time::Instant::now),
            leader.renew_deadline,
        ));
        let mut leading = config.clone();
        leading.store.fencing = Some(shard::Fencing {
            epoch,
            deposed: deposed.clone(),
            tenure: tenure.clone(),
        });
        // This term's token: cancelled when it steps down or the process stops.
        let term = shutdown.child_token();
        let serving = serve(leading, listener.clone(), slot.clone(), term.clone());
        let mut serving = std::pin::pin!(serving);
        let keep_leading = async {
            loop {
                tokio::time::sleep(leader.retry_period).await;
                if deposed.load(std::sync::atomic::Ordering::Acquire) {
                    return "a shard's fence shows a newer leader";
                }
                match elector.try_acquire_or_renew().await {
                    Ok(leader::Role::Leader { epoch: renewed }) if renewed == epoch => {
                        if let Some(at) = elector.last_renewed() {
                            tenure.renewed_at(at);
                        }
                    }
                    Ok(_) => return "another router holds the election key",
                    Err(err) if !elector.within_renew_deadline() => {
                        warn!(error = %err, "cannot renew leadership");
                        return "leadership could not be renewed in time";
                    }
                    Err(err) => warn!(error = %err, "renewing leadership failed; retrying"),
                }
            }
        };
        let stepped_down = tokio::select! {
            result = &mut serving => { result?; return Ok(()); }
            reason = keep_leading => Some(reason),
            _ = shutdown.cancelled() => None,
        };
        tenure.end();
        term.cancel();
        serving.await?;
        match stepped_down {
            Some(reason) => {
                warn!(epoch, reason, "no longer the leader: stopped serving");
                // Whatever is left of this epoch is of no use: let others take over.
                elector.release().await;
            }
            None => {
                elector.release().await;
                return Ok(());
            }
        }
    }
}

/// Opens the store and serves the etcd API until `stop` is cancelled.
async fn serve(
    config: RouterConfig,
    listener: Arc<TcpListener>,
    slot: admin::Slot,
    stop: CancellationToken,
) -> Result<(), RouterError> {
    let mut shards = config.shards.clone();
    for remembered in membership::load_cache(config.membership.cache_file.as_ref())? {
        if !shards.iter().any(|s| s.id == remembered.id) {
            shards.push(remembered);
        }
    }
    if shards.is_empty() && config.membership.kube.is_none() {
        return Err(RouterError::NoShards);
    }
    let metrics = Arc::new(metrics::Metrics::default());
    let store = Store::open(config.store.clone(), &shards, metrics).await?;
    let membership = membership::Membership::new(store.clone(), config.membership.clone());
    let membership_task = tokio::spawn(membership.clone().run());
    slot.set_serving(store.clone(), membership.clone());
    let scheme = if config.server_tls.is_some() {
        "https"
    } else {
        "http"
    };
    let client_url = format!("{scheme}://{}", listener.local_addr()?);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;

    let maintainer = {
        let store = store.clone();
        let interval = config.maintain_interval;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = ticker.tick() => store.maintain().await,
                    _ = stop.cancelled() => return,
                }
            }
        })
    };

    {
        let store = store.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            // End long-lived streams first, or the graceful shutdown would wait for them.
            store.shutdown();
        });
    }

    let member_id = config.store.member_id;
    info!(address = %client_url, shards = shards.len(), "ste-router serving etcd v3 gRPC");
    let services = serve::Services {
        kv: KvServer::new(api::kv::KvService {
            store: store.clone(),
        })
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX),
        watch: WatchServer::new(api::watch::WatchService {
            store: store.clone(),
            progress_interval: config.progress_interval,
        })
        .max_encoding_message_size(usize::MAX),
        lease: LeaseServer::new(api::lease::LeaseService {
            store: store.clone(),
        }),
        maintenance: MaintenanceServer::new(api::maintenance::MaintenanceService {
            store: store.clone(),
        }),
        cluster: ClusterServer::new(api::cluster::ClusterService {
            store: store.clone(),
            member_id,
            client_url,
        }),
        health: health_service,
    };
    // The server stops once the store is closed (its streams are ended by then).
    let unix = match &config.listen_unix {
        Some(path) => Some(serve_unix(
            services.clone(),
            config.serve,
            path,
            store.closing(),
        )?),
        None => None,
    };
    match &config.server_tls {
        Some(tls) => {
            serve::serve(
                tls.incoming(listener),
                services,
                config.serve,
                store.closing(),
            )
            .await
        }
        None => serve::serve(incoming(listener), services, config.serve, store.closing()).await,
    }
    if let Some(unix) = unix {
        // Stopped with the store; its socket file goes with it.
        let _ = unix.await;
    }
    maintainer.abort();
    membership_task.abort();
    store.shutdown();
    slot.clear();
    Ok(())
}
