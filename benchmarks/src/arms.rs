//! The arms every suite compares, defined once: which storage each one runs
//! on, the flags that shape them (`--etcd-members`, `--replication-factor`)
//! and the environment a suite runs them in. churn, startup, jobs, coldstart,
//! the demo and the scenarios all start their clusters through
//! [`crate::cluster::up_arm`].

use std::sync::RwLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
pub enum Arm {
    /// One durable etcd (on disk, fsync on) stores everything.
    Stock,
    /// Stock with kube-controller-manager's and kube-scheduler's client QPS
    /// raised to [`RAISED_QPS`] whatever `--client-qps` says: the one-flag
    /// alternative, side by side with stock at default limits in one run.
    #[value(name = "stock-qps")]
    #[serde(rename = "Stock-qps")]
    StockQps,
    /// One etcd on a RAM disk without fsync stores everything: what a user
    /// would try first (and loses the whole cluster with the node).
    Tuned,
    /// kube-apiserver's own `--etcd-servers-overrides`: pods and events in
    /// ONE plain etcd on a RAM disk without fsync (no router, no shards); the
    /// rest in the durable etcd as in stock.
    Override,
    /// Pods go through ste-router to RAM etcd shards; the rest stays in the durable etcd.
    Ste,
    /// A cluster given by `--kubeconfig` (not started by the tool); shown
    /// as its `--arm-name` (see [`crate::external`]).
    #[value(skip)]
    External,
}

impl std::fmt::Debug for Arm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Arm::Stock => f.write_str("Stock"),
            Arm::StockQps => f.write_str("Stock-qps"),
            Arm::Tuned => f.write_str("Tuned"),
            Arm::Override => f.write_str("Override"),
            Arm::Ste => f.write_str("Ste"),
            Arm::External => f.write_str(&external_name()),
        }
    }
}

static EXTERNAL_NAME: RwLock<String> = RwLock::new(String::new());

/// The name `Arm::External` shows in tables, plots and JSON (`--arm-name`,
/// set by [`crate::external::connect`]); `cluster` until then.
pub fn external_name() -> String {
    let name = EXTERNAL_NAME.read().map(|n| n.clone()).unwrap_or_default();
    if name.is_empty() {
        "cluster".into()
    } else {
        name
    }
}

/// Names `Arm::External` (see [`external_name`]).
pub fn set_external_name(name: &str) {
    if let Ok(mut current) = EXTERNAL_NAME.write() {
        *current = name.trim().to_string();
    }
}

impl Serialize for Arm {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{self:?}"))
    }
}

impl Arm {
    /// Whether pods (and events) leave the durable etcd on this arm.
    pub fn pods_in_ram(self) -> bool {
        matches!(self, Arm::Override | Arm::Ste)
    }
}

/// The client QPS of the `stock-qps` arm.
pub const RAISED_QPS: u32 = 200;

/// The client QPS `arm` runs at when the suite asks for `asked`: `asked`,
/// except on `stock-qps`, which always raises it.
pub fn client_qps(arm: Arm, asked: Option<u32>) -> Option<u32> {
    match arm {
        Arm::StockQps => Some(RAISED_QPS),
        _ => asked,
    }
}

/// A client QPS setting: `default` (Kubernetes' own limits) or a number.
pub fn parse_qps(text: &str) -> Result<Option<u32>, String> {
    match text.trim() {
        "default" => Ok(None),
        n => n
            .parse()
            .map(Some)
            .map_err(|_| format!("{n:?} is neither `default` nor a number")),
    }
}

/// Members of the durable etcd (1, 3 or 5).
pub fn parse_members(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n @ (1 | 3 | 5)) => Ok(n),
        _ => Err(format!("{text:?}: the durable etcd has 1, 3 or 5 members")),
    }
}

/// How the storage of an arm is laid out beyond the arm itself; flattened
/// into `cluster up` and every suite.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Members of the durable etcd (1, 3 or 5): real etcd processes on
    /// 127.0.0.1, each with its own client and peer ports and the same
    /// --fsync-delay; kube-apiserver is given every member. No network
    /// delay is added between members (loopback).
    #[arg(long, env = "STE_ETCD_MEMBERS", default_value_t = 1, value_parser = parse_members)]
    pub etcd_members: usize,
    /// Copies of each pod key behind ste-router (ste arm): 1 or 2.
    #[arg(long, env = "STE_REPLICATION_FACTOR", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub replication_factor: u8,
    /// Reach the RAM store over Unix sockets, as on a single-host (edge)
    /// control plane: kube-apiserver dials override's etcd or ste-router at
    /// a socket (`/pods#unix:///…`), and ste-router its shards. Both RAM arms
    /// alike; the durable etcd stays on TCP. Default: TCP on 127.0.0.1.
    #[arg(long, env = "STE_LOCAL_SOCKETS")]
    pub local_sockets: bool,
    /// GOMAXPROCS of the ste arm's RAM etcd shards: what ste-shard-agent
    /// runs them with (its --etcd-gomaxprocs, default 1). 0: Go's default,
    /// one per CPU.
    #[arg(long, env = "STE_SHARD_GOMAXPROCS", default_value_t = 1)]
    pub shard_gomaxprocs: u16,
    /// GOMAXPROCS of override's RAM etcd. 0 (the default): Go's default, as
    /// a user runs etcd; 1 gives it what STE's shards get.
    #[arg(long, env = "STE_OVERRIDE_GOMAXPROCS", default_value_t = 0)]
    pub override_gomaxprocs: u16,
}

impl Topology {
    /// The environment of a RAM etcd run with `gomaxprocs` (0: none set).
    pub fn gomaxprocs_env(gomaxprocs: u16) -> Vec<(String, String)> {
        match gomaxprocs {
            0 => Vec::new(),
            n => vec![("GOMAXPROCS".to_string(), n.to_string())],
        }
    }

    /// How reports name the RAM etcds' GOMAXPROCS.
    pub fn gomaxprocs_name(&self) -> String {
        let name = |n: u16| match n {
            0 => "Go's default".to_string(),
            n => n.to_string(),
        };
        format!(
            "RAM etcd GOMAXPROCS: STE's shards {}, override's {}",
            name(self.shard_gomaxprocs),
            name(self.override_gomaxprocs)
        )
    }
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            etcd_members: 1,
            replication_factor: 1,
            local_sockets: false,
            shard_gomaxprocs: 1,
            override_gomaxprocs: 0,
        }
    }
}

/// Everything but the arm that decides how a suite's cluster is started.
#[derive(Clone, Debug)]
pub struct Environment {
    pub shards: usize,
    pub nodes: usize,
    /// Client QPS of kube-controller-manager and kube-scheduler (burst 1.5×
    /// and 2×), on every arm alike; None: Kubernetes' defaults.
    pub client_qps: Option<u32>,
    /// Delay added to each fsync of every durable etcd member.
    pub fsync_delay: Option<Duration>,
    pub topology: Topology,
}

impl Environment {
    /// How reports name the client limits: `QPS 200` or `default QPS`.
    pub fn qps_name(&self) -> String {
        qps_name(self.client_qps)
    }
}

pub fn qps_name(qps: Option<u32>) -> String {
    qps.map(|q| format!("QPS {q}"))
        .unwrap_or_else(|| "default QPS".into())
}

/// A directory name for `arm` in `env`: `ste-qps200-m3-rf2`.
pub fn dir_name(arm: Arm, env: &Environment) -> String {
    let qps = client_qps(arm, env.client_qps)
        .map(|q| format!("qps{q}"))
        .unwrap_or_else(|| "default".into());
    let mut name = format!("{arm:?}-{qps}").to_lowercase();
    if env.topology.etcd_members != 1 {
        name.push_str(&format!("-m{}", env.topology.etcd_members));
    }
    if arm == Arm::Ste && env.topology.replication_factor != 1 {
        name.push_str(&format!("-rf{}", env.topology.replication_factor));
    }
    if arm.pods_in_ram() && env.topology.local_sockets {
        name.push_str("-unix");
    }
    name
}

/// A local run's heading: "<n> fake nodes, client QPS <q>, durable etcd
/// fsync delay <d>" (jobs, startup).
pub fn local_heading(
    nodes: usize,
    client_qps: Option<u32>,
    fsync_delay: Option<Duration>,
) -> String {
    format!(
        "{nodes} fake nodes, client QPS {}, durable etcd fsync delay {}",
        client_qps
            .map(|q| q.to_string())
            .unwrap_or_else(|| "Kubernetes defaults".into()),
        fsync_delay
            .map(|d| format!("{d:?}"))
            .unwrap_or_else(|| "none".into())
    )
}

/// The arms of repeat `repeat`, in `--arms` order on even repeats and
/// reversed on odd ones, so slow drift of a shared machine's load falls on
/// every arm alike.
pub fn arm_order<T: Clone>(arms: &[T], repeat: u64) -> Vec<T> {
    let mut order = arms.to_vec();
    if repeat % 2 == 1 {
        order.reverse();
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_headings_name_the_defaults() {
        assert_eq!(
            local_heading(10, Some(200), Some(Duration::from_millis(8))),
            "10 fake nodes, client QPS 200, durable etcd fsync delay 8ms"
        );
        assert_eq!(
            local_heading(1, None, None),
            "1 fake nodes, client QPS Kubernetes defaults, durable etcd fsync delay none"
        );
    }

    #[test]
    fn members_are_one_three_or_five() {
        assert_eq!(parse_members("3"), Ok(3));
        assert!(parse_members("2").is_err());
        assert!(parse_members("x").is_err());
    }

    #[test]
    fn ram_etcds_get_gomaxprocs_only_when_asked_and_reports_say_which() {
        assert!(Topology::gomaxprocs_env(0).is_empty());
        assert_eq!(
            Topology::gomaxprocs_env(2),
            vec![("GOMAXPROCS".to_string(), "2".to_string())]
        );
        assert_eq!(
            Topology::default().gomaxprocs_name(),
            "RAM etcd GOMAXPROCS: STE's shards 1, override's Go's default"
        );
    }

    #[test]
    fn directory_names_say_members_and_copies() {
        let env = Environment {
            shards: 2,
            nodes: 1,
            client_qps: Some(200),
            fsync_delay: None,
            topology: Topology {
                etcd_members: 3,
                replication_factor: 2,
                ..Default::default()
            },
        };
        assert_eq!(dir_name(Arm::Ste, &env), "ste-qps200-m3-rf2");
        assert_eq!(dir_name(Arm::Override, &env), "override-qps200-m3");
        let unix = Environment {
            topology: Topology {
                local_sockets: true,
                ..env.topology.clone()
            },
            ..env.clone()
        };
        assert_eq!(dir_name(Arm::Ste, &unix), "ste-qps200-m3-rf2-unix");
        assert_eq!(dir_name(Arm::Stock, &unix), "stock-qps200-m3");
        let default = Environment {
            client_qps: None,
            ..env
        };
        assert_eq!(dir_name(Arm::StockQps, &default), "stock-qps-qps200-m3");
        assert_eq!(client_qps(Arm::StockQps, None), Some(RAISED_QPS));
        assert_eq!(client_qps(Arm::Ste, None), None);
    }
}
