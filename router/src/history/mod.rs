//! Where watch events come from: the router's own event log, in global
//! revision order, for the retention window (from the compaction revision on).

use std::collections::VecDeque;
use std::sync::RwLock;

use bytes::Bytes;
use ste_etcd_proto::mvccpb::{event::EventType, Event, KeyValue};

use crate::error::{StoreError, StoreResult};

/// One event as clients see it, with global revisions.
#[derive(Debug)]
pub struct StoredEvent {
    pub revision: i64,
    pub event: Event,
}

impl StoredEvent {
    pub fn put(kv: KeyValue, prev_kv: Option<KeyValue>) -> Self {
        StoredEvent {
            revision: kv.mod_revision,
            event: Event {
                r#type: EventType::Put as i32,
                kv: Some(kv),
                prev_kv,
            },
        }
    }

    /// etcd's delete event carries only the key and the deleting revision.
    pub fn delete(key: Bytes, revision: i64, prev_kv: Option<KeyValue>) -> Self {
        StoredEvent {
            revision,
            event: Event {
                r#type: EventType::Delete as i32,
                kv: Some(KeyValue {
                    key,
                    mod_revision: revision,
                    ..Default::default()
                }),
                prev_kv,
            },
        }
    }

    pub fn key(&self) -> &[u8] {
        self.event.kv.as_ref().map(|kv| &kv.key[..]).unwrap_or(&[])
    }

    #[cfg(test)]
    pub fn test_put(key: &'static [u8], g: i64) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self::put(
            KeyValue {
                key: Bytes::from_static(key),
                mod_revision: g,
                create_revision: g,
                version: 1,
                ..Default::default()
            },
            None,
        ))
    }
}

/// etcd's key range rule: no end = the key alone, end "\0" = every key from
/// `start` on, otherwise [start, end).
pub fn key_in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    if end.is_empty() {
        key == start
    } else if end == [0] {
        key >= start
    } else {
        key >= start && key < end
    }
}

pub struct History {
    inner: RwLock<Inner>,
}

struct Inner {
    events: VecDeque<std::sync::Arc<StoredEvent>>,
    /// Revisions below this are gone; reads and watches from them get ErrCompacted.
    compact_revision: i64,
    /// The last revision a Compact request succeeded at (0: none yet). At
    /// startup the floor is the starting revision, which may still be
    /// compacted once, as a fresh etcd accepts Compact(1).
    last_compaction: i64,
    /// Beyond this many events the oldest are compacted away automatically,
    /// so memory stays bounded even if no client ever compacts.
    max_events: usize,
}

impl History {
    pub fn new(compact_revision: i64, max_events: usize) -> Self {
        History {
            inner: RwLock::new(Inner {
                events: VecDeque::new(),
                compact_revision,
                last_compaction: 0,
                max_events: max_events.max(1),
            }),
        }
    }

    pub fn append(&self, events: Vec<std::sync::Arc<StoredEvent>>) {
        if events.is_empty() {
            return;
        }
        let mut inner = self.inner.write().expect("history lock");
        inner.events.extend(events);
    }

    pub fn compact_revision(&self) -> i64 {
        self.inner.read().expect("history lock").compact_revision
    }

    pub fn len(&self) -> usize {
        self.inner.read().expect("history lock").events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops events below `revision`. Returns false if it was already compacted further.
    pub fn compact(&self, revision: i64) -> bool {
        let mut inner = self.inner.write().expect("history lock");
        if revision < inner.compact_revision || revision <= inner.last_compaction {
            return false;
        }
        inner.compact_revision = revision;
        inner.last_compaction = revision;
        while inner.events.front().is_some_and(|e| e.revision < revision) {
            inner.events.pop_front();
        }
        true
    }

    /// The revision to compact to so that at most `max_events` remain, if over the limit.
    pub fn overflow_revision(&self) -> Option<i64> {
        let inner = self.inner.read().expect("history lock");
        if inner.events.len() <= inner.max_events {
            return None;
        }
        // Keep the newest 90% so automatic compaction does not run on every write.
        let drop = inner.events.len() - inner.max_events * 9 / 10;
        inner.events.get(drop).map(|e| e.revision)
    }

    /// Events with `from <= revision <= to` that `matches`, in order.
    pub fn read(
        &self,
        from: i64,
        to: i64,
        matches: impl Fn(&StoredEvent) -> bool,
    ) -> StoreResult<Vec<std::sync::Arc<StoredEvent>>> {
        let inner = self.inner.read().expect("history lock");
        if from < inner.compact_revision {
            return Err(StoreError::Compacted);
        }
        let start = inner.events.partition_point(|e| e.revision < from);
        Ok(inner
            .events
            .range(start..)
            .take_while(|e| e.revision <= to)
            .filter(|e| matches(e))
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_respect_bounds_and_compaction() {
        let history = History::new(10, 100);
        history.append((11..=15).map(|g| StoredEvent::test_put(b"k", g)).collect());
        let got: Vec<i64> = history
            .read(12, 14, |_| true)
            .unwrap()
            .iter()
            .map(|e| e.revision)
            .collect();
        assert_eq!(got, vec![12, 13, 14]);
        assert!(
            history.compact(10),
            "the starting floor may be compacted once"
        );
        assert!(!history.compact(10));
        assert!(history.compact(13));
        assert!(!history.compact(12));
        assert!(!history.compact(13));
        assert!(matches!(
            history.read(12, 20, |_| true),
            Err(StoreError::Compacted)
        ));
        assert_eq!(history.read(13, 20, |_| true).unwrap().len(), 3);
    }

    #[test]
    fn overflow_keeps_the_newest_events() {
        let history = History::new(0, 10);
        history.append((1..=20).map(|g| StoredEvent::test_put(b"k", g)).collect());
        let cut = history.overflow_revision().expect("over the limit");
        assert!(history.compact(cut));
        assert_eq!(history.len(), 9);
        assert_eq!(history.overflow_revision(), None);
    }
}
