//! The bridge's admission webhook on the real local control plane
//! (`ste-bench cluster up`: etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, kwok on 127.0.0.1). kube-apiserver calls the bridge over
//! HTTPS on 127.0.0.1 with a CA made here (rcgen).
//!
//! Revisions are Deployments shaped as Knative's revision Deployments (the
//! `serving.knative.dev/revision` and `revisionUID` labels on the Deployment
//! and its pods, replicas from zero): the bridge and the webhook look at
//! nothing else, and Knative's own controller and autoscaler run in
//! knative_e2e.rs. Waking a revision is the autoscaler's act: a scale of the
//! Deployment.
//!
//! Everything the tests assert comes from a watch on the revisions' pods and
//! Deployments started before the first wake, so no pod and no
//! `readyReplicas` change is missed.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::ResourceExt;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use serde_json::json;
use ste_bench::cluster::{self, Arm, ClusterRecord, RunningCluster, UpArgs};
use ste_bench::coldstart::{self, metric_sum, BridgeProcess};

const BRIDGE: &str = env!("CARGO_BIN_EXE_ste-activator-bridge");
const REVISION: &str = "serving.knative.dev/revision";
const REVISION_UID: &str = "serving.knative.dev/revisionUID";
const GATE: &str = "ste.dev/activator-bridge";
const WEBHOOK_ANNOTATION: &str = "ste.dev/activator-bridge-webhook";
const BRIDGE_ANNOTATION: &str = "ste.dev/activator-bridge";
const CONFIGURATION: &str = "ste-activator-bridge";

/// What the watch saw of one pod.
#[derive(Debug, Clone, Default)]
struct PodSeen {
    name: String,
    revision: String,
    /// nodeName in the first version seen (the pod as created).
    node_at_creation: Option<String>,
    gated_at_creation: bool,
    annotation: Option<String>,
    by_bridge: bool,
    /// When a nodeName was first seen, and whether the pod still carried the gate then.
    bound_at: Option<Instant>,
    bound_while_gated: bool,
    ever_gated: bool,
    live: bool,
    bound: bool,
}

#[derive(Default)]
struct History {
    pods: HashMap<String, PodSeen>,
    /// Per revision, the most pods live and bound at once.
    max_bound: HashMap<String, usize>,
    /// Per Deployment, every readyReplicas value seen, in order.
    ready: HashMap<String, Vec<i32>>,
}

impl History {
    fn pod(&mut self, pod: &Pod, deleted: bool) {
        let Some(uid) = pod.uid() else { return };
        let gated = pod
            .spec
            .as_ref()
            .and_then(|s| s.scheduling_gates.as_ref())
            .is_some_and(|g| g.iter().any(|g| g.name == GATE));
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        let revision = pod.labels().get(REVISION).cloned().unwrap_or_default();
        let seen = self.pods.entry(uid).or_insert_with(|| PodSeen {
            name: pod.name_any(),
            revision: revision.clone(),
            node_at_creation: node.clone(),
            gated_at_creation: gated,
            annotation: pod.annotations().get(WEBHOOK_ANNOTATION).cloned(),
            by_bridge: pod.annotations().contains_key(BRIDGE_ANNOTATION),
            ..Default::default()
        });
        seen.ever_gated |= gated;
        if node.is_some() && seen.bound_at.is_none() {
            seen.bound_at = Some(Instant::now());
            seen.bound_while_gated = gated;
        }
        seen.live = !deleted
            && pod.metadata.deletion_timestamp.is_none()
            && !matches!(phase.as_deref(), Some("Succeeded") | Some("Failed"));
        seen.bound = node.is_some();
        let bound_now = self
            .pods
            .values()
            .filter(|p| p.revision == revision && p.live && p.bound)
            .count();
        let max = self.max_bound.entry(revision).or_default();
        *max = (*max).max(bound_now);
    }
}

/// Watches the revisions' pods and Deployments into a shared history.
fn watch(client: kube::Client, history: Arc<Mutex<History>>) -> Vec<tokio::task::JoinHandle<()>> {
    let config = watcher::Config::default().labels(REVISION);
    let h = history.clone();
    let pods = watcher::watcher(
        Api::<Pod>::namespaced(client.clone(), "default"),
        config.clone(),
    )
    .default_backoff();
    let pods = tokio::spawn(async move {
        let mut pods = std::pin::pin!(pods);
        while let Some(event) = pods.next().await {
            match event {
                Ok(Event::Apply(p)) | Ok(Event::InitApply(p)) => h.lock().unwrap().pod(&p, false),
                Ok(Event::Delete(p)) => h.lock().unwrap().pod(&p, true),
                _ => {}
            }
        }
    });
    let deployments = watcher::watcher(Api::<Deployment>::namespaced(client, "default"), config)
        .default_backoff();
    let deployments = tokio::spawn(async move {
        let mut deployments = std::pin::pin!(deployments);
        while let Some(event) = deployments.next().await {
            if let Ok(Event::Apply(d)) | Ok(Event::InitApply(d)) = event {
                let ready = d
                    .status
                    .as_ref()
                    .and_then(|s| s.ready_replicas)
                    .unwrap_or(0);
                let mut h = history.lock().unwrap();
                let seen = h.ready.entry(d.name_any()).or_default();
                if seen.last() != Some(&ready) {
                    seen.push(ready);
                }
            }
        }
    });
    vec![pods, deployments]
}

/// A Deployment as Knative's revision controller makes it, at zero (or at
/// `replicas`); `gated` puts the bridge's gate in the template (a pod gated
/// and left by a bridge that died).
fn revision(name: &str, replicas: i32, gated: bool) -> Deployment {
    let labels = json!({REVISION: name, REVISION_UID: format!("uid-{name}"), "app": name});
    let mut spec = json!({
        "enableServiceLinks": false,
        "terminationGracePeriodSeconds": 0,
        "containers": [{
            "name": "user-container",
            "image": "registry.example/fn:1",
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
        }],
    });
    if gated {
        spec["schedulingGates"] = json!([{"name": GATE}]);
    }
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {REVISION_UID: format!("uid-{name}")}},
            "template": {"metadata": {"labels": labels}, "spec": spec},
        },
    }))
    .unwrap()
}

struct Certs {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

/// A CA and a serving certificate for 127.0.0.1.
fn certs(dir: &Path) -> Certs {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let paths = Certs {
        cert: dir.join("webhook.crt"),
        key: dir.join("webhook.key"),
        ca: dir.join("webhook-ca.crt"),
    };
    std::fs::write(&paths.cert, cert.pem()).unwrap();
    std::fs::write(&paths.key, key.serialize_pem()).unwrap();
    std::fs::write(&paths.ca, issuer.pem()).unwrap();
    paths
}

struct Harness {
    record: ClusterRecord,
    client: kube::Client,
    dir: PathBuf,
    certs: Certs,
    port: u16,
    history: Arc<Mutex<History>>,
}

impl Harness {
    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), "default")
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), "default")
    }

    /// The pods of one revision, now.
    async fn pods_of(&self, revision: &str) -> Vec<Pod> {
        let labels = format!("{REVISION}={revision}");
        let params = kube::api::ListParams::default().labels(&labels);
        self.pods().list(&params).await.unwrap().items
    }

    /// Waits until every pod of `revision` is being deleted (or none is left).
    async fn all_gone(&self, revision: &str, what: &str) {
        ste_testkit::wait_until(what, Duration::from_secs(30), || async {
            self.pods_of(revision)
                .await
                .iter()
                .all(|p| p.metadata.deletion_timestamp.is_some())
        })
        .await;
    }

    /// Starts a bridge; with `webhook`, waits until kube-apiserver calls it.
    async fn bridge(&self, log: &str, mode: &str, webhook: bool, extra: &[&str]) -> BridgeProcess {
        let mut flags = vec![
            "--lease-namespace=default".to_string(),
            "--lease-duration=3s".into(),
            "--renew-deadline=2s".into(),
            "--retry-period=250ms".into(),
            "--settle=5s".into(),
            "--gated-grace=3s".into(),
            format!("--mode={mode}"),
        ];
        if webhook && extra.contains(&"--webhook-self-signed") {
            // The bridge makes its certificate and registers https://LISTEN itself.
            flags.extend([
                format!("--webhook-listen=127.0.0.1:{}", self.port),
                "--webhook-timeout=1s".into(),
            ]);
        } else if webhook {
            flags.extend([
                format!("--webhook-listen=127.0.0.1:{}", self.port),
                format!("--webhook-cert-file={}", self.certs.cert.display()),
                format!("--webhook-key-file={}", self.certs.key.display()),
                format!("--webhook-ca-file={}", self.certs.ca.display()),
                format!("--webhook-url=https://127.0.0.1:{}/mutate-pods", self.port),
                "--webhook-timeout=1s".into(),
            ]);
        }
        flags.extend(extra.iter().map(|f| f.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let bridge = BridgeProcess::start(
            Path::new(BRIDGE),
            &self.record,
            &self.dir.join(format!("{log}.log")),
            &flags,
        )
        .await
        .unwrap();
        wait_metric(&bridge, "ste_activator_bridge_leader", 1.0).await;
        if webhook {
            self.webhook_effective(&bridge).await;
        }
        bridge
    }

    /// kube-apiserver picks up a new configuration within a moment: create
    /// (dry run) revision pods until the webhook has seen one.
    async fn webhook_effective(&self, bridge: &BridgeProcess) {
        let probe: Pod = serde_json::from_value(json!({
            "metadata": {"generateName": "probe-", "labels": {REVISION: "probe"}},
            "spec": {"containers": [{"name": "c", "image": "x"}]},
        }))
        .unwrap();
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let _ = self.pods().create(&dry, &probe).await;
            let m = bridge.metrics().await.unwrap();
            if metric_sum(&m, "ste_activator_bridge_webhook_admissions_total") >= 1.0 {
                return;
            }
            assert!(Instant::now() < deadline, "webhook never called: {m:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn scale(&self, names: &[String], replicas: i32) -> Instant {
        let at = Instant::now();
        let patches = names.iter().map(|n| {
            let api = self.deployments();
            async move {
                api.patch(
                    n,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"replicas": replicas}})),
                )
                .await
            }
        });
        for r in futures::future::join_all(patches).await {
            r.unwrap();
        }
        at
    }

    /// Every revision has exactly `want` live pods, all bound, Ready and
    /// ungated, for `hold`.
    async fn converged(&self, names: &[String], want: usize, within: Duration) {
        let deadline = Instant::now() + within;
        let hold = Duration::from_secs(2);
        let mut since: Option<Instant> = None;
        loop {
            let pods = self
                .pods()
                .list(&kube::api::ListParams::default().labels(REVISION))
                .await
                .unwrap();
            let mut per: BTreeMap<String, Vec<&Pod>> = BTreeMap::new();
            for p in pods
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
            {
                per.entry(p.labels()[REVISION].clone()).or_default().push(p);
            }
            let bad: Vec<String> = names
                .iter()
                .filter(|n| {
                    let pods = per.get(*n).map(Vec::as_slice).unwrap_or(&[]);
                    pods.len() != want || !pods.iter().all(|p| ready_and_bound(p))
                })
                .cloned()
                .collect();
            if bad.is_empty() {
                let s = *since.get_or_insert_with(Instant::now);
                if s.elapsed() >= hold {
                    return;
                }
            } else {
                since = None;
                if Instant::now() > deadline {
                    let detail: Vec<String> = bad
                        .iter()
                        .take(5)
                        .map(|n| {
                            let pods = per.get(n).map(Vec::as_slice).unwrap_or(&[]);
                            format!(
                                "{n}: {:?}",
                                pods.iter()
                                    .map(|p| (
                                        p.name_any(),
                                        p.spec.as_ref().and_then(|s| s.node_name.clone()),
                                        ready_and_bound(p)
                                    ))
                                    .collect::<Vec<_>>()
                            )
                        })
                        .collect();
                    panic!(
                        "{} revisions not at {want} Ready bound pods: {detail:?}",
                        bad.len()
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Back to zero, and every pod gone.
    async fn to_zero(&self, names: &[String]) {
        self.scale(names, 0).await;
        ste_testkit::wait_until("revisions' pods gone", Duration::from_secs(60), || async {
            let pods = self
                .pods()
                .list(&kube::api::ListParams::default().labels(REVISION))
                .await
                .unwrap();
            pods.items
                .iter()
                .all(|p| !names.contains(&p.labels()[REVISION]))
        })
        .await;
        // The Deployments' status too, so a later wake starts from 0 ready.
        ste_testkit::wait_until(
            "revisions' status at zero",
            Duration::from_secs(60),
            || async {
                let all = self.deployments().list(&Default::default()).await.unwrap();
                all.items
                    .iter()
                    .filter(|d| names.contains(&d.name_any()))
                    .all(|d| {
                        let s = d.status.clone().unwrap_or_default();
                        s.ready_replicas.unwrap_or(0) == 0 && s.replicas.unwrap_or(0) == 0
                    })
            },
        )
        .await;
    }
}

fn ready_and_bound(p: &Pod) -> bool {
    let bound = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
    let gated = p
        .spec
        .as_ref()
        .and_then(|s| s.scheduling_gates.as_ref())
        .is_some_and(|g| !g.is_empty());
    let ready = p
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    bound && !gated && ready
}

async fn wait_metric(bridge: &BridgeProcess, series: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = bridge.metrics().await.unwrap();
        if metric_sum(&m, series) >= at_least {
            return;
        }
        assert!(Instant::now() < deadline, "{series} < {at_least}: {m:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn setup(prefix: &str, nodes: usize) -> (tempfile::TempDir, RunningCluster, Harness) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let record = cluster::up(&UpArgs {
        arm: Arm::Stock,
        shards: 1,
        nodes,
        events_to_ste: false,
        client_qps: None,
        fsync_delay: None,
        apiserver_env: Vec::new(),
        apiserver_bin: None,
        audit: false,
        dir: dir.clone(),
    })
    .await
    .expect("cluster up");
    let running = RunningCluster::new(record.clone());
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&record.kubeconfig).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let history = Arc::new(Mutex::new(History::default()));
    let harness = Harness {
        certs: certs(&dir),
        port: ste_testkit::free_port(),
        client,
        dir,
        record,
        history,
    };
    (tmp, running, harness)
}

async fn create_revisions(h: &Harness, names: &[String], gated: bool) {
    for n in names {
        h.deployments()
            .create(&PostParams::default(), &revision(n, 0, gated))
            .await
            .unwrap();
    }
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// No gated pod ever bound; per revision at most `want` pods live and bound
/// at once (no duplicate reached a node); readyReplicas never went down.
fn assert_no_duplicate_reached_a_node(
    h: &Harness,
    revisions: &[String],
    max_bound: Option<usize>,
    want: usize,
) -> usize {
    let history = h.history.lock().unwrap();
    let mut gated = 0;
    for p in history
        .pods
        .values()
        .filter(|p| revisions.contains(&p.revision))
    {
        assert!(!p.bound_while_gated, "gated pod bound: {p:?}");
        if p.gated_at_creation {
            gated += 1;
        }
    }
    for r in revisions {
        if let Some(limit) = max_bound {
            let max = history.max_bound.get(r).copied().unwrap_or(0);
            assert!(max <= limit, "{r}: {max} pods bound at once, want {limit}");
        }
        // Ready up to the wanted count never goes down (a surplus Ready pod
        // removed is not a flap of the revision).
        let ready = history.ready.get(r).cloned().unwrap_or_default();
        let cap = want as i32;
        let capped: Vec<i32> = ready.iter().map(|&v| v.min(cap)).collect();
        assert!(
            capped.windows(2).all(|w| w[1] >= w[0]),
            "{r}: readyReplicas went down during the wake: {ready:?}"
        );
    }
    gated
}

/// One revision: its pod is created already bound (nodeName in the first
/// version the watch sees, annotation `bound`), the scheduler never binds
/// it, no other pod exists. Then aggressive mode with the webhook and 25
/// revisions at once: duplicates gated and counted, none bound, Ready never
/// flaps. Then the bridge killed mid-burst and restarted: the sweep frees a
/// gated pod still wanted and no gated pod remains. Then the webhook down
/// and then hanging: pods still created and scheduled by the scheduler.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_binds_at_creation_gates_duplicates_and_fails_open() {
    let burst: usize = std::env::var("STE_BRIDGE_E2E_REVISIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25);
    let (tmp, _running, h) = setup("bridge-webhook-", 10).await;
    let _keep = keep_dir(tmp);
    let leases = coldstart::keep_node_leases(&h.record).unwrap();
    let watchers = watch(h.client.clone(), h.history.clone());
    let one = vec!["solo".to_string()];
    let many = names("burst", burst);
    let below = names("below", 2);
    let down = names("down", 3);
    let hung = names("hung", 2);
    let mut all: Vec<String> = one
        .iter()
        .chain(&many)
        .chain(&below)
        .chain(&down)
        .chain(&hung)
        .cloned()
        .collect();
    all.push("left-gated".into());
    create_revisions(&h, &all[..all.len() - 1], false).await;
    create_revisions(&h, &["left-gated".to_string()], true).await;

    // 1. Webhook only, one revision.
    let bridge = h.bridge("bridge-webhook", "webhook", true, &[]).await;
    let started = Instant::now();
    h.scale(&one, 1).await;
    h.converged(&one, 1, Duration::from_secs(30)).await;
    eprintln!("solo: converged {:?} after the wake", started.elapsed());
    let pod = {
        let history = h.history.lock().unwrap();
        let pods: Vec<PodSeen> = history
            .pods
            .values()
            .filter(|p| p.revision == "solo")
            .cloned()
            .collect();
        assert_eq!(pods.len(), 1, "exactly one pod ever created: {pods:?}");
        pods[0].clone()
    };
    assert!(pod.node_at_creation.is_some(), "bound at creation: {pod:?}");
    assert_eq!(pod.annotation.as_deref(), Some("bound"), "{pod:?}");
    assert!(
        !pod.by_bridge,
        "the ReplicaSet controller created it: {pod:?}"
    );
    // The scheduler never bound it: no Scheduled event (give the recorder time).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(h.client.clone(), "default");
    let scheduled = events
        .list(
            &kube::api::ListParams::default().fields(&format!("involvedObject.name={}", pod.name)),
        )
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Scheduled"))
        .count();
    assert_eq!(scheduled, 0, "the scheduler bound {}", pod.name);
    let m = bridge.metrics().await.unwrap();
    assert_eq!(
        m["ste_activator_bridge_webhook_admissions_total{verdict=\"bound\"}"], 1.0,
        "{m:?}"
    );
    assert_eq!(
        metric_sum(&m, "ste_activator_bridge_duplicates_gated_total"),
        0.0
    );
    assert_eq!(
        metric_sum(&m, "ste_activator_bridge_pods_created_total"),
        0.0
    );
    bridge.stop();

    // 1b. Aggressive mode below its burst threshold, with a certificate the
    // bridge made itself: it creates nothing, the webhook binds the
    // controller's pods; on SIGTERM it deletes its configuration.
    let bridge = h
        .bridge(
            "bridge-below-burst",
            "aggressive",
            true,
            &[
                "--webhook-self-signed",
                "--webhook-unregister-on-exit",
                "--burst-threshold=10",
            ],
        )
        .await;
    h.scale(&below, 1).await;
    h.converged(&below, 1, Duration::from_secs(30)).await;
    wait_metric(&bridge, "ste_activator_bridge_decisions_total", 2.0).await;
    let m = bridge.metrics().await.unwrap();
    // Each wake is seen twice in aggressive mode (the Deployment's and the
    // ReplicaSet's 0→1): every decision is below_burst.
    assert_eq!(
        m.get("ste_activator_bridge_decisions_total{decision=\"below_burst\"}")
            .copied()
            .unwrap_or(0.0),
        metric_sum(&m, "ste_activator_bridge_decisions_total"),
        "{m:?}"
    );
    assert_eq!(
        metric_sum(&m, "ste_activator_bridge_pods_created_total"),
        0.0
    );
    assert_eq!(
        m["ste_activator_bridge_webhook_admissions_total{verdict=\"bound\"}"], 2.0,
        "{m:?}"
    );
    {
        let history = h.history.lock().unwrap();
        let pods: Vec<&PodSeen> = history
            .pods
            .values()
            .filter(|p| below.contains(&p.revision))
            .collect();
        assert_eq!(pods.len(), 2, "no duplicate: {pods:?}");
        assert!(
            pods.iter().all(|p| p.node_at_creation.is_some()),
            "{pods:?}"
        );
    }
    bridge.stop();
    let configurations = Api::<
        k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration,
    >::all(h.client.clone());
    assert!(
        configurations
            .get_opt(CONFIGURATION)
            .await
            .unwrap()
            .is_none(),
        "--webhook-unregister-on-exit deleted the configuration"
    );

    // 2. Aggressive mode with the webhook: a burst.
    let bridge = h.bridge("bridge-aggressive", "aggressive", true, &[]).await;
    let started = Instant::now();
    h.scale(&many, 2).await;
    h.converged(&many, 2, Duration::from_secs(120)).await;
    eprintln!(
        "burst of {burst}: converged {:?} after the wake",
        started.elapsed()
    );
    // The sweep deletes surplus gated pods the ReplicaSet controller left.
    wait_no_gated(&h, &many).await;
    let m = bridge.metrics().await.unwrap();
    let gated = assert_no_duplicate_reached_a_node(&h, &many, Some(2), 2);
    eprintln!("burst of {burst}: {gated} duplicates gated at creation; bridge: {m:?}");
    assert_eq!(
        metric_sum(&m, "ste_activator_bridge_duplicates_gated_total"),
        gated as f64,
        "every duplicate counted"
    );
    assert_eq!(
        metric_sum(&m, "ste_activator_bridge_gates_removed_total"),
        0.0,
        "{m:?}"
    );
    assert!(
        metric_sum(&m, "ste_activator_bridge_pods_created_total") >= 1.0,
        "{m:?}"
    );
    // The bridge's own pods are created with a node: kube-apiserver's
    // matchConditions skip the webhook call for them.
    assert_eq!(
        m.get("ste_activator_bridge_webhook_admissions_total{verdict=\"already_bound\"}")
            .copied()
            .unwrap_or(0.0),
        0.0,
        "{m:?}"
    );
    assert_eq!(
        metric_sum(&m, "ste_activator_bridge_api_errors_total"),
        0.0,
        "{m:?}"
    );

    // 3. Killed mid-burst, restarted: nothing gated stays.
    h.to_zero(&many).await;
    {
        let mut history = h.history.lock().unwrap();
        history.ready.clear();
        history.max_bound.clear();
        history.pods.clear();
    }
    h.scale(&many, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = bridge.pid();
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &killed.to_string()])
        .status();
    drop(bridge);
    // A pod left gated by a bridge that died, still wanted: only the sweep can free it.
    h.scale(&["left-gated".to_string()], 1).await;
    ste_testkit::wait_until("the left-gated pod", Duration::from_secs(30), || async {
        h.history
            .lock()
            .unwrap()
            .pods
            .values()
            .any(|p| p.revision == "left-gated" && p.ever_gated)
    })
    .await;
    let bridge = h.bridge("bridge-restarted", "aggressive", true, &[]).await;
    h.converged(&many, 2, Duration::from_secs(120)).await;
    h.converged(&["left-gated".to_string()], 1, Duration::from_secs(60))
        .await;
    wait_no_gated(&h, &many).await;
    // While no webhook runs, the ReplicaSet controller's late pods go to the
    // scheduler as before the webhook existed: only Ready is checked here.
    let gated = assert_no_duplicate_reached_a_node(&h, &many, None, 2);
    let m = bridge.metrics().await.unwrap();
    eprintln!("restart mid-burst: {gated} pods gated at creation; restarted bridge: {m:?}");
    assert!(
        metric_sum(&m, "ste_activator_bridge_gates_removed_total") >= 1.0,
        "{m:?}"
    );
    bridge.stop();

    // 4. Webhook down: the configuration stays, nothing listens.
    let started = Instant::now();
    h.scale(&down, 1).await;
    h.converged(&down, 1, Duration::from_secs(60)).await;
    eprintln!(
        "webhook down: converged {:?} after the wake",
        started.elapsed()
    );
    {
        let history = h.history.lock().unwrap();
        for p in history.pods.values().filter(|p| down.contains(&p.revision)) {
            assert!(
                p.node_at_creation.is_none() && p.annotation.is_none(),
                "{p:?}"
            );
        }
    }
    // 5. Webhook hanging: accepts connections, never answers; timeoutSeconds 1.
    let hang = tokio::net::TcpListener::bind(("127.0.0.1", h.port))
        .await
        .unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    let hanging = tokio::spawn(async move {
        while let Ok((s, _)) = hang.accept().await {
            keep.lock().unwrap().push(s);
        }
    });
    let started = Instant::now();
    h.scale(&hung, 1).await;
    h.converged(&hung, 1, Duration::from_secs(60)).await;
    eprintln!(
        "webhook hanging: converged {:?} after the wake",
        started.elapsed()
    );
    assert!(
        !held.lock().unwrap().is_empty(),
        "kube-apiserver called the hanging webhook"
    );
    hanging.abort();
    let _ = Api::<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>::all(
        h.client.clone(),
    )
    .delete(CONFIGURATION, &DeleteParams::default())
    .await;
    for w in watchers {
        w.abort();
    }
    leases.abort();
}

/// Sends a signal to a process group; SIGCONT again when dropped, so a
/// failing test never leaves kube-controller-manager frozen.
struct Frozen(u32);

impl Frozen {
    fn new(pid: u32) -> Self {
        signal(pid, "STOP");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{sig}"), "--".into(), format!("-{pid}")])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} -{pid}");
}

/// The controller of a pod: (kind, uid).
fn controller_of(p: &Pod) -> Option<(String, String)> {
    p.owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| (o.kind.clone(), o.uid.clone()))
}

/// Aggressive mode with kube-controller-manager frozen (SIGSTOP): neither the
/// Deployment controller nor the ReplicaSet controller acts. The bridge's pod
/// serves at once, held by the Deployment (nothing may delete it: the
/// ReplicaSet controller ignores pods another controller owns). A wake undone
/// while frozen: the bridge deletes its own pod, and a late pod of its
/// ReplicaSet is gated, never bound, and deleted. When the controllers resume,
/// the ReplicaSet controller's late pod is gated, the bridge hands its pod to
/// the ReplicaSet and the gated one goes: one pod ever bound, Ready never
/// goes down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn held_pods_serve_while_the_controllers_are_frozen_then_are_handed_over() {
    let (tmp, _running, h) = setup("bridge-held-", 2).await;
    let _keep = keep_dir(tmp);
    let leases = coldstart::keep_node_leases(&h.record).unwrap();
    let watchers = watch(h.client.clone(), h.history.clone());
    let held = vec!["held".to_string()];
    let undone = vec!["undone".to_string()];
    let both: Vec<String> = held.iter().chain(&undone).cloned().collect();
    create_revisions(&h, &both, false).await;
    let rses: Api<k8s_openapi::api::apps::v1::ReplicaSet> =
        Api::namespaced(h.client.clone(), "default");
    ste_testkit::wait_until(
        "the revisions' ReplicaSets",
        Duration::from_secs(60),
        || async {
            let list = rses
                .list(&kube::api::ListParams::default().labels(REVISION))
                .await
                .unwrap();
            both.iter()
                .all(|n| list.items.iter().any(|rs| rs.labels()[REVISION] == *n))
        },
    )
    .await;
    let bridge = h.bridge("bridge-held", "aggressive", true, &[]).await;
    let kcm = h
        .record
        .pid_of("kube-controller-manager")
        .expect("kube-controller-manager in the record");

    let frozen = Frozen::new(kcm);
    h.scale(&both, 1).await;
    let held_by_deployment = |p: &Pod| {
        controller_of(p).is_some_and(|(kind, _)| kind == "Deployment") && ready_and_bound(p)
    };
    ste_testkit::wait_until(
        "each revision's pod Ready, held by its Deployment, controllers frozen",
        Duration::from_secs(30),
        || async {
            let pods = h
                .pods()
                .list(&kube::api::ListParams::default().labels(REVISION))
                .await
                .unwrap();
            both.iter().all(|n| {
                let of: Vec<&Pod> = pods
                    .items
                    .iter()
                    .filter(|p| p.labels()[REVISION] == *n)
                    .collect();
                of.len() == 1 && held_by_deployment(of[0])
            })
        },
    )
    .await;
    let served = h.pods_of("held").await[0].uid().unwrap();

    // Undone before the controllers ever saw it: the bridge removes its pod.
    h.scale(&undone, 0).await;
    h.all_gone("undone", "the undone revision's pod deleted by the bridge")
        .await;
    // The ReplicaSet controller acting late on the undone wake, from a cache
    // still at 1 (seen at 6 wakes/s: such a pod was bound once the bridge's
    // was gone): the revision is back at zero, so it is gated, never bound,
    // and the sweep deletes it as surplus.
    let undone_rs = rses
        .list(&kube::api::ListParams::default().labels(&format!("{REVISION}=undone")))
        .await
        .unwrap()
        .items
        .remove(0);
    h.pods()
        .create(&PostParams::default(), &late_pod(&undone_rs))
        .await
        .unwrap();
    h.all_gone("undone", "the late pod gated, then deleted as surplus")
        .await;

    drop(frozen);
    h.converged(&held, 1, Duration::from_secs(60)).await;
    // "undone" went 0→1→0 while frozen: the resumed Deployment controller
    // may still act on the 1 it reads first, as it would without the
    // bridge; nothing of it may stay.
    h.all_gone("undone", "nothing of the undone revision left")
        .await;
    let rs_uid = rses
        .list(&kube::api::ListParams::default().labels(&format!("{REVISION}=held")))
        .await
        .unwrap()
        .items[0]
        .uid()
        .unwrap();
    ste_testkit::wait_until(
        "the served pod handed to the ReplicaSet, nothing gated left",
        Duration::from_secs(30),
        || async {
            let pods = h.pods_of("held").await;
            pods.len() == 1
                && pods[0].uid().as_deref() == Some(served.as_str())
                && controller_of(&pods[0]) == Some(("ReplicaSet".to_string(), rs_uid.clone()))
        },
    )
    .await;
    let gated = assert_no_duplicate_reached_a_node(&h, &held, Some(1), 1);
    {
        let history = h.history.lock().unwrap();
        let undone_pods: Vec<&PodSeen> = history
            .pods
            .values()
            .filter(|p| p.revision == "undone")
            .collect();
        let late: Vec<&&PodSeen> = undone_pods.iter().filter(|p| !p.by_bridge).collect();
        assert!(
            !late.is_empty()
                && late
                    .iter()
                    .all(|p| p.gated_at_creation && p.bound_at.is_none()),
            "the undone revision's late pods gated, never bound: {undone_pods:?}"
        );
        let bound: Vec<&PodSeen> = history
            .pods
            .values()
            .filter(|p| p.revision == "held" && p.bound_at.is_some())
            .collect();
        assert_eq!(bound.len(), 1, "one pod ever bound: {bound:?}");
        assert!(bound[0].by_bridge, "{bound:?}");
    }
    let m = bridge.metrics().await.unwrap();
    eprintln!("frozen controllers: {gated} pods gated at creation; bridge: {m:?}");
    assert_eq!(gated, 1, "the ReplicaSet controller's late pod was gated");
    assert!(
        metric_sum(&m, "ste_activator_bridge_handed_over_total") >= 1.0,
        "{m:?}"
    );
    assert!(
        metric_sum(&m, "ste_activator_bridge_held_deleted_total") >= 1.0,
        "{m:?}"
    );
    bridge.stop();
    for w in watchers {
        w.abort();
    }
    leases.abort();
}

/// A pod of `rs` as the ReplicaSet controller makes it.
fn late_pod(rs: &k8s_openapi::api::apps::v1::ReplicaSet) -> Pod {
    let template = rs.spec.as_ref().unwrap().template.clone().unwrap();
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": format!("{}-", rs.name_any()),
            "namespace": "default",
            "labels": template.metadata.as_ref().and_then(|m| m.labels.clone()),
            "ownerReferences": [{
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": rs.name_any(),
                "uid": rs.uid().unwrap(),
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        "spec": template.spec,
    }))
    .unwrap()
}

/// No gated pod of these revisions left.
async fn wait_no_gated(h: &Harness, revisions: &[String]) {
    ste_testkit::wait_until("no gated pod left", Duration::from_secs(30), || async {
        let pods = h
            .pods()
            .list(&kube::api::ListParams::default().labels(REVISION))
            .await
            .unwrap();
        !pods.items.iter().any(|p| {
            revisions.contains(&p.labels()[REVISION])
                && p.spec
                    .as_ref()
                    .and_then(|s| s.scheduling_gates.as_ref())
                    .is_some_and(|g| !g.is_empty())
        })
    })
    .await;
}

fn keep_dir(tmp: tempfile::TempDir) -> Option<tempfile::TempDir> {
    if std::env::var_os("STE_KEEP_TEST_DIR").is_some() {
        eprintln!("keeping {}", tmp.keep().display());
        None
    } else {
        Some(tmp)
    }
}

/// One line of the measurement's table.
struct Row {
    setting: &'static str,
    p50: f64,
    p95: f64,
    extra: usize,
    gated: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Wake → first pod bound per revision, per bridge setting, 1/5/25
/// revisions, in one cluster (printed; run with --ignored --nocapture).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "measurement, about 12 minutes on a loaded 2-core machine: cargo test -p ste-activator-bridge --test webhook_e2e -- --ignored --nocapture"]
async fn wake_to_bound_by_bridge_setting() {
    let (tmp, _running, h) = setup("bridge-webhook-bench-", 20).await;
    let _keep = keep_dir(tmp);
    let leases = coldstart::keep_node_leases(&h.record).unwrap();
    let watchers = watch(h.client.clone(), h.history.clone());
    let revisions = names("rev", 25);
    create_revisions(&h, &revisions, false).await;
    let rounds: [(usize, usize); 3] = [(1, 10), (5, 10), (25, 2)];
    type Setting<'a> = (&'a str, Option<&'a str>, bool, &'a [&'a str]);
    let settings: [Setting; 5] = [
        ("none", None, false, &[]),
        ("aggressive", Some("aggressive"), false, &[]),
        ("webhook", Some("webhook"), true, &[]),
        ("aggressive+webhook", Some("aggressive"), true, &[]),
        (
            "aggressive+webhook, burst ≥ 10/s",
            Some("aggressive"),
            true,
            &["--burst-threshold=10"],
        ),
    ];
    let mut table: BTreeMap<(usize, usize), Row> = BTreeMap::new();
    // Arms interleaved per repetition: each round runs every setting in turn.
    let mut samples: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    let mut duplicates: BTreeMap<(usize, usize), (usize, usize)> = BTreeMap::new();
    for (size, reps) in rounds {
        for _ in 0..reps {
            for (si, (_, mode, webhook, extra)) in settings.iter().enumerate() {
                let bridge = match mode {
                    Some(mode) => Some(
                        h.bridge(&format!("bench-{si}-{size}"), mode, *webhook, extra)
                            .await,
                    ),
                    None => None,
                };
                let wake = &revisions[..size];
                h.history.lock().unwrap().pods.clear();
                let at = h.scale(wake, 1).await;
                h.converged(wake, 1, Duration::from_secs(120)).await;
                {
                    let history = h.history.lock().unwrap();
                    for r in wake {
                        let first = history
                            .pods
                            .values()
                            .filter(|p| &p.revision == r)
                            .filter_map(|p| p.bound_at)
                            .min()
                            .expect("bound");
                        samples
                            .entry((size, si))
                            .or_default()
                            .push(first.duration_since(at).as_secs_f64() * 1000.0);
                    }
                    let created = history.pods.len();
                    let gated = history
                        .pods
                        .values()
                        .filter(|p| p.gated_at_creation)
                        .count();
                    let d = duplicates.entry((size, si)).or_default();
                    d.0 += created - size;
                    d.1 += gated;
                }
                if let Some(b) = bridge {
                    b.stop();
                }
                if *webhook {
                    let _ = Api::<
                        k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration,
                    >::all(h.client.clone())
                    .delete(CONFIGURATION, &DeleteParams::default())
                    .await;
                }
                h.to_zero(wake).await;
            }
        }
    }
    for ((size, si), mut v) in samples {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let (extra, gated) = duplicates[&(size, si)];
        table.insert(
            (size, si),
            Row {
                setting: settings[si].0,
                p50: percentile(&v, 50.0),
                p95: percentile(&v, 95.0),
                extra,
                gated,
            },
        );
    }
    println!("| revisions | bridge | wake → pod bound p50 (ms) | p95 (ms) | p50 × none | p95 × none | extra pods created | of them gated |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for ((size, _), r) in &table {
        let none = &table[&(*size, 0)];
        println!(
            "| {size} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {} | {} |",
            r.setting,
            r.p50,
            r.p95,
            r.p50 / none.p50,
            r.p95 / none.p95,
            r.extra,
            r.gated
        );
    }
    for w in watchers {
        w.abort();
    }
    leases.abort();
}
