//! Where a cold start's time goes: per arm, a bar stacked from the hops
//! (wake → scaled → created → bound → Ready → Endpoints → first response),
//! one panel per scale. Each segment is the growth of the chosen percentile
//! of the time from the wake to that hop, so the bar's top is that
//! percentile of wake → last hop. Hops have their own colours, light to
//! dark in hop order; the bar's outline is the arm's colour.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::figure::{self, Axis, Description, DrawError, Figure, Series};
use super::header::{self, entry, quantile};
use super::input::{Wake, COLDSTART_HOPS};
use super::palette::{hex, Palette, HOPS};
use super::slots::Slots;
use super::ticks::trim;

/// (hop, cumulative ms at percentile `q`) for the hops some wake of `arm`
/// at `revisions` reached, in hop order.
pub fn stack(wakes: &[Wake], arm: &str, revisions: usize, q: f64) -> Vec<(String, f64)> {
    let mine: Vec<&Wake> = wakes
        .iter()
        .filter(|w| w.arm == arm && w.revisions == revisions)
        .collect();
    let mut out: Vec<(String, f64)> = Vec::new();
    for hop in hop_order(wakes) {
        let mut times: Vec<f64> = mine
            .iter()
            .filter_map(|w| w.hops_ms.iter().find(|(h, _)| *h == hop).map(|(_, ms)| *ms))
            .collect();
        if times.is_empty() {
            continue;
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let at = quantile(&times, q).max(out.last().map(|l| l.1).unwrap_or(0.0));
        out.push((hop, at));
    }
    out
}

/// Known hops in their order, then unknown ones as first seen.
fn hop_order(wakes: &[Wake]) -> Vec<String> {
    let mut order: Vec<String> = COLDSTART_HOPS.iter().map(|h| h.to_string()).collect();
    for w in wakes {
        for (h, _) in &w.hops_ms {
            if !order.contains(h) {
                order.push(h.clone());
            }
        }
    }
    // The wake is the zero every hop counts from: no segment of its own.
    order.retain(|h| h != "wake" && wakes.iter().any(|w| w.hops_ms.iter().any(|(x, _)| x == h)));
    order
}

/// The stacked-bar figure `file` of `wakes` at percentile `q` (e.g. 0.95).
pub fn render(file: &str, wakes: &[Wake], q: f64) -> Result<Figure, DrawError> {
    let mut arms: Vec<String> = Vec::new();
    let mut scales: Vec<usize> = Vec::new();
    for w in wakes {
        if !arms.contains(&w.arm) {
            arms.push(w.arm.clone());
        }
        if !scales.contains(&w.revisions) {
            scales.push(w.revisions);
        }
    }
    scales.sort_unstable();
    let hops = hop_order(wakes);
    let hop_colour = |h: &str| HOPS[hops.iter().position(|x| x == h).unwrap_or(0) % HOPS.len()];
    let mut palette = Palette::default();
    let colours: Vec<RGBColor> = arms.iter().map(|a| palette.colour(a)).collect();
    let pct = format!("p{}", trim(q * 100.0));
    let mut svg = String::new();
    let mut series = Vec::new();
    {
        let layout = Labels::for_arms(&arms);
        let (_, h) = figure::size(scales.len());
        let (rows, cols) = figure::grid(scales.len());
        let size = (
            cols as u32 * panel_width(arms.len()),
            h + rows as u32 * layout.extra_height(),
        );
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        let err = |e: &dyn std::fmt::Display| DrawError::new(file, e);
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (top, body) = root.split_vertically(figure::HEADER);
        let legend: Vec<_> = hops
            .iter()
            .map(|h| {
                (
                    entry(&format!("→ {h}"), hop_colour(h), "box"),
                    hop_colour(h),
                )
            })
            .collect();
        header::draw(&top, &format!("cold start, {pct} time from the wake to each hop, per arm (bar outline: the arm's colour)"), &legend)
            .map_err(|e| err(&e))?;
        let areas = body.split_evenly(figure::grid(scales.len()));
        for (p, (scale, area)) in scales.iter().zip(areas.iter()).enumerate() {
            let stacks: Vec<Vec<(String, f64)>> =
                arms.iter().map(|a| stack(wakes, a, *scale, q)).collect();
            let top_ms = stacks
                .iter()
                .filter_map(|s| s.last().map(|l| l.1))
                .fold(0.0, f64::max);
            let mut chart = ChartBuilder::on(area)
                .caption(
                    match scale {
                        1 => "1 revision woken".to_string(),
                        n => format!("{n} revisions woken at once"),
                    },
                    ("sans-serif", 15),
                )
                .margin(8)
                .margin_right(24)
                .x_label_area_size(layout.area())
                .y_label_area_size(56)
                .build_cartesian_2d(Slots(arms.len()), 0.0..(top_ms.max(1.0) * 1.1) / 1000.0)
                .map_err(|e| err(&e))?;
            chart
                .configure_mesh()
                .x_label_formatter(&|_| String::new())
                .y_desc(format!("seconds from the wake ({pct})"))
                .light_line_style(WHITE)
                .draw()
                .map_err(|e| err(&e))?;
            for (a, (stack, colour)) in stacks.iter().zip(&colours).enumerate() {
                let (x0, x1) = (a as f64 - 0.3, a as f64 + 0.3);
                let mut below = 0.0;
                for (hop, at) in stack {
                    let c = hop_colour(hop);
                    series.push(Series {
                        panel: p,
                        key: format!("{} {hop}", arms[a]),
                        colour: hex(c),
                        points: 1,
                    });
                    chart
                        .draw_series([Rectangle::new(
                            [(x0, below / 1000.0), (x1, at / 1000.0)],
                            c.filled(),
                        )])
                        .map_err(|e| err(&e))?;
                    below = *at;
                }
                chart
                    .draw_series([Rectangle::new(
                        [(x0, 0.0), (x1, below / 1000.0)],
                        colour.stroke_width(3),
                    )])
                    .map_err(|e| err(&e))?;
            }
            draw_labels(&root, &chart, &layout, arms.len()).map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    let legend = hops
        .iter()
        .map(|h| entry(&format!("→ {h}"), hop_colour(h), "box"))
        .collect();
    Ok(Figure {
        svg,
        description: Description {
            file: file.into(),
            panels: scales.len(),
            x_axis: Axis::Categories,
            y_axis: Axis::Linear,
            series,
            legend,
        },
    })
}

/// How the arms' names fit under their bars: on one line when they fit side
/// by side in a panel, else each name wrapped at its spaces and `+` into
/// lines as wide as its bar (the panel grows by the extra lines), so nine
/// arms' names never overprint each other.
pub struct Labels {
    lines: Vec<Vec<String>>,
}

/// Pixels per character of an axis label (11 px sans-serif, with margin).
const LABEL_CHAR: u32 = 6;
/// Pixels per label line.
const LABEL_LINE: u32 = 13;
/// Room left and right of a panel's bars (the y axis and margins).
const PANEL_MARGINS: u32 = 90;
/// The narrowest a bar's slot gets: a panel of many arms grows wider.
const MIN_SLOT: u32 = 72;

/// A panel's width for `bars` bars.
pub fn panel_width(bars: usize) -> u32 {
    figure::PANEL.0.max(PANEL_MARGINS + MIN_SLOT * bars as u32)
}

impl Labels {
    pub fn for_arms(arms: &[String]) -> Labels {
        let per_bar = (panel_width(arms.len()) - PANEL_MARGINS) / (arms.len().max(1) as u32);
        let width = (per_bar / LABEL_CHAR).max(4) as usize;
        Labels {
            lines: arms.iter().map(|a| wrap(a, width)).collect(),
        }
    }

    /// The lines under bar `i`.
    pub fn lines(&self, i: usize) -> &[String] {
        self.lines.get(i).map(Vec::as_slice).unwrap_or(&[])
    }

    fn most_lines(&self) -> u32 {
        self.lines.iter().map(Vec::len).max().unwrap_or(1).max(1) as u32
    }

    /// Height of the label area under the bars.
    fn area(&self) -> u32 {
        36 + (self.most_lines() - 1) * LABEL_LINE
    }

    /// What the figure grows by per row of panels.
    fn extra_height(&self) -> u32 {
        self.area() - 36
    }
}

/// `name` in lines of at most `width` characters, broken after a space or a
/// `+` (kept at the line's end); a longer piece gets a line of its own.
fn wrap(name: &str, width: usize) -> Vec<String> {
    let mut pieces: Vec<String> = Vec::new();
    let mut piece = String::new();
    for c in name.chars() {
        piece.push(c);
        if c == ' ' || c == '+' {
            pieces.push(std::mem::take(&mut piece));
        }
    }
    if !piece.is_empty() {
        pieces.push(piece);
    }
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for piece in pieces {
        if !line.is_empty() && line.chars().count() + piece.trim_end().chars().count() > width {
            lines.push(line.trim_end().to_string());
            line.clear();
        }
        line.push_str(&piece);
    }
    if !line.trim().is_empty() {
        lines.push(line.trim_end().to_string());
    }
    lines
}

/// Draws `labels` under the bars of `chart` on `root` (absolute pixels).
fn draw_labels<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    chart: &ChartContext<'_, DB, Cartesian2d<Slots, plotters::coord::types::RangedCoordf64>>,
    labels: &Labels,
    bars: usize,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let style = ("sans-serif", 11)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Top));
    for i in 0..bars {
        let (x, y) = chart.backend_coord(&(i as f64, 0.0));
        for (n, line) in labels.lines(i).iter().enumerate() {
            let at = (x, y + 6 + n as i32 * LABEL_LINE as i32);
            root.draw(&Text::new(line.clone(), at, style.clone()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_short_arm_names_keep_one_line() {
        let arms: Vec<String> = ["stock", "stock-qps", "ste"].map(String::from).to_vec();
        let labels = Labels::for_arms(&arms);
        assert_eq!(labels.lines(1), ["stock-qps"]);
        assert_eq!(labels.extra_height(), 0);
    }

    #[test]
    fn long_names_wrap_at_spaces_and_plus_and_keep_every_character() {
        let name = "stock-qps+bridge aggressive+webhook";
        let lines = wrap(name, 8);
        assert_eq!(lines, ["stock-qps+", "bridge", "aggressive+", "webhook"]);
        let arms = vec![name.to_string(); 9];
        assert_eq!(panel_width(9), 90 + 9 * 72);
        let labels = Labels::for_arms(&arms);
        assert_eq!(
            labels.lines(0).concat().replace(' ', ""),
            name.replace(' ', "")
        );
        assert_eq!(
            labels.extra_height(),
            (labels.lines(0).len() as u32 - 1) * LABEL_LINE
        );
    }
}
