//! The Kubernetes API as the suites use it, through kube-rs: a client for a
//! cluster (loopback, or a kubeconfig's with every auth method kube-rs
//! knows), the Deployment objects the suites create, deletes, lists, and
//! emptying the namespace.
//!
//! The client does not throttle (kube-rs has no client-side QPS limit), does
//! not retry (a refused create is counted, as before), and keeps its HTTP/1.1
//! connections pooled: every clone of a [`kube::Client`] shares them.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams};
use kube::api::{PostParams, Resource};
use serde_json::{json, Value};

use crate::record::ClusterRecord;

/// A kube-rs configuration for `record`'s API server: the kubeconfig's (kept
/// in the record by [`crate::external::connect`]) or, for a local cluster,
/// its loopback URL, its admin token and its self-signed serving certificate
/// (not verified).
pub fn config_for(record: &ClusterRecord) -> anyhow::Result<kube::Config> {
    let mut config = match &record.kube_config {
        Some(config) => config.as_ref().clone(),
        None => {
            let url = record
                .api_url
                .parse()
                .with_context(|| format!("kube-apiserver URL {:?}", record.api_url))?;
            let mut config = kube::Config::new(url);
            config.accept_invalid_certs = true;
            if !record.token.is_empty() {
                config.auth_info.token = Some(record.token.clone().into());
            }
            config
        }
    };
    // Measured requests are not retried behind the bench's back.
    config.default_retry = false;
    // kube-rs sends no user agent: this one names the bench in the audit log.
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(concat!("ste-bench/", env!("CARGO_PKG_VERSION"))),
    ));
    config.default_namespace = record.namespace.clone();
    Ok(config)
}

/// A client for `record`'s API server (see [`config_for`]); clone it to share its connections.
pub fn client_for(record: &ClusterRecord) -> anyhow::Result<kube::Client> {
    kube::Client::try_from(config_for(record)?).context("creating the Kubernetes client")
}

/// The run's namespace's objects of type `K`.
pub fn namespaced<K>(client: &kube::Client, record: &ClusterRecord) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    Api::namespaced(client.clone(), &record.namespace)
}

/// A resource given by group, version, kind and plural (e.g. Knative's).
pub fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// The typed resource `K` as an [`ApiResource`], for [`dynamic`] APIs and watches.
pub fn resource_of<K: Resource<DynamicType = ()>>() -> ApiResource {
    ApiResource::erase::<K>(&())
}

/// Objects of `resource` in `namespace`, untyped.
pub fn dynamic(
    client: &kube::Client,
    namespace: &str,
    resource: &ApiResource,
) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, resource)
}

/// A list of untyped objects as JSON (`items`, `metadata`), for code that reads a few fields.
pub async fn list_json(api: &Api<DynamicObject>, params: &ListParams) -> anyhow::Result<Value> {
    let list = api.list(params).await?;
    Ok(json!({
        "metadata": list.metadata,
        "items": list.items,
    }))
}

/// The collection's current resourceVersion (a one-item list), to watch from.
pub async fn collection_version(api: &Api<DynamicObject>) -> anyhow::Result<String> {
    api.list(&ListParams::default().limit(1))
        .await?
        .metadata
        .resource_version
        .context("list without resourceVersion")
}

/// The namespace's current resourceVersion of pods, to watch from.
pub async fn current_resource_version(record: &ClusterRecord) -> anyhow::Result<String> {
    current_version_of::<Pod>(record).await
}

/// The namespace's current resourceVersion of `K`, to watch `K` from. Pods
/// and the rest are in different stores on the override and ste arms, so
/// each resource's versions count apart: a watch of ReplicaSets from a pod
/// version waits for a version the durable etcd may never reach.
pub async fn current_version_of<K: Resource<DynamicType = ()>>(
    record: &ClusterRecord,
) -> anyhow::Result<String> {
    let client = client_for(record)?;
    collection_version(&dynamic(&client, &record.namespace, &resource_of::<K>())).await
}

/// How many pods the namespace holds (a one-item list and its remaining count).
pub async fn pod_count(pods: &Api<Pod>) -> anyhow::Result<usize> {
    let page = pods.list_metadata(&ListParams::default().limit(1)).await?;
    Ok(page.items.len() + page.metadata.remaining_item_count.unwrap_or(0).max(0) as usize)
}

fn deployment(name: &str) -> anyhow::Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                         "spec": {"containers": [{"name": "nginx", "image": "nginx"}]}}
        }
    }))?)
}

/// Creates Deployment `name` (replicas 1, nginx, label `app: name`).
pub async fn create(
    client: &kube::Client,
    record: &ClusterRecord,
    name: &str,
) -> anyhow::Result<()> {
    namespaced::<Deployment>(client, record)
        .create(&PostParams::default(), &deployment(name)?)
        .await
        .with_context(|| format!("creating {name}"))?;
    Ok(())
}

/// Deletes Deployment `name` of the run's namespace (background propagation).
pub async fn delete_deployment(
    client: &kube::Client,
    record: &ClusterRecord,
    name: &str,
) -> anyhow::Result<()> {
    namespaced::<Deployment>(client, record)
        .delete(name, &DeleteParams::background())
        .await
        .with_context(|| format!("deleting Deployment {name}"))?;
    Ok(())
}

/// Deletes every Deployment in the namespace and waits until no pod is left.
pub async fn clear_namespace(record: &ClusterRecord) -> anyhow::Result<()> {
    let client = client_for(record)?;
    namespaced::<Deployment>(&client, record)
        .delete_collection(&DeleteParams::background(), &ListParams::default())
        .await
        .context("deleting the namespace's Deployments")?;
    let pods = namespaced::<Pod>(&client, record);
    let deadline = Instant::now() + Duration::from_secs(180);
    let first = pod_count(&pods).await?;
    let mut progress =
        crate::progress::Progress::new("clearing the namespace: pods gone", first as u64);
    loop {
        let left = pod_count(&pods).await?;
        let gone = first.saturating_sub(left) as u64;
        if left == 0 {
            progress.finish(gone, "none left");
            return Ok(());
        }
        if Instant::now() > deadline {
            progress.finish(gone, &format!("{left} left"));
            bail!("{left} pods still there 180s after deleting their Deployments");
        }
        progress.update(gone, &format!("{left} left"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
