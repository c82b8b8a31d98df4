//! ste-activator-bridge against Knative Serving's real controller and
//! autoscaler (hack/knative, built by hack/build-upstream.sh) on the real
//! local control plane (kube-apiserver, kube-controller-manager,
//! kube-scheduler, kwok). Knative Services are created at zero and woken by
//! the autoscaler's own scale patch; see docs/activator-bridge.md for what
//! does not run here and why.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use ste_bench::cluster::{self, Arm, ClusterRecord, RunningCluster, UpArgs};
use ste_bench::coldstart::{
    self, metric_sum, BridgeProcess, Knative, BRIDGE_ANNOTATION, REVISION_LABEL,
};

const BRIDGE: &str = env!("CARGO_BIN_EXE_ste-activator-bridge");

fn get(record: &ClusterRecord, path: &str) -> Value {
    let (code, body) = record.api().curl(&[path]).unwrap();
    assert_eq!(code, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn node_names(record: &ClusterRecord) -> BTreeSet<String> {
    get(record, "/api/v1/nodes")["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

/// Pods of a revision that are not being deleted.
fn revision_pods(record: &ClusterRecord, service: &str) -> Vec<Value> {
    let rev = coldstart::revision_of(service);
    get(
        record,
        &format!(
            "/api/v1/namespaces/default/pods?labelSelector={}%3D{rev}",
            REVISION_LABEL.replace('/', "%2F")
        ),
    )["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .cloned()
        .collect()
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn by_bridge(pod: &Value) -> bool {
    pod["metadata"]["annotations"][BRIDGE_ANNOTATION] == "true"
}

/// The revision's ReplicaSet (Knative's Deployment has exactly one).
fn replicaset(record: &ClusterRecord, service: &str) -> Value {
    let rev = coldstart::revision_of(service);
    let list = get(
        record,
        &format!(
            "/apis/apps/v1/namespaces/default/replicasets?labelSelector={}%3D{rev}",
            REVISION_LABEL.replace('/', "%2F")
        ),
    );
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{service}: one ReplicaSet expected: {list}");
    items[0].clone()
}

/// Waits until the revision has exactly `want` live pods, all bound to a
/// real node, Ready and controlled by its ReplicaSet, and stays so for
/// `hold` (no extra pod survives). Returns the pods.
async fn converged(
    record: &ClusterRecord,
    service: &str,
    want: usize,
    hold: Duration,
    within: Duration,
) -> Vec<Value> {
    let nodes = node_names(record);
    let rs = replicaset(record, service);
    let rs_uid = rs["metadata"]["uid"].as_str().unwrap().to_string();
    let deadline = Instant::now() + within;
    let mut stable_since: Option<Instant> = None;
    loop {
        let pods = revision_pods(record, service);
        let good = pods.len() == want
            && pods.iter().all(|p| {
                let owner_ok = p["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|o| {
                        o.iter().any(|o| {
                            o["uid"] == rs_uid.as_str()
                                && o["controller"] == true
                                && o["kind"] == "ReplicaSet"
                        })
                    });
                let node_ok = p["spec"]["nodeName"]
                    .as_str()
                    .is_some_and(|n| nodes.contains(n));
                owner_ok && node_ok && is_ready(p) && p["status"]["phase"] == "Running"
            });
        if good {
            let since = *stable_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= hold {
                let rs = replicaset(record, service);
                assert_eq!(
                    rs["status"]["replicas"], want as u64,
                    "{service}: ReplicaSet status counts the pods: {}",
                    rs["status"]
                );
                assert_eq!(
                    rs["status"]["readyReplicas"], want as u64,
                    "{service}: {}",
                    rs["status"]
                );
                return pods;
            }
        } else {
            stable_since = None;
        }
        if Instant::now() > deadline {
            // Each pod as listed (watch cache) and as read back by name, to tell a
            // pod that never got Ready from a cache that missed its update.
            let summary: Vec<String> = pods
                .iter()
                .map(|p| {
                    let name = p["metadata"]["name"].as_str().unwrap_or_default();
                    let direct = get(record, &format!("/api/v1/namespaces/default/pods/{name}"));
                    format!(
                        "{name} node={} ready={} bridge={} rv={} | read by name: ready={} rv={} phase={}",
                        p["spec"]["nodeName"],
                        is_ready(p),
                        by_bridge(p),
                        p["metadata"]["resourceVersion"],
                        is_ready(&direct),
                        direct["metadata"]["resourceVersion"],
                        direct["status"]["phase"]
                    )
                })
                .collect();
            panic!("{service}: wanted {want} Ready pods owned by its ReplicaSet for {hold:?}, have {summary:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_metric(
    bridge: &BridgeProcess,
    series: &str,
    at_least: f64,
    within: Duration,
) -> HashMap<String, f64> {
    let deadline = Instant::now() + within;
    loop {
        let m = bridge.metrics().await.unwrap();
        if metric_sum(&m, series) >= at_least || m.get(series).copied().unwrap_or(0.0) >= at_least {
            return m.into_iter().collect();
        }
        assert!(
            Instant::now() < deadline,
            "{series} did not reach {at_least} within {within:?}: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn up_args(arm: Arm, dir: &Path) -> UpArgs {
    UpArgs {
        arm,
        shards: 2,
        nodes: 4,
        events_to_ste: false,
        client_qps: None,
        fsync_delay: None,
        apiserver_env: Vec::new(),
        apiserver_bin: None,
        audit: false,
        dir: dir.to_path_buf(),
    }
}

/// The whole story on one cluster: a leader and a standby bridge; revisions
/// woken 0→1 (five) and 0→3 at once converge with the bridge's pods adopted, bound, Ready
/// and spread, and no duplicate surviving; the standby never acts; a
/// revision no node can hold is left to the scheduler; after a failover
/// the standby (aggressive mode) wakes a revision; with the bridge
/// stopped the same wake converges the same way through the normal path.
async fn bridge_story(arm: Arm) {
    // STE_KEEP_TEST_DIR=1 keeps the cluster's and the components' logs.
    let (dir, _guard) = ste_testkit::test_dir(&format!("bridge-e2e-{arm:?}-"));
    let record = cluster::up(&up_args(arm, &dir)).await.expect("cluster up");
    let running = RunningCluster::new(record.clone());
    let record = running.record();
    let leases = coldstart::keep_node_leases(record).unwrap();
    let logs = dir.join("logs");
    let mut knative = Knative::start(record, &logs)
        .await
        .expect("Knative controller and autoscaler");
    let http = ste_bench::api::client_for(record).unwrap();

    let ones = ["one-0", "one-1", "one-2", "one-3", "one-4"];
    let services = [
        "one-0", "one-1", "one-2", "one-3", "one-4", "three", "huge", "agg", "plain",
    ];
    for s in services {
        // "huge" asks for more CPU than any kwok node has (32).
        let cpu = if s == "huge" { "64" } else { "100m" };
        coldstart::create_service(&http, s, cpu).await.unwrap();
    }
    let all: Vec<String> = services.iter().map(|s| s.to_string()).collect();
    coldstart::wait_at_zero(&http, &all, Duration::from_secs(60))
        .await
        .expect("revisions at zero");

    let fast = [
        "--lease-namespace=default",
        "--lease-duration=3s",
        "--renew-deadline=2s",
        "--retry-period=250ms",
        "--settle=3s",
    ];
    let leader = BridgeProcess::start(Path::new(BRIDGE), record, &logs.join("bridge-a.log"), &fast)
        .await
        .unwrap();
    wait_metric(
        &leader,
        "ste_activator_bridge_leader",
        1.0,
        Duration::from_secs(10),
    )
    .await;
    // The standby runs in aggressive mode, exercised after the failover.
    let aggressive: Vec<&str> = fast.iter().copied().chain(["--mode=aggressive"]).collect();
    let mut standby = BridgeProcess::start(
        Path::new(BRIDGE),
        record,
        &logs.join("bridge-b.log"),
        &aggressive,
    )
    .await
    .unwrap();

    // Wake five revisions to 1 and "three" to 3 at once, as the autoscaler does.
    let wakes = ones
        .iter()
        .map(|s| (*s, 1))
        .chain([("three", 3)])
        .map(|(s, n)| coldstart::scale_revision(&http, s, n));
    for r in futures::future::join_all(wakes).await {
        r.unwrap();
    }
    let mut woken = Vec::new();
    for s in ones {
        woken.extend(
            converged(
                record,
                s,
                1,
                Duration::from_secs(4),
                Duration::from_secs(60),
            )
            .await,
        );
    }
    let three = converged(
        record,
        "three",
        3,
        Duration::from_secs(4),
        Duration::from_secs(60),
    )
    .await;
    woken.extend(three.iter().cloned());
    // Each scale-up got exactly one decision: pods created, or the ReplicaSet controller had been first.
    let m = wait_metric(
        &leader,
        "ste_activator_bridge_decisions_total",
        6.0,
        Duration::from_secs(20),
    )
    .await;
    let m: std::collections::BTreeMap<String, f64> = m.into_iter().collect();
    eprintln!("{arm:?}: bridge metrics after waking 5 revisions to 1 and one to 3: {m:?}");
    let decided = m
        .get("ste_activator_bridge_decisions_total{decision=\"created\"}")
        .copied()
        .unwrap_or(0.0)
        + m.get("ste_activator_bridge_decisions_total{decision=\"nothing_missing\"}")
            .copied()
            .unwrap_or(0.0);
    assert_eq!(decided, 6.0, "one decision per scale-up: {m:?}");
    let created = m["ste_activator_bridge_pods_created_total"];
    assert!(created >= 1.0, "the bridge created pods: {m:?}");
    assert_eq!(
        metric_sum(&m, "ste_activator_bridge_rejections_total"),
        0.0,
        "{m:?}"
    );
    assert_eq!(
        metric_sum(&m, "ste_activator_bridge_api_errors_total"),
        0.0,
        "{m:?}"
    );
    // Races are counted once the settle window closes.
    let m: std::collections::BTreeMap<String, f64> = wait_metric(
        &leader,
        "ste_activator_bridge_races_total",
        6.0,
        Duration::from_secs(20),
    )
    .await
    .into_iter()
    .collect();
    // Every bridge pod either survived (adopted) or was removed as a duplicate.
    let survived = woken.iter().filter(|p| by_bridge(p)).count() as f64;
    let deleted = m
        .get("ste_activator_bridge_duplicates_deleted_total{creator=\"bridge\"}")
        .copied()
        .unwrap_or(0.0);
    assert_eq!(survived + deleted, created, "bridge pods: {survived} adopted + {deleted} deleted as duplicates = {created} created: {m:?}");
    assert!(
        survived >= 1.0,
        "the ReplicaSet controller keeps the bridge's bound pods over its own duplicates: {m:?}"
    );
    // Bridge pods of "three" are spread (Knative's default anti-affinity, 4 nodes).
    let bridge_nodes: Vec<&str> = three
        .iter()
        .filter(|p| by_bridge(p))
        .map(|p| p["spec"]["nodeName"].as_str().unwrap())
        .collect();
    let distinct: BTreeSet<&str> = bridge_nodes.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        bridge_nodes.len(),
        "bridge pods of one revision on distinct nodes: {bridge_nodes:?}"
    );
    // Exactly the template's labels (pod-template-hash included) and the deletion cost.
    let rs = replicaset(record, "three");
    for p in three.iter().filter(|p| by_bridge(p)) {
        assert_eq!(
            p["metadata"]["labels"], rs["spec"]["template"]["metadata"]["labels"],
            "labels of {}",
            p["metadata"]["name"]
        );
        assert_eq!(
            p["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"],
            "100"
        );
    }

    // The standby never acted.
    let s = standby.metrics().await.unwrap();
    assert_eq!(
        metric_sum(&s, "ste_activator_bridge_pods_created_total"),
        0.0,
        "standby created pods: {s:?}"
    );
    assert_eq!(metric_sum(&s, "ste_activator_bridge_leader"), 0.0, "{s:?}");
    assert!(
        s.get("ste_activator_bridge_decisions_total{decision=\"not_leader\"}")
            .copied()
            .unwrap_or(0.0)
            >= 2.0,
        "{s:?}"
    );

    // No node can hold "huge": the bridge stands aside (no_safe_node, or
    // nothing_missing when the ReplicaSet controller's pod was there first);
    // the ReplicaSet's own pod stays Pending for the scheduler.
    let before = metric_sum(
        &leader.metrics().await.unwrap(),
        "ste_activator_bridge_decisions_total",
    );
    coldstart::scale_revision(&http, "huge", 1).await.unwrap();
    let m: std::collections::BTreeMap<String, f64> = wait_metric(
        &leader,
        "ste_activator_bridge_decisions_total",
        before + 1.0,
        Duration::from_secs(20),
    )
    .await
    .into_iter()
    .collect();
    assert_eq!(
        m["ste_activator_bridge_pods_created_total"], created,
        "nothing created for huge: {m:?}"
    );
    ste_testkit::wait_until(
        "huge's pod to be created by its ReplicaSet",
        Duration::from_secs(30),
        || async { revision_pods(record, "huge").len() == 1 },
    )
    .await;
    let pod = &revision_pods(record, "huge")[0];
    assert!(
        !by_bridge(pod) && pod["spec"]["nodeName"].is_null(),
        "huge's pod is the ReplicaSet's, unbound: {pod}"
    );
    coldstart::scale_revision(&http, "huge", 0).await.unwrap();

    // Failover: the leader stops, the standby takes the Lease.
    leader.stop();
    wait_metric(
        &standby,
        "ste_activator_bridge_leader",
        1.0,
        Duration::from_secs(15),
    )
    .await;
    assert!(standby.alive());
    // Aggressive mode: it acts on the Deployment's 0→2 and sets the ReplicaSet's scale too.
    coldstart::scale_revision(&http, "agg", 2).await.unwrap();
    let agg = converged(
        record,
        "agg",
        2,
        Duration::from_secs(4),
        Duration::from_secs(60),
    )
    .await;
    let m = wait_metric(
        &standby,
        "ste_activator_bridge_races_total",
        1.0,
        Duration::from_secs(20),
    )
    .await;
    let m: std::collections::BTreeMap<String, f64> = m.into_iter().collect();
    eprintln!("{arm:?}: aggressive bridge after waking agg→2: {m:?}");
    assert_eq!(
        metric_sum(&m, "ste_activator_bridge_api_errors_total"),
        0.0,
        "{m:?}"
    );
    let created = metric_sum(&m, "ste_activator_bridge_pods_created_total");
    let survived = agg.iter().filter(|p| by_bridge(p)).count() as f64;
    let deleted = m
        .get("ste_activator_bridge_duplicates_deleted_total{creator=\"bridge\"}")
        .copied()
        .unwrap_or(0.0);
    assert_eq!(survived + deleted, created, "aggressive: {m:?}");
    standby.stop();

    // Without any bridge: the same wake converges the same way.
    coldstart::scale_revision(&http, "plain", 3).await.unwrap();
    let plain = converged(
        record,
        "plain",
        3,
        Duration::from_secs(4),
        Duration::from_secs(60),
    )
    .await;
    assert!(
        plain.iter().all(|p| !by_bridge(p)),
        "no bridge pods without the bridge"
    );
    knative.check().expect("Knative components still running");
    leases.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bridge_with_real_knative_stock_arm() {
    bridge_story(Arm::Stock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bridge_with_real_knative_ste_arm() {
    bridge_story(Arm::Ste).await;
}
