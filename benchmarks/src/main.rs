//! ste-bench: STE's benchmarks. Every suite runs its arms side by side in one
//! run on the same machine and reports ratios.

use ste_bench::{churn, cluster, coldstart, failure, jobs, members, ring, router_bench, startup};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ste-bench",
    version,
    about = "STE benchmarks, arms side by side in one run"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The router against one plain etcd: Txn latency, paged List, watch
    /// delivery, saturated throughput and CPU per operation, over 1, 2 and 4
    /// RAM shards. Everything runs on 127.0.0.1 with etcd data on /dev/shm.
    Router(router_bench::Args),
    /// Pod churn on a real local control plane, arms side by side: a
    /// Deployment every T (burst), or create-one-delete-one (steady);
    /// latency from each Deployment to its pod bound and Running.
    Churn(churn::ChurnArgs),
    /// Pod startup (STE's measurement): 1, 10, 50, 100 Deployments created at
    /// once on each arm; create→bound→Running latency per pod and Deployments
    /// fully available per second at each parallelism.
    Startup(startup::StartupArgs),
    /// Job bursts (Kubeλess): N Jobs × 1 pod and 1 Job × N pods on each arm;
    /// time until every pod was created, bound and Running.
    Jobs(jobs::JobsArgs),
    /// Knative cold start: 1, 5, 25, 100 revisions woken from zero at once,
    /// with and without ste-activator-bridge, on the stock and STE arms;
    /// latency from the autoscaler's scale patch to the first pod bound and Ready.
    Coldstart(coldstart::ColdstartArgs),
    /// Knative cold start on a real node: N requests through Knative's own
    /// activator per arm (stock, STE, STE + the bridge's webhook), each
    /// waking a revision from zero; per-hop times to the first response.
    ColdstartReal(ste_bench::knative::real_run::RealArgs),
    /// The edge paper's experiment: durable-etcd write latency and throughput
    /// against its member count (1, 3, 5, each fsync delayed), and pod
    /// create→bound latency on stock and STE at each member count.
    Members(members::MembersArgs),
    /// What STE buys over the override arm: in the middle of churn, the
    /// override's RAM etcd or one STE shard (RF 1, RF 2) is killed and wiped;
    /// pods lost and recreated, time until every ReplicaSet is whole again,
    /// errors and relists of a client watch.
    Failure(failure::FailureArgs),
    /// The capacity model on paper (docs/capacity.md): from a churn results
    /// file's CPU per component, each resource's ceiling in Deployments/s per
    /// arm and core count, the predicted sustained churn and its bottleneck.
    Model(ste_bench::model::ModelArgs),
    /// The README's demo: the stock, tuned, override and STE arms side by side on a short
    /// churn burst, with an 8 ms fsync on the durable etcd, then the table and plots.
    Demo {
        /// Seconds of churn per arm.
        #[arg(long, env = "STE_DEMO_SECONDS", default_value_t = 30)]
        seconds: u64,
    },
    /// The router's live ring under an open-loop client: time to move keys
    /// when a shard joins and when one drains, and the client's latency
    /// during each move against a baseline, for each key count.
    Ring(ring::RingArgs),
    /// A suite's figures (SVG) from recorded results files, e.g.
    /// `ste-bench plot --suite churn --from docs/results/churn.json`.
    Plot(ste_bench::plots::command::PlotArgs),
    /// A real local control plane (kube-apiserver, controller-manager,
    /// scheduler, kwok fake nodes) on the stock or the STE storage arm.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Start a cluster in --dir and wait until every component is ready.
    Up(cluster::UpCommand),
    /// Stop the processes `up` started in --dir (logs are kept).
    Down(cluster::DownArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let command = Cli::parse().command;
    tokio::select! {
        result = run(command) => result,
        signal = ste_bench::interrupt::signalled() => {
            eprintln!("{signal}: stopping the processes this run started (results written so far are kept)");
            let n = ste_bench::interrupt::stop_children(std::time::Duration::from_secs(10)).await;
            eprintln!("stopped {n} process group(s)");
            std::process::exit(130)
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Router(args) => router_bench::run(args).await,
        Command::Cluster {
            command: ClusterCommand::Up(args),
        } => {
            let record =
                cluster::up_full(&args.up, &args.agents, &args.real, &args.topology).await?;
            cluster::print_summary(&record, &std::path::absolute(&args.up.dir)?);
            Ok(())
        }
        Command::Cluster {
            command: ClusterCommand::Down(args),
        } => cluster::down(&args).await,
        Command::Churn(args) => churn::run(args).await.map(|_| ()),
        Command::Jobs(args) => jobs::run(args).await.map(|_| ()),
        Command::Startup(args) => startup::run(args).await.map(|_| ()),
        Command::Coldstart(args) => coldstart::run(args).await.map(|_| ()),
        Command::ColdstartReal(args) => ste_bench::knative::real_run::run(args).await.map(|_| ()),
        Command::Ring(args) => ring::run(args).await.map(|_| ()),
        Command::Plot(args) => {
            for path in ste_bench::plots::command::run(&args)? {
                println!("{}", path.display());
            }
            Ok(())
        }
        Command::Members(args) => members::run(args).await.map(|_| ()),
        Command::Failure(args) => failure::run(args).await.map(|_| ()),
        Command::Model(args) => ste_bench::model::run(args),
        Command::Demo { seconds } => {
            let args = churn::ChurnArgs {
                arms: vec![
                    cluster::Arm::Stock,
                    cluster::Arm::Tuned,
                    cluster::Arm::Override,
                    cluster::Arm::Ste,
                ],
                mode: churn::Mode::Burst,
                interarrival: std::time::Duration::from_millis(100),
                duration: std::time::Duration::from_secs(seconds),
                initial: 0,
                nodes: 10,
                shards: 2,
                client_qps: vec![Some(200)],
                sweep: Vec::new(),
                fsync_delay: Some(std::time::Duration::from_millis(8)),
                output: "target/bench/demo".into(),
                topology: Default::default(),
                external: Default::default(),
                repeats: 1,
            };
            churn::run(args).await.map(|_| ())
        }
    }
}
