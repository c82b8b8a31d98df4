//! One shard: its client, its write lock (one write in flight, so the shard
//! commits in global revision order), and its revision cuts.

mod cuts;

pub use cuts::{CutLookup, Cuts};

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use ste_etcd_proto::pb::{
    kv_client::KvClient, maintenance_client::MaintenanceClient, CompactionRequest, RangeRequest,
    RangeResponse, StatusRequest, StatusResponse, TxnRequest, TxnResponse,
};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::error::{StoreError, StoreResult};
use crate::ring::ShardId;

/// How the router reaches one shard.
#[derive(Clone, Debug)]
pub struct ShardSpec {
    pub id: ShardId,
    pub endpoint: String,
    pub origin: Origin,
}

impl ShardSpec {
    /// Parses `name=http://host:port` or a bare URL (then the URL is the name).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (name, endpoint) = match text.split_once('=') {
            Some((name, endpoint)) => (name.trim(), endpoint.trim()),
            None => (text, text),
        };
        if name.is_empty() {
            return Err(format!("shard {text:?} has an empty name"));
        }
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(format!(
                "shard endpoint {endpoint:?} must start with http:// or https://"
            ));
        }
        endpoint
            .parse::<tonic::transport::Uri>()
            .map_err(|e| format!("shard endpoint {endpoint:?} is not a valid URL: {e}"))?;
        Ok(ShardSpec {
            id: ShardId::new(name),
            endpoint: endpoint.to_string(),
            origin: Origin::Static,
        })
    }
}

/// State only the holder of the shard's write lock may touch.
#[derive(Debug, Default)]
pub struct WriteState {
    /// A write failed in a way that leaves its outcome unknown, or the shard
    /// was unreachable: the router's index must be checked against the shard
    /// before the next write.
    pub needs_reconcile: bool,
    /// The last global revision committed on this shard.
    pub last_revision: i64,
}

/// Where a shard's membership comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `--shards`: operator-managed (e.g. the bootstrap shard); never declared lost.
    Static,
    /// A `Shard` registration (or the admin API): joins, drains and may be declared lost.
    Registered,
}

pub struct Shard {
    pub id: ShardId,
    pub endpoint: String,
    pub origin: Origin,
    /// Out of the ring: its keys are being moved off (drain or removal).
    draining: AtomicBool,
    /// Since when health checks fail (None while healthy).
    unhealthy_since: Mutex<Option<std::time::Instant>>,
    /// The global revision from which the shard holds nothing and is not
    /// read (0: still a member).
    pub removed_at: AtomicI64,
    /// Bytes in use in its backend, from the last health check.
    pub db_bytes: AtomicI64,
    kv: KvClient<Channel>,
    maintenance: MaintenanceClient<Channel>,
    pub write: tokio::sync::Mutex<WriteState>,
    /// Txns waiting for the next group commit (see `Store::txn`).
    pub queue: Mutex<std::collections::VecDeque<crate::store::PendingTxn>>,
    pub cuts: Mutex<Cuts>,
    /// The shard's keys are in the index. Until then every request that may
    /// touch it answers Unavailable rather than a result that misses keys.
    loaded: AtomicBool,
    healthy: AtomicBool,
    /// (cluster id, member id) of the etcd answering: a new one means the
    /// shard was recreated and lost its data.
    identity: Mutex<Option<(u64, u64)>>,
}

impl Shard {
    pub fn connect(
        spec: &ShardSpec,
        timeout: Duration,
        tls: Option<&crate::tls::ClientTls>,
    ) -> StoreResult<Self> {
        let endpoint = Endpoint::from_shared(spec.endpoint.clone())
            .map_err(|e| StoreError::unavailable(spec.id.as_str(), e))?
            .connect_timeout(timeout.min(Duration::from_secs(2)))
            .timeout(timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(timeout);
        let channel = match (spec.endpoint.starts_with("https://"), tls) {
            (false, _) => endpoint.connect_lazy(),
            (true, Some(tls)) => {
                let tls = tls.clone();
                endpoint.connect_with_connector_lazy(tower::service_fn(move |uri| {
                    let tls = tls.clone();
                    async move { tls.connect(&uri).await }
                }))
            }
            (true, None) => {
                return Err(StoreError::Internal(format!(
                    "shard {} is at an https:// URL but no shard CA is configured (--shard-ca-file)",
                    spec.id
                )))
            }
        };
        Ok(Shard {
            id: spec.id.clone(),
            endpoint: spec.endpoint.clone(),
            origin: spec.origin,
            draining: AtomicBool::new(false),
            unhealthy_since: Mutex::new(None),
            removed_at: AtomicI64::new(0),
            db_bytes: AtomicI64::new(0),
            kv: KvClient::new(channel.clone())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
            maintenance: MaintenanceClient::new(channel),
            write: tokio::sync::Mutex::new(WriteState::default()),
            queue: Mutex::new(std::collections::VecDeque::new()),
            cuts: Mutex::new(Cuts::unloaded()),
            loaded: AtomicBool::new(false),
            healthy: AtomicBool::new(false),
            identity: Mutex::new(None),
        })
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    pub fn set_loaded(&self, loaded: bool) {
        self.loaded.store(loaded, Ordering::Release);
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
        let mut since = self.unhealthy_since.lock().expect("unhealthy lock");
        match (healthy, *since) {
            (true, _) => *since = None,
            (false, None) => *since = Some(std::time::Instant::now()),
            (false, Some(_)) => {}
        }
    }

    /// How long health checks have been failing without a break.
    pub fn unhealthy_for(&self) -> Option<Duration> {
        self.unhealthy_since
            .lock()
            .expect("unhealthy lock")
            .map(|since| since.elapsed())
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Release);
    }

    pub fn require_loaded(&self) -> StoreResult<()> {
        if self.is_loaded() {
            Ok(())
        } else {
            Err(StoreError::unavailable(
                self.id.as_str(),
                "its keys are not loaded yet (shard unreachable since the router started or rejoined)",
            ))
        }
    }

    pub async fn range(&self, mut req: RangeRequest) -> StoreResult<RangeResponse> {
        // A shard is a single member written only by the router, which reads
        // after its writes were applied: a serializable read sees them all,
        // without the Raft read-index round a linearizable read pays.
        req.serializable = true;
        let result = self.kv.clone().range(req).await;
        self.answer(result)
    }

    pub async fn txn(&self, req: TxnRequest) -> StoreResult<TxnResponse> {
        let result = self.kv.clone().txn(req).await;
        self.answer(result)
    }

    pub async fn compact(&self, shard_revision: i64) -> StoreResult<()> {
        let result = self
            .kv
            .clone()
            .compact(CompactionRequest {
                revision: shard_revision,
                physical: false,
            })
            .await;
        self.answer(result).map(|_| ())
    }

    pub async fn status(&self) -> StoreResult<StatusResponse> {
        let result = self.maintenance.clone().status(StatusRequest {}).await;
        let answer = self.answer(result);
        self.set_healthy(answer.is_ok());
        if let Ok(status) = &answer {
            self.db_bytes.store(status.db_size_in_use, Ordering::Relaxed);
        }
        answer
    }

    /// Health check; Ok(true) when the etcd answering is not the one seen
    /// before (it was recreated, e.g. its RAM disk was lost).
    pub async fn check(&self) -> StoreResult<bool> {
        let status = self.status().await?;
        let header = status.header.unwrap_or_default();
        let seen = (header.cluster_id, header.member_id);
        let mut identity = self.identity.lock().expect("identity lock");
        // Only the router writes to a shard, so its revision never goes back
        // unless the data is gone (a recreated etcd may keep the same ids).
        let went_back = self
            .cuts
            .lock()
            .expect("cuts lock")
            .latest_shard_revision()
            .is_some_and(|last| header.revision < last);
        let replaced = went_back || identity.is_some_and(|known| known != seen);
        *identity = Some(seen);
        Ok(replaced)
    }

    fn answer<T>(&self, result: Result<tonic::Response<T>, Status>) -> StoreResult<T> {
        match result {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(self.classify(status)),
        }
    }

    /// Errors that are the request's fault pass through with etcd's own
    /// message; everything else means the shard cannot serve right now.
    fn classify(&self, status: Status) -> StoreError {
        match status.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition | Code::NotFound
            | Code::ResourceExhausted => StoreError::ShardRejected(status),
            _ => {
                self.set_healthy(false);
                StoreError::unavailable(self.id.as_str(), status.message())
            }
        }
    }
}

/// True when a failed shard write certainly did not change the shard.
pub fn write_certainly_not_applied(err: &StoreError) -> bool {
    matches!(err, StoreError::ShardRejected(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_specs_parse_with_and_without_names() {
        let named = ShardSpec::parse("a=http://127.0.0.1:2380").unwrap();
        assert_eq!((named.id.as_str(), named.endpoint.as_str()), ("a", "http://127.0.0.1:2380"));
        let bare = ShardSpec::parse(" http://127.0.0.1:2381 ").unwrap();
        assert_eq!(bare.id.as_str(), "http://127.0.0.1:2381");
        assert!(ShardSpec::parse("127.0.0.1:2380").unwrap_err().contains("http://"));
        assert!(ShardSpec::parse("=http://x:1").unwrap_err().contains("empty name"));
    }
}
