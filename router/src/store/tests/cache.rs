//! The value cache (`store::cached`) against in-memory shards: reads racing
//! writes, a write committed but not yet published, reads below a move,
//! reads while a write's outcome is unknown, eviction under the bound, a
//! Txn's read and value compare, and a leader whose tenure ended or that
//! was deposed. Whether a read went to a shard is seen in the shard's
//! Range count and the cache's hit counter.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Instant;

use ste_etcd_proto::pb::TxnResponse;

use super::*;
use crate::leader::Tenure;
use crate::placement::values::ENTRY_OVERHEAD;
use crate::shard::Fencing;

/// A store on `members` memory shards with `config` (its shard timeouts shortened).
async fn open_with(members: usize, config: StoreConfig) -> Fixture {
    let shards: BTreeMap<String, MemoryShard> = (0..members)
        .map(|i| (format!("s{i}"), MemoryShard::new()))
        .collect();
    let specs: Vec<ShardSpec> = (0..members).map(|i| spec(&format!("s{i}"))).collect();
    let store = Fixture::open_on_with(&shards, &specs, config).await;
    Fixture { store, shards }
}

impl Fixture {
    fn hits(&self) -> u64 {
        self.store.metrics().value_cache_counts().0
    }

    fn ranges(&self) -> u64 {
        self.shards.values().map(|s| s.range_count()).sum()
    }

    /// A key the ring places on shard `name`.
    fn key_on(&self, name: &str, prefix: &str) -> String {
        (0..1000)
            .map(|i| format!("{prefix}{i}"))
            .find(|key| {
                self.store
                    .shard_for_key(key.as_bytes())
                    .unwrap()
                    .id
                    .as_str()
                    == name
            })
            .expect("some key lands on every shard")
    }

    fn indexed_mod_revision(&self, key: &str) -> Option<i64> {
        self.store
            .index
            .read()
            .unwrap()
            .get(key.as_bytes())
            .map(|e| e.meta.mod_revision)
    }
}

#[tokio::test]
async fn a_read_is_served_from_the_cache_without_a_shard_round_trip() {
    let f = Fixture::open(1, 0).await;
    let r1 = f.put("a", "1").await.unwrap();
    let (ranges, hits) = (f.ranges(), f.hits());
    assert_eq!(f.get("a").await, Some(("1".into(), r1)));
    assert_eq!(f.ranges(), ranges, "the write filled the cache");
    assert_eq!(f.hits(), hits + 1);
    // A header at the data's revision, as the shard path answers.
    let answer = f
        .store
        .range(RangeRequest {
            key: Bytes::from_static(b"a"),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(answer.header.unwrap().revision, r1);
    assert_eq!(answer.count, 1);
    // keys_only and count_only shapes.
    let keys_only = f
        .store
        .range(RangeRequest {
            key: Bytes::from_static(b"a"),
            keys_only: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(keys_only.kvs[0].value.is_empty());
    let count_only = f
        .store
        .range(RangeRequest {
            key: Bytes::from_static(b"a"),
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(count_only.kvs.is_empty());
    assert_eq!(count_only.count, 1);
    assert_eq!(f.ranges(), ranges, "every shape from the cache");
}

#[tokio::test]
async fn a_committed_write_is_not_read_before_its_revision_is_published() {
    let f = Fixture::open(2, 0).await;
    let (held_key, key) = (f.key_on("s0", "h"), f.key_on("s1", "k"));
    let r1 = f.put(&key, "old").await.unwrap();
    // A write on s0 takes revision g1 and stays in flight; a later write of
    // `key` on s1 takes g2 > g1 and is committed (index and cache updated),
    // but g2 cannot be published before g1.
    let s0 = f.shard("s0").clone();
    s0.hold_txns();
    let held = queued_put(&f.store, &held_key).await;
    wait_until("s0's write is in flight", || s0.held_txns() == 1).await;
    let update = {
        let store = f.store.clone();
        let key = Bytes::from(key.clone());
        tokio::spawn(async move {
            store
                .put(PutRequest {
                    key,
                    value: Bytes::from_static(b"new"),
                    ..Default::default()
                })
                .await
        })
    };
    wait_until("the update is committed on s1", || {
        f.indexed_mod_revision(&key) != Some(r1)
    })
    .await;
    let g2 = f.indexed_mod_revision(&key).unwrap();
    assert!(g2 > f.store.sequencer().published());
    for _ in 0..3 {
        assert_eq!(
            f.get(&key).await,
            Some(("old".into(), r1)),
            "an unpublished write is never read"
        );
    }
    s0.open_txns();
    held.await.expect("held write");
    let r2 = update.await.unwrap().unwrap().header.unwrap().revision;
    assert_eq!(r2, g2);
    let (ranges, hits) = (f.ranges(), f.hits());
    assert_eq!(
        f.get(&key).await,
        Some(("new".into(), r2)),
        "published: never stale"
    );
    assert_eq!((f.ranges(), f.hits()), (ranges, hits + 1), "from the cache");
    assert_eq!(
        f.get_at(&key, r1).await,
        Some(("old".into(), r1)),
        "an older revision reads the older version (from the shard)"
    );
    assert_eq!(f.ranges(), ranges + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_racing_writes_never_go_back_and_never_miss_an_acknowledged_write() {
    let f = Fixture::open(1, 0).await;
    f.put("race", "0").await.unwrap();
    let acked = Arc::new(AtomicI64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let store = f.store.clone();
        let (acked, done) = (acked.clone(), done.clone());
        tokio::spawn(async move {
            for i in 1..=200i64 {
                store
                    .put(PutRequest {
                        key: Bytes::from_static(b"race"),
                        value: Bytes::from(i.to_string()),
                        ..Default::default()
                    })
                    .await
                    .expect("put");
                acked.store(i, Ordering::Release);
            }
            done.store(true, Ordering::Release);
        })
    };
    let readers = (0..2).map(|_| {
        let store = f.store.clone();
        let (acked, done) = (acked.clone(), done.clone());
        tokio::spawn(async move {
            let (mut last, mut reads) = (0i64, 0u32);
            while !done.load(Ordering::Acquire) || reads < 10 {
                let floor = acked.load(Ordering::Acquire);
                let answer = store
                    .range(RangeRequest {
                        key: Bytes::from_static(b"race"),
                        ..Default::default()
                    })
                    .await
                    .expect("range");
                let kv = &answer.kvs[0];
                let value: i64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
                assert!(
                    value >= floor,
                    "read {value} after {floor} was acknowledged"
                );
                assert!(value >= last, "read {value} after reading {last}");
                assert!(answer.header.unwrap().revision >= kv.mod_revision);
                last = value;
                reads += 1;
                tokio::task::yield_now().await;
            }
            reads
        })
    });
    let reads: Vec<u32> = futures::future::join_all(readers)
        .await
        .into_iter()
        .map(|r| r.expect("reader"))
        .collect();
    writer.await.expect("writer");
    assert!(reads.iter().all(|&n| n >= 10), "{reads:?}");
    assert!(f.hits() > 0, "some reads were served from the cache");
    assert_eq!(f.get("race").await.unwrap().0, "200");
}

#[tokio::test]
async fn reads_below_a_move_go_to_the_shards_and_later_ones_to_the_cache() {
    let f = Fixture::open(1, 1).await;
    for i in 0..40 {
        f.put(&format!("m{i:02}"), &format!("v{i}")).await.unwrap();
    }
    let before_move = f.store.sequencer().published();
    f.store.join(&spec("s1")).await.unwrap();
    for _ in 0..50 {
        f.store.rebalance().await.unwrap();
        if f.store.misplaced().await.is_empty() {
            break;
        }
    }
    assert!(f.shard("s1").dump().len() > 1, "some keys moved");
    let (ranges, hits) = (f.ranges(), f.hits());
    let mut old = Vec::new();
    for i in 0..40 {
        old.push(f.get_at(&format!("m{i:02}"), before_move).await.unwrap());
    }
    assert!(
        f.ranges() >= ranges + 40,
        "below the move every read goes to the shards"
    );
    assert_eq!(f.hits(), hits);
    let ranges = f.ranges();
    for (i, then) in old.into_iter().enumerate() {
        let now = f.get(&format!("m{i:02}")).await.unwrap();
        assert_eq!(now, then, "a move keeps value and revisions");
        assert_eq!(now.0, format!("v{i}"));
    }
    assert_eq!(f.ranges(), ranges, "after the move: from the cache");
    assert_eq!(f.hits(), hits + 40);
}

#[tokio::test]
async fn after_an_unknown_outcome_reads_go_to_the_shard_until_it_is_reconciled() {
    let f = Fixture::open(1, 0).await;
    let r1 = f.put("a", "1").await.unwrap();
    f.shard("s0").fail_next(Call::Txn, Fault::UnknownOutcome);
    f.put("b", "2").await.unwrap_err();
    let ranges = f.ranges();
    assert_eq!(f.get("a").await, Some(("1".into(), r1)));
    assert_eq!(
        f.get("b").await,
        None,
        "not announced before reconciliation"
    );
    assert_eq!(f.ranges(), ranges + 2, "both from the shard");
    // The next write reconciles first; then the cache answers again.
    f.put("c", "3").await.unwrap();
    let (ranges, hits) = (f.ranges(), f.hits());
    assert_eq!(f.get("a").await, Some(("1".into(), r1)));
    assert_eq!((f.ranges(), f.hits()), (ranges, hits + 1));
    assert_eq!(f.get("b").await.unwrap().0, "2", "reconciled: announced");
}

#[tokio::test]
async fn eviction_keeps_the_bound_and_only_sends_reads_to_the_shard() {
    let value = "x".repeat(100);
    let per_entry = ENTRY_OVERHEAD + "e00".len() + value.len();
    let bound = 10 * per_entry;
    let f = open_with(
        1,
        StoreConfig {
            value_cache_bytes: bound,
            ..Default::default()
        },
    )
    .await;
    let mut revisions = Vec::new();
    for i in 0..50 {
        revisions.push(
            f.put(&format!("e{i:02}"), &format!("{value}{i}"))
                .await
                .unwrap(),
        );
        assert!(f.store.values.size().0 <= bound);
    }
    let ranges = f.ranges();
    for round in 0..2 {
        for (i, revision) in revisions.iter().enumerate() {
            let read = f.get(&format!("e{i:02}")).await;
            assert_eq!(
                read,
                Some((format!("{value}{i}"), *revision)),
                "round {round}"
            );
            let (bytes, entries) = f.store.values.size();
            assert!(bytes <= bound, "{bytes} bytes in the cache");
            assert!(entries <= 10);
        }
    }
    assert!(
        f.ranges() > ranges + 40,
        "most reads missed and read the shard"
    );
    let off = open_with(
        1,
        StoreConfig {
            value_cache_bytes: 0,
            ..Default::default()
        },
    )
    .await;
    let r = off.put("k", "v").await.unwrap();
    let ranges = off.ranges();
    assert_eq!(off.get("k").await, Some(("v".into(), r)));
    assert_eq!(off.ranges(), ranges + 1, "0 turns the cache off");
    assert_eq!(off.store.values.size(), (0, 0));
}

fn txn(compare: Vec<Compare>, success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
    TxnRequest {
        compare,
        success,
        failure,
    }
}

fn range_kv(answer: &TxnResponse) -> Option<(String, i64)> {
    match &answer.responses[0].response {
        Some(Response::ResponseRange(range)) => range.kvs.first().map(|kv| {
            (
                String::from_utf8_lossy(&kv.value).into_owned(),
                kv.mod_revision,
            )
        }),
        other => panic!("not a range answer: {other:?}"),
    }
}

#[tokio::test]
async fn a_txns_failure_branch_read_and_value_compares_use_the_cache() {
    let f = Fixture::open(1, 0).await;
    let r1 = f.put("k", "v1").await.unwrap();
    let s0 = f.shard("s0").clone();
    let (ranges, txns) = (f.ranges(), s0.txn_count());
    // kube-apiserver's update: If ModRevision(k) == stale Then Put Else Get.
    let stale = txn(
        vec![compare(
            "k",
            CompareTarget::Mod,
            TargetUnion::ModRevision(r1 - 1),
        )],
        vec![put_op("k", "lost")],
        vec![get_op("k")],
    );
    let answer = f.store.txn(stale.clone()).await.unwrap();
    assert!(!answer.succeeded);
    assert_eq!(range_kv(&answer), Some(("v1".into(), r1)));
    assert_eq!(answer.header.unwrap().revision, r1);
    assert_eq!(
        (f.ranges(), s0.txn_count()),
        (ranges, txns),
        "no shard round trip"
    );
    // A missing key's read is answered from the index (exact under the write lock).
    let missing = f
        .store
        .txn(txn(Vec::new(), vec![get_op("nothing")], Vec::new()))
        .await
        .unwrap();
    assert_eq!(range_kv(&missing), None);
    // A value compare reads the cache, then the write goes to the shard.
    let by_value = txn(
        vec![compare(
            "k",
            CompareTarget::Value,
            TargetUnion::Value("v1".into()),
        )],
        vec![put_op("k", "v2")],
        Vec::new(),
    );
    assert!(f.store.txn(by_value).await.unwrap().succeeded);
    assert_eq!(f.ranges(), ranges, "the compare did not read the shard");
    let r2 = f.get("k").await.unwrap().1;
    let answer = f.store.txn(stale).await.unwrap();
    assert_eq!(range_kv(&answer), Some(("v2".into(), r2)));
    assert_eq!(f.ranges(), ranges);
}

#[tokio::test]
async fn a_router_past_its_tenure_or_deposed_reads_the_shard() {
    let deposed = Arc::new(AtomicBool::new(false));
    let tenure = Arc::new(Tenure::new(Instant::now(), Duration::from_secs(60)));
    let f = open_with(
        1,
        StoreConfig {
            fencing: Some(Fencing {
                epoch: 1,
                deposed: deposed.clone(),
                tenure: tenure.clone(),
            }),
            ..Default::default()
        },
    )
    .await;
    let r1 = f.put("a", "1").await.unwrap();
    let (ranges, hits) = (f.ranges(), f.hits());
    assert_eq!(f.get("a").await, Some(("1".into(), r1)));
    assert_eq!(
        (f.ranges(), f.hits()),
        (ranges, hits + 1),
        "leading: cached"
    );
    // The renew deadline passed without a renewal.
    tenure.end();
    assert_eq!(f.get("a").await, Some(("1".into(), r1)));
    assert_eq!(
        (f.ranges(), f.hits()),
        (ranges + 1, hits + 1),
        "past its tenure"
    );
    // Renewed, but a shard's fence showed a newer leader.
    tenure.renewed_at(Instant::now());
    assert_eq!(f.get("a").await, Some(("1".into(), r1)));
    assert_eq!(f.hits(), hits + 2, "renewed: cached again");
    deposed.store(true, Ordering::Release);
    assert_eq!(f.get("a").await, Some(("1".into(), r1)));
    assert_eq!((f.ranges(), f.hits()), (ranges + 2, hits + 2), "deposed");
}
