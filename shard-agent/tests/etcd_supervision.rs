//! The agent runs a real etcd, restarts it after a crash with its data, and
//! takes it down with itself.

mod common;

use std::time::Duration;

use common::{process_alive, Agent};
use ste_etcd_proto::pb::{kv_client::KvClient, PutRequest, RangeRequest};
use ste_testkit::wait_until;
use tonic::transport::Channel;

async fn kv(endpoint: &str) -> KvClient<Channel> {
    let channel = Channel::from_shared(endpoint.to_string())
        .expect("url")
        .connect()
        .await
        .expect("connect to the shard");
    KvClient::new(channel)
}

async fn get(endpoint: &str, key: &str) -> Option<Vec<u8>> {
    let mut client = kv(endpoint).await;
    let response = client
        .range(RangeRequest {
            key: key.as_bytes().to_vec().into(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    response.kvs.first().map(|kv| kv.value.to_vec())
}

#[tokio::test]
async fn etcd_is_served_restarted_after_a_crash_with_its_data_and_stopped_on_sigterm() {
    let mut agent = Agent::start("shard-a", &["--no-register", "--unhealthy-after=10s"]);
    agent.wait_ready(Duration::from_secs(30)).await;
    assert_eq!(agent.admin("/livez").await.0, 200);
    assert_eq!(agent.metric("ste_shard_agent_etcd_up").await, Some(1.0));
    assert_eq!(
        agent.metric("ste_shard_agent_etcd_restarts_total").await,
        Some(0.0)
    );

    // The shard serves KV.
    kv(&agent.endpoint())
        .await
        .put(PutRequest {
            key: b"/registry/pods/default/a".to_vec().into(),
            value: b"pod-a".to_vec().into(),
            ..Default::default()
        })
        .await
        .expect("put");
    assert_eq!(
        get(&agent.endpoint(), "/registry/pods/default/a")
            .await
            .as_deref(),
        Some(&b"pod-a"[..])
    );

    // kill -9 of etcd: the agent notices, restarts it on the same data.
    let first = agent.etcd_pid().expect("etcd runs as the agent's child");
    // SAFETY: kill(2) on the etcd child of our agent.
    unsafe { libc::kill(first as libc::pid_t, libc::SIGKILL) };
    wait_until(
        "the agent to report etcd down",
        Duration::from_secs(10),
        || async { agent.admin("/readyz").await.0 == 503 },
    )
    .await;
    wait_until(
        "etcd to be restarted (a new pid)",
        Duration::from_secs(30),
        || async { agent.etcd_pid().is_some_and(|pid| pid != first) },
    )
    .await;
    agent.wait_ready(Duration::from_secs(30)).await;
    assert_eq!(
        agent.metric("ste_shard_agent_etcd_restarts_total").await,
        Some(1.0)
    );
    assert_eq!(
        get(&agent.endpoint(), "/registry/pods/default/a")
            .await
            .as_deref(),
        Some(&b"pod-a"[..]),
        "the data directory survives an etcd restart"
    );
    let logs = agent.logs();
    assert!(
        logs.contains("etcd exited (killed by signal 9)"),
        "the exit is logged:\n{logs}"
    );
    assert!(
        logs.contains("Last lines of"),
        "etcd's log tail is logged:\n{logs}"
    );

    // SIGTERM without registration: etcd stops, the agent exits 0.
    let second = agent.etcd_pid().expect("etcd runs");
    agent.signal(libc::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status}\n{}", agent.logs());
    assert!(!process_alive(second), "etcd stopped with the agent");
    assert!(
        agent.data_dir().join("member").is_dir(),
        "the data directory is kept"
    );
}

#[tokio::test]
async fn etcd_dies_with_a_killed_agent() {
    let mut agent = Agent::start("shard-b", &["--no-register"]);
    agent.wait_ready(Duration::from_secs(30)).await;
    let etcd = agent.etcd_pid().expect("etcd runs");
    agent.signal(libc::SIGKILL);
    agent.wait_exit(Duration::from_secs(10)).await;
    wait_until(
        "etcd to die with its agent (PR_SET_PDEATHSIG)",
        Duration::from_secs(10),
        || async { !process_alive(etcd) },
    )
    .await;
}

#[tokio::test]
async fn an_etcd_that_cannot_start_is_retried_with_backoff() {
    // The peer port is taken: etcd exits at once, every time.
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = blocker.local_addr().expect("addr").port();
    let agent = Agent::start(
        "shard-c",
        &[
            "--no-register",
            &format!("--listen-peer=http://127.0.0.1:{port}"),
        ],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !agent
        .metric("ste_shard_agent_etcd_restarts_total")
        .await
        .is_some_and(|n| n >= 2.0)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no two restarts within 30s:\n{}",
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(agent.admin("/readyz").await.0, 503);
    assert_eq!(
        agent.admin("/livez").await.0,
        200,
        "the agent itself is alive"
    );
    let logs = agent.logs();
    assert!(logs.contains("restarting etcd in 1s"), "{logs}");
    assert!(
        logs.contains("restarting etcd in 2s"),
        "backoff doubles:\n{logs}"
    );
    assert!(
        logs.contains("address already in use"),
        "etcd's own error is in the log tail:\n{logs}"
    );
}

#[tokio::test]
async fn an_etcd_that_stops_answering_is_restarted() {
    let agent = Agent::start(
        "shard-d",
        &[
            "--no-register",
            "--unhealthy-after=2s",
            "--stop-grace=1s",
            "--etcd-arg=--log-level=debug",
        ],
    );
    agent.wait_ready(Duration::from_secs(30)).await;
    assert!(
        agent
            .logs()
            .contains("--auto-compaction-retention=0 --log-level=debug"),
        "--etcd-arg comes last:\n{}",
        agent.logs()
    );
    let frozen = agent.etcd_pid().expect("etcd runs");
    // SAFETY: kill(2) on the etcd child of our agent.
    unsafe { libc::kill(frozen as libc::pid_t, libc::SIGSTOP) };
    wait_until(
        "etcd to be replaced after 2s without a healthy check",
        Duration::from_secs(30),
        || async { agent.etcd_pid().is_some_and(|pid| pid != frozen) },
    )
    .await;
    agent.wait_ready(Duration::from_secs(30)).await;
    assert_eq!(
        agent.metric("ste_shard_agent_etcd_restarts_total").await,
        Some(1.0)
    );
    assert!(agent
        .metric("ste_shard_agent_health_check_failures_total")
        .await
        .is_some_and(|n| n >= 1.0));
    let logs = agent.logs();
    assert!(logs.contains("etcd has not been healthy for"), "{logs}");
    assert!(
        logs.contains("did not stop within the grace period: SIGKILL"),
        "{logs}"
    );
    assert!(!process_alive(frozen), "the frozen etcd was killed");
}

#[tokio::test]
async fn with_tls_the_shard_refuses_clients_without_a_certificate() {
    let certs = tempfile::tempdir().expect("tempdir");
    let script = ste_testkit::repo_root().join("hack/gen-certs.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg(certs.path())
        .output()
        .expect("gen-certs.sh");
    assert!(
        out.status.success(),
        "gen-certs.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = |name: &str| certs.path().join(name).display().to_string();
    let port = ste_testkit::free_port();
    let url = format!("https://127.0.0.1:{port}");
    let agent = Agent::start(
        "shard-tls",
        &[
            "--no-register",
            &format!("--listen-client={url}"),
            &format!("--cert-file={}", file("shard-server.crt")),
            &format!("--key-file={}", file("shard-server.key")),
            &format!("--trusted-ca-file={}", file("ca.crt")),
            &format!("--client-cert-file={}", file("shard-agent-client.crt")),
            &format!("--client-key-file={}", file("shard-agent-client.key")),
        ],
    );
    // Ready means the agent's own mTLS health checks pass.
    agent.wait_ready(Duration::from_secs(30)).await;
    let curl = |extra: &[String]| {
        std::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert", &file("ca.crt")])
            .args(extra)
            .arg(format!("{url}/health"))
            .output()
            .expect("curl")
    };
    let without = curl(&[]);
    assert!(
        !String::from_utf8_lossy(&without.stdout).contains("\"health\":\"true\""),
        "a client without a certificate is refused: {}",
        String::from_utf8_lossy(&without.stdout)
    );
    let with = curl(&[
        "--cert".into(),
        file("shard-agent-client.crt"),
        "--key".into(),
        file("shard-agent-client.key"),
    ]);
    assert!(
        String::from_utf8_lossy(&with.stdout).contains("\"health\":\"true\""),
        "a client with a certificate from the CA is served: {} {}",
        String::from_utf8_lossy(&with.stdout),
        String::from_utf8_lossy(&with.stderr)
    );
}

#[tokio::test]
async fn a_full_shard_is_not_restarted() {
    let agent = Agent::start(
        "shard-full",
        &[
            "--no-register",
            "--quota-bytes=1MiB",
            "--unhealthy-after=1s",
        ],
    );
    agent.wait_ready(Duration::from_secs(30)).await;
    let mut client = kv(&agent.endpoint()).await;
    let value = vec![b'x'; 64 << 10];
    let mut filled = false;
    // etcd measures its size at backend commits (every 100ms): pace the puts.
    for i in 0..256 {
        let put = PutRequest {
            key: format!("/registry/pods/default/p{i}").into_bytes().into(),
            value: value.clone().into(),
            ..Default::default()
        };
        if let Err(status) = client.put(put).await {
            assert!(
                status.message().contains("database space exceeded"),
                "{status}"
            );
            filled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        filled,
        "a 1 MiB quota is exceeded by 16 MiB of values\n{}",
        agent.logs()
    );
    // Ten health checks after the NOSPACE alarm, longer than --unhealthy-after: no restart.
    let checks = agent
        .metric("ste_shard_agent_health_checks_total")
        .await
        .expect("health_checks_total");
    wait_until(
        "ten more health checks",
        Duration::from_secs(20),
        || async {
            agent
                .metric("ste_shard_agent_health_checks_total")
                .await
                .is_some_and(|n| n >= checks + 10.0)
        },
    )
    .await;
    assert_eq!(
        agent.metric("ste_shard_agent_etcd_restarts_total").await,
        Some(0.0),
        "{}",
        agent.logs()
    );
    assert_eq!(agent.admin("/readyz").await.0, 200);
    assert_eq!(
        get(&agent.endpoint(), "/registry/pods/default/p0")
            .await
            .map(|v| v.len()),
        Some(64 << 10),
        "a full shard still serves reads"
    );
}

/// `--listen-client-unix`: etcd also serves on a Unix socket, and a router
/// on the same host reaches the shard there (`unix:///…` shard endpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_on_the_same_host_reaches_the_shard_on_its_unix_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("etcd.sock");
    let agent = Agent::start(
        "shard-unix",
        &[
            "--no-register",
            &format!("--listen-client-unix={}", socket.display()),
        ],
    );
    agent.wait_ready(Duration::from_secs(30)).await;
    assert!(socket.exists(), "etcd serves on {}", socket.display());
    let spec = ste_router::ShardSpec::parse(&format!("shard-unix=unix://{}", socket.display()))
        .expect("a unix:// shard endpoint");
    let router = ste_testkit::Router::start(vec![spec])
        .await
        .expect("router over the socket");
    let mut client = KvClient::new(router.channel().await.expect("router channel"));
    client
        .put(PutRequest {
            key: "/registry/pods/default/a".as_bytes().to_vec().into(),
            value: "over the socket".as_bytes().to_vec().into(),
            ..Default::default()
        })
        .await
        .expect("put through the router");
    // The shard holds it (read over its TCP URL; the router's envelope wraps the value).
    let stored = get(&agent.endpoint(), "/registry/pods/default/a")
        .await
        .expect("the shard has the key");
    assert!(stored.ends_with(b"over the socket"));
    router.stop().await.expect("router stops");
}

/// GOMAXPROCS in the environment of the agent's etcd child, if any.
fn etcd_gomaxprocs(agent: &Agent) -> Option<String> {
    let pid = agent.etcd_pid().expect("etcd runs as the agent's child");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("etcd's environment");
    environ
        .split(|b| *b == 0)
        .filter_map(|var| std::str::from_utf8(var).ok())
        .find_map(|var| var.strip_prefix("GOMAXPROCS=").map(str::to_string))
}

#[tokio::test]
async fn etcd_runs_on_one_core_unless_told_otherwise() {
    let mut agent = Agent::start("shard-procs", &["--no-register"]);
    agent.wait_ready(Duration::from_secs(30)).await;
    assert_eq!(etcd_gomaxprocs(&agent).as_deref(), Some("1"));
    agent.signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(20)).await.success());

    // 0: the agent leaves etcd's GOMAXPROCS to Go (and to its own environment).
    let mut agent = Agent::start("shard-procs-all", &["--no-register", "--etcd-gomaxprocs=0"]);
    agent.wait_ready(Duration::from_secs(30)).await;
    assert_eq!(etcd_gomaxprocs(&agent), std::env::var("GOMAXPROCS").ok());
    agent.signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(20)).await.success());
}
