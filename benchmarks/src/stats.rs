//! Percentiles and process CPU time.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Latency samples in microseconds, in an HdrHistogram (3 significant
/// digits: a percentile is within 0.1 % of the exact one), so a long run
/// keeps a fixed-size record instead of every sample; the minimum and
/// maximum are kept exactly.
#[derive(Clone)]
pub struct Samples {
    histogram: Histogram<u64>,
    min_us: u64,
    max_us: u64,
}

impl Default for Samples {
    fn default() -> Self {
        Samples {
            // Auto-resizing from 1 µs: never fails for 3 significant digits.
            histogram: Histogram::new(3).expect("3 significant digits are valid"),
            min_us: u64::MAX,
            max_us: 0,
        }
    }
}

impl Samples {
    pub fn push(&mut self, d: Duration) {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        // record() grows the histogram; it only fails past u64's range.
        if self.histogram.record(micros).is_err() {
            self.histogram.saturating_record(micros);
        }
        self.min_us = self.min_us.min(micros);
        self.max_us = self.max_us.max(micros);
    }

    /// The `p`-th percentile (0–100) in microseconds; NaN without samples.
    pub fn percentile(&self, p: f64) -> f64 {
        if self.histogram.is_empty() {
            return f64::NAN;
        }
        if p >= 100.0 {
            return self.max_us as f64;
        }
        if p <= 0.0 {
            return self.min_us as f64;
        }
        let value = self.histogram.value_at_quantile(p / 100.0) as f64;
        value.clamp(self.min_us as f64, self.max_us as f64)
    }

    /// Adds every sample of `other`.
    pub fn extend(&mut self, other: &Samples) {
        // Both auto-resize, so adding cannot run out of range.
        let _ = self.histogram.add(&other.histogram);
        self.min_us = self.min_us.min(other.min_us);
        self.max_us = self.max_us.max(other.max_us);
    }

    /// The mean in microseconds; NaN without samples.
    pub fn mean(&self) -> f64 {
        if self.histogram.is_empty() {
            return f64::NAN;
        }
        self.histogram.mean()
    }

    pub fn len(&self) -> usize {
        self.histogram.len() as usize
    }

    pub fn is_empty(&self) -> bool {
        self.histogram.is_empty()
    }
}

/// User + system CPU seconds a process has used so far (Linux /proc).
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks_per_second())
}

/// Context switches (voluntary and not) of every thread of `pid` so far: how
/// often the process went to sleep and was woken, the cost that dominates
/// when requests arrive one at a time.
pub fn process_context_switches(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let switches = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum();
    Some(switches)
}

/// User + system CPU seconds of every live process in process group `pgid`
/// (a component started as its own group, e.g. etcd under strace).
pub fn process_group_cpu_seconds(pgid: u32) -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            (fields.get(2)?.parse::<u32>().ok()? == pgid).then(|| {
                let utime: f64 = fields.get(11)?.parse().ok()?;
                let stime: f64 = fields.get(12)?.parse().ok()?;
                Some((utime + stime) / clock_ticks_per_second())
            })?
        })
        .sum()
}

fn clock_ticks_per_second() -> f64 {
    // sysconf(_SC_CLK_TCK) is 100 on every Linux this runs on.
    100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let mut s = Samples::default();
        for us in 1..=100 {
            s.push(Duration::from_micros(us));
        }
        assert!((s.percentile(50.0) - 50.0).abs() <= 1.0);
        assert!((s.percentile(99.0) - 99.0).abs() <= 1.0);
        assert_eq!(s.len(), 100);
        assert!(Samples::default().percentile(50.0).is_nan());
    }

    #[test]
    fn the_mean_is_of_every_sample() {
        let mut s = Samples::default();
        for us in [100, 200, 600] {
            s.push(Duration::from_micros(us));
        }
        assert!((s.mean() - 300.0).abs() <= 1.0, "mean {}", s.mean());
        assert!(Samples::default().mean().is_nan());
    }

    #[test]
    fn own_cpu_time_is_readable() {
        let spent = process_cpu_seconds(std::process::id()).expect("/proc readable");
        assert!(spent >= 0.0);
    }

    #[test]
    fn context_switches_count_a_process_that_sleeps() {
        // A child of its own: this test binary's other threads come and go.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep runs");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut seen = process_context_switches(child.id());
        while seen < Some(1) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            seen = process_context_switches(child.id());
        }
        let _ = child.kill();
        let _ = child.wait();
        // Once asleep, it has been switched out at least once.
        assert!(seen >= Some(1), "{seen:?}");
        assert_eq!(process_context_switches(u32::MAX), None);
    }
}
