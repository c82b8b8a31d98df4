//! Runs the real `ste-shard-agent` binary for tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ste_testkit::free_port;
use tempfile::TempDir;

pub const AGENT: &str = env!("CARGO_BIN_EXE_ste-shard-agent");

/// One agent process with its own ports and directory.
pub struct Agent {
    pub dir: TempDir,
    pub client_port: u16,
    pub peer_port: u16,
    pub admin_port: u16,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Agent {
    /// Starts `ste-shard-agent run` with the etcd built by hack/build-upstream.sh,
    /// loopback ports, fast health checks, and `extra` flags.
    pub fn start(shard: &str, extra: &[&str]) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("ste-shard-agent-test-")
            .tempdir()
            .expect("tempdir");
        let etcd = ste_testkit::etcd_binary().expect("etcd binary (run hack/build-upstream.sh)");
        let mut agent = Agent {
            client_port: free_port(),
            peer_port: free_port(),
            admin_port: free_port(),
            log: dir.path().join("agent.log"),
            dir,
            child: None,
        };
        let log = std::fs::File::create(&agent.log).expect("agent log");
        let defaults = [
            format!("--shard-name={shard}"),
            format!("--etcd-binary={}", etcd.display()),
            format!("--data-dir={}", agent.data_dir().display()),
            format!("--listen-client={}", agent.endpoint()),
            format!("--listen-peer=http://127.0.0.1:{}", agent.peer_port),
            format!("--admin-listen=127.0.0.1:{}", agent.admin_port),
            "--quota-bytes=64MiB".to_string(),
            "--health-interval=200ms".to_string(),
            "--stop-grace=5s".to_string(),
        ];
        // A flag in `extra` replaces its default.
        let overridden = |flag: &str| {
            let name = flag.split('=').next().unwrap_or(flag);
            extra.iter().any(|e| e.split('=').next() == Some(name))
        };
        let child = Command::new(AGENT)
            .arg("run")
            .args(defaults.iter().filter(|d| !overridden(d)))
            .args(extra)
            .env_remove("KUBECONFIG")
            .env_remove("NODE_NAME")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting ste-shard-agent");
        agent.child = Some(child);
        agent
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on the admin port: (status, body); (0, error) when it does not answer.
    pub async fn admin(&self, path: &str) -> (u16, String) {
        let url = format!("http://127.0.0.1:{}{path}", self.admin_port);
        match reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(response) => {
                let status = response.status().as_u16();
                (status, response.text().await.unwrap_or_default())
            }
            Err(err) => (0, err.to_string()),
        }
    }

    /// The value of a metric without labels, from /metrics.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.admin("/metrics").await;
        body.lines().find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    pub async fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let (status, body) = self.admin("/readyz").await;
            if status == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready within {within:?}: /readyz {status} {body}\nagent log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The etcd child's pid (the agent's only child process).
    pub fn etcd_pid(&self) -> Option<u32> {
        let out = Command::new("pgrep")
            .arg("-P")
            .arg(self.pid().to_string())
            .output()
            .expect("pgrep");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child process.
        unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
    }

    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .expect("running")
            .try_wait()
            .expect("try_wait")
    }

    /// Waits for the agent to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_exit() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit within {within:?}\nagent log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SIGKILL: etcd follows through PR_SET_PDEATHSIG.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether a process exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next());
            state != Some("Z") && state != Some("X")
        }
        Err(_) => false,
    }
}

/// A kubeconfig for a test kube-apiserver: its URL, its bearer token, and
/// no verification of its self-signed serving certificate.
pub fn write_kubeconfig(dir: &Path, api: &ste_testkit::Api) -> PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        r#"apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: "{url}"
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: "{token}"
contexts:
- name: test
  context:
    cluster: test
    user: admin
current-context: test
"#,
        url = api.url,
        token = api.token
    );
    std::fs::write(&path, text).expect("writing kubeconfig");
    path
}

/// Runs the agent binary to completion (for flag errors): (exit code, stderr).
pub fn run_to_end(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(AGENT)
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("NODE_NAME")
        .stdin(Stdio::null())
        .output()
        .expect("running ste-shard-agent");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
