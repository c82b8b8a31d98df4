//! Where a revision comes from.
//!
//! Every committed write gets one global revision G from `assign`, taken while
//! the writer holds its shard's write lock, so each shard commits in G order.
//! Writes on different shards finish out of order; a revision is *published*
//! (visible to reads, watches and progress notifications) only when every
//! smaller revision has finished, so "header revision P" always means "every
//! event ≤ P is in the history".
//!
//! Restart: G must never go backwards, even though deleted keys leave no trace
//! in the shards. The first revision after a start is therefore
//! max(highest revision found in the shards + 1, wall clock in µs): as long as
//! the router averages under a million writes per second between restarts, the
//! clock is ahead of every revision it handed out before.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::history::{History, StoredEvent};

pub struct Sequencer {
    inner: Mutex<Inner>,
    published: watch::Sender<i64>,
    history: Arc<History>,
}

struct Inner {
    last_assigned: i64,
    in_flight: BTreeSet<i64>,
    finished: BTreeMap<i64, Vec<Arc<StoredEvent>>>,
}

/// The revision a fresh or restarted router starts from.
pub fn starting_revision(highest_stored: i64) -> i64 {
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    (highest_stored + 1).max(now_us)
}

impl Sequencer {
    /// `start` is the current revision: nothing is stored at it, the first write gets start + 1.
    pub fn new(start: i64, history: Arc<History>) -> Self {
        let (published, _) = watch::channel(start);
        Sequencer {
            inner: Mutex::new(Inner {
                last_assigned: start,
                in_flight: BTreeSet::new(),
                finished: BTreeMap::new(),
            }),
            published,
            history,
        }
    }

    /// Reserves the next revision. The caller must hold the write lock of
    /// every shard the write touches, and must call `finish` exactly once.
    pub fn assign(&self) -> i64 {
        let mut inner = self.inner.lock().expect("sequencer lock");
        inner.last_assigned += 1;
        let g = inner.last_assigned;
        inner.in_flight.insert(g);
        g
    }

    /// Reserves `n` consecutive revisions and returns the first (same rules as `assign`).
    pub fn assign_block(&self, n: i64) -> i64 {
        let mut inner = self.inner.lock().expect("sequencer lock");
        let first = inner.last_assigned + 1;
        inner.last_assigned += n;
        for g in first..=inner.last_assigned {
            inner.in_flight.insert(g);
        }
        first
    }

    /// Marks `g` finished with the events it produced (none if it failed) and
    /// publishes every revision that no longer waits on a smaller one.
    pub fn finish(&self, g: i64, events: Vec<Arc<StoredEvent>>) {
        let mut inner = self.inner.lock().expect("sequencer lock");
        if !inner.in_flight.remove(&g) {
            return;
        }
        inner.finished.insert(g, events);
        let publishable = match inner.in_flight.first() {
            Some(lowest) => lowest - 1,
            None => inner.last_assigned,
        };
        let mut batch = Vec::new();
        while let Some(entry) = inner.finished.first_entry() {
            if *entry.key() > publishable {
                break;
            }
            batch.extend(entry.remove());
        }
        // History first, then the revision: whoever sees P finds every event ≤ P.
        self.history.append(batch);
        self.published.send_if_modified(|current| {
            if publishable > *current {
                *current = publishable;
                true
            } else {
                false
            }
        });
    }

    /// The current revision: every write at or below it is visible.
    pub fn published(&self) -> i64 {
        *self.published.borrow()
    }

    pub fn last_assigned(&self) -> i64 {
        self.inner.lock().expect("sequencer lock").last_assigned
    }

    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.published.subscribe()
    }

    /// Waits until `g` is published (returns at once if it already is).
    pub async fn wait_published(&self, g: i64) -> i64 {
        let mut rx = self.published.subscribe();
        let reached = rx.wait_for(|p| *p >= g).await.map(|p| *p);
        // The sender lives as long as self, so the error cannot happen while we borrow self.
        reached.unwrap_or_else(|_| self.published())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publication_waits_for_the_lowest_unfinished_revision() {
        let history = Arc::new(History::new(100, 1_000));
        let seq = Sequencer::new(100, history.clone());
        let a = seq.assign();
        let b = seq.assign();
        let c = seq.assign();
        assert_eq!((a, b, c), (101, 102, 103));
        seq.finish(b, vec![StoredEvent::test_put(b"b", b)]);
        seq.finish(c, vec![StoredEvent::test_put(b"c", c)]);
        assert_eq!(seq.published(), 100, "102 and 103 wait for 101");
        assert_eq!(history.len(), 0);
        seq.finish(a, vec![]); // a failed write leaves a gap, it does not block
        assert_eq!(seq.published(), 103);
        let revisions: Vec<i64> = history
            .read(101, 103, |_| true)
            .unwrap()
            .iter()
            .map(|e| e.revision)
            .collect();
        assert_eq!(revisions, vec![102, 103]);
    }

    #[test]
    fn restart_revision_is_ahead_of_stored_ones_and_of_the_clock() {
        assert!(starting_revision(5) > 1_600_000_000_000_000);
        let far = i64::MAX / 2;
        assert_eq!(starting_revision(far), far + 1);
    }
}
