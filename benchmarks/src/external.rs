//! Running a scenario against a cluster the tool did not start (kind, bare
//! metal, …), given its kubeconfig: `--kubeconfig PATH`. The scenario runs
//! once, as one arm named `--arm-name`, in a namespace of its own that is
//! created first and deleted at the end. CPU per component is not measured
//! there (the processes are not ours).
//!
//! Supported kubeconfig users: a bearer `token` (or `tokenFile`) and a client
//! certificate and key (`client-certificate(-data)`, `client-key(-data)`);
//! clusters: `certificate-authority(-data)` and `insecure-skip-tls-verify`.
//! Exec plugins, auth providers and basic auth are refused with a clear error.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Deserialize;

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
        source: std::io::Error,
    },
    #[error("kubeconfig {path} is not valid YAML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("kubeconfig {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("kubeconfig {path}: user {user:?} authenticates with {method}, which ste-bench does not support; use a user with a token or a client certificate")]
    Unsupported {
        path: PathBuf,
        user: String,
        method: &'static str,
    },
}

/// TLS settings of a cluster given by kubeconfig (None in a record: the
/// local cluster's loopback self-signed certificate, not verified).
#[derive(Clone, Default)]
pub struct Tls {
    pub insecure: bool,
    /// PEM of the CA that signs the API server's certificate.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM of the client certificate followed by its key.
    pub identity_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("insecure", &self.insecure)
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity_pem.is_some())
            .finish()
    }
}

/// Where and how to reach the API server of a kubeconfig's current context.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub server: String,
    /// Empty with a client certificate.
    pub token: String,
    pub tls: Tls,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct Config {
    #[serde(default)]
    clusters: Vec<Named<ClusterEntry>>,
    #[serde(default)]
    users: Vec<Named<UserEntry>>,
    #[serde(default)]
    contexts: Vec<Named<ContextEntry>>,
    #[serde(default)]
    current_context: String,
}

#[derive(Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "cluster", alias = "user", alias = "context")]
    value: Option<T>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct ClusterEntry {
    #[serde(default)]
    server: String,
    #[serde(default)]
    insecure_skip_tls_verify: bool,
    certificate_authority: Option<String>,
    certificate_authority_data: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct UserEntry {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<String>,
    client_certificate: Option<String>,
    client_certificate_data: Option<String>,
    client_key: Option<String>,
    client_key_data: Option<String>,
    exec: Option<serde_json::Value>,
    auth_provider: Option<serde_json::Value>,
    username: Option<String>,
}

#[derive(Deserialize, Default)]
struct ContextEntry {
    #[serde(default)]
    cluster: String,
    #[serde(default)]
    user: String,
}

/// Reads the current context of the kubeconfig at `path`.
pub fn load(path: &Path) -> Result<Endpoint, KubeconfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| KubeconfigError::Read {
        path: path.into(),
        source,
    })?;
    parse(&text, path)
}

/// Parses kubeconfig `text`; relative file references are resolved against `path`'s directory.
pub fn parse(text: &str, path: &Path) -> Result<Endpoint, KubeconfigError> {
    let invalid = |message: String| KubeconfigError::Invalid {
        path: path.into(),
        message,
    };
    let config: Config = serde_saphyr::from_str(text).map_err(|e| KubeconfigError::Parse {
        path: path.into(),
        message: e.to_string(),
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let read = |file: &str| -> Result<Vec<u8>, KubeconfigError> {
        let file = base.join(file);
        std::fs::read(&file).map_err(|e| invalid(format!("reading {}: {e}", file.display())))
    };
    let context_name = if config.current_context.is_empty() {
        match config.contexts.as_slice() {
            [only] => only.name.clone(),
            _ => return Err(invalid("no current-context".into())),
        }
    } else {
        config.current_context.clone()
    };
    let context = config
        .contexts
        .iter()
        .find(|c| c.name == context_name)
        .and_then(|c| c.value.as_ref())
        .ok_or_else(|| invalid(format!("context {context_name:?} not found")))?;
    let cluster = config
        .clusters
        .iter()
        .find(|c| c.name == context.cluster)
        .and_then(|c| c.value.as_ref())
        .ok_or_else(|| invalid(format!("cluster {:?} not found", context.cluster)))?;
    let default_user = UserEntry::default();
    let user = if context.user.is_empty() {
        &default_user
    } else {
        config
            .users
            .iter()
            .find(|u| u.name == context.user)
            .map(|u| u.value.as_ref().unwrap_or(&default_user))
            .ok_or_else(|| invalid(format!("user {:?} not found", context.user)))?
    };
    let unsupported = |method| KubeconfigError::Unsupported {
        path: path.into(),
        user: context.user.clone(),
        method,
    };
    if user.exec.is_some() {
        return Err(unsupported("an exec plugin"));
    }
    if user.auth_provider.is_some() {
        return Err(unsupported("an auth provider"));
    }
    if user.username.is_some() {
        return Err(unsupported("basic auth (username/password)"));
    }
    if cluster.server.is_empty() {
        return Err(invalid(format!(
            "cluster {:?} has no server",
            context.cluster
        )));
    }
    if !cluster.server.starts_with("https://") && !cluster.server.starts_with("http://") {
        return Err(invalid(format!(
            "server {:?} is not an http(s) URL",
            cluster.server
        )));
    }
    let data = |what: &str, value: &str| {
        base64_decode(value).ok_or_else(|| invalid(format!("{what} is not valid base64")))
    };
    let ca_pem = match (
        &cluster.certificate_authority_data,
        &cluster.certificate_authority,
    ) {
        (Some(d), _) => Some(data("certificate-authority-data", d)?),
        (None, Some(f)) => Some(read(f)?),
        (None, None) => None,
    };
    let cert = match (&user.client_certificate_data, &user.client_certificate) {
        (Some(d), _) => Some(data("client-certificate-data", d)?),
        (None, Some(f)) => Some(read(f)?),
        (None, None) => None,
    };
    let key = match (&user.client_key_data, &user.client_key) {
        (Some(d), _) => Some(data("client-key-data", d)?),
        (None, Some(f)) => Some(read(f)?),
        (None, None) => None,
    };
    let identity_pem = match (cert, key) {
        (Some(mut cert), Some(key)) => {
            cert.push(b'\n');
            cert.extend(key);
            Some(cert)
        }
        (None, None) => None,
        _ => {
            return Err(invalid(format!(
                "user {:?} has a client certificate or key but not both",
                context.user
            )))
        }
    };
    let token = match (&user.token, &user.token_file) {
        (Some(t), _) => t.trim().to_string(),
        (None, Some(f)) => String::from_utf8_lossy(&read(f)?).trim().to_string(),
        (None, None) => String::new(),
    };
    if token.is_empty() && identity_pem.is_none() {
        return Err(unsupported("no token and no client certificate"));
    }
    Ok(Endpoint {
        server: cluster.server.trim_end_matches('/').to_string(),
        token,
        tls: Tls {
            insecure: cluster.insecure_skip_tls_verify,
            ca_pem,
            identity_pem,
        },
    })
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
    {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

static ARM_NAME: RwLock<String> = RwLock::new(String::new());

/// The name `Arm::External` shows in tables, plots and JSON (`--arm-name`).
pub fn arm_name() -> String {
    let name = ARM_NAME.read().map(|n| n.clone()).unwrap_or_default();
    if name.is_empty() {
        "cluster".into()
    } else {
        name
    }
}

/// A record for the cluster of `args.kubeconfig`, with `args.namespace`
/// created (it must not exist) and its default ServiceAccount present.
pub async fn connect(args: &ExternalArgs) -> anyhow::Result<ClusterRecord> {
    use anyhow::{bail, Context};
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
    let endpoint = load(path)?;
    if let Ok(mut name) = ARM_NAME.write() {
        *name = args.arm_name.trim().to_string();
    }
    let record = ClusterRecord {
        arm: Arm::External,
        api_url: endpoint.server,
        token: endpoint.token,
        kubeconfig: std::path::absolute(path)?,
        router: None,
        router_admin: None,
        processes: Vec::new(),
        ram_dir: None,
        ram_etcd: None,
        durable_etcd: Vec::new(),
        namespace: args.namespace.clone(),
        tls: Some(Arc::new(endpoint.tls)),
    };
    let http = crate::api::client_for(&record)?;
    use crate::api::Authed;
    let body = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": args.namespace}});
    let response = http
        .post(format!("{}/api/v1/namespaces", record.api_url))
        .auth(&record)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("reaching {} (from {})", record.api_url, path.display()))?;
    match response.status().as_u16() {
        200..=299 => {}
        409 => bail!("namespace {} already exists in that cluster; delete it or pick another with --namespace", args.namespace),
        code => bail!("creating namespace {}: HTTP {code}: {}", args.namespace, response.text().await.unwrap_or_default()),
    }
    eprintln!(
        "• running against {} (arm {:?}) in namespace {}",
        record.api_url,
        arm_name(),
        record.namespace
    );
    // Pods are refused until the namespace's default ServiceAccount exists
    // (where the ServiceAccount admission plugin is on).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let url = format!(
            "{}/api/v1/namespaces/{}/serviceaccounts/default",
            record.api_url, record.namespace
        );
        let code = http
            .get(&url)
            .auth(&record)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if code == 200 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(record)
}

/// Deletes the run's namespace and waits (up to 120 s) until it is gone.
pub async fn cleanup(record: &ClusterRecord) -> anyhow::Result<()> {
    use crate::api::Authed;
    let http = crate::api::client_for(record)?;
    let url = format!("{}/api/v1/namespaces/{}", record.api_url, record.namespace);
    let response = http.delete(&url).auth(record).send().await?;
    if !response.status().is_success() && response.status().as_u16() != 404 {
        anyhow::bail!(
            "deleting namespace {}: HTTP {}",
            record.namespace,
            response.status()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if http
            .get(&url)
            .auth(record)
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == 404)
        {
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

    fn b64(bytes: &[u8]) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
            for i in 0..4 {
                out.push(if i <= chunk.len() {
                    A[(n >> (18 - 6 * i) & 63) as usize] as char
                } else {
                    '='
                });
            }
        }
        out
    }

    #[test]
    fn base64_round_trips() {
        for text in [
            &b""[..],
            b"a",
            b"ab",
            b"abc",
            b"-----BEGIN CERTIFICATE-----\nMIIB\n",
        ] {
            assert_eq!(base64_decode(&b64(text)).as_deref(), Some(text));
        }
        assert_eq!(base64_decode("!!"), None);
    }

    #[test]
    fn token_and_client_certificate_users() {
        let path = Path::new("/nonexistent/kubeconfig");
        let token = "apiVersion: v1\nclusters:\n- name: c\n  cluster:\n    server: https://10.0.0.1:6443/\n    insecure-skip-tls-verify: true\n\
                     users:\n- name: u\n  user:\n    token: abc\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n";
        let endpoint = parse(token, path).expect("token user");
        assert_eq!(
            (
                endpoint.server.as_str(),
                endpoint.token.as_str(),
                endpoint.tls.insecure
            ),
            ("https://10.0.0.1:6443", "abc", true)
        );
        let certs = format!(
            "clusters:\n- name: c\n  cluster:\n    server: https://h:6443\n    certificate-authority-data: {}\n\
             users:\n- name: u\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n\
             contexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
            b64(b"CA"), b64(b"CERT"), b64(b"KEY")
        );
        let endpoint = parse(&certs, path).expect("certificate user");
        assert_eq!(endpoint.token, "");
        assert_eq!(endpoint.tls.ca_pem.as_deref(), Some(&b"CA"[..]));
        assert_eq!(
            endpoint.tls.identity_pem.as_deref(),
            Some(&b"CERT\nKEY"[..])
        );
    }

    #[test]
    fn unsupported_and_broken_kubeconfigs_are_clear_errors() {
        let path = Path::new("/nonexistent/kubeconfig");
        let exec = "clusters:\n- name: c\n  cluster:\n    server: https://h\nusers:\n- name: u\n  user:\n    exec:\n      command: aws\n\
                    contexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n";
        let err = parse(exec, path).expect_err("exec refused").to_string();
        assert!(err.contains("exec plugin"), "{err}");
        let missing = "clusters: []\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n";
        assert!(parse(missing, path)
            .expect_err("no cluster")
            .to_string()
            .contains("cluster \"c\" not found"));
        let err = load(Path::new("/nonexistent/kubeconfig"))
            .expect_err("missing file")
            .to_string();
        assert!(
            err.contains("reading kubeconfig /nonexistent/kubeconfig"),
            "{err}"
        );
    }
}
