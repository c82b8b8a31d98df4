//! What the webhook does with a Knative revision's pod at creation: bind it
//! (`spec.nodeName` from the placement), gate it (a duplicate of pods the
//! bridge already created), or leave it alone. Decided from the bridge's
//! caches and reservations under the reservation lock, so pods bound here and
//! pods the bridge creates see each other at once.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::bridge::{pods_on, prune_reservations, Bridge, Reservation};
use crate::placement;
use crate::podmeta::{is_gated, is_live, replicaset_of, GATE};
use crate::{CREATED_BY_ANNOTATION, REVISION_UID_LABEL};

/// Annotation the webhook sets on the pods it binds (`bound`) or gates (`gated`).
pub const WEBHOOK_ANNOTATION: &str = "ste.dev/activator-bridge-webhook";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Set `spec.nodeName` to this node.
    Bind(String),
    /// A duplicate: add the scheduling gate.
    Gate,
    /// Leave the pod to the scheduler (the reason is a metric label).
    Pass(&'static str),
}

impl Verdict {
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Bind(_) => "bound",
            Verdict::Gate => "gated",
            Verdict::Pass(why) => why,
        }
    }
}

impl Bridge {
    /// Decides for one pod being created in `ns`.
    pub fn admit(&self, ns: &str, pod: &Pod) -> Verdict {
        let Some(spec) = pod.spec.as_ref() else {
            return Verdict::Pass("no_spec");
        };
        if spec.node_name.as_deref().is_some_and(|n| !n.is_empty()) {
            // The bridge's own pods, or anyone else's already placed.
            return Verdict::Pass("already_bound");
        }
        if spec
            .scheduling_gates
            .as_ref()
            .is_some_and(|g| !g.is_empty())
        {
            return Verdict::Pass("gated_by_others");
        }
        if !self.synced() {
            return Verdict::Pass("not_synced");
        }
        let owner = match pod
            .owner_references()
            .iter()
            .find(|o| o.controller == Some(true))
        {
            Some(o) if o.kind == "ReplicaSet" => o.uid.clone(),
            _ => return Verdict::Pass("not_replicaset"),
        };
        if placement::check_template(spec).is_err() {
            return Verdict::Pass("unsafe_template");
        }
        let requests = placement::pod_requests(spec).unwrap_or_default();
        let revision = pod.labels().get(REVISION_UID_LABEL).cloned();
        let images: Vec<String> = spec
            .containers
            .iter()
            .filter_map(|c| c.image.clone())
            .collect();

        let mut reservations = self.reservations.lock().unwrap();
        let all_pods = self.pods.state();
        prune_reservations(&mut reservations, &all_pods);
        // The pod's ReplicaSet, looked up once for both rules.
        let rs = self
            .replicasets
            .find(|rs| rs.metadata.uid.as_deref() == Some(owner.as_str()));
        if self.is_duplicate(&owner, rs.as_deref(), &all_pods, &reservations)
            || self.late(rs.as_deref())
        {
            return Verdict::Gate;
        }
        let mut usage = placement::usage_from_pods(all_pods.iter().map(|p| p.as_ref()));
        for r in reservations.iter() {
            usage.entry(r.node.clone()).or_default().add(
                &r.requests,
                r.revision.as_deref(),
                r.images.clone(),
            );
        }
        let nodes = self.nodes.state();
        let Some(node) =
            placement::choose_node(&nodes, &usage, spec, &requests, revision.as_deref())
        else {
            return Verdict::Pass("no_safe_node");
        };
        let node = node.name_any();
        let id = self.next_reservation.fetch_add(1, Ordering::Relaxed);
        reservations.push(Reservation {
            id,
            pod: None,
            baseline: Some(pods_on(&all_pods, &owner, &node)),
            ns: ns.to_string(),
            owner,
            node: node.clone(),
            requests,
            revision,
            images,
            at: Instant::now(),
        });
        Verdict::Bind(node)
    }

    /// A pod of ReplicaSet `rs` is late when its revision is already
    /// back at zero as the bridge sees it ([`Bridge::revision_at_zero`]):
    /// the ReplicaSet controller acting on a scale-up from a cache seconds
    /// behind. Gated, it never reaches a node; the ReplicaSet controller
    /// deletes it first when it scales down (unassigned pods go first), and
    /// if it was in fact wanted (a 0→1 the bridge's cache has not shown
    /// yet) the sweep releases it after `--gated-grace`. Seen before this
    /// rule at 6 wakes/s with QPS 200: the bridge deleted its held pod as
    /// the revision went back to 0, and 0.3 s later the controller's late
    /// pod was bound here, since no bridge pod was left to make it a
    /// duplicate (6 of 360 wakes).
    fn late(&self, rs: Option<&ReplicaSet>) -> bool {
        let late = rs.is_some_and(|rs| self.revision_at_zero(rs));
        if late {
            self.metrics.decision("late_pod_gated");
        }
        late
    }

    /// A pod of `owner` is a duplicate when the bridge created pods for it
    /// and the ReplicaSet already has the pods it wants ([`is_duplicate_of`]).
    fn is_duplicate(
        &self,
        owner: &str,
        rs: Option<&ReplicaSet>,
        pods: &[Arc<Pod>],
        reservations: &[Reservation],
    ) -> bool {
        let tracked_want = self
            .tracking
            .lock()
            .unwrap()
            .get(owner)
            .filter(|t| t.started.elapsed() < self.settings.settle)
            .map(|t| t.want);
        let cached_want = rs
            .and_then(|rs| rs.spec.as_ref().and_then(|s| s.replicas))
            .unwrap_or(0);
        is_duplicate_of(owner, tracked_want, cached_want, pods, reservations)
    }
}

/// The duplicate rule. A pod of ReplicaSet `owner` is a duplicate when the
/// bridge has a pod of `owner` (live in the cache, or being created) and
/// the ReplicaSet already has the pods it wants — the most of the replicas
/// the bridge filled in its current scale-up (`tracked_want`, within its
/// settle window) and the cached ReplicaSet's — counting live, ungated pods
/// in the cache plus pods created or bound but not cached yet.
///
/// The bridge's pod counts for as long as it lives, not only within the
/// settle window: with the controllers behind (a 100-revision burst), the
/// ReplicaSet controller's late pod can come many seconds after the
/// bridge's, and it must still be gated. A pod gated while it was in fact
/// wanted (a scale-up the ReplicaSet cache has not shown yet) is released
/// by the sweep after `--gated-grace`: a delay, never a lost pod.
pub(crate) fn is_duplicate_of(
    owner: &str,
    tracked_want: Option<i32>,
    cached_want: i32,
    pods: &[Arc<Pod>],
    reservations: &[Reservation],
) -> bool {
    let of_owner = |p: &&Arc<Pod>| replicaset_of(&p.metadata) == Some(owner);
    let bridge_pods =
        pods.iter().filter(of_owner).any(|p| {
            is_live(p) && !is_gated(p) && p.annotations().contains_key(CREATED_BY_ANNOTATION)
        }) || reservations
            .iter()
            .any(|r| r.owner == owner && r.baseline.is_none());
    if !bridge_pods {
        return false;
    }
    let want = tracked_want.unwrap_or(0).max(cached_want).max(0) as usize;
    let have = pods
        .iter()
        .filter(of_owner)
        .filter(|p| is_live(p) && !is_gated(p))
        .count()
        + reservations.iter().filter(|r| r.owner == owner).count();
    have >= want
}

/// The JSON patch for a verdict (`None`: no change).
pub fn patch(pod: &Pod, verdict: &Verdict) -> Option<Value> {
    let mut ops = Vec::new();
    match verdict {
        Verdict::Bind(node) => {
            ops.push(json!({"op": "add", "path": "/spec/nodeName", "value": node}));
        }
        Verdict::Gate => {
            let has_gates = pod
                .spec
                .as_ref()
                .is_some_and(|s| s.scheduling_gates.is_some());
            ops.push(if has_gates {
                json!({"op": "add", "path": "/spec/schedulingGates/-", "value": {"name": GATE}})
            } else {
                json!({"op": "add", "path": "/spec/schedulingGates", "value": [{"name": GATE}]})
            });
        }
        Verdict::Pass(_) => return None,
    }
    let value = verdict.label();
    ops.push(if pod.metadata.annotations.is_some() {
        json!({"op": "add", "path": format!("/metadata/annotations/{}", WEBHOOK_ANNOTATION.replace('~', "~0").replace('/', "~1")), "value": value})
    } else {
        json!({"op": "add", "path": "/metadata/annotations", "value": {WEBHOOK_ANNOTATION: value}})
    });
    Some(Value::Array(ops))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(extra: Value) -> Pod {
        let mut base = json!({"metadata": {}, "spec": {"containers": [{"name": "c"}]}});
        for (k, v) in extra.as_object().unwrap() {
            let slot = &mut base[k.as_str()];
            if slot.is_null() {
                *slot = json!({});
            }
            slot.as_object_mut()
                .unwrap()
                .extend(v.as_object().unwrap().clone());
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn bind_patch_sets_node_and_annotation() {
        let p = pod(json!({}));
        let ops = patch(&p, &Verdict::Bind("n1".into())).unwrap();
        assert_eq!(
            ops[0],
            json!({"op": "add", "path": "/spec/nodeName", "value": "n1"})
        );
        assert_eq!(
            ops[1],
            json!({"op": "add", "path": "/metadata/annotations", "value": {WEBHOOK_ANNOTATION: "bound"}})
        );
        let p = pod(json!({"metadata": {"annotations": {"a": "b"}}}));
        let ops = patch(&p, &Verdict::Bind("n1".into())).unwrap();
        assert_eq!(
            ops[1]["path"],
            "/metadata/annotations/ste.dev~1activator-bridge-webhook"
        );
    }

    #[test]
    fn gate_patch_appends_or_creates() {
        let p = pod(json!({}));
        let ops = patch(&p, &Verdict::Gate).unwrap();
        assert_eq!(ops[0]["path"], "/spec/schedulingGates");
        assert_eq!(ops[0]["value"], json!([{"name": GATE}]));
        let p = pod(json!({"spec": {"schedulingGates": []}}));
        let ops = patch(&p, &Verdict::Gate).unwrap();
        assert_eq!(ops[0]["path"], "/spec/schedulingGates/-");
        assert!(patch(&p, &Verdict::Pass("x")).is_none());
    }

    fn owned(name: &str, owner: &str, extra: Value) -> Arc<Pod> {
        let mut p = pod(extra);
        p.metadata.name = Some(name.into());
        p.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                kind: "ReplicaSet".into(),
                uid: owner.into(),
                controller: Some(true),
                ..Default::default()
            },
        ]);
        Arc::new(p)
    }

    fn bridges() -> Value {
        json!({"metadata": {"annotations": {CREATED_BY_ANNOTATION: "x"}}, "spec": {"nodeName": "n1"}})
    }

    fn reservation(owner: &str, baseline: Option<usize>) -> Reservation {
        Reservation {
            id: 0,
            pod: None,
            baseline,
            ns: "default".into(),
            owner: owner.into(),
            node: "n1".into(),
            requests: Default::default(),
            revision: None,
            images: Vec::new(),
            at: Instant::now(),
        }
    }

    #[test]
    fn a_late_controller_pod_is_a_duplicate_after_the_settle_window() {
        // The bridge's bound pod fills the ReplicaSet (1 wanted); the
        // tracking of its scale-up has ended (no tracked want).
        let pods = [owned("ours", "rs", bridges())];
        assert!(is_duplicate_of("rs", None, 1, &pods, &[]));
        // Within the window too.
        assert!(is_duplicate_of("rs", Some(1), 1, &pods, &[]));
        // The ReplicaSet now wants 2: the controller's pod is wanted.
        assert!(!is_duplicate_of("rs", None, 2, &pods, &[]));
        // The bridge's create still in flight counts as its pod.
        assert!(is_duplicate_of(
            "rs",
            Some(1),
            0,
            &[],
            &[reservation("rs", None)]
        ));
    }

    #[test]
    fn without_a_live_bridge_pod_nothing_is_a_duplicate() {
        // Only the controller's own pods (or a webhook-bound one in flight).
        let theirs = [owned("theirs", "rs", json!({"spec": {"nodeName": "n1"}}))];
        assert!(!is_duplicate_of("rs", None, 1, &theirs, &[]));
        assert!(!is_duplicate_of(
            "rs",
            None,
            1,
            &[],
            &[reservation("rs", Some(0))]
        ));
        // The bridge's pod is gone (failed) or belongs to another ReplicaSet.
        let mut failed = bridges();
        failed["status"] = json!({"phase": "Failed"});
        assert!(!is_duplicate_of(
            "rs",
            None,
            1,
            &[owned("ours", "rs", failed)],
            &[]
        ));
        assert!(!is_duplicate_of(
            "rs",
            None,
            1,
            &[owned("ours", "other", bridges())],
            &[]
        ));
    }

    #[test]
    fn gated_pods_do_not_fill_the_replicaset() {
        // The bridge's pod and a gated duplicate: a second controller pod
        // while 2 are wanted is not a duplicate (the gated one does not count).
        let pods = [
            owned("ours", "rs", bridges()),
            owned(
                "gated",
                "rs",
                json!({"spec": {"schedulingGates": [{"name": GATE}]}}),
            ),
        ];
        assert!(!is_duplicate_of("rs", None, 2, &pods, &[]));
        assert!(is_duplicate_of("rs", None, 1, &pods, &[]));
    }

    #[test]
    fn gated_and_live() {
        let p = pod(json!({"spec": {"schedulingGates": [{"name": GATE}]}}));
        assert!(is_gated(&p));
        assert!(!is_gated(&pod(json!({}))));
        let failed = pod(json!({"status": {"phase": "Failed"}}));
        assert!(!is_live(&failed));
        assert!(is_live(&pod(json!({}))));
    }
}
