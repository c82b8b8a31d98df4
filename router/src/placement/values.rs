//! The value cache kept with the index: for some keys, the client value of
//! one version, named by its global mod revision.
//!
//! An entry says only "the value of `key` at `mod_revision` is `value`",
//! which never stops being true (a global revision is given to one write,
//! and a write sets a key once). Whether that version is what a read must
//! see is decided by the reader against the index (`Store::cached_get`):
//! the entry is used only when the index's latest version of the key has
//! exactly that mod revision and the read's revision is at or above it. So
//! an entry that is stale, evicted or never filled makes a read go to the
//! shard; it never makes a read wrong.
//!
//! Memory is bounded (`budget` bytes, 0 = off). Eviction is CLOCK: entries
//! queue in insertion order, a hit marks its entry, and the evictor gives a
//! marked entry one more round before dropping it. A hit only sets a flag,
//! so reads do not reorder anything.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;

use crate::metrics::Metrics;

/// Bytes counted per entry on top of its key and value: the map's slot
/// (key 32 + mod revision 8 + value 32 + order number 8 + flag, padded, and
/// the hash table's control byte and spare capacity), the queue's slot
/// (key 32 + order number 8) and the shared header a key gets when first
/// cloned. Measured 217 with a counting allocator at 100k entries
/// (`router/tests/memory_per_key.rs`, which fails if it exceeds this).
pub const ENTRY_OVERHEAD: usize = 256;

struct Slot {
    mod_revision: i64,
    value: Bytes,
    /// Its place in the queue; a queue item with another number is stale.
    order: u64,
    referenced: bool,
}

#[derive(Default)]
struct Inner {
    slots: HashMap<Bytes, Slot>,
    queue: VecDeque<(Bytes, u64)>,
    next_order: u64,
    bytes: usize,
}

pub struct ValueCache {
    budget: usize,
    inner: Mutex<Inner>,
}

fn cost(key: &Bytes, value: &Bytes) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD
}

impl ValueCache {
    /// A cache of at most `budget` bytes (keys, values and overhead); 0 turns it off.
    pub fn new(budget: usize) -> Self {
        ValueCache {
            budget,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// The value of `key` at `mod_revision`, if cached.
    pub fn get(&self, key: &[u8], mod_revision: i64, metrics: &Metrics) -> Option<Bytes> {
        if !self.enabled() {
            return None;
        }
        let found = {
            let mut inner = self.inner.lock().expect("value cache lock");
            match inner.slots.get_mut(key) {
                Some(slot) if slot.mod_revision == mod_revision => {
                    slot.referenced = true;
                    Some(slot.value.clone())
                }
                _ => None,
            }
        };
        metrics.value_cache_lookup(found.is_some());
        found
    }

    /// Records the value of `key` at `mod_revision` (an older version never
    /// replaces a newer one), then evicts down to the budget.
    pub fn insert(&self, key: &Bytes, mod_revision: i64, value: Bytes, metrics: &Metrics) {
        let size = cost(key, &value);
        if !self.enabled() || size > self.budget {
            return;
        }
        let mut guard = self.inner.lock().expect("value cache lock");
        let inner = &mut *guard;
        let order = inner.next_order;
        inner.next_order += 1;
        match inner.slots.get_mut(key) {
            Some(slot) if slot.mod_revision >= mod_revision => return,
            Some(slot) => {
                inner.bytes = inner.bytes - slot.value.len() + value.len();
                slot.mod_revision = mod_revision;
                slot.value = value;
                slot.order = order;
                slot.referenced = false;
            }
            None => {
                inner.slots.insert(
                    key.clone(),
                    Slot {
                        mod_revision,
                        value,
                        order,
                        referenced: false,
                    },
                );
                inner.bytes += size;
            }
        }
        inner.queue.push_back((key.clone(), order));
        inner.evict(self.budget);
        inner.compact_queue();
        metrics.value_cache_size(inner.bytes, inner.slots.len());
    }

    /// Drops `key` (its versions are gone or no longer the index's).
    pub fn forget(&self, key: &[u8], metrics: &Metrics) {
        if !self.enabled() {
            return;
        }
        let mut guard = self.inner.lock().expect("value cache lock");
        let inner = &mut *guard;
        if let Some((key, slot)) = inner.slots.remove_entry(key) {
            inner.bytes -= cost(&key, &slot.value);
            inner.compact_queue();
            metrics.value_cache_size(inner.bytes, inner.slots.len());
        }
    }

    /// (bytes, entries) held now.
    pub fn size(&self) -> (usize, usize) {
        let inner = self.inner.lock().expect("value cache lock");
        (inner.bytes, inner.slots.len())
    }
}

impl Inner {
    fn evict(&mut self, budget: usize) {
        while self.bytes > budget {
            let Some((key, order)) = self.queue.pop_front() else {
                return;
            };
            let Some(slot) = self.slots.get_mut(&key) else {
                continue;
            };
            if slot.order != order {
                continue;
            }
            if slot.referenced {
                // Second chance: back of the queue, unmarked.
                slot.referenced = false;
                let order = self.next_order;
                self.next_order += 1;
                slot.order = order;
                self.queue.push_back((key, order));
                continue;
            }
            if let Some(slot) = self.slots.remove(&key) {
                self.bytes -= cost(&key, &slot.value);
            }
        }
    }

    /// Queue items of replaced or dropped entries are skipped by `evict`;
    /// when they outnumber the live ones, the queue is rebuilt without them.
    fn compact_queue(&mut self) {
        if self.queue.len() <= 2 * self.slots.len() + 64 {
            return;
        }
        let slots = &self.slots;
        self.queue
            .retain(|(key, order)| slots.get(key).is_some_and(|s| s.order == *order));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> Bytes {
        Bytes::from(format!("/registry/pods/default/pod-{i:06}"))
    }

    #[test]
    fn a_version_is_served_only_under_its_own_mod_revision() {
        let metrics = Metrics::default();
        let cache = ValueCache::new(1 << 20);
        cache.insert(&key(1), 10, Bytes::from_static(b"v10"), &metrics);
        assert_eq!(
            cache.get(&key(1), 10, &metrics).as_deref(),
            Some(&b"v10"[..])
        );
        assert_eq!(cache.get(&key(1), 11, &metrics), None);
        // An older version (a read that raced a write) never replaces a newer one.
        cache.insert(&key(1), 9, Bytes::from_static(b"v9"), &metrics);
        assert_eq!(
            cache.get(&key(1), 10, &metrics).as_deref(),
            Some(&b"v10"[..])
        );
        cache.insert(&key(1), 12, Bytes::from_static(b"v12"), &metrics);
        assert_eq!(cache.get(&key(1), 10, &metrics), None);
        assert_eq!(
            cache.get(&key(1), 12, &metrics).as_deref(),
            Some(&b"v12"[..])
        );
        cache.forget(&key(1), &metrics);
        assert_eq!(cache.get(&key(1), 12, &metrics), None);
        assert_eq!(cache.size(), (0, 0));
    }

    #[test]
    fn the_budget_holds_and_referenced_entries_get_a_second_chance() {
        let metrics = Metrics::default();
        let value = Bytes::from(vec![7u8; 1000]);
        let per_entry = cost(&key(0), &value);
        let cache = ValueCache::new(10 * per_entry);
        for i in 0..10 {
            cache.insert(&key(i), i as i64 + 1, value.clone(), &metrics);
        }
        assert_eq!(cache.size(), (10 * per_entry, 10));
        // Key 0 is read, so the next insert evicts key 1 instead of key 0.
        assert!(cache.get(&key(0), 1, &metrics).is_some());
        cache.insert(&key(10), 11, value.clone(), &metrics);
        assert!(cache.get(&key(0), 1, &metrics).is_some());
        assert!(cache.get(&key(1), 2, &metrics).is_none());
        for i in 11..1000 {
            cache.insert(&key(i), i as i64 + 1, value.clone(), &metrics);
            let (bytes, entries) = cache.size();
            assert!(bytes <= 10 * per_entry, "{bytes} bytes over the budget");
            assert!(entries <= 10);
        }
        // The queue does not grow with replaced entries either.
        for round in 0..100 {
            cache.insert(&key(999), 2000 + round, value.clone(), &metrics);
        }
        assert!(cache.inner.lock().unwrap().queue.len() <= 2 * 10 + 64);
    }

    #[test]
    fn off_and_oversized_values_are_not_kept() {
        let metrics = Metrics::default();
        let off = ValueCache::new(0);
        off.insert(&key(1), 1, Bytes::from_static(b"v"), &metrics);
        assert_eq!(off.get(&key(1), 1, &metrics), None);
        let small = ValueCache::new(ENTRY_OVERHEAD + 40);
        small.insert(&key(1), 1, Bytes::from(vec![0u8; 100]), &metrics);
        assert_eq!(small.size(), (0, 0));
    }
}
