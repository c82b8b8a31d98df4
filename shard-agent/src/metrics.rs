//! Prometheus metrics of the agent (served on the admin port's /metrics).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `success` or `failure`.
    pub result: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    pub etcd_restarts: Counter,
    pub health_checks: Counter,
    pub health_check_failures: Counter,
    pub heartbeats: Family<ResultLabels, Counter>,
    pub etcd_up: Gauge,
    pub registered: Gauge,
    pub drain_seconds: Gauge<f64, AtomicU64>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ste_shard_agent");
        let etcd_restarts = Counter::default();
        registry.register(
            "etcd_restarts",
            "Times etcd was restarted after it exited or stayed unhealthy",
            etcd_restarts.clone(),
        );
        let health_checks = Counter::default();
        registry.register(
            "health_checks",
            "Health checks of etcd (GET /health?exclude=NOSPACE)",
            health_checks.clone(),
        );
        let health_check_failures = Counter::default();
        registry.register(
            "health_check_failures",
            "Failed health checks of etcd",
            health_check_failures.clone(),
        );
        let heartbeats = Family::<ResultLabels, Counter>::default();
        registry.register(
            "heartbeats",
            "Heartbeats written to the Shard's status, by result",
            heartbeats.clone(),
        );
        let etcd_up = Gauge::default();
        registry.register(
            "etcd_up",
            "1 when the last health check of etcd succeeded",
            etcd_up.clone(),
        );
        let registered = Gauge::default();
        registry.register(
            "registered",
            "1 while the Shard is registered",
            registered.clone(),
        );
        let drain_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "drain_seconds",
            "Duration of the last drain, from setting spec.drain to the router's Drained (or the timeout)",
            drain_seconds.clone(),
        );
        Metrics {
            registry,
            etcd_restarts,
            health_checks,
            health_check_failures,
            heartbeats,
            etcd_up,
            registered,
            drain_seconds,
        }
    }

    pub fn heartbeat(&self, ok: bool) {
        self.heartbeats
            .get_or_create(&ResultLabels {
                result: if ok { "success" } else { "failure" },
            })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
