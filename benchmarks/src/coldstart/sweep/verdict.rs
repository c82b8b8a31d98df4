//! Whether an arm sustained a rate of cold starts, the highest rate each arm
//! sustained and the ratios between arms (pure logic over a step's counts
//! and per-wake times).

use serde::{Deserialize, Serialize};

/// What "sustained" means, as `--help`, coldstart.md and the docs say it.
pub const DEFINITION: &str = "a rate is SUSTAINED when no wake met an empty pool, every wake sent \
was answered (pod IP in the revision's private Endpoints) within --sweep-deadline, at least 95 % \
of the scheduled wakes were answered, and the p95 wake → Endpoints of the wakes scheduled in the \
last third of the step is at most 2× that of the middle third (no growing backlog; the first \
third is a warm-up: its revisions are not yet being scaled back to zero), and the step's p95 wake → Endpoints is at most --sweep-p95-max (default 1 s). The highest \
sustained rate of an arm is the highest rate at which it and every lower rate were sustained.";

/// Fraction of the scheduled wakes that must be answered.
pub const ACHIEVED_MIN: f64 = 0.95;

/// How much the last third's p95 may exceed the middle third's. Not the
/// first third's: a revision's turnaround (wake, answer, the autoscaler's
/// way back to zero) is ~20 s, so the first 20 s of a step carry no
/// scale-downs and the later ones do — comparing with the first third
/// called every arm "backlogged" at 2/s with sub-second p95s (a run of
/// 2026-12-02: 159 → 468 ms, 164 → 384 ms).
pub const BACKLOG_MAX: f64 = 2.0;

/// What happened to a step's wakes. Always `scheduled = sent + pool_misses
/// + send_failed` and `sent = answered + timed_out`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub scheduled: u64,
    pub sent: u64,
    pub answered: u64,
    pub timed_out: u64,
    /// Wakes due while no revision of the pool was at zero.
    pub pool_misses: u64,
    /// Wakes whose stat message could not be sent to the autoscaler.
    pub send_failed: u64,
}

impl Counts {
    /// Whether the counts add up (the invariants above).
    pub fn consistent(&self) -> bool {
        self.scheduled == self.sent + self.pool_misses + self.send_failed
            && self.sent == self.answered + self.timed_out
    }
}

/// The verdict on one step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Verdict {
    pub sustained: bool,
    /// The pool ran dry: the bench could not offer the rate, so a failed
    /// verdict says nothing about the arm (raise --sweep-pool).
    pub pool_limited: bool,
    /// Why not sustained (empty when sustained).
    pub reasons: Vec<String>,
}

/// The nearest-rank `q` quantile (0–1) of `values`; None when empty.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = (q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// The verdict of a step of `duration_s` seconds from its counts and, per
/// answered wake, (seconds from the step's start it was scheduled at,
/// milliseconds wake → Endpoints); `p95_max_ms` is the highest p95 a
/// sustained step may have.
pub fn verdict(
    counts: &Counts,
    answered: &[(f64, f64)],
    duration_s: f64,
    p95_max_ms: f64,
) -> Verdict {
    let mut reasons = Vec::new();
    if counts.pool_misses > 0 {
        reasons.push(format!(
            "{} wake(s) found no revision at zero (pool exhausted)",
            counts.pool_misses
        ));
    }
    if counts.timed_out > 0 || counts.send_failed > 0 {
        reasons.push(format!(
            "{} wake(s) not answered within the deadline, {} not sent",
            counts.timed_out, counts.send_failed
        ));
    }
    if (counts.answered as f64) < ACHIEVED_MIN * counts.scheduled as f64 {
        reasons.push(format!(
            "{} of {} scheduled answered (< {:.0} %)",
            counts.answered,
            counts.scheduled,
            ACHIEVED_MIN * 100.0
        ));
    }
    let third = |lo: f64, hi: f64| -> Vec<f64> {
        answered
            .iter()
            .filter(|(at, _)| *at >= lo && *at < hi)
            .map(|(_, ms)| *ms)
            .collect()
    };
    let all: Vec<f64> = answered.iter().map(|(_, ms)| *ms).collect();
    if let Some(p95) = quantile(&all, 0.95).filter(|p| *p > p95_max_ms) {
        reasons.push(format!(
            "p95 wake → Endpoints {p95:.0} ms > {p95_max_ms:.0} ms"
        ));
    }
    let middle = quantile(&third(duration_s / 3.0, duration_s * 2.0 / 3.0), 0.95);
    let last = quantile(&third(duration_s * 2.0 / 3.0, f64::INFINITY), 0.95);
    match (middle, last) {
        (Some(m), Some(l)) if l > BACKLOG_MAX * m => reasons.push(format!(
            "backlog: p95 of the last third {l:.0} ms > {BACKLOG_MAX}× the middle third's {m:.0} ms"
        )),
        (Some(_), Some(_)) => {}
        _ => reasons.push("no answered wake in the middle or the last third".into()),
    }
    Verdict {
        sustained: reasons.is_empty(),
        pool_limited: counts.pool_misses > 0,
        reasons,
    }
}

/// The highest sustained rate of one series of steps given as (rate,
/// verdict): the highest rate at which it and every lower rate were
/// sustained, and whether the next rate up failed only for want of
/// revisions (then the true limit may be higher).
pub fn highest_sustained(steps: &[(f64, &Verdict)]) -> (Option<f64>, bool) {
    let mut sorted: Vec<(f64, &Verdict)> = steps.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut best = None;
    for (rate, v) in sorted {
        if !v.sustained {
            return (best, v.pool_limited);
        }
        best = Some(rate);
    }
    (best, false)
}

/// `a / b` of two highest sustained rates, when both exist.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some((a / b * 100.0).round() / 100.0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(scheduled: u64, answered: u64, timed_out: u64, misses: u64) -> Counts {
        Counts {
            scheduled,
            sent: answered + timed_out,
            answered,
            timed_out,
            pool_misses: misses,
            send_failed: 0,
        }
    }

    /// `n` wakes over 9 s, wake → Endpoints `first`, `middle` and `last` ms
    /// in each third.
    fn wakes(n: usize, first: f64, middle: f64, last: f64) -> Vec<(f64, f64)> {
        (0..n)
            .map(|i| {
                let at = i as f64 * 9.0 / n as f64;
                let ms = if at < 3.0 {
                    first
                } else if at >= 6.0 {
                    last
                } else {
                    middle
                };
                (at, ms)
            })
            .collect()
    }

    #[test]
    fn a_step_with_every_wake_answered_and_no_backlog_is_sustained() {
        let c = counts(9, 9, 0, 0);
        assert!(c.consistent());
        let v = verdict(&c, &wakes(9, 800.0, 1000.0, 1500.0), 9.0, 2000.0);
        assert!(v.sustained && !v.pool_limited, "{v:?}");
        assert!(v.reasons.is_empty());
        // The first third (no scale-downs yet) is a warm-up: fast there and
        // steady after is sustained.
        let v = verdict(&c, &wakes(9, 200.0, 1000.0, 1500.0), 9.0, 2000.0);
        assert!(v.sustained, "{v:?}");
    }

    #[test]
    fn timeouts_misses_shortfall_and_backlog_each_fail_the_step() {
        let timed_out = verdict(
            &counts(9, 8, 1, 0),
            &wakes(8, 800.0, 800.0, 800.0),
            9.0,
            2000.0,
        );
        assert!(!timed_out.sustained && !timed_out.pool_limited);
        assert!(
            timed_out.reasons[0].contains("not answered"),
            "{timed_out:?}"
        );
        let missed = verdict(
            &counts(10, 9, 0, 1),
            &wakes(9, 800.0, 800.0, 800.0),
            9.0,
            2000.0,
        );
        assert!(!missed.sustained && missed.pool_limited);
        assert!(missed.reasons.iter().any(|r| r.contains("pool exhausted")));
        // 90 % answered, nothing timed out (the rest found no revision).
        assert!(missed.reasons.iter().any(|r| r.contains("9 of 10")));
        let backlog = verdict(
            &counts(9, 9, 0, 0),
            &wakes(9, 800.0, 800.0, 1700.0),
            9.0,
            2000.0,
        );
        assert!(!backlog.sustained);
        assert!(backlog.reasons[0].starts_with("backlog"), "{backlog:?}");
        let empty = verdict(&counts(0, 0, 0, 0), &[], 9.0, 2000.0);
        assert!(!empty.sustained);
        // Steady, but every cold start held for seconds: not sustained.
        let slow = verdict(
            &counts(9, 9, 0, 0),
            &wakes(9, 3000.0, 3000.0, 3000.0),
            9.0,
            2000.0,
        );
        assert!(!slow.sustained, "{slow:?}");
        assert!(slow.reasons[0].starts_with("p95 wake"), "{slow:?}");
    }

    #[test]
    fn counts_that_do_not_add_up_are_caught() {
        let mut c = counts(5, 4, 1, 0);
        assert!(c.consistent());
        c.answered = 5;
        assert!(!c.consistent());
    }

    #[test]
    fn the_highest_sustained_rate_needs_every_lower_rate_sustained() {
        let ok = Verdict {
            sustained: true,
            pool_limited: false,
            reasons: vec![],
        };
        let failed = Verdict {
            sustained: false,
            pool_limited: false,
            reasons: vec!["x".into()],
        };
        let dry = Verdict {
            pool_limited: true,
            ..failed.clone()
        };
        // Given out of order; 10/s sustained again does not count past 5/s.
        let steps = [(10.0, &ok), (1.0, &ok), (5.0, &failed), (2.0, &ok)];
        assert_eq!(highest_sustained(&steps), (Some(2.0), false));
        assert_eq!(
            highest_sustained(&[(1.0, &ok), (2.0, &dry)]),
            (Some(1.0), true)
        );
        assert_eq!(highest_sustained(&[(1.0, &failed)]), (None, false));
        assert_eq!(
            highest_sustained(&[(1.0, &ok), (2.0, &ok)]),
            (Some(2.0), false)
        );
        assert_eq!(ratio(Some(5.0), Some(2.0)), Some(2.5));
        assert_eq!(ratio(Some(5.0), None), None);
        assert_eq!(ratio(None, Some(1.0)), None);
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(10.0));
        assert_eq!(quantile(&v, 0.95), Some(19.0));
        assert_eq!(quantile(&v, 1.0), Some(20.0));
        assert_eq!(quantile(&v, 0.0), Some(1.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
