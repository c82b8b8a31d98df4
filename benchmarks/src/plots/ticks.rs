//! Round axis ticks: 1, 2 and 5 × 10^k for log axes, and labels a reader
//! reads without counting digits (ms below a second, s above).

/// Round values 1, 2, 5 × 10^k from the largest one ≤ `lo` to the smallest
/// one ≥ `hi` (both positive; `lo` ≤ `hi`).
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (lo, hi) = log_range(lo, hi);
    let mut ticks = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi * 1.000_001 {
        for m in [1.0, 2.0, 5.0] {
            let t = decade * m;
            if t >= lo * 0.999_999 && t <= hi * 1.000_001 {
                ticks.push(t);
            }
        }
        decade *= 10.0;
    }
    ticks
}

/// The round range that holds `lo..=hi`: its ends are 1, 2 or 5 × 10^k.
pub fn log_range(lo: f64, hi: f64) -> (f64, f64) {
    let lo = lo.max(1e-3);
    let hi = hi.max(lo);
    let down = |v: f64| {
        let d = 10f64.powf(v.log10().floor());
        [5.0, 2.0, 1.0]
            .iter()
            .map(|m| m * d)
            .find(|t| *t <= v * 1.000_001)
            .unwrap_or(d)
    };
    let up = |v: f64| {
        let d = 10f64.powf(v.log10().floor());
        [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * d)
            .find(|t| *t >= v * 0.999_999)
            .unwrap_or(10.0 * d)
    };
    let (a, b) = (down(lo), up(hi));
    if b > a {
        (a, b)
    } else {
        (a, up(a * 1.5))
    }
}

/// Milliseconds as a reader says them: "20 ms", "500 ms", "1 s", "2.5 s".
pub fn ms_label(ms: f64) -> String {
    if ms >= 1000.0 {
        trim(ms / 1000.0) + " s"
    } else {
        trim(ms) + " ms"
    }
}

/// A number without trailing zeros: 2, 0.5, 12.5.
pub fn trim(v: f64) -> String {
    let s = format!("{:.2}", v);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(
            log_ticks(23.0, 870.0),
            vec![20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]
        );
        assert_eq!(log_ticks(1.0, 1.0), vec![1.0, 2.0]);
        assert_eq!(log_range(805.0, 8200.0), (500.0, 10000.0));
        assert_eq!(ms_label(2000.0), "2 s");
        assert_eq!(ms_label(50.0), "50 ms");
        assert_eq!(trim(0.5), "0.5");
    }
}
