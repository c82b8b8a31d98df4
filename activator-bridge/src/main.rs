//! ste-activator-bridge (being built).
use clap::Parser;

#[derive(Parser)]
#[command(version, about = "Pre-stages pods on Knative's scale-from-zero path")]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _ = Args::parse();
    anyhow::bail!("not built yet")
}
