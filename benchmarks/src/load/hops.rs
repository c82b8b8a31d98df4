//! Where a churned Deployment's time goes, hop by hop, from the moments the
//! load generator sees: its create call answered, the Deployment's
//! ReplicaSet, its pod, the pod bound, the pod Running (each the first watch
//! event that shows it, by the Deployment's `app` label).
//!
//! Only the pod hops touch the pod store (etcd, the override's RAM etcd or
//! ste-router and its shards); the Deployment and its ReplicaSet live in the
//! durable etcd on every arm. So an arm's extra time in a pod hop, next to
//! another arm's, is the pod store's (its writes and its watch delivery) or
//! the CPU it takes from the processes sharing the machine; an extra time in
//! the first two hops can only be the latter.

use std::collections::HashMap;
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

use crate::stats::Samples;

/// When each Deployment (by name = its pods' `app` label) reached each step.
#[derive(Default)]
pub struct Moments {
    /// The create call's answer came back.
    pub accepted: HashMap<String, Instant>,
    /// Its first ReplicaSet was seen.
    pub replicaset: HashMap<String, Instant>,
    /// Its first pod was seen.
    pub pod: HashMap<String, Instant>,
    /// A pod of it was first seen with `spec.nodeName`.
    pub bound: HashMap<String, Instant>,
    /// A pod of it was first seen Running.
    pub running: HashMap<String, Instant>,
}

impl Moments {
    /// Records what a pod watch event shows.
    pub fn see_pod(&mut self, pod: &Value, now: Instant) {
        let Some(app) = pod["metadata"]["labels"]["app"].as_str() else {
            return;
        };
        first(&mut self.pod, app, now);
        if pod["spec"]["nodeName"].is_string() {
            first(&mut self.bound, app, now);
        }
        if pod["status"]["phase"] == "Running" {
            first(&mut self.running, app, now);
        }
    }

    /// Records what a ReplicaSet watch event shows (it carries the pod
    /// template's labels).
    pub fn see_replicaset(&mut self, replicaset: &Value, now: Instant) {
        if let Some(app) = replicaset["metadata"]["labels"]["app"].as_str() {
            first(&mut self.replicaset, app, now);
        }
    }
}

fn first(map: &mut HashMap<String, Instant>, app: &str, now: Instant) {
    if !map.contains_key(app) {
        map.insert(app.to_string(), now);
    }
}

/// One hop's latency over the Deployments that reached both its ends.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Hop {
    pub name: &'static str,
    /// Which component works in it, and which store it writes.
    pub who: &'static str,
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// The hops, in order: (name, who, from, to).
type Ends = fn(&Moments) -> &HashMap<String, Instant>;
const HOPS: [(&str, &str, Ends, Ends); 4] = [
    (
        "accepted → ReplicaSet seen",
        "Deployment controller; ReplicaSet in the durable etcd",
        |m| &m.accepted,
        |m| &m.replicaset,
    ),
    (
        "ReplicaSet → pod seen",
        "ReplicaSet controller; pod create and its watch event via the pod store",
        |m| &m.replicaset,
        |m| &m.pod,
    ),
    (
        "pod → bound",
        "scheduler; binding and its watch event via the pod store",
        |m| &m.pod,
        |m| &m.bound,
    ),
    (
        "bound → Running",
        "kwok's kubelet; status update via the pod store",
        |m| &m.bound,
        |m| &m.running,
    ),
];

/// Each hop's p50 and p99 over the Deployments in `sent_at` (name → when
/// it was due), the first hop being the create call itself (due →
/// accepted). A moment seen before the one it follows (two watches are
/// not ordered with each other) counts as a zero hop.
pub fn split(sent_at: &HashMap<String, Instant>, moments: &Moments) -> Vec<Hop> {
    let mut hops = vec![hop(
        "due → create accepted",
        "kube-apiserver; the Deployment in the durable etcd",
        sent_at,
        &moments.accepted,
        sent_at,
    )];
    for (name, who, from, to) in HOPS {
        hops.push(hop(name, who, from(moments), to(moments), sent_at));
    }
    hops
}

fn hop(
    name: &'static str,
    who: &'static str,
    from: &HashMap<String, Instant>,
    to: &HashMap<String, Instant>,
    sent_at: &HashMap<String, Instant>,
) -> Hop {
    let mut samples = Samples::default();
    for deployment in sent_at.keys() {
        if let (Some(start), Some(end)) = (from.get(deployment), to.get(deployment)) {
            samples.push(end.saturating_duration_since(*start));
        }
    }
    Hop {
        name,
        who,
        samples: samples.len(),
        p50_ms: samples.percentile(50.0) / 1e3,
        p99_ms: samples.percentile(99.0) / 1e3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn pod(app: &str, node: Option<&str>, phase: &str) -> Value {
        json!({
            "metadata": {"labels": {"app": app}},
            "spec": {"nodeName": node},
            "status": {"phase": phase},
        })
    }

    #[test]
    fn events_keep_the_first_moment_of_each_step() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut moments = Moments::default();
        moments.see_replicaset(&json!({"metadata": {"labels": {"app": "d"}}}), at(1));
        moments.see_replicaset(&json!({"metadata": {"labels": {"app": "d"}}}), at(9));
        moments.see_pod(&pod("d", None, "Pending"), at(2));
        moments.see_pod(&pod("d", Some("n"), "Pending"), at(3));
        moments.see_pod(&pod("d", Some("n"), "Running"), at(4));
        moments.see_pod(&pod("d", Some("m"), "Running"), at(8));
        moments.see_pod(&json!({"metadata": {}}), at(5));
        assert_eq!(moments.replicaset["d"], at(1));
        assert_eq!(moments.pod["d"], at(2));
        assert_eq!(moments.bound["d"], at(3));
        assert_eq!(moments.running["d"], at(4));
        assert_eq!(moments.pod.len(), 1, "a pod without `app` is nobody's");
    }

    #[test]
    fn hops_are_measured_over_the_deployments_that_reached_both_ends() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut moments = Moments::default();
        let mut sent_at = HashMap::new();
        for (i, name) in ["a", "b"].into_iter().enumerate() {
            let base = 100 * i as u64;
            sent_at.insert(name.to_string(), at(base));
            moments.accepted.insert(name.into(), at(base + 10));
            moments.replicaset.insert(name.into(), at(base + 30));
            moments
                .pod
                .insert(name.into(), at(base + 35 + 10 * i as u64));
        }
        // Only "a" was bound; "b"'s pod was seen before its ReplicaSet.
        moments.bound.insert("a".into(), at(60));
        moments.pod.insert("b".into(), at(120));
        // A Deployment not sent in this step is not counted.
        moments.accepted.insert("old".into(), at(0));
        let hops = split(&sent_at, &moments);
        let names: Vec<_> = hops.iter().map(|h| h.name).collect();
        assert_eq!(
            names,
            [
                "due → create accepted",
                "accepted → ReplicaSet seen",
                "ReplicaSet → pod seen",
                "pod → bound",
                "bound → Running"
            ]
        );
        assert_eq!((hops[0].samples, hops[0].p50_ms), (2, 10.0));
        assert_eq!((hops[1].samples, hops[1].p99_ms), (2, 20.0));
        // a: 5 ms; b: seen before its ReplicaSet, so 0.
        assert_eq!(
            (hops[2].samples, hops[2].p50_ms, hops[2].p99_ms),
            (2, 0.0, 5.0)
        );
        assert_eq!((hops[3].samples, hops[3].p50_ms), (1, 25.0));
        assert_eq!(hops[4].samples, 0);
        assert!(hops[4].p50_ms.is_nan());
    }
}
