//! `--kubeconfig`: a scenario run against a cluster the tool did not start.
//! The cluster here is a local stock-arm one started by the library; the
//! benchmark only gets its kubeconfig, through the built binary.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use ste_bench::cluster::{self, Arm, RunningCluster, UpArgs};
use ste_bench::external::{self, ExternalArgs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_runs_against_a_cluster_given_by_kubeconfig() {
    let dir = tempfile::tempdir().unwrap();
    let args = UpArgs {
        arm: Arm::Stock,
        shards: 1,
        nodes: 1,
        events_to_ste: false,
        client_qps: Some(100),
        fsync_delay: None,
        apiserver_env: Vec::new(),
        apiserver_bin: None,
        audit: false,
        dir: dir.path().join("cluster"),
    };
    let cluster = RunningCluster::new(cluster::up(&args).await.expect("cluster up"));
    let kubeconfig = cluster.record().kubeconfig.clone();
    assert!(
        kubeconfig.is_file(),
        "the cluster wrote {}",
        kubeconfig.display()
    );
    let output = dir.path().join("churn");

    // 5 Deployments at 5/s, against that cluster only (no arm is started).
    let bench = tokio::task::spawn_blocking({
        let output = output.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_ste-bench"))
                .args([
                    "churn",
                    "--interarrival",
                    "200ms",
                    "--duration",
                    "1s",
                    "--arm-name",
                    "mine",
                    "--namespace",
                    "ste-bench-test",
                ])
                .arg("--output")
                .arg(&output)
                .env("STE_BENCH_KUBECONFIG", &kubeconfig)
                .output()
                .expect("ste-bench runs")
        }
    });
    let out = tokio::time::timeout(Duration::from_secs(90), bench)
        .await
        .expect("churn within 90 s")
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "ste-bench churn failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );

    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(output.join("results.json")).unwrap())
            .unwrap();
    let results = results.as_array().expect("a list of results");
    assert_eq!(results.len(), 1, "one arm, one step: {results:?}");
    assert_eq!(results[0]["arm"], "mine");
    assert_eq!(results[0]["sent"], 5);
    assert_eq!(results[0]["bound"], 5, "{stdout}\n{stderr}");
    assert_eq!(results[0]["cpu_seconds"], serde_json::json!([]));
    // One level down: each Deployment's hops up to its pod bound, from the
    // watches, and kube-apiserver's own timing of its pod-store calls.
    let hops = results[0]["hops"].as_array().expect("hops");
    for hop in &hops[..4] {
        assert_eq!(
            hop["samples"], 5,
            "every Deployment reached both ends: {hop}"
        );
        assert!(hop["p50_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{hop}");
    }
    let creates = results[0]["pod_store"]
        .as_array()
        .and_then(|calls| calls.iter().find(|c| c["operation"] == "create"))
        .unwrap_or_else(|| panic!("no pod create timing: {}", results[0]["pod_store"]));
    assert!(
        creates["per_deployment"].as_f64().is_some_and(|n| n >= 1.0)
            && creates["mean_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "a pod created per Deployment, timed: {creates}"
    );
    assert!(results[0]["router"].is_null(), "no ste-router here");
    // The table: the arm's name and no CPU figures.
    let row = stdout
        .lines()
        .find(|l| l.starts_with("| mine |"))
        .unwrap_or_else(|| panic!("no row for arm mine:\n{stdout}"));
    assert!(row.trim_end().ends_with("| n/a |"), "{row}");
    // No local arm was started: only the test's cluster directory exists.
    assert!(!output.join("stock-qps200").exists() && !output.join("ste-qps200").exists());

    // The run's namespace is gone (deleted before ste-bench exited).
    let api = cluster.record().api();
    let (code, body) = api.curl(&["/api/v1/namespaces/ste-bench-test"]).unwrap();
    assert_eq!(code, 404, "namespace left behind: {body}");

    // TLS verified against `certificate-authority` (relative to the
    // kubeconfig): kube-apiserver's self-signed certificate passes; without
    // it (and without insecure-skip-tls-verify) the server is refused.
    let text = std::fs::read_to_string(&cluster.record().kubeconfig).unwrap();
    let verified = cluster.record().kubeconfig.with_file_name("kubeconfig-ca");
    std::fs::write(
        &verified,
        text.replace(
            "insecure-skip-tls-verify: true",
            "certificate-authority: certs/apiserver.crt",
        ),
    )
    .unwrap();
    let unverified = cluster
        .record()
        .kubeconfig
        .with_file_name("kubeconfig-no-ca");
    std::fs::write(
        &unverified,
        text.replace("    insecure-skip-tls-verify: true\n", ""),
    )
    .unwrap();
    let external = |path: &std::path::Path| ExternalArgs {
        kubeconfig: Some(path.to_path_buf()),
        namespace: "ste-bench-tls".into(),
        ..Default::default()
    };
    let record = external::connect(&external(&verified))
        .await
        .expect("the CA verifies the server");
    assert_eq!(record.namespace, "ste-bench-tls");
    external::cleanup(&record).await.expect("namespace deleted");
    let err = external::connect(&external(&unverified))
        .await
        .expect_err("an unknown issuer is refused");
    assert!(format!("{err:#}").contains("UnknownIssuer"), "{err:#}");
}

#[test]
fn a_missing_kubeconfig_or_a_failing_exec_plugin_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    for scenario in ["churn", "startup", "jobs"] {
        let out = Command::new(env!("CARGO_BIN_EXE_ste-bench"))
            .args([scenario, "--kubeconfig"])
            .arg(&missing)
            .arg("--output")
            .arg(dir.path().join(scenario))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{scenario} accepted a missing kubeconfig"
        );
        assert!(
            stderr.contains(&format!("reading kubeconfig {}", missing.display())),
            "{scenario}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let exec = dir.path().join("exec-kubeconfig");
    std::fs::write(
        &exec,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:1\n\
         users:\n- name: eks\n  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: ste-bench-no-such-plugin\n\
         contexts:\n- name: x\n  context:\n    cluster: c\n    user: eks\ncurrent-context: x\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ste-bench"))
        .args(["churn", "--output"])
        .arg(dir.path().join("exec"))
        .env("STE_BENCH_KUBECONFIG", &exec)
        .output()
        .unwrap();
    // kube-rs runs exec plugins: here the command does not exist, and the
    // run stops with kube-rs' own error, not a panic.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("unable to run auth exec"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
