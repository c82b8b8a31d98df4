//! Running a scenario against a cluster the tool did not start (kind, bare
//! metal, …), given its kubeconfig: `--kubeconfig PATH`. The scenario runs
//! once, as one arm named `--arm-name`, in a namespace of its own that is
//! created first and deleted at the end. CPU per component is not measured
//! there (the processes are not ours).
//!
//! The kubeconfig is read by kube-rs (`Kubeconfig::read_from`,
//! `Config::from_custom_kubeconfig`): every user kind it supports (tokens,
//! client certificates, exec plugins, …) works here too.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::api::client_for;
use crate::cluster::{Arm, ClusterRecord};

/// The flags every scenario takes to run against an existing cluster.
#[derive(clap::Args, Clone, Debug)]
pub struct ExternalArgs {
    /// Run against the cluster of this kubeconfig (its current context)
    /// instead of starting the local arms: the scenario runs once, as one
    /// arm, in its own namespace; fake-node, shard, QPS and fsync flags do
    /// not apply, and CPU per component is reported as n/a.
    #[arg(long, env = "STE_BENCH_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Name of that arm in tables, plots and JSON (with --kubeconfig).
    #[arg(long, env = "STE_BENCH_ARM_NAME", default_value = "cluster")]
    pub arm_name: String,
    /// Namespace created for the run and deleted at the end (with
    /// --kubeconfig); it must not exist yet.
    #[arg(long, env = "STE_BENCH_NAMESPACE", default_value = "ste-bench")]
    pub namespace: String,
}

impl ExternalArgs {
    /// "on the cluster of <kubeconfig> (namespace <ns>)" for a report's
    /// heading; None when the run is on the local arms.
    pub fn heading(&self) -> Option<String> {
        self.kubeconfig.as_ref().map(|path| {
            format!(
                "on the cluster of {} (namespace {})",
                path.display(),
                self.namespace
            )
        })
    }
}

impl Default for ExternalArgs {
    fn default() -> Self {
        ExternalArgs {
            kubeconfig: None,
            arm_name: "cluster".into(),
            namespace: "ste-bench".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error("reading kubeconfig {path}: {source}")]
    Read {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("kubeconfig {path}: {source}")]
    Invalid {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
}

/// The kube-rs configuration of the current context of the kubeconfig at
/// `path` (kube-rs reads it: tokens, client certificates, exec plugins, …).
pub async fn load(path: &Path) -> Result<kube::Config, KubeconfigError> {
    let file = Kubeconfig::read_from(path).map_err(|source| KubeconfigError::Read {
        path: path.into(),
        source,
    })?;
    kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .map_err(|source| KubeconfigError::Invalid {
            path: path.into(),
            source,
        })
}

/// A record for the cluster of `args.kubeconfig`, with `args.namespace`
/// created (it must not exist) and its default ServiceAccount present.
pub async fn connect(args: &ExternalArgs) -> anyhow::Result<ClusterRecord> {
    use anyhow::Context;
    let path = args.kubeconfig.as_ref().context("no --kubeconfig given")?;
    if args.arm_name.trim().is_empty() {
        bail!("--arm-name must not be empty");
    }
    if args.namespace.is_empty()
        || args.namespace.len() > 63
        || !args
            .namespace
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        bail!(
            "--namespace {:?} is not a valid namespace name (lowercase letters, digits and '-')",
            args.namespace
        );
    }
    let config = load(path).await?;
    crate::arms::set_external_name(&args.arm_name);
    let record = ClusterRecord {
        arm: Arm::External,
        api_url: config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_string(),
        token: String::new(),
        kubeconfig: std::path::absolute(path)?,
        router: None,
        router_admin: None,
        processes: Vec::new(),
        ram_dir: None,
        ram_etcd: None,
        durable_etcd: Vec::new(),
        namespace: args.namespace.clone(),
        kube_config: Some(Arc::new(config)),
    };
    let client = client_for(&record)?;
    let namespace: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": args.namespace}
    }))?;
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => bail!("namespace {} already exists in that cluster; delete it or pick another with --namespace", args.namespace),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("creating namespace {} on {} (from {})", args.namespace, record.api_url, path.display()))),
    }
    eprintln!(
        "• running against {} (arm {:?}) in namespace {}",
        record.api_url,
        crate::arms::external_name(),
        record.namespace
    );
    // Pods are refused until the namespace's default ServiceAccount exists
    // (where the ServiceAccount admission plugin is on).
    let accounts = crate::api::namespaced::<ServiceAccount>(&client, &record);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(accounts.get_opt("default").await, Ok(Some(_))) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(record)
}

/// Deletes the run's namespace and waits (up to 120 s) until it is gone.
pub async fn cleanup(record: &ClusterRecord) -> anyhow::Result<()> {
    let namespaces = Api::<Namespace>::all(client_for(record)?);
    match namespaces
        .delete(&record.namespace, &DeleteParams::default())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => {
            return Err(
                anyhow::Error::new(e).context(format!("deleting namespace {}", record.namespace))
            )
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if matches!(namespaces.get_opt(&record.namespace).await, Ok(None)) {
            eprintln!("• namespace {} deleted", record.namespace);
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "• namespace {} still terminating after 120 s (left to the cluster)",
        record.namespace
    );
    Ok(())
}

/// Runs `scenario` on the external cluster of `args`, deleting the namespace afterwards either way.
pub async fn run<T, F, Fut>(args: &ExternalArgs, scenario: F) -> anyhow::Result<T>
where
    F: FnOnce(ClusterRecord) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let record = connect(args).await?;
    let outcome = scenario(record.clone()).await;
    let cleaned = cleanup(&record).await;
    let value = outcome?;
    cleaned?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn kube_rs_reads_token_and_certificate_users() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kubeconfig");
        let token = "apiVersion: v1\nclusters:\n- name: c\n  cluster:\n    server: https://10.0.0.1:6443/\n    insecure-skip-tls-verify: true\n\
                     users:\n- name: u\n  user:\n    token: abc\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n";
        std::fs::write(&path, token).expect("write");
        let config = load(&path).await.expect("token user");
        assert_eq!(config.cluster_url.host(), Some("10.0.0.1"));
        assert!(config.accept_invalid_certs);
        assert!(config.auth_info.token.is_some());
    }

    #[tokio::test]
    async fn broken_kubeconfigs_are_clear_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kubeconfig");
        let missing = "clusters: []\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n";
        std::fs::write(&path, missing).expect("write");
        let err = load(&path).await.expect_err("no cluster").to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        let err = load(Path::new("/nonexistent/kubeconfig"))
            .await
            .expect_err("missing file")
            .to_string();
        assert!(
            err.contains("reading kubeconfig /nonexistent/kubeconfig"),
            "{err}"
        );
    }
}
