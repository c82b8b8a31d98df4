//! Writes: every put, single-key delete and txn is queued on its shard and
//! committed in a group (`commit`) after being planned against the index
//! (`plan`); each write keeps its own global revision.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use ste_etcd_proto::pb::{
    request_op::Request, response_op::Response, DeleteRangeRequest, DeleteRangeResponse,
    PutRequest, PutResponse, RequestOp, TxnRequest, TxnResponse,
};
use tokio::sync::oneshot;

use crate::error::{StoreError, StoreResult};
use crate::keys::RESERVED_PREFIX;
use crate::placement::ring::ShardId;
use crate::shard::queue::{PendingTxn, Reply};
use crate::shard::{Shard, WriteState};
use crate::store::Store;
use crate::txn_shapes::{self, show_key};

use crate::store::delete::Selection;
use crate::store::write::plan::Batch;

mod commit;
mod committer;
pub(crate) mod plan;

impl Store {
    /// Runs a write to completion even if the caller goes away: a revision,
    /// once assigned, must always be finished or publication would stall.
    pub(crate) async fn detached<T, F>(self: &Arc<Self>, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = StoreResult<T>> + Send + 'static,
    {
        tokio::spawn(work)
            .await
            .map_err(|e| StoreError::Internal(format!("write task failed: {e}")))?
    }

    pub async fn put(self: &Arc<Self>, req: PutRequest) -> StoreResult<PutResponse> {
        let txn = TxnRequest {
            success: vec![RequestOp {
                request: Some(Request::RequestPut(req)),
            }],
            ..Default::default()
        };
        let mut resp = self.txn(txn).await?;
        let prev_kv = match resp.responses.pop().and_then(|r| r.response) {
            Some(Response::ResponsePut(put)) => put.prev_kv,
            _ => None,
        };
        Ok(PutResponse {
            header: resp.header,
            prev_kv,
        })
    }

    pub async fn delete_range(
        self: &Arc<Self>,
        req: DeleteRangeRequest,
    ) -> StoreResult<DeleteRangeResponse> {
        if req.key.is_empty() {
            return Err(StoreError::EmptyKey);
        }
        if req.range_end.is_empty() {
            let txn = TxnRequest {
                success: vec![RequestOp {
                    request: Some(Request::RequestDeleteRange(req)),
                }],
                ..Default::default()
            };
            let mut resp = self.txn(txn).await?;
            return match resp.responses.pop().and_then(|r| r.response) {
                Some(Response::ResponseDeleteRange(mut delete)) => {
                    delete.header = resp.header;
                    Ok(delete)
                }
                _ => Err(StoreError::Internal("delete produced no response".into())),
            };
        }
        let store = self.clone();
        self.detached(async move {
            let (revision, deleted) = store
                .delete_many(Selection::Range(req.key.clone(), req.range_end.clone()))
                .await?;
            Ok(DeleteRangeResponse {
                header: Some(store.header(revision)),
                deleted: deleted.len() as i64,
                prev_kvs: if req.prev_kv { deleted } else { Vec::new() },
            })
        })
        .await
    }

    pub async fn txn(self: &Arc<Self>, req: TxnRequest) -> StoreResult<TxnResponse> {
        self.check_open()?;
        let keys = txn_shapes::txn_keys(&req)?;
        if let Some(reserved) = keys.iter().find(|k| k.as_ref() >= RESERVED_PREFIX) {
            return Err(StoreError::Unsupported(format!(
                "keys from 0xffffffff 'ste/' on (like {}): ste-router keeps its own data there",
                show_key(reserved)
            )));
        }
        if keys.is_empty() {
            // Nothing to read or write: only the (empty) compares decide.
            return Ok(TxnResponse {
                header: Some(self.header(self.sequencer.published())),
                succeeded: true,
                responses: Vec::new(),
            });
        }
        // No task of its own: the shard's committer finishes the write
        // (and its revision) even if this caller goes away.
        self.txn_on_one_shard(req, keys).await
    }

    /// Queues the txn on its shard's committer and waits for its answer:
    /// the committer commits everything queued so far as one shard Txn
    /// (group commit), so a shard takes one round trip per batch instead of
    /// one per write, while each write keeps its own global revision.
    async fn txn_on_one_shard(
        self: &Arc<Self>,
        mut req: TxnRequest,
        mut keys: BTreeSet<Bytes>,
    ) -> StoreResult<TxnResponse> {
        let committed = loop {
            let shard = self.single_shard_for(&keys)?;
            let (reply, answer) = oneshot::channel();
            self.enqueue(&shard, PendingTxn { req, keys, reply });
            match answer
                .await
                .map_err(|_| StoreError::Internal("write dropped before commit".into()))?
            {
                Reply::Done(result) => break result?,
                // A move took the keys elsewhere before this write was planned: nothing was written.
                Reply::Moved(r, k) => (req, keys) = (r, k),
            }
        };
        self.sequencer.wait_published(committed.visible_at).await;
        let mut response = committed.response;
        // A write answers at its own revision, a read-only txn at the revision
        // its reads saw (etcd's header is the revision the data was read at;
        // a later one would be ahead of the data).
        set_revision(&mut response, committed.visible_at, self);
        self.compact_overflow();
        Ok(response)
    }

    /// Plans the queued txns in order and commits them in batches; a txn
    /// that touches a key written earlier in the batch starts the next batch.
    pub(crate) async fn commit_queued(
        &self,
        shard: &Shard,
        state: &mut WriteState,
        queued: Vec<PendingTxn>,
    ) {
        if let Err(err) = self.ensure_reconciled(shard, state).await {
            for pending in queued {
                pending.answer(Err(err.clone()));
            }
            return;
        }
        let mut batch = Batch::default();
        for pending in queued {
            match self.single_shard_for(&pending.keys) {
                Ok(placed) if placed.id == shard.id => {}
                Ok(_) => {
                    pending.moved();
                    continue;
                }
                Err(err) => {
                    pending.answer(Err(err));
                    continue;
                }
            }
            if !batch.accepts(&pending) {
                self.commit_batch(shard, state, std::mem::take(&mut batch))
                    .await;
            }
            match self.plan_txn(shard, &pending.req).await {
                Ok(plan) => batch.add(pending, plan),
                Err(err) => pending.answer(Err(err)),
            }
        }
        if !batch.items.is_empty() {
            self.commit_batch(shard, state, batch).await;
        }
    }

    /// The shard of all `keys`, or the error naming them if they are on several.
    fn single_shard_for(&self, keys: &BTreeSet<Bytes>) -> StoreResult<Arc<Shard>> {
        let mut keys_iter = keys.iter();
        let first = keys_iter.next().expect("keys is not empty");
        let shard = self.shard_for_key(first)?;
        for key in keys_iter {
            if self.shard_for_key(key)?.id != shard.id {
                return Err(self.cross_shard(keys));
            }
        }
        shard.require_loaded()?;
        Ok(shard)
    }

    /// The error for a txn whose keys are on several shards, naming them.
    fn cross_shard(&self, keys: &BTreeSet<Bytes>) -> StoreError {
        let mut placed: BTreeMap<ShardId, Vec<String>> = BTreeMap::new();
        for key in keys {
            if let Ok(shard) = self.shard_for_key(key) {
                placed
                    .entry(shard.id.clone())
                    .or_default()
                    .push(show_key(key));
            }
        }
        let detail = placed
            .iter()
            .map(|(shard, keys)| format!("{} on shard {}", keys.join(", "), shard))
            .collect::<Vec<_>>()
            .join("; ");
        StoreError::CrossShard(detail)
    }
}

/// Sets the revision of a txn answer and of every response inside it.
fn set_revision(response: &mut TxnResponse, revision: i64, store: &Store) {
    let header = store.header(revision);
    response.header = Some(header);
    for op in &mut response.responses {
        match &mut op.response {
            Some(Response::ResponseRange(r)) => r.header = Some(header),
            Some(Response::ResponsePut(r)) => r.header = Some(header),
            Some(Response::ResponseDeleteRange(r)) => r.header = Some(header),
            _ => {}
        }
    }
}
