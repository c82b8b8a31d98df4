//! Lines over a linear (or log) x axis, one panel per step, one colour per
//! arm: pods bound per second against the offered load, Deployments per
//! second against parallelism.

use plotters::coord::ranged1d::Ranged;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::figure::{self, Axis, Description, DrawError, Figure, Series};
use super::header::{self, entry};
use super::palette::{hex, width, Palette};
use super::ticks::{log_range, log_ticks, trim};

/// One line of a chart with linear axes (x, y), drawn in its arm's colour.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Line {
    pub arm: String,
    pub points: Vec<(f64, f64)>,
}

/// A chart of lines, one panel per load step (one panel if `panels` has one).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Log x axis with round ticks (for parallelism 1, 10, 100…).
    #[serde(default)]
    pub log_x: bool,
    /// Log y axis with round ticks (latencies over orders of magnitude).
    #[serde(default)]
    pub log_y: bool,
    /// A marker on every point (for a few measured points).
    #[serde(default)]
    pub markers: bool,
    pub panels: Vec<(String, Vec<Line>)>,
}

/// The arms of `chart` in first-seen order and their colours.
fn arms(chart: &LineChart) -> (Vec<String>, Vec<RGBColor>) {
    let mut arms: Vec<String> = Vec::new();
    for (_, lines) in &chart.panels {
        for l in lines {
            if !arms.contains(&l.arm) {
                arms.push(l.arm.clone());
            }
        }
    }
    let mut palette = Palette::default();
    let colours = arms.iter().map(|a| palette.colour(a)).collect();
    (arms, colours)
}

/// The figure `file` of `chart`.
pub fn render(file: &str, chart: &LineChart) -> Result<Figure, DrawError> {
    let (arms, colours) = arms(chart);
    let points = || {
        chart
            .panels
            .iter()
            .flat_map(|p| p.1.iter().flat_map(|l| l.points.iter()))
    };
    let x_max = points().map(|p| p.0).fold(0.0, f64::max);
    let x_min = points().map(|p| p.0).fold(f64::MAX, f64::min);
    let y_max = points().map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.1;
    // A log y axis starts at the lowest positive value (points at 0 are not drawn).
    let y_min = points()
        .map(|p| p.1)
        .filter(|y| *y > 0.0)
        .fold(f64::MAX, f64::min)
        .min(y_max);
    let n = chart.panels.len();
    let mark = if chart.markers { "circle" } else { "line" };
    let legend: Vec<_> = arms
        .iter()
        .zip(&colours)
        .map(|(a, c)| entry(a, *c, mark))
        .collect();
    let mut svg = String::new();
    let mut series = Vec::new();
    {
        let root = SVGBackend::with_string(&mut svg, figure::size(n)).into_drawing_area();
        let err = |e: &dyn std::fmt::Display| DrawError::new(file, e);
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (top, body) = root.split_vertically(figure::HEADER);
        let strip: Vec<_> = legend
            .iter()
            .cloned()
            .zip(colours.iter().copied())
            .collect();
        header::draw(&top, &chart.title, &strip).map_err(|e| err(&e))?;
        let style = |arm: &str| {
            let i = arms.iter().position(|a| a == arm).unwrap_or(0);
            (colours[i], width(i, arms.len()))
        };
        let areas = body.split_evenly(figure::grid(n));
        for (p, ((title, lines), area)) in chart.panels.iter().zip(areas.iter()).enumerate() {
            for line in lines {
                series.push(Series {
                    panel: p,
                    key: line.arm.clone(),
                    colour: hex(style(&line.arm).0),
                    points: line.points.len(),
                });
            }
            let mut builder = ChartBuilder::on(area);
            builder
                .caption(title, ("sans-serif", 15))
                .margin(8)
                .margin_right(24)
                .x_label_area_size(36)
                .y_label_area_size(48);
            let (x_lo, x_hi) = log_range(x_min.max(1e-3), x_max);
            let x_log = || {
                (x_lo..x_hi)
                    .log_scale()
                    .with_key_points(log_ticks(x_lo, x_hi))
            };
            let x_linear = || 0.0..x_max.max(1e-9);
            let x_desc = if chart.log_x {
                format!("{} (log scale)", chart.x_label)
            } else {
                chart.x_label.clone()
            };
            let (y_lo, y_hi) = log_range(y_min.max(1e-3), y_max);
            let y_log = || {
                (y_lo..y_hi)
                    .log_scale()
                    .with_key_points(log_ticks(y_lo, y_hi))
            };
            let y_linear = || 0.0..y_max;
            // One body for the four axis kinds (their coordinate types differ).
            macro_rules! panel {
                ($x:expr, $y:expr, $y_desc:expr) => {{
                    let mut c = builder.build_cartesian_2d($x, $y).map_err(|e| err(&e))?;
                    c.configure_mesh()
                        .x_label_formatter(&|v| trim(*v))
                        .y_label_formatter(&|v| trim(*v))
                        .x_desc(&x_desc)
                        .y_desc($y_desc)
                        .light_line_style(WHITE)
                        .draw()
                        .map_err(|e| err(&e))?;
                    draw_lines(&mut c, lines, &style, chart.markers).map_err(|e| err(&e))?;
                }};
            }
            let y_desc_log = format!("{} (log scale)", chart.y_label);
            match (chart.log_x, chart.log_y) {
                (true, true) => panel!(x_log(), y_log(), &y_desc_log),
                (true, false) => panel!(x_log(), y_linear(), &chart.y_label),
                (false, true) => panel!(x_linear(), y_log(), &y_desc_log),
                (false, false) => panel!(x_linear(), y_linear(), &chart.y_label),
            }
        }
        root.present().map_err(|e| err(&e))?;
    }
    Ok(Figure {
        svg,
        description: Description {
            file: file.into(),
            panels: n,
            x_axis: if chart.log_x { Axis::Log } else { Axis::Linear },
            y_axis: if chart.log_y { Axis::Log } else { Axis::Linear },
            series,
            legend,
        },
    })
}

/// Each line in its arm's colour and width, with a dot on every point if `markers`.
fn draw_lines<DB: DrawingBackend, X: Ranged<ValueType = f64>, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<X, Y>>,
    lines: &[Line],
    style: &dyn Fn(&str) -> (RGBColor, u32),
    markers: bool,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    for line in lines {
        let (colour, w) = style(&line.arm);
        chart.draw_series(LineSeries::new(
            line.points.iter().copied(),
            colour.stroke_width(w),
        ))?;
        if markers {
            chart.draw_series(
                line.points
                    .iter()
                    .map(|pt| Circle::new(*pt, 4, colour.filled())),
            )?;
        }
    }
    Ok(())
}
