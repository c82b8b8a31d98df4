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
    let (size, lines) = title_lines(title, width.saturating_sub(24));
    let line_height = size as i32 + 3;
    let top = if lines.len() > 1 { 4 } else { 8 };
    for (i, line) in lines.iter().enumerate() {
        area.draw(&Text::new(
            line.clone(),
            (12, top + i as i32 * line_height),
            ("sans-serif", size).into_font().color(&BLACK),
        ))?;
    }
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

/// Title font sizes: one line at [`TITLE_LARGE`] when it fits the strip,
/// else up to two lines at [`TITLE_SMALL`] (the strip holds no more above
/// its legend), the last one shortened with "…" if even that is too long.
pub const TITLE_LARGE: u32 = 18;
pub const TITLE_SMALL: u32 = 13;

/// A sans-serif character's width at `size` px, with a margin: 0.45 em
/// (this project's titles measure 0.40 em per character on average).
fn char_width(size: u32) -> f32 {
    size as f32 * 0.45
}

/// The font size and lines that draw `title` within `width` pixels.
pub fn title_lines(title: &str, width: u32) -> (u32, Vec<String>) {
    let fits =
        |text: &str, size: u32| text.chars().count() as f32 * char_width(size) <= width as f32;
    if fits(title, TITLE_LARGE) {
        return (TITLE_LARGE, vec![title.to_string()]);
    }
    let per_line = ((width as f32 / char_width(TITLE_SMALL)) as usize).max(1);
    let mut lines: Vec<String> = vec![String::new()];
    for word in title.split_whitespace() {
        let last = lines.last_mut().expect("one line at least");
        if last.is_empty() {
            last.push_str(word);
        } else if last.chars().count() + 1 + word.chars().count() <= per_line {
            last.push(' ');
            last.push_str(word);
        } else {
            lines.push(word.to_string());
        }
    }
    if lines.len() > 2 {
        let rest = lines.split_off(1).join(" ");
        lines.push(rest);
    }
    for line in &mut lines {
        if line.chars().count() > per_line {
            let kept: String = line.chars().take(per_line.saturating_sub(1)).collect();
            *line = format!("{kept}…");
        }
    }
    (TITLE_SMALL, lines)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_title_stays_one_large_line() {
        let (size, lines) = title_lines("churn, create → bound", 436);
        assert_eq!(
            (size, lines),
            (TITLE_LARGE, vec!["churn, create → bound".to_string()])
        );
    }

    #[test]
    fn a_long_title_wraps_into_two_small_lines_that_fit_and_keep_every_word() {
        let title = "cold start, p50 time from the wake to each hop, per arm (bar outline: the arm's colour)";
        let (size, lines) = title_lines(title, 436);
        assert_eq!(size, TITLE_SMALL);
        assert_eq!(lines.len(), 2);
        for line in &lines {
            assert!(
                line.chars().count() as f32 * char_width(size) <= 436.0,
                "{line}"
            );
        }
        assert_eq!(lines.join(" "), title);
    }

    #[test]
    fn a_title_too_long_for_two_lines_is_shortened_not_overflowed() {
        let title = "word ".repeat(80);
        let (_, lines) = title_lines(title.trim(), 200);
        assert_eq!(lines.len(), 2);
        assert!(lines[1].ends_with('…'));
        for line in &lines {
            assert!(line.chars().count() as f32 * char_width(TITLE_SMALL) <= 200.0);
        }
    }
}
