//! Registration against a real kube-apiserver (over a real etcd): the test
//! plays the router, which owns `status.phase`.

mod common;

use std::time::Duration;

use common::{process_alive, write_kubeconfig, Agent};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, CustomResourceExt};
use serde_json::json;
use ste_shard_api::{Shard, ShardPhase};
use ste_testkit::{wait_until, Etcd, KubeApiserver};

/// Creates the Shard CRD and waits until it is Established.
async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &Shard::crd())
        .await
        .expect("creating the Shard CRD");
    wait_until(
        "the Shard CRD to be Established",
        Duration::from_secs(30),
        || async {
            crds.get("shards.ste.dev")
                .await
                .ok()
                .and_then(|crd| crd.status)
                .and_then(|s| s.conditions)
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        },
    )
    .await;
    // The resource is served (discovery can lag behind the condition).
    let shards: Api<Shard> = Api::all(client.clone());
    wait_until(
        "shards.ste.dev to be served",
        Duration::from_secs(30),
        || async { shards.list(&Default::default()).await.is_ok() },
    )
    .await;
}

async fn get(shards: &Api<Shard>, name: &str) -> Option<Shard> {
    shards.get_opt(name).await.expect("reading the Shard")
}

async fn set_phase(shards: &Api<Shard>, name: &str, phase: ShardPhase) {
    shards
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "phase": phase.as_str() } })),
        )
        .await
        .expect("setting status.phase");
}

fn heartbeat(shard: &Shard) -> Option<String> {
    shard.status.as_ref()?.heartbeat_time.clone()
}

#[tokio::test]
async fn registers_heartbeats_and_drains_on_sigterm() {
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
    install_crd(&client).await;
    let shards: Api<Shard> = Api::all(client.clone());

    // --- A drain that the router completes.
    let mut agent = Agent::start(
        "shard-a",
        &[
            &format!("--kubeconfig={}", kubeconfig.display()),
            "--node-name=node-a",
            "--heartbeat-interval=1s",
            "--drain-timeout=60s",
        ],
    );
    wait_until(
        "the Shard to be registered",
        Duration::from_secs(30),
        || async {
            get(&shards, "shard-a")
                .await
                .is_some_and(|s| heartbeat(&s).is_some())
        },
    )
    .await;
    let shard = get(&shards, "shard-a").await.expect("Shard");
    assert_eq!(shard.spec.endpoint, agent.endpoint());
    assert_eq!(shard.spec.node.as_deref(), Some("node-a"));
    assert_eq!(shard.spec.capacity_bytes, Some(64 << 20));
    assert!(!shard.spec.drain);
    let status = shard.status.clone().expect("status");
    assert_eq!(status.etcd_healthy, Some(true));
    assert_eq!(status.phase, None, "the agent never writes status.phase");
    let first = heartbeat(&shard).expect("heartbeatTime");
    first
        .parse::<k8s_openapi::jiff::Timestamp>()
        .expect("heartbeatTime is RFC 3339");
    agent.wait_ready(Duration::from_secs(10)).await;

    // The router activates it; heartbeats advance and leave the phase alone.
    set_phase(&shards, "shard-a", ShardPhase::Active).await;
    wait_until(
        "the heartbeat to advance",
        Duration::from_secs(10),
        || async {
            get(&shards, "shard-a")
                .await
                .and_then(|s| heartbeat(&s))
                .is_some_and(|t| t > first)
        },
    )
    .await;
    let shard = get(&shards, "shard-a").await.expect("Shard");
    assert_eq!(
        shard.status.and_then(|s| s.phase),
        Some(ShardPhase::Active),
        "a heartbeat keeps the router's phase"
    );
    assert!(agent.metric("ste_shard_agent_registered").await == Some(1.0));

    // SIGTERM: spec.drain=true, and the agent waits for the router.
    let etcd_pid = agent.etcd_pid().expect("etcd runs");
    agent.signal(libc::SIGTERM);
    wait_until("spec.drain=true", Duration::from_secs(10), || async {
        get(&shards, "shard-a").await.is_some_and(|s| s.spec.drain)
    })
    .await;
    assert!(
        agent.try_exit().is_none(),
        "the agent waits for Drained:\n{}",
        agent.logs()
    );
    assert!(
        process_alive(etcd_pid),
        "etcd serves while the router moves keys off"
    );
    assert_eq!(
        agent.admin("/readyz").await.0,
        503,
        "a draining shard is not ready"
    );
    set_phase(&shards, "shard-a", ShardPhase::Draining).await;
    set_phase(&shards, "shard-a", ShardPhase::Drained).await;
    let status = agent.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status}\n{}", agent.logs());
    assert!(
        get(&shards, "shard-a").await.is_none(),
        "the Shard is deleted"
    );
    assert!(!process_alive(etcd_pid), "etcd is stopped");

    // --- A drain that times out: etcd stops anyway, the Shard stays for the router to declare Lost.
    let mut agent = Agent::start(
        "shard-b",
        &[
            &format!("--kubeconfig={}", kubeconfig.display()),
            "--heartbeat-interval=1s",
            "--drain-timeout=2s",
        ],
    );
    agent.wait_ready(Duration::from_secs(30)).await;
    let etcd_pid = agent.etcd_pid().expect("etcd runs");
    agent.signal(libc::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(
        status.code(),
        Some(1),
        "a timed-out drain exits 1\n{}",
        agent.logs()
    );
    assert!(
        agent.logs().contains("did not finish within 2s"),
        "{}",
        agent.logs()
    );
    assert!(!process_alive(etcd_pid), "etcd is stopped");
    let shard = get(&shards, "shard-b").await.expect("the Shard stays");
    assert!(shard.spec.drain);
    assert_eq!(
        shard.status.and_then(|s| s.etcd_healthy),
        Some(false),
        "the last heartbeat says etcd is down"
    );

    // --- A second signal while draining: etcd is killed at once.
    let mut agent = Agent::start(
        "shard-d",
        &[
            &format!("--kubeconfig={}", kubeconfig.display()),
            "--heartbeat-interval=1s",
            "--drain-timeout=60s",
        ],
    );
    agent.wait_ready(Duration::from_secs(30)).await;
    let etcd_pid = agent.etcd_pid().expect("etcd runs");
    agent.signal(libc::SIGTERM);
    wait_until("spec.drain=true", Duration::from_secs(10), || async {
        get(&shards, "shard-d").await.is_some_and(|s| s.spec.drain)
    })
    .await;
    agent.signal(libc::SIGINT);
    let status = agent.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(1), "{}", agent.logs());
    assert!(
        agent
            .logs()
            .contains("received a second SIGINT: killing etcd now"),
        "{}",
        agent.logs()
    );
    assert!(!process_alive(etcd_pid), "etcd is killed");
    assert!(
        get(&shards, "shard-d").await.is_some(),
        "the undrained Shard stays for the router to declare Lost"
    );
}

#[tokio::test]
async fn survives_an_apiserver_outage_and_re_registers_a_deleted_shard() {
    let etcd = Etcd::start("durable").await.expect("durable etcd");
    let mut apiserver = KubeApiserver::start(&etcd.endpoint(), None)
        .await
        .expect("kube-apiserver");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = write_kubeconfig(dir.path(), &apiserver.api());
    let client =
        ste_shard_agent::registration::client(Some(kubeconfig.to_str().expect("utf-8 path")))
            .await
            .expect("kube client");
    install_crd(&client).await;
    let shards: Api<Shard> = Api::all(client.clone());

    let mut agent = Agent::start(
        "shard-c",
        &[
            &format!("--kubeconfig={}", kubeconfig.display()),
            "--heartbeat-interval=500ms",
            "--drain-timeout=30s",
        ],
    );
    agent.wait_ready(Duration::from_secs(30)).await;

    // Deleted by someone else: registered again.
    let shard = get(&shards, "shard-c").await.expect("Shard");
    shards
        .delete("shard-c", &Default::default())
        .await
        .expect("delete");
    wait_until(
        "the Shard to be registered again",
        Duration::from_secs(20),
        || async {
            get(&shards, "shard-c")
                .await
                .is_some_and(|s| s.metadata.uid != shard.metadata.uid && heartbeat(&s).is_some())
        },
    )
    .await;

    // The apiserver goes away: heartbeats fail, the agent keeps running.
    apiserver.stop();
    wait_until("failed heartbeats", Duration::from_secs(30), || async {
        let (_, metrics) = agent.admin("/metrics").await;
        metrics.contains("ste_shard_agent_heartbeats_total{result=\"failure\"}")
    })
    .await;
    assert!(
        agent.try_exit().is_none(),
        "the agent survives the outage:\n{}",
        agent.logs()
    );
    apiserver.restart().await.expect("kube-apiserver restart");
    let before = get(&shards, "shard-c")
        .await
        .and_then(|s| heartbeat(&s))
        .expect("heartbeat");
    wait_until("heartbeats to resume", Duration::from_secs(30), || async {
        get(&shards, "shard-c")
            .await
            .and_then(|s| heartbeat(&s))
            .is_some_and(|t| t > before)
    })
    .await;

    // The router drains it.
    agent.signal(libc::SIGTERM);
    wait_until("spec.drain=true", Duration::from_secs(10), || async {
        get(&shards, "shard-c").await.is_some_and(|s| s.spec.drain)
    })
    .await;
    set_phase(&shards, "shard-c", ShardPhase::Drained).await;
    let status = agent.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status}\n{}", agent.logs());
    assert!(get(&shards, "shard-c").await.is_none());
    let (_, _) = (etcd, apiserver);
}
