//! The bridge: watches Knative revision ReplicaSets (and, in aggressive
//! mode, Deployments), and on a scale-up from zero creates the missing pods
//! itself, already bound to a node.
//!
//! It never writes Endpoints, ServerlessServices, PodAutoscalers or any
//! replicas. Its pods carry the ReplicaSet's labels, so they serve at once,
//! but the Deployment is their controller until the ReplicaSet controller
//! has seen the scale-up; then they are handed to the ReplicaSet
//! (`handover`), which stays the arbiter: it deletes the excess, unbound
//! (gated) pods first, then by `pod-deletion-cost`, which keeps the bridge's
//! bound ones. Those deletions are counted, not prevented.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::ResourceExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::metrics::{CreatorLabels, Metrics, RaceLabels};
use crate::placement::{self, NodeUsage, Resources};
use crate::podmeta::{
    controller_uid, deployment_of, deployment_owner, replicaset_of, FOR_REPLICASET_ANNOTATION,
};
use crate::{Mode, CREATED_BY_ANNOTATION, DELETION_COST_ANNOTATION, REVISION_UID_LABEL};

#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    pub dry_run: bool,
    pub deletion_cost: i64,
    pub settle: Duration,
    pub max_attempts: u32,
    pub workers: usize,
    /// The admission webhook runs: gated pods are swept.
    pub webhook: bool,
    /// How long a surplus gated pod is left to the ReplicaSet controller before the sweep deletes it.
    pub gated_grace: Duration,
    /// Create pods only when at least this many revisions woke within
    /// `burst_window` (0 or 1: always).
    pub burst_threshold: usize,
    pub burst_window: Duration,
    /// The stat tap runs: the Deployments are cached for its wakes.
    pub tap: bool,
    /// A Deployment back at 0 within this long of the tap's 0→1 counts as a revert.
    pub tap_revert_window: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("{kind} {ns}/{name} not found (yet)")]
    Missing {
        kind: &'static str,
        ns: String,
        name: String,
    },
    #[error("kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

#[derive(Debug, Clone)]
pub(crate) enum Target {
    ReplicaSet,
    /// Aggressive mode: the Deployment went 0→N (its ReplicaSet may still be at 0).
    Deployment {
        replicas: i32,
        uid: String,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct Trigger {
    pub(crate) ns: String,
    pub(crate) name: String,
    pub(crate) target: Target,
    pub(crate) at: Instant,
    pub(crate) attempt: u32,
}

/// A pod the bridge created, or bound at admission, that the pod cache may
/// not show yet.
pub(crate) struct Reservation {
    pub(crate) id: u64,
    /// Known once the create call returned (pods the bridge created).
    pub(crate) pod: Option<String>,
    /// Pods bound by the webhook have no name at admission (generateName is
    /// resolved after it): such a reservation ends when the cache shows more
    /// pods of its owner on its node than `baseline`.
    pub(crate) baseline: Option<usize>,
    pub(crate) ns: String,
    pub(crate) owner: String,
    pub(crate) node: String,
    pub(crate) requests: Resources,
    pub(crate) revision: Option<String>,
    pub(crate) images: Vec<String>,
    pub(crate) at: Instant,
}

/// A revision the stat tap woke, until the Deployment watch sees it back at 0.
pub(crate) struct TapWake {
    /// When the tap read the stat.
    pub(crate) at: Instant,
    /// The tap wrote the 0→1 and handed it to the workers itself (aggressive
    /// mode): the Deployment watch's own 0→1 for it is not acted on again.
    pub(crate) handed_over: bool,
}

/// A scale-up the bridge acted on, watched for `settle` to count races.
pub(crate) struct Tracking {
    pub(crate) started: Instant,
    /// The replicas the bridge filled (the Deployment's, in aggressive mode).
    pub(crate) want: i32,
    preexisting: HashSet<String>,
    pub(crate) ours: HashSet<String>,
    controller_created: bool,
    deleted: HashSet<String>,
}

/// How long a reservation lives at most if the cache never shows its pod.
const RESERVATION_TTL: Duration = Duration::from_secs(30);

/// Pods of `owner` bound to `node` in the cache.
pub(crate) fn pods_on(pods: &[Arc<Pod>], owner: &str, node: &str) -> usize {
    pods.iter()
        .filter(|p| {
            replicaset_of(&p.metadata) == Some(owner)
                && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
        })
        .count()
}

/// Drops the reservations whose pod the cache now shows (or that are too old).
pub(crate) fn prune_reservations(reservations: &mut Vec<Reservation>, pods: &[Arc<Pod>]) {
    let in_cache: HashSet<(String, String)> = pods
        .iter()
        .map(|p| (p.namespace().unwrap_or_default(), p.name_any()))
        .collect();
    reservations.retain(|r| {
        if r.at.elapsed() >= RESERVATION_TTL {
            return false;
        }
        if let Some(pod) = &r.pod {
            return !in_cache.contains(&(r.ns.clone(), pod.clone()));
        }
        match r.baseline {
            Some(baseline) => pods_on(pods, &r.owner, &r.node) <= baseline,
            None => true,
        }
    });
}

pub struct Bridge {
    pub(crate) client: kube::Client,
    pub(crate) settings: Settings,
    pub metrics: Arc<Metrics>,
    pub leading: Arc<AtomicBool>,
    pub(crate) nodes: Store<Node>,
    pub(crate) pods: Store<Pod>,
    pub(crate) replicasets: Store<ReplicaSet>,
    /// Revision Deployments (aggressive mode or the stat tap; empty otherwise).
    pub(crate) deployments: Store<Deployment>,
    /// Deployments the tap scaled 0→1 (key ns/name) and when it read the
    /// stat, until the watch sees them back at 0.
    pub(crate) tapped: Mutex<HashMap<String, TapWake>>,
    /// Held only while deciding, never across API calls.
    pub(crate) reservations: Mutex<Vec<Reservation>>,
    pub(crate) next_reservation: std::sync::atomic::AtomicU64,
    pub(crate) tracking: Mutex<HashMap<String, Tracking>>,
    /// When the sweep first saw each gated pod (by UID).
    pub(crate) gated_seen: Mutex<HashMap<String, Instant>>,
    rejected: Mutex<HashSet<String>>,
    queue: mpsc::UnboundedSender<Trigger>,
    synced: [AtomicBool; 4],
    /// When recent revisions woke (for `burst_threshold`).
    wakes: Mutex<std::collections::VecDeque<Instant>>,
}

fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1u32 << attempt.min(9));
    let capped = base.min(Duration::from_secs(30));
    capped + Duration::from_millis(rand::random_range(0..=capped.as_millis() as u64 / 4))
}

impl Bridge {
    /// Starts the watches and the workers; returns at once.
    pub fn start(
        client: kube::Client,
        settings: Settings,
        metrics: Arc<Metrics>,
        leading: Arc<AtomicBool>,
    ) -> Arc<Bridge> {
        let (node_store, node_writer) = reflector::store::<Node>();
        let (pod_store, pod_writer) = reflector::store::<Pod>();
        let (rs_store, rs_writer) = reflector::store::<ReplicaSet>();
        let (deployment_store, deployment_writer) = reflector::store::<Deployment>();
        let (tx, rx) = mpsc::unbounded_channel();
        let bridge = Arc::new(Bridge {
            client: client.clone(),
            settings: settings.clone(),
            metrics,
            leading,
            nodes: node_store,
            pods: pod_store,
            replicasets: rs_store,
            deployments: deployment_store,
            tapped: Mutex::new(HashMap::new()),
            reservations: Mutex::new(Vec::new()),
            next_reservation: Default::default(),
            tracking: Mutex::new(HashMap::new()),
            gated_seen: Mutex::new(HashMap::new()),
            wakes: Mutex::new(Default::default()),
            rejected: Mutex::new(HashSet::new()),
            queue: tx,
            synced: Default::default(),
        });
        let revisions = watcher::Config::default().labels(REVISION_UID_LABEL);

        let b = bridge.clone();
        let nodes = reflector::reflector(
            node_writer,
            watcher::watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
                .default_backoff(),
        );
        tokio::spawn(async move {
            let mut nodes = std::pin::pin!(nodes);
            while let Some(event) = nodes.next().await {
                match event {
                    Ok(Event::InitDone) => b.synced[0].store(true, Ordering::SeqCst),
                    Ok(_) => {}
                    Err(err) => warn!(error = %err, "watching nodes"),
                }
            }
        });

        let b = bridge.clone();
        let pods = reflector::reflector(
            pod_writer,
            watcher::watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
                .default_backoff(),
        );
        tokio::spawn(async move {
            let mut pods = std::pin::pin!(pods);
            while let Some(event) = pods.next().await {
                match event {
                    Ok(Event::InitDone) => b.synced[1].store(true, Ordering::SeqCst),
                    Ok(Event::Apply(pod)) | Ok(Event::InitApply(pod)) => {
                        b.observe_pod(&pod, false).await
                    }
                    Ok(Event::Delete(pod)) => b.observe_pod(&pod, true).await,
                    Ok(Event::Init) => {}
                    Err(err) => warn!(error = %err, "watching pods"),
                }
            }
        });

        let b = bridge.clone();
        let rses = reflector::reflector(
            rs_writer,
            watcher::watcher(Api::<ReplicaSet>::all(client.clone()), revisions.clone())
                .default_backoff(),
        );
        tokio::spawn(async move {
            let mut last: HashMap<String, i32> = HashMap::new();
            let mut rses = std::pin::pin!(rses);
            while let Some(event) = rses.next().await {
                match event {
                    Ok(Event::InitDone) => b.synced[2].store(true, Ordering::SeqCst),
                    Ok(Event::InitApply(rs)) => {
                        last.insert(
                            rs.uid().unwrap_or_default(),
                            rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
                        );
                    }
                    Ok(Event::Apply(rs)) => {
                        let now = rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                        let before = last.insert(rs.uid().unwrap_or_default(), now);
                        if before == Some(0) && now > 0 {
                            debug!(replicaset = %key(&rs.namespace().unwrap_or_default(), &rs.name_any()), replicas = now, "scale-up from zero");
                            if b.settings.mode != Mode::Aggressive {
                                b.note_wake();
                            }
                            b.enqueue(Trigger {
                                ns: rs.namespace().unwrap_or_default(),
                                name: rs.name_any(),
                                target: Target::ReplicaSet,
                                at: Instant::now(),
                                attempt: 0,
                            });
                        }
                    }
                    Ok(Event::Delete(rs)) => {
                        last.remove(&rs.uid().unwrap_or_default());
                    }
                    Ok(Event::Init) => {}
                    Err(err) => warn!(error = %err, "watching replicasets"),
                }
            }
        });

        if settings.mode == Mode::Aggressive || settings.tap {
            let b = bridge.clone();
            let deployments = reflector::reflector(
                deployment_writer,
                watcher::watcher(Api::<Deployment>::all(client.clone()), revisions)
                    .default_backoff(),
            );
            tokio::spawn(async move {
                let mut last: HashMap<String, i32> = HashMap::new();
                let mut deployments = std::pin::pin!(deployments);
                while let Some(event) = deployments.next().await {
                    match event {
                        Ok(Event::InitDone) => b.synced[3].store(true, Ordering::SeqCst),
                        Ok(Event::InitApply(d)) => {
                            last.insert(
                                d.uid().unwrap_or_default(),
                                d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
                            );
                        }
                        Ok(Event::Apply(d)) => {
                            let now = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                            let before = last.insert(d.uid().unwrap_or_default(), now);
                            let ns = d.namespace().unwrap_or_default();
                            b.tap_observe(
                                &ns,
                                &d.name_any(),
                                before,
                                now,
                                b.settings.tap_revert_window,
                            );
                            if b.settings.mode == Mode::Aggressive
                                && before == Some(0)
                                && now > 0
                                && !b.tap_took(&ns, &d.name_any())
                            {
                                b.note_wake();
                                b.enqueue(Trigger {
                                    ns: d.namespace().unwrap_or_default(),
                                    name: d.name_any(),
                                    target: Target::Deployment {
                                        replicas: now,
                                        uid: d.uid().unwrap_or_default(),
                                    },
                                    at: Instant::now(),
                                    attempt: 0,
                                });
                            }
                        }
                        Ok(Event::Delete(d)) => {
                            last.remove(&d.uid().unwrap_or_default());
                            b.tap_forget(&d.namespace().unwrap_or_default(), &d.name_any());
                        }
                        Ok(Event::Init) => {}
                        Err(err) => warn!(error = %err, "watching deployments"),
                    }
                }
            });
        } else {
            bridge.synced[3].store(true, Ordering::SeqCst);
        }

        let b = bridge.clone();
        tokio::spawn(async move { b.work(rx).await });
        let b = bridge.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                b.settle().await;
                b.hand_over(false).await;
                if b.settings.webhook {
                    b.sweep().await;
                }
            }
        });
        bridge
    }

    /// True once every cache has its first full list.
    pub fn synced(&self) -> bool {
        self.synced.iter().all(|s| s.load(Ordering::SeqCst))
    }

    /// Records a revision woken (once per wake: the Deployment's 0→N in
    /// aggressive mode, the ReplicaSet's otherwise).
    pub(crate) fn note_wake(&self) {
        let mut wakes = self.wakes.lock().unwrap();
        wakes.push_back(Instant::now());
        while wakes
            .front()
            .is_some_and(|t| t.elapsed() > self.settings.burst_window)
        {
            wakes.pop_front();
        }
    }

    /// True when fewer revisions than `burst_threshold` woke within
    /// `burst_window`: the ReplicaSet controller keeps up, and the webhook
    /// binds its pods without any duplicate.
    fn below_burst(&self) -> bool {
        if self.settings.burst_threshold <= 1 {
            return false;
        }
        let wakes = self.wakes.lock().unwrap();
        let recent = wakes
            .iter()
            .filter(|t| t.elapsed() <= self.settings.burst_window)
            .count();
        recent < self.settings.burst_threshold
    }

    pub(crate) fn enqueue(&self, trigger: Trigger) {
        let _ = self.queue.send(trigger);
    }

    async fn work(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Trigger>) {
        let permits = Arc::new(tokio::sync::Semaphore::new(self.settings.workers.max(1)));
        while let Some(trigger) = rx.recv().await {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let b = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let what = match trigger.target {
                    Target::ReplicaSet => "replicaset",
                    Target::Deployment { .. } => "deployment",
                };
                if let Err(err) = b.handle(&trigger).await {
                    b.metrics.decision("error");
                    if matches!(err, BridgeError::Api(_)) {
                        b.metrics.api_errors.inc();
                    }
                    if trigger.attempt + 1 < b.settings.max_attempts {
                        let wait = backoff(trigger.attempt);
                        warn!(object = %format!("{what} {}", key(&trigger.ns, &trigger.name)), error = %err, attempt = trigger.attempt + 1, retry_in = ?wait, "scale-up not handled; retrying");
                        b.metrics.retries.inc();
                        let b2 = b.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(wait).await;
                            b2.enqueue(Trigger {
                                attempt: trigger.attempt + 1,
                                ..trigger
                            });
                        });
                    } else {
                        warn!(object = %format!("{what} {}", key(&trigger.ns, &trigger.name)), error = %err, "giving up on this scale-up; the ReplicaSet controller handles it");
                    }
                }
            });
        }
    }

    async fn handle(&self, trigger: &Trigger) -> Result<(), BridgeError> {
        if matches!(self.settings.mode, Mode::Webhook | Mode::Tap) {
            // Binding at admission, or the tap's 0→1, only: the ReplicaSet
            // controller creates every pod.
            return Ok(());
        }
        if !self.leading.load(Ordering::SeqCst) {
            self.metrics.decision("not_leader");
            return Ok(());
        }
        if trigger.attempt == 0 && self.below_burst() {
            self.metrics.decision("below_burst");
            return Ok(());
        }
        if !self.synced() {
            // Placing from a partial cache would not be clearly safe.
            return Err(BridgeError::Missing {
                kind: "synced cache for",
                ns: trigger.ns.clone(),
                name: trigger.name.clone(),
            });
        }
        let (rs, want) = match trigger.target {
            Target::ReplicaSet => {
                let rs = self.get_replicaset(&trigger.ns, &trigger.name).await?;
                if self.deployment_at_zero(&rs) {
                    return Ok(());
                }
                let want = rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                (rs, want)
            }
            // The ReplicaSet's replicas are left to the Deployment controller:
            // writing them here raced its sync from a stale Deployment cache,
            // which scaled them straight back to 0 (see `handover`).
            Target::Deployment { replicas, ref uid } => (
                self.current_replicaset(&trigger.ns, &trigger.name, uid)?,
                replicas,
            ),
        };
        self.create_missing(trigger, &rs, want).await
    }

    async fn get_replicaset(&self, ns: &str, name: &str) -> Result<ReplicaSet, BridgeError> {
        let cached = self.replicasets.find(|rs| {
            rs.metadata.name.as_deref() == Some(name)
                && rs.metadata.namespace.as_deref() == Some(ns)
        });
        if let Some(rs) = cached {
            return Ok((*rs).clone());
        }
        Api::<ReplicaSet>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await?
            .ok_or_else(|| BridgeError::Missing {
                kind: "ReplicaSet",
                ns: ns.into(),
                name: name.into(),
            })
    }

    /// The Deployment's newest ReplicaSet (highest deployment.kubernetes.io/revision).
    /// From the cache: no API call on the hot path (the Deployment's UID came with its watch event).
    fn current_replicaset(
        &self,
        ns: &str,
        deployment: &str,
        uid: &str,
    ) -> Result<ReplicaSet, BridgeError> {
        let revision = |rs: &ReplicaSet| {
            rs.annotations()
                .get("deployment.kubernetes.io/revision")
                .and_then(|r| r.parse::<i64>().ok())
                .unwrap_or(0)
        };
        self.replicasets
            .state()
            .into_iter()
            .filter(|rs| {
                rs.metadata.namespace.as_deref() == Some(ns)
                    && controller_uid(&rs.metadata) == Some(uid)
            })
            .max_by_key(|rs| revision(rs))
            .map(|rs| (*rs).clone())
            .ok_or_else(|| BridgeError::Missing {
                kind: "ReplicaSet of Deployment",
                ns: ns.into(),
                name: deployment.into(),
            })
    }

    /// Whether `rs`'s revision is back at zero as the bridge sees it (its
    /// Deployment cached at 0 and no 0→1 of the tap pending; kept in
    /// aggressive and tap modes, else never). Then the ReplicaSet's 0→N is
    /// the Deployment controller catching up with a wake that is already
    /// over, and a pod made for it would reach a node only to be deleted.
    /// Seen at 6 wakes/s at default client QPS: the Deployment controller
    /// scaled a ReplicaSet to 1 twelve seconds after the tap's 0→1, 150 ms
    /// after the autoscaler had scaled the revision back to 0, and the
    /// bridge (its decision for that wake older than `--settle`) created a
    /// second pod, deleted 0.4 s later.
    pub(crate) fn revision_at_zero(&self, rs: &ReplicaSet) -> bool {
        self.desired(rs) == 0
    }

    fn deployment_at_zero(&self, rs: &ReplicaSet) -> bool {
        let at_zero = self.revision_at_zero(rs);
        if at_zero {
            self.metrics.decision("deployment_at_zero");
            debug!(replicaset = %key(&rs.namespace().unwrap_or_default(), &rs.name_any()), "the ReplicaSet's scale-up is late: its revision is back at zero");
        }
        at_zero
    }

    /// A scale-up this bridge already decided within `--settle`.
    fn already_decided(&self, object: &str) {
        self.metrics.decision("already_decided");
        debug!(object = %object, "already decided for this scale-up");
    }

    async fn create_missing(
        &self,
        trigger: &Trigger,
        rs: &ReplicaSet,
        want: i32,
    ) -> Result<(), BridgeError> {
        let ns = trigger.ns.as_str();
        let rs_name = rs.name_any();
        let rs_uid = rs.uid().unwrap_or_default();
        let object = format!("replicaset {}", key(ns, &rs_name));
        if want <= 0 {
            self.metrics.decision("stale");
            return Ok(());
        }
        if let Some(t) = self.tracking.lock().unwrap().get(&rs_uid) {
            if t.started.elapsed() < self.settings.settle {
                // Already decided for this scale-up (aggressive mode sees both
                // the Deployment's and the ReplicaSet's).
                self.already_decided(&object);
                return Ok(());
            }
        }
        let Some(deployment) = deployment_of(rs) else {
            self.metrics.decision("no_deployment");
            info!(object = %object, "no Deployment controls this ReplicaSet; standing aside");
            return Ok(());
        };
        let Some(template) = rs.spec.as_ref().and_then(|s| s.template.clone()) else {
            self.metrics.decision("unsafe_template");
            info!(object = %object, "no pod template; standing aside");
            return Ok(());
        };
        let Some(spec) = template.spec.clone() else {
            self.metrics.decision("unsafe_template");
            info!(object = %object, "no pod spec in template; standing aside");
            return Ok(());
        };
        if let Err(why) = placement::check_template(&spec) {
            self.metrics.decision("unsafe_template");
            info!(object = %object, reason = %why, "template not clearly safe to place; standing aside");
            return Ok(());
        }
        let requests = placement::pod_requests(&spec).unwrap_or_default();
        let labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let revision = labels.get(REVISION_UID_LABEL).cloned();
        let images: Vec<String> = spec
            .containers
            .iter()
            .filter_map(|c| c.image.clone())
            .collect();

        // Decide under the reservation lock, so concurrent scale-ups see each other's pods.
        let (chosen, ids) = {
            let mut reservations = self.reservations.lock().unwrap();
            let all_pods = self.pods.state();
            prune_reservations(&mut reservations, &all_pods);
            let new_tracking = |preexisting: HashSet<String>| Tracking {
                started: Instant::now(),
                want,
                preexisting,
                ours: HashSet::new(),
                controller_created: false,
                deleted: HashSet::new(),
            };
            {
                // Re-check under the lock: a concurrent trigger for the same ReplicaSet may have decided.
                let mut tracking = self.tracking.lock().unwrap();
                if tracking
                    .get(&rs_uid)
                    .is_some_and(|t| t.started.elapsed() < self.settings.settle)
                {
                    self.already_decided(&object);
                    return Ok(());
                }
                // Marks the decision (its race is counted below or at settle).
                tracking.insert(rs_uid.clone(), new_tracking(HashSet::new()));
            }
            let active: Vec<&Arc<Pod>> = all_pods
                .iter()
                .filter(|p| {
                    replicaset_of(&p.metadata) == Some(rs_uid.as_str())
                        && p.metadata.deletion_timestamp.is_none()
                        && !matches!(
                            p.status.as_ref().and_then(|s| s.phase.as_deref()),
                            Some("Succeeded") | Some("Failed")
                        )
                })
                .collect();
            let reserved_here = reservations.iter().filter(|r| r.owner == rs_uid).count();
            let missing = want as usize - (active.len() + reserved_here).min(want as usize);
            let ours_active = active
                .iter()
                .any(|p| p.annotations().contains_key(CREATED_BY_ANNOTATION));
            if missing == 0 && (reserved_here > 0 || ours_active) {
                // This bridge's own pods fill the ReplicaSet (counted and
                // logged, as every scale-up the bridge leaves alone).
                self.metrics.decision("own_pods_fill");
                let pods: Vec<String> = active.iter().map(|p| p.name_any()).collect();
                debug!(object = %object, ?pods, reserved = reserved_here, "the bridge's own pods fill the ReplicaSet");
                return Ok(());
            }
            if missing == 0 {
                self.metrics.decision("nothing_missing");
                self.metrics
                    .races
                    .get_or_create(&RaceLabels {
                        result: "lost".into(),
                    })
                    .inc();
                debug!(object = %object, "the ReplicaSet controller was first");
                return Ok(());
            }
            let mut usage: HashMap<String, NodeUsage> =
                placement::usage_from_pods(all_pods.iter().map(|p| p.as_ref()));
            for r in reservations.iter() {
                usage.entry(r.node.clone()).or_default().add(
                    &r.requests,
                    r.revision.as_deref(),
                    r.images.clone(),
                );
            }
            let nodes = self.nodes.state();
            let mut chosen = Vec::with_capacity(missing);
            for _ in 0..missing {
                let Some(node) =
                    placement::choose_node(&nodes, &usage, &spec, &requests, revision.as_deref())
                else {
                    break;
                };
                let node = node.name_any();
                usage.entry(node.clone()).or_default().add(
                    &requests,
                    revision.as_deref(),
                    images.clone(),
                );
                chosen.push(node);
            }
            if chosen.len() < missing {
                self.metrics.decision("no_safe_node");
                info!(object = %object, missing, placeable = chosen.len(), "no node clearly fits every missing pod; standing aside");
                return Ok(());
            }
            if self.settings.dry_run {
                self.metrics.decision("dry_run");
                info!(object = %object, nodes = ?chosen, "dry run: would create {missing} pod(s)");
                return Ok(());
            }

            // Tracked before creating, so the ReplicaSet controller's pods seen
            // while ours are in flight count as its own (a race lost).
            let preexisting: HashSet<String> = active.iter().map(|p| p.name_any()).collect();
            self.tracking
                .lock()
                .unwrap()
                .insert(rs_uid.clone(), new_tracking(preexisting));
            // Reserve the nodes, then let go of the lock: the API calls run unlocked.
            let ids: Vec<u64> = chosen
                .iter()
                .map(|node| {
                    let id = self.next_reservation.fetch_add(1, Ordering::Relaxed);
                    reservations.push(Reservation {
                        id,
                        pod: None,
                        baseline: None,
                        ns: ns.to_string(),
                        owner: rs_uid.clone(),
                        node: node.clone(),
                        requests: requests.clone(),
                        revision: revision.clone(),
                        images: images.clone(),
                        at: Instant::now(),
                    });
                    id
                })
                .collect();
            (chosen, ids)
        };
        let pods_api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let mut annotations: BTreeMap<String, String> = template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.clone())
            .unwrap_or_default();
        annotations.insert(
            DELETION_COST_ANNOTATION.into(),
            self.settings.deletion_cost.to_string(),
        );
        annotations.insert(CREATED_BY_ANNOTATION.into(), "true".into());
        annotations.insert(FOR_REPLICASET_ANNOTATION.into(), rs_uid.clone());
        // Held by the Deployment until the hand-over (`handover`).
        let owner = deployment_owner(&deployment.0, &deployment.1);
        let creations = chosen.iter().map(|node| {
            let mut pod_spec = spec.clone();
            pod_spec.node_name = Some(node.clone());
            let pod = Pod {
                metadata: ObjectMeta {
                    generate_name: Some(format!("{rs_name}-")),
                    namespace: Some(ns.to_string()),
                    labels: Some(labels.clone()),
                    annotations: Some(annotations.clone()),
                    owner_references: Some(vec![owner.clone()]),
                    ..Default::default()
                },
                spec: Some(pod_spec),
                status: None,
            };
            let api = pods_api.clone();
            async move { (node.clone(), api.create(&PostParams::default(), &pod).await) }
        });
        let forget = |ids: &[u64]| {
            self.reservations
                .lock()
                .unwrap()
                .retain(|r| !ids.contains(&r.id));
        };
        if !self.leading.load(Ordering::SeqCst) {
            forget(&ids);
            self.tracking.lock().unwrap().remove(&rs_uid);
            self.metrics.decision("not_leader");
            return Ok(());
        }
        let results = futures::future::join_all(creations).await;
        let mut created = Vec::new();
        let mut first_error = None;
        let mut failed = Vec::new();
        for ((node, result), id) in results.into_iter().zip(ids) {
            match result {
                Ok(pod) => {
                    self.metrics.pods_created.inc();
                    self.metrics
                        .trigger_to_created
                        .observe(trigger.at.elapsed().as_secs_f64());
                    if let Some(r) = self
                        .reservations
                        .lock()
                        .unwrap()
                        .iter_mut()
                        .find(|r| r.id == id)
                    {
                        r.pod = Some(pod.name_any());
                    }
                    created.push((pod.name_any(), node));
                }
                Err(err) => {
                    warn!(object = %object, node = %node, error = %err, "creating a pod failed");
                    failed.push(id);
                    first_error.get_or_insert(err);
                }
            }
        }
        forget(&failed);
        if created.is_empty() {
            // Nothing created: let a retry decide again.
            self.tracking.lock().unwrap().remove(&rs_uid);
        }
        if !created.is_empty() {
            self.metrics.decision("created");
            info!(object = %object, pods = ?created, latency = ?trigger.at.elapsed(), "created pods for the scale-up from zero");
            if let Some(t) = self.tracking.lock().unwrap().get_mut(&rs_uid) {
                t.ours.extend(created.into_iter().map(|(p, _)| p));
            }
        }
        match first_error {
            Some(err) => Err(err.into()),
            None => Ok(()),
        }
    }

    async fn observe_pod(&self, pod: &Pod, deleted: bool) {
        let ours = pod.annotations().contains_key(CREATED_BY_ANNOTATION);
        if ours && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed") {
            let uid = pod.uid().unwrap_or_default();
            if self.rejected.lock().unwrap().insert(uid) {
                self.metrics.rejections.inc();
                let reason = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.reason.clone())
                    .unwrap_or_default();
                warn!(pod = %key(&pod.namespace().unwrap_or_default(), &pod.name_any()), node = ?pod.spec.as_ref().and_then(|s| s.node_name.clone()), reason = %reason, "the kubelet rejected a pod the bridge created");
            }
        }
        let Some(owner) = replicaset_of(&pod.metadata) else {
            return;
        };
        let mut tracking = self.tracking.lock().unwrap();
        let Some(t) = tracking.get_mut(owner) else {
            return;
        };
        let name = pod.name_any();
        if !ours && !t.preexisting.contains(&name) {
            t.controller_created = true;
        }
        if (deleted || pod.metadata.deletion_timestamp.is_some()) && t.deleted.insert(name) {
            let creator = if ours { "bridge" } else { "controller" };
            self.metrics
                .duplicates_deleted
                .get_or_create(&CreatorLabels {
                    creator: creator.into(),
                })
                .inc();
        }
    }

    /// Closes the race accounting of scale-ups older than the settle window.
    async fn settle(&self) {
        let mut tracking = self.tracking.lock().unwrap();
        let settle = self.settings.settle;
        tracking.retain(|_, t| {
            if t.started.elapsed() < settle {
                return true;
            }
            if t.ours.is_empty() {
                // Nothing was created (API errors): no race to count.
                return false;
            }
            let result = if t.controller_created { "lost" } else { "won" };
            self.metrics
                .races
                .get_or_create(&RaceLabels {
                    result: result.into(),
                })
                .inc();
            false
        });
        self.metrics
            .leader
            .set(self.leading.load(Ordering::SeqCst) as i64);
    }
}
