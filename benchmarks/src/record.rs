//! What `ste-bench cluster up` started, as recorded in `D/cluster.json`:
//! the one value every suite, the API helpers and `cluster down` share.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use ste_testkit::Api;

use crate::arms::Arm;

/// What `up` started, as recorded in D/cluster.json.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ClusterRecord {
    pub arm: Arm,
    pub api_url: String,
    pub token: String,
    pub kubeconfig: PathBuf,
    pub router: Option<String>,
    pub router_admin: Option<String>,
    pub processes: Vec<ProcessRecord>,
    /// Shard data on a RAM disk, removed by `down`.
    pub ram_dir: Option<PathBuf>,
    /// The override arm's RAM etcd (pods and events), to read directly.
    #[serde(default)]
    pub ram_etcd: Option<String>,
    /// Client URLs of the durable etcd's members.
    #[serde(default)]
    pub durable_etcd: Vec<String>,
    /// Namespace the scenarios run in: `default` on local clusters, the
    /// run's own one on a cluster given by `--kubeconfig`.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The kube-rs configuration of a cluster given by kubeconfig; None:
    /// loopback with `token`, serving certificate not verified (see
    /// [`crate::api::config_for`]).
    #[serde(skip)]
    pub kube_config: Option<std::sync::Arc<kube::Config>>,
}

pub(crate) fn default_namespace() -> String {
    "default".into()
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ProcessRecord {
    pub name: String,
    pub pid: u32,
    pub binary: String,
    pub args: Vec<String>,
    /// Variables added to the inherited environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
}

impl ClusterRecord {
    pub fn api(&self) -> Api {
        Api {
            url: self.api_url.clone(),
            token: self.token.clone(),
        }
    }

    pub fn pid_of(&self, name: &str) -> Option<u32> {
        self.processes
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.pid)
    }
}
