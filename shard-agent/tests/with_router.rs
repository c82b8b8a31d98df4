//! The real agent with the real router: two `ste-shard-agent` processes
//! register `Shard`s in a real kube-apiserver (over a real etcd), and a
//! router started in this process watches them (`membership.kube`), with one
//! static bootstrap shard. Clients write and watch through the router all
//! along; the router's contents, its watch stream, the shards' own contents
//! and the record of acknowledged writes must agree after every change:
//! - both shards join (members, keys moved to them, `status.phase: Active`);
//! - SIGTERM to one agent: the router drains it without a failed write or an
//!   event nobody wrote, the agent exits 0 and deletes its Shard;
//! - kill -9 of the other (its etcd dies with it): declared Lost, DELETE
//!   events for exactly its keys, `status.phase: Lost`;
//! - with `replication_factor = 2` the same kill loses nothing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use common::{process_alive, write_kubeconfig, Agent};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::PostParams;
use kube::{Api, Client, CustomResourceExt};
use ste_etcd_proto::pb::kv_client::KvClient;
use ste_shard_api::{Shard, ShardPhase};
use ste_testkit::workload::{
    current_revision, keys_at, placement, wait_no_copies, Event, Workload,
};
use ste_testkit::{shard_specs, start_shards, wait_until, Etcd, KubeApiserver, Router};

struct ControlPlane {
    _etcd: Etcd,
    _apiserver: KubeApiserver,
    dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
    client: Client,
}

async fn control_plane() -> ControlPlane {
    // STE_TEST_LOG=ste_router=debug shows the router's side when a test fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("STE_TEST_LOG"))
        .with_test_writer()
        .try_init();
    let etcd = Etcd::start("durable").await.expect("durable etcd");
    let apiserver = KubeApiserver::start(&etcd.endpoint(), None)
        .await
        .expect("kube-apiserver");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = write_kubeconfig(dir.path(), &apiserver.api());
    let client =
        ste_shard_agent::registration::client(Some(kubeconfig.to_str().expect("utf-8 path")))
            .await
            .expect("kube client");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &Shard::crd())
        .await
        .expect("creating the Shard CRD");
    let shards: Api<Shard> = Api::all(client.clone());
    wait_until(
        "shards.ste.dev to be served",
        Duration::from_secs(30),
        || async { shards.list(&Default::default()).await.is_ok() },
    )
    .await;
    ControlPlane {
        _etcd: etcd,
        _apiserver: apiserver,
        dir,
        kubeconfig,
        client,
    }
}

/// A router watching Shard registrations, with fast membership decisions.
async fn router(bootstrap: &[Etcd], client: &Client, replication_factor: u8) -> Router {
    let mut config = Router::test_config(shard_specs(bootstrap));
    config.store.replication_factor = replication_factor;
    config.membership.kube = Some(client.clone());
    config.membership.interval = Duration::from_millis(200);
    config.membership.lost_after = Duration::from_secs(3);
    config.maintain_interval = Duration::from_millis(200);
    Router::start_with(config).await.expect("router")
}

fn agent(name: &str, plane: &ControlPlane) -> Agent {
    Agent::start(
        name,
        &[
            &format!("--kubeconfig={}", plane.kubeconfig.display()),
            &format!("--node-name=node-{name}"),
            "--heartbeat-interval=1s",
            "--drain-timeout=60s",
        ],
    )
}

async fn shard_object(client: &Client, name: &str) -> Option<Shard> {
    Api::<Shard>::all(client.clone())
        .get_opt(name)
        .await
        .expect("reading the Shard")
}

async fn phase(client: &Client, name: &str) -> Option<ShardPhase> {
    shard_object(client, name)
        .await
        .and_then(|s| s.status)
        .and_then(|s| s.phase)
}

/// Waits for `status.phase: Lost`, showing the Shard when it does not come.
async fn wait_lost(client: &Client, name: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while phase(client, name).await != Some(ShardPhase::Lost) {
        let shard = shard_object(client, name).await;
        assert!(
            std::time::Instant::now() < deadline,
            "{name} not reported Lost within 20s: {:?}",
            shard.map(|s| s.status)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn http(addr: std::net::SocketAddr, path: &str) -> String {
    let response = reqwest::get(format!("http://{addr}{path}"))
        .await
        .expect("admin request");
    assert_eq!(response.status().as_u16(), 200, "GET {path}");
    response.text().await.expect("admin body")
}

/// Names of the router's members (GET /shards).
/// Waits until the router's members are `want`, showing the members and the
/// agents' Shards (spec and status) when they do not come.
async fn wait_members(router: &Router, client: &Client, want: &BTreeSet<String>, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let have = members(router).await;
        if &have == want {
            return;
        }
        if std::time::Instant::now() > deadline {
            let shards = Api::<Shard>::all(client.clone())
                .list(&Default::default())
                .await
                .map(|l| l.items);
            panic!("the router's members are {have:?}, not {want:?}, after {within:?}; Shards: {shards:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn members(router: &Router) -> BTreeSet<String> {
    let body: serde_json::Value =
        serde_json::from_str(&http(router.admin_addr, "/shards").await).expect("/shards JSON");
    body["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .map(|s| s["name"].as_str().expect("name").to_string())
        .collect()
}

async fn metric(router: &Router, name: &str) -> f64 {
    http(router.admin_addr, "/metrics")
        .await
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Waits until no key is on two shards (copies left by interrupted moves
/// are deleted), checks that every key is where the ring of `members`
/// (name, endpoint) places it, and returns that placement.
async fn settled_placement(members: &[(&str, String)]) -> impl Fn(&[u8]) -> String {
    let contents =
        wait_no_copies(&members.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>()).await;
    let by_name: BTreeMap<&str, BTreeSet<Bytes>> = members
        .iter()
        .map(|(name, endpoint)| (*name, contents[endpoint].clone()))
        .collect();
    let names: Vec<&str> = members.iter().map(|(name, _)| *name).collect();
    placement(&names, &by_name)
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_join_drain_on_sigterm_and_are_declared_lost_after_kill() {
    let plane = control_plane().await;
    let bootstrap = start_shards(1).await.expect("bootstrap shard");
    let router = router(&bootstrap, &plane.client, 1).await;
    let channel = router.channel().await.expect("router channel");
    let mut kv = KvClient::new(channel.clone());
    let workload = Workload::start(channel.clone(), 100).await;
    workload.run_for(100).await;

    // (a) Both agents register; the router takes their shards in.
    let mut a = agent("agent-a", &plane);
    let mut b = agent("agent-b", &plane);
    let all: BTreeSet<String> = ["shard-0", "agent-a", "agent-b"].map(String::from).into();
    wait_until(
        "both agents' shards to join and keys to settle",
        Duration::from_secs(60),
        || async {
            members(&router).await == all && metric(&router, "ste_router_keys_to_move").await == 0.0
        },
    )
    .await;
    for name in ["agent-a", "agent-b"] {
        wait_until("status.phase: Active", Duration::from_secs(20), || async {
            phase(&plane.client, name).await == Some(ShardPhase::Active)
        })
        .await;
    }
    workload.run_for(200).await;
    assert!(
        !keys_at(&a.endpoint()).await.is_empty(),
        "agent-a's shard got no keys"
    );
    assert!(
        !keys_at(&b.endpoint()).await.is_empty(),
        "agent-b's shard got no keys"
    );
    assert!(metric(&router, "ste_router_keys_moved_total").await > 0.0);
    assert!(
        workload.failed().await.is_empty(),
        "writes failed during the joins: {:?}",
        workload.failed().await
    );

    // (b) SIGTERM: spec.drain, the router moves every key off, Drained, exit 0.
    let a_etcd = a.etcd_pid().expect("agent-a's etcd");
    a.signal(libc::SIGTERM);
    let status = a.wait_exit(Duration::from_secs(60)).await;
    assert!(
        status.success(),
        "agent-a exited with {status}\n{}",
        a.logs()
    );
    assert!(
        shard_object(&plane.client, "agent-a").await.is_none(),
        "agent-a's Shard is deleted"
    );
    assert!(!process_alive(a_etcd), "agent-a's etcd stopped");
    assert!(!members(&router).await.contains("agent-a"));
    let drained_at = current_revision(&mut kv).await;
    workload.run_for(200).await;
    assert!(
        workload.failed().await.is_empty(),
        "writes failed during the drain: {:?}",
        workload.failed().await
    );

    // (c) kill -9: etcd dies with the agent; the shard is declared Lost.
    wait_until("keys to settle", Duration::from_secs(30), || async {
        metric(&router, "ste_router_keys_to_move").await == 0.0
    })
    .await;
    let b_etcd = b.etcd_pid().expect("agent-b's etcd");
    // Which keys agent-b holds when it dies: the ring's placement, checked
    // first against both shards' contents (once no copy an interrupted move
    // left is still on two shards).
    let placed = settled_placement(&[
        ("shard-0", bootstrap[0].endpoint()),
        ("agent-b", b.endpoint()),
    ])
    .await;
    let on_b = |key: &[u8]| placed(key) == "agent-b";
    let before_kill = current_revision(&mut kv).await;
    b.signal(libc::SIGKILL);
    b.wait_exit(Duration::from_secs(10)).await;
    wait_until(
        "agent-b's etcd to die with it (PDEATHSIG)",
        Duration::from_secs(10),
        || async { !process_alive(b_etcd) },
    )
    .await;
    wait_until(
        "agent-b's shard to be declared lost",
        Duration::from_secs(30),
        || async { !members(&router).await.contains("agent-b") },
    )
    .await;
    wait_lost(&plane.client, "agent-b").await;
    let message = shard_object(&plane.client, "agent-b")
        .await
        .and_then(|s| s.status)
        .and_then(|s| s.message);
    workload.run_for(200).await;
    let mut outcome = workload.finish(&mut kv).await;

    let acked_at: BTreeSet<(i64, Bytes)> = outcome
        .acked
        .iter()
        .map(|a| (a.revision, a.key.clone()))
        .collect();
    let first_lost = outcome
        .events
        .iter()
        .find(|e| {
            e.revision > before_kill
                && e.value.is_none()
                && on_b(&e.key)
                && !acked_at.contains(&(e.revision, e.key.clone()))
        })
        .expect("the lost shard's keys got no DELETE events")
        .clone();
    let lost_revision = first_lost.revision;
    assert!(
        lost_revision > drained_at,
        "an unwritten event before the kill: {first_lost:?}"
    );
    // The one excuse besides writes of unknown outcome (checked by value):
    // agent-b's keys are deleted, all at one revision.
    let lost = |e: &Event| e.value.is_none() && e.revision == lost_revision && on_b(&e.key);
    outcome
        .check(&mut kv, &[bootstrap[0].endpoint()], lost)
        .await;
    // Exactly the keys agent-b held then were deleted then.
    let held: BTreeSet<Bytes> = outcome
        .history(lost)
        .state_at(lost_revision - 1)
        .into_keys()
        .filter(|k| on_b(k))
        .collect();
    let deleted: BTreeSet<Bytes> = outcome
        .events
        .iter()
        .filter(|e| e.revision == lost_revision)
        .map(|e| e.key.clone())
        .collect();
    assert_eq!(
        deleted, held,
        "the events at {lost_revision} are not exactly the DELETEs of agent-b's keys"
    );
    assert_eq!(
        metric(&router, "ste_router_keys_lost_total").await,
        deleted.len() as f64
    );
    assert!(
        message.is_some_and(|m| !m.is_empty()),
        "the Lost status says why"
    );
    router.stop().await.expect("router stop");
    drop(plane.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replication_a_killed_agent_loses_nothing() {
    let plane = control_plane().await;
    let bootstrap = start_shards(1).await.expect("bootstrap shard");
    let router = router(&bootstrap, &plane.client, 2).await;
    let channel = router.channel().await.expect("router channel");
    let mut kv = KvClient::new(channel.clone());
    let a = agent("agent-a", &plane);
    let mut b = agent("agent-b", &plane);
    let all: BTreeSet<String> = ["shard-0", "agent-a", "agent-b"].map(String::from).into();
    wait_members(&router, &plane.client, &all, Duration::from_secs(60)).await;
    let workload = Workload::start(channel.clone(), 100).await;
    workload.run_for(200).await;
    wait_until(
        "keys placed and every key replicated",
        Duration::from_secs(60),
        || async {
            metric(&router, "ste_router_keys_to_move").await == 0.0
                && metric(&router, "ste_router_keys_under_replicated").await == 0.0
        },
    )
    .await;
    for name in ["agent-a", "agent-b"] {
        assert_eq!(
            phase(&plane.client, name).await,
            Some(ShardPhase::Active),
            "{name}"
        );
    }
    let placed = settled_placement(&[
        ("shard-0", bootstrap[0].endpoint()),
        ("agent-a", a.endpoint()),
        ("agent-b", b.endpoint()),
    ])
    .await;
    let killed_at = current_revision(&mut kv).await;

    let b_etcd = b.etcd_pid().expect("agent-b's etcd");
    b.signal(libc::SIGKILL);
    b.wait_exit(Duration::from_secs(10)).await;
    wait_until(
        "agent-b's etcd to die with it",
        Duration::from_secs(10),
        || async { !process_alive(b_etcd) },
    )
    .await;
    wait_until(
        "agent-b's shard to be declared lost",
        Duration::from_secs(30),
        || async { !members(&router).await.contains("agent-b") },
    )
    .await;
    wait_lost(&plane.client, "agent-b").await;
    workload.run_for(200).await;
    let mut outcome = workload.finish(&mut kv).await;
    // No excuse: no DELETE for agent-b's keys, and the only events nobody
    // acknowledged are the very writes whose outcome the client did not
    // learn. The restored keys keep their revisions and version.
    let state = outcome
        .check(&mut kv, &[bootstrap[0].endpoint(), a.endpoint()], |_| false)
        .await;
    // Keys on agent-b at the kill that no write touched since were restored
    // from their copies, unchanged.
    let survivors = outcome.untouched_since(killed_at, |k| placed(k) == "agent-b");
    assert!(
        !survivors.is_empty(),
        "no key of agent-b was left untouched"
    );
    for (key, then) in &survivors {
        assert_eq!(state.get(key), Some(then), "{key:?} from agent-b");
    }
    let survivors = survivors.len();
    assert_eq!(metric(&router, "ste_router_keys_lost_total").await, 0.0);
    let restored = metric(&router, "ste_router_keys_restored_total").await;
    assert!(
        restored >= survivors as f64,
        "restored {restored}, survivors {survivors}"
    );
    wait_until(
        "every key replicated again",
        Duration::from_secs(30),
        || async { metric(&router, "ste_router_keys_under_replicated").await == 0.0 },
    )
    .await;
    assert!(!keys_at(&a.endpoint()).await.is_empty());
    router.stop().await.expect("router stop");
}
