//! What an open-loop step sends and with which revisions: the wake times
//! of a step (fixed rate, from the step's start, whatever the cluster does),
//! the pool's default size, and the pool itself (which revision is free,
//! held by a wake, or waiting to be back at zero).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// A revision's turnaround the default pool is sized for: wake → pod IP in
/// the private Endpoints (a few seconds at low load), then the autoscaler's
/// way back to zero with the bench's settings (stable window 6 s +
/// scale-to-zero grace 6 s, ~15 s after the answer), the pod's deletion and
/// [`ZERO_GRACE`]. 20 s was too short: at 3/s a pool of 80 ran dry after
/// ~40 s in every arm, and at 4/s with the tap a pool of 140 ran dry too
/// (2026-12-02), so a revision takes nearer 35–40 s.
pub const TURNAROUND: Duration = Duration::from_secs(45);

/// The largest pool `--sweep-pool` picks by itself on this 2-core machine
/// (every revision is a Knative Service with a dozen objects and, while
/// woken, a kwok pod). Each revision holds two ClusterIP Services (its
/// public and private ones): testkit's Service range was a /24 until
/// 2026-12-02, and every revision past the ~126th then stayed
/// `Ready=Unknown` (Deploying) for want of an address; it is a /16 now.
pub const DEFAULT_POOL_MAX: usize = 150;

/// The largest pool `--sweep-pool` accepts.
pub const POOL_MAX: usize = 1000;

/// How long a revision must have been seen at zero before it is woken
/// again, so the watch events of its last pod (deleted) cannot be taken
/// for the next wake's.
pub const ZERO_GRACE: Duration = Duration::from_secs(1);

/// Offsets from the step's start at which wakes are due: `rate` per second
/// for `duration`, the first at 0 (⌊rate × duration⌋ wakes).
pub fn schedule(rate: f64, duration: Duration) -> Vec<Duration> {
    if !(rate.is_finite() && rate > 0.0) {
        return Vec::new();
    }
    let count = (rate * duration.as_secs_f64() + 1e-9).floor() as u64;
    (0..count)
        .map(|i| Duration::from_secs_f64(i as f64 / rate))
        .collect()
}

/// The pool a sweep makes when `--sweep-pool` is not given: enough
/// revisions for the highest rate over [`TURNAROUND`], at least 2, at most
/// [`DEFAULT_POOL_MAX`].
pub fn default_pool(rates: &[f64]) -> usize {
    let highest = rates.iter().copied().fold(0.0, f64::max);
    let wanted = (highest * TURNAROUND.as_secs_f64()).ceil() as usize;
    wanted.clamp(2, DEFAULT_POOL_MAX)
}

/// Where a revision taken from the pool is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Busy {
    /// Its wake's request is held (not yet answered, not timed out).
    Held,
    /// The request is gone; back in the pool once at zero for [`ZERO_GRACE`]
    /// in snapshots listed after `released`.
    Draining {
        released: Instant,
        zero_since: Option<Instant>,
    },
}

/// The revisions at zero in lists that began at `listed_at`.
///
/// A snapshot says nothing about a revision released after its lists
/// began: lists made before a wake show the revision at zero, and with the
/// tap a wake is answered in ~100 ms, well inside one round of lists
/// (four lists and a 0.5 s pause, over a second under load). Counting
/// such a snapshot let 2 of 360 wakes at 6/s (2026-12-03, stock-qps + tap)
/// take a revision whose last wake's pod was still Ready; its wake then
/// had no hop to show and timed out.
#[derive(Debug, Clone)]
pub struct ZeroSnapshot {
    pub listed_at: Instant,
    pub revisions: HashSet<String>,
}

/// The revisions of a sweep: free ones are at zero; a wake takes the one
/// free the longest; a revision comes back when its request is gone and it
/// has been at zero for [`ZERO_GRACE`]. A wake due with none free is a miss.
#[derive(Debug, Default)]
pub struct Pool {
    free: VecDeque<String>,
    busy: HashMap<String, Busy>,
    misses: u64,
}

impl Pool {
    pub fn new(revisions: impl IntoIterator<Item = String>) -> Pool {
        Pool {
            free: revisions.into_iter().collect(),
            ..Pool::default()
        }
    }

    /// A free revision for a wake due now, or None (counted as a miss).
    pub fn take(&mut self) -> Option<String> {
        match self.free.pop_front() {
            Some(rev) => {
                self.busy.insert(rev.clone(), Busy::Held);
                Some(rev)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// The wake's request is gone (answered, timed out or failed to send) at `now`.
    pub fn release(&mut self, revision: &str, now: Instant) {
        if let Some(b) = self.busy.get_mut(revision) {
            if *b == Busy::Held {
                *b = Busy::Draining {
                    released: now,
                    zero_since: None,
                };
            }
        }
    }

    /// What the cluster showed at `now`: `at_zero` holds the revisions at
    /// zero (`step::revisions_at_zero`) in lists begun at its `listed_at`;
    /// `reported(rev)` is whether the bench's activator still reports on
    /// one. A revision released after those lists began is left as it is.
    /// Returns the revisions back in the pool.
    pub fn observe(
        &mut self,
        at_zero: &ZeroSnapshot,
        reported: impl Fn(&str) -> bool,
        now: Instant,
    ) -> Vec<String> {
        let mut back = Vec::new();
        for (rev, busy) in &mut self.busy {
            let Busy::Draining {
                released,
                zero_since,
            } = busy
            else {
                continue;
            };
            if at_zero.listed_at < *released {
                continue;
            }
            if !at_zero.revisions.contains(rev) || reported(rev) {
                *zero_since = None;
                continue;
            }
            let since = *zero_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= ZERO_GRACE {
                back.push(rev.clone());
            }
        }
        back.sort();
        for rev in &back {
            self.busy.remove(rev);
            self.free.push_back(rev.clone());
        }
        back
    }

    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Revisions taken and not back yet (held or draining).
    pub fn busy(&self) -> usize {
        self.busy.len()
    }

    /// Wakes due when no revision was free.
    pub fn misses(&self) -> u64 {
        self.misses
    }

    /// Starts a new step's count of misses (the revisions stay where they are).
    pub fn reset_misses(&mut self) {
        self.misses = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_fixed_rate_from_zero() {
        let s = schedule(2.0, Duration::from_secs(3));
        assert_eq!(s.len(), 6);
        assert_eq!(s[0], Duration::ZERO);
        assert_eq!(s[1], Duration::from_millis(500));
        assert_eq!(s[5], Duration::from_millis(2500));
        // Fractional rates and durations round down to whole wakes.
        assert_eq!(schedule(0.5, Duration::from_secs(5)).len(), 2);
        assert_eq!(schedule(10.0, Duration::from_millis(30_050)).len(), 300);
        assert_eq!(schedule(3.0, Duration::from_secs(1)).len(), 3);
        assert!(schedule(0.0, Duration::from_secs(5)).is_empty());
        assert!(schedule(f64::NAN, Duration::from_secs(5)).is_empty());
    }

    #[test]
    fn the_default_pool_covers_the_highest_rate_within_bounds() {
        assert_eq!(default_pool(&[1.0, 2.0]), 90);
        assert_eq!(default_pool(&[0.01]), 2);
        assert_eq!(default_pool(&[1.0, 100.0]), DEFAULT_POOL_MAX);
        assert_eq!(default_pool(&[]), 2);
    }

    #[test]
    fn a_revision_comes_back_only_after_its_request_and_a_grace_at_zero() {
        let t0 = Instant::now();
        let mut pool = Pool::new(["a".to_string(), "b".to_string()]);
        assert_eq!(pool.take().as_deref(), Some("a"));
        assert_eq!(pool.take().as_deref(), Some("b"));
        assert_eq!(pool.take(), None);
        assert_eq!((pool.free(), pool.busy(), pool.misses()), (0, 2, 1));
        let both = || HashSet::from(["a".to_string(), "b".to_string()]);
        // Lists begun at `at` showing a and b at zero.
        let zero = |at: Instant| ZeroSnapshot {
            listed_at: at,
            revisions: both(),
        };
        // Held: never back, even at zero.
        assert!(pool.observe(&zero(t0), |_| false, t0).is_empty());
        pool.release("a", t0);
        pool.release("b", t0);
        // At zero, but the activator still reports on b.
        assert!(pool.observe(&zero(t0), |r| r == "b", t0).is_empty());
        assert!(pool
            .observe(&zero(t0), |r| r == "b", t0 + ZERO_GRACE / 2)
            .is_empty());
        assert_eq!(pool.observe(&zero(t0), |_| false, t0 + ZERO_GRACE), ["a"]);
        // b left zero in between: its grace starts again.
        let none = ZeroSnapshot {
            listed_at: t0 + ZERO_GRACE,
            revisions: HashSet::new(),
        };
        assert!(pool
            .observe(&none, |_| false, t0 + ZERO_GRACE * 2)
            .is_empty());
        let later = zero(t0 + ZERO_GRACE * 2);
        assert!(pool
            .observe(&later, |_| false, t0 + ZERO_GRACE * 3)
            .is_empty());
        assert_eq!(pool.observe(&later, |_| false, t0 + ZERO_GRACE * 4), ["b"]);
        assert_eq!((pool.free(), pool.busy(), pool.misses()), (2, 0, 1));
        pool.reset_misses();
        assert_eq!(pool.misses(), 0);
        // Releasing an unknown or free revision changes nothing.
        pool.release("zzz", t0);
        pool.release("a", t0);
        assert_eq!((pool.free(), pool.busy()), (2, 0));
    }

    #[test]
    fn lists_begun_before_the_release_never_bring_a_revision_back() {
        let t0 = Instant::now();
        let mut pool = Pool::new(["a".to_string()]);
        assert_eq!(pool.take().as_deref(), Some("a"));
        let released = t0 + Duration::from_millis(100);
        pool.release("a", released);
        // The same stale snapshot (lists begun before the wake was answered)
        // seen for well over the grace: the revision stays out.
        let stale = ZeroSnapshot {
            listed_at: t0,
            revisions: HashSet::from(["a".to_string()]),
        };
        for k in 0..5 {
            assert!(pool
                .observe(&stale, |_| false, released + ZERO_GRACE * k)
                .is_empty());
        }
        assert_eq!(pool.busy(), 1);
        // Lists begun after the release count, with their grace.
        let fresh = ZeroSnapshot {
            listed_at: released + Duration::from_millis(1),
            revisions: HashSet::from(["a".to_string()]),
        };
        let t1 = released + ZERO_GRACE * 5;
        assert!(pool.observe(&fresh, |_| false, t1).is_empty());
        assert_eq!(pool.observe(&fresh, |_| false, t1 + ZERO_GRACE), ["a"]);
    }
}
