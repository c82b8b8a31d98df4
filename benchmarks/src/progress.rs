//! Progress of a long phase: on a terminal, an indicatif bar with the phase
//! (arm, step), done/total, a message (e.g. bound so far) and the ETA; when
//! stdout is not a terminal (CI, a log file), a plain line every 10 s and
//! one at the end.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

const PLAIN_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    bar: Option<ProgressBar>,
    phase: String,
    total: u64,
    last_line: Instant,
}

impl Progress {
    /// A phase of `total` steps, e.g. `Ste, 10.0/s: sent`.
    pub fn new(phase: impl Into<String>, total: u64) -> Self {
        let phase = phase.into();
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style =
                ProgressStyle::with_template("  {prefix} [{bar:30}] {pos}/{len} {msg} (ETA {eta})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(phase.clone());
            bar
        });
        Progress {
            bar,
            phase,
            total,
            last_line: Instant::now(),
        }
    }

    /// The total changed (e.g. keys still to move were planned).
    pub fn set_total(&mut self, total: u64) {
        self.total = total;
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
    }

    /// `done` of the total so far, with `message` beside it.
    pub fn update(&mut self, done: u64, message: &str) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(message.to_string());
            }
            None if self.last_line.elapsed() >= PLAIN_EVERY => {
                self.last_line = Instant::now();
                eprintln!("  {}: {done}/{} {message}", self.phase, self.total);
            }
            None => {}
        }
    }

    /// The phase is over: the bar is cleared, a last plain line printed.
    pub fn finish(self, done: u64, message: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        eprintln!("  {}: {done}/{} {message}", self.phase, self.total);
    }
}
