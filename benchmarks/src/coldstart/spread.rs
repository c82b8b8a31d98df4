//! Rounds repeated with `--repeats`: per arm, bridge mode and scale, the
//! median of the per-round percentiles and their lowest–highest value.

use super::RoundResult;

/// Median, lowest and highest of some per-round values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// None for no values.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    fn cell(spread: Option<Spread>) -> String {
        match spread {
            Some(s) => format!("{:.0} ({:.0}–{:.0})", s.median, s.min, s.max),
            None => "–".into(),
        }
    }
}

/// The rounds of one arm, bridge mode and scale over every repeat, in the
/// order they first ran.
pub fn groups(results: &[RoundResult]) -> Vec<Vec<&RoundResult>> {
    let mut groups: Vec<Vec<&RoundResult>> = Vec::new();
    for r in results {
        match groups
            .iter_mut()
            .find(|g| g[0].arm == r.arm && g[0].bridge == r.bridge && g[0].revisions == r.revisions)
        {
            Some(g) => g.push(r),
            None => groups.push(vec![r]),
        }
    }
    groups
}

/// A table: per arm, bridge and scale, the median (lowest–highest) over
/// repeats of each round's bound and Ready p50 / p95, and the pods seen
/// beyond one per woken revision (duplicates) summed over repeats, and of
/// those the ones that got a node (reached a kubelet).
pub fn markdown(results: &[RoundResult]) -> String {
    let mut out = String::from(
        "| arm | bridge | revisions | repeats | bound p50 (ms) | bound p95 (ms) | Ready p50 (ms) | Ready p95 (ms) | extra pods (all repeats) | extra pods bound |\n|---|---|---:|---:|---|---|---|---|---:|---:|\n",
    );
    for g in groups(results) {
        let values = |f: fn(&RoundResult) -> f64| -> Vec<f64> { g.iter().map(|r| f(r)).collect() };
        let extra: usize = g
            .iter()
            .map(|r| r.pods_seen.saturating_sub(r.revisions))
            .sum();
        let extra_bound: usize = g
            .iter()
            .map(|r| r.pods_bound.saturating_sub(r.revisions))
            .sum();
        out.push_str(&format!(
            "| {:?} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            g[0].arm,
            g[0].bridge,
            g[0].revisions,
            g.len(),
            Spread::cell(Spread::of(&values(|r| r.bound_p50_ms))),
            Spread::cell(Spread::of(&values(|r| r.bound_p95_ms))),
            Spread::cell(Spread::of(&values(|r| r.ready_p50_ms))),
            Spread::cell(Spread::of(&values(|r| r.ready_p95_ms))),
            extra,
            extra_bound,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::Spread;

    #[test]
    fn median_and_range_of_per_round_values() {
        let s = Spread::of(&[30.0, 10.0, 20.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (20.0, 10.0, 30.0));
        let even = Spread::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(even.median, 2.5);
        assert!(Spread::of(&[f64::NAN]).is_none());
        assert!(Spread::of(&[]).is_none());
    }

    #[test]
    fn arms_alternate_order_per_repeat() {
        use crate::cluster::Arm;
        let arms = [Arm::Stock, Arm::Ste];
        assert_eq!(crate::arms::arm_order(&arms, 0), arms);
        assert_eq!(crate::arms::arm_order(&arms, 1), [Arm::Ste, Arm::Stock]);
    }
}
