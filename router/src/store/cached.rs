//! Reads answered from the value cache (`placement::values`) instead of a
//! shard: a Range of one key, a Txn's read of one key, a value compare.
//!
//! Why an answer from the cache is the answer the shard would give:
//! - the index holds each key's latest version (the router is its shards'
//!   only writer), updated *before* that version's revision is published;
//!   so for a read at R ≤ published, an index entry with mod revision
//!   m ≤ R is the key's last version at or below R (any later write with a
//!   revision ≤ R would already be in the index), and an entry with m > R
//!   sends the read to the shard (the value at R is an older one);
//! - a cache entry is the value of exactly one (key, mod revision), so it is
//!   used only when the index's mod revision is that one: a write not yet
//!   published has a higher mod revision than any read at or below the
//!   published revision may accept, and a stale, evicted or missing entry
//!   only sends the read to the shard;
//! - the index is trusted only while it matches the shard: the shard is
//!   loaded, healthy, a member and has nothing to reconcile (no write of
//!   unknown outcome, no outage, no lost data: `Shard::is_settled`), the
//!   read's revision is not below a key move or a copy restore
//!   (`last_move`, checked after the index was read: a move raises it before
//!   it changes the index), the shard's state at R is known (its cuts), and
//!   this router leads within its renew deadline and was not deposed (a
//!   deposed leader's index may be behind what a newer leader wrote).
//!   Otherwise the shard answers, as before.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use ste_etcd_proto::mvccpb::KeyValue;
use ste_etcd_proto::pb::{RangeRequest, RangeResponse};

use crate::envelope::Meta;
use crate::shard::{CutLookup, Shard};
use crate::store::Store;

impl Store {
    /// This router may trust its index: no leader election, or leading
    /// within its renew deadline and not deposed.
    pub(crate) fn leads(&self) -> bool {
        self.config.fencing.as_ref().is_none_or(|f| f.leads())
    }

    /// A Range of one key answered from the cache, or None (read the shard).
    pub(crate) fn cached_range(&self, req: &RangeRequest) -> Option<RangeResponse> {
        if !self.values.enabled() || !req.range_end.is_empty() || !self.leads() {
            return None;
        }
        let revision = self.read_revision(req.revision).ok()?;
        let (key, meta, shard_id) = {
            let index = self.index.read().expect("index lock");
            let (key, entry) = index.get_key_value(&req.key)?;
            (key.clone(), entry.meta, entry.shard.clone())
        };
        // Read after the index: a move raises it before changing the index.
        if meta.mod_revision > revision || revision < self.last_move.load(Ordering::Acquire) {
            return None;
        }
        let shard = self.shard(&shard_id)?;
        if !shard.is_settled() || !state_known_at(&shard, revision) {
            return None;
        }
        let value = self.values.get(&key, meta.mod_revision, &self.metrics)?;
        let kvs = if req.count_only {
            Vec::new()
        } else {
            vec![KeyValue {
                key,
                create_revision: meta.create_revision,
                mod_revision: meta.mod_revision,
                version: meta.version,
                value: if req.keys_only { Bytes::new() } else { value },
                lease: meta.lease,
            }]
        };
        // As `range`: the data's revision for a read at 0, the current one
        // for a read at an explicit revision.
        let header = if req.revision > 0 {
            self.sequencer.published().max(revision)
        } else {
            revision
        };
        Some(RangeResponse {
            header: Some(self.header(header)),
            kvs,
            more: false,
            count: 1,
        })
    }

    /// Keeps a value a shard answered for a single-key read, if it is the
    /// key's current version (copied: the answer's buffer may be larger).
    pub(crate) fn remember_read(&self, kv: &KeyValue) {
        if !self.values.enabled() {
            return;
        }
        let key = {
            let index = self.index.read().expect("index lock");
            match index.get_key_value(&kv.key) {
                Some((key, entry)) if entry.meta.mod_revision == kv.mod_revision => key.clone(),
                _ => return,
            }
        };
        self.values.insert(
            &key,
            kv.mod_revision,
            Bytes::copy_from_slice(&kv.value),
            &self.metrics,
        );
    }

    /// The current version of a key on `shard` (its key, metadata and
    /// value) from the cache, for the shard's committer (which holds the
    /// write lock, so the index is exact for the shard once reconciled):
    /// Some(None) when the index has no such key, None when the shard must
    /// be asked.
    pub(crate) fn cached_latest(
        &self,
        shard: &Shard,
        key: &[u8],
    ) -> Option<Option<(Bytes, Meta, Bytes)>> {
        if !self.values.enabled() || !self.leads() || !shard.is_settled() {
            return None;
        }
        let (key, meta) = {
            let index = self.index.read().expect("index lock");
            match index.get_key_value(key) {
                Some((key, entry)) if entry.shard == shard.id => (key.clone(), entry.meta),
                Some(_) => return None,
                None => return Some(None),
            }
        };
        let value = self.values.get(&key, meta.mod_revision, &self.metrics)?;
        Some(Some((key, meta, value)))
    }

    /// A single-key Range inside a read-only Txn, answered from the index
    /// and the cache by the shard's committer (see `cached_latest`).
    pub(crate) fn cached_txn_read(
        &self,
        shard: &Shard,
        range: &RangeRequest,
    ) -> Option<RangeResponse> {
        if !range.range_end.is_empty() || range.revision > 0 {
            return None;
        }
        let kv = self
            .cached_latest(shard, &range.key)?
            .map(|(key, meta, value)| KeyValue {
                key,
                create_revision: meta.create_revision,
                mod_revision: meta.mod_revision,
                version: meta.version,
                value: if range.keys_only { Bytes::new() } else { value },
                lease: meta.lease,
            });
        let count = kv.is_some() as i64;
        Some(RangeResponse {
            header: None,
            kvs: if range.count_only {
                Vec::new()
            } else {
                kv.into_iter().collect()
            },
            more: false,
            count,
        })
    }
}

/// The shard's state at `revision` is known (its cuts reach back to it).
fn state_known_at(shard: &Shard, revision: i64) -> bool {
    shard.cuts.lock().expect("cuts lock").at(revision) != CutLookup::Unknown
}
