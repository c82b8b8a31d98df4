//! ste-shard-agent (being built).
use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Runs and supervises a RAM-disk etcd and registers it as an STE shard")]
enum Command {
    /// Prints the Shard CustomResourceDefinition as YAML.
    Crd,
}

fn main() -> anyhow::Result<()> {
    match Command::parse() {
        Command::Crd => print!("{}", ste_shard_api::crd_yaml()),
    }
    Ok(())
}
