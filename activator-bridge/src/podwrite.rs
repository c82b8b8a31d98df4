//! The two writes the bridge makes to a pod its cache showed: a merge patch
//! that fails rather than overwrite a change the cache has not shown yet
//! (the pod's resourceVersion in the patch), and a delete of exactly that
//! pod (UID precondition). Used by the sweep and the hand-over.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::ResourceExt;
use serde_json::Value;
use tracing::warn;

use crate::bridge::Bridge;

/// What became of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    Done,
    /// The pod changed or is gone (409 / 404): the next sweep sees it anew.
    Stale,
    /// Any other error: counted in `api_errors` and logged; the next sweep retries.
    Failed,
}

impl Bridge {
    /// A merge patch of `pod` carrying its cached resourceVersion.
    pub(crate) async fn patch_seen(&self, pod: &Pod, mut patch: Value, what: &str) -> Written {
        patch["metadata"]["resourceVersion"] = pod.resource_version().into();
        let ns = pod.namespace().unwrap_or_default();
        let result = Api::<Pod>::namespaced(self.client.clone(), &ns)
            .patch(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map(|_| ());
        self.written(pod, result, what)
    }

    /// Deletes exactly `pod` (its UID), not a later pod of the same name.
    pub(crate) async fn delete_seen(&self, pod: &Pod, what: &str) -> Written {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: pod.uid(),
                resource_version: None,
            }),
            ..Default::default()
        };
        let ns = pod.namespace().unwrap_or_default();
        let result = Api::<Pod>::namespaced(self.client.clone(), &ns)
            .delete(&pod.name_any(), &params)
            .await
            .map(|_| ());
        self.written(pod, result, what)
    }

    fn written(&self, pod: &Pod, result: Result<(), kube::Error>, what: &str) -> Written {
        match result {
            Ok(()) => Written::Done,
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Written::Stale,
            Err(err) => {
                self.metrics.api_errors.inc();
                warn!(pod = %pod_key(pod), error = %err, "{what} failed; next sweep retries");
                Written::Failed
            }
        }
    }
}

/// `namespace/name`, for logs.
pub(crate) fn pod_key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}
