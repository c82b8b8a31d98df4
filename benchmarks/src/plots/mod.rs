//! The benchmarks' figures, drawn with `plotters` into SVG (text stays text:
//! nothing to install to view them). A suite hands its results over in the
//! types of [`input`]; this module knows no suite.
//!
//! Per suite: a latency CDF per arm, one panel per load, on a log x axis
//! ([`cdf`]); p50 and p99 per arm at each load with the spread over repeats
//! ([`summary`]); the suite's lines over time or load ([`lines`]); for cold
//! start, the per-hop stacked bars ([`hops`]); for the scenarios (jobs,
//! members, failure, ring, router), values per arm side by side as bars or
//! p50/p99 marks ([`groups`], read by [`scenarios`]). Every arm keeps its
//! colour in every figure ([`palette`]).

pub mod cdf;
pub mod command;
pub mod figure;
pub mod groups;
pub mod header;
pub mod hops;
pub mod input;
pub mod lines;
pub mod palette;
pub mod scenarios;
pub mod slots;
pub mod summary;
pub mod sweep;
pub mod ticks;

use std::path::{Path, PathBuf};

pub use command::Suite;
pub use figure::{Description, Figure};
pub use input::SuitePlots;

/// Everything that can go wrong making a suite's figures.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error(transparent)]
    Input(#[from] input::InputError),
    #[error(transparent)]
    Draw(#[from] figure::DrawError),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Every figure of `plots`, named `<name>-<figure>.svg`.
pub fn render(plots: &SuitePlots) -> Result<Vec<Figure>, PlotError> {
    let name = &plots.name;
    let mut figures = Vec::new();
    if !plots.latencies.is_empty() {
        figures.push(cdf::render(
            &format!("{name}-latency-cdf.svg"),
            &plots.latency,
            &plots.latencies,
        )?);
        figures.push(summary::render(
            &format!("{name}-p50-p99.svg"),
            &plots.latency,
            &plots.load_axis,
            &plots.latencies,
        )?);
    }
    for (i, chart) in plots.lines.iter().enumerate() {
        let suffix = if i == 0 {
            String::new()
        } else {
            format!("-{i}")
        };
        figures.push(lines::render(&format!("{name}-lines{suffix}.svg"), chart)?);
    }
    if !plots.wakes.is_empty() {
        figures.push(hops::render(
            &format!("{name}-hops-p50.svg"),
            &plots.wakes,
            0.5,
        )?);
        figures.push(hops::render(
            &format!("{name}-hops-p95.svg"),
            &plots.wakes,
            0.95,
        )?);
    }
    for chart in &plots.groups {
        figures.push(groups::render(
            &format!("{name}-{}.svg", chart.file),
            chart,
        )?);
    }
    Ok(figures)
}

/// Renders `plots` into `dir`; returns the files written.
pub fn write(plots: &SuitePlots, dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    let mut written = Vec::new();
    for f in render(plots)? {
        let path = dir.join(&f.description.file);
        std::fs::write(&path, &f.svg).map_err(|source| PlotError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

/// What a suite's call site does: its results (as they go to results.json)
/// into figures in `dir`, through the same reader `ste-bench plot` uses.
/// Results the reader does not understand or cannot draw are reported on
/// stderr and draw nothing, so a run never loses its measurements to a
/// plot; only a file that cannot be written is an error.
pub fn write_suite(
    suite: Suite,
    name: &str,
    results: serde_json::Value,
    dir: &Path,
) -> Result<Vec<PathBuf>, PlotError> {
    write_suite_repeats(suite, name, &[("this run".into(), results)], dir)
}

/// [`write_suite`] for a run of several repeats: one results value per
/// repeat, named.
pub fn write_suite_repeats(
    suite: Suite,
    name: &str,
    repeats: &[(String, serde_json::Value)],
    dir: &Path,
) -> Result<Vec<PathBuf>, PlotError> {
    match suite.read(name, repeats) {
        Ok(plots) => match write(&plots, dir) {
            Err(PlotError::Draw(e)) => {
                eprintln!("plots not drawn: {e}");
                Ok(Vec::new())
            }
            written => written,
        },
        Err(e) => {
            eprintln!("plots not drawn: {e}");
            Ok(Vec::new())
        }
    }
}
