//! ste-bench: STE's benchmarks. Every suite runs its arms side by side in one
//! run on the same machine and reports ratios.

mod router_bench;
mod stats;

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Router(args) => router_bench::run(args).await,
    }
}
