//! Committing a batch: one block of global revisions, one shard Txn (and
//! the replica copies beside it), then each txn's events and answer.

use std::sync::Arc;

use bytes::Bytes;
use ste_etcd_proto::mvccpb::KeyValue;
use ste_etcd_proto::pb::{
    response_op::Response, DeleteRangeResponse, PutResponse, RangeRequest, ResponseOp, TxnRequest,
    TxnResponse,
};
use tracing::warn;

use crate::error::{StoreError, StoreResult};
use crate::history::StoredEvent;
use crate::keys::{own_key, owned_kv};
use crate::placement::index::{upsert, IndexEntry};
use crate::placement::ring::ShardId;
use crate::shard::kv::translate_kv;
use crate::shard::queue::Committed;
use crate::shard::{write_certainly_not_applied, Shard, WriteState};
use crate::store::Store;

use crate::store::write::plan::{Batch, PlannedOp};

impl Store {
    pub(crate) async fn commit_batch(&self, shard: &Shard, state: &mut WriteState, batch: Batch) {
        let writers = batch.items.iter().filter(|(_, plan)| plan.writes).count() as i64;
        // A block of consecutive revisions, so a read inside the batch can be
        // answered from the shard before it plus the batch's events.
        let mut assigned = (writers > 0).then(|| self.sequencer.assign_block(writers));
        let first = assigned.as_ref().map_or(0, |block| block.first());
        let mut next = first;
        let mut shard_ops = Vec::new();
        let mut fences = Vec::new();
        let mut planned = Vec::with_capacity(batch.items.len());
        for (pending, plan) in batch.items {
            let g = if plan.writes {
                next += 1;
                next - 1
            } else {
                0
            };
            let mut item_plans = Vec::with_capacity(plan.ops.len());
            for op in plan.ops {
                let (item_plan, shard_op, fence) = op.finish(g);
                if let Some(shard_op) = shard_op {
                    shard_ops.push(shard_op);
                }
                fences.extend(fence);
                item_plans.push(item_plan);
            }
            planned.push((pending, plan.succeeded, g, item_plans));
        }
        let last = if writers > 0 { first + writers - 1 } else { 0 };
        let mut replica_writes = self.plan_replica_writes(
            &shard.id,
            planned.iter().flat_map(|(_, _, _, plans)| plans.iter()),
        );
        let planned_puts = planned
            .iter()
            .flat_map(|(_, _, _, plans)| plans.iter())
            .filter(|p| matches!(p, PlannedOp::Put { .. }))
            .count();

        let primary = async {
            if shard_ops.is_empty() {
                Ok(TxnResponse {
                    header: None,
                    succeeded: true,
                    responses: Vec::new(),
                })
            } else {
                let sent = std::time::Instant::now();
                let answer = shard
                    .txn(TxnRequest {
                        compare: fences,
                        success: shard_ops,
                        failure: Vec::new(),
                    })
                    .await;
                self.metrics.shard_txn(sent.elapsed().as_secs_f64());
                match answer {
                    Ok(answer) if answer.succeeded => Ok(answer),
                    Ok(_) => {
                        state.needs_reconcile = true;
                        shard.note_reconcile(state);
                        // Nothing was written (the fences refused it) and the
                        // shard is reconciled before its next write: retryable.
                        Err(StoreError::unavailable(
                        shard.id.as_str(),
                        "it changed behind the router's back (its revisions no longer match the index; did its etcd lose its data?); it is being reconciled, retry",
                    ))
                    }
                    Err(err) => {
                        if !write_certainly_not_applied(&err) {
                            warn!(shard = %shard.id, error = %err, "shard write failed with an unknown outcome; reconciling the shard before its next write");
                            state.needs_reconcile = true;
                            shard.note_reconcile(state);
                        }
                        Err(err)
                    }
                }
            }
        };
        // Replica copies go out with the primary Txn, not after it: a copy of
        // a write that then fails does not match the index and is never used.
        let cleanups = std::mem::take(&mut replica_writes.cleanups);
        let (answer, copied) = tokio::join!(primary, self.send_replica_writes(replica_writes));
        let answer = match answer {
            Ok(answer) => answer,
            Err(err) => {
                // The copies of the versions that were not written are garbage;
                // the copies of the current versions are untouched.
                if self.replication() {
                    let index = self.index.read().expect("index lock");
                    let written: Vec<(ShardId, Bytes, i64)> = copied
                        .iter()
                        .filter_map(|(key, shard)| {
                            let planned_revision = planned
                                .iter()
                                .flat_map(|(_, _, _, plans)| plans.iter())
                                .find_map(|p| match p {
                                    PlannedOp::Put { key: k, meta, .. } if k == key => {
                                        Some(meta.mod_revision)
                                    }
                                    _ => None,
                                })?;
                            let current = index.get(key).map(|e| e.meta.mod_revision);
                            (current != Some(planned_revision))
                                .then(|| (shard.clone(), key.clone(), planned_revision))
                        })
                        .collect();
                    drop(index);
                    self.spawn_cleanup(written);
                }
                // Nothing was written: the revisions are published without events.
                drop(assigned);
                for (pending, ..) in planned {
                    pending.answer(Err(err.clone()));
                }
                return;
            }
        };
        let shard_revision = answer.header.as_ref().map(|h| h.revision).unwrap_or(0);
        // A read inside the batch sees the shard after the writes before it
        // in the shard Txn, not after the batch. Its answer's revision: the
        // last write before it in the batch; without one, what was published
        // before this batch finishes anything (no write of this shard lies
        // between its last one and that: they all take this lock, and this
        // batch's revisions are not published yet). So the data is exact at
        // the header, and headers never go below an acknowledged revision
        // (etcd answers with its current revision).
        let loaded_at = shard
            .cuts
            .lock()
            .expect("cuts lock")
            .latest_revision()
            .unwrap_or(0);
        let mut read_at = state
            .last_revision
            .max(loaded_at)
            .max(self.sequencer.published());
        if writers > 0 {
            self.metrics.batch(writers);
            if !shard.push_batch_cut(first, last, shard_revision) {
                warn!(shard = %shard.id, shard_revision, "the shard's revision went back: its etcd lost its data; reconciling it");
                state.needs_reconcile = true;
                shard.note_reconcile(state);
            }
            state.last_revision = last;
        }
        let mut responses = answer.responses.into_iter();
        for (pending, succeeded, g, item_plans) in planned {
            let mut events = Vec::new();
            let mut item_responses = Vec::with_capacity(item_plans.len());
            let mut failure = None;
            for plan in item_plans {
                let response = if plan.sent_to_shard() {
                    responses.next().unwrap_or_default()
                } else {
                    ResponseOp::default()
                };
                match self.apply_op_result(shard, plan, response, g, shard_revision, &mut events) {
                    Ok(response) => item_responses.push(response),
                    Err(err) => {
                        failure.get_or_insert(err);
                    }
                }
            }
            if g != 0 {
                self.metrics.events_written(events.len());
                if let Some(block) = assigned.as_mut() {
                    block.publish_at(g, events);
                }
            }
            if g != 0 {
                read_at = g;
            }
            let visible_at = read_at;
            let reply = match failure {
                Some(err) => Err(err),
                None => Ok(Committed {
                    response: TxnResponse {
                        header: None,
                        succeeded,
                        responses: item_responses,
                    },
                    visible_at,
                }),
            };
            pending.answer(reply);
        }
        self.record_replicas(copied, planned_puts);
        self.spawn_cleanup(cleanups);
    }

    fn apply_op_result(
        &self,
        shard: &Shard,
        plan: PlannedOp,
        response: ResponseOp,
        g: i64,
        shard_revision: i64,
        events: &mut Vec<Arc<StoredEvent>>,
    ) -> StoreResult<ResponseOp> {
        let response = match (plan, response.response) {
            (
                PlannedOp::Put {
                    key,
                    meta,
                    value,
                    want_prev,
                    old_lease,
                },
                Some(Response::ResponsePut(put)),
            ) => {
                let prev = put
                    .prev_kv
                    .map(|kv| translate_kv(&shard.id, kv).map(owned_kv))
                    .transpose()?;
                // The event outlives the request and the shard's answer in
                // the history: it gets buffers of its own (see `own_key`).
                let key = own_key(&key);
                let kv = KeyValue {
                    key: key.clone(),
                    create_revision: meta.create_revision,
                    mod_revision: meta.mod_revision,
                    version: meta.version,
                    // A slice of its own envelope (see `PreparedOp::finish`).
                    value,
                    lease: meta.lease,
                };
                upsert(
                    &mut self.index.write().expect("index lock"),
                    &key,
                    IndexEntry::written(&shard.id, shard_revision, meta),
                );
                // Visible to reads only at or above its mod revision, which
                // is not published yet (see `store::cached`).
                self.values
                    .insert(&key, meta.mod_revision, kv.value.clone(), &self.metrics);
                self.leases.reattach(&key, old_lease, meta.lease);
                events.push(Arc::new(StoredEvent::put(kv, prev.clone())));
                Response::ResponsePut(PutResponse {
                    header: Some(self.header(g)),
                    prev_kv: if want_prev { prev } else { None },
                })
            }
            (PlannedOp::Answered(mut answer), _) => {
                answer.header = Some(self.header(g));
                Response::ResponseRange(answer)
            }
            (PlannedOp::Delete { sent: false, .. }, _) => {
                Response::ResponseDeleteRange(DeleteRangeResponse::default())
            }
            (
                PlannedOp::Delete {
                    key,
                    want_prev,
                    existed,
                    ..
                },
                Some(Response::ResponseDeleteRange(delete)),
            ) => {
                let prev: Vec<KeyValue> = delete
                    .prev_kvs
                    .into_iter()
                    .map(|kv| translate_kv(&shard.id, kv))
                    .collect::<StoreResult<_>>()?;
                if existed || !prev.is_empty() {
                    let removed = self.index.write().expect("index lock").remove(&key);
                    if let Some(removed) = removed {
                        self.leases.reattach(&key, removed.meta.lease, 0);
                    }
                    self.values.forget(&key, &self.metrics);
                    events.push(Arc::new(StoredEvent::delete(
                        own_key(&key),
                        g,
                        prev.first().cloned().map(owned_kv),
                    )));
                }
                Response::ResponseDeleteRange(DeleteRangeResponse {
                    header: Some(self.header(g)),
                    deleted: delete.deleted,
                    prev_kvs: if want_prev { prev } else { Vec::new() },
                })
            }
            (
                PlannedOp::Range {
                    keys_only,
                    count_only,
                },
                Some(Response::ResponseRange(range)),
            ) => {
                let asked = RangeRequest {
                    keys_only,
                    count_only,
                    ..Default::default()
                };
                let mut translated = self.translate_range(&shard.id, range, &asked)?;
                translated.header = Some(self.header(g));
                Response::ResponseRange(translated)
            }
            _ => {
                return Err(StoreError::Internal(
                    "shard answered a Txn with responses of the wrong kind".into(),
                ))
            }
        };
        Ok(ResponseOp {
            response: Some(response),
        })
    }
}
