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
    /// every shard the write touches; the revision is published when the
    /// returned obligation is (or when it is dropped, with no events).
    pub fn assign(&self) -> Assigned<'_> {
        self.assign_block(1)
    }

    /// Reserves `n` (≥ 1) consecutive revisions (same rules as `assign`).
    pub fn assign_block(&self, n: i64) -> Assigned<'_> {
        let mut inner = self.inner.lock().expect("sequencer lock");
        let first = inner.last_assigned + 1;
        inner.last_assigned += n.max(1);
        for g in first..=inner.last_assigned {
            inner.in_flight.insert(g);
        }
        Assigned {
            sequencer: self,
            first,
            unpublished: (first..=inner.last_assigned).collect(),
        }
    }

    /// Marks `g` finished with the events it produced (none if it failed) and
    /// publishes every revision that no longer waits on a smaller one.
    fn finish(&self, g: i64, events: Vec<Arc<StoredEvent>>) {
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

/// Revisions handed out by the sequencer and not yet published: the
/// obligation as a value. Each revision is published once, with the events
/// its write produced (`publish_at`, `publish`); whatever is left when the
/// value is dropped (an early return, an error, a panic) is published with
/// no events, so a failed write leaves a gap and never stalls publication.
#[must_use = "assigned revisions are published when this is published or dropped"]
pub struct Assigned<'a> {
    sequencer: &'a Sequencer,
    first: i64,
    unpublished: BTreeSet<i64>,
}

impl Assigned<'_> {
    /// The first (for `assign`, the only) revision.
    pub fn first(&self) -> i64 {
        self.first
    }

    /// Publishes revision `g` of the block with `events` (once; later calls for `g` do nothing).
    pub fn publish_at(&mut self, g: i64, events: Vec<Arc<StoredEvent>>) {
        if self.unpublished.remove(&g) {
            self.sequencer.finish(g, events);
        }
    }

    /// Publishes the first revision with `events`, and the rest of the block with none.
    pub fn publish(mut self, events: Vec<Arc<StoredEvent>>) {
        self.publish_at(self.first, events);
    }
}

impl Drop for Assigned<'_> {
    fn drop(&mut self) {
        for g in std::mem::take(&mut self.unpublished) {
            self.sequencer.finish(g, Vec::new());
        }
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
        let (ga, gb, gc) = (a.first(), b.first(), c.first());
        assert_eq!((ga, gb, gc), (101, 102, 103));
        b.publish(vec![StoredEvent::test_put(b"b", gb)]);
        c.publish(vec![StoredEvent::test_put(b"c", gc)]);
        assert_eq!(seq.published(), 100, "102 and 103 wait for 101");
        assert_eq!(history.len(), 0);
        drop(a); // a failed write leaves a gap, it does not block
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
    fn a_block_dropped_half_published_publishes_the_rest_without_events() {
        let history = Arc::new(History::new(100, 1_000));
        let seq = Sequencer::new(100, history.clone());
        let mut block = seq.assign_block(3);
        block.publish_at(102, vec![StoredEvent::test_put(b"b", 102)]);
        assert_eq!(seq.published(), 100);
        // An early return (error, `?`) drops the obligation.
        drop(block);
        assert_eq!(seq.published(), 103);
        assert_eq!(history.len(), 1);
    }

    #[test]
    fn restart_revision_is_ahead_of_stored_ones_and_of_the_clock() {
        assert!(starting_revision(5) > 1_600_000_000_000_000);
        let far = i64::MAX / 2;
        assert_eq!(starting_revision(far), far + 1);
    }
}
