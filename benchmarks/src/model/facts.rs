//! What the model takes from the Kubernetes 1.34.10 sources and from one
//! write count, not from the churn file: who writes what per Deployment,
//! each client's rate limit, each controller's workers, how many cores each
//! process can use, and where it runs.

use crate::arms::{Arm, RAISED_QPS};

/// A client of kube-apiserver that writes on a Deployment's path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// The churn client itself (one create per Deployment).
    Bench,
    /// kube-controller-manager's deployment controller (its own clientset).
    DeploymentController,
    /// kube-controller-manager's replicaset controller (its own clientset).
    ReplicaSetController,
    Scheduler,
    /// The fake kubelets (a real node's kubelet in production).
    Kwok,
}

impl Client {
    pub fn name(self) -> &'static str {
        match self {
            Client::Bench => "churn client",
            Client::DeploymentController => "deployment-controller",
            Client::ReplicaSetController => "replicaset-controller",
            Client::Scheduler => "kube-scheduler",
            Client::Kwok => "kwok",
        }
    }

    /// Client QPS under Kubernetes' defaults: kube-controller-manager's
    /// `ClientConnection.QPS = 20` (pkg/controller/apis/config/v1alpha1/
    /// defaults.go), given to every controller's own clientset
    /// (clientbuilder.SimpleControllerClientBuilder → clientset.NewForConfig,
    /// one token bucket each); kube-scheduler's 50 (pkg/scheduler/apis/config/
    /// v1/defaults.go). None: not rate limited in the model.
    pub fn default_qps(self) -> Option<f64> {
        match self {
            Client::DeploymentController | Client::ReplicaSetController => Some(20.0),
            Client::Scheduler => Some(50.0),
            Client::Bench | Client::Kwok => None,
        }
    }

    /// Whether the client's requests are made by a pool of sync workers,
    /// each waiting for its requests one at a time (the deployment and
    /// replicaset controllers; the scheduler binds in a goroutine per pod,
    /// kwok runs on the workers).
    pub fn has_sync_workers(self) -> bool {
        matches!(
            self,
            Client::DeploymentController | Client::ReplicaSetController
        )
    }
}

/// Where a request's object is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// Deployments and ReplicaSets: the durable etcd on every arm but tuned.
    Objects,
    /// Pods and events: the durable etcd on stock, the RAM store on override
    /// (one etcd) and STE (router and shards), the one RAM etcd on tuned.
    Pods,
    /// Answered without a write (409 Conflict: kube-apiserver's update
    /// precondition fails on its read, nothing goes through Raft).
    NoWrite,
}

/// One kind of request made per Deployment (replicas 1).
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub client: Client,
    pub what: &'static str,
    pub per_deployment: f64,
    pub store: Store,
    /// The client's sync worker waits for it (events are sent by the
    /// recorder's own goroutine: counted against the client's QPS, not its
    /// workers).
    pub in_worker: bool,
}

const fn request(
    client: Client,
    what: &'static str,
    per_deployment: f64,
    store: Store,
    in_worker: bool,
) -> Request {
    Request {
        client,
        what,
        per_deployment,
        store,
        in_worker,
    }
}

/// Writes per Deployment, counted with kube-apiserver's
/// `apiserver_request_total` (non-read verbs) before and after 200
/// Deployments sent at about 4/s to a stock cluster at default client
/// limits (saturated: the deployment controller's 20 QPS is the ceiling),
/// 10 kwok nodes, 2026-12-02; events split by their reporting component.
/// See docs/capacity.md for the count at a light load (more status writes).
pub const REQUESTS: &[Request] = &[
    request(
        Client::Bench,
        "POST deployments",
        1.0,
        Store::Objects,
        false,
    ),
    request(
        Client::DeploymentController,
        "POST replicasets",
        1.0,
        Store::Objects,
        true,
    ),
    request(
        Client::DeploymentController,
        "PUT deployments/status",
        2.08,
        Store::Objects,
        true,
    ),
    request(
        Client::DeploymentController,
        "PUT deployments/status (409)",
        1.03,
        Store::NoWrite,
        true,
    ),
    request(
        Client::DeploymentController,
        "POST events (ScalingReplicaSet)",
        1.0,
        Store::Pods,
        false,
    ),
    request(
        Client::ReplicaSetController,
        "POST pods",
        1.0,
        Store::Pods,
        true,
    ),
    request(
        Client::ReplicaSetController,
        "PUT replicasets/status",
        2.21,
        Store::Objects,
        true,
    ),
    request(
        Client::ReplicaSetController,
        "PUT replicasets/status (409)",
        0.17,
        Store::NoWrite,
        true,
    ),
    request(
        Client::ReplicaSetController,
        "POST events (SuccessfulCreate)",
        1.0,
        Store::Pods,
        false,
    ),
    request(
        Client::Scheduler,
        "POST pods/binding",
        1.0,
        Store::Pods,
        false,
    ),
    request(
        Client::Scheduler,
        "POST events.k8s.io events (Scheduled)",
        1.0,
        Store::Pods,
        false,
    ),
    request(Client::Kwok, "PATCH pods/status", 1.0, Store::Pods, false),
];

/// Requests `client` makes per Deployment (every one costs a token).
pub fn requests_of(client: Client) -> f64 {
    REQUESTS
        .iter()
        .filter(|r| r.client == client)
        .map(|r| r.per_deployment)
        .sum()
}

/// Writes per Deployment that land in `store`.
pub fn writes_to(store: Store) -> f64 {
    REQUESTS
        .iter()
        .filter(|r| r.store == store)
        .map(|r| r.per_deployment)
        .sum()
}

/// Client limits the model is evaluated at (`--client-qps`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ClientLimit {
    /// Kubernetes' own (20 per controller, 50 for the scheduler).
    Default,
    /// The bench's `--client-qps N`: kube-controller-manager and
    /// kube-scheduler at N.
    Qps(u32),
    /// No client limit: what bounds the arm when the limits are lifted.
    Unlimited,
}

impl ClientLimit {
    /// The limit `arm` runs at when `self` is asked: stock-qps always runs
    /// at [`RAISED_QPS`], as in the bench.
    pub fn for_arm(self, arm: Arm) -> ClientLimit {
        match (arm, self) {
            (Arm::StockQps, ClientLimit::Default | ClientLimit::Qps(_)) => {
                ClientLimit::Qps(RAISED_QPS)
            }
            _ => self,
        }
    }

    /// QPS of `client` under this limit; None: unlimited.
    pub fn qps(self, client: Client) -> Option<f64> {
        let default = client.default_qps()?;
        match self {
            ClientLimit::Default => Some(default),
            ClientLimit::Qps(n) => Some(f64::from(n)),
            ClientLimit::Unlimited => None,
        }
    }

    pub fn name(self) -> String {
        match self {
            ClientLimit::Default => "default QPS".into(),
            ClientLimit::Qps(n) => format!("QPS {n}"),
            ClientLimit::Unlimited => "no client limit".into(),
        }
    }
}

/// `--client-qps`: `default`, `unlimited` or a number.
pub fn parse_limit(text: &str) -> Result<ClientLimit, String> {
    match text.trim() {
        "default" => Ok(ClientLimit::Default),
        "unlimited" | "none" => Ok(ClientLimit::Unlimited),
        n => match n.parse::<u32>() {
            Ok(q) if q > 0 => Ok(ClientLimit::Qps(q)),
            _ => Err(format!(
                "client QPS must be `default`, `unlimited` or a positive integer, not {n:?}"
            )),
        },
    }
}

/// Kubernetes' default sync workers per controller:
/// `ConcurrentDeploymentSyncs = 5`, `ConcurrentRSSyncs = 5`
/// (pkg/controller/{deployment,replicaset}/config/v1alpha1/defaults.go).
pub const DEFAULT_SYNC_WORKERS: f64 = 5.0;

/// Cores a component can keep busy at most (None: all of them).
/// kube-scheduler: one pod per scheduling cycle (`ScheduleOne`), taken as
/// one core for all its CPU, binding included (conservative).
/// kube-controller-manager: the deployment and replicaset controllers'
/// sync workers (`sync_workers` each). kwok: 4 pod stage workers
/// (`podPlayStageParallelism`). kube-apiserver, the etcds (CPU; their
/// serial write path is the write ceiling) and ste-router (tokio, one
/// committer per shard) use every core.
pub fn parallelism(component: &str, sync_workers: f64) -> Option<f64> {
    match component {
        "kube-scheduler" => Some(1.0),
        "kube-controller-manager" => Some(2.0 * sync_workers),
        "kwok" => Some(4.0),
        _ => None,
    }
}

/// Where the processes run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// A production control plane: kwok (the kubelets) and STE's shards run
    /// on worker nodes; their CPU leaves the control plane.
    Workers,
    /// As measured here: every process on the same cores.
    OneMachine,
}

/// Whether `component` uses the control plane's cores in `layout`.
pub fn on_control_plane(component: &str, layout: Layout) -> bool {
    match layout {
        Layout::OneMachine => true,
        Layout::Workers => !matches!(component, "kwok" | "shards"),
    }
}
