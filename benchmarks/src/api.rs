//! The Kubernetes API as the suites use it: an HTTP client for a cluster
//! (loopback or a kubeconfig's), its authentication, the Deployment objects
//! the suites create, deletes, and emptying the namespace.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::cluster::ClusterRecord;

pub fn client() -> anyhow::Result<reqwest::Client> {
    // Loopback, self-signed serving certificate.
    Ok(reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .tcp_nodelay(true)
        .build()?)
}

/// A client for `record`'s API server: [`client`] for a local cluster; for
/// one given by kubeconfig, its CA, client certificate and TLS verification.
pub fn client_for(record: &ClusterRecord) -> anyhow::Result<reqwest::Client> {
    let Some(tls) = &record.tls else {
        return client();
    };
    let mut builder = reqwest::Client::builder()
        .tcp_nodelay(true)
        .danger_accept_invalid_certs(tls.insecure);
    if let Some(ca) = &tls.ca_pem {
        for cert in reqwest::Certificate::from_pem_bundle(ca)
            .context("the kubeconfig's certificate authority is not PEM")?
        {
            builder = builder.add_root_certificate(cert);
        }
    }
    if let Some(identity) = &tls.identity_pem {
        builder = builder.identity(
            reqwest::Identity::from_pem(identity)
                .context("the kubeconfig's client certificate and key are not PEM")?,
        );
    }
    Ok(builder.build()?)
}

/// Authenticates a request as `record`'s user: its bearer token, if any (a
/// client certificate is in the client itself).
pub trait Authed {
    fn auth(self, record: &ClusterRecord) -> Self;
}

impl Authed for reqwest::RequestBuilder {
    fn auth(self, record: &ClusterRecord) -> Self {
        if record.token.is_empty() {
            self
        } else {
            self.bearer_auth(&record.token)
        }
    }
}

/// The first page (one pod) of the namespace's pods: its resourceVersion and
/// how many pods there are.
pub async fn first_pod_page(
    http: &reqwest::Client,
    record: &ClusterRecord,
) -> anyhow::Result<Value> {
    Ok(http
        .get(format!(
            "{}/api/v1/namespaces/{}/pods?limit=1",
            record.api_url, record.namespace
        ))
        .auth(record)
        .send()
        .await?
        .json()
        .await?)
}

/// The namespace's current resourceVersion, to watch from.
pub async fn current_resource_version(record: &ClusterRecord) -> anyhow::Result<String> {
    let list = first_pod_page(&client_for(record)?, record).await?;
    Ok(list["metadata"]["resourceVersion"]
        .as_str()
        .context("list without resourceVersion")?
        .to_string())
}

fn deployment(name: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                         "spec": {"containers": [{"name": "nginx", "image": "nginx"}]}}
        }
    })
}

/// Creates Deployment `name` (replicas 1, nginx, label `app: name`).
pub async fn create(
    http: &reqwest::Client,
    record: &ClusterRecord,
    name: &str,
) -> anyhow::Result<()> {
    let response = http
        .post(format!(
            "{}/apis/apps/v1/namespaces/{}/deployments",
            record.api_url, record.namespace
        ))
        .auth(record)
        .json(&deployment(name))
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("creating {name}: HTTP {}", response.status());
    }
    Ok(())
}

/// DELETE on an API path (background propagation), failing on any non-2xx answer.
pub async fn delete_path(
    http: &reqwest::Client,
    record: &ClusterRecord,
    path: &str,
) -> anyhow::Result<()> {
    let response = http
        .delete(format!(
            "{}{path}?propagationPolicy=Background",
            record.api_url
        ))
        .auth(record)
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("DELETE {path}: HTTP {}", response.status());
    }
    Ok(())
}

/// Deletes Deployment `name` of the run's namespace (background propagation).
pub async fn delete_deployment(
    http: &reqwest::Client,
    record: &ClusterRecord,
    name: &str,
) -> anyhow::Result<()> {
    delete_path(
        http,
        record,
        &format!(
            "/apis/apps/v1/namespaces/{}/deployments/{name}",
            record.namespace
        ),
    )
    .await
}

/// Deletes every Deployment in the namespace and waits until no pod is left.
pub async fn clear_namespace(record: &ClusterRecord) -> anyhow::Result<()> {
    let http = client_for(record)?;
    delete_path(
        &http,
        record,
        &format!("/apis/apps/v1/namespaces/{}/deployments", record.namespace),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let pods = first_pod_page(&http, record).await?;
        let left = pods["items"].as_array().map(|i| i.len()).unwrap_or(0)
            + pods["metadata"]["remainingItemCount"].as_u64().unwrap_or(0) as usize;
        if left == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{left} pods still there 180s after deleting their Deployments");
        }
        eprint!("\r  waiting for {left} pods to go…   ");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
