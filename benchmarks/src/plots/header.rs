//! The strip above a figure's panels: its title and its one legend (each
//! entry once), so panels carry no legend of their own.

use plotters::coord::Shift;
use plotters::prelude::*;

use super::figure::LegendEntry;
use super::palette::hex;

/// Draws `title` and `legend` on `area` (the strip), left to right, wrapping.
pub fn draw<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    legend: &[(LegendEntry, RGBColor)],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (width, _) = area.dim_in_pixel();
    area.draw(&Text::new(
        title.to_string(),
        (12, 8),
        ("sans-serif", 18).into_font().color(&BLACK),
    ))?;
    let (mut x, mut y) = (12i32, 40i32);
    for (entry, colour) in legend {
        let text_width = 7 * entry.label.chars().count() as i32;
        if x + 30 + text_width > width as i32 - 8 {
            x = 12;
            y += 20;
        }
        mark(area, &entry.mark, (x + 10, y + 7), *colour)?;
        area.draw(&Text::new(
            entry.label.clone(),
            (x + 24, y),
            ("sans-serif", 13).into_font().color(&BLACK),
        ))?;
        x += 40 + text_width;
    }
    Ok(())
}

/// A legend entry: `mark` is "line", "circle", "triangle" or "box".
pub fn entry(label: &str, colour: RGBColor, mark: &str) -> LegendEntry {
    LegendEntry {
        label: label.into(),
        colour: hex(colour),
        mark: mark.into(),
    }
}

/// The legend of a per-arm figure: one entry per arm drawn with `mark` in
/// its colour, then the black p50 and p99 markers.
pub fn arms_and_percentiles(
    arms: &[String],
    colours: &[RGBColor],
    mark: &str,
) -> Vec<(LegendEntry, RGBColor)> {
    arms.iter()
        .zip(colours)
        .map(|(a, c)| (entry(a, *c, mark), *c))
        .chain([
            (entry("p50", BLACK, "circle"), BLACK),
            (entry("p99", BLACK, "triangle"), BLACK),
        ])
        .collect()
}

/// A legend mark centred on `at`.
pub fn mark<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    kind: &str,
    at: (i32, i32),
    colour: RGBColor,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (cx, cy) = at;
    match kind {
        "circle" => area.draw(&Circle::new(at, 4, colour.filled())),
        "triangle" => area.draw(&TriangleMarker::new(at, 6, colour.filled())),
        "box" => area.draw(&Rectangle::new(
            [(cx - 7, cy - 6), (cx + 7, cy + 6)],
            colour.filled(),
        )),
        _ => area.draw(&PathElement::new(
            vec![(cx - 10, cy), (cx + 10, cy)],
            colour.stroke_width(3),
        )),
    }
}

/// The value below which a fraction `q` of the sorted `values` fall
/// (nearest rank); 0 for none.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
