//! The comparison at each load: p50 (circle) and p99 (triangle) per arm,
//! arms side by side in the arm's colour, with a whisker from the lowest to
//! the highest repeat (a lone mark: one repeat).

use plotters::prelude::*;

use super::cdf::arms_and_loads;
use super::figure::{self, Axis, Description, DrawError, Figure, Series};
use super::header::{self, quantile};

use super::input::{LatencySet, Load};
use super::palette::{hex, Palette};
use super::slots::Slots;
use super::ticks::{log_range, log_ticks, ms_label};

/// A percentile of one arm at one load over its repeats.
#[derive(Debug, Clone, PartialEq)]
pub struct Spread {
    /// Median of the repeats' values.
    pub mid: f64,
    pub min: f64,
    pub max: f64,
    pub repeats: usize,
}

/// The `q` percentile of each repeat of `arm` at `load`, summarised.
pub fn spread(sets: &[LatencySet], arm: &str, load: &Load, q: f64) -> Option<Spread> {
    let mut per_repeat: Vec<f64> = sets
        .iter()
        .filter(|s| s.arm == arm && s.load.label == load.label && !s.latencies_ms.is_empty())
        .map(|s| {
            let mut v = s.latencies_ms.clone();
            v.sort_by(|a, b| a.total_cmp(b));
            quantile(&v, q)
        })
        .collect();
    if per_repeat.is_empty() {
        return None;
    }
    per_repeat.sort_by(|a, b| a.total_cmp(b));
    let n = per_repeat.len();
    Some(Spread {
        // The median of the repeats (the mean of the middle two for an even count).
        mid: (per_repeat[(n - 1) / 2] + per_repeat[n / 2]) / 2.0,
        min: per_repeat[0],
        max: per_repeat[per_repeat.len() - 1],
        repeats: per_repeat.len(),
    })
}

/// The summary figure `file` of `sets`.
pub fn render(
    file: &str,
    what: &str,
    load_axis: &str,
    sets: &[LatencySet],
) -> Result<Figure, DrawError> {
    let (arms, loads) = arms_and_loads(sets);
    let mut palette = Palette::default();
    let colours: Vec<RGBColor> = arms.iter().map(|a| palette.colour(a)).collect();
    let mut marks: Vec<(usize, usize, f64, Spread, bool)> = Vec::new();
    for (l, load) in loads.iter().enumerate() {
        for (a, arm) in arms.iter().enumerate() {
            for (q, is_p99) in [(0.5, false), (0.99, true)] {
                if let Some(s) = spread(sets, arm, load, q) {
                    marks.push((l, a, q, s, is_p99));
                }
            }
        }
    }
    let lo = marks.iter().map(|m| m.3.min).fold(f64::MAX, f64::min);
    let hi = marks.iter().map(|m| m.3.max).fold(0.0, f64::max);
    let (lo, hi) = if marks.is_empty() {
        (1.0, 10.0)
    } else {
        log_range(lo, hi)
    };
    let repeats = marks.iter().map(|m| m.3.repeats).max().unwrap_or(0);
    let width = 0.8 / arms.len().max(1) as f64;
    let x_of = |l: usize, a: usize| l as f64 + (a as f64 - (arms.len() as f64 - 1.0) / 2.0) * width;
    let mut svg = String::new();
    let mut series = Vec::new();
    {
        let (w, _) = figure::size(2);
        let root = SVGBackend::with_string(&mut svg, (w, figure::HEADER + 400)).into_drawing_area();
        let err = |e: &dyn std::fmt::Display| DrawError::new(file, e);
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (top, body) = root.split_vertically(figure::HEADER);
        let legend = header::arms_and_percentiles(&arms, &colours, "box");
        let spread_note = if repeats > 1 {
            format!("whiskers: lowest to highest of {repeats} repeats")
        } else {
            "one run: no spread".to_string()
        };
        header::draw(
            &top,
            &format!("{what}: p50 and p99 per arm at each load ({spread_note})"),
            &legend,
        )
        .map_err(|e| err(&e))?;
        let labels: Vec<String> = loads.iter().map(|l| l.label.clone()).collect();
        let mut chart = ChartBuilder::on(&body)
            .margin(12)
            .margin_right(24)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(
                Slots(loads.len()),
                (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)),
            )
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_label_formatter(&|v| labels.get(v.round() as usize).cloned().unwrap_or_default())
            .y_label_formatter(&|v| ms_label(*v))
            .x_desc(load_axis)
            .y_desc(format!("{what} (log scale)"))
            .light_line_style(WHITE)
            .draw()
            .map_err(|e| err(&e))?;
        for (a, (arm, colour)) in arms.iter().zip(&colours).enumerate() {
            let mine: Vec<_> = marks.iter().filter(|m| m.1 == a).collect();
            series.push(Series {
                panel: 0,
                key: arm.clone(),
                colour: hex(*colour),
                points: mine.len(),
            });
            for (l, _, _, s, is_p99) in mine {
                // p50 a little left of the arm's slot, p99 a little right,
                // so their whiskers never share a line.
                let x = x_of(*l, a) + if *is_p99 { 0.2 } else { -0.2 } * width;
                chart
                    .draw_series([PathElement::new(
                        vec![(x, s.min), (x, s.max)],
                        colour.stroke_width(2),
                    )])
                    .map_err(|e| err(&e))?;
                if *is_p99 {
                    chart
                        .draw_series([TriangleMarker::new((x, s.mid), 7, colour.filled())])
                        .map_err(|e| err(&e))?;
                } else {
                    chart
                        .draw_series([Circle::new((x, s.mid), 5, colour.filled())])
                        .map_err(|e| err(&e))?;
                }
            }
        }
        root.present().map_err(|e| err(&e))?;
    }
    let legend = header::arms_and_percentiles(&arms, &colours, "box")
        .into_iter()
        .map(|(e, _)| e)
        .collect();
    Ok(Figure {
        svg,
        description: Description {
            file: file.into(),
            panels: 1,
            x_axis: Axis::Categories,
            y_axis: Axis::Log,
            series,
            legend,
        },
    })
}
