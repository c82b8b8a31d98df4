//! The install of docs/install.md, done for real on a cluster with one real
//! node (`cluster up --real-nodes 1`: a kubelet and its containerd running
//! hack/build-images.sh's images), following the page's kubeadm section step
//! by step: its shell blocks are read from docs/install.md and run as they
//! are, with only the substitutions listed in [`Host`] (host paths under a
//! per-test root). The steps that edit kubeadm's kube-apiserver.yaml or run
//! etcdctl inside kubeadm's etcd pod are done by the test itself with the
//! flag and the key prefix the page names (here kube-apiserver is a process
//! of the local control plane, and its etcd is not a pod).
//!
//! Checked: the bootstrap shard and ste-router run as static pods from the
//! kubelet's static pod directory; kube-apiserver serves with the page's
//! `--etcd-servers-overrides`; `kubectl apply -f manifests/` brings up the
//! shard-agent (its RAM etcd; its Shard joins the router) and the
//! activator-bridge (it takes its Lease); a Deployment made before the
//! install comes back with its pods as real containers answering on their
//! pod IPs, stored in the shards and not in the durable etcd; deleting the
//! agent's pod drains its keys onto the bootstrap shard with no pod deleted or
//! added in a watch; uninstalling as the page says leaves a working stock
//! cluster: objects made before are intact and the pods are recreated in the
//! durable etcd.
//!
//! Needs root, hack/build-images.sh (all six images), hack/build-upstream.sh
//! (kubelet, crictl, kubectl, etcdctl) and the host ports of the static pods
//! (2479, 2480, 2579–2581) free. A missing piece fails the test with what to run.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ste_bench::cluster::{self, AgentArgs, Arm, UpArgs};
use ste_bench::real_node::{self, RealNode, RealNodeArgs, FUNCTION_BODY, FUNCTION_IMAGE};
use ste_testkit::{http_get, repo_root, upstream_binary, wait_for, Api};

const STATIC_POD_PORTS: [u16; 5] = [2479, 2480, 2579, 2580, 2581];
const IMAGES: [&str; 6] = [
    "pause",
    "function",
    "etcd",
    "ste-router",
    "ste-shard-agent",
    "ste-activator-bridge",
];
const ROUTER_ADMIN: &str = "http://127.0.0.1:2480";
const BOOTSTRAP_SHARD: &str = "https://127.0.0.1:2579";
const AGENT_LABEL: &str = "app.kubernetes.io/name=ste-shard-agent";

fn upstream(name: &'static str) -> PathBuf {
    upstream_binary(name, "STE_UNUSED").unwrap_or_else(|_| {
        panic!("{name} missing from target/upstream/bin: run hack/build-upstream.sh")
    })
}

/// The per-test host: where docs/install.md's fixed host paths go.
struct Host {
    /// Stands for `/`: `/etc/kubernetes/…` is `<root>/etc/kubernetes/…`.
    root: PathBuf,
    /// The cluster directory of `cluster up`.
    cluster: PathBuf,
    kubeconfig: PathBuf,
    api: Api,
    node: RealNode,
}

impl Host {
    /// The page's text as run here: `/etc/kubernetes/`, `/var/lib/ste-router`
    /// and `/root/ste-certs` under the test's root, the static pods from their
    /// copies made by [`Host::static_pods`].
    fn adapt(&self, text: &str) -> String {
        let root = self.root.display();
        text.replace("manifests/static-pods/", &format!("{root}/static-pods/"))
            .replace("/root/ste-certs", &format!("{root}/root/ste-certs"))
            .replace("/etc/kubernetes/", &format!("{root}/etc/kubernetes/"))
            .replace("/var/lib/ste-router", &format!("{root}/var/lib/ste-router"))
    }

    /// The shipped static pods with the same substitution (their host paths
    /// and, so that the files the page writes name the same paths inside
    /// the containers, their container paths).
    fn static_pods(&self) {
        let dir = self.root.join("static-pods");
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["ste-router.yaml", "ste-bootstrap-shard.yaml"] {
            let text =
                std::fs::read_to_string(repo_root().join("manifests/static-pods").join(name))
                    .unwrap();
            std::fs::write(dir.join(name), self.adapt(&text)).unwrap();
        }
    }

    /// What kubeadm leaves in /etc/kubernetes that the page uses: the
    /// cluster CA, the etcd CA, controller-manager.conf (for its server
    /// line) and the static pod directory (the real node's).
    fn kubeadm_layout(&self) {
        let etc = self.root.join("etc/kubernetes");
        std::fs::create_dir_all(etc.join("pki/etcd")).unwrap();
        let ca = real_node::cluster_ca(&self.cluster);
        std::fs::copy(ca.with_extension("crt"), etc.join("pki/ca.crt")).unwrap();
        let etcd_ca = real_node::etcd_ca(&self.cluster);
        for ext in ["crt", "key"] {
            std::fs::copy(
                etcd_ca.with_extension(ext),
                etc.join("pki/etcd/ca").with_extension(ext),
            )
            .unwrap();
        }
        std::fs::copy(&self.kubeconfig, etc.join("controller-manager.conf")).unwrap();
        std::os::unix::fs::symlink(self.node.dir.join("manifests"), etc.join("manifests")).unwrap();
        std::fs::create_dir_all(self.root.join("root")).unwrap();
        std::fs::create_dir_all(self.root.join("var/lib")).unwrap();
    }

    /// Runs one step of the page as a bash script (set -euo pipefail), from
    /// the repository root, with kubectl on PATH and the admin kubeconfig.
    fn run_step(&self, name: &str, text: &str, within: Duration) {
        let script = self.root.join(format!("{}.sh", name.replace(' ', "-")));
        std::fs::write(&script, self.adapt(text)).unwrap();
        let bin = upstream("kubectl").parent().unwrap().to_path_buf();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let started = Instant::now();
        let out = Command::new("timeout")
            .arg(within.as_secs().to_string())
            .args(["bash", "-euo", "pipefail"])
            .arg(&script)
            .current_dir(repo_root())
            .env("PATH", path)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "docs/install.md, {name} ({:?}; 124 = timed out after {}s):\n{}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            out.status.code(),
            within.as_secs(),
            self.adapt(text)
        );
        eprintln!(
            "✓ {name} ({:.1}s){}",
            started.elapsed().as_secs_f64(),
            if stdout.trim().is_empty() {
                String::new()
            } else {
                format!("\n{}", stdout.trim_end())
            }
        );
    }

    fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(upstream("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn kubectl_json(&self, args: &[&str]) -> Option<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&all).ok()?).ok()
    }

    fn apply(&self, object: &Value) {
        let mut child = Command::new(upstream("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(object.to_string().as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "kubectl apply {object}");
    }

    /// Keys under `prefix` in the etcd at `endpoint`: the durable one (plain
    /// HTTP on loopback) or a shard (mTLS with the router's client
    /// certificate from the page's certificates; a worker's certificate
    /// names `ste-shard`, not its pod IP, hence no name check there).
    fn etcd_keys(&self, endpoint: &str, prefix: &str) -> BTreeSet<String> {
        let certs = self.root.join("root/ste-certs");
        let mut cmd = Command::new(upstream("etcdctl"));
        cmd.arg(format!("--endpoints={endpoint}")).args([
            "--command-timeout=10s",
            "get",
            prefix,
            "--prefix",
            "--keys-only",
        ]);
        if endpoint.starts_with("https://") {
            cmd.arg(format!("--cacert={}", certs.join("ca.crt").display()))
                .arg(format!(
                    "--cert={}",
                    certs.join("router-client.crt").display()
                ))
                .arg(format!(
                    "--key={}",
                    certs.join("router-client.key").display()
                ));
            if endpoint != BOOTSTRAP_SHARD {
                cmd.arg("--insecure-skip-tls-verify");
            }
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "etcdctl get {prefix} on {endpoint}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }

    /// What the page's `etcdctl del /registry/pods/ --prefix` does, on the
    /// durable etcd (kubeadm's etcd pod is not there to exec into).
    fn delete_durable_pod_keys(&self) {
        let out = Command::new(upstream("etcdctl"))
            .arg(format!("--endpoints={}", self.durable_etcd()))
            .args(["del", "/registry/pods/", "--prefix"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn durable_etcd(&self) -> String {
        let record = cluster::read_record(&self.cluster).unwrap();
        let etcd = record
            .processes
            .iter()
            .find(|p| p.name == "etcd-main")
            .expect("etcd-main recorded");
        etcd.args
            .iter()
            .find_map(|a| a.strip_prefix("--listen-client-urls="))
            .expect("--listen-client-urls")
            .to_string()
    }

    /// kube-apiserver stopped and started again with its recorded flags
    /// changed by `edit` (what the kubelet does when kubeadm's
    /// kube-apiserver.yaml changes).
    async fn restart_apiserver(&self, edit: impl FnOnce(&mut Vec<String>)) {
        let path = self.cluster.join("cluster.json");
        let mut record: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let process = record["processes"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|p| p["name"] == "kube-apiserver")
            .expect("kube-apiserver recorded");
        let mut args: Vec<String> = serde_json::from_value(process["args"].clone()).unwrap();
        edit(&mut args);
        process["args"] = json!(args);
        std::fs::write(&path, serde_json::to_string_pretty(&record).unwrap()).unwrap();
        let started = Instant::now();
        cluster::crash_and_restart(&self.cluster, "kube-apiserver", false)
            .await
            .expect("restarting kube-apiserver");
        let api = self.api.clone();
        wait_for(
            "kube-apiserver /readyz after its restart",
            Duration::from_secs(120),
            || matches!(api.curl(&["/readyz"]), Ok((200, _))).then_some(()),
        )
        .await;
        eprintln!(
            "✓ kube-apiserver restarted ({:.1}s)",
            started.elapsed().as_secs_f64()
        );
    }

    /// The resourceVersion of a list of `resource` (all namespaces).
    fn list_rv(&self, resource: &str) -> String {
        let (_, body) = self
            .api
            .curl(&[&format!("/api/v1/{resource}?limit=1")])
            .unwrap();
        let list: Value = serde_json::from_str(&body).unwrap_or_default();
        list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("?")
            .to_string()
    }

    fn pods(&self, selector: &str) -> Vec<Value> {
        self.kubectl_json(&["get", "pods", "-A", "-l", selector])
            .and_then(|list| list["items"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Pods of the selector, all Running and ready, `n` of them.
    async fn running(&self, selector: &str, n: usize, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let pods: Vec<Value> = self
                .pods(selector)
                .into_iter()
                .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
                .collect();
            let ready = pods.iter().all(|p| {
                p["status"]["phase"] == "Running"
                    && p["status"]["conditions"].as_array().is_some_and(|c| {
                        c.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    })
            });
            if pods.len() == n && ready {
                return pods;
            }
            if Instant::now() >= deadline {
                let table = self.kubectl(&["get", "pods", "-A", "-o", "wide"]);
                let events = self.kubectl(&["get", "events", "-A"]);
                panic!(
                    "{n} pod(s) {selector} running and ready: not within {}s\n{}\n{}",
                    within.as_secs(),
                    table.unwrap_or_else(|e| e),
                    events.unwrap_or_else(|e| e)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The pod runs as a container on the node's containerd.
    fn container_running(&self, pod: &str) -> bool {
        let endpoint = format!("unix://{}", self.node.socket.display());
        let out = Command::new(upstream("crictl"))
            .args([
                "--runtime-endpoint",
                &endpoint,
                "--image-endpoint",
                &endpoint,
            ])
            .args(["ps", "--state", "Running", "-q", "--label"])
            .arg(format!("io.kubernetes.pod.name={pod}"))
            .output()
            .unwrap();
        out.status.success() && !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    }
}

/// The shell block of docs/install.md's section `heading`, split at its
/// `# N. …` comments: (N, text of the step).
fn doc_steps(heading: &str) -> Vec<(u32, String)> {
    let page = std::fs::read_to_string(repo_root().join("docs/install.md")).unwrap();
    let section = page
        .split_once(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("docs/install.md has no section {heading:?}"))
        .1;
    let block = section
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .unwrap_or_else(|| panic!("no sh block in {heading:?}"))
        .0;
    let mut steps: Vec<(u32, String)> = Vec::new();
    for line in block.lines() {
        let number = line
            .strip_prefix("# ")
            .and_then(|rest| rest.split_once(". "))
            .and_then(|(n, _)| n.parse::<u32>().ok());
        match (number, steps.last_mut()) {
            (Some(n), _) => steps.push((n, format!("{line}\n"))),
            (None, Some((_, text))) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, None) => panic!("{heading}: text before step 1: {line}"),
        }
    }
    steps
}

fn step(steps: &[(u32, String)], n: u32) -> &str {
    &steps
        .iter()
        .find(|(m, _)| *m == n)
        .unwrap_or_else(|| panic!("docs/install.md: no step {n}"))
        .1
}

/// The flag the page's step adds to kube-apiserver.
fn override_flag(text: &str) -> String {
    let start = text
        .find("--etcd-servers-overrides=")
        .expect("the step names --etcd-servers-overrides");
    text[start..]
        .split(['|', ' ', '\n', '\''])
        .next()
        .unwrap()
        .to_string()
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn preflight() -> PathBuf {
    let images = repo_root().join("target/images");
    for name in IMAGES {
        let archive = images.join(format!("{name}.tar"));
        assert!(
            archive.is_file(),
            "{} missing: run hack/build-images.sh (as root)",
            archive.display()
        );
    }
    for name in ["kubelet", "crictl", "kubectl", "etcdctl"] {
        upstream(name);
    }
    for port in STATIC_POD_PORTS {
        assert!(
            port_free(port),
            "127.0.0.1:{port} is taken: the static pods of docs/install.md listen there (another STE install or test?)"
        );
    }
    images
}

fn function_deployment() -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "fn", "namespace": "default"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "fn"}},
            "template": {
                "metadata": {"labels": {"app": "fn"}},
                "spec": {
                    "nodeSelector": {"type": real_node::REAL_NODE_TYPE},
                    "terminationGracePeriodSeconds": 2,
                    "containers": [{
                        "name": "fn", "image": FUNCTION_IMAGE, "imagePullPolicy": "Never",
                        "env": [{"name": "PORT", "value": "8080"}],
                        "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}
                    }]
                }
            }
        }
    })
}

/// The Deployment's pods: Running as containers of the node, answering on
/// their pod IPs. Returns their names.
async fn function_pods_answer(host: &Host) -> Vec<String> {
    let pods = host.running("app=fn", 2, Duration::from_secs(120)).await;
    let mut names = Vec::new();
    for pod in pods {
        let name = pod["metadata"]["name"].as_str().unwrap().to_string();
        let ip = pod["status"]["podIP"]
            .as_str()
            .expect("a pod IP")
            .to_string();
        assert!(
            host.container_running(&name),
            "crictl: no running container of {name}"
        );
        let body = wait_for(
            &format!("{name} answering on {ip}:8080"),
            Duration::from_secs(30),
            || http_get(&format!("http://{ip}:8080/")),
        )
        .await;
        assert_eq!(body, FUNCTION_BODY);
        names.push(name);
    }
    names
}

/// A watch of every pod (curl, chunked JSON events) from `resource_version`.
fn watch_pods(api: &Api, resource_version: &str, log: &Path) -> Child {
    Command::new("curl")
        .args(["-sk", "-N", "--max-time", "300", "-H"])
        .arg(format!("Authorization: Bearer {}", api.token))
        .arg(format!(
            "{}/api/v1/pods?watch=true&resourceVersion={resource_version}",
            api.url
        ))
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn shard_phase(host: &Host, name: &str) -> Option<String> {
    host.kubectl_json(&["get", "shard", name])
        .map(|s| s["status"]["phase"].as_str().unwrap_or("").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_md_on_a_real_node_then_uninstall_back_to_stock() {
    let images = preflight();
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("ste-install-")
        .tempdir()
        .unwrap();
    let up = UpArgs::plain(Arm::Stock, 1, 0, dir.path().join("cluster"));
    let real = RealNodeArgs {
        real_nodes: 1,
        images_dir: images,
    };
    let record = cluster::up_with_real(&up, &AgentArgs::default(), &real).await;
    let outcome = match record {
        Ok(record) => {
            eprintln!(
                "✓ stock cluster with one real node ({:.1}s)",
                started.elapsed().as_secs_f64()
            );
            let node = real_node::read_record(&up.dir)
                .unwrap()
                .expect("real-nodes.json")
                .nodes
                .remove(0);
            let host = Host {
                root: dir.path().join("host"),
                cluster: up.dir.clone(),
                kubeconfig: record.kubeconfig.clone(),
                api: record.api(),
                node,
            };
            futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(install_and_uninstall(
                &host,
            )))
            .await
        }
        Err(e) => Ok(Err(e)),
    };
    let down = cluster::down(&cluster::DownArgs {
        dir: up.dir.clone(),
    })
    .await;
    // STE_INSTALL_KEEP_LOGS=1: the cluster directory (logs) stays for a look.
    let keep = if std::env::var_os("STE_INSTALL_KEEP_LOGS").is_some() {
        eprintln!("kept {}", dir.keep().display());
        None
    } else {
        Some(dir)
    };
    match outcome {
        Err(panic) => std::panic::resume_unwind(panic),
        Ok(Err(e)) => panic!("cluster up --real-nodes 1: {e:#}"),
        Ok(Ok(())) => {}
    }
    down.expect("cluster down");
    for port in STATIC_POD_PORTS {
        assert!(port_free(port), "127.0.0.1:{port} still taken after down");
    }
    eprintln!(
        "install test: {:.1}s in all",
        started.elapsed().as_secs_f64()
    );
    drop(keep);
}

async fn install_and_uninstall(host: &Host) -> anyhow::Result<()> {
    std::fs::create_dir_all(&host.root)?;
    host.kubeadm_layout();
    host.static_pods();

    // Before: objects of a stock cluster, and pods in the durable etcd.
    host.apply(&json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "keep-me", "namespace": "default"}, "data": {"answer": "42"}}));
    host.apply(&function_deployment());
    let before = function_pods_answer(host).await;
    let durable = host.durable_etcd();
    for name in &before {
        let key = format!("/registry/pods/default/{name}");
        assert!(
            host.etcd_keys(&durable, &key).contains(&key),
            "{key} not in the durable etcd"
        );
    }
    let configmap = host
        .kubectl_json(&["get", "configmap", "keep-me"])
        .expect("the ConfigMap");
    let deployment_uid =
        host.kubectl_json(&["get", "deployment", "fn"]).unwrap()["metadata"]["uid"].clone();

    install(host).await;
    check_installed(host).await;
    drain_is_invisible(host).await;
    uninstall(host).await;

    // After: a stock cluster; what existed before is intact.
    let now = host
        .kubectl_json(&["get", "configmap", "keep-me"])
        .expect("the ConfigMap after the uninstall");
    assert_eq!(now["metadata"]["uid"], configmap["metadata"]["uid"]);
    assert_eq!(now["data"], configmap["data"]);
    assert_eq!(
        host.kubectl_json(&["get", "deployment", "fn"]).unwrap()["metadata"]["uid"],
        deployment_uid
    );
    let after = function_pods_answer(host).await;
    let durable_keys = host.etcd_keys(&durable, "/registry/pods/");
    for name in &after {
        let key = format!("/registry/pods/default/{name}");
        assert!(
            durable_keys.contains(&key),
            "{key} not in the durable etcd after the uninstall"
        );
    }
    let mut deploy = function_deployment();
    deploy["spec"]["replicas"] = json!(3);
    host.apply(&deploy);
    let scaled = host.running("app=fn", 3, Duration::from_secs(60)).await;
    eprintln!(
        "✓ after the uninstall: ConfigMap and Deployment intact, {} pods back in the durable etcd, the Deployment scales to {}",
        after.len(),
        scaled.len()
    );
    Ok(())
}

/// docs/install.md's kubeadm section, steps 1–7.
async fn install(host: &Host) {
    let steps = doc_steps("## kubeadm (an existing cluster)");
    let numbers: Vec<u32> = steps.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, [1, 2, 3, 4, 5, 6, 7], "the page's install steps");
    for n in [1, 2, 3] {
        host.run_step(
            &format!("install step {n}"),
            step(&steps, n),
            Duration::from_secs(90),
        );
    }
    host.run_step("install step 4", step(&steps, 4), Duration::from_secs(120));
    // Real static pods of the node, from its static pod directory.
    for pod in ["ste-router", "ste-bootstrap-shard"] {
        assert!(
            host.node
                .dir
                .join("manifests")
                .join(format!("{pod}.yaml"))
                .is_file(),
            "{pod}.yaml not in the kubelet's static pod directory"
        );
        let mirror = format!("{pod}-{}", host.node.name);
        wait_for(
            &format!("{mirror} running as a container"),
            Duration::from_secs(60),
            || host.container_running(&mirror).then_some(()),
        )
        .await;
    }

    // Step 5: the switch. Here kube-apiserver is a process, not kubeadm's
    // static pod: it restarts with the flag the page's sed adds.
    eprintln!(
        "revisions before the switch: pods {}, configmaps {}",
        host.list_rv("pods"),
        host.list_rv("configmaps")
    );
    let flag = override_flag(step(&steps, 5));
    assert_eq!(
        flag,
        "--etcd-servers-overrides=/pods#https://127.0.0.1:2479"
    );
    host.restart_apiserver(|args| args.push(flag.clone())).await;
    eprintln!(
        "revisions after the switch: pods {}, configmaps {}",
        host.list_rv("pods"),
        host.list_rv("configmaps")
    );
    // Step 6: the page's etcdctl, on the durable etcd.
    assert!(step(&steps, 6).contains("del /registry/pods/ --prefix"));
    host.delete_durable_pod_keys();
    host.run_step("install step 7", step(&steps, 7), Duration::from_secs(240));
}

async fn check_installed(host: &Host) {
    let node = host.node.name.as_str();
    // The agent's pod runs its RAM etcd; its Shard joined the router.
    let agents = host.running(AGENT_LABEL, 1, Duration::from_secs(60)).await;
    let agent = agents[0]["metadata"]["name"].as_str().unwrap().to_string();
    assert!(host.container_running(&agent));
    wait_for(
        &format!("Shard {node} Active"),
        Duration::from_secs(60),
        || (shard_phase(host, node).as_deref() == Some("Active")).then_some(()),
    )
    .await;
    let metrics = wait_for(
        "the router's metrics naming the worker shard",
        Duration::from_secs(60),
        || {
            http_get(&format!("{ROUTER_ADMIN}/metrics"))
                .filter(|m| m.contains(&format!("shard=\"{node}\"")))
        },
    )
    .await;
    assert!(metrics.contains("shard=\"bootstrap\""));
    let worker = format!(
        "https://{}:2379",
        agents[0]["status"]["podIP"].as_str().unwrap()
    );
    // The pods of the Deployment made before the install came back through
    // STE: real containers, answering; stored in the shards, not the durable etcd.
    let pods = function_pods_answer(host).await;
    let in_shards: BTreeSet<String> = host
        .etcd_keys(BOOTSTRAP_SHARD, "/registry/pods/")
        .union(&host.etcd_keys(&worker, "/registry/pods/"))
        .cloned()
        .collect();
    let durable = host.etcd_keys(&host.durable_etcd(), "/registry/pods/");
    let keys = pods
        .iter()
        .map(|name| format!("/registry/pods/default/{name}"))
        .chain([format!("/registry/pods/ste-system/{agent}")]);
    for key in keys {
        assert!(
            in_shards.contains(&key),
            "{key} not in the shards: {in_shards:?}"
        );
    }
    assert!(durable.is_empty(), "pods in the durable etcd: {durable:?}");
    // The activator-bridge runs and one of its pods holds the Lease.
    let bridges = host
        .running(
            "app.kubernetes.io/name=ste-activator-bridge",
            2,
            Duration::from_secs(90),
        )
        .await;
    let names: Vec<&str> = bridges
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap())
        .collect();
    let holder = wait_for("the bridge's Lease held", Duration::from_secs(60), || {
        host.kubectl_json(&["-n", "ste-system", "get", "lease", "ste-activator-bridge"])
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(String::from))
            .filter(|h| names.contains(&h.as_str()))
    })
    .await;
    eprintln!(
        "✓ installed: Shard {node} Active, agent {agent}, {} function pods in the shards ({} keys there), bridge Lease held by {holder}",
        pods.len(),
        in_shards.len()
    );
}

/// Deleting the agent's pod: its shard drains onto the bootstrap shard and a
/// watch of every pod sees only the agent's own pods come and go.
async fn drain_is_invisible(host: &Host) {
    let node = host.node.name.as_str();
    let old = host.pods(AGENT_LABEL);
    let old_agent = old[0]["metadata"]["name"].as_str().unwrap().to_string();
    let old_uid = host.kubectl_json(&["get", "shard", node]).unwrap()["metadata"]["uid"].clone();
    // kube-apiserver's own list (kubectl's `-o json` list has no resourceVersion).
    let (code, body) = host.api.curl(&["/api/v1/pods"]).unwrap();
    assert_eq!(code, 200, "{body}");
    let list: Value = serde_json::from_str(&body).unwrap();
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!rv.is_empty(), "no resourceVersion in {body}");
    let log = host.root.join("pod-watch.json");
    let mut watch = watch_pods(&host.api, &rv, &log);
    let started = Instant::now();
    host.kubectl(&[
        "-n",
        "ste-system",
        "delete",
        "pod",
        &old_agent,
        "--wait=false",
    ])
    .expect("deleting the agent's pod");
    // The drained shard's Shard goes; at that moment every pod is on the bootstrap shard.
    wait_for("the drained Shard deleted", Duration::from_secs(90), || {
        let shard = host.kubectl_json(&["get", "shard", node]);
        shard
            .is_none_or(|s| s["metadata"]["uid"] != old_uid)
            .then_some(())
    })
    .await;
    let drained = started.elapsed();
    // The pods there before the delete (but the deleted one) were drained there.
    let bootstrap = host.etcd_keys(BOOTSTRAP_SHARD, "/registry/pods/");
    for pod in list["items"].as_array().unwrap() {
        let name = pod["metadata"]["name"].as_str().unwrap();
        let key = format!(
            "/registry/pods/{}/{name}",
            pod["metadata"]["namespace"].as_str().unwrap(),
        );
        assert!(
            name == old_agent || bootstrap.contains(&key),
            "{key} not on the bootstrap shard after the drain: {bootstrap:?}"
        );
    }
    // The DaemonSet's next pod joins again.
    let agents = host.running(AGENT_LABEL, 1, Duration::from_secs(120)).await;
    let new_agent = agents[0]["metadata"]["name"].as_str().unwrap().to_string();
    wait_for(
        &format!("Shard {node} Active again"),
        Duration::from_secs(60),
        || (shard_phase(host, node).as_deref() == Some("Active")).then_some(()),
    )
    .await;
    let _ = watch.kill();
    let _ = watch.wait();
    let events = std::fs::read_to_string(&log).unwrap();
    let mut seen = 0;
    for line in events.lines().filter(|l| !l.trim().is_empty()) {
        let event: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        seen += 1;
        let kind = event["type"].as_str().unwrap_or("");
        assert_ne!(kind, "ERROR", "the watch ended with {event}");
        let name = event["object"]["metadata"]["name"].as_str().unwrap_or("");
        if matches!(kind, "ADDED" | "DELETED") {
            assert!(
                (kind == "DELETED" && name == old_agent) || (kind == "ADDED" && name == new_agent),
                "the watch saw {kind} {name} during the drain"
            );
        }
    }
    assert!(seen > 0, "the watch saw nothing");
    eprintln!(
        "✓ drain: {} keys on the bootstrap shard {:.1}s after the delete; {seen} watch events, none ADDED/DELETED but the agent's pods",
        bootstrap.len(),
        drained.as_secs_f64()
    );
}

/// docs/install.md's uninstall, steps 1–5.
async fn uninstall(host: &Host) {
    let steps = doc_steps("## Uninstalling, back to stock etcd");
    let numbers: Vec<u32> = steps.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, [1, 2, 3, 4, 5, 6], "the page's uninstall steps");
    host.run_step(
        "uninstall step 1",
        step(&steps, 1),
        Duration::from_secs(150),
    );
    assert!(step(&steps, 2).contains("del /registry/pods/ --prefix"));
    host.delete_durable_pod_keys();
    // Step 3: the flag goes (the page's sed deletes every line naming it).
    assert!(step(&steps, 3).contains("/--etcd-servers-overrides=/d"));
    eprintln!(
        "revisions before the switch back: pods {}, configmaps {}",
        host.list_rv("pods"),
        host.list_rv("configmaps")
    );
    host.restart_apiserver(|args| args.retain(|a| !a.starts_with("--etcd-servers-overrides=")))
        .await;
    eprintln!(
        "revisions after the switch back: pods {}, configmaps {}",
        host.list_rv("pods"),
        host.list_rv("configmaps")
    );
    // Step 4: the controllers and the kubelet restart (kubeadm's are a
    // static pod each and a systemd unit; here processes).
    let text = step(&steps, 4);
    for name in [
        "kube-controller-manager",
        "kube-scheduler",
        "systemctl restart kubelet",
    ] {
        assert!(text.contains(name), "uninstall step 4 names {name}");
    }
    for name in ["kube-controller-manager", "kube-scheduler"] {
        cluster::crash_and_restart(&host.cluster, name, false)
            .await
            .expect(name);
    }
    real_node::restart_kubelet(&host.cluster, &host.node.name)
        .await
        .expect("restarting the kubelet");
    host.run_step("uninstall step 5", step(&steps, 5), Duration::from_secs(60));
    host.run_step(
        "uninstall step 6",
        step(&steps, 6),
        Duration::from_secs(120),
    );
    // The kubelet stops the static pods once their files are gone.
    wait_for("the static pods stopped", Duration::from_secs(60), || {
        STATIC_POD_PORTS.iter().all(|p| port_free(*p)).then_some(())
    })
    .await;
    wait_for("namespace ste-system gone", Duration::from_secs(90), || {
        host.kubectl(&["get", "namespace", "ste-system"])
            .is_err()
            .then_some(())
    })
    .await;
    assert!(host.kubectl(&["get", "crd", "shards.ste.dev"]).is_err());
}
