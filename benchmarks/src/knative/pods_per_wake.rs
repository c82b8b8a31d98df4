//! Which pods each wake brought, and how many of them reached a node.
//!
//! A revision can be woken many times (the sweep takes it from its pool
//! again once it is back at zero), so a pod is attributed to the wake its
//! revision was in when the pod was FIRST seen, by uid: a late event of an
//! older pod never lands on a newer wake. A wake needs as many pods as the
//! highest `spec.replicas` its Deployment showed during it (at least one:
//! the bridge creates pods before the Deployment is seen scaled); every pod
//! beyond that is a duplicate, and a duplicate that ever had
//! `spec.nodeName` reached a kubelet.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One pod, as first seen.
#[derive(Clone, Debug)]
struct PodSeen {
    name: String,
    revision: String,
    wake: u32,
    bound: bool,
}

/// The pods of the followed revisions, per wake.
#[derive(Default, Debug)]
pub struct PodLedger {
    /// Per revision, the number of its current wake (1 for the first).
    current: HashMap<String, u32>,
    /// By pod uid.
    pods: HashMap<String, PodSeen>,
    /// Per (revision, wake), the highest `spec.replicas` of its Deployment.
    replicas: HashMap<(String, u32), u64>,
}

/// The pods a series of wakes brought, with the duplicates among them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct PodTally {
    /// Wakes followed.
    pub wakes: usize,
    /// Pods of those wakes that existed at some point.
    pub pods_created: usize,
    /// Of those, the pods that ever had a node.
    pub pods_bound: usize,
    /// Pods beyond what their wake's Deployment asked for: duplicates
    /// created (the webhook gates the ReplicaSet controller's late ones).
    pub extra_created: usize,
    /// Duplicates that reached a node (must be 0).
    pub extra_bound: usize,
    /// Wakes whose Deployment asked for more than one replica.
    pub multi_replica_wakes: usize,
    /// The wakes with a duplicate that reached a node (at most
    /// [`EXAMPLES`]): `revision #wake: pod, pod, …` (the bound ones), to
    /// look up in the logs.
    #[serde(default)]
    pub extra_bound_examples: Vec<String>,
}

/// How many wakes with bound duplicates a tally names.
pub const EXAMPLES: usize = 20;

impl PodLedger {
    /// `revision` was woken (again): pods first seen from now are this wake's.
    pub fn woke(&mut self, revision: &str) {
        *self.current.entry(revision.to_string()).or_insert(0) += 1;
    }

    /// A watch event of a pod or a Deployment (`kind` as the watch names it)
    /// of `revision`; objects of revisions never woken are ignored.
    pub fn saw(&mut self, kind: &str, revision: &str, object: &Value) {
        let Some(&wake) = self.current.get(revision) else {
            return;
        };
        match kind {
            "pods" => {
                let Some(uid) = object["metadata"]["uid"].as_str() else {
                    return;
                };
                let seen = self.pods.entry(uid.to_string()).or_insert_with(|| PodSeen {
                    name: object["metadata"]["name"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                    revision: revision.to_string(),
                    wake,
                    bound: false,
                });
                seen.bound |= object["spec"]["nodeName"].is_string();
            }
            "deployments" => {
                let n = object["spec"]["replicas"].as_u64().unwrap_or(0);
                let max = self
                    .replicas
                    .entry((revision.to_string(), wake))
                    .or_insert(0);
                *max = (*max).max(n);
            }
            _ => {}
        }
    }

    pub fn tally(&self) -> PodTally {
        let mut per_wake: HashMap<(&str, u32), (usize, Vec<&str>)> = HashMap::new();
        for p in self.pods.values() {
            let e = per_wake.entry((p.revision.as_str(), p.wake)).or_default();
            e.0 += 1;
            if p.bound {
                e.1.push(p.name.as_str());
            }
        }
        let wanted = |rev: &str, wake: u32| {
            let n = self
                .replicas
                .get(&(rev.to_string(), wake))
                .copied()
                .unwrap_or(0);
            usize::try_from(n.max(1)).unwrap_or(usize::MAX)
        };
        let mut t = PodTally {
            wakes: self.current.values().map(|n| *n as usize).sum(),
            multi_replica_wakes: self.replicas.values().filter(|n| **n > 1).count(),
            ..PodTally::default()
        };
        let mut wakes: Vec<_> = per_wake.into_iter().collect();
        wakes.sort();
        for ((rev, wake), (created, mut bound)) in wakes {
            let want = wanted(rev, wake);
            t.pods_created += created;
            t.pods_bound += bound.len();
            t.extra_created += created.saturating_sub(want);
            t.extra_bound += bound.len().saturating_sub(want);
            if bound.len() > want && t.extra_bound_examples.len() < EXAMPLES {
                bound.sort_unstable();
                t.extra_bound_examples
                    .push(format!("{rev} #{wake}: {}", bound.join(", ")));
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(uid: &str, node: Option<&str>) -> Value {
        json!({"metadata": {"uid": uid, "name": format!("p-{uid}")}, "spec": {"nodeName": node}})
    }

    fn deployment(replicas: u64) -> Value {
        json!({"spec": {"replicas": replicas}})
    }

    #[test]
    fn a_gated_duplicate_is_counted_created_but_not_bound() {
        let mut l = PodLedger::default();
        l.woke("r");
        l.saw("deployments", "r", &deployment(1));
        l.saw("pods", "r", &pod("bridge", None));
        l.saw("pods", "r", &pod("late", None));
        l.saw("pods", "r", &pod("bridge", Some("n1")));
        let t = l.tally();
        assert_eq!((t.wakes, t.pods_created, t.pods_bound), (1, 2, 1));
        assert_eq!((t.extra_created, t.extra_bound), (1, 0));
    }

    #[test]
    fn a_duplicate_that_reaches_a_node_is_counted_bound() {
        let mut l = PodLedger::default();
        l.woke("r");
        l.saw("pods", "r", &pod("a", Some("n1")));
        l.saw("pods", "r", &pod("b", Some("n2")));
        let t = l.tally();
        assert_eq!(t.extra_bound, 1);
        assert_eq!(t.extra_bound_examples, vec!["r #1: p-a, p-b".to_string()]);
    }

    #[test]
    fn pods_belong_to_the_wake_they_were_first_seen_in() {
        let mut l = PodLedger::default();
        l.woke("r");
        l.saw("pods", "r", &pod("first", Some("n1")));
        l.woke("r");
        // A late event of the first wake's pod, then the second wake's pod.
        l.saw("pods", "r", &pod("first", Some("n1")));
        l.saw("pods", "r", &pod("second", Some("n1")));
        let t = l.tally();
        assert_eq!((t.wakes, t.pods_bound, t.extra_bound), (2, 2, 0));
    }

    #[test]
    fn pods_the_deployment_asked_for_are_not_duplicates() {
        let mut l = PodLedger::default();
        l.woke("r");
        l.saw("deployments", "r", &deployment(2));
        l.saw("deployments", "r", &deployment(0));
        l.saw("pods", "r", &pod("a", Some("n1")));
        l.saw("pods", "r", &pod("b", Some("n1")));
        l.saw("pods", "other", &pod("c", Some("n1")));
        let t = l.tally();
        assert_eq!(
            (t.pods_bound, t.extra_bound, t.multi_replica_wakes),
            (2, 0, 1)
        );
    }
}
