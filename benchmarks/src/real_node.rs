//! Real nodes for `ste-bench cluster up --real-nodes N`, next to kwok's fake
//! ones: per node its own containerd (root, state and socket under the
//! cluster directory; CRI with the cgroupfs driver; the CNI bridge,
//! host-local, portmap and loopback plugins on a bridge and /24 of its own;
//! the locally built pause image as sandbox) and a kubelet built from the
//! pinned `k8s.io/kubernetes` module, with its own node name, client
//! certificate (signed by the cluster's CA, made here), static pod directory,
//! ports and cgroup root. Images come from `hack/build-images.sh`
//! (`target/images/*.tar`), imported into each containerd; a node pulls
//! only from a loopback registry it was told about ([`trust_registry`],
//! [`crate::registry`]).
//!
//! Everything made is recorded in D/real-nodes.json as it is made, and
//! [`down`] removes exactly that: the kubelet, then the pods through crictl on
//! the node's own socket, containerd (and the shims it started), mounts under
//! the node's directory, the veths on the node's bridge and the bridge, the
//! cgroups, and the host paths and sysctls the kubelet changed.
//! Needs root (containerd, bridges, cgroups).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use ste_testkit::{free_port, pid_alive, upstream_binary, Api};

/// Node (and process-name) prefix of real nodes: real-node-<i>.
pub const REAL_NODE_PREFIX: &str = "real-node-";
/// The pod sandbox image `hack/build-images.sh` builds (images/pause).
pub const PAUSE_IMAGE: &str = "localhost/ste-pause:v0.1.0";
/// The function image `hack/build-images.sh` builds (images/function).
pub const FUNCTION_IMAGE: &str = "localhost/ste-function:v0.1.0";
/// What the function image answers to every request.
pub const FUNCTION_BODY: &str = "ste-function: hello\n";
/// Node label value of real nodes (`type`; kwok's are `type=kwok`).
pub const REAL_NODE_TYPE: &str = "real";
/// Pod subnets: 10.210.<k>.0/24 on bridge ste-rn<k>, k the first free on
/// this machine (bridge creation is atomic: two clusters never share one).
const SUBNET_PREFIX: &str = "10.210";
const CNI_BIN: &str = "/usr/lib/cni";
const CNI_PLUGINS: [&str; 4] = ["bridge", "host-local", "portmap", "loopback"];
/// Sysctls the kubelet sets when it starts (`setupKernelTunables`); their
/// values before are restored by `down`.
const KUBELET_SYSCTLS: [&str; 6] = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];
/// Paths outside its root directory the kubelet creates (the device plugin
/// socket is hard-coded; so is the legacy container log symlink directory).
const KUBELET_HOST_PATHS: [&str; 3] = [
    "/var/lib/kubelet",
    "/var/lib/kubelet/device-plugins",
    "/var/log/containers",
];
const RECORD: &str = "real-nodes.json";

/// A line to stderr that never panics: `cluster down` must finish removing
/// what it recorded when its output goes to a closed pipe (`| head`).
pub fn say(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}

macro_rules! say {
    ($($arg:tt)*) => {
        say(format_args!($($arg)*))
    };
}

#[derive(clap::Args, Clone, Debug)]
pub struct RealNodeArgs {
    /// Real nodes (each a kubelet and its own containerd, running the
    /// images of hack/build-images.sh), besides the kwok ones; needs root.
    /// kwok then manages only its own nodes. 0: kwok nodes only.
    #[arg(long, env = "STE_CLUSTER_REAL_NODES", default_value_t = 0)]
    pub real_nodes: usize,
    /// Where hack/build-images.sh left the image archives (*.tar), imported
    /// into each real node's containerd.
    #[arg(long, env = "STE_CLUSTER_IMAGES_DIR", default_value = "target/images")]
    pub images_dir: PathBuf,
}

impl Default for RealNodeArgs {
    fn default() -> Self {
        RealNodeArgs {
            real_nodes: 0,
            images_dir: PathBuf::from("target/images"),
        }
    }
}

/// What `up` made for the real nodes (D/real-nodes.json).
#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct RealNodesRecord {
    pub nodes: Vec<RealNode>,
    /// (sysctl, value before the first kubelet started).
    pub sysctls: Vec<(String, String)>,
    /// Host paths the kubelets need that did not exist before.
    pub created_paths: Vec<PathBuf>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RealNode {
    pub name: String,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub bridge: Option<String>,
    pub subnet: Option<String>,
    pub gateway: Option<String>,
    /// cgroup directories made for the kubelet's --cgroup-root, one per hierarchy.
    pub cgroup_dirs: Vec<PathBuf>,
    pub cgroup_root: Option<String>,
    pub containerd: Option<NodeProcess>,
    pub kubelet: Option<NodeProcess>,
    pub kubelet_port: u16,
    /// (image archive, seconds its import took).
    pub images: Vec<(String, f64)>,
    /// The nat rule (`iptables -t nat` PREROUTING spec) that takes this
    /// node's pods from the `kubernetes` Service's address to kube-apiserver.
    #[serde(default)]
    pub api_dnat: Option<Vec<String>>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NodeProcess {
    pub pid: u32,
    pub binary: String,
    pub args: Vec<String>,
    pub log: PathBuf,
}

pub fn read_record(dir: &Path) -> anyhow::Result<Option<RealNodesRecord>> {
    let path = dir.join(RECORD);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(
            serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn save(dir: &Path, record: &RealNodesRecord) -> anyhow::Result<()> {
    std::fs::write(dir.join(RECORD), serde_json::to_string_pretty(record)?)?;
    Ok(())
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn pki(dir: &Path) -> PathBuf {
    dir.join("pki")
}

/// A CA `prefix`.crt/.key (EC P-256, 10 years), made once.
fn make_ca(prefix: &Path, cn: &str) -> anyhow::Result<()> {
    let (crt, key) = (prefix.with_extension("crt"), prefix.with_extension("key"));
    if crt.is_file() {
        return Ok(());
    }
    if let Some(parent) = prefix.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let (key_s, crt_s) = (key.display().to_string(), crt.display().to_string());
    let subject = format!("/CN={cn}");
    let mut args = vec!["req", "-x509"];
    args.extend(EC_KEY);
    args.extend([
        "-keyout", &key_s, "-out", &crt_s, "-days", "3650", "-subj", &subject,
    ]);
    args.extend([
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,digitalSignature,keyCertSign",
    ]);
    run("openssl", &args).with_context(|| format!("making the CA {crt_s}"))?;
    Ok(())
}

const EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// A leaf certificate `out`.crt/.key signed by the CA `ca`.crt/.key, with
/// `subject` and the openssl extensions `ext` (key usages, SANs).
fn issue(ca: &Path, out: &Path, subject: &str, ext: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let [key, csr, crt, ext_file] =
        ["key", "csr", "crt", "ext"].map(|e| out.with_extension(e).display().to_string());
    let mut args = vec!["req", "-new"];
    args.extend(EC_KEY);
    args.extend(["-keyout", &key, "-out", &csr, "-subj", subject]);
    run("openssl", &args).with_context(|| format!("making the key {key}"))?;
    std::fs::write(&ext_file, ext)?;
    let serial = format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    let (ca_crt, ca_key) = (
        ca.with_extension("crt").display().to_string(),
        ca.with_extension("key").display().to_string(),
    );
    run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-set_serial",
            &serial,
            "-days",
            "365",
            "-out",
            &crt,
            "-extfile",
            &ext_file,
        ],
    )
    .with_context(|| format!("signing {crt}"))?;
    Ok((PathBuf::from(crt), PathBuf::from(key)))
}

/// The cluster's CA (made once per cluster directory) and a client
/// certificate `name` signed by it: CN `cn`, O `org`, clientAuth.
fn client_cert(dir: &Path, name: &str, cn: &str, org: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let ca = pki(dir).join("ca");
    make_ca(&ca, "ste-local-ca")?;
    issue(
        &ca,
        &pki(dir).join(name),
        &format!("/O={org}/CN={cn}"),
        CLIENT_EXT,
    )
}

const CLIENT_EXT: &str = "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n";

/// The `kubernetes` Service's address (first of testkit's
/// `--service-cluster-ip-range=10.0.0.0/16`) and port: what in-cluster
/// clients dial (KUBERNETES_SERVICE_HOST/PORT).
pub const KUBERNETES_SERVICE_IP: &str = "10.0.0.1";
pub const KUBERNETES_SERVICE_PORT: u16 = 443;

/// The etcd CA of a cluster with real nodes (`D/pki/etcd/ca.crt/.key`, as
/// kubeadm's `/etc/kubernetes/pki/etcd/ca`): it signs kube-apiserver's etcd
/// client certificate, so an etcd backend trusting it accepts kube-apiserver.
pub fn etcd_ca(dir: &Path) -> PathBuf {
    pki(dir).join("etcd").join("ca")
}

/// The cluster CA (`D/pki/ca.crt/.key`, kubeadm's `/etc/kubernetes/pki/ca`):
/// signs the kubelets' and kube-apiserver's certificates.
pub fn cluster_ca(dir: &Path) -> PathBuf {
    pki(dir).join("ca")
}

/// kube-apiserver's flags for real nodes, what kubeadm gives a cluster:
/// client certificates from the cluster's CA, the Node authorizer and
/// NodeRestriction, a client certificate to reach kubelets (logs, exec); a
/// serving certificate from that CA naming the `kubernetes` Service (pods
/// verify it with the kube-root-ca.crt ConfigMap), ServiceAccount admission
/// (pods get tokens), every address (pods reach it through the Service's
/// address, see [`start`]); an etcd client certificate from the etcd CA.
pub fn apiserver_args(dir: &Path, args: &mut Vec<String>) -> anyhow::Result<()> {
    let (crt, key) = client_cert(
        dir,
        "apiserver-kubelet-client",
        "kube-apiserver-kubelet-client",
        "system:masters",
    )?;
    let serving = issue(
        &cluster_ca(dir),
        &pki(dir).join("apiserver"),
        "/CN=kube-apiserver",
        &format!(
            "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n\
             subjectAltName=IP:127.0.0.1,IP:{KUBERNETES_SERVICE_IP},DNS:localhost,DNS:kubernetes,\
             DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
        ),
    )?;
    make_ca(&etcd_ca(dir), "etcd-ca")?;
    let etcd_client = issue(
        &etcd_ca(dir),
        &pki(dir).join("apiserver-etcd-client"),
        "/O=system:masters/CN=kube-apiserver-etcd-client",
        CLIENT_EXT,
    )?;
    args.retain(|a| a != "--disable-admission-plugins=ServiceAccount");
    for arg in args.iter_mut() {
        if arg == "--authorization-mode=RBAC" {
            *arg = "--authorization-mode=Node,RBAC".into();
        }
        if arg == "--bind-address=127.0.0.1" {
            *arg = "--bind-address=0.0.0.0".into();
        }
    }
    args.extend([
        format!(
            "--client-ca-file={}",
            cluster_ca(dir).with_extension("crt").display()
        ),
        format!("--kubelet-client-certificate={}", crt.display()),
        format!("--kubelet-client-key={}", key.display()),
        "--enable-admission-plugins=NodeRestriction".into(),
        // A real node's name does not resolve; its InternalIP is the bridge's address.
        "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
        format!("--tls-cert-file={}", serving.0.display()),
        format!("--tls-private-key-file={}", serving.1.display()),
        format!(
            "--etcd-cafile={}",
            etcd_ca(dir).with_extension("crt").display()
        ),
        format!("--etcd-certfile={}", etcd_client.0.display()),
        format!("--etcd-keyfile={}", etcd_client.1.display()),
    ]);
    Ok(())
}

/// kube-controller-manager's flags for real nodes: the CA published to pods
/// (ConfigMap kube-root-ca.crt) is the one that signed kube-apiserver's
/// serving certificate.
pub fn controller_manager_args(dir: &Path) -> Vec<String> {
    vec![format!(
        "--root-ca-file={}",
        cluster_ca(dir).with_extension("crt").display()
    )]
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn spawn(binary: &Path, args: &[String], log: &Path) -> anyhow::Result<NodeProcess> {
    use std::os::unix::process::CommandExt;
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    Ok(NodeProcess {
        pid: child.id(),
        binary: binary.display().to_string(),
        args: args.to_vec(),
        log: log.to_path_buf(),
    })
}

/// Starts `args.real_nodes` real nodes and waits until each is Ready.
/// `api_url` is kube-apiserver's (loopback); the kubelets authenticate with
/// certificates from [`apiserver_args`]'s CA.
pub async fn start(dir: &Path, api: &Api, args: &RealNodeArgs) -> anyhow::Result<()> {
    if !is_root() {
        bail!("--real-nodes needs root (containerd, a bridge and cgroups per node)");
    }
    for program in [
        "iptables",
        "containerd",
        "ctr",
        "runc",
        "containerd-shim-runc-v2",
        "ip",
        "openssl",
    ] {
        if which(program).is_none() {
            bail!("--real-nodes needs {program}: run hack/build-images.sh (it installs containerd, runc, buildah and the CNI plugins)");
        }
    }
    for plugin in CNI_PLUGINS {
        if !Path::new(CNI_BIN).join(plugin).is_file() {
            bail!("--real-nodes needs the CNI plugin {CNI_BIN}/{plugin}: apt-get install containernetworking-plugins");
        }
    }
    let kubelet = upstream_binary("kubelet", "STE_KUBELET_BIN")
        .context("the kubelet: run hack/build-upstream.sh kubelet")?;
    let images_dir = std::path::absolute(&args.images_dir)?;
    let mut archives: Vec<PathBuf> = std::fs::read_dir(&images_dir)
        .with_context(|| {
            format!(
                "no image archives in {}: run hack/build-images.sh",
                images_dir.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "tar"))
        .collect();
    archives.sort();
    if !archives
        .iter()
        .any(|p| p.file_name().is_some_and(|n| n == "pause.tar"))
    {
        bail!(
            "{} has no pause.tar (the pod sandbox image): run hack/build-images.sh",
            images_dir.display()
        );
    }

    let mut record = read_record(dir)?.unwrap_or_default();
    if record.sysctls.is_empty() {
        for name in KUBELET_SYSCTLS {
            let value = std::fs::read_to_string(Path::new("/proc/sys").join(name))
                .with_context(|| format!("reading sysctl {name}"))?;
            record
                .sysctls
                .push((name.to_string(), value.trim().to_string()));
        }
        for path in KUBELET_HOST_PATHS {
            if !Path::new(path).exists() {
                record.created_paths.push(PathBuf::from(path));
            }
        }
        save(dir, &record)?;
    }
    let api_url = api.url.clone();
    for i in 0..args.real_nodes {
        let name = format!("{REAL_NODE_PREFIX}{i}");
        say!("• real node {name}: containerd, images, kubelet");
        start_node(dir, &mut record, &name, &kubelet, &archives, &api_url).await?;
    }
    for node in record.nodes.clone() {
        wait_ready(api, &node, Duration::from_secs(180)).await?;
    }
    Ok(())
}

fn node_mut<'a>(record: &'a mut RealNodesRecord, name: &str) -> &'a mut RealNode {
    record
        .nodes
        .iter_mut()
        .find(|n| n.name == name)
        .expect("node recorded")
}

/// What kube-proxy would do for the one Service pods here need: the node's
/// pods dial `kubernetes` (10.0.0.1:443, KUBERNETES_SERVICE_HOST/PORT) and
/// reach kube-apiserver at the bridge address (it listens on every address).
/// Only packets from this node's bridge are touched.
fn api_dnat_rule(bridge: &str, gateway: &str, api_url: &str) -> anyhow::Result<Vec<String>> {
    let port = api_url
        .rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse::<u16>().ok())
        .with_context(|| format!("no port in kube-apiserver's URL {api_url}"))?;
    Ok([
        "-i",
        bridge,
        "-d",
        &format!("{KUBERNETES_SERVICE_IP}/32"),
        "-p",
        "tcp",
        "--dport",
        &KUBERNETES_SERVICE_PORT.to_string(),
        "-j",
        "DNAT",
        "--to-destination",
        &format!("{gateway}:{port}"),
    ]
    .map(String::from)
    .to_vec())
}

async fn start_node(
    dir: &Path,
    record: &mut RealNodesRecord,
    name: &str,
    kubelet: &Path,
    archives: &[PathBuf],
    api_url: &str,
) -> anyhow::Result<()> {
    let node_dir = dir.join("nodes").join(name);
    if node_dir.exists() {
        std::fs::remove_dir_all(&node_dir)
            .with_context(|| format!("removing the old {}", node_dir.display()))?;
    }
    for sub in [
        "containerd",
        "cni/net.d",
        "cni/ipam",
        "kubelet",
        "manifests",
        "pod-logs",
    ] {
        std::fs::create_dir_all(node_dir.join(sub))?;
    }
    let socket = node_dir.join("containerd/containerd.sock");
    record.nodes.push(RealNode {
        name: name.to_string(),
        dir: node_dir.clone(),
        socket: socket.clone(),
        bridge: None,
        subnet: None,
        gateway: None,
        cgroup_dirs: Vec::new(),
        cgroup_root: None,
        containerd: None,
        kubelet: None,
        kubelet_port: free_port(),
        images: Vec::new(),
        api_dnat: None,
    });
    save(dir, record)?;

    // The bridge and its /24: the first 10.210.<k>.0/24 no route uses whose
    // bridge name is free (`ip link add` fails on a taken name).
    let routes = run("ip", &["-4", "-o", "route", "show", "table", "all"])?;
    let mut chosen = None;
    for k in 0..=255u32 {
        let subnet = format!("{SUBNET_PREFIX}.{k}.0/24");
        if routes
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&subnet))
        {
            continue;
        }
        let bridge = format!("ste-rn{k}");
        if run("ip", &["link", "add", "name", &bridge, "type", "bridge"]).is_ok() {
            chosen = Some((k, bridge, subnet));
            break;
        }
    }
    let (k, bridge, subnet) =
        chosen.context("no free 10.210.<k>.0/24 and ste-rn<k> bridge on this machine")?;
    let gateway = format!("{SUBNET_PREFIX}.{k}.1");
    {
        let node = node_mut(record, name);
        node.bridge = Some(bridge.clone());
        node.subnet = Some(subnet.clone());
        node.gateway = Some(gateway.clone());
    }
    save(dir, record)?;
    run(
        "ip",
        &["addr", "add", &format!("{gateway}/24"), "dev", &bridge],
    )?;
    run("ip", &["link", "set", &bridge, "up"])?;
    let rule = api_dnat_rule(&bridge, &gateway, api_url)?;
    node_mut(record, name).api_dnat = Some(rule.clone());
    save(dir, record)?;
    let mut add = vec!["-t", "nat", "-A", "PREROUTING"];
    add.extend(rule.iter().map(String::as_str));
    run("iptables", &add).context("adding the nat rule to kube-apiserver for the node's pods")?;

    // The kubelet's cgroup root, in every hierarchy (cgroup v1 controllers,
    // the named systemd one and the v2 one of a hybrid host).
    let cgroup_root = format!("/{bridge}");
    let mut made = Vec::new();
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").is_file() {
        let path = base.join(&bridge);
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        made.push(path);
    } else {
        let mut hierarchies: Vec<PathBuf> = std::fs::read_dir(base)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("cgroup.procs").is_file() && !p.is_symlink())
            .collect();
        hierarchies.sort();
        for hierarchy in hierarchies {
            let path = hierarchy.join(&bridge);
            std::fs::create_dir(&path)
                .with_context(|| format!("creating cgroup {}", path.display()))?;
            made.push(path.clone());
            // A new cpuset cgroup has no CPUs or memory nodes: give it the parent's.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(value) = std::fs::read_to_string(hierarchy.join(file)) {
                    std::fs::write(path.join(file), value.trim())
                        .with_context(|| format!("writing {}", path.join(file).display()))?;
                }
            }
        }
    }
    {
        let node = node_mut(record, name);
        node.cgroup_dirs = made;
        node.cgroup_root = Some(cgroup_root.clone());
    }
    save(dir, record)?;

    // containerd: everything under the node's directory.
    let cd = node_dir.join("containerd");
    let config = format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{opt}"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{PAUSE_IMAGE}"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    netns_mounts_under_state_dir = true
    # No CAP_SYS_RESOURCE here (a VM's root may lack it): runc cannot lower
    # oom_score_adj (the sandbox's -998) below containerd's own.
    restrict_oom_score_adj = true
    enable_selinux = false
    disable_apparmor = true
    # Registries per host (certs.d/<host>/hosts.toml): a loopback
    # registry is trusted over plain HTTP by `trust_registry`.
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = "{certs_d}"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{CNI_BIN}"
      conf_dir = "{cni_conf}"
      max_conf_num = 1
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          Root = "{runc}"
"#,
        root = cd.join("root").display(),
        state = cd.join("state").display(),
        socket = socket.display(),
        opt = cd.join("opt").display(),
        cni_conf = node_dir.join("cni/net.d").display(),
        runc = cd.join("runc").display(),
        certs_d = certs_d(&node_dir).display(),
    );
    std::fs::write(cd.join("config.toml"), config)?;
    // No masquerade, no forwarding: the host reaches pods on the bridge, the
    // pods reach the host at the gateway address. Only a hostPort would make
    // portmap add iptables rules.
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": format!("ste-{name}"),
        "plugins": [
            {
                "type": "bridge", "bridge": bridge, "isGateway": false, "ipMasq": false, "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet, "gateway": gateway}]],
                    "routes": [{"dst": "0.0.0.0/0", "gw": gateway}],
                    "dataDir": node_dir.join("cni/ipam").display().to_string()
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    });
    std::fs::write(
        node_dir.join("cni/net.d/10-ste.conflist"),
        serde_json::to_string_pretty(&conflist)?,
    )?;
    let containerd_log = dir.join("logs").join(format!("{name}-containerd.log"));
    let process = spawn(
        &which("containerd").expect("checked"),
        &[format!("--config={}", cd.join("config.toml").display())],
        &containerd_log,
    )?;
    let pid = process.pid;
    node_mut(record, name).containerd = Some(process);
    save(dir, record)?;
    let socket_s = socket.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while run("ctr", &["-a", &socket_s, "version"]).is_err() {
        if !pid_alive(pid) {
            bail!(
                "containerd of {name} exited during startup; see {}",
                containerd_log.display()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "containerd of {name} did not answer within 60s; see {}",
                containerd_log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for archive in archives {
        let started = Instant::now();
        let archive_s = archive.display().to_string();
        run(
            "ctr",
            &[
                "-a", &socket_s, "-n", "k8s.io", "images", "import", &archive_s,
            ],
        )
        .with_context(|| format!("importing {archive_s} into {name}'s containerd"))?;
        node_mut(record, name)
            .images
            .push((archive_s, started.elapsed().as_secs_f64()));
    }
    save(dir, record)?;

    // The kubelet.
    let (crt, key) = client_cert(dir, name, &format!("system:node:{name}"), "system:nodes")?;
    let kubeconfig = node_dir.join("kubelet.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: ste-local
  cluster:
    server: {api_url}
    insecure-skip-tls-verify: true
users:
- name: {name}
  user:
    client-certificate: {}
    client-key: {}
contexts:
- name: ste-local
  context:
    cluster: ste-local
    user: {name}
current-context: ste-local
",
            crt.display(),
            key.display()
        ),
    )?;
    let port = node_mut(record, name).kubelet_port;
    let config = format!(
        "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {gateway}
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: AlwaysAllow}}
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root}
failSwapOn: false
staticPodPath: {manifests}
containerRuntimeEndpoint: unix://{socket}
imageServiceEndpoint: unix://{socket}
podLogsDir: {pod_logs}
# No kube-proxy here: KUBE-FIREWALL guards against its route_localnet; without
# it the kubelet adds no iptables rule.
makeIPTablesUtilChains: false
# What a node holds is the benchmarks' choice (imported, or pulled from a
# loopback registry and removed again): never collect images.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}}
serializeImagePulls: false
resolvConf: /etc/resolv.conf
",
        healthz = free_port(),
        ca = pki(dir).join("ca.crt").display(),
        manifests = node_dir.join("manifests").display(),
        socket = socket.display(),
        pod_logs = node_dir.join("pod-logs").display(),
    );
    std::fs::write(node_dir.join("kubelet-config.yaml"), config)?;
    let kubelet_args = vec![
        format!(
            "--config={}",
            node_dir.join("kubelet-config.yaml").display()
        ),
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--root-dir={}", node_dir.join("kubelet").display()),
        format!("--cert-dir={}", node_dir.join("kubelet/pki").display()),
        format!("--hostname-override={name}"),
        // The bridge's address: the kubelet refuses a loopback node IP, and
        // kube-apiserver (logs, exec) and the pods reach this one.
        format!("--node-ip={gateway}"),
        format!("--node-labels=type={REAL_NODE_TYPE}"),
    ];
    let kubelet_log = dir.join("logs").join(format!("{name}-kubelet.log"));
    let process = spawn(kubelet, &kubelet_args, &kubelet_log)?;
    node_mut(record, name).kubelet = Some(process);
    save(dir, record)?;
    Ok(())
}

/// The directory of a node's containerd registry hosts (CRI `config_path`).
fn certs_d(node_dir: &Path) -> PathBuf {
    node_dir.join("containerd").join("certs.d")
}

/// Lets every recorded real node's containerd pull images named `host/…`
/// from the plain-HTTP registry at `host` (a `hosts.toml` under its
/// `config_path`, read at each pull: no restart).
pub fn trust_registry(dir: &Path, host: &str) -> anyhow::Result<()> {
    let record = read_record(dir)?.context("no real nodes recorded")?;
    for node in &record.nodes {
        let hosts = certs_d(&node.dir).join(host);
        std::fs::create_dir_all(&hosts)?;
        std::fs::write(hosts.join("hosts.toml"), crate::registry::hosts_toml(host))?;
    }
    Ok(())
}

/// The recorded real node `name`.
pub fn node(dir: &Path, name: &str) -> anyhow::Result<RealNode> {
    read_record(dir)?
        .context("no real nodes recorded")?
        .nodes
        .into_iter()
        .find(|n| n.name == name)
        .with_context(|| format!("no real node {name} recorded"))
}

/// The names of the images in a real node's containerd (CRI namespace).
pub fn images(node: &RealNode) -> anyhow::Result<Vec<String>> {
    let socket = node.socket.display().to_string();
    Ok(run(
        "ctr",
        &["-a", &socket, "-n", "k8s.io", "images", "ls", "-q"],
    )?
    .lines()
    .map(str::trim)
    .filter(|l| !l.is_empty())
    .map(String::from)
    .collect())
}

/// Removes from a real node's containerd every image whose name contains
/// `needle` (tags and digests) and every other name of the same images (the
/// CRI names each image by its ID too, `sha256:<config>`), waiting for its
/// garbage collection (`--sync`): the layers go too unless a container
/// still uses them. Returns the names removed.
pub fn remove_images(node: &RealNode, needle: &str) -> anyhow::Result<Vec<String>> {
    let socket = node.socket.display().to_string();
    let listing = run("ctr", &["-a", &socket, "-n", "k8s.io", "images", "ls"])?;
    let names = names_of_same_images(&listing, needle);
    if !names.is_empty() {
        let mut args = vec!["-a", &socket, "-n", "k8s.io", "images", "rm", "--sync"];
        args.extend(names.iter().map(String::as_str));
        run("ctr", &args).with_context(|| format!("removing images from {}", node.name))?;
    }
    Ok(names)
}

/// From `ctr images ls` (REF TYPE DIGEST …): the names containing `needle`
/// and every name whose manifest digest is one of theirs.
pub fn names_of_same_images(listing: &str, needle: &str) -> Vec<String> {
    let rows: Vec<(&str, &str)> = listing
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?;
            Some((name, f.nth(1)?))
        })
        .collect();
    let digests: std::collections::HashSet<&str> = rows
        .iter()
        .filter(|(name, _)| name.contains(needle))
        .map(|(_, digest)| *digest)
        .collect();
    rows.iter()
        .filter(|(name, digest)| name.contains(needle) || digests.contains(digest))
        .map(|(name, _)| name.to_string())
        .collect()
}

/// Pulls `image` into a real node's containerd through the CRI (as the
/// kubelet would: the registry hosts of [`trust_registry`] apply).
pub fn pull_image(node: &RealNode, image: &str) -> anyhow::Result<()> {
    let crictl = upstream_binary("crictl", "STE_CRICTL_BIN")?;
    let endpoint = format!("unix://{}", node.socket.display());
    run(
        &crictl.display().to_string(),
        &[
            "--image-endpoint",
            &endpoint,
            "--timeout",
            "60s",
            "pull",
            image,
        ],
    )
    .with_context(|| format!("pulling {image} into {}", node.name))?;
    Ok(())
}

/// Waits until no container (running or exited) named `container` is left
/// on a real node, so an image removed after it takes its layers along.
pub async fn wait_no_container(
    node: &RealNode,
    container: &str,
    within: Duration,
) -> anyhow::Result<()> {
    let crictl = upstream_binary("crictl", "STE_CRICTL_BIN")?
        .display()
        .to_string();
    let endpoint = format!("unix://{}", node.socket.display());
    let deadline = Instant::now() + within;
    loop {
        let left = run(
            &crictl,
            &[
                "--runtime-endpoint",
                &endpoint,
                "ps",
                "-a",
                "-q",
                "--name",
                container,
            ],
        )?;
        if left.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "containers {container} still on {} after {within:?}: {}",
                node.name,
                left.split_whitespace().collect::<Vec<_>>().join(" ")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until `node` is Ready, failing early when its kubelet or containerd exits.
async fn wait_ready(api: &Api, node: &RealNode, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok((200, body)) = api.curl(&[&format!("/api/v1/nodes/{}", node.name)]) {
            let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let ready = value["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
            if ready {
                return Ok(());
            }
        }
        for (what, process) in [("kubelet", &node.kubelet), ("containerd", &node.containerd)] {
            if let Some(p) = process {
                if !pid_alive(p.pid) {
                    bail!(
                        "the {what} of {} exited; see {}",
                        node.name,
                        p.log.display()
                    );
                }
            }
        }
        if Instant::now() >= deadline {
            let log = node
                .kubelet
                .as_ref()
                .map(|p| p.log.display().to_string())
                .unwrap_or_default();
            bail!(
                "real node {} was not Ready within {}s; see {log}",
                node.name,
                within.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Stops a recorded process (if it still runs the recorded binary): its
/// process group gets SIGTERM, then SIGKILL after `grace`.
async fn stop_process(what: &str, process: &NodeProcess, grace: Duration) {
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", process.pid)).unwrap_or_default();
    let binary = Path::new(&process.binary)
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    if !pid_alive(process.pid) || !String::from_utf8_lossy(&cmdline).contains(&binary) {
        return;
    }
    let group = format!("-{}", process.pid);
    let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
    let deadline = Instant::now() + grace;
    while pid_alive(process.pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if pid_alive(process.pid) {
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(process.pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    say!("stopped {what} (pid {})", process.pid);
}

/// Stops the kubelet of node `name` and starts it again with its recorded
/// flags (as `systemctl restart kubelet`): it lists its pods afresh.
pub async fn restart_kubelet(dir: &Path, name: &str) -> anyhow::Result<()> {
    let mut record = read_record(dir)?.context("no real nodes recorded")?;
    let node = record
        .nodes
        .iter()
        .find(|n| n.name == name)
        .with_context(|| format!("no real node {name} recorded"))?;
    let old = node.kubelet.clone().context("no kubelet recorded")?;
    stop_process(&format!("{name} kubelet"), &old, Duration::from_secs(10)).await;
    if pid_alive(old.pid) {
        bail!("the kubelet of {name} (pid {}) did not stop", old.pid);
    }
    let process = spawn(Path::new(&old.binary), &old.args, &old.log)?;
    node_mut(&mut record, name).kubelet = Some(process);
    save(dir, &record)
}

/// Mount points at or under `dir` (from /proc/self/mountinfo), deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(unescape_mount)
        .filter(|p| p.starts_with(dir))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    mounts.dedup();
    mounts
}

fn unescape_mount(field: &str) -> PathBuf {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let mut out = String::new();
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(b) => out.push(b as char),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    PathBuf::from(out)
}

/// The processes whose command line names `socket` as their containerd
/// address: the shims that node's containerd started.
pub fn shims_of(socket: &Path) -> Vec<u32> {
    let socket = socket.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.first()
                .is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2"))
                && args
                    .windows(2)
                    .any(|w| w[0] == b"-address" && w[1] == socket.as_bytes())
        })
        .collect()
}

/// Removes everything `start` recorded in D/real-nodes.json (see the module
/// documentation), then the record. Missing pieces are skipped.
pub async fn down(dir: &Path) -> anyhow::Result<()> {
    let Some(record) = read_record(dir)? else {
        return Ok(());
    };
    let crictl = upstream_binary("crictl", "STE_CRICTL_BIN").ok();
    let mut problems = Vec::new();
    for node in record.nodes.iter().rev() {
        if let Some(kubelet) = &node.kubelet {
            stop_process(
                &format!("{} kubelet", node.name),
                kubelet,
                Duration::from_secs(10),
            )
            .await;
        }
        let containerd_alive = node.containerd.as_ref().is_some_and(|p| pid_alive(p.pid));
        if containerd_alive {
            let endpoint = format!("unix://{}", node.socket.display());
            match &crictl {
                Some(crictl) => {
                    let crictl = crictl.display().to_string();
                    let base = ["--runtime-endpoint", endpoint.as_str(), "--image-endpoint", endpoint.as_str(), "--timeout", "30s"];
                    let list = |args: &[&str]| -> Vec<String> {
                        let mut all = base.to_vec();
                        all.extend(args);
                        run(&crictl, &all).map(|o| o.lines().map(String::from).filter(|l| !l.is_empty()).collect()).unwrap_or_default()
                    };
                    for pod in list(&["pods", "-q"]) {
                        for verb in ["stopp", "rmp"] {
                            let mut args = base.to_vec();
                            args.extend([verb, pod.as_str()]);
                            if let Err(e) = run(&crictl, &args) {
                                problems.push(format!("{}: crictl {verb} {pod}: {e:#}", node.name));
                            }
                        }
                    }
                    for container in list(&["ps", "-a", "-q"]) {
                        let mut args = base.to_vec();
                        args.extend(["rm", "-f", container.as_str()]);
                        if let Err(e) = run(&crictl, &args) {
                            problems.push(format!("{}: crictl rm {container}: {e:#}", node.name));
                        }
                    }
                    say!("removed the pods of {}", node.name);
                }
                None => problems
                    .push(format!("{}: crictl not found (hack/build-upstream.sh crictl): pods not stopped through the CRI", node.name)),
            }
        }
        if let Some(containerd) = &node.containerd {
            stop_process(
                &format!("{} containerd", node.name),
                containerd,
                Duration::from_secs(10),
            )
            .await;
        }
        for pid in shims_of(&node.socket) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            say!("killed shim {pid} of {}", node.name);
        }
        // Containers whose runtime died with them still run in the node's
        // cgroups (a shim's children outlive it): they go by those cgroups.
        for cgroup in &node.cgroup_dirs {
            if let Err(e) = kill_cgroup_processes(cgroup).await {
                problems.push(format!("{}: {e:#}", node.name));
            }
        }
        for mount in mounts_under(&node.dir) {
            let m = mount.display().to_string();
            if run("umount", &[&m]).is_err() {
                if let Err(e) = run("umount", &["-l", &m]) {
                    problems.push(format!("{}: umount {m}: {e:#}", node.name));
                }
            }
        }
        if let Some(rule) = &node.api_dnat {
            let mut delete = vec!["-t", "nat", "-D", "PREROUTING"];
            delete.extend(rule.iter().map(String::as_str));
            let mut check = delete.clone();
            check[2] = "-C";
            if run("iptables", &check).is_ok() {
                if let Err(e) = run("iptables", &delete) {
                    problems.push(format!(
                        "{}: iptables {}: {e:#}",
                        node.name,
                        delete.join(" ")
                    ));
                }
            }
        }
        if let Some(bridge) = &node.bridge {
            // Host ends of veths whose pods were not torn down through CNI.
            if let Ok(links) = run("ip", &["-o", "link", "show", "master", bridge]) {
                for link in links.lines() {
                    if let Some(veth) = link
                        .split(": ")
                        .nth(1)
                        .map(|n| n.split('@').next().unwrap_or(n))
                    {
                        let _ = run("ip", &["link", "del", veth]);
                    }
                }
            }
            if run("ip", &["link", "show", bridge]).is_ok() {
                if let Err(e) = run("ip", &["link", "del", bridge]) {
                    problems.push(format!("{}: ip link del {bridge}: {e:#}", node.name));
                } else {
                    say!("deleted bridge {bridge}");
                }
            }
        }
        for cgroup in &node.cgroup_dirs {
            if let Err(e) = remove_cgroup(cgroup) {
                problems.push(format!("{}: cgroup {}: {e:#}", node.name, cgroup.display()));
            }
        }
        // Legacy log symlinks the kubelet made for this node's containers.
        let pod_logs = node.dir.join("pod-logs");
        if let Ok(entries) = std::fs::read_dir("/var/log/containers") {
            for entry in entries.flatten() {
                if std::fs::read_link(entry.path())
                    .is_ok_and(|target| target.starts_with(&pod_logs))
                {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        if node.dir.exists() && mounts_under(&node.dir).is_empty() {
            if let Err(e) = std::fs::remove_dir_all(&node.dir) {
                problems.push(format!(
                    "{}: removing {}: {e}",
                    node.name,
                    node.dir.display()
                ));
            }
        }
    }
    // What containerd's shims leave beside the node directories (empty).
    let nodes_dir = dir.join("nodes");
    if problems.is_empty() && nodes_dir.exists() && mounts_under(&nodes_dir).is_empty() {
        let _ = std::fs::remove_dir_all(&nodes_dir);
    }
    for (name, value) in &record.sysctls {
        let path = Path::new("/proc/sys").join(name);
        if std::fs::read_to_string(&path).is_ok_and(|now| now.trim() != value) {
            if let Err(e) = std::fs::write(&path, value) {
                problems.push(format!("restoring sysctl {name}={value}: {e}"));
            }
        }
    }
    for path in record.created_paths.iter().rev() {
        if path.exists() {
            if let Err(e) = std::fs::remove_dir_all(path) {
                problems.push(format!("removing {}: {e}", path.display()));
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "real nodes not entirely removed (record kept in {}):\n  {}",
            dir.join(RECORD).display(),
            problems.join("\n  ")
        );
    }
    std::fs::remove_file(dir.join(RECORD))?;
    Ok(())
}

/// The processes in the cgroup `path` and the cgroups under it.
fn cgroup_processes(path: &Path, into: &mut Vec<u32>) {
    if let Ok(procs) = std::fs::read_to_string(path.join("cgroup.procs")) {
        into.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                cgroup_processes(&entry.path(), into);
            }
        }
    }
}

/// SIGKILLs every process in the cgroup `path` (and below) until none is left.
async fn kill_cgroup_processes(path: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut pids = Vec::new();
        cgroup_processes(path, &mut pids);
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "processes {pids:?} of cgroup {} did not die",
                path.display()
            );
        }
        for pid in &pids {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Removes a cgroup directory and the cgroups under it, deepest first (a
/// cgroup directory is removed with rmdir; its files go with it).
fn remove_cgroup(path: &Path) -> anyhow::Result<()> {
    if !path.is_dir() {
        return Ok(());
    }
    for entry in std::fs::read_dir(path)?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup(&entry.path())?;
        }
    }
    // A cgroup whose last process just exited can be busy for a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(16) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(e).with_context(|| format!("rmdir {}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_goes_with_every_name_of_it_including_the_cris_id() {
        let listing = "\
REF                          TYPE                                                 DIGEST      SIZE    PLATFORMS   LABELS
127.0.0.1:5/ste-function@sha256:bb application/vnd.docker.distribution.manifest.v2+json sha256:bb 2.7 MiB linux/amd64 io.cri-containerd.image=managed
localhost/ste-function:v0.1.0 application/vnd.docker.distribution.manifest.v2+json sha256:aa 5.7 MiB linux/amd64 io.cri-containerd.image=managed
localhost/ste-pause:v0.1.0   application/vnd.docker.distribution.manifest.v2+json sha256:cc 240 KiB linux/amd64 io.cri-containerd.image=managed
sha256:875a                  application/vnd.docker.distribution.manifest.v2+json sha256:aa 5.7 MiB linux/amd64 io.cri-containerd.image=managed
sha256:9e61                  application/vnd.docker.distribution.manifest.v2+json sha256:cc 240 KiB linux/amd64 io.cri-containerd.image=managed
";
        assert_eq!(
            names_of_same_images(listing, "ste-function"),
            [
                "127.0.0.1:5/ste-function@sha256:bb",
                "localhost/ste-function:v0.1.0",
                "sha256:875a"
            ]
        );
        assert!(names_of_same_images(listing, "nothing").is_empty());
        assert!(names_of_same_images("", "ste-function").is_empty());
    }
}
