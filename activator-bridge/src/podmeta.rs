//! What a pod's (or a ReplicaSet's) metadata says to the bridge: who
//! controls it, which ReplicaSet it counts for (the bridge's pods are held
//! by the Deployment until the hand-over), whether it carries the bridge's
//! scheduling gate, whether it is live. Plain functions, no I/O; every other
//! module of the bridge may use them.

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

/// The controller owner reference's UID.
pub(crate) fn controller_uid(meta: &ObjectMeta) -> Option<&str> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

/// The scheduling gate put on duplicates; only the bridge removes it.
pub const GATE: &str = "ste.dev/activator-bridge";
/// On the bridge's pods: the UID of the ReplicaSet the pod is for.
pub const FOR_REPLICASET_ANNOTATION: &str = "ste.dev/activator-bridge-replicaset";

/// The ReplicaSet a pod counts for: the one named by the bridge's
/// annotation (pods the Deployment still holds), else its controller.
pub(crate) fn replicaset_of(meta: &ObjectMeta) -> Option<&str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(FOR_REPLICASET_ANNOTATION))
        .map(String::as_str)
        .or_else(|| controller_uid(meta))
}

/// A bridge pod not yet handed to its ReplicaSet.
pub(crate) fn awaiting_handover(pod: &Pod) -> bool {
    let meta = &pod.metadata;
    let target = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(FOR_REPLICASET_ANNOTATION));
    target.is_some_and(|uid| controller_uid(meta) != Some(uid.as_str()))
}

/// The owner reference the bridge's new pods carry: the Deployment's.
pub(crate) fn deployment_owner(name: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: "apps/v1".into(),
        kind: "Deployment".into(),
        name: name.into(),
        uid: uid.into(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

/// The Deployment controlling a ReplicaSet: (name, uid).
pub(crate) fn deployment_of(rs: &ReplicaSet) -> Option<(String, String)> {
    rs.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true) && o.kind == "Deployment")
        .map(|o| (o.name.clone(), o.uid.clone()))
}

/// True when the pod carries the bridge's scheduling gate.
pub fn is_gated(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.scheduling_gates.as_ref())
        .is_some_and(|g| g.iter().any(|g| g.name == GATE))
}

/// Running or about to: not terminal, not being deleted.
pub(crate) fn is_live(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && !matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded") | Some("Failed")
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn meta(annotation: Option<&str>, controller: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            annotations: annotation
                .map(|a| BTreeMap::from([(FOR_REPLICASET_ANNOTATION.to_string(), a.to_string())])),
            owner_references: controller.map(|uid| {
                vec![OwnerReference {
                    uid: uid.into(),
                    controller: Some(true),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_held_pod_counts_for_its_replicaset() {
        let held = Pod {
            metadata: meta(Some("rs"), Some("deployment")),
            ..Default::default()
        };
        assert_eq!(replicaset_of(&held.metadata), Some("rs"));
        assert!(awaiting_handover(&held));
        let given = Pod {
            metadata: meta(Some("rs"), Some("rs")),
            ..Default::default()
        };
        assert_eq!(replicaset_of(&given.metadata), Some("rs"));
        assert!(!awaiting_handover(&given));
        let theirs = Pod {
            metadata: meta(None, Some("rs")),
            ..Default::default()
        };
        assert_eq!(replicaset_of(&theirs.metadata), Some("rs"));
        assert!(!awaiting_handover(&theirs));
    }
}
