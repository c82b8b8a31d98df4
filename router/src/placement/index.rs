//! The index: for every key, the shard holding it, its shard revision, its
//! global metadata and the shard holding its replica copy. It is exactly the
//! content of the loaded shards (the router is their only writer).

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::envelope::Meta;
use crate::keys::own_key;
use crate::placement::ring::ShardId;

/// Where a key lives and its global metadata; the router's copy of the shards' state.
#[derive(Debug, Clone)]
pub struct IndexEntry {
    pub shard: ShardId,
    pub shard_mod_revision: i64,
    pub meta: Meta,
    /// The shard holding a copy of exactly this version (replication factor 2).
    pub replica: Option<ShardId>,
}

impl IndexEntry {
    /// A version just written to `shard` (its copy, if any, is recorded after).
    pub fn written(shard: &ShardId, shard_mod_revision: i64, meta: Meta) -> Self {
        IndexEntry {
            shard: shard.clone(),
            shard_mod_revision,
            meta,
            replica: None,
        }
    }
}

/// Sets a key's entry; a key new to the index is copied (`own_key`).
pub fn upsert(index: &mut BTreeMap<Bytes, IndexEntry>, key: &Bytes, entry: IndexEntry) {
    match index.get_mut(key) {
        Some(existing) => *existing = entry,
        None => {
            index.insert(own_key(key), entry);
        }
    }
}

pub fn zero_kv_meta() -> Meta {
    Meta::default()
}
