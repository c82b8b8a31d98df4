//! The router's one backoff: every loop that retries something that failed
//! (a shard unreachable at startup, the watch of `Shard` registrations, the
//! TLS listener's accept) waits by it. backon's exponential backoff with
//! jitter: quick retries at first, then at most one every `max`; reset after
//! a success.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// Delays from `min`, doubling (with jitter) up to `max`, never giving up.
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times();
        Backoff {
            delays: builder.build(),
            builder,
            max,
        }
    }

    /// The wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max)
    }

    /// Starts again from the shortest delay (after a success).
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.next_delay())
    }
}

/// kube-runtime's watcher backs off with it too (`WatchStreamExt::backoff`).
impl kube::runtime::utils::Backoff for Backoff {
    fn reset(&mut self) {
        Backoff::reset(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_reset() {
        let (min, max) = (Duration::from_millis(10), Duration::from_millis(80));
        let mut backoff = Backoff::new(min, max);
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        // Jitter adds up to one more delay on top of each.
        assert!(
            delays.iter().all(|d| *d >= min && *d <= 2 * max),
            "{delays:?}"
        );
        assert!(delays[6] >= Duration::from_millis(80), "{delays:?}");
        backoff.reset();
        assert!(backoff.next_delay() < Duration::from_millis(20));
    }
}
