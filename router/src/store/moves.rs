//! Ring changes: shards joining, draining and being lost.
//!
//! A key move is invisible to clients: the value (with its envelope, so the
//! same global revisions and version) is written to the new shard and then
//! deleted from the old one under both shards' write locks, and the pair of
//! shard writes gets a global revision of its own that carries no event. Both
//! shards record a cut at that revision, so a List at any revision before it
//! reads the key on the old shard and a List at or after it on the new one:
//! snapshots stay exact across moves and nobody gets 410 for a join.
//!
//! Removing a shard (drained, or lost) makes revisions before its removal
//! unreadable by Range (ErrCompacted → kube-apiserver relists once); watches
//! are served from the router's log and are not affected.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use ste_etcd_proto::pb::{
    request_op::Request, DeleteRangeRequest, PutRequest, RequestOp, TxnRequest,
};
use tokio::sync::MutexGuard;
use tracing::{info, warn};

use super::{fence, scan_shard, IndexEntry, Store};
use crate::error::{StoreError, StoreResult};
use crate::history::StoredEvent;
use crate::ring::ShardId;
use crate::shard::{write_certainly_not_applied, CutLookup, Origin, Shard, ShardSpec, WriteState};
use crate::txn_shapes::MAX_TXN_OPS;

/// Keys moved per pair of shard Txns (etcd's default limit of ops per Txn).
const MOVE_CHUNK: usize = MAX_TXN_OPS;

/// What became of a shard removal request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainProgress {
    /// Keys are still on the shard (they are being moved).
    Moving { keys_left: usize },
    /// The shard holds nothing any more and left the ring and the store.
    Removed,
}

impl Store {
    /// Adds a shard to the ring (a registered shard joining). Keys the ring
    /// now places on it move there with `rebalance`. A joining shard must be
    /// empty as far as the router knows: keys it holds that the router does
    /// not know (an old incarnation's, or left by an interrupted move) are
    /// discarded, never resurrected.
    pub async fn join(&self, spec: &ShardSpec) -> StoreResult<()> {
        self.check_open()?;
        if let Some(existing) = self.shard(&spec.id) {
            if existing.endpoint != spec.endpoint {
                warn!(shard = %spec.id, known = %existing.endpoint, registered = %spec.endpoint,
                    "shard re-registered at another address; keeping the known one until it is removed");
            }
            return Ok(());
        }
        let spec = ShardSpec {
            origin: Origin::Registered,
            ..spec.clone()
        };
        let shard = Arc::new(
            Shard::connect(&spec, &self.connector)?.with_fencing(self.config.fencing.clone()),
        );
        let scan = scan_shard(&shard).await?;
        let mut revision = scan.revision;
        if !scan.items.is_empty() {
            warn!(shard = %spec.id, keys = scan.items.len(),
                "joining shard holds keys the router does not know; discarding them");
            let stale: Vec<(Bytes, i64)> = scan
                .items
                .iter()
                .map(|item| (item.key.clone(), item.shard_mod_revision))
                .collect();
            revision = delete_silently(&shard, &stale).await?.unwrap_or(revision);
        }
        let at = self.sequencer.published();
        shard
            .cuts
            .lock()
            .expect("cuts lock")
            .reset(at, revision, CutLookup::Empty);
        shard.write.lock().await.last_revision = at;
        // From now on its keys are the router's: a router restarted after it
        // lost them must recognise it (see `MARKER_KEY`).
        shard.write_marker().await?;
        shard.set_loaded(true);
        shard.set_healthy(true);
        self.shards
            .write()
            .expect("shards lock")
            .insert(spec.id.clone(), shard);
        self.ring.write().expect("ring lock").add(&spec.id);
        self.ring_changed();
        self.metrics.ring_change("join");
        info!(shard = %spec.id, endpoint = %spec.endpoint, revision = at, "shard joined the ring");
        Ok(())
    }

    /// Takes a shard out of the ring: new keys go elsewhere and `rebalance`
    /// moves its keys off. Refused for the last shard in the ring.
    pub fn begin_drain(&self, id: &ShardId) -> StoreResult<()> {
        let shard = self
            .shard(id)
            .ok_or_else(|| StoreError::NotFound(format!("shard {id} is not a member")))?;
        if shard.is_draining() {
            return Ok(());
        }
        {
            let mut ring = self.ring.write().expect("ring lock");
            if ring.members().iter().all(|m| m == id) {
                return Err(StoreError::NotReady(format!(
                    "shard {id} is the last shard in the ring; its keys have nowhere to go"
                )));
            }
            ring.remove(id);
        }
        shard.set_draining(true);
        self.ring_changed();
        self.metrics.ring_change("drain");
        info!(shard = %id, "draining shard: moving its keys off");
        Ok(())
    }

    /// Removes a draining shard once it holds no keys.
    pub async fn finish_drain(&self, id: &ShardId) -> StoreResult<DrainProgress> {
        let Some(shard) = self.shard(id) else {
            return Ok(DrainProgress::Removed);
        };
        let keys_left = self.keys_on(id);
        if keys_left > 0 {
            return Ok(DrainProgress::Moving { keys_left });
        }
        let state = shard.write.lock().await;
        let keys_left = self.keys_on(id);
        if keys_left > 0 {
            return Ok(DrainProgress::Moving { keys_left });
        }
        // Its last write or move is the newest revision at which reading it matters.
        self.remove_shard(&shard, state.last_revision);
        info!(shard = %id, "drained shard left the store");
        Ok(DrainProgress::Removed)
    }

    /// A shard that is gone for good with its data (replication factor 1):
    /// its keys are deleted visibly, one DELETE event each at one revision,
    /// so controllers recreate what they own elsewhere. Returns the number
    /// of keys lost.
    pub async fn declare_lost(&self, id: &ShardId) -> StoreResult<usize> {
        let Some(shard) = self.shard(id) else {
            return Ok(0);
        };
        self.ring.write().expect("ring lock").remove(id);
        self.ring_changed();
        shard.set_draining(true);
        // Every shard's write lock, in name order like every multi-shard
        // writer (writes in flight to the lost one fail within the shard timeout).
        let members = self.shard_list();
        let mut guards = Vec::with_capacity(members.len());
        for member in &members {
            guards.push((member.id.clone(), member.write.lock().await));
        }
        let entries: Vec<(Bytes, IndexEntry)> = self
            .index
            .read()
            .expect("index lock")
            .iter()
            .filter(|(_, e)| e.shard == *id)
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        // With replication, keys whose copy is valid live on (no events).
        let restored: std::collections::BTreeSet<Bytes> = self
            .promote_replicas(id, &entries)
            .await
            .into_iter()
            .collect();
        for (member, state) in guards.iter_mut() {
            if member != id {
                state.last_revision = state
                    .last_revision
                    .max(self.last_move.load(Ordering::Acquire));
            }
        }
        let mut state = guards
            .into_iter()
            .find(|(member, _)| member == id)
            .map(|(_, state)| state)
            .expect("the lost shard is a member");
        let g = self.sequencer.assign();
        let mut events = Vec::new();
        {
            let mut index = self.index.write().expect("index lock");
            for (key, entry) in entries.into_iter().filter(|(k, _)| !restored.contains(k)) {
                index.remove(&key);
                self.leases.reattach(&key, entry.meta.lease, 0);
                let prev = self.last_known_value(&key, &entry);
                events.push(Arc::new(StoredEvent::delete(key, g, prev)));
            }
        }
        let lost = events.len();
        events.sort_by(|a, b| a.key().cmp(b.key()));
        state.last_revision = g;
        shard.removed_at.store(g, Ordering::Release);
        self.metrics.keys_lost(lost);
        self.metrics.events_written(lost);
        self.metrics.ring_change("lost");
        self.sequencer.finish(g, events);
        drop(state);
        self.sequencer.wait_published(g).await;
        self.remove_shard(&shard, g);
        warn!(shard = %id, keys_lost = lost, keys_restored = restored.len(), revision = g,
            "shard declared lost: keys without a replica were deleted (DELETE events)");
        Ok(lost)
    }

    fn remove_shard(&self, shard: &Arc<Shard>, last_revision: i64) {
        shard
            .removed_at
            .fetch_max(last_revision.max(1), Ordering::AcqRel);
        // Reads before this revision would need the shard's data.
        self.range_floor.fetch_max(last_revision, Ordering::AcqRel);
        self.shards.write().expect("shards lock").remove(&shard.id);
        self.ring.write().expect("ring lock").remove(&shard.id);
    }

    /// Placement and replicas must be checked again.
    fn ring_changed(&self) {
        *self.ring_changed.lock().expect("ring change lock") = std::time::Instant::now();
        self.placement_dirty.store(true, Ordering::Release);
        self.replicas_dirty.store(true, Ordering::Release);
    }

    fn keys_on(&self, id: &ShardId) -> usize {
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
        let values = match super::replicas::read_values(from, &entries).await {
            Ok(values) => values,
            Err(err) => {
                if matches!(err, StoreError::Internal(_)) {
                    // The shard no longer holds what the index says: reconcile before moving.
                    from_state.needs_reconcile = true;
                }
                return Err(err);
            }
        };

        let put = to
            .txn(TxnRequest {
                compare: entries.iter().map(|(key, _)| fence(key, 0)).collect(),
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
        let g = self.sequencer.assign();
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
                from.set_loaded(false);
            }
        }
        self.metrics.keys_moved(entries.len());
        self.sequencer.finish(g, Vec::new());
        Ok(entries.len())
    }
}

/// Deletes keys from a shard without events (they are copies the index does
/// not point to), each fenced on the shard revision seen. Returns the
/// shard's revision after the last delete.
pub(super) async fn delete_silently(
    shard: &Shard,
    keys: &[(Bytes, i64)],
) -> StoreResult<Option<i64>> {
    let mut revision = None;
    for chunk in keys.chunks(MOVE_CHUNK) {
        let answer = shard
            .txn(TxnRequest {
                compare: chunk.iter().map(|(key, rev)| fence(key, *rev)).collect(),
                success: chunk
                    .iter()
                    .map(|(key, _)| RequestOp {
                        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                            key: key.clone(),
                            ..Default::default()
                        })),
                    })
                    .collect(),
                failure: Vec::new(),
            })
            .await?;
        if !answer.succeeded {
            return Err(StoreError::unavailable(
                shard.id.as_str(),
                "changed while stale copies were being deleted",
            ));
        }
        revision = answer.header.map(|h| h.revision);
    }
    Ok(revision)
}
