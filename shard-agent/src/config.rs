//! Command line of `ste-shard-agent run` and its validation into a [`Config`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

/// Flags of `ste-shard-agent run` (the help text is on the subcommand in main.rs).
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Name of the shard: the Shard object's name and etcd's member name.
    /// Must be a DNS-1123 subdomain. Defaults to --node-name.
    #[arg(long, env = "STE_SHARD_NAME")]
    pub shard_name: Option<String>,

    /// The node this agent runs on (spec.node; in a DaemonSet set NODE_NAME
    /// from the downward API `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// The etcd binary: a path, or a name looked up on PATH.
    #[arg(long, env = "STE_SHARD_ETCD_BINARY", default_value = "etcd")]
    pub etcd_binary: PathBuf,

    /// etcd's data directory; put it on a RAM disk (an emptyDir with
    /// `medium: Memory`). Created if missing and kept across etcd restarts.
    #[arg(long, env = "STE_SHARD_DATA_DIR")]
    pub data_dir: PathBuf,

    /// File receiving etcd's stdout and stderr (appended; rotated to
    /// `<file>.1` at a restart once over 16 MiB) [default: <data-dir>/../etcd.log]
    #[arg(long, env = "STE_SHARD_ETCD_LOG")]
    pub etcd_log: Option<PathBuf>,

    /// URL etcd serves clients on (`--listen-client-urls`); one URL, `https://`
    /// requires --cert-file and --key-file.
    #[arg(
        long,
        env = "STE_SHARD_LISTEN_CLIENT",
        default_value = "http://127.0.0.1:2379"
    )]
    pub listen_client: String,

    /// Also serve clients on this Unix socket (an absolute path), for a router
    /// on the same host (`--shards name=unix:///path`): no TCP stack on the
    /// shard hop. Optional; registrations keep advertising the TCP URL.
    #[arg(long, env = "STE_SHARD_LISTEN_CLIENT_UNIX")]
    pub listen_client_unix: Option<PathBuf>,

    /// Client URL the routers use to reach this shard (`spec.endpoint`,
    /// etcd's `--advertise-client-urls`) [default: --listen-client]
    #[arg(long, env = "STE_SHARD_ADVERTISE_CLIENT")]
    pub advertise_client: Option<String>,

    /// etcd's peer URL (listen and advertise). A single-member etcd has no
    /// peers, but etcd needs the port; keep it on loopback.
    #[arg(
        long,
        env = "STE_SHARD_LISTEN_PEER",
        default_value = "http://127.0.0.1:2380"
    )]
    pub listen_peer: String,

    /// etcd backend quota (`--quota-backend-bytes`, also `spec.capacityBytes`):
    /// bytes, or with a suffix: KiB, MiB, GiB (also K, M, G = powers of 1024).
    #[arg(long, env = "STE_SHARD_QUOTA_BYTES", default_value = "2GiB", value_parser = parse_bytes)]
    pub quota_bytes: u64,

    /// Largest request etcd accepts (`--max-request-bytes`), same units as --quota-bytes.
    #[arg(long, env = "STE_SHARD_MAX_REQUEST_BYTES", default_value = "16MiB", value_parser = parse_bytes)]
    pub max_request_bytes: u64,

    /// Most operations in one etcd transaction (`--max-txn-ops`).
    #[arg(long, env = "STE_SHARD_MAX_TXN_OPS", default_value_t = 10_000)]
    pub max_txn_ops: u32,

    /// etcd's server certificate (PEM); with it etcd serves TLS (use an
    /// `https://` --listen-client).
    #[arg(long, env = "STE_SHARD_CERT_FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,

    /// Private key of --cert-file (PEM).
    #[arg(long, env = "STE_SHARD_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,

    /// CA bundle (PEM) that signs client certificates: etcd runs with
    /// `--client-cert-auth` and refuses clients without such a certificate.
    /// The agent's health checks also verify etcd's server certificate with
    /// it (hostname not checked: the check goes to the local listener).
    /// Requires --cert-file and --client-cert-file.
    #[arg(long, env = "STE_SHARD_TRUSTED_CA_FILE", requires = "cert_file")]
    pub trusted_ca_file: Option<PathBuf>,

    /// Client certificate (PEM) the agent presents for its own health checks.
    #[arg(long, env = "STE_SHARD_CLIENT_CERT_FILE", requires = "client_key_file")]
    pub client_cert_file: Option<PathBuf>,

    /// Private key of --client-cert-file (PEM).
    #[arg(long, env = "STE_SHARD_CLIENT_KEY_FILE", requires = "client_cert_file")]
    pub client_key_file: Option<PathBuf>,

    /// Extra etcd flag, repeatable, e.g. `--etcd-arg=--log-level=debug`.
    /// Passed after the agent's own flags, so it overrides them. In the
    /// environment variable, separate flags with spaces.
    #[arg(
        long = "etcd-arg",
        value_name = "FLAG",
        env = "STE_SHARD_ETCD_ARGS",
        value_delimiter = ' ',
        allow_hyphen_values = true
    )]
    pub etcd_args: Vec<String>,

    /// Go's GOMAXPROCS for etcd: the most cores it runs Go code on at once.
    /// 1 (the default) keeps a shard to one core beside the node's pods and
    /// halves etcd's thread wake-ups per write (Go's scheduler otherwise
    /// wakes idle threads to look for work; docs/benchmarks.md, "GOMAXPROCS
    /// of the RAM etcds"). 0: leave it to Go (one per CPU of the node).
    #[arg(long, env = "STE_SHARD_ETCD_GOMAXPROCS", default_value_t = 1)]
    pub etcd_gomaxprocs: u16,

    /// Interval between health checks of etcd (GET /health?exclude=NOSPACE:
    /// a full shard still serves reads and deletes, so it is not restarted).
    #[arg(long, env = "STE_SHARD_HEALTH_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub health_interval: Duration,

    /// Deadline of one health check.
    #[arg(long, env = "STE_SHARD_HEALTH_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub health_timeout: Duration,

    /// Restart etcd when it has not passed a health check for this long
    /// (counted from its start or its last successful check).
    #[arg(long, env = "STE_SHARD_UNHEALTHY_AFTER", default_value = "30s", value_parser = humantime::parse_duration)]
    pub unhealthy_after: Duration,

    /// When stopping etcd: time between SIGTERM and SIGKILL.
    #[arg(long, env = "STE_SHARD_STOP_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub stop_grace: Duration,

    /// kubeconfig file(s), `:`-separated, for registering the Shard; `none`
    /// disables registration. Unset: $HOME/.kube/config, else the in-cluster
    /// service account.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<String>,

    /// Run without registering a Shard (local use); same as `--kubeconfig none`.
    #[arg(long, env = "STE_SHARD_NO_REGISTER")]
    pub no_register: bool,

    /// Interval of the heartbeat (status.heartbeatTime, status.etcdHealthy).
    #[arg(long, env = "STE_SHARD_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,

    /// How long a SIGTERM waits for the router to report the shard Drained.
    #[arg(long, env = "STE_SHARD_DRAIN_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Address of the admin HTTP server (/livez, /readyz, /metrics).
    #[arg(long, env = "STE_SHARD_ADMIN_LISTEN", default_value = "127.0.0.1:9482")]
    pub admin_listen: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no shard name: pass --shard-name (or STE_SHARD_NAME) or set NODE_NAME")]
    MissingShardName,
    #[error("invalid shard name {name:?}: {why} (a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters)")]
    InvalidShardName { name: String, why: &'static str },
    #[error("etcd binary {0:?} not found on PATH: install etcd or pass --etcd-binary")]
    EtcdNotOnPath(PathBuf),
    #[error("etcd binary {path:?} is not an executable file: {why}")]
    EtcdNotExecutable { path: PathBuf, why: String },
    #[error("invalid {flag} {value:?}: {why}")]
    InvalidUrl {
        flag: &'static str,
        value: String,
        why: String,
    },
    #[error("{0}")]
    Tls(String),
    #[error("{flag} file {path:?} is not readable: {source}")]
    UnreadableFile {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag} must be greater than zero")]
    Zero { flag: &'static str },
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub shard_name: String,
    pub node_name: Option<String>,
    pub etcd_binary: PathBuf,
    pub data_dir: PathBuf,
    pub etcd_log: PathBuf,
    pub listen_client: reqwest::Url,
    pub listen_client_unix: Option<PathBuf>,
    pub advertise_client: String,
    pub listen_peer: String,
    pub quota_bytes: u64,
    pub max_request_bytes: u64,
    pub max_txn_ops: u32,
    pub tls: Option<ServerTlsFiles>,
    pub client_tls: Option<ClientTlsFiles>,
    pub etcd_args: Vec<String>,
    /// 0: Go's own default.
    pub etcd_gomaxprocs: u16,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub unhealthy_after: Duration,
    pub stop_grace: Duration,
    /// `None`: no registration.
    pub registration: Option<Registration>,
    pub admin_listen: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub trusted_ca: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ClientTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Registration {
    /// `None`: infer (KUBECONFIG/~/.kube/config, then in-cluster).
    pub kubeconfig: Option<String>,
    pub heartbeat_interval: Duration,
    pub drain_timeout: Duration,
}

impl RunArgs {
    pub fn validate(self) -> Result<Config, ConfigError> {
        let shard_name = self
            .shard_name
            .clone()
            .filter(|n| !n.is_empty())
            .or_else(|| self.node_name.clone().filter(|n| !n.is_empty()))
            .ok_or(ConfigError::MissingShardName)?;
        validate_dns1123_subdomain(&shard_name).map_err(|why| ConfigError::InvalidShardName {
            name: shard_name.clone(),
            why,
        })?;
        let etcd_binary = resolve_binary(&self.etcd_binary)?;

        let listen_client = parse_url("--listen-client", &self.listen_client)?;
        let advertise_client = match &self.advertise_client {
            Some(url) => {
                let parsed = parse_url("--advertise-client", url)?;
                if parsed.scheme() != listen_client.scheme() {
                    return Err(ConfigError::InvalidUrl {
                        flag: "--advertise-client",
                        value: url.clone(),
                        why: format!(
                            "its scheme differs from --listen-client ({})",
                            listen_client.scheme()
                        ),
                    });
                }
                url.trim_end_matches('/').to_string()
            }
            None => self.listen_client.trim_end_matches('/').to_string(),
        };
        if let Some(path) = &self.listen_client_unix {
            if !path.is_absolute() {
                return Err(ConfigError::InvalidUrl {
                    flag: "--listen-client-unix",
                    value: path.display().to_string(),
                    why: "must be an absolute path".into(),
                });
            }
            if listen_client.scheme() == "https" {
                return Err(ConfigError::InvalidUrl {
                    flag: "--listen-client-unix",
                    value: path.display().to_string(),
                    why: "etcd would serve TLS on it too (unixs://); a plain socket goes with an http:// --listen-client".into(),
                });
            }
        }
        let peer = parse_url("--listen-peer", &self.listen_peer)?;
        if peer.scheme() != "http" {
            return Err(ConfigError::InvalidUrl {
                flag: "--listen-peer",
                value: self.listen_peer.clone(),
                why: "must be http:// (a single member has no peers; keep it on loopback)".into(),
            });
        }
        if peer.port_or_known_default() == listen_client.port_or_known_default()
            && peer.host_str() == listen_client.host_str()
        {
            return Err(ConfigError::InvalidUrl {
                flag: "--listen-peer",
                value: self.listen_peer.clone(),
                why: "must use another port than --listen-client".into(),
            });
        }

        let tls = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                readable("--cert-file", cert)?;
                readable("--key-file", key)?;
                if let Some(ca) = &self.trusted_ca_file {
                    readable("--trusted-ca-file", ca)?;
                }
                Some(ServerTlsFiles { cert: cert.clone(), key: key.clone(), trusted_ca: self.trusted_ca_file.clone() })
            }
            (None, None) if self.trusted_ca_file.is_none() => None,
            _ => return Err(ConfigError::Tls("--cert-file, --key-file and --trusted-ca-file go together: pass --cert-file and --key-file".into())),
        };
        match (&tls, listen_client.scheme()) {
            (Some(_), "http") => {
                return Err(ConfigError::Tls(
                    "--cert-file is given but --listen-client is http://: use https://".into(),
                ))
            }
            (None, "https") => {
                return Err(ConfigError::Tls(
                    "--listen-client is https:// but no --cert-file/--key-file are given".into(),
                ))
            }
            _ => {}
        }
        let client_tls = match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => {
                readable("--client-cert-file", cert)?;
                readable("--client-key-file", key)?;
                Some(ClientTlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                })
            }
            (None, None) => None,
            _ => {
                return Err(ConfigError::Tls(
                    "--client-cert-file and --client-key-file go together".into(),
                ))
            }
        };
        if tls.as_ref().is_some_and(|t| t.trusted_ca.is_some()) && client_tls.is_none() {
            return Err(ConfigError::Tls(
                "--trusted-ca-file makes etcd refuse clients without a certificate: pass --client-cert-file and --client-key-file for the agent's health checks".into(),
            ));
        }

        for (flag, value) in [
            ("--health-interval", self.health_interval),
            ("--health-timeout", self.health_timeout),
            ("--unhealthy-after", self.unhealthy_after),
            ("--heartbeat-interval", self.heartbeat_interval),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Zero { flag });
            }
        }
        for (flag, value) in [
            ("--quota-bytes", self.quota_bytes),
            ("--max-request-bytes", self.max_request_bytes),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero { flag });
            }
        }
        if self.max_txn_ops == 0 {
            return Err(ConfigError::Zero {
                flag: "--max-txn-ops",
            });
        }

        let etcd_log = self
            .etcd_log
            .clone()
            .unwrap_or_else(|| default_log_path(&self.data_dir));
        let registration = if self.no_register || self.kubeconfig.as_deref() == Some("none") {
            None
        } else {
            Some(Registration {
                kubeconfig: self.kubeconfig.clone().filter(|k| !k.is_empty()),
                heartbeat_interval: self.heartbeat_interval,
                drain_timeout: self.drain_timeout,
            })
        };
        Ok(Config {
            shard_name,
            node_name: self.node_name.filter(|n| !n.is_empty()),
            etcd_binary,
            data_dir: self.data_dir,
            etcd_log,
            listen_client,
            listen_client_unix: self.listen_client_unix,
            advertise_client,
            listen_peer: self.listen_peer.trim_end_matches('/').to_string(),
            quota_bytes: self.quota_bytes,
            max_request_bytes: self.max_request_bytes,
            max_txn_ops: self.max_txn_ops,
            tls,
            client_tls,
            etcd_args: self
                .etcd_args
                .into_iter()
                .filter(|a| !a.is_empty())
                .collect(),
            etcd_gomaxprocs: self.etcd_gomaxprocs,
            health_interval: self.health_interval,
            health_timeout: self.health_timeout,
            unhealthy_after: self.unhealthy_after,
            stop_grace: self.stop_grace,
            registration,
            admin_listen: self.admin_listen,
        })
    }
}

fn default_log_path(data_dir: &Path) -> PathBuf {
    match data_dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.join("etcd.log"),
        _ => PathBuf::from("etcd.log"),
    }
}

/// Kubernetes object names: a DNS-1123 subdomain.
pub fn validate_dns1123_subdomain(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > 253 {
        return Err("it is longer than 253 characters");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    {
        return Err("it has a character other than a-z, 0-9, '-' or '.'");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("it has an empty part between dots");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a part starts or ends with '-'");
        }
        if label.len() > 63 {
            return Err("a part between dots is longer than 63 characters");
        }
    }
    Ok(())
}

/// `2GiB`, `16MiB`, `512K`, `1073741824`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (bytes, or a number with KiB, MiB or GiB)"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "Ki" | "KiB" => 1 << 10,
        "M" | "Mi" | "MiB" => 1 << 20,
        "G" | "Gi" | "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use KiB, MiB or GiB)"
            ))
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn parse_url(flag: &'static str, value: &str) -> Result<reqwest::Url, ConfigError> {
    let invalid = |why: String| ConfigError::InvalidUrl {
        flag,
        value: value.to_string(),
        why,
    };
    if value.contains(',') {
        return Err(invalid("give one URL".into()));
    }
    let url = reqwest::Url::parse(value).map_err(|e| invalid(e.to_string()))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(invalid("the scheme must be http or https".into()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("it has no host".into()));
    }
    if url.port().is_none() {
        return Err(invalid(
            "give the port explicitly, e.g. http://127.0.0.1:2379".into(),
        ));
    }
    if url.path() != "/" && !url.path().is_empty() {
        return Err(invalid("it must not have a path".into()));
    }
    Ok(url)
}

fn readable(flag: &'static str, path: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|source| ConfigError::UnreadableFile {
            flag,
            path: path.to_path_buf(),
            source,
        })
}

/// A path as given, or a bare name looked up on PATH.
fn resolve_binary(binary: &Path) -> Result<PathBuf, ConfigError> {
    let candidate = if binary.components().count() > 1 || binary.is_absolute() {
        binary.to_path_buf()
    } else {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|dir| dir.join(binary))
            .find(|p| is_executable(p).is_ok())
            .ok_or_else(|| ConfigError::EtcdNotOnPath(binary.to_path_buf()))?
    };
    is_executable(&candidate).map_err(|why| ConfigError::EtcdNotExecutable {
        path: candidate.clone(),
        why,
    })?;
    Ok(candidate)
}

fn is_executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err("not executable".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("16MiB"), Ok(16 << 20));
        assert_eq!(parse_bytes("512K"), Ok(512 << 10));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert!(parse_bytes("2GB").unwrap_err().contains("unknown unit"));
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn dns_names() {
        assert!(validate_dns1123_subdomain("worker-1").is_ok());
        assert!(validate_dns1123_subdomain("ip-10-0-0-1.ec2.internal").is_ok());
        assert!(validate_dns1123_subdomain("Worker").is_err());
        assert!(validate_dns1123_subdomain("-a").is_err());
        assert!(validate_dns1123_subdomain("a..b").is_err());
        assert!(validate_dns1123_subdomain("a_b").is_err());
        assert!(validate_dns1123_subdomain("").is_err());
    }
}
