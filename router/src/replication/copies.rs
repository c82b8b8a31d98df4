//! Replica copies going out with each group commit, and their removal.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures::future::join_all;
use ste_etcd_proto::pb::{
    request_op::Request, response_op::Response, DeleteRangeRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest,
};
use tracing::debug;

use crate::envelope::{self};
use crate::error::{StoreError, StoreResult};
use crate::keys::{parse_replica_key, replica_key, REPLICA_PREFIX};
use crate::placement::index::IndexEntry;
use crate::placement::ring::ShardId;
use crate::shard::scan::read_pages;
use crate::shard::Shard;
use crate::store::Store;
use crate::txn_shapes::MAX_TXN_OPS;

use crate::store::write::plan::PlannedOp;

/// Replica writes that go with one group commit, by replica shard: copies
/// of the new versions (sent with the primary Txn) and removals of the
/// versions they replace (sent once the primary committed).
#[derive(Default)]
pub(crate) struct ReplicaWrites {
    by_shard: BTreeMap<ShardId, Vec<(RequestOp, Option<Bytes>)>>,
    pub(crate) cleanups: Vec<(ShardId, Bytes, i64)>,
}

impl Store {
    pub(crate) fn replication(&self) -> bool {
        self.config.replication_factor >= 2
    }

    /// The replica writes for a batch about to commit on `primary`: a copy of
    /// each put value on the key's replica shard, and the removal of copies
    /// of deleted keys (and of copies on a shard that is no longer the replica).
    pub(crate) fn plan_replica_writes<'a>(
        &self,
        primary: &ShardId,
        ops: impl Iterator<Item = &'a PlannedOp>,
    ) -> ReplicaWrites {
        let mut writes = ReplicaWrites::default();
        if !self.replication() {
            return writes;
        }
        let index = self.index.read().expect("index lock");
        let ring = self.ring.read().expect("ring lock");
        for op in ops {
            let (key, new) = match op {
                PlannedOp::Put {
                    key, meta, value, ..
                } => (key, Some((meta, value))),
                PlannedOp::Delete {
                    key, sent: true, ..
                } => (key, None),
                _ => continue,
            };
            if let Some(old) = index.get(key) {
                if let Some(replica) = &old.replica {
                    writes
                        .cleanups
                        .push((replica.clone(), key.clone(), old.meta.mod_revision));
                }
            }
            if let Some((meta, value)) = new {
                if let Some(target) = ring.locate_replica(key, primary) {
                    writes.by_shard.entry(target).or_default().push((
                        RequestOp {
                            request: Some(Request::RequestPut(PutRequest {
                                key: replica_key(key, meta.mod_revision),
                                value: envelope::encode(meta, value),
                                ..Default::default()
                            })),
                        },
                        Some(key.clone()),
                    ));
                }
            }
        }
        writes
    }

    /// Removes copies of replaced versions in the background: a copy left
    /// behind matches no index entry and is never used.
    pub(crate) fn spawn_cleanup(&self, copies: Vec<(ShardId, Bytes, i64)>) {
        if copies.is_empty() {
            return;
        }
        let Some(store) = self.this.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        tokio::spawn(async move { store.delete_copies(copies).await });
    }

    /// Sends the copies of new versions; returns, per key, the shard that now holds its copy.
    pub(crate) async fn send_replica_writes(&self, writes: ReplicaWrites) -> Vec<(Bytes, ShardId)> {
        let sends = writes.by_shard.into_iter().filter_map(|(id, ops)| {
            let shard = self.shard(&id)?;
            Some(async move {
                let mut copied = Vec::new();
                for chunk in ops.chunks(MAX_TXN_OPS) {
                    let request = TxnRequest {
                        success: chunk.iter().map(|(op, _)| op.clone()).collect(),
                        ..Default::default()
                    };
                    match shard.txn(request).await {
                        Ok(_) => copied.extend(chunk.iter().filter_map(|(_, key)| key.clone()).map(|k| (k, id.clone()))),
                        Err(err) => {
                            debug!(shard = %id, error = %err, "replica write failed; the repair pass will copy again");
                            self.replicas_dirty.store(true, Ordering::Release);
                        }
                    }
                }
                copied
            })
        });
        join_all(sends).await.into_iter().flatten().collect()
    }

    /// Records which copies were written for a committed batch.
    pub(crate) fn record_replicas(&self, copied: Vec<(Bytes, ShardId)>, planned_puts: usize) {
        if !self.replication() {
            return;
        }
        if copied.len() < planned_puts {
            self.replicas_dirty.store(true, Ordering::Release);
        }
        let mut index = self.index.write().expect("index lock");
        for (key, shard) in copied {
            if let Some(entry) = index.get_mut(&key) {
                entry.replica = Some(shard);
            }
        }
    }

    /// Removes the copies of deleted keys (best effort: a copy left behind
    /// does not match any index entry and is never used).
    pub(crate) async fn delete_copies(&self, copies: Vec<(ShardId, Bytes, i64)>) {
        if copies.is_empty() {
            return;
        }
        let mut by_shard: BTreeMap<ShardId, Vec<(RequestOp, Option<Bytes>)>> = BTreeMap::new();
        for (shard, key, revision) in copies {
            by_shard
                .entry(shard)
                .or_default()
                .push((delete_copy(&key, revision), None));
        }
        self.send_replica_writes(ReplicaWrites {
            by_shard,
            cleanups: Vec::new(),
        })
        .await;
    }
}

fn delete_copy(key: &Bytes, revision: i64) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
            key: replica_key(key, revision),
            ..Default::default()
        })),
    }
}

/// The stored values (envelope included) of keys the index places on `shard`,
/// checked against the index's shard revisions.
pub(crate) async fn read_values(
    shard: &Shard,
    entries: &[(Bytes, IndexEntry)],
) -> StoreResult<Vec<Bytes>> {
    let read = shard
        .txn(TxnRequest {
            success: entries
                .iter()
                .map(|(key, _)| RequestOp {
                    request: Some(Request::RequestRange(RangeRequest {
                        key: key.clone(),
                        ..Default::default()
                    })),
                })
                .collect(),
            ..Default::default()
        })
        .await?;
    let mut values = Vec::with_capacity(entries.len());
    for ((key, entry), response) in entries.iter().zip(read.responses) {
        let kv = match response.response {
            Some(Response::ResponseRange(r)) => r.kvs.into_iter().next(),
            _ => None,
        };
        match kv {
            Some(kv) if kv.mod_revision == entry.shard_mod_revision => values.push(kv.value),
            _ => {
                return Err(StoreError::Internal(format!(
                    "shard {} no longer holds {} as the index says",
                    shard.id,
                    crate::txn_shapes::show_key(key)
                )))
            }
        }
    }
    Ok(values)
}

/// The copies a shard holds: (key, revision, meta, stored value with its envelope).
pub(crate) async fn scan_copies(
    shard: &Shard,
) -> StoreResult<Vec<(Bytes, i64, envelope::Meta, Bytes)>> {
    let mut out = Vec::new();
    let copies = (Bytes::from_static(REPLICA_PREFIX), Bytes::from_static(&[0]));
    read_pages(shard, copies, 1000, false, |kv| {
        if let (Some((key, revision)), Ok((meta, _))) =
            (parse_replica_key(&kv.key), envelope::decode(&kv.value))
        {
            out.push((key, revision, meta, Bytes::copy_from_slice(&kv.value)));
        }
        Ok(())
    })
    .await?;
    Ok(out)
}
