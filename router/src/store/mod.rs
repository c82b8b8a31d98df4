//! The narrow interface the etcd services call: range, txn (put and delete
//! are txns), multi-shard delete, compact, leases, status. Everything about
//! shards, global revisions and the index stays behind it.
//!
//! Invariants:
//! - the index (`key → shard, shard revision, global revisions, version,
//!   lease`) is exactly the content of the loaded shards, because the router is
//!   their only writer and every write holds its shard's write lock;
//! - a global revision is assigned under the write lock of every shard the
//!   write touches, so each shard commits in revision order and its cuts are
//!   monotonic;
//! - a response carrying revision G is sent only once G is published.

//!
//! One file per phase: `open` (loading the shards), `read` (Range),
//! `cached` (reads answered from the value cache),
//! `write/` (the group-commit queue, planning, committing), `delete`
//! (multi-shard deletes), `reconcile` (the index against a shard),
//! `health` (the periodic checks), `compact`, `leases`, `status`.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicI64};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ste_etcd_proto::pb::ResponseHeader;
use tokio_util::sync::CancellationToken;

use crate::error::{StoreError, StoreResult};
use crate::history::History;
use crate::leases::Leases;
use crate::metrics::Metrics;
use crate::placement::index::IndexEntry;
use crate::placement::ring::{Ring, ShardId};
use crate::placement::values::ValueCache;
use crate::revision::Sequencer;
use crate::shard::{Connector, Shard};

mod cached;
mod compact;
mod delete;
mod health;
mod leases;
mod open;
mod read;
mod reconcile;
mod status;
#[cfg(test)]
mod tests;
pub(crate) mod write;

/// The version reported by Maintenance.Status when no shard reports a newer
/// one: kube-apiserver keeps watch-progress based consistent reads only from 3.5.13 on.
pub const MIN_REPORTED_ETCD_VERSION: &str = "3.5.13";

#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub shard_timeout: Duration,
    pub vnodes: u32,
    pub history_max_events: usize,
    pub cluster_id: u64,
    pub member_id: u64,
    /// How long startup waits for unreachable shards before serving without them.
    pub load_timeout: Duration,
    /// mTLS towards `https://` shards.
    pub shard_tls: Option<crate::tls::ClientTls>,
    /// Copies of each key: 1 (a lost shard loses its keys) or 2 (a copy on a second shard).
    pub replication_factor: u8,
    /// The leader epoch every shard Txn is fenced with (leader election on).
    pub fencing: Option<crate::shard::Fencing>,
    /// Memory bound of the value cache (keys, values, overhead); 0 turns it off.
    pub value_cache_bytes: usize,
    /// How shards are spoken to (the router's own HTTP/2 connections, or tonic's `Channel`).
    pub shard_transport: crate::shard::ShardTransport,
}

/// The value cache's default bound: 256 MiB.
pub const DEFAULT_VALUE_CACHE_BYTES: usize = 256 << 20;

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            shard_timeout: Duration::from_secs(5),
            vnodes: 128,
            history_max_events: 200_000,
            cluster_id: 0x5445_5354_4552_4f55,
            member_id: 0x5354_452d_726f_7574,
            load_timeout: Duration::from_secs(30),
            shard_tls: None,
            replication_factor: 1,
            fencing: None,
            value_cache_bytes: DEFAULT_VALUE_CACHE_BYTES,
            shard_transport: crate::shard::ShardTransport::H2,
        }
    }
}

pub struct Store {
    pub(crate) config: StoreConfig,
    pub(crate) shards: RwLock<BTreeMap<ShardId, Arc<Shard>>>,
    pub(crate) ring: RwLock<Ring>,
    pub(crate) index: RwLock<BTreeMap<Bytes, IndexEntry>>,
    /// Values of some keys' versions, kept with the index (`store::cached`).
    pub(crate) values: ValueCache,
    pub(crate) sequencer: Sequencer,
    pub(crate) history: Arc<History>,
    pub(crate) leases: Leases,
    pub(crate) metrics: Arc<Metrics>,
    /// Cancelled by `shutdown`: requests are refused, streams end.
    pub(crate) closing: CancellationToken,
    /// Ranges below this revision would need a shard that left: ErrCompacted.
    pub(crate) range_floor: AtomicI64,
    /// The newest revision of a key move: single-key reads before it cannot
    /// trust the index for the key's shard and read every shard.
    pub(crate) last_move: AtomicI64,
    /// Keys found on two shards when loading: (shard of the copy to drop, key, its shard revision).
    pub(crate) duplicates: std::sync::Mutex<Vec<(ShardId, Bytes, i64)>>,
    /// Some key may lack its replica copy: the repair pass has work.
    pub(crate) replicas_dirty: AtomicBool,
    /// Some key may not be on its ring owner: the rebalance pass has work
    /// (with the time of the last ring change, after which writes planned
    /// before it may still land on the old owner).
    pub(crate) placement_dirty: AtomicBool,
    pub(crate) ring_changed: std::sync::Mutex<Instant>,
    /// For background work started from `&self` (replica cleanups).
    pub(crate) this: std::sync::OnceLock<std::sync::Weak<Store>>,
    /// How a shard joining the ring is reached.
    pub(crate) connector: Connector,
}

impl Store {
    pub fn sequencer(&self) -> &Sequencer {
        &self.sequencer
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn header(&self, revision: i64) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.config.cluster_id,
            member_id: self.config.member_id,
            revision,
            raft_term: 1,
        }
    }

    /// Refuses new requests and ends open watch and keep-alive streams.
    pub fn shutdown(&self) {
        self.closing.cancel();
    }

    /// Cancelled once `shutdown` was called (or the process shuts down).
    pub fn closing(&self) -> CancellationToken {
        self.closing.clone()
    }

    pub(crate) fn check_open(&self) -> StoreResult<()> {
        if self.closing.is_cancelled() {
            Err(StoreError::NotReady("shutting down".into()))
        } else {
            Ok(())
        }
    }

    pub fn shard_list(&self) -> Vec<Arc<Shard>> {
        self.shards
            .read()
            .expect("shards lock")
            .values()
            .cloned()
            .collect()
    }

    pub(crate) fn shard(&self, id: &ShardId) -> Option<Arc<Shard>> {
        self.shards.read().expect("shards lock").get(id).cloned()
    }

    /// True when every shard is loaded and answered its last health check.
    pub fn is_ready(&self) -> bool {
        let shards = self.shard_list();
        !shards.is_empty() && shards.iter().all(|s| s.is_loaded() && s.is_healthy())
    }

    pub fn key_count(&self) -> usize {
        self.index.read().expect("index lock").len()
    }

    /// Keys per shard. Counted a slice of the index at a time, so writes
    /// update the index in between rather than waiting for the whole count.
    pub fn keys_per_shard(&self) -> BTreeMap<ShardId, usize> {
        const SLICE: usize = 8192;
        let mut counts: BTreeMap<ShardId, usize> = self
            .shard_list()
            .iter()
            .map(|s| (s.id.clone(), 0))
            .collect();
        let mut after: Option<Bytes> = None;
        loop {
            let index = self.index.read().expect("index lock");
            let range = match &after {
                Some(key) => index.range::<Bytes, _>((Bound::Excluded(key), Bound::Unbounded)),
                None => index.range::<Bytes, _>(..),
            };
            let mut last = None;
            for (key, entry) in range.take(SLICE) {
                *counts.entry(entry.shard.clone()).or_default() += 1;
                last = Some(key);
            }
            match last {
                Some(key) => after = Some(key.clone()),
                None => return counts,
            }
        }
    }

    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// The shard that holds `key`, or where a new `key` goes.
    pub(crate) fn shard_for_key(&self, key: &[u8]) -> StoreResult<Arc<Shard>> {
        let located = self
            .index
            .read()
            .expect("index lock")
            .get(key)
            .map(|e| e.shard.clone());
        let id = match located {
            Some(id) => id,
            None => self
                .ring
                .read()
                .expect("ring lock")
                .locate(key)
                .ok_or_else(|| StoreError::NotReady("no shards are configured".into()))?,
        };
        self.shard(&id)
            .ok_or_else(|| StoreError::Internal(format!("shard {id} is placed but not known")))
    }
}
