//! A rendered figure: its SVG and a description of what it draws (series,
//! colours, axes, legend), which the tests check instead of pixels.

use serde::Serialize;

/// How an axis maps values.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    Linear,
    /// Log scale with ticks at 1, 2, 5 × 10^k.
    Log,
    /// One slot per category (loads, arms).
    Categories,
}

/// One drawn series.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Series {
    pub panel: usize,
    /// The arm (or hop) it belongs to: its colour is the arm's.
    pub key: String,
    /// `#RRGGBB`.
    pub colour: String,
    pub points: usize,
}

/// One legend entry.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct LegendEntry {
    pub label: String,
    pub colour: String,
    /// "line", "circle", "triangle", "box".
    pub mark: String,
}

/// What a figure draws.
#[derive(Serialize, Clone, Debug)]
pub struct Description {
    pub file: String,
    pub panels: usize,
    pub x_axis: Axis,
    pub y_axis: Axis,
    pub series: Vec<Series>,
    pub legend: Vec<LegendEntry>,
}

/// A figure ready to write: `svg` goes to `description.file`.
pub struct Figure {
    pub svg: String,
    pub description: Description,
}

/// Plotters' drawing errors, as text (their types are generic over the backend).
#[derive(Debug, thiserror::Error)]
#[error("drawing {file}: {message}")]
pub struct DrawError {
    pub file: String,
    pub message: String,
}

impl DrawError {
    pub fn new(file: &str, e: impl std::fmt::Display) -> Self {
        DrawError {
            file: file.into(),
            message: e.to_string(),
        }
    }
}

/// Width and height of one panel, and columns of panels per row.
pub const PANEL: (u32, u32) = (460, 330);
pub const COLUMNS: usize = 2;
/// Height of the title and legend strip above the panels.
pub const HEADER: u32 = 80;

/// The whole figure's size for `panels` panels.
pub fn size(panels: usize) -> (u32, u32) {
    let cols = panels.clamp(1, COLUMNS);
    let rows = panels.max(1).div_ceil(COLUMNS);
    (PANEL.0 * cols as u32, HEADER + PANEL.1 * rows as u32)
}

/// (rows, columns) for `panels` panels.
pub fn grid(panels: usize) -> (usize, usize) {
    (panels.max(1).div_ceil(COLUMNS), panels.clamp(1, COLUMNS))
}
