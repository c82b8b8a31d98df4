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
use crate::shard::queue::PendingTxn;
use crate::shard::{Shard, WriteState};
use crate::store::Store;
use crate::txn_shapes::{self, show_key};

use crate::store::delete::Selection;
use crate::store::write::plan::Batch;

mod commit;
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
        let store = self.clone();
        self.detached(async move { store.txn_on_one_shard(req, keys).await })
            .await
    }

    /// Queues the txn on its shard and commits it in a group: whoever holds
    /// the shard's write lock commits everything queued so far as one shard
    /// Txn (group commit), so a shard takes one round trip per batch instead
    /// of one per write, while each write keeps its own global revision.
    async fn txn_on_one_shard(
        self: Arc<Self>,
        req: TxnRequest,
        keys: BTreeSet<Bytes>,
    ) -> StoreResult<TxnResponse> {
        let committed = loop {
            let shard = self.single_shard_for(&keys)?;
            let (reply, answer) = oneshot::channel();
            shard
                .queue
                .lock()
                .expect("queue lock")
                .push_back(PendingTxn {
                    req: req.clone(),
                    keys: keys.clone(),
                    reply,
                });
            {
                let mut state = shard.write.lock().await;
                let queued: Vec<PendingTxn> =
                    shard.queue.lock().expect("queue lock").drain(..).collect();
                if !queued.is_empty() {
                    self.commit_queued(&shard, &mut state, queued).await;
                }
            }
            match answer
                .await
                .map_err(|_| StoreError::Internal("write dropped before commit".into()))?
            {
                // A move took the keys elsewhere before this write was planned: nothing was written.
                Err(StoreError::Moved) => continue,
                other => break other?,
            }
        };
        self.sequencer.wait_published(committed.visible_at).await;
        let mut response = committed.response;
        // A write answers at its own revision, a read-only txn at the revision
        // its reads saw (etcd's header is the revision the data was read at;
        // a later one would be ahead of the data).
        set_revision(&mut response, committed.visible_at, &self);
        self.compact_overflow();
        Ok(response)
    }

    /// Plans the queued txns in order and commits them in batches; a txn
    /// that touches a key written earlier in the batch starts the next batch.
    async fn commit_queued(&self, shard: &Shard, state: &mut WriteState, queued: Vec<PendingTxn>) {
        if let Err(err) = self.ensure_reconciled(shard, state).await {
            for pending in queued {
                let _ = pending.reply.send(Err(err.clone()));
            }
            return;
        }
        let mut batch = Batch::default();
        for pending in queued {
            match self.single_shard_for(&pending.keys) {
                Ok(placed) if placed.id == shard.id => {}
                Ok(_) => {
                    let _ = pending.reply.send(Err(StoreError::Moved));
                    continue;
                }
                Err(err) => {
                    let _ = pending.reply.send(Err(err));
                    continue;
                }
            }
            if !batch.accepts(&pending) {
                self.commit_batch(shard, state, std::mem::take(&mut batch))
                    .await;
            }
            match self.plan_txn(shard, &pending.req).await {
                Ok(plan) => batch.add(pending, plan),
                Err(err) => {
                    let _ = pending.reply.send(Err(err));
                }
            }
        }
        if !batch.items.is_empty() {
            self.commit_batch(shard, state, batch).await;
        }
    }

    /// The shard of all `keys`, or the error naming them if they are on several.
    fn single_shard_for(&self, keys: &BTreeSet<Bytes>) -> StoreResult<Arc<Shard>> {
        let mut placed: BTreeMap<ShardId, Vec<&Bytes>> = BTreeMap::new();
        let mut first = None;
        for key in keys {
            let shard = self.shard_for_key(key)?;
            placed.entry(shard.id.clone()).or_default().push(key);
            first.get_or_insert(shard);
        }
        if placed.len() > 1 {
            let detail = placed
                .iter()
                .map(|(shard, keys)| {
                    let keys: Vec<String> = keys.iter().map(|k| show_key(k)).collect();
                    format!("{} on shard {}", keys.join(", "), shard)
                })
                .collect::<Vec<_>>()
                .join("; ");
            return Err(StoreError::CrossShard(detail));
        }
        let shard = first.expect("keys is not empty");
        shard.require_loaded()?;
        Ok(shard)
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
