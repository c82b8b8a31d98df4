//! Planning a txn against the index: its compares decide the branch (from
//! the index, a value compare from the shard), its ops become shard ops
//! with global metadata, and txns are grouped into batches.

use std::collections::BTreeSet;

use bytes::Bytes;
use ste_etcd_proto::pb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    request_op::Request,
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp, TxnRequest,
};

use crate::envelope::{self, Meta};
use crate::error::{StoreError, StoreResult};
use crate::placement::index::{zero_kv_meta, IndexEntry};
use crate::placement::ring::ShardId;
use crate::shard::kv::{key_fence, translate_kv};
use crate::shard::queue::PendingTxn;
use crate::shard::Shard;
use crate::store::read::check_range_options;
use crate::store::Store;
use crate::txn_shapes::MAX_TXN_OPS;

impl Store {
    /// Decides the branch of a txn from the index and validates its ops.
    pub(crate) async fn plan_txn(&self, shard: &Shard, req: &TxnRequest) -> StoreResult<TxnPlan> {
        let succeeded = self.evaluate_compares(shard, &req.compare).await?;
        let ops = if succeeded {
            &req.success
        } else {
            &req.failure
        };
        let mut prepared = Vec::with_capacity(ops.len());
        for op in ops {
            prepared.push(self.prepare_op(shard, op).await?);
        }
        let writes = prepared.iter().any(|op| match op {
            PreparedOp::Put { .. } => true,
            PreparedOp::Delete { entry, .. } => entry.is_some(),
            PreparedOp::Range(_) | PreparedOp::Answered(_) => false,
        });
        if !writes {
            // A read-only branch (a failed compare's Get): nothing in this
            // batch writes its keys, so the index and the cache answer.
            for op in &mut prepared {
                if let PreparedOp::Range(range) = op {
                    if let Some(answer) = self.cached_txn_read(shard, range) {
                        *op = PreparedOp::Answered(answer);
                    }
                }
            }
        }
        Ok(TxnPlan {
            succeeded,
            ops: prepared,
            writes,
        })
    }

    async fn evaluate_compares(&self, shard: &Shard, compares: &[Compare]) -> StoreResult<bool> {
        for compare in compares {
            let entry = self
                .index
                .read()
                .expect("index lock")
                .get(&compare.key)
                .cloned();
            let ordering = match (
                CompareTarget::try_from(compare.target),
                &compare.target_union,
            ) {
                (Ok(CompareTarget::Value), Some(TargetUnion::Value(expected))) => {
                    if entry.is_none() {
                        // etcd: a value compare on a missing key is always false.
                        return Ok(false);
                    }
                    let current = self.read_latest_value(shard, &compare.key).await?;
                    match current {
                        Some(value) => value[..].cmp(&expected[..]),
                        None => return Ok(false),
                    }
                }
                (Ok(target), Some(union)) => {
                    let meta = entry.map(|e| e.meta).unwrap_or_else(zero_kv_meta);
                    let (have, want) = match (target, union) {
                        (CompareTarget::Version, TargetUnion::Version(v)) => (meta.version, *v),
                        (CompareTarget::Create, TargetUnion::CreateRevision(v)) => {
                            (meta.create_revision, *v)
                        }
                        (CompareTarget::Mod, TargetUnion::ModRevision(v)) => {
                            (meta.mod_revision, *v)
                        }
                        (CompareTarget::Lease, TargetUnion::Lease(v)) => (meta.lease, *v),
                        _ => {
                            return Err(StoreError::Unsupported(format!(
                                "a compare whose target ({:?}) and value disagree",
                                target
                            )))
                        }
                    };
                    have.cmp(&want)
                }
                (Ok(CompareTarget::Version), None) => {
                    // proto3 drops zero: `Version(k) == 0` arrives without a union.
                    let meta = entry.map(|e| e.meta).unwrap_or_else(zero_kv_meta);
                    meta.version.cmp(&0)
                }
                (Ok(target), None) => {
                    let meta = entry.map(|e| e.meta).unwrap_or_else(zero_kv_meta);
                    let have = match target {
                        CompareTarget::Create => meta.create_revision,
                        CompareTarget::Mod => meta.mod_revision,
                        CompareTarget::Lease => meta.lease,
                        CompareTarget::Version => meta.version,
                        CompareTarget::Value => return Ok(false),
                    };
                    have.cmp(&0)
                }
                (Err(_), _) => {
                    return Err(StoreError::Unsupported(format!(
                        "compare target {}",
                        compare.target
                    )))
                }
            };
            let holds = match CompareResult::try_from(compare.result) {
                Ok(CompareResult::Equal) => ordering.is_eq(),
                Ok(CompareResult::NotEqual) => !ordering.is_eq(),
                Ok(CompareResult::Greater) => ordering.is_gt(),
                Ok(CompareResult::Less) => ordering.is_lt(),
                Err(_) => {
                    return Err(StoreError::Unsupported(format!(
                        "compare result {}",
                        compare.result
                    )))
                }
            };
            if !holds {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The current client value of a key (the caller holds the shard's write
    /// lock), from the value cache when it has it.
    async fn read_latest_value(&self, shard: &Shard, key: &Bytes) -> StoreResult<Option<Bytes>> {
        if let Some(cached) = self.cached_latest(shard, key) {
            return Ok(cached.map(|(_, _, value)| value));
        }
        let answer = shard
            .range(RangeRequest {
                key: key.clone(),
                ..Default::default()
            })
            .await?;
        match answer.kvs.into_iter().next() {
            Some(kv) => {
                let kv = translate_kv(&shard.id, kv)?;
                self.remember_read(&kv);
                Ok(Some(kv.value))
            }
            None => Ok(None),
        }
    }

    pub(crate) fn translate_range(
        &self,
        shard: &ShardId,
        answer: RangeResponse,
        asked: &RangeRequest,
    ) -> StoreResult<RangeResponse> {
        let mut kvs = Vec::with_capacity(answer.kvs.len());
        for kv in answer.kvs {
            let mut kv = translate_kv(shard, kv)?;
            if asked.keys_only {
                kv.value = Bytes::new();
            }
            kvs.push(kv);
        }
        Ok(RangeResponse {
            header: None,
            kvs,
            more: answer.more,
            count: answer.count,
        })
    }

    /// Only the op's buffers are shared (reference counts), nothing is copied.
    async fn prepare_op(&self, shard: &Shard, op: &RequestOp) -> StoreResult<PreparedOp> {
        match &op.request {
            Some(Request::RequestPut(put)) => {
                let entry = self
                    .index
                    .read()
                    .expect("index lock")
                    .get(&put.key)
                    .cloned();
                if put.ignore_value && !put.value.is_empty() {
                    return Err(StoreError::ValueProvided);
                }
                if put.ignore_lease && put.lease != 0 {
                    return Err(StoreError::LeaseProvided);
                }
                if (put.ignore_value || put.ignore_lease) && entry.is_none() {
                    return Err(StoreError::KeyNotFound);
                }
                let value = if put.ignore_value {
                    self.read_latest_value(shard, &put.key)
                        .await?
                        .ok_or(StoreError::KeyNotFound)?
                } else {
                    put.value.clone()
                };
                let lease = if put.ignore_lease {
                    entry.as_ref().map(|e| e.meta.lease).unwrap_or(0)
                } else {
                    put.lease
                };
                let lease_ttl = if lease != 0 {
                    self.leases.attachable_ttl(lease)?
                } else {
                    0
                };
                Ok(PreparedOp::Put {
                    key: put.key.clone(),
                    value,
                    lease,
                    lease_ttl,
                    want_prev: put.prev_kv,
                    entry,
                })
            }
            Some(Request::RequestDeleteRange(delete)) => {
                let entry = self
                    .index
                    .read()
                    .expect("index lock")
                    .get(&delete.key)
                    .cloned();
                Ok(PreparedOp::Delete {
                    key: delete.key.clone(),
                    want_prev: delete.prev_kv,
                    entry,
                })
            }
            Some(Request::RequestRange(range)) => {
                check_range_options(range)?;
                Ok(PreparedOp::Range(range.clone()))
            }
            _ => Err(StoreError::Unsupported("this Txn operation".into())),
        }
    }
}

pub(crate) struct TxnPlan {
    pub(crate) succeeded: bool,
    pub(crate) ops: Vec<PreparedOp>,
    pub(crate) writes: bool,
}

/// Txns committed together as one shard Txn.
#[derive(Default)]
pub(crate) struct Batch {
    pub(crate) items: Vec<(PendingTxn, TxnPlan)>,
    written: BTreeSet<Bytes>,
    ops: usize,
    bytes: usize,
}

impl Batch {
    /// etcd's defaults: 128 ops per Txn, 1.5 MiB per request.
    const MAX_OPS: usize = MAX_TXN_OPS;
    const MAX_BYTES: usize = 1024 * 1024;

    pub(crate) fn accepts(&self, pending: &PendingTxn) -> bool {
        if self.items.is_empty() {
            return true;
        }
        let ops = pending.req.success.len().max(pending.req.failure.len());
        let bytes = txn_bytes(&pending.req);
        pending.keys.is_disjoint(&self.written)
            && self.ops + ops <= Self::MAX_OPS
            && self.bytes + bytes <= Self::MAX_BYTES
    }

    pub(crate) fn add(&mut self, pending: PendingTxn, plan: TxnPlan) {
        for op in &plan.ops {
            match op {
                PreparedOp::Put { key, .. } | PreparedOp::Delete { key, .. } => {
                    self.written.insert(key.clone());
                }
                PreparedOp::Range(_) | PreparedOp::Answered(_) => {}
            }
        }
        self.ops += plan.ops.len();
        self.bytes += txn_bytes(&pending.req);
        self.items.push((pending, plan));
    }
}

fn txn_bytes(req: &TxnRequest) -> usize {
    req.success
        .iter()
        .chain(&req.failure)
        .map(|op| match &op.request {
            Some(Request::RequestPut(p)) => p.key.len() + p.value.len() + 64,
            Some(Request::RequestRange(r)) => r.key.len() + 16,
            Some(Request::RequestDeleteRange(d)) => d.key.len() + 16,
            _ => 16,
        })
        .sum()
}

/// An op validated against the index, waiting for its revision.
pub(crate) enum PreparedOp {
    Put {
        key: Bytes,
        value: Bytes,
        lease: i64,
        lease_ttl: i64,
        want_prev: bool,
        entry: Option<IndexEntry>,
    },
    Delete {
        key: Bytes,
        want_prev: bool,
        entry: Option<IndexEntry>,
    },
    Range(RangeRequest),
    /// A read answered from the index and the value cache (not sent to the shard).
    Answered(RangeResponse),
}

impl PreparedOp {
    /// The plan, the op sent to the shard (none for a delete of a key that
    /// does not exist), and the fence guarding it.
    pub(crate) fn finish(self, g: i64) -> (PlannedOp, Option<RequestOp>, Option<Compare>) {
        match self {
            PreparedOp::Put {
                key,
                value,
                lease,
                lease_ttl,
                want_prev,
                entry,
            } => {
                let meta = Meta {
                    mod_revision: g,
                    create_revision: entry.as_ref().map(|e| e.meta.create_revision).unwrap_or(g),
                    version: entry.as_ref().map(|e| e.meta.version).unwrap_or(0) + 1,
                    lease,
                    lease_ttl,
                };
                let fence = key_fence(
                    &key,
                    entry.as_ref().map(|e| e.shard_mod_revision).unwrap_or(0),
                );
                // The event's value is a slice of the envelope: one copy of
                // the value (into the envelope), not two.
                let (stored, value) = envelope::encode_shared(&meta, &value);
                let op = RequestOp {
                    request: Some(Request::RequestPut(PutRequest {
                        key: key.clone(),
                        value: stored,
                        // The previous value (for the event and the caller)
                        // exists only if the index has the key; for a create
                        // the fence already says the shard has none.
                        prev_kv: entry.is_some(),
                        ..Default::default()
                    })),
                };
                let plan = PlannedOp::Put {
                    key,
                    meta,
                    value,
                    want_prev,
                    old_lease: entry.map(|e| e.meta.lease).unwrap_or(0),
                };
                (plan, Some(op), Some(fence))
            }
            PreparedOp::Delete {
                key,
                want_prev,
                entry: None,
            } => {
                // The index is exact: the key is absent, nothing to send.
                let plan = PlannedOp::Delete {
                    key,
                    want_prev,
                    existed: false,
                    sent: false,
                };
                (plan, None, None)
            }
            PreparedOp::Delete {
                key,
                want_prev,
                entry: Some(entry),
            } => {
                let fence = key_fence(&key, entry.shard_mod_revision);
                let op = RequestOp {
                    request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                        key: key.clone(),
                        prev_kv: true,
                        ..Default::default()
                    })),
                };
                let plan = PlannedOp::Delete {
                    key,
                    want_prev,
                    existed: true,
                    sent: true,
                };
                (plan, Some(op), Some(fence))
            }
            PreparedOp::Answered(answer) => (PlannedOp::Answered(answer), None, None),
            PreparedOp::Range(range) => {
                let plan = PlannedOp::Range {
                    keys_only: range.keys_only,
                    count_only: range.count_only,
                };
                let op = RequestOp {
                    request: Some(Request::RequestRange(RangeRequest {
                        key: range.key,
                        limit: range.limit,
                        count_only: range.count_only,
                        ..Default::default()
                    })),
                };
                (plan, Some(op), None)
            }
        }
    }
}

/// What a write txn will do to one key, decided before the shard is asked.
pub(crate) enum PlannedOp {
    Put {
        key: Bytes,
        meta: Meta,
        value: Bytes,
        want_prev: bool,
        old_lease: i64,
    },
    Delete {
        key: Bytes,
        want_prev: bool,
        existed: bool,
        sent: bool,
    },
    Range {
        keys_only: bool,
        count_only: bool,
    },
    Answered(RangeResponse),
}

impl PlannedOp {
    pub(crate) fn sent_to_shard(&self) -> bool {
        !matches!(
            self,
            PlannedOp::Delete { sent: false, .. } | PlannedOp::Answered(_)
        )
    }
}
