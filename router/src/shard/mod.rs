//! One shard: its client, its write lock (one write in flight, so the shard
//! commits in global revision order; held by the shard's committer for
//! each group commit, and by moves, reconciliation and multi-shard deletes),
//! its write queue and its revision cuts.

mod client;
mod cuts;
pub mod kv;
pub mod memory;
pub mod queue;
pub mod scan;
pub mod transport;

pub use client::{
    etcd_connector, Connector, EtcdShard, ShardAnswer, ShardClient, ShardTransport, TonicShard,
};
pub use cuts::{CutLookup, Cuts};

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use std::sync::Mutex;
use std::time::Duration;

use ste_etcd_proto::pb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    request_op::Request,
    CompactionRequest, Compare, PutRequest, RangeRequest, RangeResponse, RequestOp, StatusResponse,
    TxnRequest, TxnResponse,
};
use tonic::{Code, Status};
use tracing::warn;

use crate::error::{StoreError, StoreResult};
use crate::placement::ring::ShardId;

pub use crate::keys::{FENCE_KEY, MARKER_KEY, RESERVED_PREFIX};

/// The leader epoch this router writes under, shared by all its shards.
#[derive(Clone, Debug)]
pub struct Fencing {
    pub epoch: i64,
    /// Set when a shard's fence shows a newer epoch: the router steps down.
    pub deposed: Arc<AtomicBool>,
    /// Until when this router is the leader (renewals extend it).
    pub tenure: Arc<crate::leader::Tenure>,
}

impl Fencing {
    /// Not deposed and within the renew deadline of the last renewal.
    pub fn leads(&self) -> bool {
        !self.deposed.load(Ordering::Acquire) && self.tenure.is_valid()
    }
}

fn epoch_bytes(epoch: i64) -> Bytes {
    // Zero-padded, so byte order is numeric order.
    Bytes::from(format!("{epoch:020}"))
}

/// How the router reaches one shard.
#[derive(Clone, Debug)]
pub struct ShardSpec {
    pub id: ShardId,
    pub endpoint: String,
    pub origin: Origin,
}

impl ShardSpec {
    /// Parses `name=URL` or a bare URL (then the URL is the name); the URL
    /// is `http://host:port`, `https://host:port` or `unix:///path/to.sock`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (name, endpoint) = match text.split_once('=') {
            Some((name, endpoint)) => (name.trim(), endpoint.trim()),
            None => (text, text),
        };
        if name.is_empty() {
            return Err(format!("shard {text:?} has an empty name"));
        }
        if endpoint.starts_with("https://") {
            // Whether a shard CA is configured is checked when connecting.
            endpoint
                .parse::<tonic::transport::Uri>()
                .map_err(|e| format!("shard endpoint {endpoint:?} is not a valid URL: {e}"))?;
        } else {
            transport::Target::parse(endpoint, None)?;
        }
        Ok(ShardSpec {
            id: ShardId::new(name),
            endpoint: endpoint.to_string(),
            origin: Origin::Static,
        })
    }
}

/// State only the holder of the shard's write lock may touch.
#[derive(Debug, Default)]
pub struct WriteState {
    /// A write failed in a way that leaves its outcome unknown, or the shard
    /// was unreachable: the router's index must be checked against the shard
    /// before the next write.
    pub needs_reconcile: bool,
    /// The last global revision committed on this shard.
    pub last_revision: i64,
}

/// Where a shard's membership comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `--shards`: operator-managed (e.g. the bootstrap shard); never declared lost.
    Static,
    /// A `Shard` registration (or the admin API): joins, drains and may be declared lost.
    Registered,
}

pub struct Shard {
    pub id: ShardId,
    pub endpoint: String,
    pub origin: Origin,
    /// Out of the ring: its keys are being moved off (drain or removal).
    draining: AtomicBool,
    /// Since when health checks fail (None while healthy).
    unhealthy_since: Mutex<Option<std::time::Instant>>,
    /// The global revision from which the shard holds nothing and is not
    /// read (0: still a member).
    pub removed_at: AtomicI64,
    /// Bytes in use in its backend, from the last health check.
    pub db_bytes: AtomicI64,
    fencing: Option<Fencing>,
    /// This router's epoch is in the shard's fence key.
    fenced: AtomicBool,
    client: Arc<dyn ShardClient>,
    pub write: tokio::sync::Mutex<WriteState>,
    /// Txns waiting for the shard's committer (see `store::write::committer`).
    pub queue: queue::WriteQueue,
    pub cuts: Mutex<Cuts>,
    /// The shard's keys are in the index. Until then every request that may
    /// touch it answers Unavailable rather than a result that misses keys.
    loaded: AtomicBool,
    healthy: AtomicBool,
    /// (cluster id, member id) of the etcd answering: a new one means the
    /// shard was recreated and lost its data.
    identity: Mutex<Option<(u64, u64)>>,
    /// The shard was found replaced (new identity, or its revision went
    /// back) while its history generation was below this value: a
    /// replacement is pending while this is above `history_resets`. The
    /// verdict reaches the reconciliation even when another check saw the
    /// new etcd first, and is handled exactly once.
    replaced_before: AtomicU64,
    /// The highest revision any answer of this shard's etcd carried. Only
    /// the router writes a shard, so an answer below it means the etcd lost
    /// its data, whatever the request (a shard that only holds replica
    /// copies has no cuts that would show it).
    seen_revision: AtomicI64,
    /// Bumped when a reconciliation accepts the shard's new, lower history:
    /// a verdict taken against the old high-water mark is then void.
    history_resets: AtomicU64,
    /// `WriteState::needs_reconcile`, readable without the write lock: while
    /// set, reads do not use the value cache (see `Shard::note_reconcile`).
    unreconciled: AtomicBool,
}

/// The shard's high-water mark, read before a request is sent (see `Shard::went_back`).
#[derive(Debug, Clone, Copy)]
pub struct RevisionMark {
    seen: i64,
    resets: u64,
}

impl Shard {
    /// A shard reached through `connector` (see `etcd_connector`).
    pub fn connect(spec: &ShardSpec, connector: &Connector) -> StoreResult<Self> {
        Ok(Self::with_client(spec, connector(spec)?))
    }

    pub fn with_client(spec: &ShardSpec, client: Arc<dyn ShardClient>) -> Self {
        Shard {
            id: spec.id.clone(),
            endpoint: spec.endpoint.clone(),
            origin: spec.origin,
            draining: AtomicBool::new(false),
            unhealthy_since: Mutex::new(None),
            removed_at: AtomicI64::new(0),
            db_bytes: AtomicI64::new(0),
            fencing: None,
            fenced: AtomicBool::new(false),
            client,
            write: tokio::sync::Mutex::new(WriteState::default()),
            unreconciled: AtomicBool::new(false),
            queue: queue::WriteQueue::default(),
            cuts: Mutex::new(Cuts::unloaded()),
            loaded: AtomicBool::new(false),
            healthy: AtomicBool::new(false),
            identity: Mutex::new(None),
            replaced_before: AtomicU64::new(0),
            seen_revision: AtomicI64::new(0),
            history_resets: AtomicU64::new(0),
        }
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    pub fn set_loaded(&self, loaded: bool) {
        self.loaded.store(loaded, Ordering::Release);
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
        let mut since = self.unhealthy_since.lock().expect("unhealthy lock");
        match (healthy, *since) {
            (true, _) => *since = None,
            (false, None) => *since = Some(std::time::Instant::now()),
            (false, Some(_)) => {}
        }
    }

    /// How long health checks have been failing without a break.
    pub fn unhealthy_for(&self) -> Option<Duration> {
        self.unhealthy_since
            .lock()
            .expect("unhealthy lock")
            .map(|since| since.elapsed())
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Release);
    }

    /// Mirrors `state.needs_reconcile` (called wherever it changes), so that
    /// reads, which do not take the write lock, know the index may not match
    /// the shard (a write with an unknown outcome, an outage) until it is
    /// reconciled.
    pub fn note_reconcile(&self, state: &WriteState) {
        self.unreconciled
            .store(state.needs_reconcile, Ordering::Release);
    }

    /// Loaded, healthy, a member, and nothing to reconcile: the index is
    /// exactly what it holds, so the value cache may answer for its keys.
    pub fn is_settled(&self) -> bool {
        self.is_loaded()
            && self.is_healthy()
            && !self.unreconciled.load(Ordering::Acquire)
            && self.removed_at.load(Ordering::Acquire) == 0
    }

    pub fn require_loaded(&self) -> StoreResult<()> {
        if self.is_loaded() {
            Ok(())
        } else {
            Err(StoreError::unavailable(
                self.id.as_str(),
                "its keys are not loaded yet (shard unreachable since the router started or rejoined)",
            ))
        }
    }

    pub async fn range(&self, mut req: RangeRequest) -> StoreResult<RangeResponse> {
        // A shard is a single member written only by the router, which reads
        // after its writes were applied: a serializable read sees them all,
        // without the Raft read-index round a linearizable read pays.
        req.serializable = true;
        let mark = self.revision_mark();
        let result = self.client.range(req).await;
        let answer = self.answer(result)?;
        self.observe(mark, answer.header.as_ref().map(|h| h.revision));
        Ok(answer)
    }

    /// The high-water mark to compare an answer with; read it before sending.
    pub fn revision_mark(&self) -> RevisionMark {
        RevisionMark {
            resets: self.history_resets.load(Ordering::Acquire),
            seen: self.seen_revision.load(Ordering::Acquire),
        }
    }

    /// True (and the shard marked replaced) when `revision`, from an answer
    /// to a request sent after `mark` was read, is below the mark: the etcd
    /// answering has lost data the router wrote. Marks read before the
    /// router accepted a new history (`forget_history`) prove nothing.
    pub fn went_back(&self, mark: RevisionMark, revision: i64) -> bool {
        let went_back =
            revision < mark.seen && self.history_resets.load(Ordering::Acquire) == mark.resets;
        if went_back {
            self.note_replaced_in(mark.resets);
        }
        went_back
    }

    /// Records an answer's revision: raises the high-water mark, or marks the
    /// shard replaced when the revision went back.
    fn observe(&self, mark: RevisionMark, revision: Option<i64>) {
        let Some(revision) = revision.filter(|r| *r > 0) else {
            return;
        };
        if !self.went_back(mark, revision) {
            self.seen_revision.fetch_max(revision, Ordering::AcqRel);
        }
    }

    /// A reconciliation accepted the shard's history as it is now (after
    /// its etcd lost its data): `revision` is the new high-water mark.
    pub fn forget_history(&self, revision: i64) {
        self.history_resets.fetch_add(1, Ordering::AcqRel);
        self.seen_revision.store(revision, Ordering::Release);
    }

    /// Writes (and reads in a Txn) only while this router's epoch is the
    /// shard's fence: a router that lost the lease fails here and steps down.
    pub async fn txn(&self, req: TxnRequest) -> StoreResult<TxnResponse> {
        let mark = self.revision_mark();
        let answer = self.txn_fenced(req).await?;
        self.observe(mark, answer.header.as_ref().map(|h| h.revision));
        Ok(answer)
    }

    async fn txn_fenced(&self, mut req: TxnRequest) -> StoreResult<TxnResponse> {
        let Some(fencing) = self.fencing.clone() else {
            let result = self.client.txn(&req).await;
            return self.answer(result);
        };
        req.compare.push(Compare {
            key: Bytes::from_static(FENCE_KEY),
            target: CompareTarget::Value as i32,
            result: CompareResult::Equal as i32,
            target_union: Some(TargetUnion::Value(epoch_bytes(fencing.epoch))),
            range_end: Bytes::new(),
        });
        for _ in 0..2 {
            if !self.fenced.load(Ordering::Acquire) {
                self.raise_fence(&fencing).await?;
            }
            let result = self.client.txn(&req).await;
            let answer = self.answer(result)?;
            if answer.succeeded {
                return Ok(answer);
            }
            match self.fence_epoch().await?.0 {
                epoch if epoch == fencing.epoch => return Ok(answer),
                epoch if epoch > fencing.epoch => return Err(self.deposed(&fencing)),
                // The fence is gone (the shard lost its data): raise it again and retry.
                _ => self.fenced.store(false, Ordering::Release),
            }
        }
        Err(StoreError::unavailable(
            self.id.as_str(),
            "its leader fence keeps disappearing",
        ))
    }

    /// Whether the shard carries `MARKER_KEY`.
    pub async fn has_marker(&self) -> StoreResult<bool> {
        let answer = self
            .range(RangeRequest {
                key: Bytes::from_static(MARKER_KEY),
                count_only: true,
                ..Default::default()
            })
            .await?;
        Ok(answer.count > 0)
    }

    /// Writes `MARKER_KEY` (see there).
    pub async fn write_marker(&self) -> StoreResult<()> {
        let put = PutRequest {
            key: Bytes::from_static(MARKER_KEY),
            value: Bytes::copy_from_slice(self.id.as_str().as_bytes()),
            ..Default::default()
        };
        self.txn(TxnRequest {
            success: vec![RequestOp {
                request: Some(Request::RequestPut(put)),
            }],
            ..Default::default()
        })
        .await
        .map(|_| ())
    }

    pub fn with_fencing(mut self, fencing: Option<Fencing>) -> Self {
        self.fencing = fencing;
        self
    }

    /// Raises this router's fence now (a new leader does this on every
    /// shard at once, so an old one is fenced out before its next write).
    pub async fn fence_now(&self) -> StoreResult<()> {
        match self.fencing.clone() {
            Some(fencing) if !self.fenced.load(Ordering::Acquire) => {
                self.raise_fence(&fencing).await
            }
            _ => Ok(()),
        }
    }

    fn deposed(&self, fencing: &Fencing) -> StoreError {
        warn!(shard = %self.id, epoch = fencing.epoch, "the shard's fence shows a newer leader: stepping down");
        fencing.deposed.store(true, Ordering::Release);
        StoreError::NotLeader
    }

    /// (epoch in the fence, its mod revision); (0, 0) when there is none.
    async fn fence_epoch(&self) -> StoreResult<(i64, i64)> {
        let answer = self
            .range(RangeRequest {
                key: Bytes::from_static(FENCE_KEY),
                ..Default::default()
            })
            .await?;
        Ok(answer
            .kvs
            .first()
            .map(|kv| {
                let epoch = std::str::from_utf8(&kv.value)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(i64::MAX);
                (epoch, kv.mod_revision)
            })
            .unwrap_or((0, 0)))
    }

    /// Puts this router's epoch in the fence unless a newer one is there.
    async fn raise_fence(&self, fencing: &Fencing) -> StoreResult<()> {
        for _ in 0..3 {
            let (current, mod_revision) = self.fence_epoch().await?;
            if current > fencing.epoch {
                return Err(self.deposed(fencing));
            }
            if current < fencing.epoch {
                let answer = self
                    .client
                    .txn(&TxnRequest {
                        compare: vec![Compare {
                            key: Bytes::from_static(FENCE_KEY),
                            target: CompareTarget::Mod as i32,
                            result: CompareResult::Equal as i32,
                            target_union: Some(TargetUnion::ModRevision(mod_revision)),
                            range_end: Bytes::new(),
                        }],
                        success: vec![RequestOp {
                            request: Some(Request::RequestPut(PutRequest {
                                key: Bytes::from_static(FENCE_KEY),
                                value: epoch_bytes(fencing.epoch),
                                ..Default::default()
                            })),
                        }],
                        failure: Vec::new(),
                    })
                    .await;
                if !self.answer(answer)?.succeeded {
                    continue;
                }
            }
            self.fenced.store(true, Ordering::Release);
            return Ok(());
        }
        Err(StoreError::unavailable(
            self.id.as_str(),
            "its leader fence keeps changing",
        ))
    }

    pub async fn compact(&self, shard_revision: i64) -> StoreResult<()> {
        let result = self
            .client
            .compact(CompactionRequest {
                revision: shard_revision,
                physical: false,
            })
            .await;
        self.answer(result).map(|_| ())
    }

    pub async fn status(&self) -> StoreResult<StatusResponse> {
        let result = self.client.status().await;
        let answer = self.answer(result);
        self.set_healthy(answer.is_ok());
        if let Ok(status) = &answer {
            self.db_bytes
                .store(status.db_size_in_use, Ordering::Relaxed);
        }
        answer
    }

    /// Health check; Ok(true) when the etcd answering is not the one seen
    /// before (it was recreated, e.g. its RAM disk was lost).
    pub async fn check(&self) -> StoreResult<bool> {
        // Only the router writes to a shard, so its revision never goes back
        // unless the data is gone (a recreated etcd may keep the same ids).
        // The last revision seen must be read *before* asking: a batch that
        // commits while the Status call is in flight pushes a newer cut, and
        // comparing against that one took a healthy shard for a replaced one
        // (a full reconciliation scan per false alarm, hundreds of ms at
        // 100k keys, with the shard's writes waiting behind it).
        // The high-water mark covers every answer (the cuts only the primary
        // writes), and is void if a reconciliation accepted a new history
        // meanwhile: that one already handled what this check would report
        // (acting on it again was a second reconciliation and relist).
        let mark = self.revision_mark();
        let status = self.status().await?;
        let header = status.header.unwrap_or_default();
        let seen = (header.cluster_id, header.member_id);
        // Compared and recorded under one lock, so of two concurrent checks
        // exactly one reports a new identity, before the other returns.
        let mut identity = self.identity.lock().expect("identity lock");
        let new_identity = identity.is_some_and(|known| known != seen);
        *identity = Some(seen);
        let went_back = header.revision > 0 && self.went_back(mark, header.revision);
        if new_identity && !went_back {
            self.note_replaced_in(mark.resets);
        }
        drop(identity);
        if !went_back {
            self.seen_revision
                .fetch_max(header.revision, Ordering::AcqRel);
        }
        Ok(went_back || new_identity)
    }

    /// Records that the etcd answering has lost the history the router knew
    /// as of history generation `resets` (see `forget_history`). However
    /// many requests notice the same loss, it is one replacement: it stays
    /// pending until a reconciliation accepts the new history, and a verdict
    /// from before that acceptance cannot make it pending again.
    fn note_replaced_in(&self, resets: u64) {
        self.replaced_before.fetch_max(resets + 1, Ordering::AcqRel);
    }

    /// Whether a replacement waits for a reconciliation.
    pub fn pending_replacement(&self) -> bool {
        self.replaced_before.load(Ordering::Acquire) > self.history_resets.load(Ordering::Acquire)
    }

    /// Records the cut of a write batch. Ok(false) when the shard's revision
    /// is below the last cut's: the etcd lost its history (recreated, maybe
    /// with the same ids) and was written to before a health check noticed.
    pub fn push_batch_cut(&self, first: i64, last: i64, shard_revision: i64) -> bool {
        let mut cuts = self.cuts.lock().expect("cuts lock");
        let went_back = cuts
            .latest_shard_revision()
            .is_some_and(|prev| shard_revision < prev);
        cuts.push_batch(first, last, shard_revision);
        drop(cuts);
        if went_back {
            // The caller holds the write lock: no reconciliation runs meanwhile.
            self.note_replaced_in(self.history_resets.load(Ordering::Acquire));
        }
        !went_back
    }

    fn answer<T>(&self, result: Result<T, Status>) -> StoreResult<T> {
        match result {
            Ok(response) => Ok(response),
            Err(status) => Err(self.classify(status)),
        }
    }

    /// Errors that are the request's fault pass through with etcd's own
    /// message; everything else means the shard cannot serve right now.
    fn classify(&self, status: Status) -> StoreError {
        match status.code() {
            Code::InvalidArgument
            | Code::OutOfRange
            | Code::FailedPrecondition
            | Code::NotFound
            | Code::ResourceExhausted => StoreError::ShardRejected(status),
            _ => {
                self.set_healthy(false);
                StoreError::unavailable(self.id.as_str(), status.message())
            }
        }
    }
}

/// True when a failed shard write certainly did not change the shard.
pub fn write_certainly_not_applied(err: &StoreError) -> bool {
    matches!(err, StoreError::ShardRejected(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_specs_parse_with_and_without_names() {
        let named = ShardSpec::parse("a=http://127.0.0.1:2380").unwrap();
        assert_eq!(
            (named.id.as_str(), named.endpoint.as_str()),
            ("a", "http://127.0.0.1:2380")
        );
        let bare = ShardSpec::parse(" http://127.0.0.1:2381 ").unwrap();
        assert_eq!(bare.id.as_str(), "http://127.0.0.1:2381");
        assert!(ShardSpec::parse("127.0.0.1:2380")
            .unwrap_err()
            .contains("http://"));
        let unix = ShardSpec::parse("local=unix:///run/etcd/client.sock").unwrap();
        assert_eq!(unix.endpoint, "unix:///run/etcd/client.sock");
        assert!(ShardSpec::parse("x=unix://rel.sock").is_err());
        assert!(ShardSpec::parse("=http://x:1")
            .unwrap_err()
            .contains("empty name"));
    }
}
