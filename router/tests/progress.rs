//! Watch progress requests under load. kube-apiserver's consistent reads
//! trust this: once a stream answers `RequestProgress` with revision R, it has
//! already sent every event at or below R. Several streams at once — some
//! watching from now, some replaying thousands of past events — get a
//! `ProgressRequest` every few milliseconds while clients write; on each
//! stream no event at or below R may arrive after a progress notification
//! with R, events only go up, and every watch receives exactly the
//! acknowledged writes in its range. The same check runs against a plain
//! etcd, which must pass it too — for what etcd promises: on a stream with
//! several watchers, etcd 3.6 can still send a progress notification ahead of
//! a lagging watcher's events (etcd-io/etcd#15220, #17557, #20242), so on etcd
//! that ordering is checked on one-watcher streams only (kube-apiserver opens
//! one watcher per stream), and overtakes on the shared stream are counted and
//! printed. The router promises the ordering on every stream.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ste_etcd_proto::mvccpb::event::EventType;
use ste_etcd_proto::pb::{
    kv_client::KvClient, watch_client::WatchClient, watch_request::RequestUnion,
    DeleteRangeRequest, PutRequest, RequestOp, TxnRequest, WatchCreateRequest,
    WatchProgressRequest, WatchRequest, WatchResponse,
};
use ste_testkit::{shapes, shard_specs, start_shards, wait_until, Etcd, Router};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const PREFIX: &[u8] = b"/registry/pods/";
const PREFIX_END: &[u8] = b"/registry/pods0";
const SENTINEL: &[u8] = b"/registry/pods/zz-sentinel";
/// Writes before the streams open (what the catching-up watches replay).
const PRELOAD: usize = 3000;
const WRITERS: usize = 4;
/// Writes per writer while the streams get progress requests.
const WRITES: usize = 300;
/// Between two progress requests on one stream.
const PROGRESS_EVERY: Duration = Duration::from_millis(3);

/// One acknowledged write: (revision, key, put?).
type Write = (i64, Bytes, bool);

/// Keys of writer `w`.
fn key(w: usize, i: usize) -> Bytes {
    Bytes::from(format!("/registry/pods/w{w}/pod-{i:03}"))
}

/// Puts `PRELOAD` values (updates of 100 keys per writer), concurrently.
async fn preload(kv: &KvClient<Channel>) -> Vec<Write> {
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let mut kv = kv.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..PRELOAD / WRITERS {
                    let k = key(w, i % 100);
                    let answer = kv
                        .put(PutRequest {
                            key: k.clone(),
                            value: Bytes::from(format!("pre-{i}")),
                            ..Default::default()
                        })
                        .await
                        .expect("preload put")
                        .into_inner();
                    acked.push((answer.header.unwrap().revision, k, true));
                }
                acked
            })
        })
        .collect();
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.unwrap());
    }
    acked
}

/// Clients creating, updating and deleting their keys with kube-apiserver's
/// Txn shapes until each has `WRITES` acknowledged writes.
async fn write(kv: &KvClient<Channel>, seed: u64) -> Vec<Write> {
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let mut kv = kv.clone();
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed + w as u64);
                let mut mods: BTreeMap<Bytes, i64> = BTreeMap::new();
                let mut acked = Vec::new();
                let mut n = 0;
                while acked.len() < WRITES {
                    n += 1;
                    assert!(n < WRITES * 10, "writer {w}: too many conflicts");
                    let k = key(w, 100 + rng.random_range(0..40));
                    let known = mods.get(&k).copied().unwrap_or(0);
                    let delete = known != 0 && rng.random_bool(0.3);
                    let request = if delete {
                        TxnRequest {
                            compare: vec![shapes::mod_revision_is(&k, known)],
                            success: vec![RequestOp {
                                request: Some(
                                    ste_etcd_proto::pb::request_op::Request::RequestDeleteRange(
                                        DeleteRangeRequest {
                                            key: k.clone(),
                                            ..Default::default()
                                        },
                                    ),
                                ),
                            }],
                            failure: vec![shapes::get(&k)],
                        }
                    } else {
                        shapes::update(&k, known, &Bytes::from(format!("v{w}-{n}")))
                    };
                    let answer = kv.txn(request).await.expect("write").into_inner();
                    assert!(
                        answer.succeeded,
                        "writer {w}: only this writer writes {k:?}"
                    );
                    let revision = answer.header.unwrap().revision;
                    mods.insert(k.clone(), if delete { 0 } else { revision });
                    acked.push((revision, k, !delete));
                }
                acked
            })
        })
        .collect();
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.unwrap());
    }
    acked
}

/// One watch stream: what it received in order, and how to ask it for more.
struct Stream {
    name: &'static str,
    requests: mpsc::Sender<WatchRequest>,
    received: Arc<Mutex<Vec<WatchResponse>>>,
    /// watch id -> (start revision as asked, key, range end)
    watches: BTreeMap<i64, (i64, Bytes, Bytes)>,
    progress_sent: Arc<AtomicUsize>,
}

fn open_stream(channel: Channel, name: &'static str) -> Stream {
    let (requests, rx) = mpsc::channel(16);
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = received.clone();
    // etcd sends the response headers with its first message: the call
    // completes only once a watch was asked for.
    tokio::spawn(async move {
        let mut inbound = WatchClient::new(channel)
            .watch(ReceiverStream::new(rx))
            .await
            .expect("watch")
            .into_inner();
        while let Ok(Some(response)) = inbound.message().await {
            sink.lock().unwrap().push(response);
        }
    });
    Stream {
        name,
        requests,
        received,
        watches: BTreeMap::new(),
        progress_sent: Arc::new(AtomicUsize::new(0)),
    }
}

impl Stream {
    /// Adds a watch and waits for its `created` answer (its id and header revision).
    async fn watch(&mut self, start_revision: i64, key: &[u8], range_end: &[u8], prev_kv: bool) {
        let id = self.watches.len() as i64 + 1;
        let create = WatchCreateRequest {
            key: Bytes::copy_from_slice(key),
            range_end: Bytes::copy_from_slice(range_end),
            start_revision,
            prev_kv,
            watch_id: id,
            ..Default::default()
        };
        self.requests
            .send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(create)),
            })
            .await
            .unwrap();
        let received = self.received.clone();
        wait_until("the watch to be created", Duration::from_secs(10), || {
            let received = received.clone();
            async move {
                received
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|r| r.created && r.watch_id == id)
            }
        })
        .await;
        let created = self
            .received
            .lock()
            .unwrap()
            .iter()
            .find(|r| r.created && r.watch_id == id)
            .cloned()
            .unwrap();
        assert!(
            !created.canceled,
            "{}: watch {id} was refused: {}",
            self.name, created.cancel_reason
        );
        // From 0: from the revision after the one the stream had when it was created.
        let start = if start_revision == 0 {
            created.header.unwrap().revision + 1
        } else {
            start_revision
        };
        self.watches.insert(
            id,
            (
                start,
                Bytes::copy_from_slice(key),
                Bytes::copy_from_slice(range_end),
            ),
        );
    }

    /// Sends a progress request every `PROGRESS_EVERY` until `stop`.
    fn keep_requesting_progress(&self, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
        let (requests, sent) = (self.requests.clone(), self.progress_sent.clone());
        tokio::spawn(async move {
            // Bounded: at most ~3 minutes of requests even if nobody stops it.
            for _ in 0..60_000 {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let request = WatchRequest {
                    request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
                };
                if requests.send(request).await.is_err() {
                    return;
                }
                sent.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(PROGRESS_EVERY).await;
            }
        })
    }

    fn has_seen_sentinel(&self) -> bool {
        let received = self.received.lock().unwrap();
        self.watches.keys().all(|id| {
            received.iter().any(|r| {
                r.watch_id == *id
                    && r.events
                        .iter()
                        .any(|e| e.kv.as_ref().is_some_and(|kv| kv.key == SENTINEL))
            })
        })
    }

    /// The checks; returns the number of progress notifications received.
    /// Without `ordering_promised`, events overtaken by a notification are
    /// counted and printed instead of failing the test.
    fn check(&self, acked: &[Write], end: i64, side: &str, ordering_promised: bool) -> usize {
        let received = self.received.lock().unwrap().clone();
        let name = format!("{side} stream {}", self.name);
        // A notification covers the watches created before it on the stream
        // (one created later from an old revision replays older events).
        let mut progress_at: BTreeMap<i64, i64> = BTreeMap::new();
        let mut last_notification = 0i64;
        let mut notifications = 0;
        let mut events_after_a_notification = 0;
        let mut overtaken = 0;
        let mut got: BTreeMap<i64, Vec<Write>> = BTreeMap::new();
        for response in &received {
            assert!(
                !response.canceled,
                "{name}: watch {} canceled: {}",
                response.watch_id, response.cancel_reason
            );
            if response.created {
                progress_at.insert(response.watch_id, 0);
                continue;
            }
            let header = response.header.as_ref().map(|h| h.revision).unwrap_or(0);
            if response.events.is_empty() {
                // A progress notification: everything at or below `header` was sent.
                assert!(
                    header >= last_notification,
                    "{name}: progress went back from {last_notification} to {header}"
                );
                last_notification = header;
                progress_at.values_mut().for_each(|at| *at = header);
                notifications += 1;
                continue;
            }
            let covered = progress_at.get(&response.watch_id).copied().unwrap_or(0);
            for event in &response.events {
                let kv = event.kv.as_ref().expect("event kv");
                if !ordering_promised && kv.mod_revision <= covered {
                    overtaken += 1;
                }
                assert!(
                    !ordering_promised || kv.mod_revision > covered,
                    "{name}: watch {} got an event at revision {} ({:?}) after a progress notification with revision {covered}",
                    response.watch_id,
                    kv.mod_revision,
                    kv.key
                );
                assert!(
                    kv.mod_revision <= header,
                    "{name}: an event at {} in a response with header {header}",
                    kv.mod_revision
                );
                if covered > 0 {
                    events_after_a_notification += 1;
                }
                got.entry(response.watch_id).or_default().push((
                    kv.mod_revision,
                    kv.key.clone(),
                    event.r#type == EventType::Put as i32,
                ));
            }
        }
        for (id, (start, key, range_end)) in &self.watches {
            let events: Vec<Write> = got
                .remove(id)
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, k, _)| k.as_ref() != SENTINEL)
                .collect();
            for pair in events.windows(2) {
                assert!(
                    pair[0].0 < pair[1].0,
                    "{name}: watch {id} revisions did not go up: {pair:?}"
                );
            }
            let mut expected: Vec<Write> = acked
                .iter()
                .filter(|(revision, k, _)| {
                    *revision >= *start && *revision < end && k >= key && k < range_end
                })
                .cloned()
                .collect();
            expected.sort();
            assert!(
                expected.len() > 100,
                "{name}: watch {id} from {start} expects only {} events",
                expected.len()
            );
            if events != expected {
                let missing: Vec<_> = expected
                    .iter()
                    .filter(|e| !events.contains(e))
                    .take(5)
                    .collect();
                let extra: Vec<_> = events
                    .iter()
                    .filter(|e| !expected.contains(e))
                    .take(5)
                    .collect();
                panic!(
                    "{name}: watch {id} from {start} received {} events, expected {}; missing e.g. {missing:?}; unexpected e.g. {extra:?}",
                    events.len(),
                    expected.len()
                );
            }
        }
        assert!(
            notifications > 0,
            "{name}: no progress notification arrived ({} requested)",
            self.progress_sent.load(Ordering::SeqCst)
        );
        assert!(
            events_after_a_notification > 0,
            "{name}: every event came before the first progress notification"
        );
        if overtaken > 0 {
            eprintln!(
                "{name}: {overtaken} events arrived after a progress notification covering them \
                 ({} watchers on the stream; not promised there)",
                self.watches.len()
            );
        }
        notifications
    }
}

/// The whole scenario against one etcd API endpoint (the router or etcd).
/// `every_stream_ordered`: whether progress may never overtake events on a
/// stream with several watchers too (the router) or only on one-watcher
/// streams (etcd).
async fn progress_under_load(channel: Channel, side: &str, every_stream_ordered: bool) {
    let kv = KvClient::new(channel.clone());
    let started = Instant::now();
    let mut acked = preload(&kv).await;
    let first = acked.iter().map(|w| w.0).min().unwrap();
    let middle = {
        let mut revisions: Vec<i64> = acked.iter().map(|w| w.0).collect();
        revisions.sort();
        revisions[revisions.len() / 2]
    };

    // Streams watching from now, opened before the writers start.
    let mut from_now = open_stream(channel.clone(), "from-now");
    from_now.watch(0, PREFIX, PREFIX_END, false).await;
    let mut mixed = open_stream(channel.clone(), "mixed");
    mixed.watch(0, PREFIX, PREFIX_END, true).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = vec![
        from_now.keep_requesting_progress(stop.clone()),
        mixed.keep_requesting_progress(stop.clone()),
    ];

    let writing = {
        let kv = kv.clone();
        tokio::spawn(async move { write(&kv, 5).await })
    };
    // Streams replaying thousands of past events, opened while the writers
    // run and the other streams get progress requests.
    let mut replay = open_stream(channel.clone(), "replay-all");
    senders.push(replay.keep_requesting_progress(stop.clone()));
    replay.watch(first, PREFIX, PREFIX_END, true).await;
    let mut replay_part = open_stream(channel.clone(), "replay-part");
    senders.push(replay_part.keep_requesting_progress(stop.clone()));
    // Writers 2 and 3 and the last write.
    replay_part
        .watch(first, b"/registry/pods/w2/", PREFIX_END, false)
        .await;
    // A second watch on a stream already in use, replaying from the middle.
    mixed.watch(middle, PREFIX, PREFIX_END, false).await;

    acked.extend(writing.await.unwrap());
    let end = KvClient::new(channel.clone())
        .put(PutRequest {
            key: Bytes::from_static(SENTINEL),
            value: Bytes::from_static(b"end"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    let streams = [&from_now, &mixed, &replay, &replay_part];
    wait_until(
        "every watch to receive the last write",
        Duration::from_secs(30),
        || async { streams.iter().all(|s| s.has_seen_sentinel()) },
    )
    .await;
    // A few more progress answers after the last event, then stop asking.
    tokio::time::sleep(PROGRESS_EVERY * 10).await;
    stop.store(true, Ordering::SeqCst);
    for sender in senders {
        sender.await.unwrap();
    }
    let mut notifications = 0;
    for stream in streams {
        let ordering_promised = every_stream_ordered || stream.watches.len() == 1;
        notifications += stream.check(&acked, end, side, ordering_promised);
    }
    let requested: usize = streams
        .iter()
        .map(|s| s.progress_sent.load(Ordering::SeqCst))
        .sum();
    eprintln!(
        "{side}: {} writes, {requested} progress requests, {notifications} progress notifications on 4 streams, {:.1?}",
        acked.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_requests_never_overtake_events_through_the_router() {
    let shards = start_shards(3).await.unwrap();
    let router = Router::start(shard_specs(&shards)).await.unwrap();
    progress_under_load(router.channel().await.unwrap(), "router", true).await;
    router.stop().await.unwrap();
}

/// The same check against a plain etcd, for what etcd promises: ordering on
/// one-watcher streams, completeness and monotonic revisions everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_requests_never_overtake_events_on_etcd() {
    let etcd = Etcd::start_with("reference", &["--unsafe-no-fsync"])
        .await
        .unwrap();
    let channel = Channel::from_shared(etcd.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    progress_under_load(channel, "etcd", false).await;
}

/// The check itself refuses what it must: an event at or below the revision
/// of a progress notification that came before it on the stream, and
/// events that go back. (No server: hand-made responses.)
#[test]
fn the_check_refuses_an_event_overtaken_by_a_progress_notification() {
    use ste_etcd_proto::mvccpb::{Event, KeyValue};
    use ste_etcd_proto::pb::ResponseHeader;
    let response = |watch_id: i64, header: i64, created: bool, revisions: &[i64]| WatchResponse {
        header: Some(ResponseHeader {
            revision: header,
            ..Default::default()
        }),
        watch_id,
        created,
        events: revisions
            .iter()
            .map(|r| Event {
                kv: Some(KeyValue {
                    key: key(0, *r as usize),
                    mod_revision: *r,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let acked: Vec<Write> = (10..=200).map(|r| (r, key(0, r as usize), true)).collect();
    let stream_with = |responses: Vec<WatchResponse>, ordering_promised: bool| {
        let (requests, _) = mpsc::channel(1);
        let mut watches = BTreeMap::new();
        watches.insert(
            1,
            (
                10,
                Bytes::from_static(PREFIX),
                Bytes::from_static(PREFIX_END),
            ),
        );
        let stream = Stream {
            name: "hand-made",
            requests,
            received: Arc::new(Mutex::new(responses)),
            watches,
            progress_sent: Arc::new(AtomicUsize::new(1)),
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            stream.check(&acked, 201, "test", ordering_promised)
        }))
    };
    let stream = |responses: Vec<WatchResponse>| stream_with(responses, true);
    let all: Vec<i64> = (10..=200).collect();
    // In order: events up to 100, progress 100, the rest.
    let good = vec![
        response(1, 9, true, &[]),
        response(1, 100, false, &all[..91]),
        response(-1, 100, false, &[]),
        response(1, 200, false, &all[91..]),
    ];
    assert_eq!(stream(good).ok(), Some(1));
    // Progress 100 answered before the event at 100.
    let overtaken = vec![
        response(1, 9, true, &[]),
        response(1, 99, false, &all[..90]),
        response(-1, 100, false, &[]),
        response(1, 200, false, &all[90..]),
    ];
    assert!(stream(overtaken.clone()).is_err());
    // Where the ordering is not promised (etcd's shared streams) it is counted, not refused.
    assert_eq!(stream_with(overtaken, false).ok(), Some(1));
    // A revision delivered twice.
    let repeated = vec![
        response(1, 9, true, &[]),
        response(-1, 9, false, &[]),
        response(1, 100, false, &all[..91]),
        response(1, 200, false, &all[90..]),
        response(-1, 200, false, &[]),
    ];
    assert!(stream(repeated).is_err());
}
