//! A shard's key-values as the router reads and writes them: decoded from
//! their envelope (`translate_kv`), and fenced on their shard revision
//! (`key_fence`).

use bytes::Bytes;
use ste_etcd_proto::mvccpb::KeyValue;
use ste_etcd_proto::pb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    Compare,
};

use crate::envelope::{self};
use crate::error::{StoreError, StoreResult};
use crate::placement::ring::ShardId;
use crate::txn_shapes::show_key;

/// "The key is still exactly what the index says": the shard refuses the
/// write if anything but the router changed it.
pub fn key_fence(key: &Bytes, shard_mod_revision: i64) -> Compare {
    Compare {
        key: key.clone(),
        target: CompareTarget::Mod as i32,
        result: CompareResult::Equal as i32,
        target_union: Some(TargetUnion::ModRevision(shard_mod_revision)),
        range_end: Bytes::new(),
    }
}

/// Replaces a shard's revisions by the global ones from the envelope.
pub fn translate_kv(shard: &ShardId, kv: KeyValue) -> StoreResult<KeyValue> {
    let (meta, value) = envelope::decode(&kv.value).map_err(|_| {
        StoreError::Internal(format!(
            "shard {shard} holds key {} with a value not written by ste-router",
            show_key(&kv.key)
        ))
    })?;
    Ok(KeyValue {
        key: kv.key,
        create_revision: meta.create_revision,
        mod_revision: meta.mod_revision,
        version: meta.version,
        value,
        lease: meta.lease,
    })
}
