//! A Knative cold start on a real node, up to the first HTTP response
//! through Knative's own activator (issue 14, real-node half).
//!
//! Knative's controller and autoscaler run as host processes
//! ([`crate::knative::processes::Knative`]); this module adds the activator
//! (`knative-activator`, built by hack/build-upstream.sh at the pinned
//! release). Revision pods run on a real node (kubelet + containerd, see
//! [`crate::real_node`]): the function image as the user container, and
//! Knative's queue-proxy (`hack/build-images.sh queue-proxy`, under the name
//! config-deployment's `queue-sidecar-image` gives) as its sidecar. The
//! activator reaches pod IPs from the host, as the real-node test shows the
//! host can.
//!
//! The activator finds the autoscaler at a name it builds itself,
//! `autoscaler.knative-serving.svc.cluster.local:8080`, and there is no
//! cluster DNS here: it runs in a mount namespace of its own whose
//! `/etc/hosts` (bind-mounted, nothing on the host changes) maps that name to
//! 127.0.0.1, where the autoscaler listens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use k8s_openapi::api::core::v1::{Endpoints, Event, Pod};
use kube::api::{ListParams, PostParams};

use crate::api::{client_for, collection_version, dynamic, list_json, resource, resource_of};
use crate::cluster::ClusterRecord;
use crate::knative::hops::{Hop, HopWatch};
use crate::knative::objects::{self, REVISION_LABEL};
use crate::measure::{all_open, watch_objects_started};
use crate::real_node::{FUNCTION_BODY, FUNCTION_IMAGE};

/// The activator's HTTP/1 port (networking.BackendHTTPPort), on every address.
pub const ACTIVATOR_PORT: u16 = 8012;
/// The image config-deployment's `queue-sidecar-image` names
/// (hack/knative/serving-ste.yaml); `hack/build-images.sh queue-proxy`.
pub const QUEUE_IMAGE: &str = "gcr.io/knative-releases/knative.dev/serving/cmd/queue:v1.15.2";
/// Where the activator looks for the autoscaler (pkgnet.GetServiceHostname).
const AUTOSCALER_HOST: &str = "autoscaler.knative-serving.svc.cluster.local";

#[derive(Debug, thiserror::Error)]
pub enum RealError {
    #[error("{what}: {detail}")]
    Io { what: String, detail: String },
    #[error("knative-activator exited ({status}); see {log}")]
    Exited { status: String, log: PathBuf },
    #[error("knative-activator not ready within {within:?} (is port {ACTIVATOR_PORT} free? its stat connection to the autoscaler up?); see {log}")]
    NotReady { within: Duration, log: PathBuf },
    #[error("request to {revision} through the activator: {detail}")]
    Request { revision: String, detail: String },
    #[error("{0}")]
    Cluster(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RealError {
    let what = what.into();
    move |e| RealError::Io {
        what,
        detail: e.to_string(),
    }
}

fn cluster_err(e: impl std::fmt::Display) -> RealError {
    RealError::Cluster(e.to_string())
}

/// Knative's activator as a host process, killed (and reaped) on drop.
pub struct ActivatorProcess {
    child: Child,
    log: PathBuf,
}

impl Drop for ActivatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `/etc/hosts` as the host has it, plus the autoscaler's service name.
fn hosts_file(dir: &Path) -> Result<PathBuf, RealError> {
    let mut hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    hosts.push_str(&format!(
        "\n127.0.0.1 {AUTOSCALER_HOST} autoscaler.knative-serving.svc\n"
    ));
    let path = dir.join("activator-hosts");
    std::fs::write(&path, hosts).map_err(io(format!("writing {}", path.display())))?;
    Ok(path)
}

impl ActivatorProcess {
    /// Starts `knative-activator` (or `STE_KNATIVE_ACTIVATOR_BIN`) with the
    /// environment its release Deployment sets, its log in `logs`, and waits
    /// (`within`) until it answers a kubelet probe with 200: it does once its
    /// stat connection to the autoscaler is up.
    pub async fn start(
        record: &ClusterRecord,
        logs: &Path,
        within: Duration,
    ) -> Result<ActivatorProcess, RealError> {
        let binary = ste_testkit::upstream_binary("knative-activator", "STE_KNATIVE_ACTIVATOR_BIN")
            .map_err(cluster_err)?;
        std::fs::create_dir_all(logs).map_err(io(format!("creating {}", logs.display())))?;
        let hosts = hosts_file(logs)?;
        let log = logs.join("knative-activator.log");
        let out = std::fs::File::create(&log).map_err(io(format!("creating {}", log.display())))?;
        let err = out.try_clone().map_err(io("log file"))?;
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
            .arg(&hosts)
            .arg(&binary)
            .arg(format!("--kubeconfig={}", record.kubeconfig.display()))
            .env("SYSTEM_NAMESPACE", "knative-serving")
            .env("POD_NAME", "activator-0")
            // Not in activator-service's Endpoints (none here): the throttler
            // then takes every pod of a revision (assignSlice, index -1).
            .env("POD_IP", "10.0.0.4")
            .env("CONFIG_LOGGING_NAME", "config-logging")
            .env("CONFIG_OBSERVABILITY_NAME", "config-observability")
            .env("METRICS_DOMAIN", "knative.dev/internal/serving")
            .env("PROFILING_PORT", "0")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io("starting unshare (util-linux) for knative-activator"))?;
        let mut activator = ActivatorProcess { child, log };
        activator.wait_ready(within).await?;
        Ok(activator)
    }

    async fn wait_ready(&mut self, within: Duration) -> Result<(), RealError> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + within;
        loop {
            self.check()?;
            let probe = http
                .get(format!("http://127.0.0.1:{ACTIVATOR_PORT}/"))
                .header("User-Agent", "kube-probe/1.34")
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if probe.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(RealError::NotReady {
                    within,
                    log: self.log.clone(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Fails if the activator exited.
    pub fn check(&mut self) -> Result<(), RealError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(RealError::Exited {
                status: status.to_string(),
                log: self.log.clone(),
            }),
            Ok(None) => Ok(()),
            Err(e) => Err(io("waiting on knative-activator")(e)),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A Knative Service of the function image (as Knative's webhook would
/// leave it, see [`objects::service`]): min-scale 0, one pod at creation
/// (`initial-scale: 1`) that the autoscaler then takes to zero.
pub fn function_service(name: &str) -> Value {
    let mut service = objects::service(name, "100m");
    let template = &mut service["spec"]["template"];
    template["metadata"]["annotations"]["autoscaling.knative.dev/initial-scale"] = json!("1");
    template["metadata"]["annotations"]["autoscaling.knative.dev/min-scale"] = json!("0");
    template["spec"]["containers"][0]["image"] = json!(FUNCTION_IMAGE);
    service
}

/// Creates [`function_service`] `name` in the record's namespace.
pub async fn create_function_service(record: &ClusterRecord, name: &str) -> Result<(), RealError> {
    create_function_service_of(record, name, FUNCTION_IMAGE).await
}

/// [`create_function_service`] of another image of the function (its
/// digest in a loopback registry, [`crate::registry`]).
pub async fn create_function_service_of(
    record: &ClusterRecord,
    name: &str,
    image: &str,
) -> Result<(), RealError> {
    let mut service = function_service(name);
    service["spec"]["template"]["spec"]["containers"][0]["image"] = json!(image);
    service["metadata"]["namespace"] = json!(record.namespace);
    let client = client_for(record).map_err(cluster_err)?;
    let services = dynamic(
        &client,
        &record.namespace,
        &resource("serving.knative.dev", "v1", "Service", "services"),
    );
    let object = serde_json::from_value(service).map_err(cluster_err)?;
    services
        .create(&PostParams::default(), &object)
        .await
        .map_err(|e| RealError::Cluster(format!("creating Knative Service {name}: {e}")))?;
    Ok(())
}

/// One request through the activator, as Knative's ingress sends it: the
/// revision in `Knative-Serving-Revision` / `Knative-Serving-Namespace`
/// (the activator routes on these), the Service's host in `Host`.
pub async fn request(
    namespace: &str,
    service: &str,
    timeout: Duration,
) -> Result<(u16, String), RealError> {
    let revision = objects::revision_of(service);
    let err = |detail: String| RealError::Request {
        revision: revision.clone(),
        detail,
    };
    let response = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{ACTIVATOR_PORT}/"))
        .header("Host", format!("{service}.{namespace}.example.com"))
        .header("Knative-Serving-Revision", &revision)
        .header("Knative-Serving-Namespace", namespace)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| err(e.to_string()))?;
    let status = response.status().as_u16();
    let body = response.text().await.map_err(|e| err(e.to_string()))?;
    Ok((status, body))
}

/// The hops of a real cold start, in order, as named in the tables.
/// The hops of a real cold start, as named in the tables: the path to the
/// first response, then what Kubernetes shows after it. Knative's activator
/// does not wait for the pod to be Ready: it probes the pod IPs of the
/// private Endpoints' `notReadyAddresses` itself (queue-proxy answers once
/// the user container does), so the first response can come before the
/// pod's Ready condition and its ready address.
pub const REAL_HOPS: [&str; 9] = [
    "deployment scaled",
    "pod created",
    "pod bound",
    "container started",
    IP_LISTED,
    FIRST_RESPONSE,
    "pod Ready",
    "private Endpoints",
    "private EndpointSlice",
];
/// The pod's IP in the revision's private Endpoints, ready or not.
pub const IP_LISTED: &str = "pod IP in private Endpoints (not ready)";
pub const FIRST_RESPONSE: &str = "first response";
/// Hops in order on the path to the first response (each seen, none before
/// the one before it); the pod IP listed is not ordered against the
/// container start (one kubelet status update can carry both).
const PATH: [[&str; 2]; 6] = [
    ["deployment scaled", "pod created"],
    ["pod created", "pod bound"],
    ["pod bound", "container started"],
    ["pod bound", IP_LISTED],
    ["container started", FIRST_RESPONSE],
    [IP_LISTED, FIRST_RESPONSE],
];

/// One cold start: milliseconds from the request sent to each hop, and what
/// came back.
#[derive(Clone, Debug, Serialize)]
pub struct RealWake {
    pub revision: String,
    pub ms: BTreeMap<String, f64>,
    pub status: u16,
    pub body: String,
}

impl RealWake {
    /// Whether the function's own body came back with 200.
    pub fn answered(&self) -> bool {
        self.status == 200 && self.body == FUNCTION_BODY
    }

    /// Hops of the path to the first response (and the pod's Ready) not
    /// seen, or seen before the hop they follow.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = REAL_HOPS[..7]
            .iter()
            .filter(|hop| !self.ms.contains_key(**hop))
            .map(|hop| format!("{hop}: not seen"))
            .collect();
        for [before, after] in PATH {
            if let (Some(a), Some(b)) = (self.ms.get(before), self.ms.get(after)) {
                if b + skew(after) < *a {
                    out.push(format!("{after}: {b} ms, before {before} ({a} ms)"));
                }
            }
        }
        out
    }
}

/// How much earlier than the hop before it a hop may be seen and still be in
/// order. The watched hops arrive on this bench's watches (0.5 ms: rounding
/// of one clock). The first response is timed by the client itself, and the
/// activator that forwards it learns the pod's IP from a watch of its own,
/// which is not ordered with ours: one CI run saw the answer 1.7 ms before
/// our watch showed the IP. A response that did not go through the listed
/// pod would come hundreds of ms earlier, and is still caught.
fn skew(after: &str) -> f64 {
    if after == FIRST_RESPONSE {
        10.0
    } else {
        0.5
    }
}

/// Whether the revision's user container runs in `pod`.
fn container_started(revision: &str, pod: &Value) -> bool {
    pod["metadata"]["labels"][REVISION_LABEL] == revision
        && pod["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["name"] == "user-container" && c["state"]["running"].is_object())
}

/// Whether `endpoints` is the revision's private Endpoints with an
/// address, ready or not.
fn ip_listed(revision: &str, endpoints: &Value) -> bool {
    endpoints["metadata"]["name"] == format!("{revision}-private")
        && endpoints["subsets"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| {
                ["addresses", "notReadyAddresses"]
                    .iter()
                    .any(|k| s[*k].as_array().is_some_and(|a| !a.is_empty()))
            })
}

type FirstSeen = Arc<Mutex<Option<(Instant, Value)>>>;

/// Watches a collection of the record's namespace (`pods`, `endpoints`,
/// `events`) from now and keeps when `matches` first held, and the object.
async fn first_seen(
    record: &ClusterRecord,
    collection: kube::api::ApiResource,
    matches: impl Fn(&Value) -> bool + Send + 'static,
) -> Result<(FirstSeen, tokio::task::JoinHandle<()>), RealError> {
    let client = client_for(record).map_err(cluster_err)?;
    let rv = collection_version(&dynamic(&client, &record.namespace, &collection))
        .await
        .map_err(cluster_err)?;
    let seen: FirstSeen = Arc::default();
    let at = seen.clone();
    let (task, opened) = watch_objects_started(record, &collection, &rv, move |object, now| {
        if matches(object) {
            at.lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(|| (now, object.clone()));
        }
    })
    .map_err(cluster_err)?;
    // Open before the request: what follows is timed as it happens.
    all_open(vec![opened], Duration::from_secs(10))
        .await
        .map_err(cluster_err)?;
    Ok((seen, task))
}

/// Sends one request through the activator to `service`'s revision (at
/// zero) and follows every hop until the response, and then the
/// pod's Ready and ready addresses (20 s at most). `timeout` bounds the request.
pub async fn cold_start(
    record: &ClusterRecord,
    service: &str,
    timeout: Duration,
) -> Result<RealWake, RealError> {
    Ok(cold_start_detailed(record, service, timeout).await?.0)
}

/// The user container's image events of a revision's pod (kubelet's
/// `Pulling` / `Pulled`, `reason`).
fn image_event(revision: &str, reason: &'static str, event: &Value) -> bool {
    event["reason"] == reason
        && event["involvedObject"]["kind"] == "Pod"
        && event["involvedObject"]["fieldPath"] == "spec.containers{user-container}"
        && event["involvedObject"]["name"]
            .as_str()
            .is_some_and(|n| n.starts_with(&format!("{revision}-")))
}

/// [`cold_start`], and where the pod ran and what the kubelet said about
/// its image (pulled or already there).
pub async fn cold_start_detailed(
    record: &ClusterRecord,
    service: &str,
    timeout: Duration,
) -> Result<(RealWake, WakeDetail), RealError> {
    let revision = objects::revision_of(service);
    let watch = HopWatch::start(record).await.map_err(cluster_err)?;
    let rev = revision.clone();
    let (started, pods) = first_seen(record, resource_of::<Pod>(), move |p| {
        container_started(&rev, p)
    })
    .await?;
    let rev = revision.clone();
    let (listed, endpoints) = first_seen(record, resource_of::<Endpoints>(), move |e| {
        ip_listed(&rev, e)
    })
    .await?;
    let rev = revision.clone();
    let (pulling, pulling_task) = first_seen(record, resource_of::<Event>(), move |e| {
        image_event(&rev, "Pulling", e)
    })
    .await?;
    let rev = revision.clone();
    let (pulled, pulled_task) = first_seen(record, resource_of::<Event>(), move |e| {
        image_event(&rev, "Pulled", e)
    })
    .await?;
    let sent = Instant::now();
    watch.woke(&revision, sent);
    let answer = request(&record.namespace, service, timeout).await;
    let answered = Instant::now();
    // After the response: the pod's Ready (kubelet's probe of queue-proxy)
    // and its ready addresses, 20 s at most.
    let after = Instant::now() + Duration::from_secs(20);
    let later = [Hop::PodReady, Hop::Endpoints, Hop::EndpointSlice];
    while !later.iter().all(|h| watch.reached(&revision, *h)) && Instant::now() < after {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ms: BTreeMap<String, f64> = watch
        .wakes()
        .into_iter()
        .filter(|w| w.revision == revision)
        .flat_map(|w| w.ms.into_iter().map(|(h, ms)| (h.name().to_string(), ms)))
        .collect();
    watch.stop();
    for task in [pods, endpoints, pulling_task, pulled_task] {
        task.abort();
    }
    let at =
        |t: Instant| (t.saturating_duration_since(sent).as_secs_f64() * 10_000.0).round() / 10.0;
    let seen = |s: &FirstSeen| s.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let image = seen(&pulled).and_then(|(_, e)| parse_pulled(e["message"].as_str()?));
    let detail = WakeDetail {
        node: seen(&started).and_then(|(_, p)| Some(p["spec"]["nodeName"].as_str()?.to_string())),
        image: image.clone(),
    };
    let pull_hops = [(IMAGE_PULLING, &pulling), (IMAGE_PULLED, &pulled)];
    let pull_hops = pull_hops
        .iter()
        .filter(|_| image.as_ref().is_some_and(|i| i.pulled));
    for (hop, s) in [("container started", &started), (IP_LISTED, &listed)]
        .iter()
        .chain(pull_hops)
    {
        if let Some((t, _)) = seen(s) {
            ms.insert(hop.to_string(), at(t));
        }
    }
    let (status, body) = answer?;
    ms.insert(FIRST_RESPONSE.into(), at(answered));
    let wake = RealWake {
        revision,
        ms,
        status,
        body,
    };
    Ok((wake, detail))
}

/// The kubelet's `Pulling` event of the user container's image, seen (ms
/// from the request; only when the image was pulled).
pub const IMAGE_PULLING: &str = "image pulling";
/// Its `Pulled` event after a pull, seen.
pub const IMAGE_PULLED: &str = "image pulled";

/// Where a cold start's pod ran and what the kubelet said of its image.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct WakeDetail {
    /// The node the pod ran on.
    pub node: Option<String>,
    /// From the kubelet's `Pulled` event of the user container.
    pub image: Option<ImagePull>,
}

/// What the kubelet's `Pulled` event says.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ImagePull {
    /// Pulled from a registry; false: "already present on machine".
    pub pulled: bool,
    /// The pull's duration as the kubelet measured it.
    pub kubelet_ms: Option<f64>,
    pub size_bytes: Option<u64>,
}

/// Parses a kubelet `Pulled` message: `Successfully pulled image "X" in
/// 1.2s (1.3s including waiting). Image size: 123 bytes.` or `Container
/// image "X" already present on machine…`.
pub fn parse_pulled(message: &str) -> Option<ImagePull> {
    if message.contains("already present on machine") {
        return Some(ImagePull {
            pulled: false,
            kubelet_ms: None,
            size_bytes: None,
        });
    }
    let rest = message.strip_prefix("Successfully pulled image ")?;
    let after_name = rest.rsplit_once("\" in ")?.1;
    let kubelet_ms = after_name
        .split_whitespace()
        .next()
        .and_then(parse_go_duration);
    let size_bytes = message
        .split_once("Image size: ")
        .and_then(|(_, s)| s.split_whitespace().next()?.parse().ok());
    Some(ImagePull {
        pulled: true,
        kubelet_ms,
        size_bytes,
    })
}

/// A Go `time.Duration` string (`1m2.5s`, `812.3ms`, `45µs`) in milliseconds.
pub fn parse_go_duration(text: &str) -> Option<f64> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit_ms, len) = [
            ("ns", 1e-6),
            ("us", 1e-3),
            ("µs", 1e-3),
            ("ms", 1.0),
            ("s", 1e3),
            ("m", 60e3),
            ("h", 3600e3),
        ]
        .iter()
        .find(|(u, _)| rest.starts_with(u))
        .map(|(u, ms)| (*ms, u.len()))?;
        total += value * unit_ms;
        rest = &rest[len..];
    }
    Some(total)
}

/// Waits until the revision's first pod is Ready (it was created at
/// `initial-scale: 1`), then until the autoscaler took it back to zero.
pub async fn wait_up_then_zero(
    record: &ClusterRecord,
    service: &str,
    within: Duration,
) -> Result<(), RealError> {
    let client = client_for(record).map_err(cluster_err)?;
    let deadline = Instant::now() + within;
    let revision = objects::revision_of(service);
    let pods_api = dynamic(&client, &record.namespace, &resource_of::<Pod>());
    let selector = ListParams::default().labels(&format!("{REVISION_LABEL}={revision}"));
    loop {
        let pods: Value = list_json(&pods_api, &selector).await.map_err(cluster_err)?;
        let ready = pods["items"].as_array().into_iter().flatten().any(|p| {
            p["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        });
        if ready {
            break;
        }
        if Instant::now() > deadline {
            return Err(RealError::Cluster(format!(
                "{revision}: no Ready pod within {within:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    back_to_zero(
        record,
        service,
        deadline.saturating_duration_since(Instant::now()),
    )
    .await
}

/// Waits until the autoscaler took `service`'s revision to zero (no pod left).
pub async fn back_to_zero(
    record: &ClusterRecord,
    service: &str,
    within: Duration,
) -> Result<(), RealError> {
    let client = client_for(record).map_err(cluster_err)?;
    objects::wait_at_zero(&client, &[service.to_string()], within)
        .await
        .map_err(cluster_err)
}

/// A plain-text table: per hop, p50 / max (ms from the request) of each arm.
pub fn markdown(arms: &[(String, Vec<RealWake>)]) -> String {
    let mut out = String::from("| arm | cold starts |");
    for hop in REAL_HOPS {
        out.push_str(&format!(" {hop} p50 / max (ms) |"));
    }
    out.push_str("\n|---|---:|");
    out.push_str(&"---:|".repeat(REAL_HOPS.len()));
    out.push('\n');
    for (arm, wakes) in arms {
        out.push_str(&format!("| {arm} | {} |", wakes.len()));
        for hop in REAL_HOPS {
            let mut v: Vec<f64> = wakes
                .iter()
                .filter_map(|w| w.ms.get(hop).copied())
                .collect();
            v.sort_by(f64::total_cmp);
            match (v.get(v.len() / 2), v.last()) {
                (Some(p50), Some(max)) => out.push_str(&format!(" {p50:.0} / {max:.0} |")),
                _ => out.push_str(" – |"),
            }
        }
        out.push('\n');
    }
    out
}

/// What a real-node cold start needs built: the images (pause, function,
/// queue-proxy) and the upstream binaries (kubelet, crictl, Knative's
/// controller, autoscaler and activator) plus `extra`. The first thing
/// missing, with the command that builds it.
pub fn missing_prerequisite(extra: &[&'static str]) -> Option<String> {
    let images = ste_testkit::repo_root().join("target/images");
    for archive in ["pause.tar", "function.tar", "queue-proxy.tar"] {
        if !images.join(archive).is_file() {
            return Some(format!(
                "{} missing: run hack/build-images.sh pause function queue-proxy",
                images.join(archive).display()
            ));
        }
    }
    let binaries: [&str; 5] = [
        "kubelet",
        "crictl",
        "knative-controller",
        "knative-autoscaler",
        "knative-activator",
    ];
    binaries
        .iter()
        .chain(extra)
        .copied()
        .find(|b| ste_testkit::upstream_binary(b, "STE_UNUSED").is_err())
        .map(|b| format!("{b} missing from target/upstream/bin: run hack/build-upstream.sh {b}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wake(hops: &[(&str, f64)]) -> RealWake {
        RealWake {
            revision: "r".into(),
            ms: hops.iter().map(|(h, ms)| (h.to_string(), *ms)).collect(),
            status: 200,
            body: FUNCTION_BODY.into(),
        }
    }

    #[test]
    fn a_wake_with_every_hop_in_order_has_no_problem() {
        let hops: Vec<(&str, f64)> = REAL_HOPS
            .iter()
            .enumerate()
            .map(|(i, h)| (*h, i as f64 * 10.0))
            .collect();
        assert!(wake(&hops).problems().is_empty());
        assert!(wake(&hops).answered());
    }

    #[test]
    fn the_response_may_come_before_ready_but_not_before_the_ip_is_listed() {
        let mut hops: Vec<(&str, f64)> = REAL_HOPS
            .iter()
            .enumerate()
            .map(|(i, h)| (*h, i as f64 * 10.0))
            .collect();
        hops.retain(|(h, _)| *h != "pod Ready");
        hops.push(("pod Ready", 1000.0));
        assert!(wake(&hops).problems().is_empty());
        // Our watch may show the IP a little after the activator's answer.
        hops.retain(|(h, _)| *h != IP_LISTED);
        hops.push((IP_LISTED, 51.7));
        assert!(
            wake(&hops).problems().is_empty(),
            "{:?}",
            wake(&hops).problems()
        );
        hops.retain(|(h, _)| *h != IP_LISTED);
        hops.push((IP_LISTED, 999.0));
        assert_eq!(
            wake(&hops).problems(),
            [format!(
                "{FIRST_RESPONSE}: 50 ms, before {IP_LISTED} (999 ms)"
            )]
        );
    }

    #[test]
    fn an_ip_listed_ready_or_not_counts_only_for_the_private_endpoints() {
        let not_ready = json!({"metadata": {"name": "r-private"},
            "subsets": [{"notReadyAddresses": [{"ip": "10.210.0.2"}]}]});
        assert!(ip_listed("r", &not_ready));
        assert!(!ip_listed("other", &not_ready));
        let empty = json!({"metadata": {"name": "r-private"}, "subsets": [{"addresses": []}]});
        assert!(!ip_listed("r", &empty));
        let public = json!({"metadata": {"name": "r"},
            "subsets": [{"addresses": [{"ip": "10.210.0.2"}]}]});
        assert!(!ip_listed("r", &public));
    }

    #[test]
    fn go_durations_parse_to_milliseconds() {
        assert_eq!(parse_go_duration("1.5s"), Some(1500.0));
        assert_eq!(parse_go_duration("812.5ms"), Some(812.5));
        assert_eq!(parse_go_duration("1m2s"), Some(62_000.0));
        assert_eq!(parse_go_duration("250µs"), Some(0.25));
        assert_eq!(parse_go_duration("2h"), Some(7_200_000.0));
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(parse_go_duration("1.5"), None);
        assert_eq!(parse_go_duration("3 s"), None);
    }

    #[test]
    fn the_kubelets_pulled_message_says_pulled_or_present() {
        let pulled = parse_pulled(
            "Successfully pulled image \"127.0.0.1:1/ste-function@sha256:ab\" in 353ms \
             (1.2s including waiting). Image size: 2862665 bytes.",
        )
        .unwrap();
        assert_eq!(
            pulled,
            ImagePull {
                pulled: true,
                kubelet_ms: Some(353.0),
                size_bytes: Some(2_862_665),
            }
        );
        let present = parse_pulled(
            "Container image \"localhost/ste-function:v0.1.0\" already present on machine",
        )
        .unwrap();
        assert!(!present.pulled);
        assert_eq!(parse_pulled("Pulling image \"x\""), None);
    }

    #[test]
    fn only_the_user_containers_image_events_of_the_revision_count() {
        let event = |reason: &str, name: &str, path: &str| json!({"reason": reason, "involvedObject": {"kind": "Pod", "name": name, "fieldPath": path}});
        let user = "spec.containers{user-container}";
        assert!(image_event(
            "fn-00001",
            "Pulling",
            &event("Pulling", "fn-00001-deployment-x-y", user)
        ));
        assert!(!image_event(
            "fn-00001",
            "Pulled",
            &event("Pulling", "fn-00001-deployment-x-y", user)
        ));
        assert!(!image_event(
            "fn-00001",
            "Pulling",
            &event("Pulling", "other-deployment-x-y", user)
        ));
        assert!(!image_event(
            "fn-00001",
            "Pulling",
            &event(
                "Pulling",
                "fn-00001-deployment-x-y",
                "spec.containers{queue-proxy}"
            )
        ));
    }

    #[test]
    fn a_missing_or_early_hop_is_named() {
        let w = wake(&[
            ("deployment scaled", 5.0),
            ("pod created", 3.0),
            ("pod bound", 9.0),
        ]);
        let problems = w.problems();
        assert!(
            problems.iter().any(|p| p.starts_with("pod created: 3")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p == "pod Ready: not seen"),
            "{problems:?}"
        );
    }

    #[test]
    fn the_function_service_runs_the_function_image_from_zero_min_scale() {
        let s = function_service("f");
        let t = &s["spec"]["template"];
        assert_eq!(t["spec"]["containers"][0]["image"], FUNCTION_IMAGE);
        assert_eq!(
            t["metadata"]["annotations"]["autoscaling.knative.dev/min-scale"],
            "0"
        );
        assert_eq!(
            t["metadata"]["annotations"]["autoscaling.knative.dev/initial-scale"],
            "1"
        );
    }

    #[test]
    fn the_table_has_a_row_per_arm_and_a_column_per_hop() {
        let table = markdown(&[("stock".into(), vec![wake(&[("pod created", 12.0)])])]);
        let row = table.lines().nth(2).unwrap();
        assert!(row.starts_with("| stock | 1 |"), "{table}");
        assert_eq!(row.matches('|').count(), REAL_HOPS.len() + 3, "{table}");
        assert!(row.contains(" 12 / 12 |"), "{table}");
    }
}
