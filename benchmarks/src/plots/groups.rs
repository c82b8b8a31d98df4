//! Values per arm at a few categories, side by side in the arm's colour:
//! bars (counts, seconds, throughput) or p50/p99 marks on a log axis
//! (latencies). One panel per question, each with its own axis, so a
//! figure can hold pods lost next to seconds until whole again.

use plotters::coord::Shift;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::figure::{self, Axis, Description, DrawError, Figure, LegendEntry, Series};
use super::header::{self, entry};
use super::palette::{hex, Palette};
use super::slots::Slots;
use super::ticks::{log_range, log_ticks, ms_label, trim};

/// How a panel draws its values.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A bar from 0 to `value` on a linear axis, its value written above it.
    Bars,
    /// p50 (`value`, circle) and p99 (`high`, triangle) on a log ms axis.
    Percentiles,
}

/// One value of one series (arm) at one category.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct GroupValue {
    pub series: String,
    /// Index into the panel's categories.
    pub category: usize,
    /// Bar height, or p50.
    pub value: f64,
    /// p99 (percentile panels).
    #[serde(default)]
    pub high: Option<f64>,
    /// Lowest and highest over repeats (a whisker), when there are several.
    #[serde(default)]
    pub spread: Option<(f64, f64)>,
    /// Text above a bar instead of its value (e.g. "not whole").
    #[serde(default)]
    pub note: Option<String>,
}

/// One panel: categories along x, the series side by side in each.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct GroupPanel {
    pub title: String,
    pub kind: Kind,
    pub categories: Vec<String>,
    pub x_label: String,
    pub y_label: String,
    pub values: Vec<GroupValue>,
}

/// A figure of panels, written to `<suite name>-<file>.svg`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct GroupChart {
    pub file: String,
    pub title: String,
    pub panels: Vec<GroupPanel>,
}

impl GroupChart {
    /// The series in first-seen order over every panel.
    pub fn series(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for v in self.panels.iter().flat_map(|p| &p.values) {
            if !names.contains(&v.series) {
                names.push(v.series.clone());
            }
        }
        names
    }
}

/// The figure `file` of `chart`.
pub fn render(file: &str, chart: &GroupChart) -> Result<Figure, DrawError> {
    let names = chart.series();
    let mut palette = Palette::default();
    let colours: Vec<RGBColor> = names.iter().map(|a| palette.colour(a)).collect();
    let legend = legend(chart, &names, &colours);
    let n = chart.panels.len();
    let (w, h) = figure::size(n.max(2));
    let h = if n <= 1 { figure::HEADER + 400 } else { h };
    let mut svg = String::new();
    let mut series = Vec::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        let err = |e: &dyn std::fmt::Display| DrawError::new(file, e);
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (top, body) = root.split_vertically(figure::HEADER);
        header::draw(&top, &chart.title, &legend).map_err(|e| err(&e))?;
        let areas = if n <= 1 {
            vec![body]
        } else {
            body.split_evenly(figure::grid(n))
        };
        for (p, (panel, area)) in chart.panels.iter().zip(&areas).enumerate() {
            for (name, colour) in names.iter().zip(&colours) {
                let points = panel.values.iter().filter(|v| &v.series == name).count();
                if points > 0 {
                    series.push(Series {
                        panel: p,
                        key: name.clone(),
                        colour: hex(*colour),
                        points,
                    });
                }
            }
            draw_panel(area, panel, &names, &colours).map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    let y_axis = match chart.panels.first().map(|p| p.kind) {
        Some(Kind::Percentiles) => Axis::Log,
        _ => Axis::Linear,
    };
    Ok(Figure {
        svg,
        description: Description {
            file: file.into(),
            panels: n,
            x_axis: Axis::Categories,
            y_axis,
            series,
            legend: legend.into_iter().map(|(e, _)| e).collect(),
        },
    })
}

/// One entry per series (a box in its colour), then p50 and p99 if a panel has them.
fn legend(
    chart: &GroupChart,
    names: &[String],
    colours: &[RGBColor],
) -> Vec<(LegendEntry, RGBColor)> {
    if chart.panels.iter().any(|p| p.kind == Kind::Percentiles) {
        return header::arms_and_percentiles(names, colours, "box");
    }
    names
        .iter()
        .zip(colours)
        .map(|(n, c)| (entry(n, *c, "box"), *c))
        .collect()
}

/// Where the series `s` of `count` sits in category `c`, and its width.
fn place(c: usize, s: usize, count: usize) -> (f64, f64) {
    let width = 0.8 / count.max(1) as f64;
    (
        c as f64 + (s as f64 - (count as f64 - 1.0) / 2.0) * width,
        width,
    )
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &GroupPanel,
    names: &[String],
    colours: &[RGBColor],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    // Only the series this panel has take a place in its categories.
    let mine: Vec<usize> = (0..names.len())
        .filter(|i| panel.values.iter().any(|v| v.series == names[*i]))
        .collect();
    let slot = |v: &GroupValue| {
        let s = mine.iter().position(|i| names[*i] == v.series).unwrap_or(0);
        let colour = names
            .iter()
            .position(|n| *n == v.series)
            .map(|i| colours[i])
            .unwrap_or(BLACK);
        let (x, w) = place(v.category, s, mine.len());
        (x, w, colour)
    };
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(&panel.title, ("sans-serif", 15))
        .margin(8)
        .margin_right(24)
        .x_label_area_size(40)
        .y_label_area_size(60);
    let categories = Slots(panel.categories.len());
    let label = |v: &f64| {
        panel
            .categories
            .get(v.round() as usize)
            .cloned()
            .unwrap_or_default()
    };
    match panel.kind {
        Kind::Percentiles => {
            let values = || {
                panel.values.iter().flat_map(|v| {
                    [
                        Some(v.value),
                        v.high,
                        v.spread.map(|s| s.0),
                        v.spread.map(|s| s.1),
                    ]
                    .into_iter()
                    .flatten()
                })
            };
            let lo = values().filter(|v| *v > 0.0).fold(f64::MAX, f64::min);
            let hi = values().fold(0.0, f64::max);
            let (lo, hi) = if hi > 0.0 {
                log_range(lo, hi)
            } else {
                (1.0, 10.0)
            };
            let mut chart = builder.build_cartesian_2d(
                categories,
                (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)),
            )?;
            chart
                .configure_mesh()
                .x_label_formatter(&label)
                .y_label_formatter(&|v| ms_label(*v))
                .x_desc(&panel.x_label)
                .y_desc(format!("{} (log scale)", panel.y_label))
                .light_line_style(WHITE)
                .disable_x_mesh()
                .draw()?;
            for v in &panel.values {
                let (x, _, colour) = slot(v);
                let high = v.high.unwrap_or(v.value);
                chart.draw_series([PathElement::new(
                    vec![(x, v.value.max(lo)), (x, high.max(lo))],
                    colour.stroke_width(2),
                )])?;
                chart.draw_series([Circle::new((x, v.value.max(lo)), 5, colour.filled())])?;
                if let Some(h) = v.high {
                    chart.draw_series([TriangleMarker::new((x, h.max(lo)), 7, colour.filled())])?;
                }
            }
        }
        Kind::Bars => {
            let top = panel
                .values
                .iter()
                .map(|v| v.spread.map(|s| s.1).unwrap_or(v.value).max(v.value))
                .fold(0.0, f64::max);
            // Small counts get whole ticks (no 0.1 pods); the rest room
            // above the tallest bar for its value.
            let counts = panel.values.iter().all(|v| v.value.fract() == 0.0);
            let (top, labels) = if counts && top <= 8.0 {
                let top = top.max(3.0) + 1.0;
                (top, top as usize + 1)
            } else {
                (if top > 0.0 { top * 1.2 } else { 1.0 }, 10)
            };
            let mut chart = builder.build_cartesian_2d(categories, 0.0..top)?;
            chart
                .configure_mesh()
                .y_labels(labels)
                .x_label_formatter(&label)
                .y_label_formatter(&|v| trim(*v))
                .x_desc(&panel.x_label)
                .y_desc(&panel.y_label)
                .light_line_style(WHITE)
                .disable_x_mesh()
                .draw()?;
            for v in &panel.values {
                let (x, w, colour) = slot(v);
                let half = w * 0.42;
                chart.draw_series([Rectangle::new(
                    [(x - half, 0.0), (x + half, v.value.max(0.0))],
                    colour.filled(),
                )])?;
                // A zero bar still shows whose it is: a stub on the axis.
                chart.draw_series([PathElement::new(
                    vec![(x - half, 0.0), (x + half, 0.0)],
                    colour.stroke_width(4),
                )])?;
                if let Some((a, b)) = v.spread {
                    chart.draw_series([PathElement::new(
                        vec![(x, a), (x, b)],
                        BLACK.stroke_width(1),
                    )])?;
                }
                let text = v.note.clone().unwrap_or_else(|| number(v.value));
                let font = ("sans-serif", 10).into_font().color(&BLACK);
                let shift = 3 * text.chars().count() as i32;
                chart
                    .draw_series([EmptyElement::at((x, v.value.max(0.0)))
                        + Text::new(text, (-shift, -14), font)])?;
            }
        }
    }
    Ok(())
}

/// A bar's value as written above it, short enough for a narrow bar:
/// whole from 10 up, one decimal below (two below 0.1).
fn number(v: f64) -> String {
    if v >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v >= 0.1 {
        format!("{v:.1}")
    } else {
        trim(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_sit_side_by_side_within_their_category() {
        let (a, w) = place(0, 0, 2);
        let (b, _) = place(0, 1, 2);
        assert!(a < b && (b - a - w).abs() < 1e-9);
        assert!((place(3, 0, 1).0 - 3.0).abs() < 1e-9);
        assert_eq!(number(16.0), "16");
        assert_eq!(number(2.61), "2.6");
        assert_eq!(number(12.6), "13");
        assert_eq!(number(0.05), "0.05");
        assert_eq!(number(8090.4), "8090");
    }
}
