//! Per revision and wake, when each hop of a cold start was seen, from
//! watches on the API server (arrival times of watch events, sub-millisecond):
//! wake sent → Deployment scaled (`spec.replicas > 0`) → pod created → pod
//! bound → pod Ready → pod IP in the revision's private v1 Endpoints and in
//! its EndpointSlice (Knative's controller makes the `<revision>-private`
//! Service; kube-controller-manager's endpoints and endpointslice
//! controllers fill them).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use anyhow::Context;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Endpoints, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ApiResource;

use super::objects::REVISION_LABEL;
use super::pods_per_wake::{PodLedger, PodTally};
use crate::api::{client_for, collection_version, dynamic, resource_of};
use crate::cluster::ClusterRecord;
use crate::measure::{all_open, watch_objects_started};
use crate::stats::Samples;

/// A hop of a cold start, in the order a wake goes through them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hop {
    /// The revision's Deployment seen with `spec.replicas > 0` (the autoscaler's patch).
    Scaled,
    /// A pod of the revision seen.
    PodCreated,
    /// A pod of the revision seen with `spec.nodeName`.
    PodBound,
    /// A pod of the revision seen Ready.
    PodReady,
    /// An address in the `<revision>-private` v1 Endpoints.
    Endpoints,
    /// A ready endpoint in the `<revision>-private` EndpointSlice.
    EndpointSlice,
}

impl Hop {
    pub const ALL: [Hop; 6] = [
        Hop::Scaled,
        Hop::PodCreated,
        Hop::PodBound,
        Hop::PodReady,
        Hop::Endpoints,
        Hop::EndpointSlice,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Hop::Scaled => "deployment scaled",
            Hop::PodCreated => "pod created",
            Hop::PodBound => "pod bound",
            Hop::PodReady => "pod Ready",
            Hop::Endpoints => "private Endpoints",
            Hop::EndpointSlice => "private EndpointSlice",
        }
    }
}

#[derive(Clone, Debug)]
struct Wake {
    sent: Instant,
    seen: BTreeMap<Hop, Instant>,
}

/// The wakes followed, and the pods each brought.
#[derive(Default)]
struct Followed {
    wakes: HashMap<String, Wake>,
    pods: PodLedger,
}

type State = Arc<Mutex<Followed>>;

/// The watches of one round. Only revisions registered with
/// [`HopWatch::woke`] are followed; each hop keeps its first time.
pub struct HopWatch {
    state: State,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn lock(state: &State) -> std::sync::MutexGuard<'_, Followed> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Followed {
    /// `object` of `kind` seen at `now`: its revision's hops and pods.
    fn saw(&mut self, kind: &str, object: &Value, now: Instant) {
        let Some((rev, hops)) = hops_of(kind, object) else {
            return;
        };
        self.pods.saw(kind, &rev, object);
        if let Some(w) = self.wakes.get_mut(&rev) {
            for hop in hops {
                w.seen.entry(hop).or_insert(now);
            }
        }
    }
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// The hops one object shows, for the revision it belongs to.
pub fn hops_of(kind: &str, object: &Value) -> Option<(String, Vec<Hop>)> {
    let labels = &object["metadata"]["labels"];
    let private = |name: Option<&str>| {
        name.and_then(|n| n.strip_suffix("-private"))
            .map(String::from)
    };
    match kind {
        "deployments" => {
            let rev = labels[REVISION_LABEL].as_str()?.to_string();
            let scaled = object["spec"]["replicas"].as_u64().unwrap_or(0) > 0;
            Some((rev, if scaled { vec![Hop::Scaled] } else { vec![] }))
        }
        "pods" => {
            let rev = labels[REVISION_LABEL].as_str()?.to_string();
            let mut hops = vec![Hop::PodCreated];
            if object["spec"]["nodeName"].is_string() {
                hops.push(Hop::PodBound);
            }
            if is_ready(object) {
                hops.push(Hop::PodReady);
            }
            Some((rev, hops))
        }
        "endpoints" => {
            let rev = private(object["metadata"]["name"].as_str())?;
            let has = object["subsets"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["addresses"].as_array().is_some_and(|a| !a.is_empty()));
            Some((rev, if has { vec![Hop::Endpoints] } else { vec![] }))
        }
        "endpointslices" => {
            let rev = private(labels["kubernetes.io/service-name"].as_str())?;
            let has = object["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["conditions"]["ready"] == true);
            Some((
                rev,
                if has {
                    vec![Hop::EndpointSlice]
                } else {
                    vec![]
                },
            ))
        }
        _ => None,
    }
}

/// The collections watched, by the kind name [`hops_of`] takes.
fn collections() -> [(&'static str, ApiResource); 4] {
    [
        ("deployments", resource_of::<Deployment>()),
        ("pods", resource_of::<Pod>()),
        ("endpoints", resource_of::<Endpoints>()),
        ("endpointslices", resource_of::<EndpointSlice>()),
    ]
}

impl HopWatch {
    /// Starts the four watches from their collections' current resourceVersions.
    pub async fn start(record: &ClusterRecord) -> anyhow::Result<HopWatch> {
        let state: State = Arc::default();
        let client = client_for(record)?;
        let mut tasks = Vec::new();
        let mut opened = Vec::new();
        for (kind, resource) in collections() {
            let api = dynamic(&client, &record.namespace, &resource);
            let rv = collection_version(&api)
                .await
                .with_context(|| format!("listing {kind}"))?;
            let s = state.clone();
            let (task, open) =
                watch_objects_started(record, &resource, &rv, move |object, now| {
                    lock(&s).saw(kind, object, now);
                })?;
            tasks.push(task);
            opened.push(open);
        }
        // Open before any wake: what follows is timed as it happens.
        all_open(opened, Duration::from_secs(10)).await?;
        Ok(HopWatch { state, tasks })
    }

    /// The wake of `revision` was sent at `at`; its hops are followed from now on.
    pub fn woke(&self, revision: &str, at: Instant) {
        let mut state = lock(&self.state);
        state.pods.woke(revision);
        state.wakes.insert(
            revision.to_string(),
            Wake {
                sent: at,
                seen: BTreeMap::new(),
            },
        );
    }

    /// Whether `revision` reached `hop`.
    pub fn reached(&self, revision: &str, hop: Hop) -> bool {
        lock(&self.state)
            .wakes
            .get(revision)
            .is_some_and(|w| w.seen.contains_key(&hop))
    }

    /// How many followed revisions reached `hop`.
    pub fn count(&self, hop: Hop) -> usize {
        lock(&self.state)
            .wakes
            .values()
            .filter(|w| w.seen.contains_key(&hop))
            .count()
    }

    /// Per revision, milliseconds from the wake to each hop seen.
    pub fn wakes(&self) -> Vec<WakeHops> {
        let mut out: Vec<WakeHops> = lock(&self.state)
            .wakes
            .iter()
            .map(|(rev, w)| WakeHops {
                revision: rev.clone(),
                ms: w
                    .seen
                    .iter()
                    .map(|(hop, at)| (*hop, millis(at.saturating_duration_since(w.sent))))
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| a.revision.cmp(&b.revision));
        out
    }

    /// Milliseconds from `revision`'s current wake to each hop it reached so
    /// far (a revision woken again starts over at [`HopWatch::woke`]).
    pub fn wake_of(&self, revision: &str) -> Option<WakeHops> {
        lock(&self.state).wakes.get(revision).map(|w| WakeHops {
            revision: revision.to_string(),
            ms: w
                .seen
                .iter()
                .map(|(hop, at)| (*hop, millis(at.saturating_duration_since(w.sent))))
                .collect(),
        })
    }

    /// When each followed revision's wake was sent.
    pub fn sent(&self) -> HashMap<String, Instant> {
        lock(&self.state)
            .wakes
            .iter()
            .map(|(rev, w)| (rev.clone(), w.sent))
            .collect()
    }

    /// Milliseconds from the first to the last Deployment seen scaled: the
    /// pace of the autoscaler's patches.
    pub fn scale_pace_ms(&self) -> f64 {
        let state = lock(&self.state);
        let scaled: Vec<Instant> = state
            .wakes
            .values()
            .filter_map(|w| w.seen.get(&Hop::Scaled).copied())
            .collect();
        match (scaled.iter().min(), scaled.iter().max()) {
            (Some(first), Some(last)) => millis(last.saturating_duration_since(*first)),
            _ => 0.0,
        }
    }

    /// The pods each wake brought so far, duplicates counted.
    pub fn pods(&self) -> PodTally {
        lock(&self.state).pods.tally()
    }

    pub fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// How much earlier than `a` the later hop `b` may be seen and still be in
/// order. Hops of one pod arrive in order on the pod watch; hops from two
/// different watches (the Deployment's, the pod's, the Endpoints') are not
/// ordered with each other (CI saw Endpoints 0.7 ms before PodReady).
fn skew(a: Hop, b: Hop) -> f64 {
    let pod = |h: Hop| matches!(h, Hop::PodCreated | Hop::PodBound | Hop::PodReady);
    if pod(a) && pod(b) {
        0.0
    } else {
        2.0
    }
}

/// One revision's wake: milliseconds from the wake to each hop seen.
#[derive(Clone, Debug, Serialize)]
pub struct WakeHops {
    pub revision: String,
    pub ms: BTreeMap<Hop, f64>,
}

impl WakeHops {
    /// The hops seen out of order (a later hop before an earlier one), as
    /// (earlier, later) pairs; the two Endpoints hops are not ordered
    /// between themselves.
    pub fn out_of_order(&self) -> Vec<(Hop, Hop)> {
        let chain = [Hop::Scaled, Hop::PodCreated, Hop::PodBound, Hop::PodReady];
        let mut bad = Vec::new();
        for (i, a) in chain.iter().enumerate() {
            for b in chain[i + 1..]
                .iter()
                .chain([Hop::Endpoints, Hop::EndpointSlice].iter())
            {
                if let (Some(x), Some(y)) = (self.ms.get(a), self.ms.get(b)) {
                    if *y + skew(*a, *b) < *x {
                        bad.push((*a, *b));
                    }
                }
            }
        }
        bad
    }
}

/// A hop's spread over a round.
#[derive(Clone, Debug, Serialize)]
pub struct HopSummary {
    pub hop: Hop,
    pub name: &'static str,
    /// Revisions that reached it.
    pub count: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub max_ms: f64,
}

/// One round of wakes through the autoscaler, ready to serialize (and plot).
#[derive(Clone, Debug, Serialize)]
pub struct WakeRound {
    /// When each revision's wake was sent (not serialized).
    #[serde(skip)]
    pub sent: HashMap<String, Instant>,
    pub arm: String,
    pub revisions: usize,
    /// Per hop, milliseconds from the wake (p50/p95/max over the revisions).
    pub hops: Vec<HopSummary>,
    /// First → last Deployment seen scaled (the autoscaler's own pace).
    pub scale_pace_ms: f64,
    /// Websocket messages the bench's activator sent to the autoscaler.
    pub stat_messages: u64,
    pub wakes: Vec<WakeHops>,
}

/// Summaries of every hop over `wakes`.
pub fn summarize(wakes: &[WakeHops]) -> Vec<HopSummary> {
    Hop::ALL
        .iter()
        .map(|&hop| {
            let mut samples = Samples::default();
            for w in wakes {
                if let Some(ms) = w.ms.get(&hop) {
                    samples.push(std::time::Duration::from_secs_f64(ms / 1000.0));
                }
            }
            let p = |q| {
                millis(std::time::Duration::from_secs_f64(
                    samples.percentile(q) / 1e6,
                ))
            };
            HopSummary {
                hop,
                name: hop.name(),
                count: samples.len(),
                p50_ms: if samples.is_empty() { 0.0 } else { p(50.0) },
                p95_ms: if samples.is_empty() { 0.0 } else { p(95.0) },
                max_ms: if samples.is_empty() { 0.0 } else { p(100.0) },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn objects_map_to_their_revision_and_hops() {
        let d =
            json!({"metadata": {"labels": {REVISION_LABEL: "r-00001"}}, "spec": {"replicas": 1}});
        assert_eq!(
            hops_of("deployments", &d),
            Some(("r-00001".into(), vec![Hop::Scaled]))
        );
        let p = json!({"metadata": {"labels": {REVISION_LABEL: "r-00001"}}, "spec": {"nodeName": "n"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        assert_eq!(
            hops_of("pods", &p).unwrap().1,
            vec![Hop::PodCreated, Hop::PodBound, Hop::PodReady]
        );
        let e = json!({"metadata": {"name": "r-00001-private"}, "subsets": [{"addresses": [{"ip": "10.0.0.1"}]}]});
        assert_eq!(
            hops_of("endpoints", &e),
            Some(("r-00001".into(), vec![Hop::Endpoints]))
        );
        let public = json!({"metadata": {"name": "r-00001"}, "subsets": [{"addresses": [{"ip": "10.0.0.1"}]}]});
        assert_eq!(hops_of("endpoints", &public), None);
        let s = json!({"metadata": {"labels": {"kubernetes.io/service-name": "r-00001-private"}},
            "endpoints": [{"conditions": {"ready": false}}]});
        assert_eq!(
            hops_of("endpointslices", &s),
            Some(("r-00001".into(), vec![]))
        );
    }

    #[test]
    fn out_of_order_hops_are_named() {
        let w = WakeHops {
            revision: "r".into(),
            ms: [
                (Hop::Scaled, 10.0),
                (Hop::PodCreated, 5.0),
                (Hop::Endpoints, 20.0),
            ]
            .into_iter()
            .collect(),
        };
        assert_eq!(w.out_of_order(), vec![(Hop::Scaled, Hop::PodCreated)]);
        // Two watches may disagree by a little, one watch may not.
        let w = WakeHops {
            revision: "r".into(),
            ms: [
                (Hop::PodBound, 160.0),
                (Hop::PodReady, 163.4),
                (Hop::Endpoints, 162.7),
                (Hop::EndpointSlice, 150.0),
            ]
            .into_iter()
            .collect(),
        };
        assert_eq!(
            w.out_of_order(),
            vec![
                (Hop::PodBound, Hop::EndpointSlice),
                (Hop::PodReady, Hop::EndpointSlice)
            ]
        );
    }

    #[test]
    fn summaries_count_only_reached_hops() {
        let wakes: Vec<WakeHops> = (1..=20)
            .map(|i| WakeHops {
                revision: format!("r{i}"),
                ms: [(Hop::Scaled, f64::from(i) * 10.0)].into_iter().collect(),
            })
            .collect();
        let s = summarize(&wakes);
        assert_eq!(s[0].count, 20);
        assert_eq!(s[0].max_ms, 200.0);
        assert!(s[0].p50_ms >= 100.0 && s[0].p50_ms <= 110.0, "{:?}", s[0]);
        assert_eq!(s[1].count, 0);
    }
}
