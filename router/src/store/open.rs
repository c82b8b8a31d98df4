//! Opening the store: connecting to the shards, loading their keys into the index, and what a restart finds.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::{StoreError, StoreResult};
use crate::history::History;
use crate::keys::own_key;
use crate::leases::Leases;
use crate::metrics::Metrics;
use crate::placement::index::IndexEntry;
use crate::placement::ring::{Ring, ShardId};
use crate::placement::values::ValueCache;
use crate::retry::Backoff;
use crate::revision::{starting_revision, Sequencer};
use crate::shard::scan::{delete_silently, scan_shard, Scan};
use crate::shard::{etcd_connector, Connector, CutLookup, Shard, ShardSpec};
use crate::store::{Store, StoreConfig};

impl Store {
    /// Connects to the shards, loads their keys (waiting up to
    /// `load_timeout` for unreachable ones, which then load in the
    /// background) and picks the starting revision.
    pub async fn open(
        config: StoreConfig,
        specs: &[ShardSpec],
        metrics: Arc<Metrics>,
    ) -> StoreResult<Arc<Store>> {
        let connector = etcd_connector(
            config.shard_timeout,
            config.shard_tls.clone(),
            config.shard_transport,
        );
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
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
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
            let now = Instant::now();
            if scans.len() == shards.len() || now >= deadline {
                break;
            }
            tokio::time::sleep(backoff.next_delay().min(deadline - now)).await;
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
            shards: RwLock::new(shards),
            ring: RwLock::new(ring),
            index: RwLock::new(BTreeMap::new()),
            values: ValueCache::new(config.value_cache_bytes),
            config,
            leases: Leases::default(),
            metrics,
            closing: CancellationToken::new(),
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
    pub(crate) async fn resolve_duplicates(&self) {
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
            match delete_silently(&shard, &keys).await {
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
                    let mut state = shard.write.lock().await;
                    state.needs_reconcile = true;
                    shard.note_reconcile(&state);
                    shard.set_loaded(false);
                }
            }
        }
    }

    /// Puts a scanned shard's keys into the index, as they are (no events:
    /// nobody could have listed the shard while it was not loaded). A key
    /// already indexed on another shard keeps the copy with the newer
    /// revision (equal: the one the ring places); the other is a duplicate.
    pub(crate) fn adopt_scan(&self, shard: &Shard, scan: Scan, at: i64) {
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
}
