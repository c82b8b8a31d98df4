//! Latency CDFs: one panel per load, one line per arm in the arm's colour,
//! on a log-scale x axis with round ticks; the p50 and p99 of each line
//! marked (and every sample when a line has few).

use plotters::prelude::*;

use super::figure::{self, Axis, Description, DrawError, Figure, Series};
use super::header::{self, quantile};
use super::input::{LatencySet, Load};
use super::palette::{hex, width, Palette};
use super::ticks::{log_range, log_ticks, ms_label};

/// Lines with at most this many samples get a dot on every sample.
const DOTS_UP_TO: usize = 60;
/// Longer lines are drawn through this many evenly spaced ranks.
const MAX_POINTS: usize = 400;

/// Arms in first-seen order, loads sorted by value.
pub fn arms_and_loads(sets: &[LatencySet]) -> (Vec<String>, Vec<Load>) {
    let mut arms: Vec<String> = Vec::new();
    let mut loads: Vec<Load> = Vec::new();
    for s in sets {
        if !arms.contains(&s.arm) {
            arms.push(s.arm.clone());
        }
        if !loads.iter().any(|l| l.label == s.load.label) {
            loads.push(s.load.clone());
        }
    }
    loads.sort_by(|a, b| a.value.total_cmp(&b.value));
    (arms, loads)
}

/// Every repeat's samples of one arm at one load, sorted.
pub fn merged(sets: &[LatencySet], arm: &str, load: &Load) -> Vec<f64> {
    let mut all: Vec<f64> = sets
        .iter()
        .filter(|s| s.arm == arm && s.load.label == load.label)
        .flat_map(|s| s.latencies_ms.iter().copied())
        .filter(|v| v.is_finite())
        .collect();
    all.sort_by(|a, b| a.total_cmp(b));
    all
}

/// The CDF figure `file` of `sets` ("what" names the latency).
pub fn render(file: &str, what: &str, sets: &[LatencySet]) -> Result<Figure, DrawError> {
    let (arms, loads) = arms_and_loads(sets);
    let mut palette = Palette::default();
    let colours: Vec<RGBColor> = arms.iter().map(|a| palette.colour(a)).collect();
    let all: Vec<f64> = sets
        .iter()
        .flat_map(|s| s.latencies_ms.iter().copied())
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let lo = all.iter().copied().fold(f64::MAX, f64::min);
    let hi = all.iter().copied().fold(0.0, f64::max);
    let (lo, hi) = if all.is_empty() {
        (1.0, 10.0)
    } else {
        log_range(lo, hi)
    };
    let ticks = log_ticks(lo, hi);
    let mut svg = String::new();
    let mut series = Vec::new();
    {
        let root = SVGBackend::with_string(&mut svg, figure::size(loads.len())).into_drawing_area();
        let err = |e: &dyn std::fmt::Display| DrawError::new(file, e);
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (top, body) = root.split_vertically(figure::HEADER);
        let legend = header::arms_and_percentiles(&arms, &colours, "line");
        header::draw(
            &top,
            &format!("{what}: CDF per arm, one panel per load (log scale)"),
            &legend,
        )
        .map_err(|e| err(&e))?;
        let panels = body.split_evenly(figure::grid(loads.len()));
        for (p, (load, area)) in loads.iter().zip(panels.iter()).enumerate() {
            let mut chart = ChartBuilder::on(area)
                .caption(&load.label, ("sans-serif", 15))
                .margin(8)
                .margin_right(24)
                .x_label_area_size(36)
                .y_label_area_size(48)
                .build_cartesian_2d(
                    (lo..hi).log_scale().with_key_points(ticks.clone()),
                    0.0..1.0,
                )
                .map_err(|e| err(&e))?;
            chart
                .configure_mesh()
                .x_label_formatter(&|v| ms_label(*v))
                .y_label_formatter(&|v: &f64| format!("{:.0}%", *v * 100.0))
                .x_desc(format!("{what} (log scale)"))
                .y_labels(5)
                .light_line_style(WHITE)
                .draw()
                .map_err(|e| err(&e))?;
            for (i, (arm, colour)) in arms.iter().zip(&colours).enumerate() {
                let values = merged(sets, arm, load);
                if values.is_empty() {
                    continue;
                }
                let points = cdf_points(&values, lo);
                series.push(Series {
                    panel: p,
                    key: arm.clone(),
                    colour: hex(*colour),
                    points: values.len(),
                });
                chart
                    .draw_series(LineSeries::new(
                        points.clone(),
                        colour.stroke_width(width(i, arms.len())),
                    ))
                    .map_err(|e| err(&e))?;
                if values.len() <= DOTS_UP_TO {
                    chart
                        .draw_series(
                            points[1..]
                                .iter()
                                .map(|pt| Circle::new(*pt, 2, colour.filled())),
                        )
                        .map_err(|e| err(&e))?;
                }
                let n = values.len() as f64;
                let at = |q: f64| {
                    let v = quantile(&values, q).max(lo);
                    let rank = values.iter().filter(|x| **x <= v).count() as f64;
                    (v, rank / n)
                };
                chart
                    .draw_series([Circle::new(at(0.5), 5, colour.filled())])
                    .map_err(|e| err(&e))?;
                chart
                    .draw_series([TriangleMarker::new(at(0.99), 7, colour.filled())])
                    .map_err(|e| err(&e))?;
            }
        }
        root.present().map_err(|e| err(&e))?;
    }
    let legend = header::arms_and_percentiles(&arms, &colours, "line")
        .into_iter()
        .map(|(e, _)| e)
        .collect();
    Ok(Figure {
        svg,
        description: Description {
            file: file.into(),
            panels: loads.len(),
            x_axis: Axis::Log,
            y_axis: Axis::Linear,
            series,
            legend,
        },
    })
}

/// A step CDF through the sorted values (at most [`MAX_POINTS`] ranks),
/// starting at 0 on the axis' left end.
fn cdf_points(sorted: &[f64], lo: f64) -> Vec<(f64, f64)> {
    let n = sorted.len();
    let step = n.div_ceil(MAX_POINTS).max(1);
    let mut points = vec![(sorted[0].max(lo), 0.0)];
    for i in (0..n).filter(|i| i % step == step - 1 || *i == n - 1) {
        points.push((sorted[i].max(lo), (i + 1) as f64 / n as f64));
    }
    points
}
