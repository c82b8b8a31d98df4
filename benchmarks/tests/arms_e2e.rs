//! The arms of issue 15 on the real local control plane: the override arm
//! (pods and events in one RAM etcd through kube-apiserver's
//! --etcd-servers-overrides) on a 3-member durable etcd comes up, serves a
//! Deployment's pods, and keeps them in its RAM etcd, not in the durable one.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use ste_bench::arms::{Arm, Environment, Topology};
use ste_bench::cluster::{self, RunningCluster};
use ste_testkit::Api;

/// Keys under `prefix` in the etcd at `endpoint`, read with etcdctl.
fn etcd_keys(endpoint: &str, prefix: &str) -> Vec<String> {
    let out = Command::new(ste_testkit::etcdctl_binary().unwrap())
        .args([
            &format!("--endpoints={endpoint}"),
            "get",
            "--prefix",
            "--keys-only",
            prefix,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "etcdctl get on {endpoint}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// Members etcd at `endpoint` reports (etcdctl member list).
fn etcd_members(endpoint: &str) -> usize {
    let out = Command::new(ste_testkit::etcdctl_binary().unwrap())
        .args([&format!("--endpoints={endpoint}"), "member", "list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "etcdctl member list on {endpoint}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("started"))
        .count()
}

fn running_pods(api: &Api, app: &str) -> usize {
    let (code, body) = api
        .curl(&[&format!(
            "/api/v1/namespaces/default/pods?labelSelector=app%3D{app}"
        )])
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["status"]["phase"] == "Running" && p["spec"]["nodeName"].is_string())
        .count()
}

/// Waits up to 90 s until `n` pods of `app` are Running on a node.
async fn wait_running(api: &Api, app: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while running_pods(api, app) < n {
        assert!(
            Instant::now() < deadline,
            "{n} pods of {app} not Running within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_arm_on_three_etcd_members_keeps_pods_in_its_ram_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let env = Environment {
        shards: 1,
        nodes: 3,
        client_qps: Some(100),
        fsync_delay: None,
        topology: Topology {
            etcd_members: 3,
            replication_factor: 1,
            ..Default::default()
        },
    };
    let record = cluster::up_arm(Arm::Override, &env, PathBuf::from(dir.path()))
        .await
        .unwrap();
    let running = RunningCluster::new(record);
    let record = running.record();
    assert_eq!(record.durable_etcd.len(), 3, "three durable members");
    for endpoint in &record.durable_etcd {
        assert_eq!(
            etcd_members(endpoint),
            3,
            "{endpoint} sees 3 started members"
        );
    }
    let ram = record
        .ram_etcd
        .clone()
        .expect("the override arm's RAM etcd");
    assert!(record.router.is_none(), "no router on the override arm");

    let api = record.api();
    api.create_deployment("web", 5);
    wait_running(&api, "web", 5).await;

    let in_ram = etcd_keys(&ram, "/registry/pods/default/web-");
    assert_eq!(in_ram.len(), 5, "the pods are in the RAM etcd: {in_ram:?}");
    let in_durable = etcd_keys(&record.durable_etcd[0], "/registry/pods/");
    assert!(
        in_durable.is_empty(),
        "no pod in the durable etcd: {in_durable:?}"
    );
    assert!(
        !etcd_keys(&ram, "/registry/events/").is_empty(),
        "events go to the RAM etcd too"
    );
    let deployments = etcd_keys(&record.durable_etcd[1], "/registry/deployments/default/web");
    assert_eq!(
        deployments.len(),
        1,
        "the Deployment is durable (read on member 1)"
    );
}

/// The member-count scenario in seconds: etcd alone at 1 and 3 members, then
/// pods on the stock arm at each; the report has one write row per rate and
/// member count plus the saturated one, and one pod row per member count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_scenario_reports_writes_and_pods_per_member_count() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ste_bench::members::MembersArgs,
    }
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().display().to_string();
    let cli = Cli::try_parse_from([
        "members",
        "--members=1,3",
        "--fsync-delay=2ms",
        "--write-rates=40",
        "--write-duration=2s",
        "--writers=4",
        "--arms=stock",
        "--interarrival=500ms",
        "--duration=3s",
        "--nodes=2",
        &format!("--output={output}"),
    ])
    .unwrap();
    let report = ste_bench::members::run(cli.args).await.unwrap();
    assert_eq!(
        report.writes.len(),
        4,
        "1 rate + saturated, at 1 and 3 members"
    );
    for w in &report.writes {
        assert!(w.acknowledged > 0 && w.errors == 0, "{w:?}");
        assert!(w.p50_ms > 0.0 && w.p50_ms <= w.p99_ms, "{w:?}");
        if let Some(rate) = w.offered_per_s {
            assert_eq!(w.sent, (rate * 2.0) as usize, "{w:?}");
        }
    }
    let members: Vec<usize> = report.pods.iter().map(|r| r.etcd_members).collect();
    assert_eq!(members, vec![1, 3], "one stock row per member count");
    for r in &report.pods {
        assert_eq!(r.arm, Arm::Stock);
        assert_eq!(r.bound, r.sent, "{r:?}");
    }
    assert!(dir.path().join("results.json").is_file());
}

/// The failure scenario in seconds on all three arms: the report has one row
/// per arm with the steady set counted before the kill; STE at RF 2 loses no
/// pod, STE at RF 1 loses only the killed shard's share and is whole again,
/// and the store behind kube-apiserver is read directly on every arm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_scenario_reports_losses_per_arm() {
    use clap::Parser;
    use ste_bench::failure::Victim;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ste_bench::failure::FailureArgs,
    }
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().display().to_string();
    let cli = Cli::try_parse_from([
        "failure",
        "--deployments=4",
        "--replicas=5",
        "--before=2s",
        "--observe=20s",
        "--nodes=3",
        &format!("--output={output}"),
    ])
    .unwrap();
    let results = ste_bench::failure::run(cli.args).await.unwrap();
    let arms: Vec<Victim> = results.iter().map(|r| r.arm).collect();
    assert_eq!(arms, vec![Victim::Override, Victim::SteRf1, Victim::SteRf2]);
    for r in &results {
        assert_eq!(r.pods_before, 20, "{r:?}");
        assert!(r.churn_requests > 0, "{r:?}");
        assert!(r.pods_in_store_after.is_some(), "{r:?}");
    }
    let (rf1, rf2) = (&results[1], &results[2]);
    assert_eq!(rf2.pods_lost, 0, "RF 2 loses no pod: {rf2:?}");
    assert_eq!(rf2.pods_in_store_after, Some(20), "{rf2:?}");
    assert!(
        rf1.pods_lost > 0 && rf1.pods_lost < 20,
        "RF 1 loses only the killed shard's pods: {rf1:?}"
    );
    assert_eq!(rf1.pods_recreated, rf1.pods_lost, "{rf1:?}");
    assert!(rf1.whole_after_s.is_some(), "{rf1:?}");
    assert!(dir.path().join("results.json").is_file());
}

/// The churn suite with its arms interleaved over two repeats, override and
/// STE: each repeat has both arms (the second in reverse order), and on the
/// STE arm the router's own share of the step and kube-apiserver's timing of
/// its pod-store calls are read from their /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_repeats_interleave_the_arms_and_time_the_pod_store() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ste_bench::churn::ChurnArgs,
    }
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().display().to_string();
    let cli = Cli::try_parse_from([
        "churn",
        "--arms=override,ste",
        "--repeats=2",
        "--interarrival=250ms",
        "--duration=1s",
        "--nodes=1",
        "--shards=1",
        &format!("--output={output}"),
    ])
    .unwrap();
    let results = ste_bench::churn::run(cli.args).await.unwrap();
    let order: Vec<(Arm, u64)> = results.iter().map(|r| (r.arm, r.repeat)).collect();
    assert_eq!(
        order,
        [
            (Arm::Override, 0),
            (Arm::Ste, 0),
            (Arm::Ste, 1),
            (Arm::Override, 1)
        ]
    );
    for r in &results {
        assert_eq!((r.sent, r.bound), (4, 4), "{:?} #{}", r.arm, r.repeat);
        let creates = r
            .pod_store
            .iter()
            .find(|c| c.operation == "create")
            .expect("pod creates timed");
        assert!(
            creates.per_deployment >= 1.0 && creates.mean_ms > 0.0,
            "{creates:?}"
        );
        match (r.arm, &r.router) {
            (Arm::Ste, Some(router)) => {
                // A pod's create and its binding at least, each in a shard Txn.
                assert!(router.txn_per_deployment >= 2.0, "{router:?}");
                assert!(router.txn_mean_ms >= router.shard_txn_mean_ms, "{router:?}");
                assert!(router.writes_per_batch >= 1.0, "{router:?}");
            }
            (Arm::Override, None) => {}
            (arm, router) => panic!("{arm:?} with router timing {router:?}"),
        }
    }
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("results.json")).unwrap())
            .unwrap();
    assert_eq!(saved.as_array().map(Vec::len), Some(4));
}

/// `--local-sockets`: kube-apiserver reaches override's RAM etcd and
/// ste-router at Unix sockets (its pod override names no TCP address, so
/// Running pods prove the socket carries the pod store), and the router
/// reaches its shard at the shard's socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_sockets_carry_the_pod_store_on_both_ram_arms() {
    for arm in [Arm::Override, Arm::Ste] {
        let dir = tempfile::tempdir().unwrap();
        let env = Environment {
            shards: 1,
            nodes: 2,
            client_qps: Some(100),
            fsync_delay: None,
            topology: Topology {
                local_sockets: true,
                ..Default::default()
            },
        };
        let record = cluster::up_arm(arm, &env, PathBuf::from(dir.path()))
            .await
            .unwrap();
        let running = RunningCluster::new(record);
        let record = running.record();
        let args_of = |name: &str| {
            record
                .processes
                .iter()
                .find(|p| p.name == name)
                .unwrap_or_else(|| panic!("{arm:?}: no {name} process"))
                .args
                .join(" ")
        };
        let apiserver = args_of("kube-apiserver");
        let pods_at = apiserver
            .split([' ', ','])
            .find_map(|a| a.split("/pods#").nth(1))
            .unwrap_or_else(|| panic!("{arm:?}: no pods override in {apiserver}"));
        assert!(
            pods_at.starts_with("unix:///"),
            "{arm:?}: pods at {pods_at}"
        );
        if arm == Arm::Ste {
            let router = args_of("ste-router");
            assert!(router.contains("--shards=shard-0=unix:///"), "{router}");
            assert!(router.contains("--listen-unix="), "{router}");
        }

        let api = record.api();
        api.create_deployment("sock", 3);
        wait_running(&api, "sock", 3).await;
        // Read back over TCP: the same store the socket wrote to.
        let store = record.ram_etcd.clone().or_else(|| record.router.clone());
        let keys = etcd_keys(&store.unwrap(), "/registry/pods/default/sock-");
        assert_eq!(keys.len(), 3, "{arm:?}: pods in the RAM store: {keys:?}");
        let durable = etcd_keys(&record.durable_etcd[0], "/registry/pods/");
        assert!(durable.is_empty(), "{arm:?}: no pod durable: {durable:?}");
    }
}
