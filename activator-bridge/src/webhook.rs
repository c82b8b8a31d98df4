//! The mutating admission webhook over HTTPS: `POST /mutate-pods` takes an
//! `admission.k8s.io/v1` AdmissionReview for a pod being created and answers
//! with the JSON patch of the bridge's verdict (bind, gate, or nothing). It
//! always allows the pod: a verdict it cannot reach leaves the pod as it
//! came. `register` applies the MutatingWebhookConfiguration that points
//! kube-apiserver at it, with `failurePolicy: Ignore`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::{
    MatchCondition, MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations,
    ServiceReference, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::ByteString;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{json, Value};
use tracing::{debug, warn};

use crate::admission::{self, Verdict};
use crate::bridge::Bridge;
use crate::metrics::VerdictLabels;

/// Label on every pod of a Knative revision; the webhook sees only those.
pub const REVISION_LABEL: &str = "serving.knative.dev/revision";
pub const PATH: &str = "/mutate-pods";

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("not an AdmissionReview: {0}")]
    Review(String),
    #[error("reading the CA bundle {path}: {source}")]
    Ca {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("--webhook-service must be NAMESPACE/NAME[:PORT], got {0:?}")]
    Service(String),
    #[error("applying MutatingWebhookConfiguration {name}: {source}")]
    Register { name: String, source: kube::Error },
}

/// The axum router of the webhook server.
pub fn router(bridge: Arc<Bridge>) -> axum::Router {
    axum::Router::new()
        .route(PATH, axum::routing::post(mutate))
        .route("/livez", axum::routing::get(|| async { "ok\n" }))
        .with_state(bridge)
}

async fn mutate(State(bridge): State<Arc<Bridge>>, body: Bytes) -> impl IntoResponse {
    let started = Instant::now();
    let response = match review(&bridge, &body) {
        Ok(response) => (StatusCode::OK, response.to_string()),
        Err(err) => {
            warn!(error = %err, "bad admission request");
            (
                StatusCode::BAD_REQUEST,
                json!({"error": err.to_string()}).to_string(),
            )
        }
    };
    bridge
        .metrics
        .admission_seconds
        .observe(started.elapsed().as_secs_f64());
    (
        response.0,
        [(header::CONTENT_TYPE, "application/json")],
        response.1,
    )
}

/// Answers one AdmissionReview.
pub fn review(bridge: &Bridge, body: &[u8]) -> Result<Value, WebhookError> {
    let review: Value =
        serde_json::from_slice(body).map_err(|e| WebhookError::Review(e.to_string()))?;
    let request = &review["request"];
    let uid = request["uid"]
        .as_str()
        .ok_or_else(|| WebhookError::Review("request.uid missing".into()))?;
    let ns = request["namespace"].as_str().unwrap_or_default();
    let mut response = json!({"uid": uid, "allowed": true});
    let verdict = if request["operation"] != "CREATE" {
        Verdict::Pass("not_create")
    } else {
        match serde_json::from_value::<Pod>(request["object"].clone()) {
            Ok(pod) => {
                let verdict = bridge.admit(ns, &pod);
                if let Some(ops) = admission::patch(&pod, &verdict) {
                    response["patchType"] = json!("JSONPatch");
                    response["patch"] =
                        json!(base64::engine::general_purpose::STANDARD.encode(ops.to_string()));
                }
                verdict
            }
            Err(e) => {
                debug!(error = %e, "admission object is not a pod; allowed unchanged");
                Verdict::Pass("not_a_pod")
            }
        }
    };
    bridge
        .metrics
        .admissions
        .get_or_create(&VerdictLabels {
            verdict: verdict.label().into(),
        })
        .inc();
    if verdict == Verdict::Gate {
        bridge.metrics.duplicates_gated.inc();
        debug!(namespace = ns, "duplicate pod gated at creation");
    }
    Ok(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
}

/// Where kube-apiserver reaches the webhook.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// `https://host:port/mutate-pods` (outside a cluster, e.g. 127.0.0.1).
    Url(String),
    /// A Service: namespace, name, port.
    Service(String, String, i32),
}

impl Endpoint {
    pub fn parse_service(text: &str) -> Result<Endpoint, WebhookError> {
        let bad = || WebhookError::Service(text.to_string());
        let (ns, rest) = text.split_once('/').ok_or_else(bad)?;
        let (name, port) = match rest.split_once(':') {
            Some((name, port)) => (name, port.parse::<i32>().map_err(|_| bad())?),
            None => (rest, 443),
        };
        if ns.is_empty() || name.is_empty() {
            return Err(bad());
        }
        Ok(Endpoint::Service(ns.into(), name.into(), port))
    }
}

/// kube-apiserver calls the webhook only for pods created without a node
/// (CEL, `matchConditions`, GA since Kubernetes 1.30).
pub const NOT_YET_PLACED: &str = "!has(object.spec.nodeName) || object.spec.nodeName == ''";

/// The MutatingWebhookConfiguration: pods of Knative revisions not yet
/// placed, at creation, `failurePolicy: Ignore`, `timeoutSeconds` short.
pub fn configuration(
    name: &str,
    endpoint: &Endpoint,
    ca_bundle: Vec<u8>,
    timeout: Duration,
) -> MutatingWebhookConfiguration {
    let client_config = match endpoint {
        Endpoint::Url(url) => WebhookClientConfig {
            url: Some(url.clone()),
            ca_bundle: Some(ByteString(ca_bundle)),
            service: None,
        },
        Endpoint::Service(ns, svc, port) => WebhookClientConfig {
            url: None,
            ca_bundle: Some(ByteString(ca_bundle)),
            service: Some(ServiceReference {
                namespace: ns.clone(),
                name: svc.clone(),
                path: Some(PATH.into()),
                port: Some(*port),
            }),
        },
    };
    MutatingWebhookConfiguration {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                [(
                    "app.kubernetes.io/name".to_string(),
                    "ste-activator-bridge".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        webhooks: Some(vec![MutatingWebhook {
            name: "pods.activator-bridge.ste.dev".into(),
            admission_review_versions: vec!["v1".into()],
            client_config,
            failure_policy: Some("Ignore".into()),
            match_policy: Some("Equivalent".into()),
            object_selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: REVISION_LABEL.into(),
                    operator: "Exists".into(),
                    values: None,
                }]),
                match_labels: None,
            }),
            namespace_selector: Some(LabelSelector::default()),
            reinvocation_policy: Some("Never".into()),
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec!["".into()]),
                api_versions: Some(vec!["v1".into()]),
                operations: Some(vec!["CREATE".into()]),
                resources: Some(vec!["pods".into()]),
                scope: Some("Namespaced".into()),
            }]),
            side_effects: "None".into(),
            timeout_seconds: Some(timeout.as_secs().clamp(1, 30) as i32),
            // Pods created already placed (the bridge's own, among others)
            // pass unchanged anyway: kube-apiserver skips the call for them.
            match_conditions: Some(vec![MatchCondition {
                name: "not-yet-placed".into(),
                expression: NOT_YET_PLACED.into(),
            }]),
        }]),
    }
}

/// Applies the configuration (server-side apply; every replica writes the same).
pub async fn register(
    client: kube::Client,
    config: &MutatingWebhookConfiguration,
) -> Result<(), WebhookError> {
    let name = config.metadata.name.clone().unwrap_or_default();
    Api::<MutatingWebhookConfiguration>::all(client)
        .patch(
            &name,
            &PatchParams::apply("ste-activator-bridge").force(),
            &Patch::Apply(config),
        )
        .await
        .map(|_| ())
        .map_err(|source| WebhookError::Register { name, source })
}

/// Deletes the configuration (best effort: failurePolicy Ignore makes a
/// stale one harmless, only slower).
pub async fn unregister(client: kube::Client, name: &str) {
    match Api::<MutatingWebhookConfiguration>::all(client)
        .delete(name, &Default::default())
        .await
    {
        Ok(_) => tracing::info!(name, "MutatingWebhookConfiguration deleted"),
        Err(err) => warn!(name, error = %err, "deleting the MutatingWebhookConfiguration failed"),
    }
}

/// Reads the CA bundle file.
pub fn read_ca(path: &std::path::Path) -> Result<Vec<u8>, WebhookError> {
    std::fs::read(path).map_err(|source| WebhookError::Ca {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_endpoint_parses() {
        assert!(matches!(
            Endpoint::parse_service("ste-system/ste-activator-bridge"),
            Ok(Endpoint::Service(ns, n, 443)) if ns == "ste-system" && n == "ste-activator-bridge"
        ));
        assert!(matches!(
            Endpoint::parse_service("a/b:8443"),
            Ok(Endpoint::Service(_, _, 8443))
        ));
        assert!(Endpoint::parse_service("nope").is_err());
        assert!(Endpoint::parse_service("a/b:x").is_err());
    }

    #[test]
    fn configuration_is_scoped_and_ignores_failures() {
        let c = configuration(
            "x",
            &Endpoint::Url("https://127.0.0.1:1/mutate-pods".into()),
            b"CA".to_vec(),
            Duration::from_secs(2),
        );
        let w = &c.webhooks.unwrap()[0];
        assert_eq!(w.failure_policy.as_deref(), Some("Ignore"));
        assert_eq!(w.timeout_seconds, Some(2));
        assert_eq!(
            w.object_selector
                .as_ref()
                .unwrap()
                .match_expressions
                .as_ref()
                .unwrap()[0]
                .key,
            REVISION_LABEL
        );
        assert_eq!(w.client_config.ca_bundle.as_ref().unwrap().0, b"CA");
        assert_eq!(
            w.match_conditions.as_ref().unwrap()[0].expression,
            NOT_YET_PLACED
        );
    }
}
