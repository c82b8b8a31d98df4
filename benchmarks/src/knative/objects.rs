//! Knative Serving's API objects as the bench makes and reads them: the
//! Services (fully defaulted, at zero), their revisions and Deployments,
//! scaling a revision as the autoscaler does, waiting until revisions are at
//! zero, and the node Leases kwok does not renew. Used by the cold-start
//! suite and by the wake path in this module's parent.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::{json, Value};

use crate::api::{client_for, dynamic, list_json, resource, resource_of};
use crate::cluster::ClusterRecord;

/// The label Knative puts on a revision's Deployment, ReplicaSet and pods.
pub const REVISION_LABEL: &str = "serving.knative.dev/revision";

/// Renews a node Lease (`kube-node-lease/<node>`) for every node every 10 s,
/// as each node's kubelet does. `ste-bench cluster up` starts kwok without
/// `--node-lease-duration-seconds`, so kwok renews no Lease and its node
/// heartbeat stage waits 10 minutes: after the node monitor grace period
/// (50 s) the node lifecycle controller marks every node NotReady (and its
/// pods not Ready), kwok re-initializes them, and this repeats. Runs until
/// the returned task is aborted.
pub fn keep_node_leases(record: &ClusterRecord) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let client = client_for(record)?;
    let nodes = Api::<Node>::all(client.clone());
    let leases = Api::<Lease>::namespaced(client, "kube-node-lease");
    Ok(tokio::spawn(async move {
        loop {
            let names = nodes
                .list_metadata(&ListParams::default())
                .await
                .map(|l| l.items)
                .unwrap_or_default();
            let now = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
            for name in names.iter().filter_map(|n| n.metadata.name.as_deref()) {
                let lease = json!({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": name, "namespace": "kube-node-lease"},
                    "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now}
                });
                let Ok(lease) = serde_json::from_value::<Lease>(lease) else {
                    continue;
                };
                let created = leases.create(&PostParams::default(), &lease).await;
                if matches!(created, Err(kube::Error::Api(ref e)) if e.code == 409) {
                    let renew = Patch::Merge(json!({"spec": {"renewTime": now}}));
                    let _ = leases.patch(name, &PatchParams::default(), &renew).await;
                }
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    }))
}

/// A Knative Service as the webhook would leave it (it does not run here):
/// every default the controller relies on set, the revision created at
/// zero (`initial-scale: 0`, allowed by serving-ste.yaml).
pub fn service(name: &str, cpu: &str) -> Value {
    json!({
        "apiVersion": "serving.knative.dev/v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "template": {
                "metadata": {"annotations": {
                    "autoscaling.knative.dev/initial-scale": "0",
                    "autoscaling.knative.dev/class": "kpa.autoscaling.knative.dev",
                    "autoscaling.knative.dev/metric": "concurrency"
                }},
                "spec": {
                    "containerConcurrency": 0,
                    "timeoutSeconds": 300,
                    "enableServiceLinks": false,
                    "containers": [{
                        "name": "user-container",
                        "image": "dev.local/hello:v1",
                        "readinessProbe": {"successThreshold": 1, "tcpSocket": {"port": 0}},
                        "resources": {"requests": {"cpu": cpu, "memory": "64Mi"}}
                    }]
                }
            },
            "traffic": [{"latestRevision": true, "percent": 100}]
        }
    })
}

/// The Deployment Knative's controller makes for a Service's first revision.
pub fn deployment_of(service: &str) -> String {
    format!("{service}-00001-deployment")
}

pub fn revision_of(service: &str) -> String {
    format!("{service}-00001")
}

/// Knative Services of `default`, untyped.
pub fn services_api(client: &kube::Client) -> Api<DynamicObject> {
    dynamic(
        client,
        "default",
        &resource("serving.knative.dev", "v1", "Service", "services"),
    )
}

pub async fn create_service(client: &kube::Client, name: &str, cpu: &str) -> anyhow::Result<()> {
    let object: DynamicObject = serde_json::from_value(service(name, cpu))?;
    services_api(client)
        .create(&PostParams::default(), &object)
        .await
        .with_context(|| format!("creating Knative Service {name}"))?;
    Ok(())
}

/// Scales a revision's Deployment with the autoscaler's own request (KPA
/// scaler.applyScale: a JSON patch of /spec/replicas on the Deployment).
pub async fn scale_revision(
    client: &kube::Client,
    service: &str,
    replicas: u32,
) -> anyhow::Result<()> {
    let patch: json_patch::Patch = serde_json::from_value(
        json!([{"op": "replace", "path": "/spec/replicas", "value": replicas}]),
    )?;
    Api::<Deployment>::namespaced(client.clone(), "default")
        .patch(
            &deployment_of(service),
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await
        .with_context(|| format!("scaling {} to {replicas}", deployment_of(service)))?;
    Ok(())
}

/// Names of the Revisions in a list whose Ready condition is True.
fn ready_revisions(list: &Value) -> std::collections::HashSet<String> {
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| {
            r["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .filter_map(|r| r["metadata"]["name"].as_str().map(String::from))
        .collect()
}

/// Objects of `default` carrying a `serving.knative.dev/service` label, as JSON.
async fn knative_labelled(client: &kube::Client, resource: &ApiResource) -> anyhow::Result<Value> {
    list_json(
        &dynamic(client, "default", resource),
        &ListParams::default().labels("serving.knative.dev/service"),
    )
    .await
}

/// Waits until every named Service's revision is Ready and at zero: the
/// Revision's Ready condition True, its Deployment and ReplicaSet with 0
/// replicas and no pod of it left. (A revision Knative never finished —
/// `Ready=Unknown, Deploying`, seen for 24 of 150 on this 2-core machine —
/// also has a Deployment at 0, and a wake of it is never answered.)
pub async fn wait_at_zero(
    client: &kube::Client,
    services: &[String],
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let deployments = knative_labelled(client, &resource_of::<Deployment>()).await?;
        let rses = knative_labelled(client, &resource_of::<ReplicaSet>()).await?;
        let pods = knative_labelled(client, &resource_of::<Pod>()).await?;
        let revisions = knative_labelled(
            client,
            &resource("serving.knative.dev", "v1", "Revision", "revisions"),
        )
        .await?;
        let ready = ready_revisions(&revisions);
        let zero = |list: &Value| -> std::collections::HashSet<String> {
            list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|o| {
                    o["spec"]["replicas"] == 0 && o["status"]["replicas"].as_u64().unwrap_or(0) == 0
                })
                .filter_map(|o| {
                    o["metadata"]["labels"][REVISION_LABEL]
                        .as_str()
                        .map(String::from)
                })
                .collect()
        };
        let (d0, r0) = (zero(&deployments), zero(&rses));
        let with_pods: std::collections::HashSet<String> = pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                p["metadata"]["labels"][REVISION_LABEL]
                    .as_str()
                    .map(String::from)
            })
            .collect();
        let missing: Vec<&String> = services
            .iter()
            .filter(|s| {
                let r = revision_of(s);
                !d0.contains(&r)
                    || !r0.contains(&r)
                    || with_pods.contains(&r)
                    || !ready.contains(&r)
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} revision(s) not Ready at zero after {within:?}, e.g. {}",
                missing.len(),
                missing[0]
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn only_revisions_with_ready_true_count() {
        let list = json!({"items": [
            {"metadata": {"name": "a-00001"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}},
            {"metadata": {"name": "b-00001"}, "status": {"conditions": [{"type": "Ready", "status": "Unknown", "reason": "Deploying"}]}},
            {"metadata": {"name": "c-00001"}},
        ]});
        let ready = super::ready_revisions(&list);
        assert!(ready.contains("a-00001"));
        assert_eq!(ready.len(), 1);
    }
}
