//! Bringing the index back in line with what a shard really holds (after
//! a write with an unknown outcome, an outage, or a shard that lost its
//! data): differences become ordinary events at a new revision.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use ste_etcd_proto::mvccpb::KeyValue;
use ste_etcd_proto::pb::{request_op::Request, PutRequest, RequestOp, TxnRequest};
use tracing::{info, warn};

use crate::envelope::{self, Meta};
use crate::error::{StoreError, StoreResult};
use crate::history::StoredEvent;
use crate::keys::owned_kv;
use crate::placement::index::{upsert, IndexEntry};
use crate::shard::kv::key_fence;
use crate::shard::scan::{delete_silently, scan_shard, scan_shard_changes, Scan, ScannedKey};
use crate::shard::{CutLookup, Shard, WriteState};
use crate::store::Store;
use crate::txn_shapes::MAX_TXN_OPS;

impl Store {
    pub(crate) async fn ensure_reconciled(
        &self,
        shard: &Shard,
        state: &mut WriteState,
    ) -> StoreResult<()> {
        if state.needs_reconcile || !shard.is_loaded() || shard.pending_replacement() {
            self.reconcile(shard, state).await?;
        }
        Ok(())
    }

    /// Brings the index back in line with what the shard really holds, after
    /// a write with an unknown outcome, an outage, or a shard that lost its
    /// data. Differences become ordinary events at a new revision: a value the
    /// router never announced is rewritten (PUT), a key the shard lost is
    /// announced deleted (DELETE), so every watcher converges on the truth.
    pub async fn reconcile(&self, shard: &Shard, state: &mut WriteState) -> StoreResult<()> {
        if !shard.is_loaded() && !state.needs_reconcile {
            return self.load_late(shard).await;
        }
        // Cleared only once the index matches the shard: a reconciliation
        // that fails half-way is retried before the shard's next write.
        state.needs_reconcile = true;
        shard.note_reconcile(state);
        // The shard's writes and moves wait on `state` (held by the caller),
        // so its cuts do not change during the scan and its index entries
        // change only through a shard loading late adopting a duplicate
        // (checked again where entries are updated below).
        let known = self.indexed_on(shard);
        let last_cut = shard
            .cuts
            .lock()
            .expect("cuts lock")
            .latest_shard_revision();
        let scan = scan_shard_changes(shard, &known, last_cut).await?;
        // Counted once the shard answered the scan (attempts while it is
        // still down are not reconciliations).
        self.metrics.reconciliation(shard.id.as_str());
        let lost_history = last_cut.is_some_and(|last| scan.revision < last) || scan.replaced;
        let scan_revision = scan.revision;
        let mut diff = self.differences(shard, &known, scan);
        if diff.is_empty() && !lost_history {
            state.needs_reconcile = false;
            shard.note_reconcile(state);
            shard.set_loaded(true);
            shard.set_healthy(true);
            return Ok(());
        }
        let mut shard_revision = self
            .repair_in_place(shard, &mut diff, lost_history, scan_revision)
            .await?;

        let assigned = self.sequencer.assign();
        let g = assigned.first();
        let mut events = Vec::new();
        for chunk in diff.rewrites.chunks(MAX_TXN_OPS) {
            match self
                .rewrite(shard, &known, chunk, g, shard_revision, &mut events)
                .await
            {
                Ok(revision) => shard_revision = revision,
                Err(err) => {
                    // Earlier chunks were written and their events go out at
                    // g: reads at g must see the shard as it is after them.
                    if shard_revision != scan_revision {
                        record_reconciled_cut(shard, g, shard_revision, lost_history);
                    }
                    assigned.publish(events);
                    return Err(err);
                }
            }
        }
        self.announce_lost(shard, &diff.lost, g, &mut events);
        record_reconciled_cut(shard, g, shard_revision, lost_history);
        if lost_history {
            // Its marker went with its data (see `MARKER_KEY`).
            if let Err(err) = shard.write_marker().await {
                warn!(shard = %shard.id, error = %err, "cannot write the shard's marker");
            }
        }
        warn!(
            shard = %shard.id,
            rewritten = diff.rewrites.len(),
            lost = diff.lost.len(),
            lost_history,
            revision = g,
            "reconciled shard with the index"
        );
        self.metrics.keys_lost(diff.lost.len());
        events.sort_by(|a, b| a.key().cmp(b.key()));
        self.metrics.events_written(events.len());
        assigned.publish(events);
        state.last_revision = g;
        state.needs_reconcile = false;
        shard.note_reconcile(state);
        shard.set_loaded(true);
        shard.set_healthy(true);
        Ok(())
    }

    /// First contact since startup: the keys were never visible, adopt them as they are.
    async fn load_late(&self, shard: &Shard) -> StoreResult<()> {
        let scan = scan_shard(shard).await?;
        let at = self.sequencer.published();
        let count = scan.items.len();
        if scan.replaced {
            shard.forget_history(scan.revision);
        }
        if let Err(err) = shard.write_marker().await {
            warn!(shard = %shard.id, error = %err, "cannot write the shard's marker");
        }
        self.adopt_scan(shard, scan, at);
        info!(shard = %shard.id, keys = count, "loaded shard late");
        Ok(())
    }

    /// The index entries of the keys placed on `shard`.
    fn indexed_on(&self, shard: &Shard) -> BTreeMap<Bytes, IndexEntry> {
        self.index
            .read()
            .expect("index lock")
            .iter()
            .filter(|(_, e)| e.shard == shard.id)
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect()
    }

    /// What differs between the index (`known`) and the shard's scan. A key
    /// whose only difference is its shard revision is fixed in the index here.
    fn differences(
        &self,
        shard: &Shard,
        known: &BTreeMap<Bytes, IndexEntry>,
        scan: Scan,
    ) -> Differences {
        let mut diff = Differences::default();
        for item in scan.items {
            match known.get(&item.key) {
                Some(entry) if entry.meta == item.meta => {
                    if entry.shard_mod_revision != item.shard_mod_revision {
                        // Only if still placed here: a shard loading late may
                        // have adopted the key meanwhile (it holds only its own lock).
                        if let Some(e) = self
                            .index
                            .write()
                            .expect("index lock")
                            .get_mut(&item.key)
                            .filter(|e| e.shard == shard.id)
                        {
                            e.shard_mod_revision = item.shard_mod_revision;
                        }
                    }
                }
                Some(_) => diff.rewrites.push(item),
                None => {
                    // The index has it on another shard: a copy left by an
                    // interrupted move, never visible here. Not a new key.
                    let elsewhere = self
                        .index
                        .read()
                        .expect("index lock")
                        .get(&item.key)
                        .is_some_and(|e| e.shard != shard.id);
                    if elsewhere {
                        diff.leftovers
                            .push((item.key.clone(), item.shard_mod_revision));
                    } else {
                        diff.rewrites.push(item);
                    }
                }
            }
        }
        diff.lost = known
            .iter()
            .filter(|(key, _)| !scan.present.contains(*key))
            .map(|(key, entry)| (key.clone(), entry.clone()))
            .collect();
        diff
    }

    /// What is fixed without an event: copies the shard held for others are
    /// forgotten if its history is gone, lost keys come back from their
    /// replica copies, copies left by a move are deleted. Returns the
    /// shard's revision after that.
    async fn repair_in_place(
        &self,
        shard: &Shard,
        diff: &mut Differences,
        lost_history: bool,
        scan_revision: i64,
    ) -> StoreResult<i64> {
        let mut shard_revision = scan_revision;
        if lost_history {
            // The copies it held for other shards' keys went with its data:
            // the index must stop counting on them (the repair pass copies
            // those keys again), or a later failure of their primaries loses them.
            self.forget_lost_copies(shard).await?;
        }
        // With replication, what the shard lost comes back from the copies.
        if let Some(revision) = self.restore_in_place(shard, &mut diff.lost).await {
            shard_revision = revision;
        }
        if !diff.leftovers.is_empty() {
            info!(shard = %shard.id, keys = diff.leftovers.len(), "deleting copies left by an interrupted move");
            shard_revision = delete_silently(shard, &diff.leftovers)
                .await?
                .unwrap_or(shard_revision);
        }
        Ok(shard_revision)
    }

    /// Writes one chunk of `rewrites` at global revision `g`, fenced on what
    /// the scan saw, and records them in the index and as PUT events.
    /// Returns the shard's revision after the write.
    async fn rewrite(
        &self,
        shard: &Shard,
        known: &BTreeMap<Bytes, IndexEntry>,
        chunk: &[ScannedKey],
        g: i64,
        shard_revision: i64,
        events: &mut Vec<Arc<StoredEvent>>,
    ) -> StoreResult<i64> {
        let mut ops = Vec::new();
        let mut compares = Vec::new();
        let mut written = Vec::new();
        for item in chunk {
            // As watchers saw it: a key the index had is updated (its
            // creation and version go on, the event carries the value
            // they knew as prev_kv: kube-apiserver refuses a non-create
            // event without one); a key it did not have is created at g.
            let indexed = known.get(&item.key);
            let meta = Meta {
                mod_revision: g,
                create_revision: indexed.map(|e| e.meta.create_revision).unwrap_or(g),
                version: indexed.map(|e| e.meta.version + 1).unwrap_or(1),
                ..item.meta
            };
            let prev = indexed.and_then(|entry| self.last_known_value(&item.key, entry));
            compares.push(key_fence(&item.key, item.shard_mod_revision));
            ops.push(RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key: item.key.clone(),
                    value: envelope::encode(&meta, &item.value),
                    ..Default::default()
                })),
            });
            written.push((item.key.clone(), meta, item.value.clone(), prev));
        }
        let answer = shard
            .txn(TxnRequest {
                compare: compares,
                success: ops,
                failure: Vec::new(),
            })
            .await?;
        if !answer.succeeded {
            return Err(StoreError::unavailable(
                shard.id.as_str(),
                "changed during reconciliation",
            ));
        }
        let shard_revision = answer.header.map(|h| h.revision).unwrap_or(shard_revision);
        let mut index = self.index.write().expect("index lock");
        for (key, meta, value, prev) in written {
            let old_lease = index.get(&key).map(|e| e.meta.lease).unwrap_or(0);
            upsert(
                &mut index,
                &key,
                IndexEntry::written(&shard.id, shard_revision, meta),
            );
            if meta.lease != 0 && self.leases.attachable_ttl(meta.lease).is_err() {
                self.leases.restore(meta.lease, meta.lease_ttl, key.clone());
            } else {
                self.leases.reattach(&key, old_lease, meta.lease);
            }
            events.push(Arc::new(StoredEvent::put(
                owned_kv(KeyValue {
                    key,
                    create_revision: meta.create_revision,
                    mod_revision: g,
                    version: meta.version,
                    value,
                    lease: meta.lease,
                }),
                prev.map(owned_kv),
            )));
        }
        Ok(shard_revision)
    }

    /// Removes the keys the shard lost from the index, as DELETE events at `g`.
    fn announce_lost(
        &self,
        shard: &Shard,
        lost: &[(Bytes, IndexEntry)],
        g: i64,
        events: &mut Vec<Arc<StoredEvent>>,
    ) {
        let mut index = self.index.write().expect("index lock");
        for (key, entry) in lost {
            if index.get(key).is_none_or(|e| e.shard != shard.id) {
                // Adopted from a shard loading late during the scan: not lost.
                continue;
            }
            index.remove(key);
            self.values.forget(key, &self.metrics);
            self.leases.reattach(key, entry.meta.lease, 0);
            let prev = self.last_known_value(key, entry);
            events.push(Arc::new(StoredEvent::delete(key.clone(), g, prev)));
        }
    }

    /// The value a lost key had, from the event history if it is still there.
    pub(crate) fn last_known_value(&self, key: &Bytes, entry: &IndexEntry) -> Option<KeyValue> {
        let revision = entry.meta.mod_revision;
        let found = self
            .history
            .read(revision, revision, |e| e.key() == &key[..])
            .ok()?;
        found.last().and_then(|e| e.event.kv.clone())
    }
}

/// The cut of a reconciliation's revision g; a shard that lost its history
/// cannot be read at any revision before g.
pub(crate) fn record_reconciled_cut(
    shard: &Shard,
    g: i64,
    shard_revision: i64,
    lost_history: bool,
) {
    let mut cuts = shard.cuts.lock().expect("cuts lock");
    if lost_history {
        cuts.reset(g, shard_revision, CutLookup::Unknown);
        // Its answers are judged against the new history from now on.
        shard.forget_history(shard_revision);
    } else {
        cuts.push(g, shard_revision);
    }
}

/// How a shard differs from the index.
#[derive(Default)]
struct Differences {
    /// Values the router never announced (or keys it never had): rewritten at a new revision.
    rewrites: Vec<ScannedKey>,
    /// Copies left by an interrupted move (the key is indexed on another shard).
    leftovers: Vec<(Bytes, i64)>,
    /// Keys indexed here that the shard no longer holds.
    lost: Vec<(Bytes, IndexEntry)>,
}

impl Differences {
    fn is_empty(&self) -> bool {
        self.rewrites.is_empty() && self.leftovers.is_empty() && self.lost.is_empty()
    }
}
