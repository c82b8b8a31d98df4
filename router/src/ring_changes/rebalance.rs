//! Moving misplaced keys to their ring owner, invisibly (a revision without events).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use ste_etcd_proto::pb::{request_op::Request, PutRequest, RequestOp, TxnRequest};
use tokio::sync::MutexGuard;
use tracing::warn;

use crate::error::{StoreError, StoreResult};
use crate::placement::index::IndexEntry;
use crate::placement::ring::ShardId;
use crate::shard::kv::key_fence;
use crate::shard::scan::delete_silently;
use crate::shard::{write_certainly_not_applied, Shard, WriteState};
use crate::store::Store;
use crate::txn_shapes::MAX_TXN_OPS;

use crate::replication::copies::read_values;

/// Keys moved per pair of shard Txns (etcd's default limit of ops per Txn).
const MOVE_CHUNK: usize = MAX_TXN_OPS;

impl Store {
    /// Placement and replicas must be checked again.
    pub(crate) fn note_ring_change(&self) {
        *self.ring_changed.lock().expect("ring change lock") = std::time::Instant::now();
        self.placement_dirty.store(true, Ordering::Release);
        self.replicas_dirty.store(true, Ordering::Release);
    }

    pub(crate) fn keys_on(&self, id: &ShardId) -> usize {
        self.keys_per_shard().get(id).copied().unwrap_or(0)
    }

    /// Keys not on the shard the ring places them on, grouped by (from, to).
    pub async fn misplaced(&self) -> BTreeMap<(ShardId, ShardId), Vec<Bytes>> {
        // A few thousand keys per look at the index: writes update the index
        // between them instead of waiting for a pass over all of it.
        const SLICE: usize = 4096;
        let mut plan: BTreeMap<(ShardId, ShardId), Vec<Bytes>> = BTreeMap::new();
        let mut after: Option<Bytes> = None;
        loop {
            let slice: Vec<(Bytes, ShardId)> = {
                let index = self.index.read().expect("index lock");
                let range = match &after {
                    Some(key) => index.range::<Bytes, _>((
                        std::ops::Bound::Excluded(key),
                        std::ops::Bound::Unbounded,
                    )),
                    None => index.range::<Bytes, _>(..),
                };
                range
                    .take(SLICE)
                    .map(|(k, e)| (k.clone(), e.shard.clone()))
                    .collect()
            };
            let Some((last, _)) = slice.last() else { break };
            after = Some(last.clone());
            {
                let ring = self.ring.read().expect("ring lock");
                for (key, shard) in slice {
                    if let Some(target) = ring.locate(&key) {
                        if target != shard {
                            plan.entry((shard, target)).or_default().push(key);
                        }
                    }
                }
            }
            tokio::task::yield_now().await;
        }
        let total: usize = plan.values().map(Vec::len).sum();
        self.metrics.keys_to_move.set(total as i64);
        plan
    }

    /// Moves every misplaced key to its ring owner, a chunk at a time (each
    /// chunk holds the two shards' write locks for one read and two Txns).
    /// Returns the number of keys moved; stops at the first error (the next
    /// call continues).
    pub async fn rebalance(&self) -> StoreResult<usize> {
        if !self.placement_dirty.load(Ordering::Acquire) {
            return Ok(0);
        }
        let mut moved = 0;
        loop {
            let plan = self.misplaced().await;
            if plan.is_empty() {
                // Writes planned before the last ring change may still land on
                // the old owner for a moment: look again until that is past.
                let settled = self
                    .ring_changed
                    .lock()
                    .expect("ring change lock")
                    .elapsed()
                    > std::time::Duration::from_secs(2);
                if settled {
                    self.placement_dirty.store(false, Ordering::Release);
                }
                return Ok(moved);
            }
            let mut progress = 0;
            for ((from, to), keys) in plan {
                let (Some(from), Some(to)) = (self.shard(&from), self.shard(&to)) else {
                    continue;
                };
                for chunk in keys.chunks(MOVE_CHUNK) {
                    self.check_open()?;
                    progress += self.move_chunk(&from, &to, chunk).await?;
                }
            }
            moved += progress;
            if progress == 0 {
                // Everything planned moved meanwhile (or is being written): look again later.
                return Ok(moved);
            }
        }
    }

    async fn move_chunk(
        &self,
        from: &Arc<Shard>,
        to: &Arc<Shard>,
        keys: &[Bytes],
    ) -> StoreResult<usize> {
        // Name order, like every multi-shard writer, so no two deadlock.
        let (mut from_state, mut to_state): (
            MutexGuard<'_, WriteState>,
            MutexGuard<'_, WriteState>,
        ) = if from.id < to.id {
            let f = from.write.lock().await;
            (f, to.write.lock().await)
        } else {
            let t = to.write.lock().await;
            (from.write.lock().await, t)
        };
        from.require_loaded()?;
        to.require_loaded()?;
        self.ensure_reconciled(from, &mut from_state).await?;
        self.ensure_reconciled(to, &mut to_state).await?;
        let entries: Vec<(Bytes, IndexEntry)> = {
            let index = self.index.read().expect("index lock");
            let ring = self.ring.read().expect("ring lock");
            keys.iter()
                .filter_map(|key| index.get(key).map(|e| (key, e)))
                .filter(|(key, e)| e.shard == from.id && ring.locate(key).as_ref() == Some(&to.id))
                .map(|(key, e)| (key.clone(), e.clone()))
                .collect()
        };
        if entries.is_empty() {
            return Ok(0);
        }

        // The stored values as they are (envelope included).
        let values = match read_values(from, &entries).await {
            Ok(values) => values,
            Err(err) => {
                if matches!(err, StoreError::Internal(_)) {
                    // The shard no longer holds what the index says: reconcile before moving.
                    from_state.needs_reconcile = true;
                    from.note_reconcile(&from_state);
                }
                return Err(err);
            }
        };

        let put = to
            .txn(TxnRequest {
                compare: entries.iter().map(|(key, _)| key_fence(key, 0)).collect(),
                success: entries
                    .iter()
                    .zip(&values)
                    .map(|((key, _), value)| RequestOp {
                        request: Some(Request::RequestPut(PutRequest {
                            key: key.clone(),
                            value: value.clone(),
                            ..Default::default()
                        })),
                    })
                    .collect(),
                failure: Vec::new(),
            })
            .await;
        let to_revision = match put {
            Ok(answer) if answer.succeeded => answer.header.map(|h| h.revision).unwrap_or(0),
            outcome => {
                // Copies that did land are leftovers its reconciliation deletes.
                let certain = matches!(&outcome, Err(err) if write_certainly_not_applied(err));
                to_state.needs_reconcile |= !certain;
                if outcome.is_ok() {
                    to_state.needs_reconcile = true;
                }
                to.note_reconcile(&to_state);
                return Err(match outcome {
                    Err(err) => err,
                    Ok(_) => StoreError::Internal(format!(
                        "shard {} already held keys being moved to it; reconciling",
                        to.id
                    )),
                });
            }
        };
        // The move's revision is taken only now: every write that gets a later
        // one waits for it to publish, so it must not wait for the copy too.
        // (Both shards are locked, so no other write touched them meanwhile.)
        let assigned = self.sequencer.assign();
        let g = assigned.first();
        // From here the new copies are the keys: the index points to them
        // before anything is published.
        self.last_move.fetch_max(g, Ordering::AcqRel);
        {
            let mut index = self.index.write().expect("index lock");
            for (key, _) in &entries {
                if let Some(entry) = index.get_mut(key) {
                    entry.shard = to.id.clone();
                    entry.shard_mod_revision = to_revision;
                    if entry.replica.as_ref() == Some(&to.id) {
                        // Its copy is now on its own shard: another one is needed.
                        entry.replica = None;
                        self.replicas_dirty.store(true, Ordering::Release);
                    }
                }
            }
        }
        to.cuts.lock().expect("cuts lock").push(g, to_revision);
        to_state.last_revision = g;
        let stale: Vec<(Bytes, i64)> = entries
            .iter()
            .map(|(key, e)| (key.clone(), e.shard_mod_revision))
            .collect();
        match delete_silently(from, &stale).await {
            Ok(from_revision) => {
                if let Some(from_revision) = from_revision {
                    from.cuts.lock().expect("cuts lock").push(g, from_revision);
                }
                from_state.last_revision = g;
            }
            Err(err) => {
                // The old copies may still be there: reads of this shard wait
                // for its reconciliation (which deletes them) rather than
                // seeing a key twice.
                warn!(shard = %from.id, error = %err, "deleting moved keys failed; reconciling the shard");
                from_state.needs_reconcile = true;
                from.note_reconcile(&from_state);
                from.set_loaded(false);
            }
        }
        self.metrics.keys_moved(entries.len());
        assigned.publish(Vec::new());
        Ok(entries.len())
    }
}
