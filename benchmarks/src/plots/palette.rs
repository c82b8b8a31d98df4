//! Which colour each arm gets: fixed by the arm's name, so an arm has the
//! same colour in every plot of the project; an arm the table does not know,
//! or one whose colour another arm of the same plot already took, gets the
//! next colour no other arm of that plot uses.

use plotters::style::RGBColor;

/// Preferred colours by arm name (lowercase; the first entry whose name
/// starts the arm's name wins, so "stock qps 200" matches "stock qps"; `-`
/// and `_` read as spaces).
const BY_ARM: [(&str, RGBColor); 25] = [
    ("offered", RGBColor(0x00, 0x00, 0x00)),
    // The durable etcd alone (`ste-bench members`), as the stock arm on it.
    ("etcd 1", RGBColor(0xD6, 0x27, 0x28)),
    ("etcd 3", RGBColor(0xE3, 0x77, 0xC2)),
    ("etcd 5", RGBColor(0x8C, 0x56, 0x4B)),
    ("stock qps", RGBColor(0xFF, 0x7F, 0x0E)),
    ("stock 3", RGBColor(0xE3, 0x77, 0xC2)),
    ("stock 5", RGBColor(0x8C, 0x56, 0x4B)),
    ("stock+bridge", RGBColor(0xBC, 0xBD, 0x22)),
    ("stock", RGBColor(0xD6, 0x27, 0x28)),
    ("tuned", RGBColor(0x2C, 0xA0, 0x2C)),
    ("override", RGBColor(0x94, 0x67, 0xBD)),
    ("ste+bridge aggressive", RGBColor(0x0B, 0x2E, 0x6B)),
    ("ste+bridge", RGBColor(0x17, 0xBE, 0xCF)),
    ("ste rf 2", RGBColor(0x9E, 0xCA, 0xE1)),
    // `ste-bench ring`'s phases, all on STE.
    ("ste baseline", RGBColor(0x9E, 0xCA, 0xE1)),
    ("ste join", RGBColor(0x31, 0x82, 0xBD)),
    ("ste drain", RGBColor(0x08, 0x30, 0x6B)),
    ("ste 3", RGBColor(0x6B, 0xAE, 0xD6)),
    ("ste 5", RGBColor(0x31, 0x82, 0xBD)),
    ("ste", RGBColor(0x1F, 0x77, 0xB4)),
    ("external", RGBColor(0x7F, 0x7F, 0x7F)),
    ("plain etcd", RGBColor(0x00, 0x6D, 0x2C)),
    ("router 1", RGBColor(0x42, 0x92, 0xC6)),
    ("router 2", RGBColor(0x21, 0x71, 0xB5)),
    ("router 4", RGBColor(0x08, 0x30, 0x6B)),
];

/// Colours for arms the table does not know, in order of use.
const FALLBACK: [RGBColor; 8] = [
    RGBColor(0xBC, 0xBD, 0x22),
    RGBColor(0x8C, 0x56, 0x4B),
    RGBColor(0xE3, 0x77, 0xC2),
    RGBColor(0x7F, 0x7F, 0x7F),
    RGBColor(0x00, 0x6D, 0x2C),
    RGBColor(0x99, 0x34, 0x04),
    RGBColor(0x54, 0x27, 0x88),
    RGBColor(0x66, 0x66, 0x00),
];

/// The colours of one plot's arms.
#[derive(Default)]
pub struct Palette {
    taken: Vec<(String, RGBColor)>,
}

impl Palette {
    /// The arm's colour in this plot (the same arm always gets the same one).
    pub fn colour(&mut self, arm: &str) -> RGBColor {
        let key = normal(arm);
        if let Some((_, c)) = self.taken.iter().find(|(a, _)| *a == key) {
            return *c;
        }
        let free = |c: &RGBColor| !self.taken.iter().any(|(_, t)| t == c);
        let chosen = preferred(&key)
            .filter(free)
            .or_else(|| FALLBACK.iter().copied().find(free))
            .unwrap_or_else(|| {
                (self.taken.len()..)
                    .map(generated)
                    .find(free)
                    .unwrap_or(RGBColor(0, 0, 0))
            });
        self.taken.push((key, chosen));
        chosen
    }
}

/// The colour an arm gets when no other arm of its plot took it first.
pub fn preferred(arm: &str) -> Option<RGBColor> {
    let key = normal(arm);
    BY_ARM
        .iter()
        .find(|(name, _)| key.starts_with(name))
        .map(|(_, c)| *c)
}

fn normal(arm: &str) -> String {
    arm.trim().to_lowercase().replace(['-', '_'], " ")
}

/// A distinct colour past the fixed lists (more than 22 arms in one plot).
fn generated(i: usize) -> RGBColor {
    let hue = (i as f64 * 137.508) % 360.0;
    let (r, g, b) = hsv(hue, 0.75, 0.7);
    RGBColor(r, g, b)
}

fn hsv(h: f64, s: f64, v: f64) -> (u8, u8, u8) {
    let c = v * s;
    let x = c * (1.0 - ((h / 60.0) % 2.0 - 1.0).abs());
    let (r, g, b) = match (h / 60.0) as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    let to = |f: f64| ((f + m) * 255.0).round() as u8;
    (to(r), to(g), to(b))
}

/// Colours of the hops of a cold start, in their order (light to dark, so
/// the order reads at a glance and no hop looks like an arm).
pub const HOPS: [RGBColor; 8] = [
    RGBColor(0xFD, 0xE7, 0x25),
    RGBColor(0x90, 0xD7, 0x43),
    RGBColor(0x35, 0xB7, 0x79),
    RGBColor(0x21, 0x91, 0x8C),
    RGBColor(0x31, 0x68, 0x8E),
    RGBColor(0x44, 0x39, 0x83),
    RGBColor(0x44, 0x01, 0x54),
    RGBColor(0x20, 0x00, 0x30),
];

/// `#RRGGBB`, as the SVG writer spells it.
pub fn hex(c: RGBColor) -> String {
    format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
}

/// Line width of the `i`-th of `n` arms: the first drawn are wider, so a
/// line hidden under a later one still shows at its edges.
pub fn width(i: usize, n: usize) -> u32 {
    2 + (n.saturating_sub(1 + i)).min(3) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_arms_keep_their_colour_and_clashes_get_another() {
        let mut p = Palette::default();
        let ste = p.colour("Ste");
        assert_eq!(Some(ste), preferred("ste"));
        assert_eq!(p.colour("ste"), ste);
        let raised = p.colour("stock qps 200");
        assert_ne!(raised, p.colour("stock"));
        // Two names with one preferred colour: the second gets another.
        let second = p.colour("ste qps 200");
        assert_ne!(second, ste);
        let mut all: Vec<_> = (0..40).map(|i| p.colour(&format!("arm {i}"))).collect();
        all.sort_by_key(|c| (c.0, c.1, c.2));
        all.dedup();
        assert_eq!(all.len(), 40);
    }
}
