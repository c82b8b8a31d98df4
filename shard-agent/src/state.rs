//! State shared by the supervisor, the registration and the admin server.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

pub struct AgentState {
    pub metrics: Metrics,
    pub shard_name: String,
    pub registration_enabled: bool,
    started: Instant,
    /// Milliseconds since `started` of the supervisor loop's last turn.
    last_tick_ms: AtomicU64,
    /// The supervisor turns at least this often while alive.
    liveness_window: Duration,
    etcd_healthy: AtomicBool,
    etcd_pid: AtomicU32,
    registered: AtomicBool,
    draining: AtomicBool,
}

impl AgentState {
    pub fn new(
        shard_name: String,
        registration_enabled: bool,
        health_interval: Duration,
    ) -> AgentState {
        AgentState {
            metrics: Metrics::new(),
            shard_name,
            registration_enabled,
            started: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
            liveness_window: (health_interval * 3).max(Duration::from_secs(10)),
            etcd_healthy: AtomicBool::new(false),
            etcd_pid: AtomicU32::new(0),
            registered: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }
    }

    pub fn tick(&self) {
        self.last_tick_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// The supervisor loop turned recently.
    pub fn is_live(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        now.saturating_sub(self.last_tick_ms.load(Ordering::Relaxed))
            <= self.liveness_window.as_millis() as u64
    }

    pub fn set_etcd_healthy(&self, healthy: bool) {
        self.etcd_healthy.store(healthy, Ordering::Relaxed);
        self.metrics.etcd_up.set(healthy as i64);
    }

    pub fn etcd_healthy(&self) -> bool {
        self.etcd_healthy.load(Ordering::Relaxed)
    }

    pub fn set_etcd_pid(&self, pid: Option<u32>) {
        self.etcd_pid.store(pid.unwrap_or(0), Ordering::Relaxed);
    }

    pub fn etcd_pid(&self) -> Option<u32> {
        Some(self.etcd_pid.load(Ordering::Relaxed)).filter(|p| *p != 0)
    }

    pub fn set_registered(&self, registered: bool) {
        self.registered.store(registered, Ordering::Relaxed);
        self.metrics.registered.set(registered as i64);
    }

    pub fn registered(&self) -> bool {
        self.registered.load(Ordering::Relaxed)
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Ready: etcd healthy, the Shard registered (unless registration is
    /// off), not draining.
    pub fn is_ready(&self) -> bool {
        self.etcd_healthy() && (self.registered() || !self.registration_enabled) && !self.draining()
    }
}
