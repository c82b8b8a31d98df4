//! The bridge's stat tap in front of Knative's real autoscaler (hack/knative)
//! on the real local control plane (kube-apiserver, kube-controller-manager,
//! kube-scheduler, kwok): the bench's activator sends its stats to the tap,
//! the tap forwards every one to the autoscaler and scales the woken
//! revision's Deployment 0→1 itself, before the autoscaler's own patch.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use ste_bench::cluster::{self, Arm, ClusterRecord, RunningCluster, UpArgs};
use ste_bench::coldstart::{self, metric_sum, BridgeProcess, Knative, REVISION_LABEL};
use ste_bench::knative;

const BRIDGE: &str = env!("CARGO_BIN_EXE_ste-activator-bridge");

fn get(record: &ClusterRecord, path: &str) -> Value {
    let (code, body) = record.api().curl(&[path]).unwrap();
    assert_eq!(code, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Live pods of the revision bound to a node, per node.
fn bound_pods_per_node(record: &ClusterRecord, service: &str) -> Vec<(String, usize)> {
    let rev = coldstart::revision_of(service);
    let pods = get(
        record,
        &format!(
            "/api/v1/namespaces/default/pods?labelSelector={}%3D{rev}",
            REVISION_LABEL.replace('/', "%2F")
        ),
    );
    let mut per_node = std::collections::BTreeMap::<String, usize>::new();
    for p in pods["items"].as_array().unwrap() {
        if p["metadata"]["deletionTimestamp"].is_null() {
            if let Some(node) = p["spec"]["nodeName"].as_str() {
                *per_node.entry(node.to_string()).or_default() += 1;
            }
        }
    }
    per_node.into_iter().collect()
}

/// The PodAutoscaler's desiredScale: what the autoscaler's decider wants
/// (1 only once it took the activator's stat).
fn desired_scale(record: &ClusterRecord, service: &str) -> Option<i64> {
    let pa = get(
        record,
        &format!(
            "/apis/autoscaling.internal.knative.dev/v1alpha1/namespaces/default/podautoscalers/{}",
            coldstart::revision_of(service)
        ),
    );
    pa["status"]["desiredScale"].as_i64()
}

async fn metric(bridge: &BridgeProcess, series: &str) -> f64 {
    let m = bridge.metrics().await.unwrap();
    metric_sum(&m, series).max(m.get(series).copied().unwrap_or(0.0))
}

/// Waits (5 s at most) until the tap read as many stat messages as the activator sent.
async fn all_read(bridge: &BridgeProcess, activator: &knative::stats::Activator) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let read = metric(bridge, "ste_activator_bridge_tap_messages_total").await;
        let sent = activator.messages_sent() as f64;
        if read == sent {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the tap read {read} of {sent} messages"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_through_the_tap_scales_before_the_autoscaler_which_still_gets_every_stat() {
    let started = Instant::now();
    // STE_KEEP_TEST_DIR=1 keeps the cluster's and the components' logs.
    let (dir, _guard) = ste_testkit::test_dir("stat-tap-e2e-");
    let record = cluster::up(&UpArgs::plain(Arm::Stock, 2, 4, dir.clone()))
        .await
        .expect("cluster up");
    let running = RunningCluster::new(record.clone());
    let record = running.record();
    let leases = coldstart::keep_node_leases(record).unwrap();
    let logs = dir.join("logs");
    let mut knative_processes = Knative::start(record, &logs)
        .await
        .expect("Knative controller and autoscaler");
    knative::configure_autoscaler(record).await.unwrap();
    let client = ste_bench::api::client_for(record).unwrap();
    let services: Vec<String> = (0..2).map(|i| format!("tap-{i}")).collect();
    for s in &services {
        coldstart::create_service(&client, s, "100m").await.unwrap();
    }
    coldstart::wait_at_zero(&client, &services, Duration::from_secs(90))
        .await
        .expect("revisions at zero");
    knative::wait_autoscaler_quiet(record, Duration::from_secs(2), Duration::from_secs(90))
        .await
        .expect("the autoscaler done with the new revisions");

    let tap = format!("127.0.0.1:{}", ste_testkit::free_port());
    let flags = [
        "--lease-namespace=default".to_string(),
        "--mode=aggressive".into(),
        format!("--webhook-listen=127.0.0.1:{}", ste_testkit::free_port()),
        "--webhook-self-signed".into(),
        "--webhook-unregister-on-exit".into(),
        format!("--stat-tap-listen={tap}"),
        format!(
            "--stat-tap-upstream=ws://{}/",
            knative::stats::AUTOSCALER_STATS_ADDR
        ),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let bridge = BridgeProcess::start(Path::new(BRIDGE), record, &logs.join("bridge.log"), &flags)
        .await
        .expect("the bridge with its stat tap");
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&bridge, "ste_activator_bridge_leader").await < 1.0 {
        assert!(Instant::now() < deadline, "the bridge never led");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let activator = knative::connect_activator_at(&tap, Duration::from_secs(30))
        .await
        .expect("the tap passes the websocket upgrade through");

    let round = knative::wake_round(
        record,
        &activator,
        &services,
        "stock, tap",
        Duration::from_secs(120),
    )
    .await
    .expect("every revision woken through the tap");
    eprintln!("{}", knative::markdown(std::slice::from_ref(&round)));

    // The tap scaled each Deployment 0→1 (a conditional write at the version
    // where replicas was 0: the autoscaler had not patched it yet).
    let scaled = metric(
        &bridge,
        "ste_activator_bridge_tap_wakes_total{result=\"scaled\"}",
    )
    .await;
    assert_eq!(
        scaled,
        services.len() as f64,
        "{:?}",
        bridge.metrics().await.unwrap()
    );

    // The autoscaler took the stats: its decider wants 1 replica for each,
    // and no Deployment went back to 0 under the tap's feet.
    let deadline = Instant::now() + Duration::from_secs(30);
    for s in &services {
        while desired_scale(record, s) != Some(1) {
            assert!(
                Instant::now() < deadline,
                "{s}: the autoscaler never wanted 1 replica"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert_eq!(
        metric(&bridge, "ste_activator_bridge_tap_reverts_total").await,
        0.0
    );
    // No pod duplicated onto a node: one bound pod per revision.
    for s in &services {
        let bound = bound_pods_per_node(record, s);
        assert_eq!(
            bound.iter().map(|(_, n)| n).sum::<usize>(),
            1,
            "{s}: {bound:?}"
        );
    }
    // The bridge acted once per wake (from the tap's own 0→1, the watch's
    // later 0→1 skipped): at most one pod created per revision (none where
    // the ReplicaSet controller was first).
    let created: f64 = bridge
        .metrics()
        .await
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("ste_activator_bridge_pods_created_total"))
        .map(|(_, v)| v)
        .sum();
    assert!(
        created >= 1.0 && created <= services.len() as f64,
        "{created} pods created for {} revisions",
        services.len()
    );
    // Every message the activator sent went through the tap.
    all_read(&bridge, &activator).await;

    // No more requests: the autoscaler scales them back to zero by itself,
    // from the stats it still receives through the tap.
    knative::back_to_zero(record, &activator, &services, Duration::from_secs(120))
        .await
        .expect("the autoscaler took the revisions back to zero");
    all_read(&bridge, &activator).await;
    assert_eq!(
        metric(&bridge, "ste_activator_bridge_tap_reverts_total").await,
        0.0
    );
    activator.stop();
    bridge.stop();
    knative_processes
        .check()
        .expect("Knative's components still running");
    leases.abort();
    eprintln!("test took {:?}", started.elapsed());
}
