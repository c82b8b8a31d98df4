//! Live membership: which shards are in the ring, from `--shards` (static,
//! e.g. the bootstrap shard), from `Shard` registrations in the cluster
//! (watched through kube-apiserver; they live in the durable etcd), and from
//! the admin API. One control loop turns that into joins, drains and losses,
//! moves misplaced keys, and reports each shard's phase back in its status.
//!
//! A router restart must not forget registered shards: their keys would be
//! invisible until the registrations are read again. The registered members
//! are therefore also written to a small cache file that startup loads like
//! `--shards`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use serde::{Deserialize, Serialize};
use ste_shard_api::{Shard as ShardResource, ShardPhase};
use tracing::{debug, info, warn};

use crate::placement::ring::ShardId;
use crate::retry::Backoff;
use crate::ring_changes::DrainProgress;
use crate::shard::{Origin, ShardSpec};
use crate::store::Store;

#[derive(Clone)]
pub struct MembershipConfig {
    /// Watch `Shard` registrations with this client.
    pub kube: Option<kube::Client>,
    /// A registered shard unreachable this long, whose agent stopped
    /// heartbeating, is declared lost.
    pub lost_after: Duration,
    /// Where registered members are remembered across restarts.
    pub cache_file: Option<PathBuf>,
    /// Period of the control loop.
    pub interval: Duration,
}

impl std::fmt::Debug for MembershipConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MembershipConfig")
            .field("kube", &self.kube.is_some())
            .field("lost_after", &self.lost_after)
            .field("cache_file", &self.cache_file)
            .field("interval", &self.interval)
            .finish()
    }
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            kube: None,
            lost_after: Duration::from_secs(30),
            cache_file: None,
            interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("reading the membership cache {path}: {source}")]
    ReadCache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the membership cache {path} is not valid: {source}")]
    ParseCache {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("invalid shard registration {name:?}: {reason}")]
    Invalid { name: String, reason: String },
}

/// What the registrations (or the admin API) ask for one shard.
#[derive(Debug, Clone)]
struct Wanted {
    endpoint: String,
    drain: bool,
    from_kube: bool,
    /// The agent's last heartbeat value, and when the router saw it change
    /// (the router's clock only, so node clocks may differ).
    heartbeat: Option<String>,
    heartbeat_seen: Instant,
}

#[derive(Default)]
struct State {
    wanted: BTreeMap<ShardId, Wanted>,
    /// The initial list of registrations was read (until then a member
    /// without a registration is not yet known to be gone).
    synced: bool,
    /// Phases last written to each registration's status.
    reported: BTreeMap<ShardId, (ShardPhase, i64)>,
    keys_reported: Option<Instant>,
    /// What the cache file holds (None: not written by this run yet).
    cached: Option<CacheFile>,
}

const KEYS_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Handle shared by the control loop, the registration watcher and the admin API.
#[derive(Clone)]
pub struct Membership {
    store: Arc<Store>,
    config: MembershipConfig,
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct CacheFile {
    shards: Vec<CachedShard>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct CachedShard {
    name: String,
    endpoint: String,
}

/// The registered shards remembered by the last run (empty without a cache file).
pub fn load_cache(path: Option<&PathBuf>) -> Result<Vec<ShardSpec>, MembershipError> {
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(MembershipError::ReadCache {
                path: path.clone(),
                source,
            })
        }
    };
    let cache: CacheFile =
        serde_json::from_str(&text).map_err(|source| MembershipError::ParseCache {
            path: path.clone(),
            source,
        })?;
    cache
        .shards
        .into_iter()
        .map(|cached| {
            let mut spec = ShardSpec::parse(&format!("{}={}", cached.name, cached.endpoint))
                .map_err(|reason| MembershipError::Invalid {
                    name: cached.name.clone(),
                    reason,
                })?;
            spec.origin = Origin::Registered;
            Ok(spec)
        })
        .collect()
}

impl Membership {
    pub fn new(store: Arc<Store>, config: MembershipConfig) -> Self {
        let mut state = State {
            synced: config.kube.is_none(),
            ..State::default()
        };
        // Registered members remembered from the last run stay wanted until
        // the registrations say otherwise.
        for shard in store
            .shard_list()
            .into_iter()
            .filter(|s| s.origin == Origin::Registered)
        {
            state.wanted.insert(
                shard.id.clone(),
                Wanted {
                    endpoint: shard.endpoint.clone(),
                    drain: false,
                    from_kube: config.kube.is_some(),
                    heartbeat: None,
                    heartbeat_seen: Instant::now(),
                },
            );
        }
        Membership {
            store,
            config,
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// Runs the registration watcher (if any) and the control loop until the store closes.
    pub async fn run(self) {
        if let Some(client) = self.config.kube.clone() {
            tokio::spawn(self.clone().watch_registrations(client));
        }
        let closing = self.store.closing();
        let mut ticker = tokio::time::interval(self.config.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = closing.cancelled() => return,
            }
            self.step().await;
            self.write_cache();
        }
    }

    /// Asks for a shard to join (admin API; registrations do the same).
    pub fn request_join(&self, spec: &ShardSpec) {
        let mut state = self.state.lock().expect("membership lock");
        state.wanted.insert(
            spec.id.clone(),
            Wanted {
                endpoint: spec.endpoint.clone(),
                drain: false,
                from_kube: false,
                heartbeat: None,
                heartbeat_seen: Instant::now(),
            },
        );
    }

    /// Asks for a shard to be drained and removed.
    pub fn request_drain(&self, id: &ShardId) -> bool {
        let known = self.store.shard_list().iter().any(|s| s.id == *id);
        let mut state = self.state.lock().expect("membership lock");
        match state.wanted.get_mut(id) {
            Some(wanted) => wanted.drain = true,
            None if known => {
                let endpoint = self
                    .store
                    .shard_list()
                    .into_iter()
                    .find(|s| s.id == *id)
                    .map(|s| s.endpoint.clone())
                    .unwrap_or_default();
                state.wanted.insert(
                    id.clone(),
                    Wanted {
                        endpoint,
                        drain: true,
                        from_kube: false,
                        heartbeat: None,
                        heartbeat_seen: Instant::now(),
                    },
                );
            }
            None => return false,
        }
        true
    }

    /// One pass of the control loop.
    pub async fn step(&self) {
        let (wanted, synced) = {
            let state = self.state.lock().expect("membership lock");
            (state.wanted.clone(), state.synced)
        };
        let members: BTreeMap<ShardId, Arc<crate::shard::Shard>> = self
            .store
            .shard_list()
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect();

        // Joins: registered, not draining, agent alive.
        for (id, want) in &wanted {
            if members.contains_key(id) || want.drain {
                continue;
            }
            if want.from_kube && want.heartbeat_seen.elapsed() >= self.config.lost_after {
                continue;
            }
            let spec = match ShardSpec::parse(&format!("{id}={}", want.endpoint)) {
                Ok(spec) => spec,
                Err(reason) => {
                    warn!(shard = %id, %reason, "ignoring shard registration");
                    continue;
                }
            };
            match self.store.join(&spec).await {
                Ok(()) => {
                    // Remembered before any key moves there: a router restarted
                    // in the middle of the moves must load this shard too, or
                    // the keys already moved would be invisible (and discarded
                    // when it joins again).
                    self.write_cache();
                    self.report(id, ShardPhase::Active, None).await
                }
                Err(err) => warn!(shard = %id, error = %err, "shard cannot join yet; retrying"),
            }
        }

        // Drains and losses of registered members.
        for (id, shard) in &members {
            if shard.origin != Origin::Registered && !wanted.get(id).is_some_and(|w| w.drain) {
                continue;
            }
            let want = wanted.get(id);
            let unhealthy = shard.unhealthy_for().unwrap_or_default();
            let agent_silent = match want {
                Some(w) if w.from_kube => w.heartbeat_seen.elapsed() >= self.config.lost_after,
                Some(_) => true,
                None => synced,
            };
            if shard.origin == Origin::Registered
                && unhealthy >= self.config.lost_after
                && agent_silent
            {
                match self.store.declare_lost(id).await {
                    Ok(keys) => {
                        self.report(
                            id,
                            ShardPhase::Lost,
                            Some(format!(
                                "unreachable for {unhealthy:?}; {keys} keys deleted"
                            )),
                        )
                        .await;
                        // A registration joins again only with a new heartbeat;
                        // a shard joined through the admin API must be joined again.
                        let mut state = self.state.lock().expect("membership lock");
                        match state.wanted.get_mut(id) {
                            Some(w) if w.from_kube => {
                                w.heartbeat_seen = Instant::now()
                                    .checked_sub(self.config.lost_after)
                                    .unwrap_or(w.heartbeat_seen)
                            }
                            _ => {
                                state.wanted.remove(id);
                            }
                        }
                    }
                    Err(err) => {
                        warn!(shard = %id, error = %err, "declaring the shard lost failed; retrying")
                    }
                }
                continue;
            }
            let leaving = match want {
                Some(w) => w.drain,
                None => synced && shard.origin == Origin::Registered,
            };
            if leaving && !shard.is_draining() {
                match self.store.begin_drain(id) {
                    Ok(()) => self.report(id, ShardPhase::Draining, None).await,
                    Err(err) => warn!(shard = %id, error = %err, "cannot drain the shard"),
                }
            }
        }

        match self.store.rebalance().await {
            Ok(0) => {}
            Ok(moved) => debug!(keys = moved, "moved keys to their shards"),
            Err(err) => warn!(error = %err, "moving keys failed; retrying"),
        }
        if let Err(err) = self.store.repair_replicas().await {
            warn!(error = %err, "writing replica copies failed; retrying");
        }

        for (id, shard) in &members {
            // Declared lost in this pass: gone, not drained.
            if !shard.is_draining()
                || shard.removed_at.load(std::sync::atomic::Ordering::Acquire) != 0
            {
                continue;
            }
            match self.store.finish_drain(id).await {
                Ok(DrainProgress::Removed) => {
                    self.report(id, ShardPhase::Drained, None).await;
                    let mut state = self.state.lock().expect("membership lock");
                    if state.wanted.get(id).is_some_and(|w| !w.from_kube) {
                        state.wanted.remove(id);
                    }
                }
                Ok(DrainProgress::Moving { keys_left }) => {
                    debug!(shard = %id, keys_left, "draining")
                }
                Err(err) => {
                    warn!(shard = %id, error = %err, "finishing the drain failed; retrying")
                }
            }
        }

        // Active members report their key count now and then (counting walks the index).
        {
            let mut state = self.state.lock().expect("membership lock");
            if state
                .keys_reported
                .is_some_and(|at| at.elapsed() < KEYS_REPORT_INTERVAL)
            {
                return;
            }
            state.keys_reported = Some(Instant::now());
        }
        let keys = self.store.keys_per_shard();
        for (id, shard) in &members {
            if shard.origin == Origin::Registered
                && !shard.is_draining()
                && wanted.get(id).is_some_and(|w| w.from_kube)
            {
                let count = keys.get(id).copied().unwrap_or(0) as i64;
                let stale = self
                    .state
                    .lock()
                    .expect("membership lock")
                    .reported
                    .get(id)
                    .is_none_or(|(phase, reported)| {
                        *phase != ShardPhase::Active
                            || (reported - count).abs() * 20 > *reported.max(&100)
                    });
                if stale {
                    self.report_keys(id, ShardPhase::Active, count).await;
                }
            }
        }
    }

    async fn report(&self, id: &ShardId, phase: ShardPhase, message: Option<String>) {
        let keys = self.store.keys_per_shard().get(id).copied().unwrap_or(0) as i64;
        info!(shard = %id, phase = phase.as_str(), keys, message = message.as_deref().unwrap_or(""), "shard phase");
        self.patch_status(id, phase, keys, message).await;
    }

    async fn report_keys(&self, id: &ShardId, phase: ShardPhase, keys: i64) {
        self.patch_status(id, phase, keys, None).await;
    }

    async fn patch_status(
        &self,
        id: &ShardId,
        phase: ShardPhase,
        keys: i64,
        message: Option<String>,
    ) {
        let from_kube = self
            .state
            .lock()
            .expect("membership lock")
            .wanted
            .get(id)
            .is_some_and(|w| w.from_kube);
        let Some(client) = self.config.kube.clone().filter(|_| from_kube) else {
            return;
        };
        let api: Api<ShardResource> = Api::all(client);
        let patch = serde_json::json!({
            "status": { "phase": phase.as_str(), "keys": keys, "message": message.unwrap_or_default() }
        });
        match api
            .patch_status(id.as_str(), &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.state
                    .lock()
                    .expect("membership lock")
                    .reported
                    .insert(id.clone(), (phase, keys));
            }
            Err(err) => {
                warn!(shard = %id, phase = phase.as_str(), error = %err, "cannot update the Shard's status")
            }
        }
    }

    /// Keeps `wanted` in line with the `Shard` objects in the cluster.
    async fn watch_registrations(self, client: kube::Client) {
        let api: Api<ShardResource> = Api::all(client);
        // Errors are retried by the watcher, waiting by the router's backoff.
        let mut events = std::pin::pin!(watcher::watcher(api, watcher::Config::default()).backoff(
            Backoff::new(Duration::from_millis(250), Duration::from_secs(30))
        ));
        let closing = self.store.closing();
        let mut listing: Option<BTreeMap<ShardId, ShardResource>> = None;
        loop {
            let event = tokio::select! {
                event = events.next() => event,
                _ = closing.cancelled() => return,
            };
            match event {
                None => return,
                Some(Err(err)) => {
                    warn!(error = %err, "watching Shard registrations failed; retrying");
                }
                Some(Ok(watcher::Event::Init)) => listing = Some(BTreeMap::new()),
                Some(Ok(watcher::Event::InitApply(shard))) => {
                    if let (Some(listing), Some(name)) =
                        (listing.as_mut(), shard.metadata.name.clone())
                    {
                        listing.insert(ShardId::new(&name), shard);
                    }
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    let listed = listing.take().unwrap_or_default();
                    let mut state = self.state.lock().expect("membership lock");
                    state
                        .wanted
                        .retain(|id, w| !w.from_kube || listed.contains_key(id));
                    for shard in listed.values() {
                        apply_registration(&mut state, shard);
                    }
                    state.synced = true;
                }
                Some(Ok(watcher::Event::Apply(shard))) => {
                    apply_registration(&mut self.state.lock().expect("membership lock"), &shard);
                }
                Some(Ok(watcher::Event::Delete(shard))) => {
                    if let Some(name) = shard.metadata.name {
                        let mut state = self.state.lock().expect("membership lock");
                        state.wanted.remove(&ShardId::new(&name));
                        state.reported.remove(&ShardId::new(&name));
                    }
                }
            }
        }
    }

    /// Writes the registered members to the cache file when they changed.
    fn write_cache(&self) {
        let Some(path) = self.config.cache_file.as_ref() else {
            return;
        };
        let mut shards: Vec<CachedShard> = self
            .store
            .shard_list()
            .into_iter()
            .filter(|s| s.origin == Origin::Registered)
            .map(|s| CachedShard {
                name: s.id.to_string(),
                endpoint: s.endpoint.clone(),
            })
            .collect();
        shards.sort_by(|a, b| a.name.cmp(&b.name));
        let cache = CacheFile { shards };
        if self.state.lock().expect("membership lock").cached.as_ref() == Some(&cache) {
            return;
        }
        let text = serde_json::to_string_pretty(&cache).expect("cache serializes");
        let tmp = path.with_extension("tmp");
        let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
        match written {
            Ok(()) => self.state.lock().expect("membership lock").cached = Some(cache),
            Err(err) => {
                warn!(path = %path.display(), error = %err, "cannot write the membership cache")
            }
        }
    }

    /// Members and what is known of them, for the admin API.
    pub fn describe(&self) -> serde_json::Value {
        let keys = self.store.keys_per_shard();
        let shards: Vec<serde_json::Value> = self
            .store
            .shard_list()
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.id.as_str(),
                    "endpoint": s.endpoint,
                    "origin": match s.origin { Origin::Static => "static", Origin::Registered => "registered" },
                    "keys": keys.get(&s.id).copied().unwrap_or(0),
                    "bytes": s.db_bytes.load(std::sync::atomic::Ordering::Relaxed),
                    "loaded": s.is_loaded(),
                    "healthy": s.is_healthy(),
                    "draining": s.is_draining(),
                })
            })
            .collect();
        serde_json::json!({ "shards": shards })
    }
}

fn apply_registration(state: &mut State, shard: &ShardResource) {
    let Some(name) = shard.metadata.name.clone() else {
        return;
    };
    let id = ShardId::new(&name);
    let heartbeat = shard.status.as_ref().and_then(|s| s.heartbeat_time.clone());
    let previous = state.wanted.get(&id);
    let heartbeat_seen = match previous {
        Some(p) if p.heartbeat == heartbeat => p.heartbeat_seen,
        _ => Instant::now(),
    };
    state.wanted.insert(
        id,
        Wanted {
            endpoint: shard.spec.endpoint.clone(),
            drain: shard.spec.drain,
            from_kube: true,
            heartbeat,
            heartbeat_seen,
        },
    );
}
