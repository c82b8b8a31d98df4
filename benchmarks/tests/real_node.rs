//! Real nodes next to kwok's: `cluster up --real-nodes 2` starts kubelets
//! (built from the pinned k8s.io/kubernetes), each on its own containerd; a Pod of
//! the function image runs on each as a real container, answers its fixed body
//! on its pod IP from the host, and `cluster down` leaves nothing behind, also
//! of a node whose kubelet and containerd were SIGKILLed.
//!
//! Needs root, `hack/build-images.sh` (it installs containerd, runc, buildah
//! and the CNI plugins and leaves the images in target/images) and
//! `hack/build-upstream.sh kubelet crictl`. Missing pieces fail the test with
//! what to run; it never falls back to kwok.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ste_bench::cluster::{self, AgentArgs, Arm, UpArgs};
use ste_bench::real_node::{self, RealNodeArgs, FUNCTION_BODY, FUNCTION_IMAGE, REAL_NODE_PREFIX};
use ste_testkit::{http_get, pid_alive, repo_root, upstream_binary, wait_for, Api};

fn pod_status(api: &Api, name: &str) -> Option<Value> {
    let (code, body) = api
        .curl(&[&format!("/api/v1/namespaces/default/pods/{name}")])
        .ok()?;
    (code == 200)
        .then(|| serde_json::from_str::<Value>(&body).ok())
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_nodes_run_the_function_image_by_pod_ip_and_down_removes_them_even_after_a_crash() {
    let images = repo_root().join("target/images");
    for archive in ["pause.tar", "function.tar"] {
        assert!(
            images.join(archive).is_file(),
            "{} missing: run hack/build-images.sh",
            images.join(archive).display()
        );
    }
    for binary in ["kubelet", "crictl"] {
        assert!(
            upstream_binary(binary, "STE_UNUSED").is_ok(),
            "{binary} missing from target/upstream/bin: run hack/build-upstream.sh kubelet crictl"
        );
    }
    let iptables_before = iptables_rules();
    let kubelet_dir_before = Path::new("/var/lib/kubelet").exists();
    let dir = tempfile::Builder::new()
        .prefix("ste-real-node-")
        .tempdir()
        .unwrap();
    let up = UpArgs::plain(Arm::Stock, 1, 2, dir.path().to_path_buf());
    let real = RealNodeArgs {
        real_nodes: 2,
        images_dir: images,
    };
    let started = Instant::now();
    let record = cluster::up_with_real(&up, &AgentArgs::default(), &real)
        .await
        .expect("cluster up --real-nodes 2");
    eprintln!(
        "cluster up with 2 real nodes: {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let nodes = real_node::read_record(dir.path())
        .unwrap()
        .expect("real-nodes.json");
    let names: Vec<&str> = nodes.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(
        names,
        [
            format!("{REAL_NODE_PREFIX}0"),
            format!("{REAL_NODE_PREFIX}1")
        ]
    );

    let api = record.api();
    let checks = async {
        check_nodes_table(&record.kubeconfig, &nodes.nodes);
        for (i, node) in nodes.nodes.iter().enumerate() {
            check_pod(&api, &record.kubeconfig, node, &format!("fn-{i}")).await;
        }
        // The second node crashes: its kubelet and containerd are SIGKILLed
        // (its shim and containers keep running); down must still remove it all.
        let crashed = &nodes.nodes[1];
        for process in [&crashed.kubelet, &crashed.containerd]
            .into_iter()
            .flatten()
        {
            let _ = Command::new("kill")
                .args(["-KILL", &process.pid.to_string()])
                .status();
            wait_for(
                "a SIGKILLed process to die",
                Duration::from_secs(10),
                || (!pid_alive(process.pid)).then_some(()),
            )
            .await;
        }
    };
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(checks)).await;

    // Down, and nothing of either node is left.
    let down = cluster::down(&cluster::DownArgs {
        dir: dir.path().to_path_buf(),
    })
    .await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    down.expect("cluster down");
    for node in &nodes.nodes {
        for process in [&node.kubelet, &node.containerd].into_iter().flatten() {
            assert!(
                !pid_alive(process.pid),
                "{} (pid {}) still runs after down",
                process.binary,
                process.pid
            );
        }
        let bridge = node.bridge.clone().expect("a bridge");
        let link = Command::new("ip")
            .args(["link", "show", &bridge])
            .output()
            .unwrap();
        assert!(!link.status.success(), "bridge {bridge} still exists");
        for cgroup in &node.cgroup_dirs {
            assert!(!cgroup.exists(), "cgroup {} still exists", cgroup.display());
        }
        assert!(!node.dir.exists(), "{} still exists", node.dir.display());
        assert!(
            real_node::shims_of(&node.socket).is_empty(),
            "shims of {} still run",
            node.socket.display()
        );
    }
    assert!(
        real_node::mounts_under(dir.path()).is_empty(),
        "mounts left under {}",
        dir.path().display()
    );
    assert!(
        !dir.path().join("nodes").exists(),
        "{} still exists",
        dir.path().join("nodes").display()
    );
    assert!(
        real_node::read_record(dir.path()).unwrap().is_none(),
        "real-nodes.json kept: down found something it could not remove"
    );
    assert_eq!(iptables_rules(), iptables_before, "iptables rules changed");
    assert_eq!(
        Path::new("/var/lib/kubelet").exists(),
        kubelet_dir_before,
        "/var/lib/kubelet left behind"
    );
    for (sysctl, before) in &nodes.sysctls {
        let now = std::fs::read_to_string(Path::new("/proc/sys").join(sysctl)).unwrap();
        assert_eq!(now.trim(), before, "sysctl {sysctl} not restored");
    }
}

/// The host's iptables rules (`iptables-save` without its comments and counters).
fn iptables_rules() -> Vec<String> {
    let out = Command::new("iptables-save")
        .output()
        .expect("iptables-save");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            if l.starts_with(':') {
                l.split(" [").next().unwrap_or(l).to_string()
            } else {
                l.to_string()
            }
        })
        .collect()
}

/// kubectl shows a real kubelet and container runtime on the real nodes, kwok on the others.
fn check_nodes_table(kubeconfig: &Path, nodes: &[real_node::RealNode]) {
    let kubectl = upstream_binary("kubectl", "STE_KUBECTL_BIN").unwrap();
    let out = Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["get", "nodes", "-o", "wide"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{table}");
    for node in nodes {
        let row = table
            .lines()
            .find(|l| l.starts_with(&node.name))
            .unwrap_or_else(|| panic!("{} not in\n{table}", node.name));
        let columns: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(columns[1], "Ready", "{row}");
        assert!(columns[4].starts_with("v1.34."), "kubelet version: {row}");
        assert_eq!(
            Some(columns[5]),
            node.gateway.as_deref(),
            "internal IP: {row}"
        );
        assert!(
            columns.last().unwrap().starts_with("containerd://"),
            "runtime: {row}"
        );
    }
    let kwok_rows = table
        .lines()
        .filter(|l| l.starts_with("kwok-node-"))
        .count();
    assert_eq!(kwok_rows, 2, "{table}");
    assert!(
        table
            .lines()
            .filter(|l| l.starts_with("kwok-node-"))
            .all(|l| l.ends_with("kwok-0.8.0")),
        "{table}"
    );
}

/// A pod `name` of the function image on `node` runs as a real container and
/// answers on its pod IP from the host.
async fn check_pod(api: &Api, kubeconfig: &Path, node: &real_node::RealNode, name: &str) {
    let kubectl = upstream_binary("kubectl", "STE_KUBECTL_BIN").unwrap();
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "nodeName": node.name,
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "fn", "image": FUNCTION_IMAGE, "imagePullPolicy": "Never",
                "env": [{"name": "PORT", "value": "8080"}],
                "ports": [{"containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}
            }]
        }
    });
    let created = Instant::now();
    let (code, body) = api
        .send_json("POST", "/api/v1/namespaces/default/pods", &pod.to_string())
        .unwrap();
    assert_eq!(code, 201, "{body}");
    let (ip, phase_at) = wait_for(
        "the pod Running with an IP",
        Duration::from_secs(90),
        || {
            let pod = pod_status(api, name)?;
            if let Some(reason) =
                pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"].as_str()
            {
                assert!(
                    !matches!(
                        reason,
                        "ErrImageNeverPull" | "CreateContainerError" | "RunContainerError"
                    ),
                    "{pod}"
                );
            }
            (pod["status"]["phase"] == "Running").then(|| {
                (
                    pod["status"]["podIP"].as_str().map(String::from),
                    created.elapsed(),
                )
            })
        },
    )
    .await;
    let ip = ip.expect("a pod IP");
    let url = format!("http://{ip}:8080/");
    let body = wait_for(
        "the function's body over the pod IP",
        Duration::from_secs(30),
        || http_get(&url),
    )
    .await;
    let answered = created.elapsed();
    assert_eq!(body, FUNCTION_BODY);
    eprintln!(
        "pod {name} on {}: Running {:.2}s after create, answered on {ip}:8080 {:.2}s after create",
        node.name,
        phase_at.as_secs_f64(),
        answered.as_secs_f64()
    );
    let subnet = node.subnet.as_deref().unwrap();
    let prefix = subnet.trim_end_matches("0/24");
    assert!(
        ip.starts_with(prefix),
        "pod IP {ip} outside the node's subnet {subnet}"
    );

    // kube-apiserver reaches the kubelet (with its client certificate) for the logs.
    let out = Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["logs", name])
        .output()
        .unwrap();
    let logs = String::from_utf8_lossy(&out.stdout);
    assert!(
        logs.contains("ste-function listening on"),
        "kubectl logs {name}: {logs}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // It is a real container: the node's runtime runs it.
    let crictl = upstream_binary("crictl", "STE_CRICTL_BIN").unwrap();
    let endpoint = format!("unix://{}", node.socket.display());
    let out = Command::new(&crictl)
        .args([
            "--runtime-endpoint",
            &endpoint,
            "--image-endpoint",
            &endpoint,
            "ps",
            "--name",
            "fn",
            "--label",
            &format!("io.kubernetes.pod.name={name}"),
            "--state",
            "Running",
            "-q",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        1,
        "crictl ps --name fn on {}",
        node.name
    );
}
