//! What the router asks of a shard's etcd, and nothing more: Range (at a
//! revision), Txn (with compares), Compact and Status. `Shard` (fences,
//! revision marks, health) sits on top of a `ShardClient`; the etcd
//! implementation speaks gRPC, `memory::MemoryShard` answers from memory for
//! the store's unit tests.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use ste_etcd_proto::pb::{
    CompactionRequest, CompactionResponse, RangeRequest, RangeResponse, StatusRequest,
    StatusResponse, TxnRequest, TxnResponse,
};
use tonic::Status;

use super::transport::{Connection, Target};
use super::ShardSpec;
use crate::error::{StoreError, StoreResult};

/// A shard answer: etcd's response, or the gRPC status it failed with.
pub type ShardAnswer<'a, T> = BoxFuture<'a, Result<T, Status>>;

/// The four etcd calls the store makes on a shard.
pub trait ShardClient: Send + Sync + 'static {
    fn range(&self, req: RangeRequest) -> ShardAnswer<'_, RangeResponse>;
    fn txn(&self, req: TxnRequest) -> ShardAnswer<'_, TxnResponse>;
    fn compact(&self, req: CompactionRequest) -> ShardAnswer<'_, CompactionResponse>;
    fn status(&self) -> ShardAnswer<'_, StatusResponse>;
}

/// Makes the client of a shard from its spec (etcd over gRPC in the router;
/// in-memory shards in unit tests).
pub type Connector =
    Arc<dyn Fn(&ShardSpec) -> StoreResult<Arc<dyn ShardClient>> + Send + Sync + 'static>;

/// The connector of real shards: gRPC on the router's own HTTP/2
/// connections (see `transport`), with `timeout` per request and mTLS
/// towards `https://` endpoints.
pub fn etcd_connector(timeout: Duration, tls: Option<crate::tls::ClientTls>) -> Connector {
    Arc::new(move |spec: &ShardSpec| {
        let client: Arc<dyn ShardClient> =
            Arc::new(EtcdShard::connect(spec, timeout, tls.as_ref())?);
        Ok(client)
    })
}

/// A shard's etcd over gRPC: two lazily made HTTP/2 connections, one for
/// the Txns (only the shard's committer and the write-lock holders send
/// them, so a batch never queues behind a large read's frames) and one for
/// everything else.
pub struct EtcdShard {
    writes: Connection,
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
            writes: Connection::new(target.clone(), timeout),
            reads: Connection::new(target, timeout),
        })
    }
}

impl ShardClient for EtcdShard {
    fn range(&self, req: RangeRequest) -> ShardAnswer<'_, RangeResponse> {
        Box::pin(async move { self.reads.call("/etcdserverpb.KV/Range", &req).await })
    }

    fn txn(&self, req: TxnRequest) -> ShardAnswer<'_, TxnResponse> {
        Box::pin(async move { self.writes.call("/etcdserverpb.KV/Txn", &req).await })
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
