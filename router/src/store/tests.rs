//! The store's logic against in-memory shards (`shard::memory`): group
//! commit, compares, the paging merge across shards, reconciliation after an
//! unknown outcome, a shard recreated empty and a revision going back, and a
//! key move. The same paths against real etcd are in `router/tests/`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ste_etcd_proto::mvccpb::event::EventType;
use ste_etcd_proto::pb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    request_op::Request,
    response_op::Response,
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};

use super::{Store, StoreConfig};

mod cache;
use crate::error::StoreError;
use crate::metrics::Metrics;
use crate::placement::ring::ShardId;
use crate::shard::memory::{self, spec, Call, Fault, MemoryShard};
use crate::shard::ShardSpec;

/// Shards by name; a store opened on some of them, the others can join.
struct Fixture {
    store: Arc<Store>,
    shards: BTreeMap<String, MemoryShard>,
}

impl Fixture {
    async fn open(members: usize, spare: usize) -> Fixture {
        Self::open_rf(members, spare, 1).await
    }

    /// With `replication_factor` copies of each key.
    async fn open_rf(members: usize, spare: usize, replication_factor: u8) -> Fixture {
        let shards: BTreeMap<String, MemoryShard> = (0..members + spare)
            .map(|i| (format!("s{i}"), MemoryShard::new()))
            .collect();
        let specs: Vec<ShardSpec> = (0..members).map(|i| spec(&format!("s{i}"))).collect();
        Fixture {
            store: Self::open_on(&shards, &specs, replication_factor).await,
            shards,
        }
    }

    async fn open_on(
        shards: &BTreeMap<String, MemoryShard>,
        specs: &[ShardSpec],
        replication_factor: u8,
    ) -> Arc<Store> {
        let config = StoreConfig {
            replication_factor,
            ..Default::default()
        };
        Self::open_on_with(shards, specs, config).await
    }

    /// A store over `shards` with `config`, its shard timeouts shortened.
    async fn open_on_with(
        shards: &BTreeMap<String, MemoryShard>,
        specs: &[ShardSpec],
        config: StoreConfig,
    ) -> Arc<Store> {
        let connector = memory::connector(shards);
        let config = StoreConfig {
            shard_timeout: Duration::from_millis(500),
            load_timeout: Duration::from_millis(200),
            ..config
        };
        Store::open_with(config, specs, Arc::new(Metrics::default()), connector)
            .await
            .expect("store opens on memory shards")
    }

    fn shard(&self, name: &str) -> &MemoryShard {
        &self.shards[name]
    }

    async fn put(&self, key: &str, value: &str) -> Result<i64, StoreError> {
        let answer = self
            .store
            .put(PutRequest {
                key: Bytes::copy_from_slice(key.as_bytes()),
                value: Bytes::copy_from_slice(value.as_bytes()),
                ..Default::default()
            })
            .await?;
        Ok(answer.header.expect("header").revision)
    }

    async fn get_at(&self, key: &str, revision: i64) -> Option<(String, i64)> {
        let answer = self
            .store
            .range(RangeRequest {
                key: Bytes::copy_from_slice(key.as_bytes()),
                revision,
                ..Default::default()
            })
            .await
            .expect("range");
        answer.kvs.first().map(|kv| {
            (
                String::from_utf8_lossy(&kv.value).into_owned(),
                kv.mod_revision,
            )
        })
    }

    async fn get(&self, key: &str) -> Option<(String, i64)> {
        self.get_at(key, 0).await
    }

    /// Events of the store's history for `key`: (type, revision).
    fn events_of(&self, key: &str) -> Vec<(EventType, i64)> {
        let published = self.store.sequencer().published();
        self.store
            .history()
            .read(self.store.history().compact_revision(), published, |e| {
                e.key() == key.as_bytes()
            })
            .expect("history")
            .iter()
            .map(|e| {
                let kind = EventType::try_from(e.event.r#type).expect("event type");
                (kind, e.revision)
            })
            .collect()
    }
}

fn compare(key: &str, target: CompareTarget, union: TargetUnion) -> Compare {
    Compare {
        key: Bytes::copy_from_slice(key.as_bytes()),
        target: target as i32,
        result: CompareResult::Equal as i32,
        target_union: Some(union),
        range_end: Bytes::new(),
    }
}

fn put_op(key: &str, value: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::copy_from_slice(value.as_bytes()),
            ..Default::default()
        })),
    }
}

fn get_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestRange(RangeRequest {
            key: Bytes::copy_from_slice(key.as_bytes()),
            ..Default::default()
        })),
    }
}

#[tokio::test]
async fn concurrent_writes_to_one_shard_commit_in_groups_with_their_own_revisions() {
    let f = Fixture::open(1, 0).await;
    let before = f.shard("s0").txn_count();
    let writes = (0..64).map(|i| {
        let store = f.store.clone();
        tokio::spawn(async move {
            store
                .put(PutRequest {
                    key: Bytes::from(format!("k{i:02}")),
                    value: Bytes::from(format!("v{i}")),
                    ..Default::default()
                })
                .await
                .map(|r| r.header.expect("header").revision)
        })
    });
    let mut revisions: Vec<i64> = futures::future::join_all(writes)
        .await
        .into_iter()
        .map(|r| r.expect("task").expect("put"))
        .collect();
    let txns = f.shard("s0").txn_count() - before;
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(revisions.len(), 64, "every write has its own revision");
    assert_eq!(
        revisions.last().unwrap() - revisions.first().unwrap(),
        63,
        "consecutive revisions"
    );
    assert!(
        txns < 64 / 4,
        "64 writes took {txns} shard txns: no group commit"
    );
    assert_eq!(f.store.key_count(), 64);
    for i in [0, 31, 63] {
        assert_eq!(f.get(&format!("k{i:02}")).await.unwrap().0, format!("v{i}"));
    }
}

#[tokio::test]
async fn compares_are_answered_from_the_index_and_pick_the_branch() {
    let f = Fixture::open(1, 0).await;
    let r1 = f.put("a", "1").await.unwrap();
    let txn = |compare: Vec<Compare>| TxnRequest {
        compare,
        success: vec![put_op("a", "won")],
        failure: vec![get_op("a")],
    };
    // A stale mod revision: the failure branch reads the current value.
    let lost = f
        .store
        .txn(txn(vec![compare(
            "a",
            CompareTarget::Mod,
            TargetUnion::ModRevision(r1 - 1),
        )]))
        .await
        .unwrap();
    assert!(!lost.succeeded);
    match &lost.responses[0].response {
        Some(Response::ResponseRange(range)) => assert_eq!(range.kvs[0].value, "1"),
        other => panic!("expected the failure branch's get, got {other:?}"),
    }
    let txns = f.shard("s0").txn_count();
    let won = f
        .store
        .txn(txn(vec![
            compare("a", CompareTarget::Mod, TargetUnion::ModRevision(r1)),
            compare("a", CompareTarget::Version, TargetUnion::Version(1)),
            compare(
                "a",
                CompareTarget::Value,
                TargetUnion::Value(Bytes::from_static(b"1")),
            ),
        ]))
        .await
        .unwrap();
    assert!(won.succeeded);
    assert_eq!(f.shard("s0").txn_count(), txns + 1, "one shard txn");
    assert_eq!(f.get("a").await.unwrap().0, "won");
    // Create-if-absent (`Version == 0`, sent without a union) on a missing key.
    let create = TxnRequest {
        compare: vec![Compare {
            key: Bytes::from_static(b"new"),
            target: CompareTarget::Version as i32,
            result: CompareResult::Equal as i32,
            target_union: None,
            range_end: Bytes::new(),
        }],
        success: vec![put_op("new", "x")],
        failure: vec![],
    };
    assert!(f.store.txn(create.clone()).await.unwrap().succeeded);
    assert!(!f.store.txn(create).await.unwrap().succeeded);
    // A value compare on a missing key is false, whatever the operator.
    let missing = compare(
        "missing",
        CompareTarget::Value,
        TargetUnion::Value(Bytes::new()),
    );
    let missing_ne = Compare {
        result: CompareResult::NotEqual as i32,
        ..missing
    };
    assert!(!f.store.txn(txn(vec![missing_ne])).await.unwrap().succeeded);
}

#[tokio::test]
async fn pages_across_shards_merge_in_key_order_at_one_revision() {
    let f = Fixture::open(3, 0).await;
    for i in 0..90 {
        f.put(&format!("p/{i:03}"), &format!("v{i}")).await.unwrap();
    }
    let per_shard: Vec<usize> = f.shards.values().map(|s| s.dump().len()).collect();
    assert!(
        per_shard.iter().filter(|n| **n > 1).count() >= 2,
        "keys spread over the shards: {per_shard:?}"
    );
    let snapshot = f.store.sequencer().published();
    // Writes after the snapshot must not show in its pages.
    for i in 0..90 {
        f.put(&format!("p/{i:03}"), "later").await.unwrap();
    }
    f.put("p/050a", "new").await.unwrap();
    let mut seen = Vec::new();
    let mut from = Bytes::from_static(b"p/");
    loop {
        let page = f
            .store
            .range(RangeRequest {
                key: from.clone(),
                range_end: Bytes::from_static(b"p0"),
                limit: 7,
                revision: snapshot,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(page.kvs.len() <= 7);
        for kv in &page.kvs {
            assert_ne!(kv.value, "later", "a page shows a write after its revision");
            seen.push(kv.key.clone());
        }
        if !page.more {
            break;
        }
        let last = page
            .kvs
            .last()
            .expect("a page with more has keys")
            .key
            .clone();
        let mut next = last.to_vec();
        next.push(0);
        from = Bytes::from(next);
    }
    let expected: Vec<Bytes> = (0..90).map(|i| Bytes::from(format!("p/{i:03}"))).collect();
    assert_eq!(seen, expected);
    let now = f
        .store
        .range(RangeRequest {
            key: Bytes::from_static(b"p/"),
            range_end: Bytes::from_static(b"p0"),
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(now.count, 91);
}

#[tokio::test]
async fn a_write_with_an_unknown_outcome_is_reconciled_into_an_event() {
    let f = Fixture::open(1, 0).await;
    f.put("a", "1").await.unwrap();
    f.shard("s0").fail_next(Call::Txn, Fault::UnknownOutcome);
    let err = f.put("b", "2").await.unwrap_err();
    assert!(
        matches!(err, StoreError::ShardUnavailable { .. }),
        "{err:?}"
    );
    assert_eq!(
        f.get("b").await,
        None,
        "not announced before reconciliation"
    );
    // The next write reconciles the shard first: b was applied, so it is
    // announced as a write of its own.
    let r3 = f.put("c", "3").await.unwrap();
    let (value, revision) = f.get("b").await.expect("b was applied on the shard");
    assert_eq!(value, "2");
    assert!(revision < r3);
    assert_eq!(f.events_of("b"), vec![(EventType::Put, revision)]);
    assert_eq!(f.get("a").await.unwrap().0, "1");
}

#[tokio::test]
async fn a_timed_out_write_changes_nothing_once_reconciled() {
    let f = Fixture::open(1, 0).await;
    f.put("a", "1").await.unwrap();
    let events = f.store.history().len();
    f.shard("s0").fail_next(Call::Txn, Fault::Timeout);
    assert!(f.put("a", "2").await.is_err());
    f.store.maintain().await;
    assert_eq!(f.get("a").await.unwrap().0, "1");
    assert_eq!(
        f.store.history().len(),
        events,
        "no event for a write that did not happen"
    );
    assert!(f.put("a", "3").await.is_ok());
}

#[tokio::test]
async fn a_shard_recreated_empty_announces_its_keys_deleted() {
    let f = Fixture::open(2, 0).await;
    for i in 0..20 {
        f.put(&format!("k{i}"), "v").await.unwrap();
    }
    let lost_shard = "s0";
    let lost: Vec<String> = (0..20)
        .map(|i| format!("k{i}"))
        .filter(|k| f.store.shard_for_key(k.as_bytes()).unwrap().id.as_str() == lost_shard)
        .collect();
    assert!(!lost.is_empty());
    let before = f.store.sequencer().published();
    f.shard(lost_shard).recreate_empty();
    f.store.maintain().await;
    for key in (0..20).map(|i| format!("k{i}")) {
        let present = f.get(&key).await.is_some();
        assert_eq!(present, !lost.contains(&key), "{key}");
    }
    let deleted_at = f.events_of(&lost[0]);
    assert_eq!(deleted_at.last().unwrap().0, EventType::Delete);
    assert!(deleted_at.last().unwrap().1 > before);
    // The shard takes writes again, at new revisions.
    let revision = f.put(&lost[0], "again").await.unwrap();
    assert!(revision > before);
    assert_eq!(f.get(&lost[0]).await.unwrap().0, "again");
}

#[tokio::test]
async fn a_shard_whose_revision_went_back_loses_only_the_writes_it_forgot() {
    let f = Fixture::open(1, 0).await;
    f.put("kept", "1").await.unwrap();
    let kept_at = f.shard("s0").revision();
    f.put("forgotten", "2").await.unwrap();
    f.put("kept", "changed").await.unwrap();
    f.shard("s0").rewind_to(kept_at);
    f.store.maintain().await;
    assert_eq!(f.get("forgotten").await, None);
    let (value, _) = f.get("kept").await.expect("kept survives");
    assert_eq!(value, "1", "the value the shard holds, announced again");
    let kinds: Vec<EventType> = f.events_of("kept").into_iter().map(|e| e.0).collect();
    assert_eq!(kinds, vec![EventType::Put, EventType::Put, EventType::Put]);
    assert_eq!(
        f.events_of("forgotten").last().map(|e| e.0),
        Some(EventType::Delete)
    );
    assert!(f.put("after", "3").await.is_ok());
}

#[tokio::test]
async fn keys_move_to_a_joining_shard_and_old_revisions_still_read() {
    let f = Fixture::open(1, 1).await;
    for i in 0..40 {
        f.put(&format!("m{i:02}"), &format!("v{i}")).await.unwrap();
    }
    let before_move = f.store.sequencer().published();
    f.store.join(&spec("s1")).await.unwrap();
    let mut moved = 0;
    for _ in 0..50 {
        moved += f.store.rebalance().await.unwrap();
        if f.store.misplaced().await.is_empty() {
            break;
        }
    }
    assert!(moved > 0, "the ring places some keys on the new shard");
    let on_new = f.shard("s1").dump().len();
    let on_old = f.shard("s0").dump().len();
    // The marker key is on both shards.
    assert_eq!(on_new + on_old, 40 + 2, "each key on one shard");
    assert!(on_new > 1);
    for i in 0..40 {
        let key = format!("m{i:02}");
        let now = f.get(&key).await.expect("moved keys read");
        let then = f
            .get_at(&key, before_move)
            .await
            .expect("old revision reads");
        assert_eq!(now, then, "{key}: a move keeps value and revisions");
    }
    // Moves announce nothing.
    assert_eq!(f.events_of("m00").len(), 1);
}

fn lease_put(key: &str, lease: i64) -> PutRequest {
    PutRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::from_static(b"v"),
        lease,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_range_delete_across_shards_takes_one_revision_with_one_event_per_key() {
    let f = Fixture::open(3, 0).await;
    for i in 0..30 {
        f.put(&format!("d/{i:02}"), "v").await.unwrap();
    }
    f.put("e/kept", "v").await.unwrap();
    let answer = f
        .store
        .delete_range(DeleteRangeRequest {
            key: Bytes::from_static(b"d/"),
            range_end: Bytes::from_static(b"d0"),
            prev_kv: true,
        })
        .await
        .unwrap();
    assert_eq!(answer.deleted, 30);
    assert_eq!(answer.prev_kvs.len(), 30);
    let revision = answer.header.expect("header").revision;
    for i in 0..30 {
        let key = format!("d/{i:02}");
        assert_eq!(f.get(&key).await, None);
        assert_eq!(
            f.events_of(&key).last(),
            Some(&(EventType::Delete, revision))
        );
    }
    assert!(f.get("e/kept").await.is_some());
    let left: usize = f
        .shards
        .values()
        .map(|s| {
            s.dump()
                .iter()
                .filter(|kv| kv.key.starts_with(b"d/"))
                .count()
        })
        .sum();
    assert_eq!(left, 0, "the shards hold none of the deleted keys");
}

#[tokio::test]
async fn revoking_a_lease_deletes_its_keys_on_every_shard() {
    let f = Fixture::open(3, 0).await;
    f.store.lease_grant(7, 60).unwrap();
    for i in 0..12 {
        f.store.put(lease_put(&format!("l{i}"), 7)).await.unwrap();
    }
    f.put("free", "v").await.unwrap();
    let revision = f.store.lease_revoke(7).await.unwrap();
    for i in 0..12 {
        assert_eq!(f.get(&format!("l{i}")).await, None);
    }
    assert_eq!(
        f.events_of("l0").last(),
        Some(&(EventType::Delete, revision))
    );
    assert!(f.get("free").await.is_some());
    assert!(f.store.lease_info(7).is_none());
}

#[tokio::test]
async fn reads_below_a_compaction_are_refused() {
    let f = Fixture::open(2, 0).await;
    let r1 = f.put("a", "1").await.unwrap();
    let r2 = f.put("a", "2").await.unwrap();
    assert_eq!(f.get_at("a", r1).await.unwrap().0, "1");
    f.store.compact(r2).unwrap();
    let err = f
        .store
        .range(RangeRequest {
            key: Bytes::from_static(b"a"),
            revision: r1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Compacted), "{err:?}");
    assert_eq!(f.get_at("a", r2).await.unwrap().0, "2");
    assert!(matches!(f.store.compact(r1), Err(StoreError::Compacted)));
}

#[tokio::test]
async fn a_shard_down_at_startup_is_loaded_when_it_answers() {
    let shards: BTreeMap<String, MemoryShard> = [("s0".to_string(), MemoryShard::new())]
        .into_iter()
        .collect();
    {
        let first = Fixture {
            store: Fixture::open_on(&shards, &[spec("s0")], 1).await,
            shards: shards.clone(),
        };
        first.put("kept", "v").await.unwrap();
        first.store.shutdown();
    }
    shards["s0"].set_down(true);
    let f = Fixture {
        store: Fixture::open_on(&shards, &[spec("s0")], 1).await,
        shards: shards.clone(),
    };
    assert!(!f.store.is_ready());
    assert!(
        f.store
            .range(RangeRequest {
                key: Bytes::from_static(b"kept"),
                ..Default::default()
            })
            .await
            .is_err(),
        "no answer that misses the shard's keys"
    );
    shards["s0"].set_down(false);
    f.store.maintain().await;
    assert!(f.store.is_ready());
    assert_eq!(f.get("kept").await.unwrap().0, "v");
}

#[tokio::test]
async fn a_lost_shard_without_replication_announces_its_keys_deleted_at_one_revision() {
    let f = Fixture::open(3, 0).await;
    for i in 0..30 {
        f.put(&format!("k{i:02}"), "v").await.unwrap();
    }
    let on_s1: Vec<String> = (0..30)
        .map(|i| format!("k{i:02}"))
        .filter(|k| f.store.shard_for_key(k.as_bytes()).unwrap().id.as_str() == "s1")
        .collect();
    assert!(!on_s1.is_empty());
    f.shard("s1").set_down(true);
    let lost = f.store.declare_lost(&ShardId::new("s1")).await.unwrap();
    assert_eq!(lost, on_s1.len());
    let revisions: BTreeSet<i64> = on_s1
        .iter()
        .map(|k| {
            let (kind, revision) = *f.events_of(k).last().unwrap();
            assert_eq!(kind, EventType::Delete);
            revision
        })
        .collect();
    assert_eq!(revisions.len(), 1, "one revision for the whole loss");
    for i in 0..30 {
        let key = format!("k{i:02}");
        assert_eq!(f.get(&key).await.is_some(), !on_s1.contains(&key), "{key}");
    }
    // New keys go to the shards left.
    f.put("after", "v").await.unwrap();
    assert_ne!(f.store.shard_for_key(b"after").unwrap().id.as_str(), "s1");
}

#[tokio::test]
async fn with_replication_a_lost_shard_loses_nothing_and_announces_nothing() {
    let f = Fixture::open_rf(3, 0, 2).await;
    for i in 0..30 {
        f.put(&format!("k{i:02}"), &format!("v{i}")).await.unwrap();
    }
    let events = f.store.history().len();
    f.shard("s1").set_down(true);
    assert_eq!(f.store.declare_lost(&ShardId::new("s1")).await.unwrap(), 0);
    assert_eq!(
        f.store.history().len(),
        events,
        "no event for promoted keys"
    );
    for i in 0..30 {
        let key = format!("k{i:02}");
        assert_eq!(f.get(&key).await.unwrap().0, format!("v{i}"), "{key}");
    }
}

/// Waits (bounded) until `done` holds.
async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A put of `key`, polled once so it is queued on its shard's committer.
async fn queued_put(
    store: &Arc<Store>,
    key: &str,
) -> std::pin::Pin<Box<impl std::future::Future<Output = Result<i64, StoreError>>>> {
    let store = store.clone();
    let key = Bytes::copy_from_slice(key.as_bytes());
    let mut put = Box::pin(async move {
        let answer = store
            .put(PutRequest {
                key,
                value: Bytes::from_static(b"v"),
                ..Default::default()
            })
            .await?;
        Ok(answer.header.expect("header").revision)
    });
    assert!(
        futures::poll!(put.as_mut()).is_pending(),
        "a put to a held shard cannot finish"
    );
    put
}

#[tokio::test]
async fn a_finished_write_is_answered_while_the_next_batch_is_in_flight() {
    let f = Fixture::open(1, 0).await;
    let shard = f.shard("s0").clone();
    let before = shard.txn_count();
    shard.hold_txns();
    let first = queued_put(&f.store, "k1").await;
    wait_until("the first batch is in flight", || shard.held_txns() == 1).await;
    let second = queued_put(&f.store, "k2").await;
    let third = queued_put(&f.store, "k3").await;
    shard.release_txns(1);
    let r1 = first.await.expect("first write");
    wait_until("the second batch is in flight", || {
        shard.held_txns() == 1 && shard.txn_count() == before + 2
    })
    .await;
    let mut fourth = queued_put(&f.store, "k4").await;
    shard.release_txns(1);
    wait_until("the fourth write's batch is in flight", || {
        shard.held_txns() == 1 && shard.txn_count() == before + 3
    })
    .await;
    // k2 and k3 were committed together; their answers do not wait for k4's round trip.
    let within = Duration::from_secs(5);
    let r2 = tokio::time::timeout(within, second)
        .await
        .expect("k2 answered while the next batch is in flight")
        .expect("k2");
    let r3 = tokio::time::timeout(within, third)
        .await
        .expect("k3 answered while the next batch is in flight")
        .expect("k3");
    assert!(
        futures::poll!(fourth.as_mut()).is_pending(),
        "k4 is still held"
    );
    assert_eq!(shard.held_txns(), 1);
    shard.open_txns();
    let r4 = fourth.await.expect("k4");
    let mut revisions = vec![r1, r2, r3, r4];
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(revisions.len(), 4, "each write has its own revision");
    assert!(
        r1 < r2.min(r3) && r2.max(r3) < r4,
        "revisions in commit order"
    );
}

#[tokio::test]
async fn writes_queued_behind_a_batch_in_flight_go_out_as_one_batch() {
    let f = Fixture::open(1, 0).await;
    let shard = f.shard("s0").clone();
    let before = shard.txn_count();
    shard.hold_txns();
    let first = queued_put(&f.store, "a").await;
    wait_until("the first batch is in flight", || shard.held_txns() == 1).await;
    let mut queued = Vec::new();
    for i in 0..10 {
        queued.push(queued_put(&f.store, &format!("b{i}")).await);
    }
    shard.open_txns();
    first.await.expect("first write");
    let revisions: Vec<i64> = futures::future::join_all(queued)
        .await
        .into_iter()
        .map(|r| r.expect("queued write"))
        .collect();
    assert_eq!(
        shard.txn_count() - before,
        2,
        "the ten writes queued behind the first batch took one shard Txn"
    );
    assert_eq!(
        revisions.iter().collect::<BTreeSet<_>>().len(),
        10,
        "each write of the batch has its own revision"
    );
}

#[tokio::test]
async fn a_batch_with_an_unknown_outcome_is_reconciled_before_the_next_one() {
    let f = Fixture::open(1, 0).await;
    let shard = f.shard("s0").clone();
    shard.hold_txns();
    let first = queued_put(&f.store, "a").await;
    wait_until("the first batch is in flight", || shard.held_txns() == 1).await;
    let second = queued_put(&f.store, "b").await;
    let third = queued_put(&f.store, "c").await;
    shard.release_txns(1);
    first.await.expect("first write");
    wait_until("the second batch is in flight", || shard.held_txns() == 1).await;
    // The batch of b and c is applied, then its answer is lost.
    shard.fail_next(Call::Txn, Fault::UnknownOutcome);
    shard.open_txns();
    for (key, write) in [("b", second), ("c", third)] {
        let err = write.await.unwrap_err();
        assert!(
            matches!(err, StoreError::ShardUnavailable { .. }),
            "{key}: {err:?}"
        );
    }
    assert_eq!(
        f.get("b").await,
        None,
        "not announced before reconciliation"
    );
    // The next batch reconciles the shard first: b and c were applied, so
    // each is announced as a write of its own, below the new write.
    let r4 = f.put("d", "4").await.expect("write after the failed batch");
    for key in ["b", "c"] {
        let (_, revision) = f.get(key).await.expect("applied on the shard");
        assert!(revision < r4, "{key} at {revision}, d at {r4}");
        assert_eq!(f.events_of(key), vec![(EventType::Put, revision)]);
    }
}
