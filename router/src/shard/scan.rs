//! Whole-shard reads and silent deletes: the scans that load a shard into
//! the index or compare it with the index, paged reads of a key range, and
//! deleting keys without an event (copies left by moves).

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use futures::StreamExt;
use ste_etcd_proto::mvccpb::KeyValue;
use ste_etcd_proto::pb::{
    request_op::Request, DeleteRangeRequest, RangeRequest, RequestOp, TxnRequest,
};

use crate::envelope::{self, Meta};
use crate::error::{StoreError, StoreResult};
use crate::keys::{next_key, own_key, router_keys};
use crate::placement::index::IndexEntry;
use crate::shard::kv::key_fence;
use crate::shard::Shard;
use crate::txn_shapes::{show_key, MAX_TXN_OPS};

pub(crate) struct ScannedKey {
    pub(crate) key: Bytes,
    pub(crate) meta: Meta,
    pub(crate) value: Bytes,
    pub(crate) shard_mod_revision: i64,
}

pub(crate) struct Scan {
    pub(crate) revision: i64,
    /// The keys read with their values: all of them (`scan_shard`), or only
    /// those whose shard revision the index did not know (`scan_shard_changes`).
    pub(crate) items: Vec<ScannedKey>,
    /// Every key the shard holds.
    pub(crate) present: BTreeSet<Bytes>,
    /// The etcd answering is not the one the router knew: its history is gone.
    pub(crate) replaced: bool,
}

/// Reads a whole shard at one revision, page by page.
pub(crate) async fn scan_shard(shard: &Shard) -> StoreResult<Scan> {
    shard.check().await?;
    scan_values(shard, shard.pending_replacement()).await
}

/// What a reconciliation needs: every key the shard holds, and the values of
/// only those keys whose shard revision differs from the index's. The router
/// is a shard's only writer, so a key at the shard revision the index
/// recorded holds the value the index describes; only a write with an unknown
/// outcome (or a key the index does not place here) can differ. Reading keys
/// alone moves ~1/40 of the bytes of pod-sized values, and the shard's writes
/// wait for the whole scan. A shard that was replaced, whose revision went
/// back, or where many keys changed is read in full.
pub(crate) async fn scan_shard_changes(
    shard: &Shard,
    known: &BTreeMap<Bytes, IndexEntry>,
    last_cut: Option<i64>,
) -> StoreResult<Scan> {
    const PAGE: i64 = 5000;
    const PARALLEL_READS: usize = 16;
    shard.check().await?;
    if shard.pending_replacement() {
        return scan_values(shard, true).await;
    }
    let mut present = BTreeSet::new();
    let mut changed = Vec::new();
    let revision = read_pages(shard, router_keys(), PAGE, true, |kv| {
        let key = own_key(&kv.key);
        let unchanged = known
            .get(&key)
            .is_some_and(|entry| entry.shard_mod_revision == kv.mod_revision);
        if !unchanged {
            changed.push(key.clone());
        }
        present.insert(key);
        Ok(())
    })
    .await?;
    if last_cut.is_some_and(|last| revision < last) || changed.len() > present.len() / 4 {
        return scan_values(shard, false).await;
    }
    let reads = changed.into_iter().map(|key| async move {
        let answer = shard
            .range(RangeRequest {
                key,
                revision,
                ..Default::default()
            })
            .await?;
        answer
            .kvs
            .into_iter()
            .next()
            .map(|kv| scanned_key(shard, kv))
            .transpose()
    });
    let mut items = Vec::new();
    let mut reads = futures::stream::iter(reads).buffer_unordered(PARALLEL_READS);
    while let Some(read) = reads.next().await {
        items.extend(read?);
    }
    items.sort_by(|a, b| a.key.cmp(&b.key));
    tracing::debug!(shard = %shard.id, keys = present.len(), values_read = items.len(), "reconciliation scan read keys only");
    Ok(Scan {
        revision,
        items,
        present,
        replaced: false,
    })
}

pub(crate) fn scanned_key(shard: &Shard, kv: KeyValue) -> StoreResult<ScannedKey> {
    let (meta, value) = envelope::decode(&kv.value).map_err(|_| {
        StoreError::Internal(format!(
            "shard {} holds key {} whose value was not written by ste-router; \
             shards must be dedicated to the router (remove the key or use an empty shard)",
            shard.id,
            show_key(&kv.key)
        ))
    })?;
    Ok(ScannedKey {
        key: kv.key,
        meta,
        value,
        shard_mod_revision: kv.mod_revision,
    })
}

/// Every key of the shard with its value, at one revision.
pub(crate) async fn scan_values(shard: &Shard, replaced: bool) -> StoreResult<Scan> {
    const PAGE: i64 = 1000;
    let mut items = Vec::new();
    let mut present = BTreeSet::new();
    let revision = read_pages(shard, router_keys(), PAGE, false, |kv| {
        let item = scanned_key(shard, kv)?;
        present.insert(own_key(&item.key));
        items.push(item);
        Ok(())
    })
    .await?;
    Ok(Scan {
        revision,
        items,
        present,
        replaced,
    })
}

/// Reads the shard's keys in [from, end) a page at a time, every page at the
/// revision of the first; returns that revision.
pub(crate) async fn read_pages(
    shard: &Shard,
    (mut from, end): (Bytes, Bytes),
    page: i64,
    keys_only: bool,
    mut each: impl FnMut(KeyValue) -> StoreResult<()>,
) -> StoreResult<i64> {
    let mut revision = 0;
    loop {
        let answer = shard
            .range(RangeRequest {
                key: from.clone(),
                range_end: end.clone(),
                limit: page,
                revision,
                keys_only,
                ..Default::default()
            })
            .await?;
        if revision == 0 {
            revision = answer.header.as_ref().map(|h| h.revision).unwrap_or(0);
        }
        let last = answer.kvs.last().map(|kv| kv.key.clone());
        for kv in answer.kvs {
            each(kv)?;
        }
        match last {
            Some(last) if answer.more => from = next_key(&last),
            _ => return Ok(revision),
        }
    }
}

/// Deletes keys from a shard without events (they are copies the index does
/// not point to), each fenced on the shard revision seen. Returns the
/// shard's revision after the last delete.
pub(crate) async fn delete_silently(
    shard: &Shard,
    keys: &[(Bytes, i64)],
) -> StoreResult<Option<i64>> {
    let mut revision = None;
    for chunk in keys.chunks(MAX_TXN_OPS) {
        let answer = shard
            .txn(TxnRequest {
                compare: chunk
                    .iter()
                    .map(|(key, rev)| key_fence(key, *rev))
                    .collect(),
                success: chunk
                    .iter()
                    .map(|(key, _)| RequestOp {
                        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                            key: key.clone(),
                            ..Default::default()
                        })),
                    })
                    .collect(),
                failure: Vec::new(),
            })
            .await?;
        if !answer.succeeded {
            return Err(StoreError::unavailable(
                shard.id.as_str(),
                "changed while stale copies were being deleted",
            ));
        }
        revision = answer.header.map(|h| h.revision);
    }
    Ok(revision)
}
