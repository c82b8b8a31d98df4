//! Keys restored from their copies: promoted to a new owner when their shard is lost, written back in place when it lost its data.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use ste_etcd_proto::pb::{
    request_op::Request, response_op::Response, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use tracing::{info, warn};

use crate::envelope::{self};
use crate::error::StoreResult;
use crate::keys::{own_key, replica_key};
use crate::placement::index::IndexEntry;
use crate::placement::ring::ShardId;
use crate::shard::kv::key_fence;
use crate::shard::{CutLookup, Shard};
use crate::store::Store;
use crate::txn_shapes::MAX_TXN_OPS;

use crate::replication::copies::scan_copies;

impl Store {
    /// For keys of a lost shard: reads their copies and writes the valid ones
    /// to the keys' new ring owners. Returns the keys restored. The caller
    /// holds every shard's write lock and has taken `lost` out of the ring.
    pub(crate) async fn promote_replicas(
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
    pub(crate) async fn restore_in_place(
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
        let assigned = self.sequencer.assign();
        let g = assigned.first();
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
        assigned.publish(Vec::new());
        self.replicas_dirty.store(true, Ordering::Release);
        self.metrics.keys_restored(restored.len());
        info!(lost = %lost, keys = restored.len(), revision = g, "promoted replica copies of a lost shard");
        restored
    }

    /// After `shard` lost its data: the index stops naming it as the replica
    /// of any key whose copy is not really there (read from the shard, not
    /// assumed), so those keys count as under-replicated and the repair
    /// pass copies them again. Returns how many keys lost their copy.
    pub(crate) async fn forget_lost_copies(&self, shard: &Shard) -> StoreResult<usize> {
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
    pub(crate) async fn adopt_replicas(&self, at: i64) -> usize {
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
                        own_key(key),
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
                shard
                    .cuts
                    .lock()
                    .expect("cuts lock")
                    .reset(at, revision, CutLookup::Unknown);
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
        compare: items.iter().map(|(key, ..)| key_fence(key, 0)).collect(),
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
