//! `ste-bench plot`: a suite's figures from recorded results files, so the
//! images in docs/plots/ come from runs kept in docs/results/.

use std::path::PathBuf;

use super::{input, scenarios, PlotError, SuitePlots};

/// Which suite wrote the results.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    /// `ste-bench churn`'s results.json.
    Churn,
    /// `ste-bench startup`'s results.json.
    Startup,
    /// A JSON list of wakes `{arm, revisions, repeat, hops_ms: [[hop, ms], …]}`.
    Coldstart,
    /// `ste-bench jobs`'s results.json.
    Jobs,
    /// `ste-bench members`'s results.json.
    Members,
    /// `ste-bench failure`'s results.json.
    Failure,
    /// `ste-bench ring --json`'s file.
    Ring,
    /// `ste-bench router`'s JSON file.
    Router,
}

impl Suite {
    /// The figures' input from results files (one per repeat).
    pub fn read(
        self,
        name: &str,
        runs: &[(String, serde_json::Value)],
    ) -> Result<SuitePlots, input::InputError> {
        match self {
            Suite::Churn => input::churn(name, runs),
            Suite::Startup => input::startup(name, runs),
            Suite::Coldstart => input::coldstart(name, runs),
            Suite::Jobs => scenarios::jobs(name, runs),
            Suite::Members => scenarios::members(name, runs),
            Suite::Failure => scenarios::failure(name, runs),
            Suite::Ring => scenarios::ring(name, runs),
            Suite::Router => scenarios::router(name, runs),
        }
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct PlotArgs {
    /// The suite that wrote the results.
    #[arg(long, env = "STE_PLOT_SUITE", value_enum)]
    pub suite: Suite,
    /// Results files; several are repeats of one run (the spread in the p50/p99 figure).
    #[arg(
        long = "from",
        env = "STE_PLOT_FROM",
        value_delimiter = ',',
        required = true
    )]
    pub from: Vec<PathBuf>,
    /// File name prefix of the figures (e.g. churn-sweep).
    #[arg(long, env = "STE_PLOT_NAME")]
    pub name: Option<String>,
    /// Where the SVG files go.
    #[arg(long, env = "STE_PLOT_OUTPUT", default_value = "docs/plots")]
    pub output: PathBuf,
}

/// Reads the files, draws, writes; returns the files written.
pub fn run(args: &PlotArgs) -> Result<Vec<PathBuf>, PlotError> {
    let mut runs = Vec::new();
    for path in &args.from {
        let text = std::fs::read_to_string(path).map_err(|source| PlotError::Read {
            path: path.clone(),
            source,
        })?;
        let value = serde_json::from_str(&text).map_err(|source| PlotError::Json {
            path: path.clone(),
            source,
        })?;
        runs.push((path.display().to_string(), value));
    }
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("{:?}", args.suite).to_lowercase());
    let plots = args.suite.read(&name, &runs)?;
    std::fs::create_dir_all(&args.output).map_err(|source| PlotError::Write {
        path: args.output.clone(),
        source,
    })?;
    super::write(&plots, &args.output)
}
