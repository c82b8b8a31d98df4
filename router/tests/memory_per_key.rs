//! Memory per indexed key and per cached value, measured with a counting
//! allocator (heap bytes asked for, net of frees): 100 000 pod-like keys in
//! the index (`BTreeMap<Bytes, IndexEntry>`, as `Store` keeps it) and their
//! values in the value cache. No etcd needed; about a second.
//!
//! ```sh
//! cargo test -p ste-router --test memory_per_key -- --nocapture
//! ```
//!
//! The figures and the arithmetic for 1M pods are in docs/router.md
//! ("Value cache").

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicIsize, Ordering};

use bytes::Bytes;
use ste_router::envelope::Meta;
use ste_router::metrics::Metrics;
use ste_router::placement::index::{upsert, IndexEntry};
use ste_router::placement::ring::ShardId;
use ste_router::placement::values::{ValueCache, ENTRY_OVERHEAD};

struct Counting;

static HEAP: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HEAP.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HEAP.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const KEYS: usize = 100_000;
const VALUE_BYTES: usize = 4096;

fn pod_key(i: usize) -> Bytes {
    // As kube-apiserver names pods: /registry/pods/<namespace>/<name>.
    Bytes::copy_from_slice(
        format!(
            "/registry/pods/namespace-{:03}/deployment-{:06}-7d9f8c6b5-x{:04}",
            i % 100,
            i / 7,
            i % 10_000
        )
        .as_bytes(),
    )
}

#[test]
fn memory_per_indexed_key_and_per_cached_value() {
    let shard = ShardId::new("shard-0");
    let keys: Vec<Bytes> = (0..KEYS).map(pod_key).collect();
    let key_bytes: usize = keys.iter().map(|k| k.len()).sum();

    // The index: each key copied in (`own_key`), in random-ish order.
    let before = HEAP.load(Ordering::Relaxed);
    let mut index: BTreeMap<Bytes, IndexEntry> = BTreeMap::new();
    for (i, key) in keys.iter().enumerate() {
        let meta = Meta {
            mod_revision: i as i64 + 1,
            create_revision: i as i64 + 1,
            version: 1,
            lease: 0,
            lease_ttl: 0,
        };
        upsert(
            &mut index,
            key,
            IndexEntry::written(&shard, i as i64 + 1, meta),
        );
    }
    let index_bytes = (HEAP.load(Ordering::Relaxed) - before) as usize;
    let per_key = index_bytes as f64 / KEYS as f64;
    let per_key_without_key = (index_bytes - key_bytes) as f64 / KEYS as f64;

    // The cache: each value under the index's own key (as `remember_read`
    // and the write path share it), values of VALUE_BYTES.
    let metrics = Metrics::default();
    let cache = ValueCache::new(usize::MAX / 2);
    let values: Vec<Bytes> = (0..KEYS)
        .map(|i| Bytes::from(vec![(i % 251) as u8; VALUE_BYTES]))
        .collect();
    let before = HEAP.load(Ordering::Relaxed);
    for ((key, _), (i, value)) in index.iter().zip(values.iter().enumerate()) {
        cache.insert(key, i as i64 + 1, value.clone(), &metrics);
    }
    let cache_bytes = (HEAP.load(Ordering::Relaxed) - before) as usize;
    // The values were allocated before: what the cache adds is its own bookkeeping.
    let per_value_overhead = cache_bytes as f64 / KEYS as f64;
    let (counted, entries) = cache.size();
    eprintln!(
        "index: {KEYS} keys of {:.1} bytes on average: {per_key:.1} bytes per key ({per_key_without_key:.1} without the key's bytes)",
        key_bytes as f64 / KEYS as f64
    );
    eprintln!(
        "value cache: {per_value_overhead:.1} bytes of bookkeeping per cached value (plus the value itself; the key is shared with the index); the bound counts {} per entry (ENTRY_OVERHEAD {ENTRY_OVERHEAD} + key + value)",
        counted / entries
    );
    assert_eq!(entries, KEYS);
    assert!(
        per_value_overhead <= ENTRY_OVERHEAD as f64,
        "the bound undercounts: {per_value_overhead:.1} > {ENTRY_OVERHEAD}"
    );
    assert!(per_key_without_key > 0.0);
    drop(values);
}
