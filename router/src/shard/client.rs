//! What the router asks of a shard's etcd, and nothing more: Range (at a
//! revision), Txn (with compares), Compact and Status. `Shard` (fences,
//! revision marks, health) sits on top of a `ShardClient`; the etcd
//! implementation speaks gRPC, `memory::MemoryShard` answers from memory for
//! the store's unit tests.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use ste_etcd_proto::pb::{
    kv_client::KvClient, maintenance_client::MaintenanceClient, CompactionRequest,
    CompactionResponse, RangeRequest, RangeResponse, StatusRequest, StatusResponse, TxnRequest,
    TxnResponse,
};
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use super::transport::{Connection, OwnedConnection, Target};
use super::ShardSpec;
use crate::error::{StoreError, StoreResult};

/// A shard answer: etcd's response, or the gRPC status it failed with.
pub type ShardAnswer<'a, T> = BoxFuture<'a, Result<T, Status>>;

/// The four etcd calls the store makes on a shard.
pub trait ShardClient: Send + Sync + 'static {
    fn range(&self, req: RangeRequest) -> ShardAnswer<'_, RangeResponse>;
    /// By reference: the shard sends it (and may send it again) without a copy.
    fn txn<'a>(&'a self, req: &'a TxnRequest) -> ShardAnswer<'a, TxnResponse>;
    fn compact(&self, req: CompactionRequest) -> ShardAnswer<'_, CompactionResponse>;
    fn status(&self) -> ShardAnswer<'_, StatusResponse>;
}

/// Makes the client of a shard from its spec (etcd over gRPC in the router;
/// in-memory shards in unit tests).
pub type Connector =
    Arc<dyn Fn(&ShardSpec) -> StoreResult<Arc<dyn ShardClient>> + Send + Sync + 'static>;

/// How the router speaks gRPC to its shards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ShardTransport {
    /// Its own HTTP/2 connections (`transport`): the default.
    #[default]
    H2,
    /// tonic's `Channel`, as before (kept to measure the difference side by
    /// side: `ste-bench router`); TCP and TLS only.
    Tonic,
}

/// The connector of real shards: gRPC with `timeout` per request and mTLS
/// towards `https://` endpoints, on the router's own HTTP/2 connections
/// (see `transport`) or tonic's `Channel`.
pub fn etcd_connector(
    timeout: Duration,
    tls: Option<crate::tls::ClientTls>,
    transport: ShardTransport,
) -> Connector {
    Arc::new(move |spec: &ShardSpec| {
        let client: Arc<dyn ShardClient> = match transport {
            ShardTransport::H2 => Arc::new(EtcdShard::connect(spec, timeout, tls.as_ref())?),
            ShardTransport::Tonic => Arc::new(TonicShard::connect(spec, timeout, tls.as_ref())?),
        };
        Ok(client)
    })
}

/// A shard's etcd over gRPC: two lazily made HTTP/2 connections. One for
/// the Txns, polled by the task that sends them (see `OwnedConnection`):
/// the shard's committer, so a group commit needs no other task, and a
/// batch never queues behind a large read's frames. A Txn sent while
/// another is on it (a replica copy from another shard's committer, a
/// reconciliation racing a commit) goes on the other connection, which
/// carries everything else and is polled by a task of its own.
pub struct EtcdShard {
    writes: OwnedConnection,
    reads: Connection,
}

impl EtcdShard {
    pub fn connect(
        spec: &ShardSpec,
        timeout: Duration,
        tls: Option<&crate::tls::ClientTls>,
    ) -> StoreResult<Self> {
        let target = Target::parse(&spec.endpoint, tls).map_err(StoreError::Internal)?;
        Ok(EtcdShard {
            writes: OwnedConnection::new(target.clone(), timeout),
            reads: Connection::new(target, timeout),
        })
    }
}

impl ShardClient for EtcdShard {
    fn range(&self, req: RangeRequest) -> ShardAnswer<'_, RangeResponse> {
        Box::pin(async move { self.reads.call("/etcdserverpb.KV/Range", &req).await })
    }

    fn txn<'a>(&'a self, req: &'a TxnRequest) -> ShardAnswer<'a, TxnResponse> {
        const TXN: &str = "/etcdserverpb.KV/Txn";
        match self.writes.try_call(TXN, req) {
            Some(call) => Box::pin(call),
            None => Box::pin(self.reads.call(TXN, req)),
        }
    }

    fn compact(&self, req: CompactionRequest) -> ShardAnswer<'_, CompactionResponse> {
        Box::pin(async move { self.reads.call("/etcdserverpb.KV/Compact", &req).await })
    }

    fn status(&self) -> ShardAnswer<'_, StatusResponse> {
        Box::pin(async move {
            self.reads
                .call("/etcdserverpb.Maintenance/Status", &StatusRequest {})
                .await
        })
    }
}

/// A shard's etcd through tonic's `Channel` (buffer worker task, reconnect
/// layer, hyper's dispatch and per-request body task): the transport before
/// `EtcdShard`, kept for side-by-side measurements.
pub struct TonicShard {
    kv: KvClient<Channel>,
    maintenance: MaintenanceClient<Channel>,
}

impl TonicShard {
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
        Ok(TonicShard {
            kv: KvClient::new(channel.clone())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
            maintenance: MaintenanceClient::new(channel),
        })
    }
}

impl ShardClient for TonicShard {
    fn range(&self, req: RangeRequest) -> ShardAnswer<'_, RangeResponse> {
        let mut kv = self.kv.clone();
        Box::pin(async move { kv.range(req).await.map(tonic::Response::into_inner) })
    }

    fn txn<'a>(&'a self, req: &'a TxnRequest) -> ShardAnswer<'a, TxnResponse> {
        let mut kv = self.kv.clone();
        Box::pin(async move { kv.txn(req.clone()).await.map(tonic::Response::into_inner) })
    }

    fn compact(&self, req: CompactionRequest) -> ShardAnswer<'_, CompactionResponse> {
        let mut kv = self.kv.clone();
        Box::pin(async move { kv.compact(req).await.map(tonic::Response::into_inner) })
    }

    fn status(&self) -> ShardAnswer<'_, StatusResponse> {
        let mut maintenance = self.maintenance.clone();
        Box::pin(async move {
            maintenance
                .status(StatusRequest {})
                .await
                .map(tonic::Response::into_inner)
        })
    }
}
