//! The Txn shapes the router accepts, and a clear error for the rest.
//!
//! kube-apiserver sends: create (`ModRevision(k) == 0` then Put), update and
//! delete (`ModRevision(k) == rv` then Put/Delete, else Get), and compaction
//! (`Version(compact_rev_key) == n` then Put, else Get). More generally any
//! Txn whose compares and operations each name a single key, all of them on
//! one shard, is executed atomically by that shard.

use std::collections::BTreeSet;

use bytes::Bytes;
use ste_etcd_proto::pb::{request_op::Request, RequestOp, TxnRequest};

use crate::error::{StoreError, StoreResult};

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;

/// Validates a Txn and returns every key it names (compares and both branches).
pub fn txn_keys(txn: &TxnRequest) -> StoreResult<BTreeSet<Bytes>> {
    if txn.compare.len() > MAX_TXN_OPS
        || txn.success.len() > MAX_TXN_OPS
        || txn.failure.len() > MAX_TXN_OPS
    {
        return Err(StoreError::TooManyOps);
    }
    let mut keys = BTreeSet::new();
    for compare in &txn.compare {
        if compare.key.is_empty() {
            return Err(StoreError::EmptyKey);
        }
        if !compare.range_end.is_empty() {
            return Err(StoreError::Unsupported(
                "Txn compares over a key range (range_end set); compare single keys".into(),
            ));
        }
        keys.insert(compare.key.clone());
    }
    for branch in [&txn.success, &txn.failure] {
        check_branch(branch)?;
        for op in branch {
            if let Some(key) = op_key(op) {
                keys.insert(key.clone());
            }
        }
    }
    Ok(keys)
}

fn check_branch(ops: &[RequestOp]) -> StoreResult<()> {
    let mut written = BTreeSet::new();
    for op in ops {
        match &op.request {
            None => {
                return Err(StoreError::Unsupported(
                    "a Txn operation with no request".into(),
                ))
            }
            Some(Request::RequestTxn(_)) => {
                return Err(StoreError::Unsupported("nested transactions".into()))
            }
            Some(Request::RequestRange(range)) => {
                if range.key.is_empty() {
                    return Err(StoreError::EmptyKey);
                }
                if !range.range_end.is_empty() {
                    return Err(StoreError::CrossShard(format!(
                        "range read [{}, {}) inside a Txn may cover keys on every shard; read single keys in a Txn, or use a plain Range",
                        show_key(&range.key),
                        show_key(&range.range_end)
                    )));
                }
                if range.revision != 0 {
                    return Err(StoreError::Unsupported(
                        "reads at an older revision inside a Txn".into(),
                    ));
                }
            }
            Some(Request::RequestPut(put)) => {
                if put.key.is_empty() {
                    return Err(StoreError::EmptyKey);
                }
                if !written.insert(put.key.clone()) {
                    return Err(StoreError::DuplicateKey);
                }
            }
            Some(Request::RequestDeleteRange(delete)) => {
                if delete.key.is_empty() {
                    return Err(StoreError::EmptyKey);
                }
                if !delete.range_end.is_empty() {
                    return Err(StoreError::CrossShard(format!(
                        "range delete [{}, {}) inside a Txn may cover keys on every shard; use a plain DeleteRange",
                        show_key(&delete.key),
                        show_key(&delete.range_end)
                    )));
                }
                if !written.insert(delete.key.clone()) {
                    return Err(StoreError::DuplicateKey);
                }
            }
        }
    }
    Ok(())
}

pub fn op_key(op: &RequestOp) -> Option<&Bytes> {
    match op.request.as_ref()? {
        Request::RequestRange(r) => Some(&r.key),
        Request::RequestPut(p) => Some(&p.key),
        Request::RequestDeleteRange(d) => Some(&d.key),
        Request::RequestTxn(_) => None,
    }
}

pub fn is_write(op: &RequestOp) -> bool {
    matches!(
        op.request,
        Some(Request::RequestPut(_)) | Some(Request::RequestDeleteRange(_))
    )
}

/// A key as text for error messages (lossy, bounded).
pub fn show_key(key: &[u8]) -> String {
    let text = String::from_utf8_lossy(key);
    if text.chars().count() > 120 {
        format!("{:?}…", text.chars().take(120).collect::<String>())
    } else {
        format!("{text:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ste_etcd_proto::pb::{compare, Compare, DeleteRangeRequest, PutRequest, RangeRequest};

    fn put(key: &'static [u8]) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: Bytes::from_static(key),
                ..Default::default()
            })),
        }
    }

    fn get(key: &'static [u8], end: &'static [u8]) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestRange(RangeRequest {
                key: Bytes::from_static(key),
                range_end: Bytes::from_static(end),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn kube_apiserver_update_shape_names_one_key() {
        let txn = TxnRequest {
            compare: vec![Compare {
                key: Bytes::from_static(b"/registry/pods/a"),
                target: compare::CompareTarget::Mod as i32,
                result: compare::CompareResult::Equal as i32,
                target_union: Some(compare::TargetUnion::ModRevision(5)),
                ..Default::default()
            }],
            success: vec![put(b"/registry/pods/a")],
            failure: vec![get(b"/registry/pods/a", b"")],
        };
        let keys: Vec<_> = txn_keys(&txn).unwrap().into_iter().collect();
        assert_eq!(keys, vec![Bytes::from_static(b"/registry/pods/a")]);
    }

    #[test]
    fn refused_shapes_say_why() {
        let ranged = TxnRequest {
            success: vec![get(b"a", b"b")],
            ..Default::default()
        };
        assert!(matches!(txn_keys(&ranged), Err(StoreError::CrossShard(m)) if m.contains("\"a\"")));
        let duplicate = TxnRequest {
            success: vec![put(b"a"), put(b"a")],
            ..Default::default()
        };
        assert!(matches!(
            txn_keys(&duplicate),
            Err(StoreError::DuplicateKey)
        ));
        let put_and_delete = TxnRequest {
            success: vec![
                put(b"a"),
                RequestOp {
                    request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                        key: Bytes::from_static(b"a"),
                        ..Default::default()
                    })),
                },
            ],
            ..Default::default()
        };
        assert!(matches!(
            txn_keys(&put_and_delete),
            Err(StoreError::DuplicateKey)
        ));
        let too_many = TxnRequest {
            success: (0..129).map(|_| get(b"a", b"")).collect(),
            ..Default::default()
        };
        assert!(matches!(txn_keys(&too_many), Err(StoreError::TooManyOps)));
    }
}
