//! Shards joining, draining and dying while clients write and watch, with
//! real etcd processes. After each change the router's contents, its watch
//! stream, the shards' own contents and an independent record of
//! acknowledged writes must all agree.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use ste_etcd_proto::mvccpb::event::EventType;
use ste_etcd_proto::pb::{
    kv_client::KvClient, request_op::Request, watch_client::WatchClient, watch_request::RequestUnion,
    Compare, DeleteRangeRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchRequest,
};
use ste_testkit::{shapes, shard_specs, start_shards, wait_until, Etcd, Router};
use tokio::sync::{mpsc, Mutex};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const PREFIX: &[u8] = b"/registry/pods/";
const PREFIX_END: &[u8] = b"/registry/pods0";
const WRITERS: usize = 4;
const KEYS_PER_WRITER: usize = 150;

/// One acknowledged write: the revision it got, and the value (None: deleted).
#[derive(Debug, Clone)]
struct Ack {
    revision: i64,
    key: Bytes,
    value: Option<Bytes>,
}

#[derive(Debug, Clone, PartialEq)]
struct Event {
    revision: i64,
    key: Bytes,
    value: Option<Bytes>,
}

async fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let status = answer.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

async fn members(router: &Router) -> serde_json::Value {
    let (status, body) = http(router.admin_addr, "GET", "/shards", "").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

async fn keys_to_move(router: &Router) -> f64 {
    let (_, text) = http(router.admin_addr, "GET", "/metrics", "").await;
    metric(&text, "ste_router_keys_to_move")
}

/// Everything under the prefix: key -> (value, mod revision).
async fn list_at(kv: &mut KvClient<Channel>, revision: i64) -> Result<BTreeMap<Bytes, (Bytes, i64)>, tonic::Status> {
    let answer = kv
        .range(RangeRequest {
            key: Bytes::from_static(PREFIX),
            range_end: Bytes::from_static(PREFIX_END),
            revision,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(answer.kvs.into_iter().map(|kv| (kv.key, (kv.value, kv.mod_revision))).collect())
}

/// Paginated like kube-apiserver (limit 7, same revision for every page).
async fn list_paged(kv: &mut KvClient<Channel>, revision: i64) -> Result<BTreeMap<Bytes, (Bytes, i64)>, tonic::Status> {
    let mut out = BTreeMap::new();
    let mut from = Bytes::from_static(PREFIX);
    loop {
        let answer = kv
            .range(RangeRequest {
                key: from.clone(),
                range_end: Bytes::from_static(PREFIX_END),
                revision,
                limit: 7,
                ..Default::default()
            })
            .await?
            .into_inner();
        let last = answer.kvs.last().map(|kv| kv.key.clone());
        for kv in answer.kvs {
            assert!(out.insert(kv.key.clone(), (kv.value, kv.mod_revision)).is_none(), "a page repeated a key");
        }
        match last {
            Some(last) if answer.more => {
                let mut next = last.to_vec();
                next.push(0);
                from = Bytes::from(next);
            }
            _ => return Ok(out),
        }
    }
}

/// Keys stored directly on one shard.
async fn shard_keys(shard: &Etcd) -> BTreeSet<Bytes> {
    let mut kv = shard.kv().await.unwrap();
    let answer = kv
        .range(RangeRequest {
            key: Bytes::from_static(PREFIX),
            range_end: Bytes::from_static(PREFIX_END),
            keys_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    answer.kvs.into_iter().map(|kv| kv.key).collect()
}

struct Workload {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Ack>>>,
    /// Writes that failed: their outcome is unknown to the client.
    failed: Arc<Mutex<Vec<Bytes>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    events: mpsc::UnboundedReceiver<Result<Vec<Event>, tonic::Status>>,
    start: i64,
}

fn key(writer: usize, i: usize) -> Bytes {
    Bytes::from(format!("/registry/pods/w{writer}/pod-{i:04}"))
}

impl Workload {
    /// Loads `initial` keys per writer, opens a watch, then starts writers
    /// that create, update and delete their own keys with kube-apiserver's
    /// compare-and-swap shapes until stopped.
    async fn start(channel: Channel, initial: usize) -> Workload {
        let mut kv = KvClient::new(channel.clone());
        let acked = Arc::new(Mutex::new(Vec::new()));
        for writer in 0..WRITERS {
            for i in 0..initial {
                let k = key(writer, i);
                let value = Bytes::from(format!("init-{writer}-{i}"));
                let answer = kv.txn(shapes::create(&k, &value)).await.unwrap().into_inner();
                assert!(answer.succeeded);
                acked.lock().await.push(Ack { revision: answer.header.unwrap().revision, key: k, value: Some(value) });
            }
        }
        let start = kv.range(RangeRequest { key: Bytes::from_static(b"/x"), ..Default::default() }).await.unwrap().into_inner().header.unwrap().revision;

        let (req_tx, req_rx) = mpsc::channel(1);
        req_tx.send(WatchRequest { request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: Bytes::from_static(PREFIX), range_end: Bytes::from_static(PREFIX_END), start_revision: start + 1, prev_kv: true, ..Default::default()
        })) }).await.unwrap();
        let mut stream = WatchClient::new(channel.clone()).watch(ReceiverStream::new(req_rx)).await.unwrap().into_inner();
        assert!(stream.message().await.unwrap().unwrap().created);
        let (events_tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _keep_open = req_tx;
            loop {
                match stream.message().await {
                    Ok(Some(response)) => {
                        if response.canceled {
                            let _ = events_tx.send(Err(tonic::Status::cancelled(response.cancel_reason)));
                            return;
                        }
                        let batch = response.events.into_iter().map(|e| {
                            let kv = e.kv.unwrap_or_default();
                            Event { revision: kv.mod_revision, key: kv.key, value: (e.r#type == EventType::Put as i32).then_some(kv.value) }
                        }).collect();
                        if events_tx.send(Ok(batch)).is_err() { return; }
                    }
                    Ok(None) => return,
                    Err(status) => { let _ = events_tx.send(Err(status)); return; }
                }
            }
        });

        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let (mut kv, stop, acked, failed) = (kv.clone(), stop.clone(), acked.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(writer as u64);
                // What this writer believes: key -> mod revision (None: unknown, re-read first).
                let mut known: BTreeMap<Bytes, Option<i64>> = BTreeMap::new();
                for i in 0..KEYS_PER_WRITER {
                    known.insert(key(writer, i), if i < initial { None } else { Some(0) });
                }
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let k = key(writer, rng.random_range(0..KEYS_PER_WRITER));
                    let revision = match known[&k] {
                        Some(revision) => revision,
                        None => match kv.range(RangeRequest { key: k.clone(), ..Default::default() }).await {
                            Ok(answer) => answer.into_inner().kvs.first().map(|kv| kv.mod_revision).unwrap_or(0),
                            Err(_) => { tokio::time::sleep(Duration::from_millis(20)).await; continue; }
                        },
                    };
                    let value = Bytes::from(format!("v{writer}-{n}"));
                    let (request, written) = if revision != 0 && rng.random_bool(0.3) {
                        (TxnRequest {
                            compare: vec![shapes::mod_revision_is(&k, revision)],
                            success: vec![RequestOp { request: Some(Request::RequestDeleteRange(DeleteRangeRequest { key: k.clone(), ..Default::default() })) }],
                            failure: vec![shapes::get(&k)],
                        }, None)
                    } else {
                        (shapes::update(&k, revision, &value), Some(value))
                    };
                    match kv.txn(request).await {
                        Ok(answer) => {
                            let answer = answer.into_inner();
                            if answer.succeeded {
                                let rev = answer.header.unwrap().revision;
                                acked.lock().await.push(Ack { revision: rev, key: k.clone(), value: written.clone() });
                                known.insert(k, Some(if written.is_some() { rev } else { 0 }));
                            } else {
                                // Only this writer writes its keys: a conflict means the shard lost the key.
                                known.insert(k, None);
                            }
                        }
                        Err(_) => {
                            failed.lock().await.push(k.clone());
                            known.insert(k, None);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }));
        }
        Workload { stop, acked, failed, tasks, events, start }
    }

    async fn acked_count(&self) -> usize {
        self.acked.lock().await.len()
    }

    /// Lets the writers run until `more` further writes were acknowledged.
    async fn run_for(&self, more: usize) {
        let target = self.acked_count().await + more;
        let acked = self.acked.clone();
        wait_until("writes to be acknowledged", Duration::from_secs(60), || {
            let acked = acked.clone();
            async move { acked.lock().await.len() >= target }
        })
        .await;
    }

    /// Stops the writers, and collects watch events up to the current revision.
    async fn finish(mut self, kv: &mut KvClient<Channel>) -> (Vec<Ack>, Vec<Bytes>, Vec<Event>, i64) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let sentinel = Bytes::from_static(b"/registry/pods/zz-sentinel");
        let end = kv.txn(shapes::create(&sentinel, &Bytes::from_static(b"end"))).await.unwrap().into_inner().header.unwrap().revision;
        let mut events = Vec::new();
        'collect: loop {
            let batch = tokio::time::timeout(Duration::from_secs(30), self.events.recv())
                .await
                .expect("watch events stopped arriving")
                .expect("watch ended")
                .expect("watch failed");
            for event in batch {
                if event.key == sentinel {
                    break 'collect;
                }
                events.push(event);
            }
        }
        let acked = std::mem::take(&mut *self.acked.lock().await);
        let failed = std::mem::take(&mut *self.failed.lock().await);
        let _ = self.start;
        (acked, failed, events, end)
    }
}

/// The checks every scenario shares. `allowed_extra` decides which events
/// that are not acknowledged writes are acceptable (writes with unknown
/// outcome, and losses).
fn check_history(acked: &[Ack], events: &[Event], allowed_extra: impl Fn(&Event) -> bool) -> BTreeMap<Bytes, Bytes> {
    // Revisions never go back; one revision holds several events only for several keys.
    let mut seen = BTreeSet::new();
    for pair in events.windows(2) {
        assert!(pair[0].revision <= pair[1].revision, "watch revisions went back: {pair:?}");
    }
    for event in events {
        assert!(seen.insert((event.revision, event.key.clone())), "duplicate event {event:?}");
    }
    // Every acknowledged write is in the watch, exactly as acknowledged.
    let by_revision: BTreeMap<(i64, Bytes), &Event> = events.iter().map(|e| ((e.revision, e.key.clone()), e)).collect();
    for ack in acked.iter().filter(|a| !a.key.ends_with(b"sentinel")) {
        let Some(event) = by_revision.get(&(ack.revision, ack.key.clone())) else {
            // Initial loads happened before the watch started.
            continue;
        };
        assert_eq!(event.value, ack.value, "watch disagrees with an acknowledged write at {}", ack.revision);
    }
    let acked_at: BTreeSet<(i64, Bytes)> = acked.iter().map(|a| (a.revision, a.key.clone())).collect();
    let first_watched = events.first().map(|e| e.revision).unwrap_or(i64::MAX);
    for ack in acked.iter().filter(|a| a.revision >= first_watched) {
        assert!(by_revision.contains_key(&(ack.revision, ack.key.clone())), "acknowledged write {ack:?} has no event");
    }
    for event in events {
        if !acked_at.contains(&(event.revision, event.key.clone())) {
            assert!(allowed_extra(event), "event that no client wrote: {event:?}");
        }
    }
    // The state the watch describes, from the initial loads plus the events.
    let mut state: BTreeMap<Bytes, Bytes> = BTreeMap::new();
    for ack in acked.iter().filter(|a| a.revision < first_watched) {
        match &ack.value {
            Some(v) => state.insert(ack.key.clone(), v.clone()),
            None => state.remove(&ack.key),
        };
    }
    for event in events {
        match &event.value {
            Some(v) => state.insert(event.key.clone(), v.clone()),
            None => state.remove(&event.key),
        };
    }
    state
}

async fn check_contents(kv: &mut KvClient<Channel>, expected: &BTreeMap<Bytes, Bytes>, shards: &[&Etcd]) {
    let sentinel = Bytes::from_static(b"/registry/pods/zz-sentinel");
    let mut listed: BTreeMap<Bytes, Bytes> = list_at(kv, 0).await.unwrap().into_iter().map(|(k, (v, _))| (k, v)).collect();
    listed.remove(&sentinel);
    assert_eq!(listed.len(), expected.len(), "router holds a different number of keys than the watch describes");
    assert!(listed == *expected, "router contents differ from the watch's state");
    let paged: BTreeMap<Bytes, Bytes> = list_paged(kv, 0).await.unwrap().into_iter().filter(|(k, _)| *k != sentinel).map(|(k, (v, _))| (k, v)).collect();
    assert!(paged == *expected, "paginated list differs");
    // Each key on exactly one live shard.
    let mut union = BTreeSet::new();
    for shard in shards {
        for key in shard_keys(shard).await {
            assert!(union.insert(key.clone()), "{key:?} is on two shards");
        }
    }
    union.remove(&sentinel);
    assert_eq!(union, expected.keys().cloned().collect::<BTreeSet<_>>(), "shards hold other keys than the router lists");
}

fn test_config(shards: &[Etcd]) -> ste_router::RouterConfig {
    test_config_rf(shards, 1)
}

fn test_config_rf(shards: &[Etcd], replication_factor: u8) -> ste_router::RouterConfig {
    let mut config = Router::test_config(shard_specs(shards));
    config.store.replication_factor = replication_factor;
    config.membership.interval = Duration::from_millis(100);
    config.membership.lost_after = Duration::from_secs(2);
    config.maintain_interval = Duration::from_millis(200);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_join_during_writes_and_keys_move_invisibly() {
    join_during_writes(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_join_during_writes_with_replication() {
    join_during_writes(2).await;
}

async fn join_during_writes(replication_factor: u8) {
    let bootstrap = start_shards(1).await.unwrap();
    let joining = start_shards(2).await.unwrap();
    let router = Router::start_with(test_config_rf(&bootstrap, replication_factor)).await.unwrap();
    let channel = router.channel().await.unwrap();
    let mut kv = KvClient::new(channel.clone());
    let workload = Workload::start(channel.clone(), 100).await;
    workload.run_for(200).await;
    // A snapshot taken before the join must read the same after it.
    let before_revision = kv.range(RangeRequest { key: Bytes::from_static(b"/x"), ..Default::default() }).await.unwrap().into_inner().header.unwrap().revision;
    let before = list_paged(&mut kv, before_revision).await.unwrap();

    for (i, shard) in joining.iter().enumerate() {
        let body = format!(r#"{{"name": "worker-{i}", "endpoint": "{}"}}"#, shard.endpoint());
        let (status, answer) = http(router.admin_addr, "POST", "/shards", &body).await;
        assert_eq!(status, 202, "{answer}");
    }
    wait_until("both shards to join and their keys to move", Duration::from_secs(60), || async {
        members(&router).await["shards"].as_array().unwrap().len() == 3 && keys_to_move(&router).await == 0.0
    })
    .await;
    workload.run_for(200).await;
    let (acked, failed, events, _) = workload.finish(&mut kv).await;
    assert!(failed.is_empty(), "writes failed during a join: {failed:?}");

    // Moves are invisible: every event is an acknowledged write.
    let state = check_history(&acked, &events, |_| false);
    check_contents(&mut kv, &state, &[&bootstrap[0], &joining[0], &joining[1]]).await;
    for shard in &joining {
        assert!(!shard_keys(shard).await.is_empty(), "shard {} got no keys", shard.name);
    }
    assert_eq!(list_paged(&mut kv, before_revision).await.unwrap(), before, "a snapshot from before the join changed");
    assert_eq!(list_at(&mut kv, before_revision).await.unwrap(), before);
    // Single-key reads at the old revision find moved keys too.
    for (key, (value, _)) in before.iter().take(40) {
        let got = kv.range(RangeRequest { key: key.clone(), revision: before_revision, ..Default::default() }).await.unwrap().into_inner();
        assert_eq!(got.kvs.first().map(|kv| kv.value.clone()).as_ref(), Some(value), "old read of {key:?}");
    }
    let (_, metrics) = http(router.admin_addr, "GET", "/metrics", "").await;
    assert!(metric(&metrics, "ste_router_keys_moved_total") > 0.0, "{metrics}");
    router.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_shard_hands_over_every_key_during_writes() {
    drain_during_writes(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_shard_hands_over_every_key_with_replication() {
    drain_during_writes(2).await;
}

async fn drain_during_writes(replication_factor: u8) {
    let shards = start_shards(3).await.unwrap();
    let router = Router::start_with(test_config_rf(&shards, replication_factor)).await.unwrap();
    let channel = router.channel().await.unwrap();
    let mut kv = KvClient::new(channel.clone());
    let workload = Workload::start(channel.clone(), 100).await;
    workload.run_for(200).await;
    let before_revision = kv.range(RangeRequest { key: Bytes::from_static(b"/x"), ..Default::default() }).await.unwrap().into_inner().header.unwrap().revision;
    let drained = &shards[1];
    assert!(!shard_keys(drained).await.is_empty());

    let (status, answer) = http(router.admin_addr, "POST", &format!("/shards/{}/drain", drained.name), "").await;
    assert_eq!(status, 202, "{answer}");
    wait_until("the drained shard to leave", Duration::from_secs(60), || async {
        !members(&router).await["shards"].as_array().unwrap().iter().any(|s| s["name"] == drained.name.as_str())
    })
    .await;
    assert!(shard_keys(drained).await.is_empty(), "keys were left on the drained shard");
    workload.run_for(200).await;
    let (acked, failed, events, _) = workload.finish(&mut kv).await;
    assert!(failed.is_empty(), "writes failed during a drain: {failed:?}");
    let state = check_history(&acked, &events, |_| false);
    check_contents(&mut kv, &state, &[&shards[0], &shards[2]]).await;
    // Reading before the removal would need the drained shard: 410 for kube-apiserver.
    let old = list_at(&mut kv, before_revision).await.unwrap_err();
    assert!(old.message().contains("compacted"), "{old:?}");
    // Unknown shards and bad joins are refused clearly.
    assert_eq!(http(router.admin_addr, "POST", "/shards/nope/drain", "").await.0, 404);
    assert_eq!(http(router.admin_addr, "POST", "/shards", "{\"name\": \"x\"}").await.0, 400);
    assert_eq!(http(router.admin_addr, "POST", "/shards", r#"{"name": "x", "endpoint": "127.0.0.1:1"}"#).await.0, 400);
    router.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_registered_shard_is_declared_lost_with_delete_events() {
    let bootstrap = start_shards(1).await.unwrap();
    let mut workers = start_shards(2).await.unwrap();
    let router = Router::start_with(test_config(&bootstrap)).await.unwrap();
    for (i, shard) in workers.iter().enumerate() {
        let body = format!(r#"{{"name": "worker-{i}", "endpoint": "{}"}}"#, shard.endpoint());
        assert_eq!(http(router.admin_addr, "POST", "/shards", &body).await.0, 202);
    }
    wait_until("workers to join", Duration::from_secs(30), || async {
        members(&router).await["shards"].as_array().unwrap().len() == 3
    })
    .await;
    let channel = router.channel().await.unwrap();
    let mut kv = KvClient::new(channel.clone());
    let workload = Workload::start(channel.clone(), 100).await;
    workload.run_for(200).await;
    wait_until("keys to settle on their shards", Duration::from_secs(30), || async { keys_to_move(&router).await == 0.0 }).await;
    let doomed: BTreeSet<Bytes> = shard_keys(&workers[0]).await;
    assert!(!doomed.is_empty());

    workers[0].kill();
    wait_until("the killed shard to be declared lost", Duration::from_secs(30), || async {
        members(&router).await["shards"].as_array().unwrap().len() == 2
    })
    .await;
    workload.run_for(200).await;
    let (acked, failed, events, _) = workload.finish(&mut kv).await;
    // Extra events: DELETEs of keys that were on the dead shard (all at one
    // revision), and writes whose outcome the client could not know.
    let failed_keys: BTreeSet<Bytes> = failed.iter().cloned().collect();
    let lost_deletes: Vec<&Event> = events.iter().filter(|e| e.value.is_none() && !acked.iter().any(|a| a.revision == e.revision && a.key == e.key)).collect();
    assert!(!lost_deletes.is_empty(), "the lost shard's keys got no DELETE events");
    let lost_revision = lost_deletes[0].revision;
    let state = check_history(&acked, &events, |e| {
        (e.value.is_none() && e.revision == lost_revision && doomed.contains(&e.key)) || failed_keys.contains(&e.key)
    });
    check_contents(&mut kv, &state, &[&bootstrap[0], &workers[1]]).await;
    let (_, metrics) = http(router.admin_addr, "GET", "/metrics", "").await;
    assert!(metric(&metrics, "ste_router_keys_lost_total") >= lost_deletes.len() as f64);
    router.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_shards_are_remembered_across_router_restarts() {
    let bootstrap = start_shards(1).await.unwrap();
    let worker = start_shards(1).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&bootstrap);
    config.membership.cache_file = Some(dir.path().join("members.json"));
    let router = Router::start_with(config.clone()).await.unwrap();
    let body = format!(r#"{{"name": "worker-0", "endpoint": "{}"}}"#, worker[0].endpoint());
    assert_eq!(http(router.admin_addr, "POST", "/shards", &body).await.0, 202);
    let mut kv = KvClient::new(router.channel().await.unwrap());
    let mut expected = BTreeMap::new();
    for i in 0..200 {
        let k = key(0, i);
        let v = Bytes::from(format!("v{i}"));
        assert!(kv.txn(shapes::create(&k, &v)).await.unwrap().into_inner().succeeded);
        expected.insert(k, v);
    }
    wait_until("keys to settle and the cache to be written", Duration::from_secs(30), || async {
        keys_to_move(&router).await == 0.0 && std::fs::read_to_string(dir.path().join("members.json")).is_ok_and(|t| t.contains("worker-0"))
    })
    .await;
    assert!(!shard_keys(&worker[0]).await.is_empty());
    router.stop().await.unwrap();

    let router = Router::start_with(config).await.unwrap();
    let mut kv = KvClient::new(router.channel().await.unwrap());
    let listed: BTreeMap<Bytes, Bytes> = list_at(&mut kv, 0).await.unwrap().into_iter().map(|(k, (v, _))| (k, v)).collect();
    assert_eq!(listed, expected, "keys on the registered shard were not visible after the restart");
    let shards = members(&router).await;
    assert!(shards["shards"].as_array().unwrap().iter().any(|s| s["name"] == "worker-0" && s["origin"] == "registered"), "{shards}");
    let _ = Compare::default();
    router.stop().await.unwrap();
}

async fn under_replicated(router: &Router) -> f64 {
    let (_, text) = http(router.admin_addr, "GET", "/metrics", "").await;
    metric(&text, "ste_router_keys_under_replicated")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replication_a_killed_shard_loses_nothing() {
    // STE_TEST_LOG=ste_router=debug shows the router's side when this fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("STE_TEST_LOG"))
        .with_test_writer()
        .try_init();
    let bootstrap = start_shards(1).await.unwrap();
    let mut workers = start_shards(2).await.unwrap();
    let router = Router::start_with(test_config_rf(&bootstrap, 2)).await.unwrap();
    for (i, shard) in workers.iter().enumerate() {
        let body = format!(r#"{{"name": "worker-{i}", "endpoint": "{}"}}"#, shard.endpoint());
        assert_eq!(http(router.admin_addr, "POST", "/shards", &body).await.0, 202);
    }
    wait_until("workers to join", Duration::from_secs(30), || async {
        members(&router).await["shards"].as_array().unwrap().len() == 3
    })
    .await;
    let channel = router.channel().await.unwrap();
    let mut kv = KvClient::new(channel.clone());
    let workload = Workload::start(channel.clone(), 100).await;
    workload.run_for(200).await;
    wait_until("keys placed and every key replicated", Duration::from_secs(30), || async {
        keys_to_move(&router).await == 0.0 && under_replicated(&router).await == 0.0
    })
    .await;
    let doomed: BTreeSet<Bytes> = shard_keys(&workers[0]).await;
    assert!(!doomed.is_empty());

    workers[0].kill();
    wait_until("the killed shard to be declared lost", Duration::from_secs(30), || async {
        members(&router).await["shards"].as_array().unwrap().len() == 2
    })
    .await;
    workload.run_for(200).await;
    let (acked, failed, events, _) = workload.finish(&mut kv).await;
    // No DELETE for the dead shard's keys: the only events nobody
    // acknowledged are writes whose outcome the client did not learn.
    let failed_keys: BTreeSet<Bytes> = failed.iter().cloned().collect();
    let state = check_history(&acked, &events, |e| failed_keys.contains(&e.key));
    check_contents(&mut kv, &state, &[&bootstrap[0], &workers[1]]).await;
    let survivors = state.keys().filter(|k| doomed.contains(*k)).count();
    assert!(survivors > 0, "none of the dead shard's keys survived");
    let (_, metrics) = http(router.admin_addr, "GET", "/metrics", "").await;
    assert_eq!(metric(&metrics, "ste_router_keys_lost_total"), 0.0, "lost {} restored {}", metric(&metrics, "ste_router_keys_lost_total"), metric(&metrics, "ste_router_keys_restored_total"));
    let restored = metric(&metrics, "ste_router_keys_restored_total");
    assert!(restored >= survivors as f64 && restored > 0.0, "restored {restored}, survivors {survivors}");
    // And copies exist again for every key once the repair pass ran.
    wait_until("every key replicated again", Duration::from_secs(30), || async { under_replicated(&router).await == 0.0 }).await;
    router.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replication_a_shard_that_comes_back_empty_gets_its_keys_back() {
    let mut shards = start_shards(3).await.unwrap();
    let router = Router::start_with(test_config_rf(&shards, 2)).await.unwrap();
    let channel = router.channel().await.unwrap();
    let mut kv = KvClient::new(channel.clone());
    let workload = Workload::start(channel.clone(), 100).await;
    workload.run_for(200).await;
    wait_until("every key replicated", Duration::from_secs(30), || async { under_replicated(&router).await == 0.0 }).await;
    let emptied: BTreeSet<Bytes> = shard_keys(&shards[1]).await;
    assert!(!emptied.is_empty());

    // Its RAM disk is gone (node reboot): same name and address, no data.
    shards[1].restart_empty().await.unwrap();
    wait_until("the shard to hold its keys again", Duration::from_secs(30), || async {
        shard_keys(&shards[1]).await.len() >= emptied.len() / 2
    })
    .await;
    workload.run_for(200).await;
    let (acked, failed, events, _) = workload.finish(&mut kv).await;
    let failed_keys: BTreeSet<Bytes> = failed.iter().cloned().collect();
    let state = check_history(&acked, &events, |e| failed_keys.contains(&e.key));
    check_contents(&mut kv, &state, &[&shards[0], &shards[1], &shards[2]]).await;
    let (_, metrics) = http(router.admin_addr, "GET", "/metrics", "").await;
    assert_eq!(metric(&metrics, "ste_router_keys_lost_total"), 0.0);
    assert!(metric(&metrics, "ste_router_keys_restored_total") > 0.0);
    router.stop().await.unwrap();
}
