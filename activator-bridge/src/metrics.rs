//! Prometheus metrics of the bridge.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// created, nothing_missing, no_safe_node, unsafe_template, not_leader,
    /// dry_run, below_burst, stale, error, already_decided, own_pods_fill.
    pub decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RaceLabels {
    /// won: only the bridge's pods; lost: the ReplicaSet controller created
    /// pods for the same scale-up too (or first).
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CreatorLabels {
    /// bridge or controller: who created the deleted pod.
    pub creator: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    /// bound, gated, or why the pod was left alone (already_bound,
    /// not_synced, not_replicaset, unsafe_template, no_safe_node, ...).
    pub verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TapLabels {
    /// scaled (the tap wrote 0→1), skipped (already woken or scaled by
    /// someone else first), failed (API error), dry_run.
    pub result: String,
}

/// The stat tap's metrics (registered in [`Metrics::new`]).
pub struct TapMetrics {
    pub tap_messages: Counter,
    pub tap_wakes_seen: Counter,
    pub tap_wakes: Family<TapLabels, Counter>,
    pub tap_stat_to_scaled: Histogram,
    pub tap_reverts: Counter,
}

impl TapMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = TapMetrics {
            tap_messages: Counter::default(),
            tap_wakes_seen: Counter::default(),
            tap_wakes: Family::default(),
            tap_stat_to_scaled: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            tap_reverts: Counter::default(),
        };
        registry.register(
            "tap_messages",
            "Stat messages (WireStatMessages) the tap read, after forwarding them",
            m.tap_messages.clone(),
        );
        registry.register(
            "tap_wakes_seen",
            "Stats with load for a revision whose Deployment the cache showed at 0 replicas",
            m.tap_wakes_seen.clone(),
        );
        registry.register(
            "tap_wakes",
            "Wakes seen by the tap, by what it did",
            m.tap_wakes.clone(),
        );
        registry.register(
            "tap_stat_to_scaled_seconds",
            "From the stat read by the tap to its 0→1 scale written",
            m.tap_stat_to_scaled.clone(),
        );
        registry.register(
            "tap_reverts",
            "Deployments seen back at 0 within the revert window of the tap's 0→1",
            m.tap_reverts.clone(),
        );
        m
    }
}

pub struct Metrics {
    pub tap: TapMetrics,
    pub registry: Registry,
    pub decisions: Family<DecisionLabels, Counter>,
    pub races: Family<RaceLabels, Counter>,
    pub duplicates_deleted: Family<CreatorLabels, Counter>,
    pub rejections: Counter,
    pub pods_created: Counter,
    pub api_errors: Counter,
    pub retries: Counter,
    pub trigger_to_created: Histogram,
    pub leader: Gauge,
    pub admissions: Family<VerdictLabels, Counter>,
    pub duplicates_gated: Counter,
    pub gates_removed: Counter,
    pub gated_deleted: Counter,
    pub handed_over: Counter,
    pub held_deleted: Counter,
    pub admission_seconds: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ste_activator_bridge");
        let decisions = Family::<DecisionLabels, Counter>::default();
        let races = Family::<RaceLabels, Counter>::default();
        let duplicates_deleted = Family::<CreatorLabels, Counter>::default();
        let rejections = Counter::default();
        let pods_created = Counter::default();
        let api_errors = Counter::default();
        let retries = Counter::default();
        let trigger_to_created = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let leader = Gauge::default();
        let admissions = Family::<VerdictLabels, Counter>::default();
        let duplicates_gated = Counter::default();
        let gates_removed = Counter::default();
        let gated_deleted = Counter::default();
        let handed_over = Counter::default();
        let held_deleted = Counter::default();
        let admission_seconds = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ]);
        registry.register(
            "webhook_admissions",
            "Pods seen by the admission webhook, by verdict",
            admissions.clone(),
        );
        registry.register(
            "duplicates_gated",
            "Pods created while the bridge's pods already filled their ReplicaSet, held back by the scheduling gate",
            duplicates_gated.clone(),
        );
        registry.register(
            "gates_removed",
            "Gated pods the sweep found still wanted and released to the scheduler",
            gates_removed.clone(),
        );
        registry.register(
            "gated_deleted",
            "Surplus gated pods the sweep deleted after the grace period",
            gated_deleted.clone(),
        );
        registry.register(
            "handed_over",
            "Bridge pods handed from the Deployment to their ReplicaSet once the ReplicaSet controller had seen the scale-up",
            handed_over.clone(),
        );
        registry.register(
            "held_deleted",
            "Bridge pods deleted because their revision went back to 0 before the hand-over",
            held_deleted.clone(),
        );
        registry.register(
            "webhook_admission_seconds",
            "Time the webhook took to decide, request read to response",
            admission_seconds.clone(),
        );
        registry.register(
            "decisions",
            "Scale-ups from zero seen, by what the bridge did",
            decisions.clone(),
        );
        registry.register(
            "races",
            "Scale-ups the bridge acted on, by whether the ReplicaSet controller also created pods",
            races.clone(),
        );
        registry.register(
            "duplicates_deleted",
            "Pods of a woken ReplicaSet deleted as excess within the settle window, by creator",
            duplicates_deleted.clone(),
        );
        registry.register(
            "rejections",
            "Pods created by the bridge that the kubelet rejected (phase Failed)",
            rejections.clone(),
        );
        registry.register(
            "pods_created",
            "Pods created by the bridge",
            pods_created.clone(),
        );
        registry.register(
            "api_errors",
            "Kubernetes API calls of the bridge that failed",
            api_errors.clone(),
        );
        registry.register(
            "retries",
            "Scale-ups retried after an error",
            retries.clone(),
        );
        registry.register(
            "trigger_to_pod_created_seconds",
            "From the scale-up event to the bridge's pod created",
            trigger_to_created.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the lease",
            leader.clone(),
        );
        let tap = TapMetrics::register(&mut registry);
        Self {
            tap,
            registry,
            decisions,
            races,
            duplicates_deleted,
            rejections,
            pods_created,
            api_errors,
            retries,
            trigger_to_created,
            leader,
            admissions,
            duplicates_gated,
            gates_removed,
            gated_deleted,
            handed_over,
            held_deleted,
            admission_seconds,
        }
    }

    pub fn decision(&self, decision: &str) {
        self.decisions
            .get_or_create(&DecisionLabels {
                decision: decision.into(),
            })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
