//! ste-shard-agent: runs and supervises a RAM-disk etcd and registers it as an STE shard.
use clap::{Parser, Subcommand};
use ste_shard_agent::RunArgs;

/// ste-shard-agent: runs and supervises a RAM-disk etcd on a worker node and
/// registers it as an STE shard (a cluster-scoped `shards.ste.dev` object)
/// for the routers. Runs as a DaemonSet; `run` is the main subcommand.
#[derive(Parser)]
#[command(name = "ste-shard-agent", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once
enum Command {
    /// Runs a single-member etcd on a RAM disk, keeps it healthy and registers
    /// it as an STE shard (a `shards.ste.dev` object) for the routers.
    ///
    /// etcd runs with `--unsafe-no-fsync`, a backend quota, no auto compaction
    /// (the router compacts), and dies with the agent (PR_SET_PDEATHSIG). It is
    /// health-checked through its /health endpoint and restarted with
    /// exponential backoff (1s to 30s) when it exits or stays unhealthy; its
    /// data directory is kept across restarts. Once etcd is healthy the agent
    /// creates or updates the Shard and sends a heartbeat to its status.
    ///
    /// On SIGTERM or SIGINT the agent sets `spec.drain: true`, waits until the
    /// router reports `status.phase: Drained`, stops etcd, deletes the Shard and
    /// exits 0. If the drain does not finish within --drain-timeout it stops
    /// etcd anyway, keeps the Shard (the router declares it Lost) and exits 1.
    /// A second signal stops etcd at once (SIGKILL) and exits 1. Without
    /// registration a signal just stops etcd and exits 0. Invalid flags exit 2.
    ///
    /// Logs go to stderr (filter with RUST_LOG, default `info`).
    #[command(long_about)]
    Run(RunArgs),
    /// Prints the Shard CustomResourceDefinition as YAML.
    Crd,
}

fn main() -> std::process::ExitCode {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", ste_shard_api::crd_yaml());
            std::process::ExitCode::SUCCESS
        }
        Command::Run(args) => {
            init_tracing();
            let config = match args.validate() {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("error: {err}");
                    return std::process::ExitCode::from(2);
                }
            };
            match run(config) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("error: {err:#}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}

fn run(config: ste_shard_agent::Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the async runtime: {e}"))?;
    runtime.block_on(ste_shard_agent::run(config))?;
    Ok(())
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
