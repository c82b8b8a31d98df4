//! CI checks of the distribution (manifests/, hack/kind/, hack/gen-certs.sh):
//!
//! - every file under manifests/ is applied to a real kube-apiserver: the
//!   Shard CRD and the namespace for real, every other object with a
//!   server-side dry run and strict field validation, the static pods as Pods
//!   in their namespace, the ServiceMonitor and the PrometheusRule against
//!   minimal CRDs (hack/ci/); then `kubectl apply -f manifests/` exactly as
//!   the install docs say, twice (the second changes nothing);
//! - the static pods only use what a kubelet gives static pods, and the
//!   router, the bootstrap shard and the kind config agree on addresses;
//! - the kind config parses and its kubeadm patch sets the pods override;
//! - every metric the Grafana dashboard and the alerts query is exported by a
//!   real router, shard-agent or activator-bridge, and docs/operations.md
//!   shows the shipped alerts;
//! - the certificates hack/gen-certs.sh makes work end to end: a real
//!   kube-apiserver with its usual --etcd-cafile/--etcd-certfile/--etcd-keyfile
//!   stores pods through a TLS router on a TLS shard, and the router and the
//!   shard refuse clients without a certificate;
//! - every flag and environment variable the manifests pass exists in the
//!   binaries' `--help`;
//! - the install on one machine: the bootstrap shard, the router and a
//!   shard-agent started with their manifests' flags, authenticated as their
//!   own ServiceAccounts (RBAC), join, store and drain without losing a key;
//!   the activator-bridge, as its own ServiceAccount, syncs and leads;
//! - the router, with its static pod's flags, serves while kube-apiserver is
//!   down (kube-apiserver cannot start without it).
//!
//! The workspace binaries must be built first (hack/test.sh does).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use ste_testkit::{repo_root, Etcd, EtcdTls, KubeApiserver, Router};

fn manifests() -> PathBuf {
    repo_root().join("manifests")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every YAML document of a file (empty documents dropped).
fn documents(path: &Path) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(&read(path))
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// Files directly in `dir` with the given extension, sorted (kubectl's order).
fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == ext))
        .collect();
    out.sort();
    out
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(all_files(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The value of `--flag=value` in a container's command + args.
fn flag<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    let prefix = format!("--{name}=");
    ["/command", "/args"]
        .iter()
        .filter_map(|p| container.pointer(p).and_then(Value::as_array))
        .flatten()
        .filter_map(Value::as_str)
        .find_map(|arg| arg.strip_prefix(prefix.as_str()))
}

struct Kubectl {
    binary: PathBuf,
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Kubectl {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(&self.binary)
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--cache-dir={}", self.cache.display()))
            .args(args)
            .output()
            .expect("running kubectl")
    }

    /// Runs kubectl and returns its stdout; fails the test with its stderr.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "kubectl {} failed:\n{}{}",
            args.join(" "),
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Server-side dry run with strict field validation; checks that every
    /// document of the file was accepted.
    fn dry_run(&self, file: &Path) {
        let expected = documents(file).len();
        let out = self.ok(&[
            "apply",
            "--server-side",
            "--dry-run=server",
            "--validate=strict",
            "--field-manager=ste-ci",
            "-f",
            file.to_str().unwrap(),
        ]);
        let accepted = out
            .lines()
            .filter(|l| l.ends_with("(server dry run)"))
            .count();
        assert_eq!(
            accepted,
            expected,
            "{}: kubectl accepted {accepted} of {expected} objects:\n{out}",
            file.display()
        );
        println!("dry run ok: {} ({expected} objects)", file.display());
    }

    fn apply(&self, file: &Path) {
        self.ok(&[
            "apply",
            "--server-side",
            "--validate=strict",
            "--field-manager=ste-ci",
            "-f",
            file.to_str().unwrap(),
        ]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_manifest_applies_to_a_real_kube_apiserver() {
    let kubectl_binary = ste_testkit::kubectl_binary().unwrap();
    let etcd = Etcd::start("manifests").await.unwrap();
    let apiserver = KubeApiserver::start(&etcd.endpoint(), None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    apiserver.api().write_kubeconfig(&kubeconfig).unwrap();
    let kubectl = Kubectl {
        binary: kubectl_binary,
        kubeconfig,
        cache: dir.path().join("cache"),
    };
    let root = manifests();

    // Every file must be covered by one of the checks below.
    let top = files(&root, "yaml");
    let static_pods = files(&root.join("static-pods"), "yaml");
    let monitoring = files(&root.join("monitoring"), "yaml");
    let dashboards = files(&root.join("monitoring"), "json");
    let optional = files(&root.join("optional"), "yaml");
    let covered: BTreeSet<PathBuf> = top
        .iter()
        .chain(&static_pods)
        .chain(&optional)
        .chain(&monitoring)
        .chain(&dashboards)
        .cloned()
        .collect();
    for file in all_files(&root) {
        assert!(
            covered.contains(&file),
            "{} is not checked by this test: put it in manifests/, static-pods/ or monitoring/, or extend the test",
            file.display()
        );
    }

    // The Shard CRD for real: other objects may use its kind.
    let crd = root.join("00-crd-shards.yaml");
    assert!(
        top.contains(&crd),
        "manifests/00-crd-shards.yaml is missing"
    );
    kubectl.apply(&crd);
    kubectl.ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/shards.ste.dev",
    ]);
    // The namespace for real: objects cannot even be dry-run into a missing namespace.
    let namespace = root.join("01-namespace.yaml");
    kubectl.apply(&namespace);
    for file in top.iter().filter(|f| **f != crd && **f != namespace) {
        kubectl.dry_run(file);
    }

    // A Shard as the agent writes it and the router patches it.
    let shard = dir.path().join("shard.yaml");
    std::fs::write(
        &shard,
        "apiVersion: ste.dev/v1alpha1\nkind: Shard\nmetadata:\n  name: worker-1\nspec:\n  endpoint: https://10.0.3.7:2379\n  node: worker-1\n  capacityBytes: 1073741824\n  drain: false\n",
    )
    .unwrap();
    kubectl.dry_run(&shard);

    // Static pods are Pods: dry-run them in their namespace.
    assert!(
        !static_pods.is_empty(),
        "manifests/static-pods/ holds no static pod"
    );
    for file in &static_pods {
        kubectl.dry_run(file);
    }

    // The ServiceMonitor and the PrometheusRule need the Prometheus
    // operator's CRDs: minimal, strict ones (hack/ci/*-crd.yaml) stand in.
    for crd in ["servicemonitors", "prometheusrules"] {
        let singular = crd.trim_end_matches('s');
        kubectl.apply(&repo_root().join(format!("hack/ci/{singular}-crd.yaml")));
        kubectl.ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            &format!("crd/{crd}.monitoring.coreos.com"),
        ]);
    }
    for file in &monitoring {
        kubectl.dry_run(file);
    }
    // Opt-in files (optional/, not applied with the directory) go into
    // Knative's namespace.
    kubectl.ok(&["create", "namespace", "knative-serving"]);
    for file in &optional {
        kubectl.dry_run(file);
    }

    // Finally what docs/install.md says, for real, twice: the second run
    // changes no object (kubectl may still print "configured" for
    // PodDisruptionBudgets: their selector's patch strategy is "replace").
    let dir_arg = root.to_str().unwrap();
    let first = kubectl.run(&["apply", "--validate=strict", "-f", dir_arg]);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(
        first.status.success(),
        "kubectl apply -f manifests/ failed: {stderr}"
    );
    // The namespace enforces the "restricted" Pod Security Standard: the
    // workloads' pod templates must pass it (kube-apiserver warns otherwise).
    assert!(
        !stderr.contains("violate PodSecurity"),
        "a pod template breaks the namespace's Pod Security level: {stderr}"
    );
    let versions = || {
        let list: Value =
            serde_json::from_str(&kubectl.ok(&["get", "-f", dir_arg, "-o", "json"])).unwrap();
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    format!(
                        "{}/{}/{}",
                        str_at(o, "/kind"),
                        str_at(o, "/metadata/namespace"),
                        str_at(o, "/metadata/name")
                    ),
                    str_at(o, "/metadata/resourceVersion").to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    let before = versions();
    let expected: usize = top.iter().map(|f| documents(f).len()).sum();
    assert_eq!(
        before.len(),
        expected,
        "`kubectl get -f manifests/` found {} objects, the files hold {expected}",
        before.len()
    );
    kubectl.ok(&["apply", "--validate=strict", "-f", dir_arg]);
    assert_eq!(
        versions(),
        before,
        "a second `kubectl apply -f manifests/` changed objects"
    );
    let daemonset = kubectl.ok(&[
        "-n",
        "ste-system",
        "get",
        "daemonset",
        "ste-shard-agent",
        "-o",
        "jsonpath={.spec.template.spec.volumes[0].emptyDir.medium}",
    ]);
    assert_eq!(daemonset, "Memory");
}

/// The static pods run before anything else and without the API: no
/// ServiceAccount, Secret or ConfigMap (the kubelet refuses those for static
/// pods), host network, and addresses that agree with each other and with
/// kube-apiserver's override in the kind config.
#[test]
fn static_pods_use_only_what_a_kubelet_gives_them() {
    let dir = manifests().join("static-pods");
    let mut router = None;
    let mut shard = None;
    for file in files(&dir, "yaml") {
        let docs = documents(&file);
        assert_eq!(
            docs.len(),
            1,
            "{}: one Pod per static pod file",
            file.display()
        );
        let pod = &docs[0];
        let name = file.display().to_string();
        assert_eq!(str_at(pod, "/kind"), "Pod", "{name}");
        assert_eq!(str_at(pod, "/metadata/namespace"), "kube-system", "{name}");
        assert_eq!(
            pod.pointer("/spec/hostNetwork"),
            Some(&Value::Bool(true)),
            "{name}: host network"
        );
        assert!(
            pod.pointer("/spec/serviceAccountName").is_none(),
            "{name}: static pods cannot use ServiceAccounts"
        );
        assert_eq!(
            str_at(pod, "/spec/priorityClassName"),
            "system-node-critical",
            "{name}"
        );
        for volume in pod
            .pointer("/spec/volumes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            assert!(
                volume.get("hostPath").is_some() || volume.get("emptyDir").is_some(),
                "{name}: static pods can only use hostPath and emptyDir volumes, not {volume}"
            );
        }
        let text = serde_json::to_string(pod).unwrap();
        for forbidden in ["secretKeyRef", "configMapKeyRef", "envFrom", "projected"] {
            assert!(
                !text.contains(forbidden),
                "{name}: static pods cannot use {forbidden}"
            );
        }
        let container = pod.pointer("/spec/containers/0").unwrap().clone();
        match str_at(pod, "/metadata/name") {
            "ste-router" => router = Some(container),
            "ste-bootstrap-shard" => shard = Some(container),
            other => panic!("{name}: unexpected static pod {other}"),
        }
    }
    let router = router.expect("a ste-router static pod");
    let shard = shard.expect("a ste-bootstrap-shard static pod");

    // The router serves kube-apiserver on loopback, over TLS with client certificates.
    let listen = flag(&router, "listen").expect("--listen");
    assert_eq!(listen, "127.0.0.1:2479");
    for name in [
        "cert-file",
        "key-file",
        "trusted-ca-file",
        "shard-ca-file",
        "shard-cert-file",
        "shard-key-file",
        "kubeconfig",
    ] {
        assert!(
            flag(&router, name).is_some(),
            "the router static pod lacks --{name}"
        );
    }
    // It finds the bootstrap shard where the shard listens, over TLS.
    let shards = flag(&router, "shards").expect("--shards");
    let client_url = flag(&shard, "listen-client-urls").expect("--listen-client-urls");
    assert!(
        client_url.starts_with("https://127.0.0.1:"),
        "the bootstrap shard listens on loopback with TLS: {client_url}"
    );
    assert!(
        shards
            .split(',')
            .any(|s| s.ends_with(&format!("={client_url}"))),
        "--shards={shards} does not name {client_url}"
    );
    // The shard refuses clients without a certificate and keeps its data in RAM.
    assert_eq!(flag(&shard, "client-cert-auth"), Some("true"));
    assert!(flag(&shard, "trusted-ca-file").is_some());
    let shard_doc = documents(&dir.join("ste-bootstrap-shard.yaml")).remove(0);
    let data_dir = flag(&shard, "data-dir").unwrap();
    let mounts = shard_doc
        .pointer("/spec/containers/0/volumeMounts")
        .and_then(Value::as_array)
        .unwrap();
    let data_mount = mounts
        .iter()
        .find(|m| data_dir.starts_with(str_at(m, "/mountPath")))
        .expect("data dir on a volume");
    let data_volume = shard_doc
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .unwrap()
        .iter()
        .find(|v| v["name"] == data_mount["name"])
        .unwrap();
    assert_eq!(
        str_at(data_volume, "/emptyDir/medium"),
        "Memory",
        "the bootstrap shard's data is on a RAM disk"
    );

    // kube-apiserver's override (kind config) points at the router's --listen.
    assert_eq!(kind_override(), format!("/pods#https://{listen}"));
}

/// The shard-agent DaemonSet: workers only, a RAM disk with a size limit
/// inside the container's memory limit, probes, and a quota below the disk.
#[test]
fn the_shard_agent_keeps_its_etcd_in_ram_on_workers_only() {
    let docs = documents(&manifests().join("03-shard-agent.yaml"));
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    let terms = serde_json::to_string(&spec["affinity"]["nodeAffinity"]).unwrap();
    assert!(
        terms.contains("node-role.kubernetes.io/control-plane") && terms.contains("DoesNotExist"),
        "the DaemonSet must stay off control-plane nodes: {terms}"
    );
    let data = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "data")
        .expect("a data volume");
    assert_eq!(data["emptyDir"]["medium"], "Memory");
    let size_limit = quantity(
        data["emptyDir"]["sizeLimit"]
            .as_str()
            .expect("a sizeLimit on the RAM disk"),
    );
    let container = &spec["containers"][0];
    let memory_limit = quantity(
        container["resources"]["limits"]["memory"]
            .as_str()
            .expect("a memory limit"),
    );
    assert!(
        memory_limit > size_limit,
        "the RAM disk is charged to the container: limit {memory_limit} ≤ disk {size_limit}"
    );
    let quota: u64 = flag(container, "quota-bytes")
        .expect("--quota-bytes")
        .parse()
        .unwrap();
    assert!(
        quota < size_limit,
        "etcd's quota {quota} must be below the RAM disk's size {size_limit}"
    );
    for probe in ["livenessProbe", "readinessProbe"] {
        assert!(
            container.get(probe).is_some(),
            "the shard-agent lacks a {probe}"
        );
    }
    // A PodDisruptionBudget with maxUnavailable cannot cover a DaemonSet (no
    // scale subresource: the disruption controller fails on it).
    assert!(
        !docs.iter().any(|d| d["kind"] == "PodDisruptionBudget"),
        "a PodDisruptionBudget for the shard-agent DaemonSet"
    );
}

/// Bytes of a Kubernetes quantity like `2Gi` or `1536Mi`.
fn quantity(text: &str) -> u64 {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let scale: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        other => panic!("unexpected quantity unit {other} in {text}"),
    };
    number.parse::<u64>().unwrap() * scale
}

/// The `--etcd-servers-overrides` value the kind config's kubeadm patch sets.
fn kind_override() -> String {
    let path = repo_root().join("hack/kind/cluster.yaml");
    let config: Value =
        serde_saphyr::from_str(&read(&path)).expect("hack/kind/cluster.yaml is valid YAML");
    assert_eq!(config["kind"], "Cluster");
    assert_eq!(config["apiVersion"], "kind.x-k8s.io/v1alpha4");
    let mut found = Vec::new();
    for patch in config["kubeadmConfigPatches"]
        .as_array()
        .expect("kubeadmConfigPatches")
    {
        let patch: Value =
            serde_saphyr::from_str(patch.as_str().expect("a patch is a YAML string"))
                .expect("a patch parses");
        if patch["kind"] != "ClusterConfiguration" {
            continue;
        }
        match &patch["apiServer"]["extraArgs"] {
            // kubeadm v1beta3 (a map) or v1beta4 (a list of name/value).
            Value::Object(map) => found.extend(
                map.get("etcd-servers-overrides")
                    .and_then(Value::as_str)
                    .map(String::from),
            ),
            Value::Array(list) => found.extend(
                list.iter()
                    .filter(|a| a["name"] == "etcd-servers-overrides")
                    .filter_map(|a| a["value"].as_str().map(String::from)),
            ),
            _ => {}
        }
    }
    assert_eq!(
        found.len(),
        1,
        "exactly one kubeadm patch sets etcd-servers-overrides: {found:?}"
    );
    found.remove(0)
}

#[test]
fn the_kind_config_stores_pods_through_the_router() {
    let path = repo_root().join("hack/kind/cluster.yaml");
    let config: Value = serde_saphyr::from_str(&read(&path)).unwrap();
    let nodes = config["nodes"].as_array().expect("nodes");
    let roles: Vec<&str> = nodes.iter().map(|n| str_at(n, "/role")).collect();
    assert_eq!(
        roles.iter().filter(|r| **r == "control-plane").count(),
        1,
        "one control-plane node (one router): {roles:?}"
    );
    assert!(
        roles.contains(&"worker"),
        "shards run on workers: {roles:?}"
    );
    let value = kind_override();
    assert!(
        value.starts_with("/pods#https://127.0.0.1:"),
        "pods go to the local router over TLS: {value}"
    );

    // kube-apiserver exits at start when a storage backend does not answer,
    // so the static pods and everything they read are mounted at boot.
    let mounts = |node: &Value| -> Vec<(String, String)> {
        node["extraMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                (
                    str_at(m, "/hostPath").to_string(),
                    str_at(m, "/containerPath").to_string(),
                )
            })
            .collect()
    };
    let control_plane = nodes.iter().find(|n| n["role"] == "control-plane").unwrap();
    let cp_mounts = mounts(control_plane);
    let up = read(&repo_root().join("hack/kind/up.sh"));
    for (host, _) in &cp_mounts {
        if let Some(rest) = host.strip_prefix("hack/kind/state/") {
            let made = rest.split('/').next().unwrap();
            assert!(
                up.contains(&format!("$state/{made}")),
                "hack/kind/up.sh does not make {host}"
            );
        } else {
            assert!(
                repo_root().join(host).is_file(),
                "{host} is not a file of the repository"
            );
        }
    }
    let mounted = |container: &str| {
        cp_mounts
            .iter()
            .any(|(_, c)| container == c || container.starts_with(&format!("{c}/")))
    };
    for file in files(&manifests().join("static-pods"), "yaml") {
        let name = file.file_name().unwrap().to_str().unwrap();
        assert!(
            cp_mounts.contains(&(
                format!("manifests/static-pods/{name}"),
                format!("/etc/kubernetes/manifests/{name}")
            )),
            "the kind config does not put {name} into /etc/kubernetes/manifests"
        );
        for volume in documents(&file)[0]["spec"]["volumes"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let host_path = str_at(volume, "/hostPath/path");
            if !host_path.is_empty() {
                assert!(
                    mounted(host_path),
                    "{name} reads {host_path}, which the kind config does not mount"
                );
            }
        }
    }
    // The CAs kubeadm adopts (so that the router's certificates exist before it runs).
    for ca in [
        "/etc/kubernetes/pki/etcd/ca.crt",
        "/etc/kubernetes/pki/etcd/ca.key",
        "/etc/kubernetes/pki/ca.crt",
        "/etc/kubernetes/pki/ca.key",
    ] {
        assert!(mounted(ca), "the kind config does not provide {ca}");
    }
    // Every node pulls STE's images through the registry configuration.
    let patches = serde_json::to_string(&config["containerdConfigPatches"]).unwrap();
    assert!(
        patches.contains("/etc/containerd/certs.d"),
        "containerd's config_path: {patches}"
    );
    for node in nodes {
        assert!(
            mounts(node)
                .iter()
                .any(|(_, c)| c == "/etc/containerd/certs.d"),
            "a {} node without the registry configuration",
            str_at(node, "/role")
        );
    }
}

/// Metric names a Prometheus text exposition declares: sample names and,
/// from `# TYPE`, the series names of each family.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total", "_created"],
                "histogram" => &["_bucket", "_sum", "_count", "_created"],
                "summary" => &["", "_sum", "_count", "_created"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// The metric names (`ste_…`) in every query and variable of a dashboard.
fn dashboard_metrics(dashboard: &Value) -> BTreeSet<String> {
    fn walk(value: &Value, out: &mut BTreeSet<String>) {
        match value {
            Value::Object(map) => {
                for (key, item) in map {
                    if let (Some(text), true) = (
                        item.as_str(),
                        ["expr", "definition", "query"].contains(&key.as_str()),
                    ) {
                        let mut rest = text;
                        while let Some(at) = rest.find("ste_") {
                            let preceded = rest[..at]
                                .chars()
                                .last()
                                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
                            let len = rest[at..]
                                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                                .unwrap_or(rest.len() - at);
                            if !preceded {
                                out.insert(rest[at..at + len].to_string());
                            }
                            rest = &rest[at + len..];
                        }
                    }
                    walk(item, out);
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    walk(dashboard, &mut out);
    out
}

/// `GET path` on a loopback admin server: the body when it answers 200.
async fn try_http_get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    let answer = String::from_utf8_lossy(&answer).to_string();
    answer.starts_with("HTTP/1.1 200").then(|| {
        answer
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default()
    })
}

/// Waits for an admin server's /metrics and returns the names it exports.
async fn scrape(what: &str, addr: std::net::SocketAddr) -> BTreeSet<String> {
    let waiting = format!("{what} to serve /metrics on {addr}");
    ste_testkit::wait_until(&waiting, Duration::from_secs(60), || async {
        try_http_get(addr, "/metrics").await.is_some()
    })
    .await;
    exported_names(&try_http_get(addr, "/metrics").await.expect("/metrics"))
}

/// A binary of this workspace, built next to this test (`cargo test
/// --workspace --all-targets`, as hack/test.sh runs it, builds every one first).
fn built_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/manifests-… → target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(name))
        .expect("target dir");
    assert!(
        path.is_file(),
        "{} is missing: build it first (`cargo build -p {name}`; hack/test.sh builds every binary before the tests)",
        path.display()
    );
    path
}

/// A child process stopped with SIGTERM (so that it stops its own children,
/// as the shard-agent stops etcd), then SIGKILL after a deadline.
struct Process(std::process::Child);

impl Process {
    /// SIGTERM, then waits up to `within`; SIGKILL after that. Returns
    /// whether it exited by itself in time.
    fn stop(&mut self, within: Duration) -> bool {
        if let Ok(Some(_)) = self.0.try_wait() {
            return true;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        false
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(20));
    }
}

fn spawn(binary: &Path, args: &[String], log: &Path) -> Process {
    spawn_with_env(binary, args, &[], log)
}

fn spawn_with_env(binary: &Path, args: &[String], env: &[(&str, &str)], log: &Path) -> Process {
    let log = std::fs::File::create(log).expect("log file");
    Process(
        Command::new(binary)
            .args(args)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display())),
    )
}

fn loopback() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], ste_testkit::free_port()))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_and_the_alerts_query_only_metrics_the_components_export() {
    let path = manifests().join("monitoring/grafana-dashboard.json");
    let dashboard: Value = serde_json::from_str(&read(&path)).expect("the dashboard is valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(
        panels
            .iter()
            .filter(|p| p["type"] != "row")
            .all(|p| p["targets"].as_array().is_some_and(|t| !t.is_empty())),
        "every panel has a query"
    );
    let mut wanted = dashboard_metrics(&dashboard);
    assert!(!wanted.is_empty(), "the dashboard queries no ste_ metric");
    // The suggested alerts, too.
    let rules = documents(&manifests().join("monitoring/prometheus-rules.yaml"));
    let alerts = dashboard_metrics(&Value::Array(rules));
    assert!(!alerts.is_empty(), "the alerts query no ste_ metric");
    wanted.extend(alerts);
    let dir = tempfile::tempdir().unwrap();

    // The router, in process, after one write (labelled families get samples).
    let shards = ste_testkit::start_shards(2).await.unwrap();
    let router = Router::start(ste_testkit::shard_specs(&shards))
        .await
        .unwrap();
    let mut kv = ste_etcd_proto::pb::kv_client::KvClient::new(router.channel().await.unwrap());
    kv.put(ste_etcd_proto::pb::PutRequest {
        key: b"/registry/pods/default/dashboard".to_vec().into(),
        value: b"v".to_vec().into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let router_metrics = scrape("ste-router", router.admin_addr).await;

    // The shard-agent binary with a real etcd, without registering.
    let agent_admin = loopback();
    let _agent = spawn(
        &built_binary("ste-shard-agent"),
        &[
            "run".into(),
            "--no-register".into(),
            "--shard-name=dashboard".into(),
            format!(
                "--etcd-binary={}",
                ste_testkit::etcd_binary().unwrap().display()
            ),
            format!("--data-dir={}", dir.path().join("shard/data").display()),
            format!("--listen-client=http://{}", loopback()),
            format!("--listen-peer=http://{}", loopback()),
            format!("--admin-listen={agent_admin}"),
        ],
        &dir.path().join("shard-agent.log"),
    );
    let agent_metrics = scrape("ste-shard-agent", agent_admin).await;

    // The activator-bridge binary against a real kube-apiserver.
    let etcd = Etcd::start("dashboard").await.unwrap();
    let apiserver = KubeApiserver::start(&etcd.endpoint(), None).await.unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    apiserver.api().write_kubeconfig(&kubeconfig).unwrap();
    let bridge_admin = loopback();
    let _bridge = spawn(
        &built_binary("ste-activator-bridge"),
        &[
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--admin-listen={bridge_admin}"),
        ],
        &dir.path().join("activator-bridge.log"),
    );
    let bridge_metrics = scrape("ste-activator-bridge", bridge_admin).await;

    let mut missing = Vec::new();
    for name in &wanted {
        let (component, exported) = if name.starts_with("ste_router_") {
            ("ste-router", &router_metrics)
        } else if name.starts_with("ste_shard_agent_") {
            ("ste-shard-agent", &agent_metrics)
        } else if name.starts_with("ste_activator_bridge_") {
            ("ste-activator-bridge", &bridge_metrics)
        } else {
            panic!("{name}: the dashboard or the alerts query a metric of no STE component");
        };
        if !exported.contains(name) {
            missing.push(format!("{name} (not in {component}'s /metrics)"));
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard or the alerts query metrics nobody exports: {missing:?}"
    );
    println!(
        "{} dashboard metrics found in the components' /metrics: {wanted:?}",
        wanted.len()
    );
    router.stop().await.unwrap();
}

/// The `--flags` a `--help` text lists, and the environment variables it names.
fn help_words(binary: &Path, subcommand: Option<&str>) -> (BTreeSet<String>, BTreeSet<String>) {
    let out = Command::new(binary)
        .args(subcommand)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{} --help: {e}", binary.display()));
    assert!(out.status.success(), "{} --help failed", binary.display());
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let mut flags = BTreeSet::new();
    for word in text.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']') {
        if let Some(rest) = word.strip_prefix("--") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if !name.is_empty() {
                flags.insert(name);
            }
        }
    }
    let mut envs = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("[env: ") {
        rest = &rest[at + 6..];
        envs.insert(
            rest.chars()
                .take_while(|c| *c != '=' && *c != ']')
                .collect(),
        );
    }
    (flags, envs)
}

/// Every flag a manifest passes to a container (and every environment
/// variable it sets that is not only used inside the flags) is one the
/// binary really accepts: names drift, and a static pod with an unknown flag
/// is an outage.
#[test]
fn every_flag_the_manifests_pass_is_one_the_binaries_accept() {
    let root = manifests();
    let first_container = |file: &str, kind: &str| -> Value {
        let doc = documents(&root.join(file))
            .into_iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("{file}: no {kind}"));
        let pointer = if kind == "Pod" {
            "/spec/containers/0"
        } else {
            "/spec/template/spec/containers/0"
        };
        doc.pointer(pointer)
            .unwrap_or_else(|| panic!("{file}: no container"))
            .clone()
    };
    let cases = [
        (
            "static-pods/ste-router.yaml",
            "Pod",
            built_binary("ste-router"),
            None,
        ),
        (
            "03-shard-agent.yaml",
            "DaemonSet",
            built_binary("ste-shard-agent"),
            Some("run"),
        ),
        (
            "04-activator-bridge.yaml",
            "Deployment",
            built_binary("ste-activator-bridge"),
            None,
        ),
        (
            "optional/stat-tap.yaml",
            "Deployment",
            built_binary("ste-activator-bridge"),
            None,
        ),
        (
            "static-pods/ste-bootstrap-shard.yaml",
            "Pod",
            ste_testkit::etcd_binary().unwrap(),
            None,
        ),
    ];
    let mut problems = Vec::new();
    for (file, kind, binary, subcommand) in cases {
        let container = first_container(file, kind);
        let (flags, envs) = help_words(&binary, subcommand);
        let args: Vec<String> = ["/command", "/args"]
            .iter()
            .filter_map(|p| container.pointer(p).and_then(Value::as_array))
            .flatten()
            .filter_map(|a| a.as_str().map(String::from))
            .collect();
        for arg in &args {
            if let Some(rest) = arg.strip_prefix("--") {
                let name = rest.split('=').next().unwrap();
                if !flags.contains(name) {
                    problems.push(format!("{file}: {} has no --{name}", binary.display()));
                }
            } else if subcommand != Some(arg.as_str()) && !arg.starts_with('/') {
                problems.push(format!("{file}: unexpected argument {arg:?}"));
            }
        }
        for env in container["env"].as_array().into_iter().flatten() {
            let name = str_at(env, "/name");
            let used_in_args = args.iter().any(|a| a.contains(&format!("$({name})")));
            if !used_in_args && name != "RUST_LOG" && !envs.contains(name) {
                problems.push(format!(
                    "{file}: {} reads no environment variable {name}",
                    binary.display()
                ));
            }
        }
        println!(
            "{file}: {} arguments checked against {}",
            args.len(),
            binary.display()
        );
    }
    assert!(
        problems.is_empty(),
        "manifests and binaries disagree:\n{}",
        problems.join("\n")
    );
}

/// etcdctl against `endpoint` with optional (ca, cert, key); Ok(stdout) or Err(stderr).
fn etcdctl(
    endpoint: &str,
    ca: &Path,
    client: Option<(&Path, &Path)>,
    args: &[&str],
) -> Result<String, String> {
    let mut command = Command::new(ste_testkit::etcdctl_binary().unwrap());
    command
        .arg(format!("--endpoints={endpoint}"))
        .arg(format!("--cacert={}", ca.display()))
        .args(["--dial-timeout=3s", "--command-timeout=5s"]);
    if let Some((cert, key)) = client {
        command
            .arg(format!("--cert={}", cert.display()))
            .arg(format!("--key={}", key.display()));
    }
    let out = command.args(args).output().expect("running etcdctl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn gen_certs_makes_certificates_that_work_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let status = Command::new(repo_root().join("hack/gen-certs.sh"))
        .arg(&out)
        .args(["--shard-san", "10.0.0.7"])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("running hack/gen-certs.sh");
    assert!(status.success(), "hack/gen-certs.sh failed");
    let f = |name: &str| out.join(name);

    // The bootstrap shard, with the flags of its static pod: client certificates required.
    let shard = Etcd::start_tls(
        "bootstrap",
        EtcdTls {
            cert: f("bootstrap-shard.crt"),
            key: f("bootstrap-shard.key"),
            ca: f("ca.crt"),
        },
        &["--unsafe-no-fsync"],
    )
    .await
    .unwrap();
    // The shard-agent's own client certificate is accepted by a shard…
    etcdctl(
        &shard.endpoint(),
        &f("ca.crt"),
        Some((&f("shard-agent-client.crt"), &f("shard-agent-client.key"))),
        &["endpoint", "health"],
    )
    .expect("the shard-agent's client certificate is accepted");
    // …and a client without one is refused.
    let refused = etcdctl(
        &shard.endpoint(),
        &f("ca.crt"),
        None,
        &["get", "/registry/pods/", "--prefix"],
    );
    assert!(
        refused.is_err(),
        "the shard answered a client without a certificate: {refused:?}"
    );

    // The router with the files its static pod names.
    use ste_router::tls::{ClientTls, ServerTls, TlsFiles};
    let mut config = Router::test_config(ste_testkit::shard_specs(std::slice::from_ref(&shard)));
    config.server_tls = Some(
        ServerTls::load(TlsFiles {
            cert: Some(f("router-server.crt")),
            key: Some(f("router-server.key")),
            ca: Some(f("router-trusted-ca.crt")),
        })
        .expect("the router loads router-server.crt and router-trusted-ca.crt"),
    );
    config.store.shard_tls = Some(
        ClientTls::load(TlsFiles {
            cert: Some(f("router-client.crt")),
            key: Some(f("router-client.key")),
            ca: Some(f("ca.crt")),
        })
        .expect("the router loads router-client.crt"),
    );
    let router = Router::start_with(config).await.unwrap();
    let endpoint = router.endpoint();
    assert!(endpoint.starts_with("https://127.0.0.1:"), "{endpoint}");

    // kube-apiserver's client certificate writes through the router to the shard.
    let apiserver = (f("apiserver-client.crt"), f("apiserver-client.key"));
    let client = Some((apiserver.0.as_path(), apiserver.1.as_path()));
    etcdctl(
        &endpoint,
        &f("ca.crt"),
        client,
        &["put", "/registry/pods/default/tls", "v"],
    )
    .expect("put through the router");
    let got = etcdctl(
        &endpoint,
        &f("ca.crt"),
        client,
        &["get", "/registry/pods/default/tls", "--print-value-only"],
    )
    .unwrap();
    assert_eq!(got.trim(), "v");
    // The router refuses a client without a certificate…
    let refused = etcdctl(
        &endpoint,
        &f("ca.crt"),
        None,
        &["get", "/registry/pods/default/tls"],
    );
    assert!(
        refused.is_err(),
        "the router answered a client without a certificate: {refused:?}"
    );
    // …and the key really is on the shard (read with the router's own client certificate).
    let on_shard = etcdctl(
        &shard.endpoint(),
        &f("ca.crt"),
        Some((&f("router-client.crt"), &f("router-client.key"))),
        &["get", "/registry/pods/default/tls", "--keys-only"],
    )
    .unwrap();
    assert!(
        on_shard.contains("/registry/pods/default/tls"),
        "{on_shard}"
    );
    // (Not a Pod: kube-apiserver must not find it below.)
    etcdctl(
        &endpoint,
        &f("ca.crt"),
        client,
        &["del", "/registry/pods/default/tls"],
    )
    .unwrap();

    // A real kube-apiserver with its usual etcd TLS flags — one CA, client
    // certificate and key for the durable etcd and for the router alike.
    let durable = Etcd::start_tls(
        "durable",
        EtcdTls {
            cert: f("bootstrap-shard.crt"),
            key: f("bootstrap-shard.key"),
            ca: f("ca.crt"),
        },
        &[],
    )
    .await
    .unwrap();
    let flags = [
        format!("--etcd-cafile={}", f("ca.crt").display()),
        format!("--etcd-certfile={}", apiserver.0.display()),
        format!("--etcd-keyfile={}", apiserver.1.display()),
    ];
    let kube = KubeApiserver::start_with_flags(&durable.endpoint(), Some(&endpoint), &flags)
        .await
        .unwrap();
    let pod = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"through-tls"},"spec":{"containers":[{"name":"c","image":"nginx"}]}}"#;
    let (code, body) = kube
        .api()
        .send_json("POST", "/api/v1/namespaces/default/pods", pod)
        .unwrap();
    assert_eq!(code, 201, "creating a pod through the TLS router: {body}");
    let (code, body) = kube
        .api()
        .curl(&["/api/v1/namespaces/default/pods"])
        .unwrap();
    assert!(code == 200 && body.contains("through-tls"), "{code} {body}");
    // The pod is on the shard behind the router, and not in the durable etcd.
    let on_shard = etcdctl(
        &shard.endpoint(),
        &f("ca.crt"),
        Some((&f("router-client.crt"), &f("router-client.key"))),
        &["get", "/registry/pods/default/through-tls", "--keys-only"],
    )
    .unwrap();
    assert!(on_shard.contains("through-tls"), "{on_shard}");
    let durable_pods = etcdctl(
        &durable.endpoint(),
        &f("ca.crt"),
        client,
        &["get", "/registry/pods/", "--prefix", "--keys-only"],
    )
    .unwrap();
    assert!(
        durable_pods.trim().is_empty(),
        "pods in the durable etcd: {durable_pods}"
    );
    drop(kube);
    router.stop().await.unwrap();
}

/// The container's command (after the binary) and args from a manifest,
/// with host paths and addresses replaced, in order, as given.
fn localized(container: &Value, replace: &[(&str, String)]) -> Vec<String> {
    let command = container["command"]
        .as_array()
        .into_iter()
        .flatten()
        .skip(1);
    let args = container["args"].as_array().into_iter().flatten();
    command
        .chain(args)
        .filter_map(Value::as_str)
        .map(|arg| {
            replace
                .iter()
                .fold(arg.to_string(), |arg, (from, to)| arg.replace(from, to))
        })
        .collect()
}

/// The value of a sample like `name{label="value"} 3` in a metrics text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// The install, on one machine: the CRD, namespace and RBAC applied to a
/// real kube-apiserver; the bootstrap shard, the router and a shard-agent
/// started with the flags of their manifests (paths and addresses made
/// local), the certificates of hack/gen-certs.sh, and each component
/// authenticated as its own ServiceAccount — so its RBAC is what it gets.
/// The agent registers its shard, the router takes it into the ring and
/// stores keys on it; on SIGTERM the agent drains, the router moves the keys
/// off, and the Shard is deleted with no key lost.
#[tokio::test(flavor = "multi_thread")]
async fn the_components_run_with_the_manifests_flags_rbac_and_certificates() {
    let router_binary = built_binary("ste-router");
    let agent_binary = built_binary("ste-shard-agent");
    let etcd_binary = ste_testkit::etcd_binary().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let certs = dir.path().join("certs");
    let status = Command::new(repo_root().join("hack/gen-certs.sh"))
        .arg(&certs)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("running hack/gen-certs.sh");
    assert!(status.success(), "hack/gen-certs.sh failed");
    let cert = |name: &str| certs.join(name).display().to_string();

    // kube-apiserver with the CRD, the namespace and the RBAC.
    let etcd = Etcd::start("install").await.unwrap();
    let apiserver = KubeApiserver::start(&etcd.endpoint(), None).await.unwrap();
    let admin = dir.path().join("admin.conf");
    apiserver.api().write_kubeconfig(&admin).unwrap();
    let kubectl = Kubectl {
        binary: ste_testkit::kubectl_binary().unwrap(),
        kubeconfig: admin,
        cache: dir.path().join("cache"),
    };
    let root = manifests();
    for file in ["00-crd-shards.yaml", "01-namespace.yaml", "02-rbac.yaml"] {
        kubectl.apply(&root.join(file));
    }
    kubectl.ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/shards.ste.dev",
    ]);
    // Each component as its own ServiceAccount.
    let identity = |account: &str| {
        let token = kubectl.ok(&[
            "-n",
            "ste-system",
            "create",
            "token",
            account,
            "--duration=1h",
        ]);
        let file = dir.path().join(format!("{account}.conf"));
        ste_testkit::Api {
            url: apiserver.url(),
            token: token.trim().to_string(),
        }
        .write_kubeconfig(&file)
        .unwrap();
        file.display().to_string()
    };
    let router_kubeconfig = identity("ste-router");
    let agent_kubeconfig = identity("ste-shard-agent");
    let bridge_kubeconfig = identity("ste-activator-bridge");

    // The bootstrap shard: etcd with its static pod's command.
    let shard_pod = documents(&root.join("static-pods/ste-bootstrap-shard.yaml")).remove(0);
    let (client, peer, metrics) = (loopback(), loopback(), loopback());
    let bootstrap_url = format!("https://{client}");
    let _bootstrap = spawn(
        &etcd_binary,
        &localized(
            &shard_pod["spec"]["containers"][0],
            &[
                ("https://127.0.0.1:2579", bootstrap_url.clone()),
                ("http://127.0.0.1:2580", format!("http://{peer}")),
                ("http://127.0.0.1:2581", format!("http://{metrics}")),
                ("/etc/kubernetes/pki/ste/", format!("{}/", certs.display())),
                ("/var/lib/ste-shard", path("bootstrap")),
            ],
        ),
        &dir.path().join("bootstrap-shard.log"),
    );
    ste_testkit::wait_until(
        "the bootstrap shard to be ready",
        Duration::from_secs(60),
        || async { try_http_get(metrics, "/readyz").await.is_some() },
    )
    .await;

    // The router with its static pod's flags.
    let router_pod = documents(&root.join("static-pods/ste-router.yaml")).remove(0);
    let (router_addr, router_admin) = (loopback(), loopback());
    let _router = spawn(
        &router_binary,
        &localized(
            &router_pod["spec"]["containers"][0],
            &[
                ("https://127.0.0.1:2579", bootstrap_url.clone()),
                ("127.0.0.1:2479", router_addr.to_string()),
                ("0.0.0.0:2480", router_admin.to_string()),
                ("/etc/kubernetes/pki/ste/", format!("{}/", certs.display())),
                ("/etc/kubernetes/ste-router.conf", router_kubeconfig),
                ("/var/lib/ste-router/", format!("{}/", path(""))),
            ],
        ),
        &dir.path().join("router.log"),
    );
    ste_testkit::wait_until(
        "the router to be ready",
        Duration::from_secs(60),
        || async { try_http_get(router_admin, "/readyz").await.is_some() },
    )
    .await;

    // A shard-agent with the DaemonSet's flags, on "node" worker-1.
    let daemonset = documents(&root.join("03-shard-agent.yaml"))
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap();
    let (shard_client, agent_admin) = (loopback(), loopback());
    let mut agent_args = localized(
        &daemonset["spec"]["template"]["spec"]["containers"][0],
        &[
            ("https://0.0.0.0:2379", format!("https://{shard_client}")),
            ("https://$(POD_IP):2379", format!("https://{shard_client}")),
            ("/usr/local/bin/etcd", etcd_binary.display().to_string()),
            ("/var/lib/ste-shard/data", path("worker/data")),
            ("/tmp/etcd.log", path("worker-etcd.log")),
            ("/etc/ste/tls/tls.crt", cert("shard-server.crt")),
            ("/etc/ste/tls/tls.key", cert("shard-server.key")),
            ("/etc/ste/tls/ca.crt", cert("ca.crt")),
            ("/etc/ste/tls/client.crt", cert("shard-agent-client.crt")),
            ("/etc/ste/tls/client.key", cert("shard-agent-client.key")),
            ("0.0.0.0:9482", agent_admin.to_string()),
        ],
    );
    // What the pod gets from elsewhere: its peer port (default 2380, taken
    // on a shared machine) and, in a pod, the in-cluster ServiceAccount.
    agent_args.push(format!("--listen-peer=http://{}", loopback()));
    agent_args.push(format!("--kubeconfig={agent_kubeconfig}"));
    let mut agent = spawn_with_env(
        &agent_binary,
        &agent_args,
        &[("NODE_NAME", "worker-1")],
        &dir.path().join("shard-agent.log"),
    );
    let phase = || kubectl.run(&["get", "shard", "worker-1", "-o", "jsonpath={.status.phase}"]);
    ste_testkit::wait_until(
        "the router to make Shard worker-1 Active",
        Duration::from_secs(60),
        || async { String::from_utf8_lossy(&phase().stdout) == "Active" },
    )
    .await;

    // Writes through the router (as kube-apiserver: its client certificate) reach the worker shard.
    let ca = certs.join("ca.crt");
    let client_cert = (
        certs.join("apiserver-client.crt"),
        certs.join("apiserver-client.key"),
    );
    let client = Some((client_cert.0.as_path(), client_cert.1.as_path()));
    let endpoint = format!("https://{router_addr}");
    for i in 0..40 {
        etcdctl(
            &endpoint,
            &ca,
            client,
            &["put", &format!("/registry/pods/default/pod-{i:02}"), "v"],
        )
        .unwrap_or_else(|e| panic!("put through the router: {e}"));
    }
    let on_worker = sample(
        &try_http_get(router_admin, "/metrics").await.unwrap(),
        "ste_router_shard_keys{shard=\"worker-1\"}",
    );
    println!("keys on the worker shard: {on_worker:?} of 40");
    assert!(
        on_worker.is_some_and(|n| n > 0.0),
        "no key on the worker shard: {on_worker:?}"
    );

    // SIGTERM: the agent drains, the router moves every key off, the Shard goes away.
    let drain = std::time::Instant::now();
    assert!(
        agent.stop(Duration::from_secs(90)),
        "the shard-agent did not stop after its drain"
    );
    println!("drained and stopped in {:?}", drain.elapsed());
    let gone = kubectl.run(&["get", "shard", "worker-1"]);
    assert!(
        !gone.status.success() && String::from_utf8_lossy(&gone.stderr).contains("NotFound"),
        "the drained Shard was not deleted: {}",
        String::from_utf8_lossy(&gone.stdout)
    );
    let keys = etcdctl(
        &endpoint,
        &ca,
        client,
        &["get", "/registry/pods/", "--prefix", "--keys-only"],
    )
    .unwrap();
    assert_eq!(
        keys.lines().filter(|l| !l.is_empty()).count(),
        40,
        "keys lost in the drain:\n{keys}"
    );

    // The activator-bridge with its Deployment's flags, as its ServiceAccount:
    // ready once its caches synced (list/watch rights), leader once it holds
    // its Lease in ste-system (lease rights).
    let deployment = documents(&root.join("04-activator-bridge.yaml"))
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .unwrap();
    let bridge_admin = loopback();
    let mut bridge_args = localized(
        &deployment["spec"]["template"]["spec"]["containers"][0],
        &[
            ("$(POD_NAMESPACE)", "ste-system".to_string()),
            ("$(POD_NAME)", "ste-activator-bridge-0".to_string()),
            ("0.0.0.0:9464", bridge_admin.to_string()),
        ],
    );
    bridge_args.push(format!("--kubeconfig={bridge_kubeconfig}"));
    let _bridge = spawn(
        &built_binary("ste-activator-bridge"),
        &bridge_args,
        &dir.path().join("activator-bridge.log"),
    );
    ste_testkit::wait_until(
        "the activator-bridge to sync and lead with its own RBAC",
        Duration::from_secs(60),
        || async {
            try_http_get(bridge_admin, "/readyz").await.is_some()
                && try_http_get(bridge_admin, "/metrics")
                    .await
                    .and_then(|m| sample(&m, "ste_activator_bridge_leader"))
                    == Some(1.0)
        },
    )
    .await;
    let holder = kubectl.ok(&[
        "-n",
        "ste-system",
        "get",
        "lease",
        "ste-activator-bridge",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(holder, "ste-activator-bridge-0");
}

/// docs/operations.md shows the alerts of manifests/monitoring/prometheus-rules.yaml: the same rules.
#[test]
fn the_alerts_in_the_operations_doc_are_the_shipped_ones() {
    let doc = read(&repo_root().join("docs/operations.md"));
    let block = doc
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a ```yaml block in docs/operations.md");
    let shown: Value = serde_saphyr::from_str(block).expect("the doc's alerts are valid YAML");
    let shipped = documents(&manifests().join("monitoring/prometheus-rules.yaml")).remove(0);
    assert_eq!(
        shown, shipped,
        "docs/operations.md and manifests/monitoring/prometheus-rules.yaml differ"
    );
    let alerts = shipped
        .pointer("/spec/groups")
        .and_then(Value::as_array)
        .expect("groups");
    assert!(alerts
        .iter()
        .all(|g| g["rules"].as_array().is_some_and(|r| !r.is_empty())));
}

/// After a reboot the kubelet starts kube-apiserver and the router together,
/// and kube-apiserver exits unless the router answers within 20 s: the
/// router, with its static pod's flags, must serve while kube-apiserver is
/// still down (it cannot read `Shard`s yet).
#[tokio::test(flavor = "multi_thread")]
async fn the_router_static_pod_serves_while_kube_apiserver_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let status = Command::new(repo_root().join("hack/gen-certs.sh"))
        .arg(&certs)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("running hack/gen-certs.sh");
    assert!(status.success(), "hack/gen-certs.sh failed");
    let f = |name: &str| certs.join(name);
    let bootstrap = Etcd::start_tls(
        "bootstrap",
        EtcdTls {
            cert: f("bootstrap-shard.crt"),
            key: f("bootstrap-shard.key"),
            ca: f("ca.crt"),
        },
        &["--unsafe-no-fsync"],
    )
    .await
    .unwrap();
    // A kubeconfig whose kube-apiserver is not there (nothing listens).
    let kubeconfig = dir.path().join("ste-router.conf");
    ste_testkit::Api {
        url: format!("https://{}", loopback()),
        token: "none".into(),
    }
    .write_kubeconfig(&kubeconfig)
    .unwrap();
    let pod = documents(&manifests().join("static-pods/ste-router.yaml")).remove(0);
    let (addr, admin) = (loopback(), loopback());
    let _router = spawn(
        &built_binary("ste-router"),
        &localized(
            &pod["spec"]["containers"][0],
            &[
                ("https://127.0.0.1:2579", bootstrap.endpoint()),
                ("127.0.0.1:2479", addr.to_string()),
                ("0.0.0.0:2480", admin.to_string()),
                ("/etc/kubernetes/pki/ste/", format!("{}/", certs.display())),
                (
                    "/etc/kubernetes/ste-router.conf",
                    kubeconfig.display().to_string(),
                ),
                ("/var/lib/ste-router/", format!("{}/", dir.path().display())),
            ],
        ),
        &dir.path().join("router.log"),
    );
    ste_testkit::wait_until(
        "the router to serve without kube-apiserver",
        Duration::from_secs(20),
        || async { try_http_get(admin, "/readyz").await.is_some() },
    )
    .await;
    let client = (f("apiserver-client.crt"), f("apiserver-client.key"));
    etcdctl(
        &format!("https://{addr}"),
        &f("ca.crt"),
        Some((client.0.as_path(), client.1.as_path())),
        &["put", "/registry/pods/default/early", "v"],
    )
    .expect("a write through the router while kube-apiserver is down");
}

/// hack/gen-certs.sh says what is wrong with its arguments, and changes nothing.
#[test]
fn gen_certs_refuses_bad_arguments_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let run = |args: &[&str]| {
        let output = Command::new(repo_root().join("hack/gen-certs.sh"))
            .arg(&out)
            .args(args)
            .output()
            .expect("running hack/gen-certs.sh");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).to_string(),
        )
    };
    let (code, stderr) = run(&["--bogus"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("unknown argument '--bogus'"), "{stderr}");
    let (code, stderr) = run(&["--etcd-ca", "/nonexistent/ca"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot read /nonexistent/ca.crt"),
        "{stderr}"
    );
    let (code, stderr) = run(&["--days", "soon"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--days must be a number"), "{stderr}");
    assert!(!out.exists(), "a refused run created {}", out.display());
}
