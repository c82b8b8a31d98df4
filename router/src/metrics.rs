//! Prometheus metrics of the router (served on the admin port's /metrics).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    pub shard: String,
}

pub struct Metrics {
    pub registry: Registry,
    rpcs: Family<RpcLabels, Counter>,
    rpc_seconds: Family<MethodLabels, Histogram>,
    events: Counter,
    keys_lost: Counter,
    batch_writes: Histogram,
    shard_txn_seconds: Histogram,
    pub watchers: Gauge,
    pub revision: Gauge,
    pub compact_revision: Gauge,
    pub history_events: Gauge,
    pub leases: Gauge,
    pub shard_keys: Family<ShardLabels, Gauge>,
    pub shard_up: Family<ShardLabels, Gauge>,
    pub shard_bytes: Family<ShardLabels, Gauge>,
    keys_moved: Counter,
    keys_restored: Counter,
    pub keys_to_move: Gauge,
    pub keys_under_replicated: Gauge,
    ring_changes: Family<ChangeLabels, Counter>,
    reconciliations: Family<ShardLabels, Counter>,
    shard_checks: Family<ShardLabels, Counter>,
    value_cache_hits: Counter,
    value_cache_misses: Counter,
    value_cache_bytes: Gauge,
    value_cache_entries: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    pub change: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ste_router");
        let rpcs = Family::<RpcLabels, Counter>::default();
        registry.register(
            "rpcs",
            "gRPC requests served, by method and status code",
            rpcs.clone(),
        );
        let rpc_seconds = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
        });
        registry.register(
            "rpc_duration_seconds",
            "Time to answer a unary gRPC request",
            rpc_seconds.clone(),
        );
        let events = Counter::default();
        registry.register(
            "events",
            "Watch events committed (one per key changed)",
            events.clone(),
        );
        let keys_lost = Counter::default();
        registry.register(
            "keys_lost",
            "Keys a shard no longer held when reconciled (announced as DELETE events)",
            keys_lost.clone(),
        );
        let batch_writes = Histogram::new(exponential_buckets(1.0, 2.0, 8));
        registry.register(
            "batch_writes",
            "Writes committed together in one shard Txn (group commit)",
            batch_writes.clone(),
        );
        let shard_txn_seconds = Histogram::new(exponential_buckets(0.000_025, 2.0, 18));
        registry.register(
            "shard_txn_duration_seconds",
            "Time of a group commit's shard Txn, from sending it to its answer (the shard hop of a write)",
            shard_txn_seconds.clone(),
        );
        let watchers = Gauge::default();
        registry.register("watchers", "Open watches", watchers.clone());
        let revision = Gauge::default();
        registry.register(
            "revision",
            "Current (published) global revision",
            revision.clone(),
        );
        let compact_revision = Gauge::default();
        registry.register(
            "compact_revision",
            "Oldest readable global revision",
            compact_revision.clone(),
        );
        let history_events = Gauge::default();
        registry.register(
            "history_events",
            "Events kept for watches",
            history_events.clone(),
        );
        let leases = Gauge::default();
        registry.register("leases", "Live leases", leases.clone());
        let shard_keys = Family::<ShardLabels, Gauge>::default();
        registry.register("shard_keys", "Keys per shard", shard_keys.clone());
        let shard_up = Family::<ShardLabels, Gauge>::default();
        registry.register(
            "shard_up",
            "1 when the shard is loaded and answered its last health check",
            shard_up.clone(),
        );
        let shard_bytes = Family::<ShardLabels, Gauge>::default();
        registry.register(
            "shard_bytes",
            "Bytes in use in the shard's etcd backend (from its last health check)",
            shard_bytes.clone(),
        );
        let keys_moved = Counter::default();
        registry.register(
            "keys_moved",
            "Keys moved between shards (invisible to clients: same revisions, no events)",
            keys_moved.clone(),
        );
        let keys_restored = Counter::default();
        registry.register(
            "keys_restored",
            "Keys of lost shards restored from their replica copies (replication factor 2)",
            keys_restored.clone(),
        );
        let keys_to_move = Gauge::default();
        registry.register(
            "keys_to_move",
            "Keys not on the shard the ring places them on (moves in progress)",
            keys_to_move.clone(),
        );
        let keys_under_replicated = Gauge::default();
        registry.register(
            "keys_under_replicated",
            "Keys without a valid replica copy when last checked (replication factor 2)",
            keys_under_replicated.clone(),
        );
        let ring_changes = Family::<ChangeLabels, Counter>::default();
        registry.register(
            "ring_changes",
            "Shards joined, drained and declared lost",
            ring_changes.clone(),
        );
        let reconciliations = Family::<ShardLabels, Counter>::default();
        registry.register(
            "reconciliations",
            "Full scans of a shard to bring the index in line with it (after a write with an unknown outcome, an outage or a replaced shard); each blocks the shard's writes for one scan",
            reconciliations.clone(),
        );
        let shard_checks = Family::<ShardLabels, Counter>::default();
        registry.register(
            "shard_checks",
            "Periodic health checks the shard answered (each also looks for a lost or replaced etcd)",
            shard_checks.clone(),
        );
        let value_cache_hits = Counter::default();
        registry.register(
            "value_cache_hits",
            "Values read from the router's value cache instead of a shard (single-key reads, a Txn's read of one key, value compares)",
            value_cache_hits.clone(),
        );
        let value_cache_misses = Counter::default();
        registry.register(
            "value_cache_misses",
            "Cache lookups that found no value for the key's current version (read from the shard)",
            value_cache_misses.clone(),
        );
        let value_cache_bytes = Gauge::default();
        registry.register(
            "value_cache_bytes",
            "Bytes held by the value cache (keys, values and per-entry overhead)",
            value_cache_bytes.clone(),
        );
        let value_cache_entries = Gauge::default();
        registry.register(
            "value_cache_entries",
            "Values held by the value cache",
            value_cache_entries.clone(),
        );
        Metrics {
            value_cache_hits,
            value_cache_misses,
            value_cache_bytes,
            value_cache_entries,
            reconciliations,
            shard_checks,
            shard_bytes,
            keys_moved,
            keys_restored,
            keys_to_move,
            keys_under_replicated,
            ring_changes,
            registry,
            rpcs,
            rpc_seconds,
            events,
            keys_lost,
            batch_writes,
            shard_txn_seconds,
            watchers,
            revision,
            compact_revision,
            history_events,
            leases,
            shard_keys,
            shard_up,
        }
    }
}

impl Metrics {
    pub fn rpc(&self, method: &'static str, code: tonic::Code, seconds: f64) {
        self.rpcs
            .get_or_create(&RpcLabels {
                method,
                code: code_name(code),
            })
            .inc();
        self.rpc_seconds
            .get_or_create(&MethodLabels { method })
            .observe(seconds);
    }

    pub fn events_written(&self, n: usize) {
        self.events.inc_by(n as u64);
    }

    pub fn batch(&self, writes: i64) {
        self.batch_writes.observe(writes as f64);
    }

    pub fn shard_txn(&self, seconds: f64) {
        self.shard_txn_seconds.observe(seconds);
    }

    pub fn keys_moved(&self, n: usize) {
        self.keys_moved.inc_by(n as u64);
    }

    pub fn keys_restored(&self, n: usize) {
        self.keys_restored.inc_by(n as u64);
    }

    pub fn ring_change(&self, change: &'static str) {
        self.ring_changes
            .get_or_create(&ChangeLabels { change })
            .inc();
    }

    pub fn reconciliation(&self, shard: &str) {
        self.reconciliations
            .get_or_create(&ShardLabels {
                shard: shard.to_string(),
            })
            .inc();
    }

    pub fn shard_checked(&self, shard: &str) {
        self.shard_checks
            .get_or_create(&ShardLabels {
                shard: shard.to_string(),
            })
            .inc();
    }

    pub fn touch_reconciliations(&self, shard: &str) {
        let _ = self.reconciliations.get_or_create(&ShardLabels {
            shard: shard.to_string(),
        });
    }

    pub fn value_cache_lookup(&self, hit: bool) {
        if hit {
            self.value_cache_hits.inc();
        } else {
            self.value_cache_misses.inc();
        }
    }

    pub fn value_cache_size(&self, bytes: usize, entries: usize) {
        self.value_cache_bytes.set(bytes as i64);
        self.value_cache_entries.set(entries as i64);
    }

    /// (hits, misses) so far.
    pub fn value_cache_counts(&self) -> (u64, u64) {
        (self.value_cache_hits.get(), self.value_cache_misses.get())
    }

    pub fn keys_lost(&self, n: usize) {
        self.keys_lost.inc_by(n as u64);
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}
