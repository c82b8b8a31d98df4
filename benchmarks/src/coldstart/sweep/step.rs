//! One step of the sweep: wakes sent at a fixed rate for a while through
//! the bench's activator (request stats to Knative's autoscaler, as the
//! rounds wake revisions), each on a revision of the pool at zero; every
//! wake followed until its pod IP is in the revision's private Endpoints
//! (answered) or its deadline passed; then the pool back at zero.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::api::ListParams;
use serde::Serialize;
use serde_json::Value;

use super::plan::{schedule, Pool, ZeroSnapshot};
use super::verdict::{quantile, verdict, Counts, Verdict};
use crate::api::{client_for, dynamic, list_json, resource_of};
use crate::cluster::ClusterRecord;
use crate::knative::hops::{Hop, HopWatch};
use crate::knative::objects::REVISION_LABEL;
use crate::knative::pods_per_wake::PodTally;
use crate::knative::stats::{Activator, RevisionKey};
use crate::progress::Progress;

/// How often the pool's revisions are listed to see which are at zero.
const ZERO_POLL: Duration = Duration::from_millis(500);

/// How long a step waits after its last wake for the pool to be back at zero.
const BACK_TO_ZERO_WITHIN: Duration = Duration::from_secs(180);

/// One wake of a step.
#[derive(Serialize, Clone, Debug)]
pub struct SweepWake {
    pub revision: String,
    /// Seconds from the step's start it was scheduled at (and timed from).
    pub at_s: f64,
    /// Its pod IP reached the private Endpoints within the deadline.
    pub answered: bool,
    /// Milliseconds from the scheduled time to each hop seen by then.
    pub ms: BTreeMap<Hop, f64>,
}

/// p50 / p95 / p99 in milliseconds (null without samples).
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq)]
pub struct Percentiles {
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

impl Percentiles {
    pub fn of(values: &[f64]) -> Percentiles {
        Percentiles {
            p50: quantile(values, 0.50),
            p95: quantile(values, 0.95),
            p99: quantile(values, 0.99),
        }
    }

    /// "p50 / p95 / p99", `–` for none.
    pub fn cell(&self) -> String {
        let v = |x: Option<f64>| x.map_or("–".into(), |v| format!("{v:.0}"));
        format!("{} / {} / {}", v(self.p50), v(self.p95), v(self.p99))
    }
}

/// What one step measured.
#[derive(Serialize, Clone, Debug)]
pub struct StepResult {
    pub arm: crate::cluster::Arm,
    /// "none", or the bridge's mode.
    pub bridge: String,
    /// Offered wakes per second.
    pub rate_per_s: f64,
    pub duration_s: f64,
    pub deadline_s: f64,
    /// Revisions in the pool.
    pub pool: usize,
    #[serde(flatten)]
    pub counts: Counts,
    /// Answered wakes per second of the step.
    pub achieved_per_s: f64,
    /// Over answered wakes, ms from the scheduled wake to the hop.
    pub bound_ms: Percentiles,
    pub ready_ms: Percentiles,
    pub endpoints_ms: Percentiles,
    /// The latest a wake's stat left after its scheduled time (the bench's own lag).
    pub max_send_lag_ms: f64,
    pub verdict: Verdict,
    /// Revisions not back at zero within 180 s after the step (left out of
    /// the pool for the following steps).
    pub stuck_after: usize,
    /// The pods the step's wakes brought, duplicates counted: followed from
    /// the first wake until the pool is back at zero.
    pub pods: PodTally,
    /// The bridge's counters over the step (bridge modes only).
    pub bridge_counters: Option<BTreeMap<String, f64>>,
    pub wakes: Vec<SweepWake>,
}

/// The revisions at zero, listed every [`ZERO_POLL`] from kube-apiserver's
/// watch cache by a task of its own, so the step's sends never wait on a
/// list.
struct ZeroWatch {
    at_zero: Arc<Mutex<ZeroSnapshot>>,
    task: tokio::task::JoinHandle<()>,
}

/// One listing of the pool's objects (lists as JSON).
pub struct ZeroLists {
    pub deployments: Value,
    pub replicasets: Value,
    pub endpoints: Value,
    pub pods: Value,
}

/// The revisions `lists` show at zero: Deployment at 0 (spec and status),
/// every ReplicaSet at 0 (spec and status), no address in the private
/// Endpoints and no pod. The Deployment alone is not enough: when the
/// controllers are seconds behind, a revision the autoscaler has scaled back
/// to 0 can show no pod for a moment while its ReplicaSet is still at 1 —
/// its pod then appears after the next wake was sent, is Ready and in the
/// Endpoints before the bench follows that wake, and the wake looks
/// unanswered (seen at 6/s, 6 of 360 wakes).
pub fn revisions_at_zero(lists: &ZeroLists) -> HashSet<String> {
    let revision = |o: &Value| {
        o["metadata"]["labels"][REVISION_LABEL]
            .as_str()
            .map(String::from)
    };
    let items = |l: &Value| l["items"].as_array().cloned().unwrap_or_default();
    let at_zero = |o: &Value| {
        o["spec"]["replicas"] == 0 && o["status"]["replicas"].as_u64().unwrap_or(0) == 0
    };
    let mut busy: HashSet<String> = items(&lists.pods).iter().filter_map(revision).collect();
    busy.extend(
        items(&lists.replicasets)
            .iter()
            .filter(|rs| !at_zero(rs))
            .filter_map(revision),
    );
    // By name, as the hops are: the revision's private Service.
    let private = |e: &Value| {
        e["metadata"]["name"]
            .as_str()
            .and_then(|n| n.strip_suffix("-private"))
            .map(String::from)
    };
    busy.extend(
        items(&lists.endpoints)
            .iter()
            .filter(|e| {
                e["subsets"].as_array().into_iter().flatten().any(|s| {
                    ["addresses", "notReadyAddresses"]
                        .iter()
                        .any(|k| s[*k].as_array().is_some_and(|a| !a.is_empty()))
                })
            })
            .filter_map(private),
    );
    items(&lists.deployments)
        .iter()
        .filter(|d| at_zero(d))
        .filter_map(revision)
        .filter(|r| !busy.contains(r))
        .collect()
}

impl ZeroWatch {
    fn start(record: &ClusterRecord) -> anyhow::Result<ZeroWatch> {
        let client = client_for(record)?;
        let deployments = dynamic(
            &client,
            &record.namespace,
            &resource_of::<k8s_openapi::api::apps::v1::Deployment>(),
        );
        let pods = dynamic(
            &client,
            &record.namespace,
            &resource_of::<k8s_openapi::api::core::v1::Pod>(),
        );
        let replicasets = dynamic(
            &client,
            &record.namespace,
            &resource_of::<k8s_openapi::api::apps::v1::ReplicaSet>(),
        );
        let endpoints = dynamic(
            &client,
            &record.namespace,
            &resource_of::<k8s_openapi::api::core::v1::Endpoints>(),
        );
        let at_zero = Arc::new(Mutex::new(ZeroSnapshot {
            listed_at: Instant::now(),
            revisions: HashSet::new(),
        }));
        let shared = at_zero.clone();
        let task = tokio::spawn(async move {
            let params = ListParams::default().labels(REVISION_LABEL).match_any();
            let all = ListParams::default().match_any();
            loop {
                let listed_at = Instant::now();
                let listed = async {
                    let lists = ZeroLists {
                        deployments: list_json(&deployments, &params).await?,
                        replicasets: list_json(&replicasets, &params).await?,
                        // Endpoints by name (see `revisions_at_zero`).
                        endpoints: list_json(&endpoints, &all).await?,
                        pods: list_json(&pods, &params).await?,
                    };
                    anyhow::Ok(revisions_at_zero(&lists))
                }
                .await;
                match listed {
                    Ok(revisions) => {
                        *shared.lock().unwrap_or_else(|p| p.into_inner()) = ZeroSnapshot {
                            listed_at,
                            revisions,
                        }
                    }
                    Err(e) => tracing::warn!("listing the sweep's revisions: {e}"),
                }
                tokio::time::sleep(ZERO_POLL).await;
            }
        });
        Ok(ZeroWatch { at_zero, task })
    }

    fn get(&self) -> ZeroSnapshot {
        self.at_zero
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for ZeroWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A wake whose request is held.
struct Held {
    revision: String,
    key: RevisionKey,
    due: Instant,
    at_s: f64,
}

/// What a step is asked to do.
pub struct StepPlan<'a> {
    pub arm: crate::cluster::Arm,
    pub bridge: &'a str,
    pub rate: f64,
    pub duration: Duration,
    pub deadline: Duration,
    /// The highest p95 wake → Endpoints a sustained step may have.
    pub p95_max: Duration,
}

/// The state of a running step.
struct Running<'a> {
    activator: &'a Activator,
    watch: HopWatch,
    deadline: Duration,
    held: Vec<Held>,
    wakes: Vec<SweepWake>,
    counts: Counts,
    max_lag: Duration,
}

impl Running<'_> {
    /// Sends the wake due at `due` (`at_s` into the step) on a free revision.
    async fn send(&mut self, pool: &mut Pool, namespace: &str, due: Instant, at_s: f64) {
        self.counts.scheduled += 1;
        let Some(revision) = pool.take() else {
            return;
        };
        self.watch.woke(&revision, due);
        let key = RevisionKey::new(namespace, &revision);
        match self.activator.request_in(&key).await {
            Ok(()) => {
                self.counts.sent += 1;
                self.max_lag = self.max_lag.max(due.elapsed());
                self.held.push(Held {
                    revision,
                    key,
                    due,
                    at_s,
                });
            }
            Err(e) => {
                tracing::warn!("waking {revision}: {e}");
                self.counts.send_failed += 1;
                pool.release(&revision, Instant::now());
            }
        }
    }

    /// Answers the held wakes whose pod IP is in the private Endpoints,
    /// gives up on those past their deadline.
    fn settle(&mut self, pool: &mut Pool, now: Instant) {
        let mut still = Vec::new();
        for h in std::mem::take(&mut self.held) {
            let answered = self.watch.reached(&h.revision, Hop::Endpoints);
            if !answered && now < h.due + self.deadline {
                still.push(h);
                continue;
            }
            self.activator.request_out(&h.key);
            pool.release(&h.revision, now);
            if answered {
                self.counts.answered += 1;
            } else {
                self.counts.timed_out += 1;
            }
            let ms = self
                .watch
                .wake_of(&h.revision)
                .map(|w| w.ms)
                .unwrap_or_default();
            self.wakes.push(SweepWake {
                revision: h.revision,
                at_s: h.at_s,
                answered,
                ms,
            });
        }
        self.held = still;
    }
}

/// Runs one step with `pool` (its revisions at zero) and waits until the
/// pool is back at zero.
pub async fn run(
    record: &ClusterRecord,
    activator: &Activator,
    pool: &mut Pool,
    plan: &StepPlan<'_>,
) -> anyhow::Result<StepResult> {
    let watch = HopWatch::start(record).await?;
    let zero = ZeroWatch::start(record)?;
    // Let the watches settle before the first wake.
    tokio::time::sleep(Duration::from_millis(300)).await;
    pool.reset_misses();
    let offsets = schedule(plan.rate, plan.duration);
    let label = format!(
        "{:?}, bridge {}, {}/s",
        plan.arm,
        plan.bridge,
        crate::plots::ticks::trim(plan.rate)
    );
    let mut progress = Progress::new(format!("{label}: wakes due"), offsets.len() as u64);
    let mut step = Running {
        activator,
        watch,
        deadline: plan.deadline,
        held: Vec::new(),
        wakes: Vec::new(),
        counts: Counts::default(),
        max_lag: Duration::ZERO,
    };
    let start = Instant::now();
    let mut next = 0;
    loop {
        while next < offsets.len() && start + offsets[next] <= Instant::now() {
            let due = start + offsets[next];
            step.send(pool, &record.namespace, due, offsets[next].as_secs_f64())
                .await;
            next += 1;
        }
        let now = Instant::now();
        step.settle(pool, now);
        pool.observe(&zero.get(), |r| reported(activator, record, r), now);
        let message = format!(
            "answered {}, held {}, pool misses {}, free {}",
            step.counts.answered,
            step.held.len(),
            pool.misses(),
            pool.free()
        );
        progress.update(next as u64, &message);
        if next >= offsets.len() && step.held.is_empty() {
            progress.finish(next as u64, &message);
            break;
        }
        let tick = now + Duration::from_millis(20);
        let wake_at = offsets.get(next).map_or(tick, |o| (start + *o).min(tick));
        tokio::time::sleep_until(wake_at.into()).await;
    }
    step.counts.pool_misses = pool.misses();
    // The watch runs until the pool is back at zero: a late duplicate of the
    // last wakes is counted too.
    let stuck = back_to_zero(activator, record, pool, &zero).await;
    let pods = step.watch.pods();
    step.watch.stop();
    Ok(result(
        plan,
        pool,
        step.counts,
        step.wakes,
        step.max_lag,
        stuck,
        pods,
    ))
}

fn reported(activator: &Activator, record: &ClusterRecord, revision: &str) -> bool {
    activator.reports_on(&RevisionKey::new(&record.namespace, revision))
}

/// Waits until every revision taken is back in the pool; returns how many
/// were not after [`BACK_TO_ZERO_WITHIN`].
async fn back_to_zero(
    activator: &Activator,
    record: &ClusterRecord,
    pool: &mut Pool,
    zero: &ZeroWatch,
) -> usize {
    let deadline = Instant::now() + BACK_TO_ZERO_WITHIN;
    let mut progress = Progress::new("revisions back at zero", pool.busy() as u64);
    let total = pool.busy();
    while pool.busy() > 0 && Instant::now() < deadline {
        pool.observe(
            &zero.get(),
            |r| reported(activator, record, r),
            Instant::now(),
        );
        progress.update((total - pool.busy()) as u64, "");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    progress.finish((total - pool.busy()) as u64, "");
    if pool.busy() > 0 {
        eprintln!(
            "  {} revision(s) not back at zero after {BACK_TO_ZERO_WITHIN:?}: left out of the pool",
            pool.busy()
        );
    }
    pool.busy()
}

fn result(
    plan: &StepPlan<'_>,
    pool: &Pool,
    counts: Counts,
    mut wakes: Vec<SweepWake>,
    max_lag: Duration,
    stuck: usize,
    pods: PodTally,
) -> StepResult {
    wakes.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    let answered: Vec<&SweepWake> = wakes.iter().filter(|w| w.answered).collect();
    let hop = |h: Hop| -> Vec<f64> {
        answered
            .iter()
            .filter_map(|w| w.ms.get(&h).copied())
            .collect()
    };
    let endpoints: Vec<(f64, f64)> = answered
        .iter()
        .filter_map(|w| w.ms.get(&Hop::Endpoints).map(|ms| (w.at_s, *ms)))
        .collect();
    let duration_s = plan.duration.as_secs_f64();
    StepResult {
        arm: plan.arm,
        bridge: plan.bridge.to_string(),
        rate_per_s: plan.rate,
        duration_s,
        deadline_s: plan.deadline.as_secs_f64(),
        pool: pool.free() + pool.busy(),
        counts,
        achieved_per_s: (counts.answered as f64 / duration_s * 100.0).round() / 100.0,
        bound_ms: Percentiles::of(&hop(Hop::PodBound)),
        ready_ms: Percentiles::of(&hop(Hop::PodReady)),
        endpoints_ms: Percentiles::of(&hop(Hop::Endpoints)),
        max_send_lag_ms: (max_lag.as_secs_f64() * 10_000.0).round() / 10.0,
        verdict: verdict(
            &counts,
            &endpoints,
            duration_s,
            plan.p95_max.as_secs_f64() * 1000.0,
        ),
        stuck_after: stuck,
        pods,
        bridge_counters: None,
        wakes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scaled(rev: &str, name: &str, spec: u64, status: u64) -> Value {
        json!({"metadata": {"name": name, "labels": {REVISION_LABEL: rev}},
            "spec": {"replicas": spec}, "status": {"replicas": status}})
    }

    fn lists(deployments: Vec<Value>) -> ZeroLists {
        ZeroLists {
            deployments: json!({ "items": deployments }),
            replicasets: json!({"items": []}),
            endpoints: json!({"items": []}),
            pods: json!({"items": []}),
        }
    }

    #[test]
    fn a_revision_is_at_zero_with_its_deployment_at_zero_and_no_pod() {
        let d = |rev: &str, spec, status| scaled(rev, rev, spec, status);
        let mut l = lists(vec![d("a", 0, 0), d("b", 1, 1), d("c", 0, 1), d("e", 0, 0)]);
        l.pods = json!({"items": [{"metadata": {"labels": {REVISION_LABEL: "e"}}}]});
        assert_eq!(revisions_at_zero(&l), HashSet::from(["a".to_string()]));
        // A Deployment without status yet is at zero too.
        let fresh = json!({"metadata": {"labels": {REVISION_LABEL: "f"}}, "spec": {"replicas": 0}});
        assert!(revisions_at_zero(&lists(vec![fresh])).contains("f"));
    }

    #[test]
    fn a_revision_whose_replicaset_or_private_endpoints_are_not_at_zero_is_busy() {
        let mut l = lists(["a", "b", "c", "d"].map(|r| scaled(r, r, 0, 0)).to_vec());
        // The controllers behind: the ReplicaSet still at 1, or its status.
        l.replicasets = json!({"items": [scaled("a", "a-1", 1, 0), scaled("b", "b-1", 0, 1),
            scaled("d", "d-1", 0, 0)]});
        let address = json!([{"ip": "10.244.0.9"}]);
        l.endpoints = json!({"items": [
            {"metadata": {"name": "c-private"}, "subsets": [{"notReadyAddresses": address}]},
            // The public Service's Endpoints are Knative's (the activator's).
            {"metadata": {"name": "d"}, "subsets": [{"addresses": address}]},
        ]});
        assert_eq!(revisions_at_zero(&l), HashSet::from(["d".to_string()]));
    }

    #[test]
    fn percentiles_of_nothing_are_null() {
        let p = Percentiles::of(&[]);
        assert_eq!(p, Percentiles::default());
        assert_eq!(p.cell(), "– / – / –");
        assert_eq!(Percentiles::of(&[5.0, 1.0]).cell(), "1 / 5 / 5");
    }
}
