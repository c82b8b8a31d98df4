//! The bridge's pods belong to the revision's Deployment until the
//! ReplicaSet controller has seen the scale-up; then they are handed to the
//! ReplicaSet.
//!
//! Why not owned by the ReplicaSet from the start: a pod the ReplicaSet
//! controller sees while its cached `replicas` is 0 is deleted, and the
//! bridge cannot know what that cache holds. Patching the ReplicaSet's
//! replicas first (what aggressive mode did) races the Deployment
//! controller instead: a sync it runs from a Deployment cache that has not
//! seen the autoscaler's 0→1 yet scales the ReplicaSet straight back to 0,
//! and the ReplicaSet controller deletes the bridge's Ready pod (seen in an
//! audit log: Deployment patched, ReplicaSet patched 19 ms later, the
//! Deployment controller's update 214 ms later, the bridge's pod deleted
//! and a second pod bound 3 s after it). A pod whose controller is the
//! Deployment is ignored by the ReplicaSet controller (it never adopts a pod
//! another controller owns, `controller_ref_manager.go`), and the
//! Deployment controller never touches pods, so nobody deletes it early.
//!
//! When to hand over: once the ReplicaSet controller has created a pod of
//! its own for that ReplicaSet (the webhook gates it as a duplicate), its
//! cache holds the scale-up, and every later sync reads at least that. The
//! bridge then makes its pod the ReplicaSet's; the controller sees one pod
//! too many and deletes the surplus, unassigned (gated) pods first. When the
//! revision goes back to 0 before that, the bridge deletes its own pod.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::ResourceExt;
use serde_json::json;
use tracing::info;

use crate::bridge::Bridge;
use crate::podmeta::{awaiting_handover, controller_uid, deployment_of, is_live, replicaset_of};
use crate::podwrite::{pod_key, Written};

/// Hand-over writes in flight at once.
const HANDOVER_CONCURRENCY: usize = 16;

/// What becomes of one bridge pod the Deployment still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Not yet: the ReplicaSet controller has not acted on the scale-up.
    Keep,
    /// Make it the ReplicaSet's.
    HandOver,
    /// The revision went back to 0 (or its ReplicaSet is gone).
    Delete,
}

/// `desired`: the revision's replicas now (`None`: its ReplicaSet is gone);
/// `controller_pods`: live pods the ReplicaSet itself owns (gated or not);
/// `exiting`: the bridge is stopping and hands over what it can.
pub fn step(desired: Option<i32>, controller_pods: usize, exiting: bool) -> Step {
    match desired {
        None | Some(0) => Step::Delete,
        Some(_) if controller_pods > 0 || exiting => Step::HandOver,
        Some(_) => Step::Keep,
    }
}

impl Bridge {
    /// The revision's replicas as the bridge sees them: the Deployment's
    /// when it is cached (a 0→1 the tap wrote counts before the watch shows
    /// it), else the ReplicaSet's.
    pub(crate) fn desired(&self, rs: &ReplicaSet) -> i32 {
        let ns = rs.namespace().unwrap_or_default();
        let deployment = deployment_of(rs).and_then(|(_, uid)| {
            self.deployments
                .find(|d| d.metadata.uid.as_deref() == Some(uid.as_str()))
        });
        match deployment {
            Some(d) => {
                let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                if replicas == 0 && self.tap_pending(&ns, &d.name_any()) {
                    1
                } else {
                    replicas
                }
            }
            None => rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
        }
    }

    /// Hands over or deletes the bridge's pods the Deployment still holds
    /// (leader only; every sweep tick, and once more on exit).
    pub(crate) async fn hand_over(&self, exiting: bool) {
        if !self.leading.load(Ordering::SeqCst) || !self.synced() {
            return;
        }
        let pods = self.pods.state();
        // Live pods each ReplicaSet itself controls, counted once.
        let mut controlled: HashMap<&str, usize> = HashMap::new();
        for p in pods.iter().filter(|p| is_live(p)) {
            if let Some(uid) = controller_uid(&p.metadata) {
                *controlled.entry(uid).or_default() += 1;
            }
        }
        let work: Vec<_> = pods
            .iter()
            .filter(|p| awaiting_handover(p) && is_live(p))
            .filter_map(|pod| {
                let rs_uid = replicaset_of(&pod.metadata)?;
                let rs = self
                    .replicasets
                    .find(|rs| rs.metadata.uid.as_deref() == Some(rs_uid));
                let desired = rs.as_ref().map(|rs| self.desired(rs));
                let owned = controlled.get(rs_uid).copied().unwrap_or(0);
                match step(desired, owned, exiting) {
                    Step::Keep => None,
                    step => Some((pod.clone(), step, rs)),
                }
            })
            .collect();
        // After a burst there can be a hundred; a few at a time, not one by one.
        futures::stream::iter(work)
            .map(|(pod, step, rs)| self.take_step(pod, step, rs))
            .buffer_unordered(HANDOVER_CONCURRENCY)
            .collect::<Vec<()>>()
            .await;
    }

    async fn take_step(&self, pod: Arc<Pod>, step: Step, rs: Option<Arc<ReplicaSet>>) {
        match (step, rs) {
            (Step::HandOver, Some(rs)) => self.give(&pod, &rs).await,
            (Step::Delete, _) => self.delete_held(&pod).await,
            _ => {}
        }
    }

    async fn give(&self, pod: &Pod, rs: &ReplicaSet) {
        let owner = OwnerReference {
            api_version: "apps/v1".into(),
            kind: "ReplicaSet".into(),
            name: rs.name_any(),
            uid: rs.uid().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        // A merge patch replaces the whole list.
        let patch = json!({"metadata": {"ownerReferences": [owner]}});
        if self
            .patch_seen(pod, patch, "handing the pod to its ReplicaSet")
            .await
            == Written::Done
        {
            self.metrics.handed_over.inc();
            info!(pod = %pod_key(pod), replicaset = %rs.name_any(), "pod handed to its ReplicaSet");
        }
    }

    async fn delete_held(&self, pod: &Pod) {
        if self
            .delete_seen(pod, "deleting the bridge's held pod")
            .await
            == Written::Done
        {
            self.metrics.held_deleted.inc();
            info!(pod = %pod_key(pod), "revision back at zero before the hand-over: the bridge's pod deleted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps() {
        // Scale-up seen by the ReplicaSet controller (it made its own pod).
        assert_eq!(step(Some(1), 1, false), Step::HandOver);
        // Not yet: keep serving from the Deployment's pod.
        assert_eq!(step(Some(1), 0, false), Step::Keep);
        // On exit, hand over whatever is still wanted.
        assert_eq!(step(Some(1), 0, true), Step::HandOver);
        // Back at zero, or the ReplicaSet gone: delete.
        assert_eq!(step(Some(0), 1, false), Step::Delete);
        assert_eq!(step(None, 0, true), Step::Delete);
    }
}
