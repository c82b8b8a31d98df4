//! ste-bench: STE's benchmarks. Every suite runs its arms side by side in one
//! run on the same machine and reports ratios.

use ste_bench::{cluster, router_bench};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ste-bench", version, about = "STE benchmarks, arms side by side in one run")]
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
    Up(cluster::UpArgs),
    /// Stop the processes `up` started in --dir (logs are kept).
    Down(cluster::DownArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Router(args) => router_bench::run(args).await,
        Command::Cluster { command: ClusterCommand::Up(args) } => {
            let record = cluster::up(&args).await?;
            cluster::print_summary(&record, &std::path::absolute(&args.dir)?);
            Ok(())
        }
        Command::Cluster { command: ClusterCommand::Down(args) } => cluster::down(&args).await,
    }
}
