//! An in-memory shard for the store's unit tests: a single-member etcd's MVCC
//! as far as the router uses it (Range at a revision, Txn with compares,
//! Compact, Status), and the failures the router must survive, on demand:
//! a timeout (nothing applied), an unknown outcome (applied, then an error),
//! the etcd recreated empty (new identity), and its revision going back
//! (the same identity, the latest writes gone).

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ste_etcd_proto::mvccpb::KeyValue;
use ste_etcd_proto::pb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    request_op::Request,
    response_op::Response,
    CompactionRequest, CompactionResponse, Compare, DeleteRangeRequest, DeleteRangeResponse,
    PutRequest, PutResponse, RangeRequest, RangeResponse, ResponseHeader, ResponseOp,
    StatusResponse, TxnRequest, TxnResponse,
};
use tokio::sync::Semaphore;
use tonic::Status;

use super::client::{ShardAnswer, ShardClient};

/// A failure the next matching call answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request times out; nothing is applied.
    Timeout,
    /// The request is applied, then the answer is lost (connection reset).
    UnknownOutcome,
}

/// Which call a queued fault is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Range,
    Txn,
    Status,
}

/// One version of a key (a tombstone when `deleted`).
#[derive(Debug, Clone)]
struct Version {
    kv: KeyValue,
    deleted: bool,
}

#[derive(Debug)]
struct Mvcc {
    revision: i64,
    compacted: i64,
    member_id: u64,
    /// Every key's versions, oldest first.
    keys: BTreeMap<Bytes, Vec<Version>>,
}

impl Mvcc {
    fn new(member_id: u64) -> Self {
        Mvcc {
            revision: 1,
            compacted: 0,
            member_id,
            keys: BTreeMap::new(),
        }
    }

    /// The live version of `key` at `revision`.
    fn at(&self, key: &[u8], revision: i64) -> Option<&KeyValue> {
        let version = self
            .keys
            .get(key)?
            .iter()
            .rev()
            .find(|v| v.kv.mod_revision <= revision)?;
        (!version.deleted).then_some(&version.kv)
    }

    /// Live keys of [key, range_end) at `revision`, in key order.
    fn live(&self, key: &Bytes, range_end: &Bytes, revision: i64) -> Vec<KeyValue> {
        let keys: Vec<&Bytes> = if range_end.is_empty() {
            self.keys
                .get_key_value(key)
                .map(|(k, _)| k)
                .into_iter()
                .collect()
        } else {
            let upper = if range_end.as_ref() == [0] {
                Bound::Unbounded
            } else if range_end <= key {
                return Vec::new();
            } else {
                Bound::Excluded(range_end.clone())
            };
            self.keys
                .range((Bound::Included(key.clone()), upper))
                .map(|(k, _)| k)
                .collect()
        };
        keys.into_iter()
            .filter_map(|k| self.at(k, revision).cloned())
            .collect()
    }

    fn header(&self) -> ResponseHeader {
        ResponseHeader {
            cluster_id: 0x6d656d,
            member_id: self.member_id,
            revision: self.revision,
            raft_term: 1,
        }
    }

    fn range(&self, req: &RangeRequest) -> Result<RangeResponse, Status> {
        let revision = match req.revision {
            r if r <= 0 => self.revision,
            r if r > self.revision => {
                return Err(Status::out_of_range(
                    "etcdserver: mvcc: required revision is a future revision",
                ))
            }
            r if r < self.compacted => {
                return Err(Status::out_of_range(
                    "etcdserver: mvcc: required revision has been compacted",
                ))
            }
            r => r,
        };
        let mut kvs = self.live(&req.key, &req.range_end, revision);
        let count = kvs.len() as i64;
        let more = req.limit > 0 && count > req.limit;
        if req.count_only {
            kvs.clear();
        } else if req.limit > 0 {
            kvs.truncate(req.limit as usize);
        }
        if req.keys_only {
            kvs.iter_mut().for_each(|kv| kv.value = Bytes::new());
        }
        Ok(RangeResponse {
            header: Some(self.header()),
            kvs,
            more,
            count,
        })
    }

    fn compare(&self, compare: &Compare) -> Result<bool, Status> {
        let found = self.live(&compare.key, &compare.range_end, self.revision);
        let empty = KeyValue::default();
        let kvs: Vec<&KeyValue> = if found.is_empty() {
            if compare.target == CompareTarget::Value as i32 {
                return Ok(false);
            }
            vec![&empty]
        } else {
            found.iter().collect()
        };
        for kv in kvs {
            let ordering = match (
                CompareTarget::try_from(compare.target),
                &compare.target_union,
            ) {
                (Ok(CompareTarget::Value), Some(TargetUnion::Value(v))) => kv.value[..].cmp(&v[..]),
                (Ok(CompareTarget::Value), _) => kv.value[..].cmp(&[][..]),
                (Ok(CompareTarget::Version), u) => kv.version.cmp(&int(u)),
                (Ok(CompareTarget::Create), u) => kv.create_revision.cmp(&int(u)),
                (Ok(CompareTarget::Mod), u) => kv.mod_revision.cmp(&int(u)),
                (Ok(CompareTarget::Lease), u) => kv.lease.cmp(&int(u)),
                (Err(_), _) => return Err(Status::invalid_argument("bad compare target")),
            };
            let holds = match CompareResult::try_from(compare.result) {
                Ok(CompareResult::Equal) => ordering.is_eq(),
                Ok(CompareResult::NotEqual) => !ordering.is_eq(),
                Ok(CompareResult::Greater) => ordering.is_gt(),
                Ok(CompareResult::Less) => ordering.is_lt(),
                Err(_) => return Err(Status::invalid_argument("bad compare result")),
            };
            if !holds {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn txn(&mut self, req: &TxnRequest) -> Result<TxnResponse, Status> {
        let mut succeeded = true;
        for compare in &req.compare {
            if !self.compare(compare)? {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded {
            &req.success
        } else {
            &req.failure
        };
        let next = self.revision + 1;
        let mut wrote = false;
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            let response = match &op.request {
                Some(Request::RequestRange(range)) => {
                    // Reads in a Txn see the writes before them.
                    let view = if wrote { next } else { self.revision };
                    let mut range = range.clone();
                    range.revision = view;
                    let saved = self.revision;
                    self.revision = view;
                    let answer = self.range(&range);
                    self.revision = saved;
                    Response::ResponseRange(RangeResponse {
                        header: None,
                        ..answer?
                    })
                }
                Some(Request::RequestPut(put)) => {
                    wrote = true;
                    Response::ResponsePut(self.put(put, next))
                }
                Some(Request::RequestDeleteRange(delete)) => {
                    let answer = self.delete(delete, next);
                    wrote |= answer.deleted > 0;
                    Response::ResponseDeleteRange(answer)
                }
                Some(Request::RequestTxn(_)) | None => {
                    return Err(Status::unimplemented("nested txns are not modelled"))
                }
            };
            responses.push(ResponseOp {
                response: Some(response),
            });
        }
        if wrote {
            self.revision = next;
        }
        Ok(TxnResponse {
            header: Some(self.header()),
            succeeded,
            responses,
        })
    }

    fn put(&mut self, put: &PutRequest, revision: i64) -> PutResponse {
        let prev = self.at(&put.key, revision).cloned();
        let kv = KeyValue {
            key: put.key.clone(),
            create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
            mod_revision: revision,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            value: put.value.clone(),
            lease: put.lease,
        };
        let versions = self.keys.entry(put.key.clone()).or_default();
        // Two writes of one key in one Txn: etcd refuses; here the last wins.
        versions.retain(|v| v.kv.mod_revision != revision);
        versions.push(Version { kv, deleted: false });
        PutResponse {
            header: None,
            prev_kv: if put.prev_kv { prev } else { None },
        }
    }

    fn delete(&mut self, delete: &DeleteRangeRequest, revision: i64) -> DeleteRangeResponse {
        let gone = self.live(&delete.key, &delete.range_end, revision);
        for kv in &gone {
            self.keys.entry(kv.key.clone()).or_default().push(Version {
                kv: KeyValue {
                    key: kv.key.clone(),
                    mod_revision: revision,
                    ..Default::default()
                },
                deleted: true,
            });
        }
        DeleteRangeResponse {
            header: None,
            deleted: gone.len() as i64,
            prev_kvs: if delete.prev_kv { gone } else { Vec::new() },
        }
    }

    fn compact(&mut self, revision: i64) -> Result<(), Status> {
        if revision <= self.compacted {
            return Err(Status::out_of_range(
                "etcdserver: mvcc: required revision has been compacted",
            ));
        }
        if revision > self.revision {
            return Err(Status::out_of_range(
                "etcdserver: mvcc: required revision is a future revision",
            ));
        }
        for versions in self.keys.values_mut() {
            // Keep the newest version at or below `revision` and all later ones.
            let keep_from = versions
                .iter()
                .rposition(|v| v.kv.mod_revision <= revision)
                .unwrap_or(0);
            versions.drain(..keep_from);
            if versions
                .first()
                .is_some_and(|v| v.deleted && v.kv.mod_revision <= revision)
            {
                versions.remove(0);
            }
        }
        self.keys.retain(|_, versions| !versions.is_empty());
        self.compacted = revision;
        Ok(())
    }

    /// Forgets every write after `revision` (a restore from an old copy).
    fn rewind(&mut self, revision: i64) {
        for versions in self.keys.values_mut() {
            versions.retain(|v| v.kv.mod_revision <= revision);
        }
        self.keys.retain(|_, versions| !versions.is_empty());
        self.revision = revision.max(1);
        self.compacted = self.compacted.min(self.revision);
    }
}

fn int(union: &Option<TargetUnion>) -> i64 {
    match union {
        Some(TargetUnion::Version(v))
        | Some(TargetUnion::CreateRevision(v))
        | Some(TargetUnion::ModRevision(v))
        | Some(TargetUnion::Lease(v)) => *v,
        _ => 0,
    }
}

/// A single-member etcd in memory. Clones share the same state.
#[derive(Clone)]
pub struct MemoryShard {
    inner: Arc<Inner>,
}

struct Inner {
    mvcc: Mutex<Mvcc>,
    faults: Mutex<VecDeque<(Call, Fault)>>,
    /// Every call fails as if the etcd were unreachable.
    down: AtomicBool,
    txns: AtomicU64,
    ranges: AtomicU64,
    next_member: AtomicU64,
    /// While set, every Txn waits here for a permit before it is applied
    /// (see `hold_txns`).
    gate: Mutex<Option<Arc<Semaphore>>>,
    /// Txns waiting at the gate now.
    held: AtomicU64,
}

impl Default for MemoryShard {
    fn default() -> Self {
        Self::new()
    }
}

/// A connector that hands out the memory shard named by each spec's id
/// (an unknown name is an error, as an unreachable shard would be).
pub fn connector(shards: &BTreeMap<String, MemoryShard>) -> super::Connector {
    let by_name = shards.clone();
    Arc::new(move |spec: &super::ShardSpec| {
        let shard = by_name.get(spec.id.as_str()).cloned().ok_or_else(|| {
            crate::error::StoreError::Internal(format!("no memory shard {}", spec.id))
        })?;
        let client: Arc<dyn ShardClient> = Arc::new(shard);
        Ok(client)
    })
}

/// The spec of memory shard `name` (endpoint `memory://<name>`).
pub fn spec(name: &str) -> super::ShardSpec {
    super::ShardSpec {
        id: crate::placement::ring::ShardId::new(name),
        endpoint: format!("memory://{name}"),
        origin: super::Origin::Static,
    }
}

impl MemoryShard {
    pub fn new() -> Self {
        MemoryShard {
            inner: Arc::new(Inner {
                mvcc: Mutex::new(Mvcc::new(1)),
                faults: Mutex::new(VecDeque::new()),
                down: AtomicBool::new(false),
                txns: AtomicU64::new(0),
                ranges: AtomicU64::new(0),
                next_member: AtomicU64::new(2),
                gate: Mutex::new(None),
                held: AtomicU64::new(0),
            }),
        }
    }

    /// The next `call` fails with `fault` (queued faults apply in order).
    pub fn fail_next(&self, call: Call, fault: Fault) {
        self.inner
            .faults
            .lock()
            .expect("faults lock")
            .push_back((call, fault));
    }

    /// Unreachable (every call fails, nothing is applied) until set back.
    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, Ordering::Release);
    }

    /// The etcd is replaced by an empty one with a new member id (its RAM disk was lost).
    pub fn recreate_empty(&self) {
        let member = self.inner.next_member.fetch_add(1, Ordering::AcqRel);
        *self.lock() = Mvcc::new(member);
    }

    /// The etcd comes back with the same identity but only its history up
    /// to `revision` (restored from an old copy): its revision goes back.
    pub fn rewind_to(&self, revision: i64) {
        self.lock().rewind(revision);
    }

    /// The shard's current revision.
    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    /// The live raw (still enveloped) values in key order, at the current revision.
    pub fn dump(&self) -> Vec<KeyValue> {
        let mvcc = self.lock();
        mvcc.live(
            &Bytes::from_static(b"\0"),
            &Bytes::from_static(&[0]),
            mvcc.revision,
        )
    }

    /// Writes `value` under `key` behind the router's back (a foreign writer).
    pub fn put_raw(&self, key: &[u8], value: &[u8]) -> i64 {
        let mut mvcc = self.lock();
        let next = mvcc.revision + 1;
        mvcc.put(
            &PutRequest {
                key: Bytes::copy_from_slice(key),
                value: Bytes::copy_from_slice(value),
                ..Default::default()
            },
            next,
        );
        mvcc.revision = next;
        next
    }

    /// From now on every Txn is held in flight (not applied, not answered)
    /// until `release_txns` lets it through, one permit per Txn.
    pub fn hold_txns(&self) {
        *self.inner.gate.lock().expect("gate lock") = Some(Arc::new(Semaphore::new(0)));
    }

    /// Lets `n` held Txns (or the next `n` to come) through, in arrival order.
    pub fn release_txns(&self, n: usize) {
        if let Some(gate) = self.inner.gate.lock().expect("gate lock").as_ref() {
            gate.add_permits(n);
        }
    }

    /// Stops holding Txns; the ones held go through.
    pub fn open_txns(&self) {
        if let Some(gate) = self.inner.gate.lock().expect("gate lock").take() {
            gate.close();
        }
    }

    /// Txns held in flight right now.
    pub fn held_txns(&self) -> u64 {
        self.inner.held.load(Ordering::Acquire)
    }

    /// Txns received (answered or not).
    pub fn txn_count(&self) -> u64 {
        self.inner.txns.load(Ordering::Acquire)
    }

    /// Ranges received (answered or not).
    pub fn range_count(&self) -> u64 {
        self.inner.ranges.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Mvcc> {
        self.inner.mvcc.lock().expect("mvcc lock")
    }

    /// The fault this call takes, if any (down, or the first queued for it).
    fn fault(&self, call: Call) -> Result<Option<Fault>, Status> {
        if self.inner.down.load(Ordering::Acquire) {
            return Err(Status::unavailable("memory shard is down"));
        }
        let mut faults = self.inner.faults.lock().expect("faults lock");
        let position = faults.iter().position(|(c, _)| *c == call);
        Ok(position
            .and_then(|i| faults.remove(i))
            .map(|(_, fault)| fault))
    }

    fn answer<T>(
        &self,
        call: Call,
        work: impl FnOnce(&mut Mvcc) -> Result<T, Status>,
    ) -> Result<T, Status> {
        match self.fault(call)? {
            None => work(&mut self.lock()),
            Some(Fault::Timeout) => Err(Status::deadline_exceeded("memory shard: timeout")),
            Some(Fault::UnknownOutcome) => {
                let _ = work(&mut self.lock());
                Err(Status::unavailable(
                    "memory shard: connection reset after the request was applied",
                ))
            }
        }
    }
}

impl ShardClient for MemoryShard {
    fn range(&self, req: RangeRequest) -> ShardAnswer<'_, RangeResponse> {
        self.inner.ranges.fetch_add(1, Ordering::AcqRel);
        let answer = self.answer(Call::Range, |mvcc| mvcc.range(&req));
        Box::pin(async move {
            tokio::task::yield_now().await;
            answer
        })
    }

    fn txn<'a>(&'a self, req: &'a TxnRequest) -> ShardAnswer<'a, TxnResponse> {
        self.inner.txns.fetch_add(1, Ordering::AcqRel);
        let gate = self.inner.gate.lock().expect("gate lock").clone();
        if let Some(gate) = gate {
            self.inner.held.fetch_add(1, Ordering::AcqRel);
            return Box::pin(async move {
                // A closed gate (`open_txns`) lets everything through.
                if let Ok(permit) = gate.acquire().await {
                    permit.forget();
                }
                self.inner.held.fetch_sub(1, Ordering::AcqRel);
                self.answer(Call::Txn, |mvcc| mvcc.txn(req))
            });
        }
        let answer = self.answer(Call::Txn, |mvcc| mvcc.txn(req));
        Box::pin(async move {
            tokio::task::yield_now().await;
            answer
        })
    }

    fn compact(&self, req: CompactionRequest) -> ShardAnswer<'_, CompactionResponse> {
        let answer = self
            .fault(Call::Txn)
            .and_then(|_| self.lock().compact(req.revision))
            .map(|()| CompactionResponse {
                header: Some(self.lock().header()),
            });
        Box::pin(async move { answer })
    }

    fn status(&self) -> ShardAnswer<'_, StatusResponse> {
        let answer = self.answer(Call::Status, |mvcc| {
            Ok(StatusResponse {
                header: Some(mvcc.header()),
                version: "3.6.0".into(),
                db_size: 4096,
                db_size_in_use: 4096,
                ..Default::default()
            })
        });
        Box::pin(async move { answer })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ste_etcd_proto::pb::RequestOp;

    fn put(key: &str, value: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: Bytes::copy_from_slice(key.as_bytes()),
                value: Bytes::copy_from_slice(value.as_bytes()),
                prev_kv: true,
                ..Default::default()
            })),
        }
    }

    fn get(shard: &MemoryShard, key: &str, revision: i64) -> Result<RangeResponse, Status> {
        shard.lock().range(&RangeRequest {
            key: Bytes::copy_from_slice(key.as_bytes()),
            revision,
            ..Default::default()
        })
    }

    fn txn(shard: &MemoryShard, compare: Vec<Compare>, ops: Vec<RequestOp>) -> TxnResponse {
        shard
            .lock()
            .txn(&TxnRequest {
                compare,
                success: ops,
                failure: Vec::new(),
            })
            .expect("txn")
    }

    #[test]
    fn ranges_answer_at_a_revision_and_refuse_compacted_ones() {
        let shard = MemoryShard::new();
        txn(&shard, vec![], vec![put("a", "1")]);
        txn(&shard, vec![], vec![put("a", "2")]);
        assert_eq!(get(&shard, "a", 2).unwrap().kvs[0].value, "1");
        assert_eq!(get(&shard, "a", 0).unwrap().kvs[0].value, "2");
        assert_eq!(get(&shard, "a", 0).unwrap().kvs[0].version, 2);
        shard.lock().compact(3).unwrap();
        assert_eq!(
            get(&shard, "a", 2).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(get(&shard, "a", 3).unwrap().kvs[0].value, "2");
        assert!(get(&shard, "a", 9).is_err());
    }

    #[test]
    fn compares_decide_the_branch_like_etcd() {
        let shard = MemoryShard::new();
        txn(&shard, vec![], vec![put("a", "1")]);
        let mod_is = |revision| Compare {
            key: Bytes::from_static(b"a"),
            target: CompareTarget::Mod as i32,
            result: CompareResult::Equal as i32,
            target_union: Some(TargetUnion::ModRevision(revision)),
            range_end: Bytes::new(),
        };
        assert!(!txn(&shard, vec![mod_is(1)], vec![put("a", "x")]).succeeded);
        assert!(txn(&shard, vec![mod_is(2)], vec![put("a", "y")]).succeeded);
        let missing_value = Compare {
            key: Bytes::from_static(b"zz"),
            target: CompareTarget::Value as i32,
            result: CompareResult::NotEqual as i32,
            target_union: Some(TargetUnion::Value(Bytes::from_static(b"v"))),
            range_end: Bytes::new(),
        };
        assert!(!txn(&shard, vec![missing_value], vec![]).succeeded);
        assert_eq!(shard.revision(), 3);
    }

    #[test]
    fn faults_fail_the_call_with_or_without_applying_it() {
        let shard = MemoryShard::new();
        let req = TxnRequest {
            success: vec![put("a", "1")],
            ..Default::default()
        };
        shard.fail_next(Call::Txn, Fault::Timeout);
        assert!(shard.answer(Call::Txn, |m| m.txn(&req)).is_err());
        assert_eq!(shard.revision(), 1);
        shard.fail_next(Call::Txn, Fault::UnknownOutcome);
        assert!(shard.answer(Call::Txn, |m| m.txn(&req)).is_err());
        assert_eq!(shard.revision(), 2);
        shard.rewind_to(1);
        assert!(get(&shard, "a", 0).unwrap().kvs.is_empty());
        let member = shard.lock().member_id;
        shard.recreate_empty();
        assert_ne!(shard.lock().member_id, member);
    }
}
