//! `ste-bench model`: the capacity model on paper (docs/capacity.md). From
//! a churn results file's CPU per component, the clients' rate limits and
//! writes per Deployment, the controllers' workers and the stores' measured
//! write ceilings: each resource's ceiling in Deployments/s per arm and core
//! count, the smallest of them (the predicted sustained churn) and its name.

pub mod ceilings;
pub mod costs;
pub mod error;
pub mod facts;
pub mod report;
pub mod stores;

use std::path::PathBuf;
use std::time::Duration;

pub use error::ModelError;
use facts::{ClientLimit, Layout};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Markdown,
}

#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// A churn results file (`ste-bench churn`'s results.json), e.g.
    /// docs/results/churn.json: CPU per component per arm.
    #[arg(long, env = "STE_MODEL_FROM")]
    pub from: PathBuf,
    /// Control-plane core counts to predict for.
    #[arg(
        long,
        env = "STE_MODEL_CORES",
        value_delimiter = ',',
        default_value = "2,8,32"
    )]
    pub cores: Vec<f64>,
    /// Client limits of kube-controller-manager and kube-scheduler:
    /// `default` (20 per controller, 50 for the scheduler), a QPS, or
    /// `unlimited`. stock-qps always runs at 200, as in the bench.
    #[arg(long, env = "STE_MODEL_CLIENT_QPS", value_delimiter = ',', default_value = "default,200,unlimited", value_parser = facts::parse_limit)]
    pub client_qps: Vec<ClientLimit>,
    /// `ste-bench members` results: the durable etcd's saturated Puts/s.
    #[arg(
        long,
        env = "STE_MODEL_MEMBERS_FROM",
        default_value = "docs/results/members.json"
    )]
    pub members_from: PathBuf,
    /// Members of the durable etcd whose saturated rate is its ceiling
    /// (default: the churn file's).
    #[arg(long, env = "STE_MODEL_ETCD_MEMBERS")]
    pub etcd_members: Option<usize>,
    /// `ste-bench router` results: one plain RAM etcd's saturated writes/s.
    #[arg(
        long,
        env = "STE_MODEL_ROUTER_FROM",
        default_value = "docs/results/router.json"
    )]
    pub router_from: PathBuf,
    /// The durable etcd's fsync delay (the churn runs' `--fsync-delay`).
    #[arg(long, env = "STE_MODEL_FSYNC_DELAY", default_value = "8ms", value_parser = humantime::parse_duration)]
    pub fsync_delay: Duration,
    /// A write's latency apart from the fsync (kube-apiserver and etcd on
    /// loopback; ≈ 1 ms measured here, docs/capacity.md). A durable write
    /// waits 1.5 fsyncs on top: near its ceiling the disk is always syncing,
    /// so a write waits for the sync under way (half of one on average), then
    /// for its own.
    #[arg(long, env = "STE_MODEL_BASE_WRITE", default_value = "1ms", value_parser = humantime::parse_duration)]
    pub base_write: Duration,
    /// Sync workers of the deployment and of the replicaset controller each
    /// (kube-controller-manager's `--concurrent-deployment-syncs` and
    /// `--concurrent-replicaset-syncs`, 5 by default).
    #[arg(long, env = "STE_MODEL_SYNC_WORKERS", default_value_t = facts::DEFAULT_SYNC_WORKERS)]
    pub sync_workers: f64,
    /// The durable etcd's saturated writes/s, instead of --members-from's
    /// (to ask what a faster durable etcd would change).
    #[arg(long, env = "STE_MODEL_DURABLE_WRITES_PER_S")]
    pub durable_writes_per_s: Option<f64>,
    /// `workers`: kwok (the kubelets) and STE's shards off the control
    /// plane; `one-machine`: every process on the cores, as measured here.
    #[arg(long, env = "STE_MODEL_LAYOUT", value_enum, default_value = "workers")]
    pub layout: Layout,
    #[arg(long, env = "STE_MODEL_FORMAT", value_enum, default_value = "text")]
    pub format: Format,
}

/// Everything the tables need.
pub struct Model {
    pub arms: Vec<costs::ArmCosts>,
    pub plane: ceilings::Plane,
}

/// Reads the inputs named by `args`.
pub fn load(args: &ModelArgs) -> Result<Model, ModelError> {
    if let Some(bad) = args.cores.iter().find(|c| c.is_nan() || **c <= 0.0) {
        return Err(ModelError::BadCores(*bad));
    }
    for (flag, value) in [
        ("--sync-workers", Some(args.sync_workers)),
        ("--durable-writes-per-s", args.durable_writes_per_s),
    ] {
        if let Some(v) = value.filter(|v| v.is_nan() || *v <= 0.0) {
            return Err(ModelError::NotPositive { flag, value: v });
        }
    }
    let steps = costs::load(&args.from)?;
    let arms = costs::by_arm(&steps);
    let Some(first) = arms.first() else {
        return Err(ModelError::NoArms {
            path: args.from.clone(),
        });
    };
    let members = args.etcd_members.unwrap_or(first.etcd_members);
    let plane = ceilings::Plane {
        cores: args.cores[0],
        layout: args.layout,
        limit: ClientLimit::Default,
        durable_writes_per_s: match args.durable_writes_per_s {
            Some(rate) => rate,
            None => stores::durable_writes_per_s(&args.members_from, members)?,
        },
        ram_writes_per_s: stores::ram_writes_per_s(&args.router_from)?,
        durable_write_s: (args.fsync_delay.mul_f64(1.5) + args.base_write).as_secs_f64(),
        ram_write_s: args.base_write.as_secs_f64(),
        sync_workers: args.sync_workers,
    };
    Ok(Model { arms, plane })
}

/// The report: predictions, every ceiling, the CPU inputs and the check.
pub fn render(model: &Model, args: &ModelArgs) -> String {
    let show = |t: report::Table| match args.format {
        Format::Text => t.text(),
        Format::Markdown => t.markdown(),
    };
    let p = &model.plane;
    let mut out = format!(
        "Capacity model from {} ({:?} layout; durable etcd {:.0} writes/s saturated, \
         write {:.1} ms; RAM etcd {:.0} writes/s)\n\nPredicted sustained churn, Deployments/s (bottleneck):\n\n",
        args.from.display(),
        args.layout,
        p.durable_writes_per_s,
        p.durable_write_s * 1e3,
        p.ram_writes_per_s
    );
    out += &show(report::predictions(
        &model.arms,
        p,
        &args.cores,
        &args.client_qps,
    ));
    out += "\nEvery ceiling, Deployments/s:\n\n";
    out += &show(report::ceilings_table(
        &model.arms,
        p,
        &args.cores,
        &args.client_qps,
    ));
    out += "\nCPU per component (fitted over each arm's steps):\n\n";
    out += &show(report::costs_table(&model.arms, args.layout));
    out += "\nCheck: the model on 2 cores with every process on them, against this file's measured rates:\n\n";
    out += &show(report::check_table(&model.arms, p, 2.0));
    out
}

pub fn run(args: ModelArgs) -> anyhow::Result<()> {
    let model = load(&args)?;
    print!("{}", render(&model, &args));
    Ok(())
}

#[cfg(test)]
mod tests;
