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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use futures::StreamExt;
use ste_etcd_proto::mvccpb::{event::EventType, KeyValue};
use ste_etcd_proto::pb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    range_request::{SortOrder, SortTarget},
    request_op::Request,
    response_op::Response,
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, ResponseHeader, ResponseOp, StatusResponse, TxnRequest, TxnResponse,
};
use tokio::sync::{oneshot, MutexGuard};
use tracing::{info, warn};

use crate::envelope::{self, Meta};
use crate::error::{StoreError, StoreResult};
use crate::history::{key_in_range, History, StoredEvent};
use crate::leases::{LeaseInfo, Leases};
use crate::metrics::Metrics;
use crate::ring::{Ring, ShardId};
use crate::sequencer::{starting_revision, Sequencer};
use crate::shard::{
    etcd_connector, write_certainly_not_applied, Connector, CutLookup, Shard, ShardSpec, WriteState,
};
use crate::txn_shapes::{self, show_key, MAX_TXN_OPS};

mod moves;
mod replicas;
#[cfg(test)]
mod tests;
pub use moves::DrainProgress;
pub use replicas::{REPLICA_PREFIX, RESERVED_PREFIX};

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
}

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
        }
    }
}

/// Where a key lives and its global metadata; the router's copy of the shards' state.
#[derive(Debug, Clone)]
struct IndexEntry {
    shard: ShardId,
    shard_mod_revision: i64,
    meta: Meta,
    /// The shard holding a copy of exactly this version (replication factor 2).
    replica: Option<ShardId>,
}

impl IndexEntry {
    /// A version just written to `shard` (its copy, if any, is recorded after).
    fn written(shard: &ShardId, shard_mod_revision: i64, meta: Meta) -> Self {
        IndexEntry {
            shard: shard.clone(),
            shard_mod_revision,
            meta,
            replica: None,
        }
    }
}

/// What a write txn will do to one key, decided before the shard is asked.
enum PlannedOp {
    Put {
        key: Bytes,
        meta: Meta,
        value: Bytes,
        want_prev: bool,
        old_lease: i64,
    },
    Delete {
        key: Bytes,
        want_prev: bool,
        existed: bool,
        sent: bool,
    },
    Range {
        keys_only: bool,
        count_only: bool,
    },
}

impl PlannedOp {
    fn sent_to_shard(&self) -> bool {
        !matches!(self, PlannedOp::Delete { sent: false, .. })
    }
}

pub struct Store {
    config: StoreConfig,
    shards: RwLock<BTreeMap<ShardId, Arc<Shard>>>,
    ring: RwLock<Ring>,
    index: RwLock<BTreeMap<Bytes, IndexEntry>>,
    sequencer: Sequencer,
    history: Arc<History>,
    leases: Leases,
    metrics: Arc<Metrics>,
    closed: AtomicBool,
    closing: tokio::sync::watch::Sender<bool>,
    /// Ranges below this revision would need a shard that left: ErrCompacted.
    range_floor: AtomicI64,
    /// The newest revision of a key move: single-key reads before it cannot
    /// trust the index for the key's shard and read every shard.
    last_move: AtomicI64,
    /// Keys found on two shards when loading: (shard of the copy to drop, key, its shard revision).
    duplicates: std::sync::Mutex<Vec<(ShardId, Bytes, i64)>>,
    /// Some key may lack its replica copy: the repair pass has work.
    replicas_dirty: AtomicBool,
    /// Some key may not be on its ring owner: the rebalance pass has work
    /// (with the time of the last ring change, after which writes planned
    /// before it may still land on the old owner).
    placement_dirty: AtomicBool,
    ring_changed: std::sync::Mutex<Instant>,
    /// For background work started from `&self` (replica cleanups).
    this: std::sync::OnceLock<std::sync::Weak<Store>>,
    /// How a shard joining the ring is reached.
    connector: Connector,
}

fn zero_kv_meta() -> Meta {
    Meta::default()
}

impl Store {
    /// Connects to the shards, loads their keys (waiting up to
    /// `load_timeout` for unreachable ones, which then load in the
    /// background) and picks the starting revision.
    pub async fn open(
        config: StoreConfig,
        specs: &[ShardSpec],
        metrics: Arc<Metrics>,
    ) -> StoreResult<Arc<Store>> {
        let connector = etcd_connector(config.shard_timeout, config.shard_tls.clone());
        Self::open_with(config, specs, metrics, connector).await
    }

    /// `open`, with the shards (and those joining later) reached through
    /// `connector` instead of gRPC (unit tests use in-memory shards).
    pub async fn open_with(
        config: StoreConfig,
        specs: &[ShardSpec],
        metrics: Arc<Metrics>,
        connector: Connector,
    ) -> StoreResult<Arc<Store>> {
        let mut shards = BTreeMap::new();
        let mut ring = Ring::new(config.vnodes);
        for spec in specs {
            if shards.contains_key(&spec.id) {
                return Err(StoreError::Internal(format!(
                    "shard name {} is given twice",
                    spec.id
                )));
            }
            let shard =
                Arc::new(Shard::connect(spec, &connector)?.with_fencing(config.fencing.clone()));
            ring.add(&spec.id);
            shards.insert(spec.id.clone(), shard);
        }

        // Scan every shard, retrying unreachable ones until the deadline.
        let deadline = Instant::now() + config.load_timeout;
        let mut scans: HashMap<ShardId, Scan> = HashMap::new();
        loop {
            let pending: Vec<Arc<Shard>> = shards
                .values()
                .filter(|s| !scans.contains_key(&s.id))
                .cloned()
                .collect();
            let results = join_all(pending.iter().map(|s| scan_shard(s))).await;
            for (shard, result) in pending.iter().zip(results) {
                match result {
                    Ok(scan) => {
                        info!(shard = %shard.id, keys = scan.items.len(), "loaded shard");
                        scans.insert(shard.id.clone(), scan);
                    }
                    Err(StoreError::Internal(msg)) => return Err(StoreError::Internal(msg)),
                    Err(err) => warn!(shard = %shard.id, error = %err, "shard not reachable yet"),
                }
            }
            if scans.len() == shards.len() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }

        let highest = scans
            .values()
            .flat_map(|scan| scan.items.iter().map(|item| item.meta.mod_revision))
            .max()
            .unwrap_or(0);
        let start = starting_revision(highest);
        let history = Arc::new(History::new(start, config.history_max_events));
        let store = Arc::new(Store {
            sequencer: Sequencer::new(start, history.clone()),
            history,
            config,
            shards: RwLock::new(shards),
            ring: RwLock::new(ring),
            index: RwLock::new(BTreeMap::new()),
            leases: Leases::default(),
            metrics,
            closed: AtomicBool::new(false),
            closing: tokio::sync::watch::channel(false).0,
            range_floor: AtomicI64::new(0),
            last_move: AtomicI64::new(0),
            duplicates: std::sync::Mutex::new(Vec::new()),
            replicas_dirty: AtomicBool::new(true),
            placement_dirty: AtomicBool::new(true),
            ring_changed: std::sync::Mutex::new(Instant::now()),
            this: std::sync::OnceLock::new(),
            connector,
        });
        let _ = store.this.set(Arc::downgrade(&store));
        for (id, scan) in scans {
            let shard = store.shard(&id).expect("shard exists");
            store.adopt_scan(&shard, scan, start);
        }
        store.resolve_duplicates().await;
        store.adopt_replicas(start).await;
        if store.config.fencing.is_some() {
            // A newer fence anywhere marks this router deposed (it steps down).
            let fenced = join_all(
                store
                    .shard_list()
                    .iter()
                    .map(|s| async move { (s.id.clone(), s.fence_now().await) }),
            )
            .await;
            for (id, result) in fenced {
                if let Err(err) = result {
                    warn!(shard = %id, error = %err, "cannot raise the leader fence yet; it is raised before the first write");
                }
            }
        }
        info!(revision = start, "router store open");
        Ok(store)
    }

    /// After a restart, a key on two shards is a move the router did not
    /// finish: the copy the index did not keep (see `adopt_scan`) is deleted
    /// before anything is served.
    async fn resolve_duplicates(&self) {
        let duplicates: Vec<(ShardId, Bytes, i64)> =
            std::mem::take(&mut *self.duplicates.lock().expect("duplicates lock"));
        let mut by_shard: BTreeMap<ShardId, Vec<(Bytes, i64)>> = BTreeMap::new();
        for (shard, key, shard_mod) in duplicates {
            by_shard.entry(shard).or_default().push((key, shard_mod));
        }
        for (id, keys) in by_shard {
            let Some(shard) = self.shard(&id) else {
                continue;
            };
            match moves::delete_silently(&shard, &keys).await {
                Ok(revision) => {
                    info!(shard = %id, keys = keys.len(), "deleted copies left by an interrupted move");
                    if let Some(revision) = revision {
                        let at = self.sequencer.published();
                        shard.cuts.lock().expect("cuts lock").reset(
                            at,
                            revision,
                            CutLookup::Unknown,
                        );
                    }
                }
                Err(err) => {
                    warn!(shard = %id, error = %err, "cannot delete copies left by a move yet; reconciling later");
                    shard.write.lock().await.needs_reconcile = true;
                    shard.set_loaded(false);
                }
            }
        }
    }

    /// Puts a scanned shard's keys into the index, as they are (no events:
    /// nobody could have listed the shard while it was not loaded). A key
    /// already indexed on another shard keeps the copy with the newer
    /// revision (equal: the one the ring places); the other is a duplicate.
    fn adopt_scan(&self, shard: &Shard, scan: Scan, at: i64) {
        {
            let mut index = self.index.write().expect("index lock");
            let ring = self.ring.read().expect("ring lock");
            let mut duplicates = self.duplicates.lock().expect("duplicates lock");
            for item in scan.items {
                if let Some(existing) = index.get(&item.key) {
                    if existing.shard != shard.id {
                        let keep_new = item.meta.mod_revision > existing.meta.mod_revision
                            || (item.meta.mod_revision == existing.meta.mod_revision
                                && ring.locate(&item.key).as_ref() == Some(&shard.id));
                        if !keep_new {
                            duplicates.push((shard.id.clone(), item.key, item.shard_mod_revision));
                            continue;
                        }
                        duplicates.push((
                            existing.shard.clone(),
                            item.key.clone(),
                            existing.shard_mod_revision,
                        ));
                    }
                }
                if item.meta.lease != 0 {
                    self.leases
                        .restore(item.meta.lease, item.meta.lease_ttl, item.key.clone());
                }
                index.insert(
                    own_key(&item.key),
                    IndexEntry {
                        shard: shard.id.clone(),
                        shard_mod_revision: item.shard_mod_revision,
                        meta: item.meta,
                        replica: None,
                    },
                );
            }
        }
        shard
            .cuts
            .lock()
            .expect("cuts lock")
            .reset(at, scan.revision, CutLookup::Unknown);
        shard.set_loaded(true);
        shard.set_healthy(true);
    }

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
        self.closed.store(true, Ordering::Release);
        self.closing.send_replace(true);
    }

    pub fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Completes once `shutdown` was called.
    pub async fn until_closed(rx: &mut tokio::sync::watch::Receiver<bool>) {
        let _ = rx.wait_for(|closed| *closed).await.map(|_| ());
    }

    fn check_open(&self) -> StoreResult<()> {
        if self.closed.load(Ordering::Acquire) {
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

    fn shard(&self, id: &ShardId) -> Option<Arc<Shard>> {
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
    fn shard_for_key(&self, key: &[u8]) -> StoreResult<Arc<Shard>> {
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

    // ---------------------------------------------------------------- reads

    /// Resolves a requested read revision (0 = current) against the window.
    fn read_revision(&self, requested: i64) -> StoreResult<i64> {
        let current = self.sequencer.published();
        if requested <= 0 {
            return Ok(current);
        }
        if requested > current {
            return Err(StoreError::FutureRevision);
        }
        if requested < self.history.compact_revision()
            || requested < self.range_floor.load(Ordering::Acquire)
        {
            return Err(StoreError::Compacted);
        }
        Ok(requested)
    }

    pub async fn range(&self, req: RangeRequest) -> StoreResult<RangeResponse> {
        self.check_open()?;
        if req.key.is_empty() {
            return Err(StoreError::EmptyKey);
        }
        check_range_options(&req)?;
        let (revision, reads) = self.plan_read(&req).await?;
        // Keys are spread evenly, so a page of `limit` needs about limit/n keys
        // from each shard: ask for a little more than that and fetch the rest
        // of a shard only if the merge shows it may hold keys of the page.
        let lazy = req.limit > 0
            && !req.count_only
            && reads.len() > 1
            && req.sort_order != SortOrder::Descend as i32
            && reads
                .iter()
                .all(|(_, cut)| matches!(cut, CutLookup::At(_) | CutLookup::Empty));
        let first_limit = if lazy {
            let n = reads.len() as i64;
            (req.limit / n + req.limit / (4 * n) + 16).min(req.limit)
        } else {
            req.limit
        };
        let answers = join_all(
            reads
                .iter()
                .map(|(shard, cut)| self.read_shard_at(shard, &req, *cut, revision, first_limit)),
        )
        .await;
        let mut count = 0;
        let mut parts = Vec::with_capacity(answers.len());
        for answer in answers {
            let (shard_count, shard_kvs, shard_more) = answer?;
            count += shard_count;
            parts.push((shard_kvs, shard_more));
        }
        if lazy {
            loop {
                let mut fetched: Vec<&Bytes> = parts
                    .iter()
                    .flat_map(|(kvs, _)| kvs.iter().map(|kv| &kv.key))
                    .collect();
                // The page ends at the limit-th key fetched so far (or is open-ended).
                let boundary = if fetched.len() >= req.limit as usize {
                    fetched.sort();
                    Some(fetched[req.limit as usize - 1].clone())
                } else {
                    None
                };
                let behind: Vec<usize> = parts
                    .iter()
                    .enumerate()
                    .filter(|(_, (kvs, more))| {
                        *more
                            && match (kvs.last(), &boundary) {
                                (Some(last), Some(boundary)) => last.key < *boundary,
                                _ => true,
                            }
                    })
                    .map(|(i, _)| i)
                    .collect();
                if behind.is_empty() {
                    break;
                }
                let more = join_all(behind.iter().map(|&i| {
                    let (shard, cut) = &reads[i];
                    let after = parts[i].0.last().map(|kv| next_key(&kv.key));
                    let next = RangeRequest {
                        key: after.unwrap_or_else(|| req.key.clone()),
                        ..req.clone()
                    };
                    async move {
                        self.read_shard_at(shard, &next, *cut, revision, first_limit)
                            .await
                    }
                }))
                .await;
                for (&i, answer) in behind.iter().zip(more) {
                    let (_, shard_kvs, shard_more) = answer?;
                    parts[i].0.extend(shard_kvs);
                    parts[i].1 = shard_more;
                }
            }
        }
        let mut kvs: Vec<KeyValue> = parts.into_iter().flat_map(|(kvs, _)| kvs).collect();
        if req.count_only {
            kvs.clear();
        } else {
            kvs.sort_by(|a, b| a.key.cmp(&b.key));
            if req.sort_order == SortOrder::Descend as i32 {
                kvs.reverse();
            }
        }
        let mut more = false;
        if req.limit > 0 && kvs.len() > req.limit as usize {
            kvs.truncate(req.limit as usize);
        }
        if req.limit > 0 && !req.count_only && count > kvs.len() as i64 {
            more = true;
        }
        if req.keys_only {
            for kv in &mut kvs {
                kv.value = Bytes::new();
            }
        }
        // A Range at revision 0 answers with the revision its data was read
        // at. A later one (what is published by now) would be ahead of the
        // data: kube-apiserver lists, then watches from this header, and
        // would never see the writes in between. A Range at an explicit
        // revision answers, like etcd, with the current revision (the
        // client knows what it asked; headers never go back).
        let header = if req.revision > 0 {
            self.sequencer.published().max(revision)
        } else {
            revision
        };
        Ok(RangeResponse {
            header: Some(self.header(header)),
            kvs,
            more,
            count,
        })
    }

    /// The revision a Range reads at, and each shard's cut at it. A read at
    /// revision 0 never answers ErrCompacted (etcd would not): if it raced
    /// a shard's history being reset (the shard lost its data and was just
    /// reconciled at g), it reads again once g is published.
    async fn plan_read(
        &self,
        req: &RangeRequest,
    ) -> StoreResult<(i64, Vec<(Arc<Shard>, CutLookup)>)> {
        for _ in 0..3 {
            let revision = self.read_revision(req.revision)?;
            let shards = if req.range_end.is_empty() {
                let located = self.shard_for_key(&req.key)?;
                // Looked up before checking for moves: a move updates the index
                // only after raising `last_move`.
                if revision < self.last_move.load(Ordering::Acquire) {
                    self.shard_list()
                } else {
                    vec![located]
                }
            } else {
                self.shard_list()
            };
            let mut reads = Vec::new();
            let mut reset_at = None;
            for shard in &shards {
                let removed_at = shard.removed_at.load(Ordering::Acquire);
                if removed_at != 0 && revision >= removed_at {
                    continue;
                }
                shard.require_loaded()?;
                let (cut, first) = {
                    let cuts = shard.cuts.lock().expect("cuts lock");
                    (cuts.at(revision), cuts.first_revision())
                };
                if req.revision <= 0 && cut == CutLookup::Unknown {
                    reset_at = first;
                    break;
                }
                reads.push((shard.clone(), cut));
            }
            match reset_at {
                None => return Ok((revision, reads)),
                Some(g) => {
                    let _ = tokio::time::timeout(
                        self.config.shard_timeout,
                        self.sequencer.wait_published(g),
                    )
                    .await;
                }
            }
        }
        Err(StoreError::unavailable(
            "(several)",
            "a shard's history is being reset after it lost its data; retry",
        ))
    }

    /// One shard's part of a Range at global `revision`: its count and kvs
    /// (with global revisions), at most `limit` + what the batch overlay needs.
    async fn read_shard_at(
        &self,
        shard: &Shard,
        req: &RangeRequest,
        cut: CutLookup,
        revision: i64,
        limit: i64,
    ) -> StoreResult<(i64, Vec<KeyValue>, bool)> {
        let Some((key, range_end)) = replicas::clamp_range(&req.key, &req.range_end) else {
            return Ok((0, Vec::new(), false));
        };
        let read = |shard_revision: i64, extra: i64| {
            shard.range(RangeRequest {
                key: key.clone(),
                range_end: range_end.clone(),
                limit: if limit > 0 { limit + extra } else { 0 },
                revision: shard_revision,
                count_only: req.count_only,
                ..Default::default()
            })
        };
        let translate_all = |answer: RangeResponse| -> StoreResult<(i64, Vec<KeyValue>, bool)> {
            let kvs = answer
                .kvs
                .into_iter()
                .map(|kv| translate_kv(&shard.id, kv))
                .collect::<StoreResult<Vec<_>>>()?;
            Ok((answer.count, kvs, answer.more))
        };
        match cut {
            CutLookup::Unknown => Err(StoreError::Compacted),
            CutLookup::Empty => Ok((0, Vec::new(), false)),
            CutLookup::At(shard_revision) => {
                let answer = read(shard_revision, 0)
                    .await
                    .map_err(|e| shard_read_error(shard, e))?;
                translate_all(answer)
            }
            CutLookup::Within { base, from } => {
                // The batch's events up to `revision`, applied to the shard before the batch.
                let overlay = self.history.read(from, revision, |e| {
                    key_in_range(e.key(), &req.key, &req.range_end)
                })?;
                let (mut count, kvs, more) = match base {
                    Some(shard_revision) => translate_all(
                        read(shard_revision, overlay.len() as i64)
                            .await
                            .map_err(|e| shard_read_error(shard, e))?,
                    )?,
                    None => (0, Vec::new(), false),
                };
                let last_read = kvs.last().map(|kv| kv.key.clone());
                let mut by_key: BTreeMap<Bytes, KeyValue> =
                    kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
                for stored in overlay {
                    let existed = stored.event.prev_kv.is_some();
                    let Some(kv) = stored.event.kv.clone() else {
                        continue;
                    };
                    if stored.event.r#type == EventType::Put as i32 {
                        if !existed {
                            count += 1;
                        }
                        if !req.count_only {
                            by_key.insert(kv.key.clone(), kv);
                        }
                    } else {
                        if existed {
                            count -= 1;
                        }
                        by_key.remove(&kv.key);
                    }
                }
                if more {
                    // Keys past the last one read may have others before them on the shard.
                    if let Some(last) = last_read {
                        by_key.retain(|key, _| *key <= last);
                    }
                }
                Ok((count, by_key.into_values().collect(), more))
            }
        }
    }

    // ---------------------------------------------------------------- writes

    /// Runs a write to completion even if the caller goes away: a revision,
    /// once assigned, must always be finished or publication would stall.
    async fn detached<T, F>(self: &Arc<Self>, work: F) -> StoreResult<T>
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

    /// Decides the branch of a txn from the index and validates its ops.
    async fn plan_txn(&self, shard: &Shard, req: &TxnRequest) -> StoreResult<TxnPlan> {
        let succeeded = self.evaluate_compares(shard, &req.compare).await?;
        let ops = if succeeded {
            &req.success
        } else {
            &req.failure
        };
        let mut prepared = Vec::with_capacity(ops.len());
        for op in ops {
            prepared.push(self.prepare_op(shard, op.clone()).await?);
        }
        let writes = prepared.iter().any(|op| match op {
            PreparedOp::Put { .. } => true,
            PreparedOp::Delete { entry, .. } => entry.is_some(),
            PreparedOp::Range(_) => false,
        });
        Ok(TxnPlan {
            succeeded,
            ops: prepared,
            writes,
        })
    }

    async fn commit_batch(&self, shard: &Shard, state: &mut WriteState, batch: Batch) {
        let writers = batch.items.iter().filter(|(_, plan)| plan.writes).count() as i64;
        // A block of consecutive revisions, so a read inside the batch can be
        // answered from the shard before it plus the batch's events.
        let first = if writers > 0 {
            self.sequencer.assign_block(writers)
        } else {
            0
        };
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
                match shard
                    .txn(TxnRequest {
                        compare: fences,
                        success: shard_ops,
                        failure: Vec::new(),
                    })
                    .await
                {
                    Ok(answer) if answer.succeeded => Ok(answer),
                    Ok(_) => {
                        state.needs_reconcile = true;
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
                for g in (first..=last).filter(|_| writers > 0) {
                    self.sequencer.finish(g, Vec::new());
                }
                for (pending, ..) in planned {
                    let _ = pending.reply.send(Err(err.clone()));
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
                self.sequencer.finish(g, events);
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
            let _ = pending.reply.send(reply);
        }
        self.record_replicas(copied, planned_puts);
        self.spawn_cleanup(cleanups);
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

    async fn evaluate_compares(&self, shard: &Shard, compares: &[Compare]) -> StoreResult<bool> {
        for compare in compares {
            let entry = self
                .index
                .read()
                .expect("index lock")
                .get(&compare.key)
                .cloned();
            let ordering = match (
                CompareTarget::try_from(compare.target),
                &compare.target_union,
            ) {
                (Ok(CompareTarget::Value), Some(TargetUnion::Value(expected))) => {
                    if entry.is_none() {
                        // etcd: a value compare on a missing key is always false.
                        return Ok(false);
                    }
                    let current = self.read_latest_value(shard, &compare.key).await?;
                    match current {
                        Some(value) => value[..].cmp(&expected[..]),
                        None => return Ok(false),
                    }
                }
                (Ok(target), Some(union)) => {
                    let meta = entry.map(|e| e.meta).unwrap_or_else(zero_kv_meta);
                    let (have, want) = match (target, union) {
                        (CompareTarget::Version, TargetUnion::Version(v)) => (meta.version, *v),
                        (CompareTarget::Create, TargetUnion::CreateRevision(v)) => {
                            (meta.create_revision, *v)
                        }
                        (CompareTarget::Mod, TargetUnion::ModRevision(v)) => {
                            (meta.mod_revision, *v)
                        }
                        (CompareTarget::Lease, TargetUnion::Lease(v)) => (meta.lease, *v),
                        _ => {
                            return Err(StoreError::Unsupported(format!(
                                "a compare whose target ({:?}) and value disagree",
                                target
                            )))
                        }
                    };
                    have.cmp(&want)
                }
                (Ok(CompareTarget::Version), None) => {
                    // proto3 drops zero: `Version(k) == 0` arrives without a union.
                    let meta = entry.map(|e| e.meta).unwrap_or_else(zero_kv_meta);
                    meta.version.cmp(&0)
                }
                (Ok(target), None) => {
                    let meta = entry.map(|e| e.meta).unwrap_or_else(zero_kv_meta);
                    let have = match target {
                        CompareTarget::Create => meta.create_revision,
                        CompareTarget::Mod => meta.mod_revision,
                        CompareTarget::Lease => meta.lease,
                        CompareTarget::Version => meta.version,
                        CompareTarget::Value => return Ok(false),
                    };
                    have.cmp(&0)
                }
                (Err(_), _) => {
                    return Err(StoreError::Unsupported(format!(
                        "compare target {}",
                        compare.target
                    )))
                }
            };
            let holds = match CompareResult::try_from(compare.result) {
                Ok(CompareResult::Equal) => ordering.is_eq(),
                Ok(CompareResult::NotEqual) => !ordering.is_eq(),
                Ok(CompareResult::Greater) => ordering.is_gt(),
                Ok(CompareResult::Less) => ordering.is_lt(),
                Err(_) => {
                    return Err(StoreError::Unsupported(format!(
                        "compare result {}",
                        compare.result
                    )))
                }
            };
            if !holds {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The current client value of a key (the caller holds the shard's write lock).
    async fn read_latest_value(&self, shard: &Shard, key: &Bytes) -> StoreResult<Option<Bytes>> {
        let answer = shard
            .range(RangeRequest {
                key: key.clone(),
                ..Default::default()
            })
            .await?;
        match answer.kvs.into_iter().next() {
            Some(kv) => Ok(Some(translate_kv(&shard.id, kv)?.value)),
            None => Ok(None),
        }
    }

    fn translate_range(
        &self,
        shard: &ShardId,
        answer: RangeResponse,
        asked: &RangeRequest,
    ) -> StoreResult<RangeResponse> {
        let mut kvs = Vec::with_capacity(answer.kvs.len());
        for kv in answer.kvs {
            let mut kv = translate_kv(shard, kv)?;
            if asked.keys_only {
                kv.value = Bytes::new();
            }
            kvs.push(kv);
        }
        Ok(RangeResponse {
            header: None,
            kvs,
            more: answer.more,
            count: answer.count,
        })
    }

    async fn prepare_op(&self, shard: &Shard, op: RequestOp) -> StoreResult<PreparedOp> {
        match op.request {
            Some(Request::RequestPut(put)) => {
                let entry = self
                    .index
                    .read()
                    .expect("index lock")
                    .get(&put.key)
                    .cloned();
                if put.ignore_value && !put.value.is_empty() {
                    return Err(StoreError::ValueProvided);
                }
                if put.ignore_lease && put.lease != 0 {
                    return Err(StoreError::LeaseProvided);
                }
                if (put.ignore_value || put.ignore_lease) && entry.is_none() {
                    return Err(StoreError::KeyNotFound);
                }
                let value = if put.ignore_value {
                    self.read_latest_value(shard, &put.key)
                        .await?
                        .ok_or(StoreError::KeyNotFound)?
                } else {
                    put.value.clone()
                };
                let lease = if put.ignore_lease {
                    entry.as_ref().map(|e| e.meta.lease).unwrap_or(0)
                } else {
                    put.lease
                };
                let lease_ttl = if lease != 0 {
                    self.leases.attachable_ttl(lease)?
                } else {
                    0
                };
                Ok(PreparedOp::Put {
                    key: put.key,
                    value,
                    lease,
                    lease_ttl,
                    want_prev: put.prev_kv,
                    entry,
                })
            }
            Some(Request::RequestDeleteRange(delete)) => {
                let entry = self
                    .index
                    .read()
                    .expect("index lock")
                    .get(&delete.key)
                    .cloned();
                Ok(PreparedOp::Delete {
                    key: delete.key,
                    want_prev: delete.prev_kv,
                    entry,
                })
            }
            Some(Request::RequestRange(range)) => {
                check_range_options(&range)?;
                Ok(PreparedOp::Range(range))
            }
            _ => Err(StoreError::Unsupported("this Txn operation".into())),
        }
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
                    value: Bytes::copy_from_slice(&value),
                    lease: meta.lease,
                };
                upsert(
                    &mut self.index.write().expect("index lock"),
                    &key,
                    IndexEntry::written(&shard.id, shard_revision, meta),
                );
                self.leases.reattach(&key, old_lease, meta.lease);
                events.push(Arc::new(StoredEvent::put(kv, prev.clone())));
                Response::ResponsePut(PutResponse {
                    header: Some(self.header(g)),
                    prev_kv: if want_prev { prev } else { None },
                })
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

    // -------------------------------------------------- multi-shard deletes

    /// Deletes every key of the selection, on every shard, at one revision.
    /// Atomic per shard; if a shard fails midway the keys deleted on the
    /// others stay deleted (and are announced) and the caller gets the error.
    async fn delete_many(&self, selection: Selection) -> StoreResult<(i64, Vec<KeyValue>)> {
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

        let g = self.sequencer.assign();
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
                        .map(|(key, shard_mod)| fence(key, *shard_mod))
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
                }
                first_error.get_or_insert(err);
            }
            let Some(shard_revision) = last_revision else {
                continue;
            };
            for kv in deleted {
                let kv = owned_kv(translate_kv(&shard.id, kv)?);
                if let Some(removed) = self.index.write().expect("index lock").remove(&kv.key) {
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
        self.sequencer.finish(g, events);
        drop(guards);
        self.delete_copies(copies_to_delete).await;
        self.compact_overflow();
        self.sequencer.wait_published(g).await;
        match first_error {
            Some(err) => Err(err),
            None => Ok((g, all_deleted)),
        }
    }

    // ---------------------------------------------------------- reconcile

    async fn ensure_reconciled(&self, shard: &Shard, state: &mut WriteState) -> StoreResult<()> {
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
            let scan = scan_shard(shard).await?;
            // First contact since startup: the keys were never visible, adopt them as they are.
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
            return Ok(());
        }
        // Cleared only once the index matches the shard: a reconciliation
        // that fails half-way is retried before the shard's next write.
        state.needs_reconcile = true;
        // The shard's writes and moves wait on `state` (held by the caller),
        // so its cuts do not change during the scan and its index entries
        // change only through a shard loading late adopting a duplicate
        // (checked again where entries are updated below).
        let known: BTreeMap<Bytes, IndexEntry> = self
            .index
            .read()
            .expect("index lock")
            .iter()
            .filter(|(_, e)| e.shard == shard.id)
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
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

        let mut rewrites = Vec::new();
        let mut leftovers = Vec::new();
        let in_shard = scan.present;
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
                Some(_) => rewrites.push(item),
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
                        leftovers.push((item.key.clone(), item.shard_mod_revision));
                    } else {
                        rewrites.push(item);
                    }
                }
            }
        }
        let mut lost: Vec<(Bytes, IndexEntry)> = known
            .iter()
            .filter(|(key, _)| !in_shard.contains(*key))
            .map(|(key, entry)| (key.clone(), entry.clone()))
            .collect();
        if rewrites.is_empty() && lost.is_empty() && leftovers.is_empty() && !lost_history {
            state.needs_reconcile = false;
            shard.set_loaded(true);
            shard.set_healthy(true);
            return Ok(());
        }
        let mut shard_revision = scan.revision;
        if lost_history {
            // The copies it held for other shards' keys went with its data:
            // the index must stop counting on them (the repair pass copies
            // those keys again), or a later failure of their primaries loses them.
            self.forget_lost_copies(shard).await?;
        }
        // With replication, what the shard lost comes back from the copies.
        if let Some(revision) = self.restore_in_place(shard, &mut lost).await {
            shard_revision = revision;
        }
        if !leftovers.is_empty() {
            info!(shard = %shard.id, keys = leftovers.len(), "deleting copies left by an interrupted move");
            shard_revision = moves::delete_silently(shard, &leftovers)
                .await?
                .unwrap_or(shard_revision);
        }

        let g = self.sequencer.assign();
        let mut events = Vec::new();
        for chunk in rewrites.chunks(MAX_TXN_OPS) {
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
                compares.push(fence(&item.key, item.shard_mod_revision));
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
                .await;
            let failed = match answer {
                Ok(a) if a.succeeded => Ok(a),
                Ok(_) => Err(StoreError::unavailable(
                    shard.id.as_str(),
                    "changed during reconciliation",
                )),
                Err(err) => Err(err),
            };
            let answer = match failed {
                Ok(answer) => answer,
                Err(err) => {
                    // Earlier chunks were written and their events go out at
                    // g: reads at g must see the shard as it is after them.
                    if shard_revision != scan.revision {
                        record_reconciled_cut(shard, g, shard_revision, lost_history);
                    }
                    self.sequencer.finish(g, events);
                    return Err(err);
                }
            };
            shard_revision = answer.header.map(|h| h.revision).unwrap_or(shard_revision);
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
        }
        {
            let mut index = self.index.write().expect("index lock");
            for (key, entry) in &lost {
                if index.get(key).is_none_or(|e| e.shard != shard.id) {
                    // Adopted from a shard loading late during the scan: not lost.
                    continue;
                }
                index.remove(key);
                self.leases.reattach(key, entry.meta.lease, 0);
                let prev = self.last_known_value(key, entry);
                events.push(Arc::new(StoredEvent::delete(key.clone(), g, prev)));
            }
        }
        record_reconciled_cut(shard, g, shard_revision, lost_history);
        if lost_history {
            // Its marker went with its data (see `MARKER_KEY`).
            if let Err(err) = shard.write_marker().await {
                warn!(shard = %shard.id, error = %err, "cannot write the shard's marker");
            }
        }
        warn!(
            shard = %shard.id,
            rewritten = rewrites.len(),
            lost = lost.len(),
            lost_history,
            revision = g,
            "reconciled shard with the index"
        );
        self.metrics.keys_lost(lost.len());
        events.sort_by(|a, b| a.key().cmp(b.key()));
        self.metrics.events_written(events.len());
        self.sequencer.finish(g, events);
        state.last_revision = g;
        state.needs_reconcile = false;
        shard.set_loaded(true);
        shard.set_healthy(true);
        Ok(())
    }

    /// The value a lost key had, from the event history if it is still there.
    fn last_known_value(&self, key: &Bytes, entry: &IndexEntry) -> Option<KeyValue> {
        let revision = entry.meta.mod_revision;
        let found = self
            .history
            .read(revision, revision, |e| e.key() == &key[..])
            .ok()?;
        found.last().and_then(|e| e.event.kv.clone())
    }

    /// Health checks every shard and repairs what needs it. Called periodically.
    pub async fn maintain(&self) {
        for shard in self.shard_list() {
            if shard.check().await.is_err() {
                // Whatever happened while it was away must be checked on return.
                shard.write.lock().await.needs_reconcile |= shard.is_loaded();
                continue;
            }
            self.metrics.shard_checked(shard.id.as_str());
            // A replacement the check (or any answer) noticed stays pending
            // until one reconciliation handles it: if the shard is busy, its
            // next write batch reconciles first (`ensure_reconciled`).
            if let Ok(mut state) = shard.write.try_lock() {
                if state.needs_reconcile || !shard.is_loaded() || shard.pending_replacement() {
                    if let Err(err) = self.reconcile(&shard, &mut state).await {
                        warn!(shard = %shard.id, error = %err, "reconciliation failed; will retry");
                    }
                }
            }
        }
        let duplicates = !self.duplicates.lock().expect("duplicates lock").is_empty();
        if duplicates {
            self.resolve_duplicates().await;
        }
        self.expire_leases().await;
    }

    // ---------------------------------------------------------- compaction

    pub fn compact(&self, revision: i64) -> StoreResult<i64> {
        let current = self.sequencer.published();
        if revision > current {
            return Err(StoreError::FutureRevision);
        }
        if !self.history.compact(revision) {
            return Err(StoreError::Compacted);
        }
        self.compact_shards(revision);
        Ok(current)
    }

    fn compact_overflow(&self) {
        if let Some(revision) = self.history.overflow_revision() {
            if self.history.compact(revision) {
                self.compact_shards(revision);
            }
        }
    }

    fn compact_shards(&self, revision: i64) {
        for shard in self.shard_list() {
            let physical = shard.cuts.lock().expect("cuts lock").compact(revision);
            if let Some(shard_revision) = physical {
                tokio::spawn(async move {
                    if let Err(err) = shard.compact(shard_revision).await {
                        // Already compacted further, or briefly down: harmless.
                        tracing::debug!(shard = %shard.id, error = %err, "shard compaction skipped");
                    }
                });
            }
        }
    }

    // ---------------------------------------------------------- leases

    pub fn lease_grant(&self, id: i64, ttl: i64) -> StoreResult<(i64, i64)> {
        self.check_open()?;
        self.leases.grant(id, ttl)
    }

    pub async fn lease_revoke(self: &Arc<Self>, id: i64) -> StoreResult<i64> {
        self.check_open()?;
        if !self.leases.begin_revoke(id) {
            return Err(StoreError::LeaseNotFound);
        }
        let store = self.clone();
        self.detached(async move {
            let (revision, _) = store.delete_many(Selection::Lease(id)).await?;
            store.leases.remove(id);
            Ok(revision)
        })
        .await
    }

    pub fn lease_keep_alive(&self, id: i64) -> Option<i64> {
        self.leases.keep_alive(id)
    }

    pub fn lease_info(&self, id: i64) -> Option<LeaseInfo> {
        self.leases.info(id)
    }

    pub fn lease_ids(&self) -> Vec<i64> {
        self.leases.ids()
    }

    async fn expire_leases(&self) {
        for id in self.leases.expired(Instant::now()) {
            if !self.leases.begin_revoke(id) {
                continue;
            }
            match self.delete_many(Selection::Lease(id)).await {
                Ok(_) => self.leases.remove(id),
                Err(err) => warn!(lease = id, error = %err, "expiring lease failed; will retry"),
            }
        }
    }

    // ---------------------------------------------------------- status

    pub async fn status(&self) -> StoreResult<StatusResponse> {
        let shards = self.shard_list();
        let answers = join_all(shards.iter().map(|s| s.status())).await;
        let mut db_size = 0;
        let mut db_size_in_use = 0;
        let mut db_size_quota = 0;
        let mut versions = Vec::new();
        let mut errors = Vec::new();
        for (shard, answer) in shards.iter().zip(answers) {
            match answer {
                Ok(status) => {
                    db_size += status.db_size;
                    db_size_in_use += status.db_size_in_use;
                    db_size_quota += status.db_size_quota;
                    versions.push(status.version);
                    errors.extend(
                        status
                            .errors
                            .into_iter()
                            .map(|e| format!("shard {}: {e}", shard.id)),
                    );
                }
                Err(err) => errors.push(format!("shard {} unreachable: {err}", shard.id)),
            }
        }
        if versions.is_empty() {
            return Err(StoreError::NotReady(format!(
                "no shard answered a status request: {}",
                errors.join("; ")
            )));
        }
        let version = versions
            .into_iter()
            .min_by_key(|v| version_key(v))
            .filter(|v| version_key(v) >= version_key(MIN_REPORTED_ETCD_VERSION))
            .unwrap_or_else(|| MIN_REPORTED_ETCD_VERSION.to_string());
        let revision = self.sequencer.published();
        Ok(StatusResponse {
            header: Some(self.header(revision)),
            version,
            db_size,
            leader: self.config.member_id,
            raft_index: revision as u64,
            raft_term: 1,
            raft_applied_index: revision as u64,
            errors,
            db_size_in_use,
            is_learner: false,
            storage_version: String::new(),
            db_size_quota,
            downgrade_info: None,
        })
    }
}

/// A txn waiting in its shard's queue for the next group commit.
pub struct PendingTxn {
    req: TxnRequest,
    keys: BTreeSet<Bytes>,
    reply: oneshot::Sender<StoreResult<Committed>>,
}

/// What a group commit hands back to the txn's caller.
pub struct Committed {
    response: TxnResponse,
    /// The revision to wait for and answer with: the txn's own, or for a
    /// read-only txn the revision its reads saw (the last write before it).
    visible_at: i64,
}

struct TxnPlan {
    succeeded: bool,
    ops: Vec<PreparedOp>,
    writes: bool,
}

/// Txns committed together as one shard Txn.
#[derive(Default)]
struct Batch {
    items: Vec<(PendingTxn, TxnPlan)>,
    written: BTreeSet<Bytes>,
    ops: usize,
    bytes: usize,
}

impl Batch {
    /// etcd's defaults: 128 ops per Txn, 1.5 MiB per request.
    const MAX_OPS: usize = MAX_TXN_OPS;
    const MAX_BYTES: usize = 1024 * 1024;

    fn accepts(&self, pending: &PendingTxn) -> bool {
        if self.items.is_empty() {
            return true;
        }
        let ops = pending.req.success.len().max(pending.req.failure.len());
        let bytes = txn_bytes(&pending.req);
        pending.keys.is_disjoint(&self.written)
            && self.ops + ops <= Self::MAX_OPS
            && self.bytes + bytes <= Self::MAX_BYTES
    }

    fn add(&mut self, pending: PendingTxn, plan: TxnPlan) {
        for op in &plan.ops {
            match op {
                PreparedOp::Put { key, .. } | PreparedOp::Delete { key, .. } => {
                    self.written.insert(key.clone());
                }
                PreparedOp::Range(_) => {}
            }
        }
        self.ops += plan.ops.len();
        self.bytes += txn_bytes(&pending.req);
        self.items.push((pending, plan));
    }
}

fn txn_bytes(req: &TxnRequest) -> usize {
    req.success
        .iter()
        .chain(&req.failure)
        .map(|op| match &op.request {
            Some(Request::RequestPut(p)) => p.key.len() + p.value.len() + 64,
            Some(Request::RequestRange(r)) => r.key.len() + 16,
            Some(Request::RequestDeleteRange(d)) => d.key.len() + 16,
            _ => 16,
        })
        .sum()
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

enum Selection {
    Range(Bytes, Bytes),
    Lease(i64),
}

/// An op validated against the index, waiting for its revision.
enum PreparedOp {
    Put {
        key: Bytes,
        value: Bytes,
        lease: i64,
        lease_ttl: i64,
        want_prev: bool,
        entry: Option<IndexEntry>,
    },
    Delete {
        key: Bytes,
        want_prev: bool,
        entry: Option<IndexEntry>,
    },
    Range(RangeRequest),
}

impl PreparedOp {
    /// The plan, the op sent to the shard (none for a delete of a key that
    /// does not exist), and the fence guarding it.
    fn finish(self, g: i64) -> (PlannedOp, Option<RequestOp>, Option<Compare>) {
        match self {
            PreparedOp::Put {
                key,
                value,
                lease,
                lease_ttl,
                want_prev,
                entry,
            } => {
                let meta = Meta {
                    mod_revision: g,
                    create_revision: entry.as_ref().map(|e| e.meta.create_revision).unwrap_or(g),
                    version: entry.as_ref().map(|e| e.meta.version).unwrap_or(0) + 1,
                    lease,
                    lease_ttl,
                };
                let fence = fence(
                    &key,
                    entry.as_ref().map(|e| e.shard_mod_revision).unwrap_or(0),
                );
                let op = RequestOp {
                    request: Some(Request::RequestPut(PutRequest {
                        key: key.clone(),
                        value: envelope::encode(&meta, &value),
                        prev_kv: true,
                        ..Default::default()
                    })),
                };
                let plan = PlannedOp::Put {
                    key,
                    meta,
                    value,
                    want_prev,
                    old_lease: entry.map(|e| e.meta.lease).unwrap_or(0),
                };
                (plan, Some(op), Some(fence))
            }
            PreparedOp::Delete {
                key,
                want_prev,
                entry: None,
            } => {
                // The index is exact: the key is absent, nothing to send.
                let plan = PlannedOp::Delete {
                    key,
                    want_prev,
                    existed: false,
                    sent: false,
                };
                (plan, None, None)
            }
            PreparedOp::Delete {
                key,
                want_prev,
                entry: Some(entry),
            } => {
                let fence = fence(&key, entry.shard_mod_revision);
                let op = RequestOp {
                    request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                        key: key.clone(),
                        prev_kv: true,
                        ..Default::default()
                    })),
                };
                let plan = PlannedOp::Delete {
                    key,
                    want_prev,
                    existed: true,
                    sent: true,
                };
                (plan, Some(op), Some(fence))
            }
            PreparedOp::Range(range) => {
                let plan = PlannedOp::Range {
                    keys_only: range.keys_only,
                    count_only: range.count_only,
                };
                let op = RequestOp {
                    request: Some(Request::RequestRange(RangeRequest {
                        key: range.key,
                        limit: range.limit,
                        count_only: range.count_only,
                        ..Default::default()
                    })),
                };
                (plan, Some(op), None)
            }
        }
    }
}

/// "The key is still exactly what the index says": the shard refuses the
/// write if anything but the router changed it.
/// The cut of a reconciliation's revision g; a shard that lost its history
/// cannot be read at any revision before g.
fn record_reconciled_cut(shard: &Shard, g: i64, shard_revision: i64, lost_history: bool) {
    let mut cuts = shard.cuts.lock().expect("cuts lock");
    if lost_history {
        cuts.reset(g, shard_revision, CutLookup::Unknown);
        // Its answers are judged against the new history from now on.
        shard.forget_history(shard_revision);
    } else {
        cuts.push(g, shard_revision);
    }
}

/// A key the router keeps (index, leases) in an allocation of its own. Keys
/// arrive as slices of the request or shard response they were decoded
/// from, and a slice keeps that whole buffer, value and all, alive for as
/// long as the key exists.
pub(crate) fn own_key(key: &Bytes) -> Bytes {
    Bytes::copy_from_slice(key)
}

/// A key-value copied out of the buffer it was decoded from.
fn owned_kv(kv: KeyValue) -> KeyValue {
    KeyValue {
        key: own_key(&kv.key),
        value: Bytes::copy_from_slice(&kv.value),
        ..kv
    }
}

/// Sets a key's entry; a key new to the index is copied (`own_key`).
fn upsert(index: &mut BTreeMap<Bytes, IndexEntry>, key: &Bytes, entry: IndexEntry) {
    match index.get_mut(key) {
        Some(existing) => *existing = entry,
        None => {
            index.insert(own_key(key), entry);
        }
    }
}

fn fence(key: &Bytes, shard_mod_revision: i64) -> Compare {
    Compare {
        key: key.clone(),
        target: CompareTarget::Mod as i32,
        result: CompareResult::Equal as i32,
        target_union: Some(TargetUnion::ModRevision(shard_mod_revision)),
        range_end: Bytes::new(),
    }
}

/// What a shard's refusal of a read at one of its revisions means to the client:
/// - "compacted": our own concurrent Compact won the race, ErrCompacted;
/// - "future revision": the shard is behind a revision it answered before,
///   so its etcd lost its data and is being reconciled: Unavailable, so the
///   client retries (etcd's own ErrFutureRev would be a lie: the revision
///   the client asked is not in the future).
fn shard_read_error(shard: &Shard, err: StoreError) -> StoreError {
    match err {
        StoreError::ShardRejected(status) if status.message().contains("compacted") => {
            StoreError::Compacted
        }
        StoreError::ShardRejected(status) if status.message().contains("future revision") => {
            StoreError::unavailable(
                shard.id.as_str(),
                "its etcd lost its data and is being reconciled; retry",
            )
        }
        other => other,
    }
}

/// Replaces a shard's revisions by the global ones from the envelope.
fn translate_kv(shard: &ShardId, kv: KeyValue) -> StoreResult<KeyValue> {
    let (meta, value) = envelope::decode(&kv.value).map_err(|_| {
        StoreError::Internal(format!(
            "shard {shard} holds key {} with a value not written by ste-router",
            show_key(&kv.key)
        ))
    })?;
    Ok(KeyValue {
        key: kv.key,
        create_revision: meta.create_revision,
        mod_revision: meta.mod_revision,
        version: meta.version,
        value,
        lease: meta.lease,
    })
}

fn check_range_options(req: &RangeRequest) -> StoreResult<()> {
    let sort_by_key = req.sort_target == SortTarget::Key as i32;
    match SortOrder::try_from(req.sort_order) {
        Ok(SortOrder::None) | Ok(SortOrder::Ascend) if sort_by_key || req.sort_order == 0 => {}
        Ok(SortOrder::Descend) if sort_by_key && req.limit == 0 => {}
        _ => {
            return Err(StoreError::Unsupported(format!(
                "range sorting other than by key (sort_order={}, sort_target={}; descending only without limit)",
                req.sort_order, req.sort_target
            )))
        }
    }
    if req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0
    {
        return Err(StoreError::Unsupported(
            "range filters on min/max mod or create revision".into(),
        ));
    }
    Ok(())
}

fn version_key(version: &str) -> Vec<u64> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(3)
        .map(|s| s.parse().unwrap_or(0))
        .collect()
}

struct ScannedKey {
    key: Bytes,
    meta: Meta,
    value: Bytes,
    shard_mod_revision: i64,
}

struct Scan {
    revision: i64,
    /// The keys read with their values: all of them (`scan_shard`), or only
    /// those whose shard revision the index did not know (`scan_shard_changes`).
    items: Vec<ScannedKey>,
    /// Every key the shard holds.
    present: BTreeSet<Bytes>,
    /// The etcd answering is not the one the router knew: its history is gone.
    replaced: bool,
}

/// Reads a whole shard at one revision, page by page.
async fn scan_shard(shard: &Shard) -> StoreResult<Scan> {
    shard.check().await?;
    scan_values(shard, shard.pending_replacement()).await
}

/// What a reconciliation needs: every key the shard holds, and the values of
/// only those keys whose shard revision differs from the index's. The router
/// is a shard's only writer, so a key at the shard revision the index
/// recorded holds the value the index describes; only a write with an unknown
/// outcome (or a key the index does not place here) can differ. Reading keys
/// alone moves ~1/40 of the bytes of pod-sized values, and the shard's writes
/// wait for the whole scan. A shard that was replaced, whose revision went
/// back, or where many keys changed is read in full.
async fn scan_shard_changes(
    shard: &Shard,
    known: &BTreeMap<Bytes, IndexEntry>,
    last_cut: Option<i64>,
) -> StoreResult<Scan> {
    const PAGE: i64 = 5000;
    const PARALLEL_READS: usize = 16;
    shard.check().await?;
    if shard.pending_replacement() {
        return scan_values(shard, true).await;
    }
    let mut present = BTreeSet::new();
    let mut changed = Vec::new();
    let revision = read_pages(shard, router_keys(), PAGE, true, |kv| {
        let key = own_key(&kv.key);
        let unchanged = known
            .get(&key)
            .is_some_and(|entry| entry.shard_mod_revision == kv.mod_revision);
        if !unchanged {
            changed.push(key.clone());
        }
        present.insert(key);
        Ok(())
    })
    .await?;
    if last_cut.is_some_and(|last| revision < last) || changed.len() > present.len() / 4 {
        return scan_values(shard, false).await;
    }
    let reads = changed.into_iter().map(|key| async move {
        let answer = shard
            .range(RangeRequest {
                key,
                revision,
                ..Default::default()
            })
            .await?;
        answer
            .kvs
            .into_iter()
            .next()
            .map(|kv| scanned_key(shard, kv))
            .transpose()
    });
    let mut items = Vec::new();
    let mut reads = futures::stream::iter(reads).buffer_unordered(PARALLEL_READS);
    while let Some(read) = reads.next().await {
        items.extend(read?);
    }
    items.sort_by(|a, b| a.key.cmp(&b.key));
    tracing::debug!(shard = %shard.id, keys = present.len(), values_read = items.len(), "reconciliation scan read keys only");
    Ok(Scan {
        revision,
        items,
        present,
        replaced: false,
    })
}

/// All keys clients can write: everything below the router's reserved prefix.
fn router_keys() -> (Bytes, Bytes) {
    (
        Bytes::from_static(&[0]),
        Bytes::from_static(RESERVED_PREFIX),
    )
}

/// The first key after `last`.
pub(super) fn next_key(last: &[u8]) -> Bytes {
    let mut next = last.to_vec();
    next.push(0);
    Bytes::from(next)
}

fn scanned_key(shard: &Shard, kv: KeyValue) -> StoreResult<ScannedKey> {
    let (meta, value) = envelope::decode(&kv.value).map_err(|_| {
        StoreError::Internal(format!(
            "shard {} holds key {} whose value was not written by ste-router; \
             shards must be dedicated to the router (remove the key or use an empty shard)",
            shard.id,
            show_key(&kv.key)
        ))
    })?;
    Ok(ScannedKey {
        key: kv.key,
        meta,
        value,
        shard_mod_revision: kv.mod_revision,
    })
}

/// Every key of the shard with its value, at one revision.
async fn scan_values(shard: &Shard, replaced: bool) -> StoreResult<Scan> {
    const PAGE: i64 = 1000;
    let mut items = Vec::new();
    let mut present = BTreeSet::new();
    let revision = read_pages(shard, router_keys(), PAGE, false, |kv| {
        let item = scanned_key(shard, kv)?;
        present.insert(own_key(&item.key));
        items.push(item);
        Ok(())
    })
    .await?;
    Ok(Scan {
        revision,
        items,
        present,
        replaced,
    })
}

/// Reads the shard's keys in [from, end) a page at a time, every page at the
/// revision of the first; returns that revision.
pub(super) async fn read_pages(
    shard: &Shard,
    (mut from, end): (Bytes, Bytes),
    page: i64,
    keys_only: bool,
    mut each: impl FnMut(KeyValue) -> StoreResult<()>,
) -> StoreResult<i64> {
    let mut revision = 0;
    loop {
        let answer = shard
            .range(RangeRequest {
                key: from.clone(),
                range_end: end.clone(),
                limit: page,
                revision,
                keys_only,
                ..Default::default()
            })
            .await?;
        if revision == 0 {
            revision = answer.header.as_ref().map(|h| h.revision).unwrap_or(0);
        }
        let last = answer.kvs.last().map(|kv| kv.key.clone());
        for kv in answer.kvs {
            each(kv)?;
        }
        match last {
            Some(last) if answer.more => from = next_key(&last),
            _ => return Ok(revision),
        }
    }
}
