//! Replication factor 2: every key also has a copy on a second shard, so
//! losing one shard loses nothing.
//!
//! A replica copy lives under a reserved prefix on its shard, one per
//! version (`REPLICA_PREFIX` + key length + key + mod revision, holding the
//! same envelope bytes as the primary), outside every range a client can
//! read or write. The copy of a new version is written in parallel with the
//! primary Txn of each group commit; the copy of the version it replaces is
//! deleted only after the primary committed, so a write that fails never
//! leaves a key without a valid copy. The index says which shard holds the
//! copy of the indexed version; a copy is used only if its envelope matches
//! the index exactly. When a shard is lost, its keys whose copies
//! are valid are promoted to their new ring owners invisibly (same
//! revisions, no events); only keys without a valid copy are deleted
//! visibly. A repair pass re-creates missing copies after failures, restarts
//! and ring changes.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::join_all;
use ste_etcd_proto::pb::{
    request_op::Request, response_op::Response, DeleteRangeRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest,
};
use tracing::{debug, info, warn};

use super::{fence, IndexEntry, PlannedOp, Store};
use crate::envelope;
use crate::error::{StoreError, StoreResult};
use crate::ring::ShardId;
use crate::shard::Shard;
use crate::txn_shapes::MAX_TXN_OPS;

pub use crate::shard::RESERVED_PREFIX;

/// Where replica copies live, inside the router's reserved range.
pub const REPLICA_PREFIX: &[u8] = b"\xff\xff\xff\xffste/replica/";

/// The copy of `key` at global revision `revision`.
pub fn replica_key(key: &[u8], revision: i64) -> Bytes {
    let mut out = Vec::with_capacity(REPLICA_PREFIX.len() + 12 + key.len());
    out.extend_from_slice(REPLICA_PREFIX);
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&revision.to_be_bytes());
    Bytes::from(out)
}

/// (key, revision) of a copy's key.
fn parse_replica_key(stored: &[u8]) -> Option<(Bytes, i64)> {
    let rest = stored.strip_prefix(REPLICA_PREFIX)?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let key = rest.get(4..4 + len)?;
    let revision = i64::from_be_bytes(rest.get(4 + len..)?.try_into().ok()?);
    Some((Bytes::copy_from_slice(key), revision))
}

/// Clamps a client range to the part below the reserved prefix; None if nothing is left.
pub fn clamp_range(key: &Bytes, range_end: &Bytes) -> Option<(Bytes, Bytes)> {
    if key.as_ref() >= RESERVED_PREFIX {
        return None;
    }
    let reserved = Bytes::from_static(RESERVED_PREFIX);
    let end = if range_end.is_empty() {
        range_end.clone()
    } else if range_end.as_ref() == [0] || range_end.as_ref() > RESERVED_PREFIX {
        reserved
    } else {
        range_end.clone()
    };
    Some((key.clone(), end))
}

/// Replica writes that go with one group commit, by replica shard: copies
/// of the new versions (sent with the primary Txn) and removals of the
/// versions they replace (sent once the primary committed).
#[derive(Default)]
pub(super) struct ReplicaWrites {
    by_shard: BTreeMap<ShardId, Vec<(RequestOp, Option<Bytes>)>>,
    pub(super) cleanups: Vec<(ShardId, Bytes, i64)>,
}

impl Store {
    pub(super) fn replication(&self) -> bool {
        self.config.replication_factor >= 2
    }

    /// The replica writes for a batch about to commit on `primary`: a copy of
    /// each put value on the key's replica shard, and the removal of copies
    /// of deleted keys (and of copies on a shard that is no longer the replica).
    pub(super) fn plan_replica_writes<'a>(
        &self,
        primary: &ShardId,
        ops: impl Iterator<Item = &'a PlannedOp>,
    ) -> ReplicaWrites {
        let mut writes = ReplicaWrites::default();
        if !self.replication() {
            return writes;
        }
        let index = self.index.read().expect("index lock");
        let ring = self.ring.read().expect("ring lock");
        for op in ops {
            let (key, new) = match op {
                PlannedOp::Put {
                    key, meta, value, ..
                } => (key, Some((meta, value))),
                PlannedOp::Delete {
                    key, sent: true, ..
                } => (key, None),
                _ => continue,
            };
            if let Some(old) = index.get(key) {
                if let Some(replica) = &old.replica {
                    writes
                        .cleanups
                        .push((replica.clone(), key.clone(), old.meta.mod_revision));
                }
            }
            if let Some((meta, value)) = new {
                if let Some(target) = ring.locate_replica(key, primary) {
                    writes.by_shard.entry(target).or_default().push((
                        RequestOp {
                            request: Some(Request::RequestPut(PutRequest {
                                key: replica_key(key, meta.mod_revision),
                                value: envelope::encode(meta, value),
                                ..Default::default()
                            })),
                        },
                        Some(key.clone()),
                    ));
                }
            }
        }
        writes
    }

    /// Removes copies of replaced versions in the background: a copy left
    /// behind matches no index entry and is never used.
    pub(super) fn spawn_cleanup(&self, copies: Vec<(ShardId, Bytes, i64)>) {
        if copies.is_empty() {
            return;
        }
        let Some(store) = self.this.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        tokio::spawn(async move { store.delete_copies(copies).await });
    }

    /// Sends the copies of new versions; returns, per key, the shard that now holds its copy.
    pub(super) async fn send_replica_writes(&self, writes: ReplicaWrites) -> Vec<(Bytes, ShardId)> {
        let sends = writes.by_shard.into_iter().filter_map(|(id, ops)| {
            let shard = self.shard(&id)?;
            Some(async move {
                let mut copied = Vec::new();
                for chunk in ops.chunks(MAX_TXN_OPS) {
                    let request = TxnRequest {
                        success: chunk.iter().map(|(op, _)| op.clone()).collect(),
                        ..Default::default()
                    };
                    match shard.txn(request).await {
                        Ok(_) => copied.extend(chunk.iter().filter_map(|(_, key)| key.clone()).map(|k| (k, id.clone()))),
                        Err(err) => {
                            debug!(shard = %id, error = %err, "replica write failed; the repair pass will copy again");
                            self.replicas_dirty.store(true, Ordering::Release);
                        }
                    }
                }
                copied
            })
        });
        join_all(sends).await.into_iter().flatten().collect()
    }

    /// Records which copies were written for a committed batch.
    pub(super) fn record_replicas(&self, copied: Vec<(Bytes, ShardId)>, planned_puts: usize) {
        if !self.replication() {
            return;
        }
        if copied.len() < planned_puts {
            self.replicas_dirty.store(true, Ordering::Release);
        }
        let mut index = self.index.write().expect("index lock");
        for (key, shard) in copied {
            if let Some(entry) = index.get_mut(&key) {
                entry.replica = Some(shard);
            }
        }
    }

    /// Copies keys whose replica is missing or on the wrong shard. Runs only
    /// when something may have left keys under-replicated.
    pub async fn repair_replicas(&self) -> StoreResult<usize> {
        if !self.replication() || !self.replicas_dirty.swap(false, Ordering::AcqRel) {
            return Ok(0);
        }
        let plan: BTreeMap<(ShardId, ShardId), Vec<Bytes>> = {
            let index = self.index.read().expect("index lock");
            let ring = self.ring.read().expect("ring lock");
            let mut plan: BTreeMap<(ShardId, ShardId), Vec<Bytes>> = BTreeMap::new();
            for (key, entry) in index.iter() {
                let Some(target) = ring.locate_replica(key, &entry.shard) else {
                    continue;
                };
                if entry.replica.as_ref() != Some(&target) {
                    plan.entry((entry.shard.clone(), target))
                        .or_default()
                        .push(key.clone());
                }
            }
            plan
        };
        let missing: usize = plan.values().map(Vec::len).sum();
        self.metrics.keys_under_replicated.set(missing as i64);
        let mut repaired = 0;
        for ((primary, target), keys) in plan {
            let (Some(primary), Some(target)) = (self.shard(&primary), self.shard(&target)) else {
                self.replicas_dirty.store(true, Ordering::Release);
                continue;
            };
            if !primary.is_healthy() || !target.is_healthy() {
                // Tried again once both answer health checks.
                self.replicas_dirty.store(true, Ordering::Release);
                continue;
            }
            for chunk in keys.chunks(MAX_TXN_OPS) {
                match self.copy_chunk(&primary, &target, chunk).await {
                    Ok(n) => repaired += n,
                    Err(err) => {
                        debug!(primary = %primary.id, replica = %target.id, error = %err, "copying replicas failed; retrying later");
                        self.replicas_dirty.store(true, Ordering::Release);
                        break;
                    }
                }
            }
        }
        if repaired > 0 {
            info!(keys = repaired, "replica copies written");
        }
        self.metrics
            .keys_under_replicated
            .set(missing.saturating_sub(repaired) as i64);
        if repaired < missing {
            // Some keys changed meanwhile (and got copies with their writes)
            // or could not be copied: the next pass counts again.
            self.replicas_dirty.store(true, Ordering::Release);
        }
        Ok(repaired)
    }

    /// One chunk of replica copies, under the primary's write lock so the
    /// values cannot change between reading and copying them.
    async fn copy_chunk(
        &self,
        primary: &Arc<Shard>,
        target: &Arc<Shard>,
        keys: &[Bytes],
    ) -> StoreResult<usize> {
        let mut state = primary.write.lock().await;
        primary.require_loaded()?;
        self.ensure_reconciled(primary, &mut state).await?;
        let entries: Vec<(Bytes, IndexEntry)> = {
            let index = self.index.read().expect("index lock");
            keys.iter()
                .filter_map(|k| index.get(k).map(|e| (k.clone(), e.clone())))
                .filter(|(_, e)| e.shard == primary.id && e.replica.as_ref() != Some(&target.id))
                .collect()
        };
        if entries.is_empty() {
            return Ok(0);
        }
        let values = read_values(primary, &entries).await?;
        let mut ops = Vec::with_capacity(entries.len());
        let mut stale = Vec::new();
        for ((key, entry), value) in entries.iter().zip(&values) {
            ops.push(RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key: replica_key(key, entry.meta.mod_revision),
                    value: value.clone(),
                    ..Default::default()
                })),
            });
            if let Some(old) = &entry.replica {
                stale.push((old.clone(), key.clone(), entry.meta.mod_revision));
            }
        }
        target
            .txn(TxnRequest {
                success: ops,
                ..Default::default()
            })
            .await?;
        self.delete_copies(stale).await;
        let mut index = self.index.write().expect("index lock");
        for (key, before) in &entries {
            if let Some(entry) = index.get_mut(key) {
                if entry.meta == before.meta && entry.shard == primary.id {
                    entry.replica = Some(target.id.clone());
                }
            }
        }
        Ok(entries.len())
    }

    /// For keys of a lost shard: reads their copies and writes the valid ones
    /// to the keys' new ring owners. Returns the keys restored. The caller
    /// holds every shard's write lock and has taken `lost` out of the ring.
    pub(super) async fn promote_replicas(
        &self,
        lost: &ShardId,
        entries: &[(Bytes, IndexEntry)],
    ) -> Vec<Bytes> {
        if !self.replication() {
            return Vec::new();
        }
        let found = self.read_valid_copies(lost, entries).await;
        if found.is_empty() {
            return Vec::new();
        }
        // Written to each key's new owner at a revision of their own (no events).
        let mut by_target: BTreeMap<ShardId, Vec<(Bytes, IndexEntry, Bytes, ShardId)>> =
            BTreeMap::new();
        {
            let ring = self.ring.read().expect("ring lock");
            for item in found {
                if let Some(target) = ring.locate(&item.0) {
                    by_target.entry(target).or_default().push(item);
                }
            }
        }
        self.write_restored(lost, by_target).await
    }

    /// Keys a shard lost while it stays a member (it came back empty):
    /// their valid copies are written back to it. Returns the revision of
    /// the shard after the last write, and removes the restored keys from `lost`.
    pub(super) async fn restore_in_place(
        &self,
        shard: &Shard,
        lost: &mut Vec<(Bytes, IndexEntry)>,
    ) -> Option<i64> {
        if !self.replication() || lost.is_empty() {
            return None;
        }
        let found = self.read_valid_copies(&shard.id, lost).await;
        let mut revision = None;
        let mut restored = std::collections::BTreeSet::new();
        for chunk in found.chunks(MAX_TXN_OPS) {
            let answer = shard.txn(restore_txn(chunk)).await;
            let Ok(answer) = answer.map_err(
                |err| warn!(shard = %shard.id, error = %err, "cannot write replica copies back"),
            ) else {
                break;
            };
            if !answer.succeeded {
                break;
            }
            let shard_revision = answer.header.map(|h| h.revision).unwrap_or(0);
            let mut index = self.index.write().expect("index lock");
            for (key, _, _, _) in chunk {
                // Only if still placed here (see `Store::reconcile`).
                if let Some(entry) = index.get_mut(key).filter(|e| e.shard == shard.id) {
                    entry.shard_mod_revision = shard_revision;
                }
                restored.insert(key.clone());
            }
            revision = Some(shard_revision);
        }
        lost.retain(|(key, _)| !restored.contains(key));
        if !restored.is_empty() {
            self.metrics.keys_restored(restored.len());
            info!(shard = %shard.id, keys = restored.len(), "shard came back empty: keys written back from their replica copies");
        }
        revision
    }

    /// The copies of `entries` that match the index exactly, from their replica shards.
    async fn read_valid_copies(
        &self,
        lost: &ShardId,
        entries: &[(Bytes, IndexEntry)],
    ) -> Vec<(Bytes, IndexEntry, Bytes, ShardId)> {
        let mut by_replica: BTreeMap<ShardId, Vec<(Bytes, IndexEntry)>> = BTreeMap::new();
        for (key, entry) in entries {
            if let Some(replica) = entry.replica.as_ref().filter(|r| *r != lost) {
                by_replica
                    .entry(replica.clone())
                    .or_default()
                    .push((key.clone(), entry.clone()));
            }
        }
        let mut found: Vec<(Bytes, IndexEntry, Bytes, ShardId)> = Vec::new();
        for (replica, keys) in by_replica {
            let Some(shard) = self.shard(&replica) else {
                continue;
            };
            for chunk in keys.chunks(MAX_TXN_OPS) {
                let request = TxnRequest {
                    success: chunk
                        .iter()
                        .map(|(key, entry)| RequestOp {
                            request: Some(Request::RequestRange(RangeRequest {
                                key: replica_key(key, entry.meta.mod_revision),
                                ..Default::default()
                            })),
                        })
                        .collect(),
                    ..Default::default()
                };
                let answer = match shard.txn(request).await {
                    Ok(answer) => answer,
                    Err(err) => {
                        warn!(replica = %replica, error = %err, "cannot read replica copies; those keys are lost");
                        continue;
                    }
                };
                for ((key, entry), response) in chunk.iter().zip(answer.responses) {
                    let Some(Response::ResponseRange(range)) = response.response else {
                        continue;
                    };
                    let Some(kv) = range.kvs.into_iter().next() else {
                        continue;
                    };
                    // Only a copy of exactly the indexed version is the key.
                    if envelope::decode(&kv.value).is_ok_and(|(meta, _)| meta == entry.meta) {
                        found.push((key.clone(), entry.clone(), kv.value, replica.clone()));
                    }
                }
            }
        }
        found
    }

    async fn write_restored(
        &self,
        lost: &ShardId,
        by_target: BTreeMap<ShardId, Vec<(Bytes, IndexEntry, Bytes, ShardId)>>,
    ) -> Vec<Bytes> {
        let g = self.sequencer.assign();
        self.last_move.fetch_max(g, Ordering::AcqRel);
        let mut restored = Vec::new();
        for (target, items) in by_target {
            let Some(shard) = self.shard(&target) else {
                continue;
            };
            for chunk in items.chunks(MAX_TXN_OPS) {
                let answer = shard.txn(restore_txn(chunk)).await;
                let revision = match answer {
                    Ok(answer) if answer.succeeded => {
                        answer.header.map(|h| h.revision).unwrap_or(0)
                    }
                    Ok(_) | Err(_) => {
                        warn!(shard = %target, keys = chunk.len(), "cannot restore replica copies there; those keys are lost");
                        continue;
                    }
                };
                let mut index = self.index.write().expect("index lock");
                for (key, _, _, replica) in chunk {
                    if let Some(entry) = index.get_mut(key) {
                        entry.shard = target.clone();
                        entry.shard_mod_revision = revision;
                        entry.replica = (*replica != target).then(|| replica.clone());
                    }
                    restored.push(key.clone());
                }
                shard.cuts.lock().expect("cuts lock").push(g, revision);
            }
        }
        self.sequencer.finish(g, Vec::new());
        self.replicas_dirty.store(true, Ordering::Release);
        self.metrics.keys_restored(restored.len());
        info!(lost = %lost, keys = restored.len(), revision = g, "promoted replica copies of a lost shard");
        restored
    }

    /// Removes the copies of deleted keys (best effort: a copy left behind
    /// does not match any index entry and is never used).
    pub(super) async fn delete_copies(&self, copies: Vec<(ShardId, Bytes, i64)>) {
        if copies.is_empty() {
            return;
        }
        let mut by_shard: BTreeMap<ShardId, Vec<(RequestOp, Option<Bytes>)>> = BTreeMap::new();
        for (shard, key, revision) in copies {
            by_shard
                .entry(shard)
                .or_default()
                .push((delete_copy(&key, revision), None));
        }
        self.send_replica_writes(ReplicaWrites {
            by_shard,
            cleanups: Vec::new(),
        })
        .await;
    }

    /// After `shard` lost its data: the index stops naming it as the replica
    /// of any key whose copy is not really there (read from the shard, not
    /// assumed), so those keys count as under-replicated and the repair
    /// pass copies them again. Returns how many keys lost their copy.
    pub(super) async fn forget_lost_copies(&self, shard: &Shard) -> StoreResult<usize> {
        if !self.replication() {
            return Ok(0);
        }
        let held: HashSet<(Bytes, i64)> = scan_copies(shard)
            .await?
            .into_iter()
            .map(|(key, revision, ..)| (key, revision))
            .collect();
        let mut forgotten = 0;
        {
            let mut index = self.index.write().expect("index lock");
            for (key, entry) in index.iter_mut() {
                if entry.replica.as_ref() == Some(&shard.id)
                    && !held.contains(&(key.clone(), entry.meta.mod_revision))
                {
                    entry.replica = None;
                    forgotten += 1;
                }
            }
        }
        if forgotten > 0 {
            self.replicas_dirty.store(true, Ordering::Release);
            self.metrics.keys_under_replicated.inc_by(forgotten as i64);
            warn!(shard = %shard.id, keys = forgotten, "the shard lost the replica copies it held; copying those keys again");
        }
        Ok(forgotten)
    }

    /// After a restart: which copies each shard holds (recorded in the index),
    /// and the keys of shards that lost their data while no router ran.
    /// A loaded shard without `MARKER_KEY` is new or lost its data; a copy
    /// whose key no shard holds and which the ring places on such a shard is
    /// that shard's key: it is written back there invisibly (same revisions,
    /// no event; nobody could read it since this router started). Any other
    /// copy matching no key is a leftover of a delete and is removed, except
    /// where the shard the ring places it on could not be asked (kept for
    /// now). Every loaded shard gets its marker once this is done. Returns
    /// the keys restored.
    pub(super) async fn adopt_replicas(&self, at: i64) -> usize {
        let shards: Vec<Arc<Shard>> = self
            .shard_list()
            .into_iter()
            .filter(|s| s.is_loaded())
            .collect();
        let mut lost = BTreeSet::new();
        let mut unknown: BTreeSet<ShardId> = self
            .shard_list()
            .iter()
            .filter(|s| !s.is_loaded())
            .map(|s| s.id.clone())
            .collect();
        for shard in &shards {
            match shard.has_marker().await {
                Ok(true) => {}
                Ok(false) => {
                    lost.insert(shard.id.clone());
                }
                Err(err) => {
                    warn!(shard = %shard.id, error = %err, "cannot read the shard's marker");
                    unknown.insert(shard.id.clone());
                }
            }
        }
        let mut restored = 0;
        if self.replication() {
            let mut orphans: BTreeMap<Bytes, (IndexEntry, Bytes, ShardId)> = BTreeMap::new();
            let mut garbage = Vec::new();
            for shard in &shards {
                let copies = match scan_copies(shard).await {
                    Ok(copies) => copies,
                    Err(err) => {
                        warn!(shard = %shard.id, error = %err, "cannot read replica copies; they will be written again");
                        continue;
                    }
                };
                let mut index = self.index.write().expect("index lock");
                let ring = self.ring.read().expect("ring lock");
                for (key, revision, meta, value) in copies {
                    match index.get_mut(&key) {
                        Some(entry) if entry.meta == meta && entry.shard != shard.id => {
                            entry.replica = Some(shard.id.clone());
                            continue;
                        }
                        Some(_) => {}
                        None => match ring.locate(&key) {
                            Some(owner) if lost.contains(&owner) => {
                                let newer = orphans
                                    .get(&key)
                                    .is_none_or(|(e, ..)| e.meta.mod_revision < meta.mod_revision);
                                if newer {
                                    let entry = IndexEntry {
                                        shard: owner,
                                        shard_mod_revision: 0,
                                        meta,
                                        replica: Some(shard.id.clone()),
                                    };
                                    if let Some((old, _, holder)) = orphans
                                        .insert(key.clone(), (entry, value, shard.id.clone()))
                                    {
                                        garbage.push((holder, key, old.meta.mod_revision));
                                    }
                                    continue;
                                }
                            }
                            Some(owner) if unknown.contains(&owner) => continue,
                            _ => {}
                        },
                    }
                    garbage.push((shard.id.clone(), key, revision));
                }
            }
            restored = self.restore_orphans(orphans, at).await;
            if !garbage.is_empty() {
                info!(
                    copies = garbage.len(),
                    "deleting replica copies of versions that no longer exist"
                );
                self.delete_copies(garbage).await;
            }
            self.replicas_dirty.store(true, Ordering::Release);
        }
        for shard in shards.iter().filter(|s| !unknown.contains(&s.id)) {
            if let Err(err) = shard.write_marker().await {
                warn!(shard = %shard.id, error = %err, "cannot write the shard's marker");
            }
        }
        restored
    }

    /// Writes back, at startup, the keys of shards that lost their data from
    /// their copies (see `adopt_replicas`); their cuts restart at `at` after it.
    async fn restore_orphans(
        &self,
        orphans: BTreeMap<Bytes, (IndexEntry, Bytes, ShardId)>,
        at: i64,
    ) -> usize {
        let mut by_owner: BTreeMap<ShardId, Vec<(Bytes, IndexEntry, Bytes, ShardId)>> =
            BTreeMap::new();
        for (key, (entry, value, holder)) in orphans {
            by_owner
                .entry(entry.shard.clone())
                .or_default()
                .push((key, entry, value, holder));
        }
        let mut restored = 0;
        for (owner, items) in by_owner {
            let Some(shard) = self.shard(&owner) else {
                continue;
            };
            let mut revision = None;
            for chunk in items.chunks(MAX_TXN_OPS) {
                let answer = match shard.txn(restore_txn(chunk)).await {
                    Ok(answer) if answer.succeeded => answer,
                    other => {
                        warn!(shard = %owner, keys = chunk.len(), answer = ?other.map(|a| a.succeeded), "cannot write keys back from their copies");
                        continue;
                    }
                };
                let shard_revision = answer.header.map(|h| h.revision).unwrap_or(0);
                let mut index = self.index.write().expect("index lock");
                for (key, entry, _, _) in chunk {
                    if entry.meta.lease != 0 {
                        self.leases
                            .restore(entry.meta.lease, entry.meta.lease_ttl, key.clone());
                    }
                    index.insert(
                        super::own_key(key),
                        IndexEntry {
                            shard_mod_revision: shard_revision,
                            ..entry.clone()
                        },
                    );
                }
                restored += chunk.len();
                revision = Some(shard_revision);
            }
            if let Some(revision) = revision {
                // Nothing was served yet: the shard's state at `at` includes them.
                shard.cuts.lock().expect("cuts lock").reset(
                    at,
                    revision,
                    super::CutLookup::Unknown,
                );
                info!(shard = %owner, keys = items.len(), "the shard lost its data while no router ran: its keys written back from their replica copies");
            }
        }
        self.metrics.keys_restored(restored);
        restored
    }
}

/// Puts restored values where the keys are absent.
fn restore_txn(items: &[(Bytes, IndexEntry, Bytes, ShardId)]) -> TxnRequest {
    TxnRequest {
        compare: items.iter().map(|(key, ..)| fence(key, 0)).collect(),
        success: items
            .iter()
            .map(|(key, _, value, _)| RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key: key.clone(),
                    value: value.clone(),
                    ..Default::default()
                })),
            })
            .collect(),
        failure: Vec::new(),
    }
}

fn delete_copy(key: &Bytes, revision: i64) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
            key: replica_key(key, revision),
            ..Default::default()
        })),
    }
}

/// The stored values (envelope included) of keys the index places on `shard`,
/// checked against the index's shard revisions.
pub(super) async fn read_values(
    shard: &Shard,
    entries: &[(Bytes, IndexEntry)],
) -> StoreResult<Vec<Bytes>> {
    let read = shard
        .txn(TxnRequest {
            success: entries
                .iter()
                .map(|(key, _)| RequestOp {
                    request: Some(Request::RequestRange(RangeRequest {
                        key: key.clone(),
                        ..Default::default()
                    })),
                })
                .collect(),
            ..Default::default()
        })
        .await?;
    let mut values = Vec::with_capacity(entries.len());
    for ((key, entry), response) in entries.iter().zip(read.responses) {
        let kv = match response.response {
            Some(Response::ResponseRange(r)) => r.kvs.into_iter().next(),
            _ => None,
        };
        match kv {
            Some(kv) if kv.mod_revision == entry.shard_mod_revision => values.push(kv.value),
            _ => {
                return Err(StoreError::Internal(format!(
                    "shard {} no longer holds {} as the index says",
                    shard.id,
                    crate::txn_shapes::show_key(key)
                )))
            }
        }
    }
    Ok(values)
}

/// The copies a shard holds: (key, revision, meta, stored value with its envelope).
async fn scan_copies(shard: &Shard) -> StoreResult<Vec<(Bytes, i64, envelope::Meta, Bytes)>> {
    let mut out = Vec::new();
    let copies = (Bytes::from_static(REPLICA_PREFIX), Bytes::from_static(&[0]));
    super::read_pages(shard, copies, 1000, false, |kv| {
        if let (Some((key, revision)), Ok((meta, _))) =
            (parse_replica_key(&kv.key), envelope::decode(&kv.value))
        {
            out.push((key, revision, meta, Bytes::copy_from_slice(&kv.value)));
        }
        Ok(())
    })
    .await?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_keys_round_trip_and_sort_after_every_client_key() {
        for key in [&b"/registry/pods/a"[..], b"", b"k\x00with-nul", b"\xff\xff"] {
            let stored = replica_key(key, 1_795_394_212_754_644);
            assert_eq!(
                parse_replica_key(&stored),
                Some((Bytes::copy_from_slice(key), 1_795_394_212_754_644))
            );
            assert!(clamp_range(&stored, &Bytes::new()).is_none());
        }
        let all = clamp_range(&Bytes::from_static(b"\0"), &Bytes::from_static(b"\0")).unwrap();
        assert_eq!(all.1.as_ref(), RESERVED_PREFIX);
        assert!(clamp_range(&Bytes::from_static(crate::shard::FENCE_KEY), &Bytes::new()).is_none());
        let pods = clamp_range(
            &Bytes::from_static(b"/registry/pods/"),
            &Bytes::from_static(b"/registry/pods0"),
        )
        .unwrap();
        assert_eq!(pods.1.as_ref(), b"/registry/pods0");
    }
}
