//! The `Shard` object: create or update, heartbeat, drain, delete.
//!
//! The agent writes only the fields it owns (see `ste_shard_api`): `spec`
//! and `status.heartbeatTime` / `status.etcdHealthy`, always with JSON merge
//! patches. It never writes `status.phase`.

use std::time::Duration;

use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use serde_json::json;
use ste_shard_api::{Shard, ShardPhase, ShardSpec};

/// Deadline of one API request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("reading kubeconfig {path:?}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes configuration (no kubeconfig and not in a cluster): {0}; pass --kubeconfig, or --no-register to run without registration")]
    Infer(kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(kube::Error),
    #[error("{verb} Shard {name}: {source}")]
    Api {
        verb: &'static str,
        name: String,
        source: kube::Error,
    },
    #[error("{verb} Shard {name}: no answer within {}s", REQUEST_TIMEOUT.as_secs())]
    Timeout { verb: &'static str, name: String },
}

impl RegistrationError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, RegistrationError::Api { source: kube::Error::Api(status), .. } if status.is_not_found())
    }
}

/// A Kubernetes client from `:`-separated kubeconfig files, or inferred
/// (KUBECONFIG / ~/.kube/config, then in-cluster). Does not contact the API.
pub async fn client(kubeconfig: Option<&str>) -> Result<Client, RegistrationError> {
    let config = match kubeconfig {
        Some(paths) => {
            let mut merged: Option<Kubeconfig> = None;
            for path in paths.split(':').filter(|p| !p.is_empty()) {
                let file = Kubeconfig::read_from(path).map_err(|source| {
                    RegistrationError::Kubeconfig {
                        path: path.to_string(),
                        source,
                    }
                })?;
                merged =
                    Some(match merged {
                        None => file,
                        Some(previous) => previous.merge(file).map_err(|source| {
                            RegistrationError::Kubeconfig {
                                path: path.to_string(),
                                source,
                            }
                        })?,
                    });
            }
            let merged = merged.unwrap_or_default();
            kube::Config::from_custom_kubeconfig(merged, &KubeConfigOptions::default())
                .await
                .map_err(|source| RegistrationError::Kubeconfig {
                    path: paths.to_string(),
                    source,
                })?
        }
        None => kube::Config::infer()
            .await
            .map_err(RegistrationError::Infer)?,
    };
    Client::try_from(config).map_err(RegistrationError::Client)
}

/// What the agent writes about its shard.
#[derive(Clone)]
pub struct Registrar {
    api: Api<Shard>,
    name: String,
    spec: ShardSpec,
}

impl Registrar {
    pub fn new(
        client: Client,
        name: String,
        endpoint: String,
        node: Option<String>,
        capacity_bytes: u64,
    ) -> Registrar {
        let spec = ShardSpec {
            endpoint,
            node,
            capacity_bytes: Some(i64::try_from(capacity_bytes).unwrap_or(i64::MAX)),
            drain: false,
        };
        Registrar {
            api: Api::all(client),
            name,
            spec,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    async fn call<T>(
        &self,
        verb: &'static str,
        request: impl std::future::Future<Output = kube::Result<T>>,
    ) -> Result<T, RegistrationError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(RegistrationError::Api {
                verb,
                name: self.name.clone(),
                source,
            }),
            Err(_) => Err(RegistrationError::Timeout {
                verb,
                name: self.name.clone(),
            }),
        }
    }

    /// Creates the Shard, or sets the spec of an existing one (`drain: false`).
    pub async fn register(&self) -> Result<(), RegistrationError> {
        let shard = Shard::new(&self.name, self.spec.clone());
        match self
            .call("creating", self.api.create(&PostParams::default(), &shard))
            .await
        {
            Ok(_) => Ok(()),
            Err(RegistrationError::Api {
                source: kube::Error::Api(status),
                ..
            }) if status.is_already_exists() => {
                let patch = json!({ "spec": {
                    "endpoint": self.spec.endpoint,
                    "node": self.spec.node,
                    "capacityBytes": self.spec.capacity_bytes,
                    "drain": false,
                }});
                self.call(
                    "updating the spec of",
                    self.api
                        .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch)),
                )
                .await
                .map(|_| ())
            }
            Err(err) => Err(err),
        }
    }

    /// Writes `status.heartbeatTime` (now, RFC 3339 UTC) and `status.etcdHealthy`.
    pub async fn heartbeat(&self, etcd_healthy: bool) -> Result<(), RegistrationError> {
        let patch =
            json!({ "status": { "heartbeatTime": now_rfc3339(), "etcdHealthy": etcd_healthy } });
        self.call(
            "writing the heartbeat of",
            self.api
                .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await
        .map(|_| ())
    }

    /// Sets `spec.drain: true`.
    pub async fn start_drain(&self) -> Result<(), RegistrationError> {
        let patch = json!({ "spec": { "drain": true } });
        self.call(
            "setting spec.drain of",
            self.api
                .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await
        .map(|_| ())
    }

    /// `None` when the Shard does not exist; else its phase.
    pub async fn phase(&self) -> Result<Option<Option<ShardPhase>>, RegistrationError> {
        let shard = self.call("reading", self.api.get_opt(&self.name)).await?;
        Ok(shard.map(|s| s.status.and_then(|st| st.phase)))
    }

    /// Deletes the Shard; `Ok(false)` if it was already gone.
    pub async fn delete(&self) -> Result<bool, RegistrationError> {
        match self
            .call(
                "deleting",
                self.api.delete(&self.name, &DeleteParams::default()),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(err) if err.is_not_found() => Ok(false),
            Err(err) => Err(err),
        }
    }
}

/// Now as RFC 3339 in UTC with whole seconds, like Kubernetes' `metav1.Time`.
pub fn now_rfc3339() -> String {
    // A Timestamp formats in UTC; %S truncates to the second.
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn heartbeat_time_is_rfc3339_utc() {
        let now = super::now_rfc3339();
        assert_eq!(now.len(), "2026-01-01T00:00:00Z".len(), "{now}");
        assert!(now.ends_with('Z'));
        now.parse::<k8s_openapi::jiff::Timestamp>()
            .expect("parses back");
    }
}
