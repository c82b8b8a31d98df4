//! A local OCI registry on loopback, so a real node's containerd can pull an
//! image the way a node pulls from any registry (no registry outside is
//! reachable here).
//!
//! The registry is go-containerregistry's `cmd/registry` (in memory, plain
//! HTTP, on `localhost` and a port it picks itself) and images go in with
//! go-containerregistry's `crane push` of an archive of
//! `hack/build-images.sh` (`target/images/*.tar`); both binaries are built by
//! `hack/build-upstream.sh registry crane`. A real node's containerd is told
//! to pull from it over plain HTTP by a `hosts.toml`
//! ([`crate::real_node::trust_registry`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}: run hack/build-upstream.sh registry crane")]
    Missing(String),
    #[error("{what}: {detail}")]
    Io { what: String, detail: String },
    #[error("the registry did not say its port within {within:?}; see {log}")]
    NoPort { within: Duration, log: PathBuf },
    #[error("crane push {archive} {target}: {detail}")]
    Push {
        archive: String,
        target: String,
        detail: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RegistryError {
    let what = what.into();
    move |e| RegistryError::Io {
        what,
        detail: e.to_string(),
    }
}

/// The registry process, killed (and reaped) on drop.
pub struct Registry {
    child: Child,
    /// `127.0.0.1:<port>`: the host part of the images pushed here.
    pub host: String,
    pub log: PathBuf,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port in the registry's `serving on port N` line.
pub fn port_from_log(log: &str) -> Option<u16> {
    log.lines()
        .find_map(|l| l.split_once("serving on port ").map(|(_, p)| p.trim()))
        .and_then(|p| p.parse().ok())
}

/// The digest reference (`host/repo@sha256:…`) crane push prints on stdout.
pub fn digest_ref(stdout: &str) -> Option<String> {
    stdout
        .lines()
        .map(str::trim)
        .rev()
        .find(|l| {
            l.split_once("@sha256:")
                .is_some_and(|(repo, hex)| !repo.is_empty() && hex.len() == 64)
        })
        .map(String::from)
}

/// containerd's `hosts.toml` (its CRI `config_path` layout,
/// `certs.d/<host>/hosts.toml`) that pulls images named `host/…` from
/// `http://host` without TLS.
pub fn hosts_toml(host: &str) -> String {
    format!(
        "# A loopback registry (ste-bench): plain HTTP.\nserver = \"http://{host}\"\n\n\
         [host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  skip_verify = true\n"
    )
}

impl Registry {
    /// Starts the registry on a free loopback port (it picks it), its log
    /// in `logs/registry.log`, and waits until it says its port.
    pub fn start(logs: &Path) -> Result<Registry, RegistryError> {
        let binary = ste_testkit::upstream_binary("registry", "STE_REGISTRY_BIN")
            .map_err(|e| RegistryError::Missing(e.to_string()))?;
        std::fs::create_dir_all(logs).map_err(io(format!("creating {}", logs.display())))?;
        let log = logs.join("registry.log");
        let out = std::fs::File::create(&log).map_err(io(format!("creating {}", log.display())))?;
        let err = out.try_clone().map_err(io("log file"))?;
        let child = Command::new(&binary)
            .arg("-port=0")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io(format!("starting {}", binary.display())))?;
        let mut registry = Registry {
            child,
            host: String::new(),
            log,
        };
        let within = Duration::from_secs(10);
        let deadline = Instant::now() + within;
        loop {
            let text = std::fs::read_to_string(&registry.log).unwrap_or_default();
            if let Some(port) = port_from_log(&text) {
                registry.host = format!("127.0.0.1:{port}");
                return Ok(registry);
            }
            if Instant::now() > deadline || registry.child.try_wait().ok().flatten().is_some() {
                return Err(RegistryError::NoPort {
                    within,
                    log: registry.log.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Pushes the image archive `archive` (docker-archive, as
    /// hack/build-images.sh writes them) as `repo:tag` and returns its
    /// digest reference, `127.0.0.1:<port>/repo@sha256:…`.
    pub fn push(&self, archive: &Path, repo_tag: &str) -> Result<String, RegistryError> {
        let crane = ste_testkit::upstream_binary("crane", "STE_CRANE_BIN")
            .map_err(|e| RegistryError::Missing(e.to_string()))?;
        let target = format!("{}/{repo_tag}", self.host);
        let push_err = |detail: String| RegistryError::Push {
            archive: archive.display().to_string(),
            target: target.clone(),
            detail,
        };
        let out = Command::new(&crane)
            .arg("push")
            .arg("--insecure")
            .arg(archive)
            .arg(&target)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| push_err(e.to_string()))?;
        if !out.status.success() {
            return Err(push_err(String::from_utf8_lossy(&out.stderr).trim().into()));
        }
        digest_ref(&String::from_utf8_lossy(&out.stdout))
            .ok_or_else(|| push_err("no digest reference in its output".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_comes_from_the_serving_line() {
        let log = "2026/12/02 08:31:04 serving on port 33923\n";
        assert_eq!(port_from_log(log), Some(33923));
        assert_eq!(port_from_log("starting\n"), None);
        assert_eq!(port_from_log("serving on port x\n"), None);
    }

    #[test]
    fn the_digest_reference_is_the_line_with_a_full_digest() {
        let hex = "b9ae569587ac0a5b12940eb8e4bf99fdf0a602e2a8fcf97b861d4d4896498117";
        let out = format!("127.0.0.1:1/ste-function@sha256:{hex}\n");
        assert_eq!(
            digest_ref(&out).as_deref(),
            Some(format!("127.0.0.1:1/ste-function@sha256:{hex}").as_str())
        );
        assert_eq!(digest_ref("r@sha256:abc\n"), None);
        assert_eq!(digest_ref(""), None);
    }

    #[test]
    fn hosts_toml_pulls_the_host_over_plain_http() {
        let t = hosts_toml("127.0.0.1:5000");
        assert!(t.contains("server = \"http://127.0.0.1:5000\""), "{t}");
        assert!(t.contains("[host.\"http://127.0.0.1:5000\"]"), "{t}");
        assert!(t.contains("\"pull\", \"resolve\""), "{t}");
    }
}
