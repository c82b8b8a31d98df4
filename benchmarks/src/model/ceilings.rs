//! Each resource's ceiling in Deployments/s for one arm on one control
//! plane, and the smallest: the predicted sustained churn and its bottleneck.

use super::costs::ArmCosts;
use super::facts::{
    on_control_plane, parallelism, requests_of, writes_to, Client, ClientLimit, Layout, Store,
    REQUESTS,
};
use crate::arms::Arm;

/// The control plane and the stores the model is evaluated on.
#[derive(Clone, Copy, Debug)]
pub struct Plane {
    pub cores: f64,
    pub layout: Layout,
    pub limit: ClientLimit,
    /// Saturated writes/s of the durable etcd (measured, at its member count).
    pub durable_writes_per_s: f64,
    /// Saturated writes/s of one plain RAM etcd (measured).
    pub ram_writes_per_s: f64,
    /// Latency of a write to the durable etcd (fsync delay + the rest).
    pub durable_write_s: f64,
    /// Latency of a write that does not wait for an fsync (RAM store, or a
    /// read answered 409).
    pub ram_write_s: f64,
    /// Sync workers of the deployment and of the replicaset controller each
    /// (`--concurrent-deployment-syncs`, `--concurrent-replicaset-syncs`).
    pub sync_workers: f64,
}

/// One resource's ceiling.
#[derive(Clone, Debug, PartialEq)]
pub struct Ceiling {
    pub resource: String,
    pub per_s: f64,
}

/// Every ceiling of `arm` on `plane` (client limits: `plane.limit` as the
/// arm runs it).
pub fn ceilings(arm: &ArmCosts, plane: &Plane) -> Vec<Ceiling> {
    let mut all = cpu_ceilings(arm, plane);
    all.extend(client_ceilings(plane.limit.for_arm(arm.arm)));
    all.extend(store_ceilings(arm.arm, plane));
    all.extend(worker_ceilings(arm.arm, plane));
    all
}

/// The smallest ceiling: the predicted sustained churn and its bottleneck.
pub fn bottleneck(ceilings: &[Ceiling]) -> Option<&Ceiling> {
    ceilings.iter().min_by(|a, b| a.per_s.total_cmp(&b.per_s))
}

/// The control plane's cores shared by its processes, and each process
/// that cannot use them all.
fn cpu_ceilings(arm: &ArmCosts, plane: &Plane) -> Vec<Ceiling> {
    let on_plane: Vec<_> = arm
        .costs
        .iter()
        .filter(|c| on_control_plane(&c.component, plane.layout))
        .collect();
    let idle: f64 = on_plane.iter().map(|c| c.idle_cores).sum();
    let per: f64 = on_plane.iter().map(|c| c.per_deployment_s).sum();
    let mut out = vec![Ceiling {
        resource: format!("control-plane CPU ({} cores)", plane.cores),
        per_s: rate(plane.cores - idle, per),
    }];
    for cost in on_plane {
        let Some(threads) = parallelism(&cost.component, plane.sync_workers) else {
            continue;
        };
        if threads >= plane.cores {
            continue; // bound by the shared cores above
        }
        out.push(Ceiling {
            resource: format!(
                "{} CPU ({threads} core{} at most)",
                cost.component,
                if threads == 1.0 { "" } else { "s" }
            ),
            per_s: rate(threads - cost.idle_cores, cost.per_deployment_s),
        });
    }
    out
}

/// Each rate-limited client: its QPS over its requests per Deployment.
pub fn client_ceilings(limit: ClientLimit) -> Vec<Ceiling> {
    [
        Client::DeploymentController,
        Client::ReplicaSetController,
        Client::Scheduler,
    ]
    .into_iter()
    .filter_map(|client| {
        let qps = limit.qps(client)?;
        let requests = requests_of(client);
        Some(Ceiling {
            resource: format!(
                "{} client ({qps} QPS / {requests:.2} requests per Deployment)",
                client.name()
            ),
            per_s: qps / requests,
        })
    })
    .collect()
}

/// Writes each store takes per Deployment against its saturated write rate.
pub fn store_ceilings(arm: Arm, plane: &Plane) -> Vec<Ceiling> {
    let objects = writes_to(Store::Objects);
    let pods = writes_to(Store::Pods);
    let store = |name: &str, writes: f64, ceiling: f64| Ceiling {
        resource: format!("{name} ({ceiling:.0} writes/s / {writes:.2} per Deployment)"),
        per_s: ceiling / writes,
    };
    match arm {
        Arm::Stock | Arm::StockQps => vec![store(
            "durable etcd writes",
            objects + pods,
            plane.durable_writes_per_s,
        )],
        Arm::Override => vec![
            store("durable etcd writes", objects, plane.durable_writes_per_s),
            store("override RAM etcd writes", pods, plane.ram_writes_per_s),
        ],
        // The shards scale with their count, on workers; the router's CPU
        // is in the CPU ceilings.
        Arm::Ste => vec![store(
            "durable etcd writes",
            objects,
            plane.durable_writes_per_s,
        )],
        Arm::Tuned => vec![store(
            "RAM etcd writes",
            objects + pods,
            plane.ram_writes_per_s,
        )],
        Arm::External => Vec::new(),
    }
}

/// Little's law on each controller's sync workers: a worker waits for its
/// requests one after the other, so workers / (seconds waited per
/// Deployment) Deployments/s at most, whatever the cores.
pub fn worker_ceilings(arm: Arm, plane: &Plane) -> Vec<Ceiling> {
    [Client::DeploymentController, Client::ReplicaSetController]
        .into_iter()
        .filter_map(|client| {
            if !client.has_sync_workers() {
                return None;
            }
            let workers = plane.sync_workers;
            let waited: f64 = REQUESTS
                .iter()
                .filter(|r| r.client == client && r.in_worker)
                .map(|r| r.per_deployment * latency(arm, r.store, plane))
                .sum();
            Some(Ceiling {
                resource: format!(
                    "{} workers ({workers} × {:.1} ms waited per Deployment)",
                    client.name(),
                    waited * 1e3
                ),
                per_s: rate(workers, waited),
            })
        })
        .collect()
}

/// How long a request to `store` waits on `arm`.
fn latency(arm: Arm, store: Store, plane: &Plane) -> f64 {
    let durable = match store {
        Store::Objects => arm != Arm::Tuned,
        Store::Pods => matches!(arm, Arm::Stock | Arm::StockQps),
        Store::NoWrite => false,
    };
    if durable {
        plane.durable_write_s
    } else {
        plane.ram_write_s
    }
}

/// `budget / cost`, 0 when nothing is left, unbounded when it costs nothing.
fn rate(budget: f64, cost: f64) -> f64 {
    if budget <= 0.0 {
        0.0
    } else if cost <= 0.0 {
        f64::INFINITY
    } else {
        budget / cost
    }
}
