//! The repair pass: copies missing after failures, restarts and ring changes are written again.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use ste_etcd_proto::pb::{request_op::Request, PutRequest, RequestOp, TxnRequest};
use tracing::{debug, info};

use crate::error::StoreResult;
use crate::keys::replica_key;
use crate::placement::index::IndexEntry;
use crate::placement::ring::ShardId;
use crate::shard::Shard;
use crate::store::Store;
use crate::txn_shapes::MAX_TXN_OPS;

use crate::replication::copies::read_values;

impl Store {
    /// Copies keys whose replica is missing or on the wrong shard. Runs only
    /// when something may have left keys under-replicated.
    pub async fn repair_replicas(&self) -> StoreResult<usize> {
        if !self.replication() || !self.replicas_dirty.swap(false, Ordering::AcqRel) {
            return Ok(0);
        }
        let plan: BTreeMap<(ShardId, ShardId), Vec<Bytes>> = {
            let index = self.index.read().expect("index lock");
            let ring = self.ring.read().expect("ring lock");
            let mut plan: BTreeMap<(ShardId, ShardId), Vec<Bytes>> = BTreeMap::new();
            for (key, entry) in index.iter() {
                let Some(target) = ring.locate_replica(key, &entry.shard) else {
                    continue;
                };
                if entry.replica.as_ref() != Some(&target) {
                    plan.entry((entry.shard.clone(), target))
                        .or_default()
                        .push(key.clone());
                }
            }
            plan
        };
        let missing: usize = plan.values().map(Vec::len).sum();
        self.metrics.keys_under_replicated.set(missing as i64);
        let mut repaired = 0;
        for ((primary, target), keys) in plan {
            let (Some(primary), Some(target)) = (self.shard(&primary), self.shard(&target)) else {
                self.replicas_dirty.store(true, Ordering::Release);
                continue;
            };
            if !primary.is_healthy() || !target.is_healthy() {
                // Tried again once both answer health checks.
                self.replicas_dirty.store(true, Ordering::Release);
                continue;
            }
            for chunk in keys.chunks(MAX_TXN_OPS) {
                match self.copy_chunk(&primary, &target, chunk).await {
                    Ok(n) => repaired += n,
                    Err(err) => {
                        debug!(primary = %primary.id, replica = %target.id, error = %err, "copying replicas failed; retrying later");
                        self.replicas_dirty.store(true, Ordering::Release);
                        break;
                    }
                }
            }
        }
        if repaired > 0 {
            info!(keys = repaired, "replica copies written");
        }
        self.metrics
            .keys_under_replicated
            .set(missing.saturating_sub(repaired) as i64);
        if repaired < missing {
            // Some keys changed meanwhile (and got copies with their writes)
            // or could not be copied: the next pass counts again.
            self.replicas_dirty.store(true, Ordering::Release);
        }
        Ok(repaired)
    }

    /// One chunk of replica copies, under the primary's write lock so the
    /// values cannot change between reading and copying them.
    async fn copy_chunk(
        &self,
        primary: &Arc<Shard>,
        target: &Arc<Shard>,
        keys: &[Bytes],
    ) -> StoreResult<usize> {
        let mut state = primary.write.lock().await;
        primary.require_loaded()?;
        self.ensure_reconciled(primary, &mut state).await?;
        let entries: Vec<(Bytes, IndexEntry)> = {
            let index = self.index.read().expect("index lock");
            keys.iter()
                .filter_map(|k| index.get(k).map(|e| (k.clone(), e.clone())))
                .filter(|(_, e)| e.shard == primary.id && e.replica.as_ref() != Some(&target.id))
                .collect()
        };
        if entries.is_empty() {
            return Ok(0);
        }
        let values = read_values(primary, &entries).await?;
        let mut ops = Vec::with_capacity(entries.len());
        let mut stale = Vec::new();
        for ((key, entry), value) in entries.iter().zip(&values) {
            ops.push(RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key: replica_key(key, entry.meta.mod_revision),
                    value: value.clone(),
                    ..Default::default()
                })),
            });
            if let Some(old) = &entry.replica {
                stale.push((old.clone(), key.clone(), entry.meta.mod_revision));
            }
        }
        target
            .txn(TxnRequest {
                success: ops,
                ..Default::default()
            })
            .await?;
        self.delete_copies(stale).await;
        let mut index = self.index.write().expect("index lock");
        for (key, before) in &entries {
            if let Some(entry) = index.get_mut(key) {
                if entry.meta == before.meta && entry.shard == primary.id {
                    entry.replica = Some(target.id.clone());
                }
            }
        }
        Ok(entries.len())
    }
}
