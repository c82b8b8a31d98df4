//! Every read is an exact snapshot at its header revision, while writers,
//! Lists and watches run together. kube-apiserver lists (first page at
//! revision 0, the next pages at the first page's header revision), then
//! watches from that header: a header ahead of the data it came with would
//! hide the writes in between from its watch cache forever. Each read is
//! compared with the state rebuilt from a watch at the read's header
//! revision; the same check runs against plain etcd, which must pass it too
//! (so the check itself is right).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use ste_etcd_proto::mvccpb::event::EventType;
use ste_etcd_proto::pb::{
    kv_client::KvClient, request_op::Request, watch_client::WatchClient,
    watch_request::RequestUnion, PutRequest, RangeRequest, TxnRequest, WatchCreateRequest,
    WatchRequest,
};
use ste_testkit::{shapes, shard_specs, start_shards, Etcd, Router};
use tokio::sync::{mpsc, Mutex};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const PREFIX: &[u8] = b"/registry/pods/";
const PREFIX_END: &[u8] = b"/registry/pods0";
const WRITERS: usize = 4;
const OPS_PER_WRITER: usize = 250;
const KEYS_PER_WRITER: usize = 40;
const PAGE: i64 = 9;

/// (value, mod revision, create revision, version)
type Stored = (Bytes, i64, i64, i64);

/// What one read answered, at its header revision.
#[derive(Debug)]
enum Read {
    /// A full List (one call, or pages at the first page's revision).
    List {
        paged: bool,
        items: BTreeMap<Bytes, Stored>,
        count: i64,
    },
    /// count_only at revision 0.
    Count(i64),
    /// keys_only at revision 0.
    Keys(Vec<Bytes>),
    /// A single key at revision 0.
    Get(Bytes, Option<Stored>),
}

fn stored(kv: &ste_etcd_proto::mvccpb::KeyValue) -> Stored {
    (
        kv.value.clone(),
        kv.mod_revision,
        kv.create_revision,
        kv.version,
    )
}

fn prefix_request() -> RangeRequest {
    RangeRequest {
        key: Bytes::from_static(PREFIX),
        range_end: Bytes::from_static(PREFIX_END),
        ..Default::default()
    }
}

fn next_key(last: &[u8]) -> Bytes {
    let mut next = last.to_vec();
    next.push(0);
    Bytes::from(next)
}

fn key(writer: usize, i: usize) -> Bytes {
    Bytes::from(format!("/registry/pods/ns{writer}/pod-{i:03}"))
}

/// Creates, updates and deletes its own keys with kube-apiserver's shapes.
async fn writer(mut kv: KvClient<Channel>, writer: usize, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut revisions: BTreeMap<Bytes, i64> = BTreeMap::new();
    for op in 0..OPS_PER_WRITER {
        let key = key(writer, rng.random_range(0..KEYS_PER_WRITER));
        let value = Bytes::from(format!("w{writer}-op{op}"));
        let request = match revisions.get(&key) {
            None => shapes::create(&key, &value),
            Some(&revision) if rng.random_bool(0.25) => shapes::delete(&key, revision),
            Some(&revision) => shapes::update(&key, revision, &value),
        };
        let deleting = matches!(
            request.success[0].request,
            Some(Request::RequestDeleteRange(_))
        );
        let answer = kv.txn(request).await.expect("write").into_inner();
        assert!(
            answer.succeeded,
            "writer {writer} owns {key:?}: its compare must hold"
        );
        let revision = answer.header.expect("header").revision;
        if deleting {
            revisions.remove(&key);
        } else {
            revisions.insert(key, revision);
        }
    }
}

/// One read of each kind in turn, recorded with its header revision.
async fn reader(mut kv: KvClient<Channel>, stop: Arc<AtomicBool>, seed: u64) -> Vec<(i64, Read)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut reads = Vec::new();
    let mut turn = 0usize;
    while !stop.load(Ordering::Acquire) {
        turn += 1;
        let read = match turn % 5 {
            0 => {
                // kube-apiserver's paginated List.
                let first = kv
                    .range(RangeRequest {
                        limit: PAGE,
                        ..prefix_request()
                    })
                    .await
                    .expect("page")
                    .into_inner();
                let revision = first.header.expect("header").revision;
                let count = first.count;
                let mut items: BTreeMap<Bytes, Stored> = first
                    .kvs
                    .iter()
                    .map(|kv| (kv.key.clone(), stored(kv)))
                    .collect();
                let mut more = first.more;
                let mut last = first.kvs.last().map(|kv| kv.key.clone());
                while more {
                    let from = next_key(last.as_ref().expect("a page with more has keys"));
                    let page = kv
                        .range(RangeRequest {
                            key: from,
                            limit: PAGE,
                            revision,
                            ..prefix_request()
                        })
                        .await
                        .expect("next page at the first page's revision")
                        .into_inner();
                    items.extend(page.kvs.iter().map(|kv| (kv.key.clone(), stored(kv))));
                    more = page.more;
                    last = page.kvs.last().map(|kv| kv.key.clone());
                }
                (
                    revision,
                    Read::List {
                        paged: true,
                        items,
                        count,
                    },
                )
            }
            1 | 2 => {
                let all = kv.range(prefix_request()).await.expect("list").into_inner();
                let items = all
                    .kvs
                    .iter()
                    .map(|kv| (kv.key.clone(), stored(kv)))
                    .collect();
                (
                    all.header.expect("header").revision,
                    Read::List {
                        paged: false,
                        items,
                        count: all.count,
                    },
                )
            }
            3 => {
                let counted = kv
                    .range(RangeRequest {
                        count_only: true,
                        ..prefix_request()
                    })
                    .await
                    .expect("count")
                    .into_inner();
                let keys = kv
                    .range(RangeRequest {
                        keys_only: true,
                        ..prefix_request()
                    })
                    .await
                    .expect("keys")
                    .into_inner();
                reads.push((
                    counted.header.expect("header").revision,
                    Read::Count(counted.count),
                ));
                let listed = keys.kvs.iter().map(|kv| kv.key.clone()).collect();
                (keys.header.expect("header").revision, Read::Keys(listed))
            }
            _ => {
                let key = key(
                    rng.random_range(0..WRITERS),
                    rng.random_range(0..KEYS_PER_WRITER),
                );
                let got = kv
                    .range(RangeRequest {
                        key: key.clone(),
                        ..Default::default()
                    })
                    .await
                    .expect("get")
                    .into_inner();
                (
                    got.header.expect("header").revision,
                    Read::Get(key, got.kvs.first().map(stored)),
                )
            }
        };
        reads.push(read);
    }
    reads
}

/// Every event under the prefix after `start`, until `until` was delivered.
async fn watch_from(
    channel: Channel,
    start: i64,
) -> (
    mpsc::Sender<WatchRequest>,
    tonic::Streaming<ste_etcd_proto::pb::WatchResponse>,
) {
    let (tx, rx) = mpsc::channel(1);
    tx.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            start_revision: start + 1,
            ..WatchCreateRequest {
                key: Bytes::from_static(PREFIX),
                range_end: Bytes::from_static(PREFIX_END),
                ..Default::default()
            }
        })),
    })
    .await
    .unwrap();
    let mut stream = WatchClient::new(channel)
        .watch(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().unwrap().created);
    (tx, stream)
}

/// Runs writers, readers and a watch against `channel`; returns the number
/// of reads checked and the descriptions of those that were not exact.
async fn run(channel: Channel, seed: u64) -> (usize, Vec<String>) {
    let mut kv = KvClient::new(channel.clone());
    // The known start: nothing under the prefix, and the watch begins right after it.
    let start = kv.range(prefix_request()).await.unwrap().into_inner();
    assert_eq!(start.count, 0, "the prefix starts empty");
    let start = start.header.unwrap().revision;
    let (_watch_requests, mut stream) = watch_from(channel.clone(), start).await;
    let events = Arc::new(Mutex::new(Vec::<(i64, Bytes, Option<Stored>)>::new()));
    let collector = tokio::spawn({
        let events = events.clone();
        async move {
            while let Ok(Some(response)) = stream.message().await {
                let mut events = events.lock().await;
                for event in response.events {
                    let kv = event.kv.expect("event kv");
                    let value = (event.r#type == EventType::Put as i32).then(|| stored(&kv));
                    events.push((kv.mod_revision, kv.key, value));
                }
            }
        }
    });

    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|r| tokio::spawn(reader(kv.clone(), stop.clone(), seed + 100 + r)))
        .collect();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(writer(kv.clone(), w, seed + w as u64)))
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    stop.store(true, Ordering::Release);
    let mut reads = Vec::new();
    for r in readers {
        reads.extend(r.await.unwrap());
    }
    let end = kv
        .range(prefix_request())
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    // The watch has delivered everything up to the last write.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let last = events.lock().await.last().map(|e| e.0).unwrap_or(start);
        if last >= end {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "watch stuck at {last}, writes reached {end}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    collector.abort();
    let events = events.lock().await.clone();
    assert!(
        events.windows(2).all(|w| w[0].0 <= w[1].0),
        "watch events out of revision order"
    );
    assert!(
        events.len() >= WRITERS * OPS_PER_WRITER,
        "the watch saw {} events for {} writes",
        events.len(),
        WRITERS * OPS_PER_WRITER
    );

    // Replay the watch, checking each read at its header revision.
    reads.sort_by_key(|(revision, _)| *revision);
    let mut state: BTreeMap<Bytes, Stored> = BTreeMap::new();
    let mut next = 0;
    let mut wrong = Vec::new();
    for (revision, read) in &reads {
        assert!(
            *revision >= start && *revision <= end,
            "header {revision} outside [{start}, {end}]"
        );
        while next < events.len() && events[next].0 <= *revision {
            let (_, key, value) = &events[next];
            match value {
                Some(value) => state.insert(key.clone(), value.clone()),
                None => state.remove(key),
            };
            next += 1;
        }
        let exact = match read {
            Read::List { items, count, .. } => *items == state && *count as usize == state.len(),
            Read::Count(count) => *count as usize == state.len(),
            Read::Keys(keys) => keys.iter().eq(state.keys()),
            Read::Get(key, got) => got.as_ref() == state.get(key),
        };
        if !exact {
            let what = match read {
                Read::List {
                    paged,
                    items,
                    count,
                } => {
                    let missing: Vec<_> = state
                        .keys()
                        .filter(|k| !items.contains_key(*k))
                        .take(3)
                        .collect();
                    let differing: Vec<_> = items
                        .iter()
                        .filter(|(k, v)| state.get(*k) != Some(v))
                        .map(|(k, _)| k)
                        .take(3)
                        .collect();
                    format!("{} List at {revision}: {} items (count {count}), snapshot has {}; missing {missing:?}, differing {differing:?}",
                        if *paged { "paged" } else { "whole" }, items.len(), state.len())
                }
                Read::Count(count) => {
                    format!("count at {revision}: {count}, snapshot has {}", state.len())
                }
                Read::Keys(keys) => format!(
                    "keys-only at {revision}: {} keys, snapshot has {}",
                    keys.len(),
                    state.len()
                ),
                Read::Get(key, got) => format!(
                    "get {key:?} at {revision}: {got:?}, snapshot has {:?}",
                    state.get(key)
                ),
            };
            wrong.push(what);
        }
    }
    // The reads really raced the writes: their headers are spread over the run.
    let distinct: std::collections::BTreeSet<i64> = reads.iter().map(|(r, _)| *r).collect();
    assert!(
        distinct.len() > 20,
        "reads saw only {} distinct revisions: they did not overlap the writes",
        distinct.len()
    );
    (reads.len(), wrong)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_is_exact_at_its_header_revision_under_concurrent_writes() {
    let shards = start_shards(3).await.unwrap();
    let router = Router::start(shard_specs(&shards)).await.unwrap();
    let (checked, wrong) = run(router.channel().await.unwrap(), 11).await;
    assert!(wrong.is_empty(), "{} of {checked} reads through the router were not the snapshot at their header revision:\n{}", wrong.len(), wrong.join("\n"));
    router.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_etcd_passes_the_same_snapshot_check() {
    let etcd = Etcd::start("plain").await.unwrap();
    let channel = Channel::from_shared(etcd.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (checked, wrong) = run(channel, 11).await;
    assert!(
        wrong.is_empty(),
        "{} of {checked} reads from plain etcd were not exact:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// Read-only txns answer at the revision their reads saw, too (they share a
/// shard Txn with writes queued around them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_txns_answer_at_the_revision_they_read() {
    let shards = start_shards(1).await.unwrap();
    let router = Router::start(shard_specs(&shards)).await.unwrap();
    let kv = KvClient::new(router.channel().await.unwrap());
    let counter = Bytes::from_static(b"/registry/pods/default/counter");
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut kv = kv.clone();
        let counter = counter.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..150 {
                let value = Bytes::from(format!("{w}-{i}"));
                kv.put(PutRequest {
                    key: counter.clone(),
                    value,
                    ..Default::default()
                })
                .await
                .unwrap();
            }
        }));
    }
    let mut checked = 0;
    let mut kv_reader = kv.clone();
    let mut stale = Vec::new();
    while !writers.iter().all(|w| w.is_finished()) {
        let read = TxnRequest {
            success: vec![shapes::get(&counter)],
            ..Default::default()
        };
        let answer = kv_reader.txn(read).await.unwrap().into_inner();
        let header = answer.header.unwrap().revision;
        let Some(ste_etcd_proto::pb::response_op::Response::ResponseRange(range)) =
            answer.responses[0].response.clone()
        else {
            panic!("a Range answer")
        };
        let Some(seen) = range.kvs.first() else {
            continue;
        };
        // The value read must be the one current at the header revision.
        let at = kv_reader
            .range(RangeRequest {
                key: counter.clone(),
                revision: header,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if at.kvs.first().map(|kv| kv.mod_revision) != Some(seen.mod_revision) {
            stale.push((
                header,
                seen.mod_revision,
                at.kvs.first().map(|kv| kv.mod_revision),
            ));
        }
        checked += 1;
    }
    for w in writers {
        w.await.unwrap();
    }
    assert!(checked > 20, "only {checked} reads overlapped the writes");
    assert!(stale.is_empty(), "{} of {checked} read-only txns had a header ahead of their data (header, read, current at header): {stale:?}", stale.len());
    router.stop().await.unwrap();
}
