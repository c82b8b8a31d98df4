//! Deletes that may span shards (a range, or a lease's keys): every
//! shard's write lock, one global revision, one fenced Txn per shard chunk.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::join_all;
use ste_etcd_proto::mvccpb::KeyValue;
use ste_etcd_proto::pb::{
    request_op::Request, response_op::Response, DeleteRangeRequest, RequestOp, TxnRequest,
};
use tokio::sync::MutexGuard;

use crate::error::{StoreError, StoreResult};
use crate::history::StoredEvent;
use crate::keys::owned_kv;
use crate::placement::index::IndexEntry;
use crate::placement::ring::ShardId;
use crate::shard::kv::{key_fence, translate_kv};
use crate::shard::{Shard, WriteState};
use crate::store::Store;
use crate::txn_shapes::MAX_TXN_OPS;

impl Store {
    /// Deletes every key of the selection, on every shard, at one revision.
    /// Atomic per shard; if a shard fails midway the keys deleted on the
    /// others stay deleted (and are announced) and the caller gets the error.
    pub(crate) async fn delete_many(
        &self,
        selection: Selection,
    ) -> StoreResult<(i64, Vec<KeyValue>)> {
        self.check_open()?;
        let shards = self.shard_list();
        // Every shard, in name order (single-shard writers hold one lock, so no deadlock).
        let mut guards: Vec<(&Arc<Shard>, MutexGuard<'_, WriteState>)> = Vec::new();
        for shard in &shards {
            guards.push((shard, shard.write.lock().await));
        }
        let mut by_shard: BTreeMap<ShardId, Vec<(Bytes, i64)>> = BTreeMap::new();
        {
            let index = self.index.read().expect("index lock");
            let mut add = |key: &Bytes, entry: &IndexEntry| {
                by_shard
                    .entry(entry.shard.clone())
                    .or_default()
                    .push((key.clone(), entry.shard_mod_revision));
            };
            match &selection {
                Selection::Range(from, to) => {
                    let upper = if to.as_ref() == [0] {
                        Bound::Unbounded
                    } else {
                        Bound::Excluded(to.clone())
                    };
                    if matches!(&upper, Bound::Excluded(end) if end <= from) {
                        // An empty range deletes nothing.
                    } else {
                        for (key, entry) in index.range((Bound::Included(from.clone()), upper)) {
                            add(key, entry);
                        }
                    }
                }
                Selection::Lease(id) => {
                    for key in self.leases.keys_of(*id) {
                        if let Some(entry) = index.get(&key) {
                            add(&key, entry);
                        }
                    }
                }
            }
        }
        for (shard, state) in guards.iter_mut() {
            if by_shard.contains_key(&shard.id) {
                shard.require_loaded()?;
                self.ensure_reconciled(shard, state).await?;
            }
        }
        if by_shard.is_empty() {
            let last = guards
                .iter()
                .map(|(_, s)| s.last_revision)
                .max()
                .unwrap_or(0);
            drop(guards);
            return Ok((self.sequencer.wait_published(last).await, Vec::new()));
        }

        let assigned = self.sequencer.assign();
        let g = assigned.first();
        let work = guards
            .iter()
            .filter_map(|(shard, _)| by_shard.get(&shard.id).map(|keys| (*shard, keys)));
        let results = join_all(work.map(|(shard, keys)| async move {
            let mut deleted = Vec::new();
            let mut last_revision = None;
            for chunk in keys.chunks(MAX_TXN_OPS) {
                let request = TxnRequest {
                    compare: chunk
                        .iter()
                        .map(|(key, shard_mod)| key_fence(key, *shard_mod))
                        .collect(),
                    success: chunk
                        .iter()
                        .map(|(key, _)| RequestOp {
                            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                                key: key.clone(),
                                prev_kv: true,
                                ..Default::default()
                            })),
                        })
                        .collect(),
                    failure: Vec::new(),
                };
                match shard.txn(request).await {
                    Ok(answer) if answer.succeeded => {
                        last_revision = answer.header.map(|h| h.revision);
                        for response in answer.responses {
                            if let Some(Response::ResponseDeleteRange(d)) = response.response {
                                deleted.extend(d.prev_kvs);
                            }
                        }
                    }
                    Ok(_) => return (
                        shard,
                        deleted,
                        last_revision,
                        Some(StoreError::unavailable(
                            shard.id.as_str(),
                            "it changed behind the router's back; it is being reconciled, retry",
                        )),
                    ),
                    Err(err) => return (shard, deleted, last_revision, Some(err)),
                }
            }
            (shard, deleted, last_revision, None)
        }))
        .await;

        let mut events = Vec::new();
        let mut all_deleted = Vec::new();
        let mut first_error = None;
        let mut copies_to_delete = Vec::new();
        for (shard, deleted, last_revision, error) in results {
            if let Some(err) = error {
                if let Some((_, state)) = guards.iter_mut().find(|(s, _)| s.id == shard.id) {
                    state.needs_reconcile = true;
                    shard.note_reconcile(state);
                }
                first_error.get_or_insert(err);
            }
            let Some(shard_revision) = last_revision else {
                continue;
            };
            for kv in deleted {
                let kv = owned_kv(translate_kv(&shard.id, kv)?);
                if let Some(removed) = self.index.write().expect("index lock").remove(&kv.key) {
                    self.values.forget(&kv.key, &self.metrics);
                    self.leases.reattach(&kv.key, removed.meta.lease, 0);
                    if let Some(replica) = removed.replica {
                        copies_to_delete.push((replica, kv.key.clone(), removed.meta.mod_revision));
                    }
                }
                events.push(Arc::new(StoredEvent::delete(
                    kv.key.clone(),
                    g,
                    Some(kv.clone()),
                )));
                all_deleted.push(kv);
            }
            shard
                .cuts
                .lock()
                .expect("cuts lock")
                .push(g, shard_revision);
            if let Some((_, state)) = guards.iter_mut().find(|(s, _)| s.id == shard.id) {
                state.last_revision = g;
            }
        }
        // etcd orders the events of one revision by key.
        events.sort_by(|a, b| a.key().cmp(b.key()));
        all_deleted.sort_by(|a, b| a.key.cmp(&b.key));
        self.metrics.events_written(events.len());
        assigned.publish(events);
        drop(guards);
        self.delete_copies(copies_to_delete).await;
        self.compact_overflow();
        self.sequencer.wait_published(g).await;
        match first_error {
            Some(err) => Err(err),
            None => Ok((g, all_deleted)),
        }
    }
}

pub(crate) enum Selection {
    Range(Bytes, Bytes),
    Lease(i64),
}
