//! A client workload for ring-change tests: writers that create, update and
//! delete their own keys with kube-apiserver's compare-and-swap shapes, an
//! independent record of every acknowledged write, a watch from before the
//! first write, and the checks that compare them with the router's and the
//! shards' contents afterwards.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use ste_etcd_proto::mvccpb::event::EventType;
use ste_etcd_proto::pb::{
    kv_client::KvClient, request_op::Request, watch_client::WatchClient, watch_request::RequestUnion,
    DeleteRangeRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchRequest,
};
use tokio::sync::{mpsc, Mutex};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::{shapes, wait_until};

pub const PREFIX: &[u8] = b"/registry/pods/";
pub const PREFIX_END: &[u8] = b"/registry/pods0";
/// Written last: the watch has delivered everything before it.
pub const SENTINEL: &[u8] = b"/registry/pods/zz-sentinel";
pub const WRITERS: usize = 4;
pub const KEYS_PER_WRITER: usize = 150;

/// One acknowledged write: the revision it got, and the value (None: deleted).
#[derive(Debug, Clone)]
pub struct Ack {
    pub revision: i64,
    pub key: Bytes,
    pub value: Option<Bytes>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub revision: i64,
    pub key: Bytes,
    pub value: Option<Bytes>,
}

/// One HTTP/1.1 request to an admin port: (status, body).
pub async fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
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

/// A sample's value in a Prometheus text exposition (NaN when absent).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Everything under the prefix: key -> (value, mod revision).
pub async fn list_at(kv: &mut KvClient<Channel>, revision: i64) -> Result<BTreeMap<Bytes, (Bytes, i64)>, tonic::Status> {
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
pub async fn list_paged(kv: &mut KvClient<Channel>, revision: i64) -> Result<BTreeMap<Bytes, (Bytes, i64)>, tonic::Status> {
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

pub struct Workload {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Ack>>>,
    /// Writes that failed: their outcome is unknown to the client.
    failed: Arc<Mutex<Vec<Bytes>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    events: mpsc::UnboundedReceiver<Result<Vec<Event>, tonic::Status>>,
    start: i64,
}

pub fn key(writer: usize, i: usize) -> Bytes {
    Bytes::from(format!("/registry/pods/w{writer}/pod-{i:04}"))
}

impl Workload {
    /// Loads `initial` keys per writer, opens a watch, then starts writers
    /// that create, update and delete their own keys with kube-apiserver's
    /// compare-and-swap shapes until stopped.
    pub async fn start(channel: Channel, initial: usize) -> Workload {
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

    /// Writes whose outcome the client did not learn, so far.
    pub async fn failed(&self) -> Vec<Bytes> {
        self.failed.lock().await.clone()
    }

    /// Keys acknowledged at a revision above `revision`.
    pub async fn written_after(&self, revision: i64) -> BTreeSet<Bytes> {
        self.acked.lock().await.iter().filter(|a| a.revision > revision).map(|a| a.key.clone()).collect()
    }

    pub async fn acked_count(&self) -> usize {
        self.acked.lock().await.len()
    }

    /// Lets the writers run until `more` further writes were acknowledged.
    pub async fn run_for(&self, more: usize) {
        let target = self.acked_count().await + more;
        let acked = self.acked.clone();
        wait_until("writes to be acknowledged", Duration::from_secs(60), || {
            let acked = acked.clone();
            async move { acked.lock().await.len() >= target }
        })
        .await;
    }

    /// Stops the writers, and collects watch events up to the current revision.
    pub async fn finish(mut self, kv: &mut KvClient<Channel>) -> (Vec<Ack>, Vec<Bytes>, Vec<Event>, i64) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let sentinel = Bytes::from_static(SENTINEL);
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
pub fn check_history(acked: &[Ack], events: &[Event], allowed_extra: impl Fn(&Event) -> bool) -> BTreeMap<Bytes, Bytes> {
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


/// The current revision, from a Range's header.
pub async fn current_revision(kv: &mut KvClient<Channel>) -> i64 {
    kv.range(RangeRequest { key: Bytes::from_static(b"/x"), ..Default::default() })
        .await
        .expect("range")
        .into_inner()
        .header
        .expect("header")
        .revision
}

/// Keys stored directly in one etcd (a shard seen without the router).
pub async fn keys_at(endpoint: &str) -> BTreeSet<Bytes> {
    let channel = Channel::from_shared(endpoint.to_string()).expect("url").connect().await.expect("connect to shard");
    let answer = KvClient::new(channel)
        .range(RangeRequest {
            key: Bytes::from_static(PREFIX),
            range_end: Bytes::from_static(PREFIX_END),
            keys_only: true,
            ..Default::default()
        })
        .await
        .expect("range on shard")
        .into_inner();
    answer.kvs.into_iter().map(|kv| kv.key).filter(|k| k.as_ref() != SENTINEL).collect()
}

/// The router lists exactly `expected` (plainly and page by page), and the
/// live shards (if any are given) hold each of those keys exactly once.
pub async fn check_contents(kv: &mut KvClient<Channel>, expected: &BTreeMap<Bytes, Bytes>, shards: &[String]) {
    let values = |listed: BTreeMap<Bytes, (Bytes, i64)>| -> BTreeMap<Bytes, Bytes> {
        listed.into_iter().filter(|(k, _)| k.as_ref() != SENTINEL).map(|(k, (v, _))| (k, v)).collect()
    };
    let listed = values(list_at(kv, 0).await.expect("list through the router"));
    assert_eq!(listed.len(), expected.len(), "the router holds a different number of keys than the watch describes");
    assert!(listed == *expected, "the router's contents differ from the watch's state");
    let paged = values(list_paged(kv, 0).await.expect("paginated list through the router"));
    assert!(paged == *expected, "the paginated list differs");
    if shards.is_empty() {
        return;
    }
    let mut union = BTreeSet::new();
    for shard in shards {
        for key in keys_at(shard).await {
            assert!(union.insert(key.clone()), "{key:?} is on two shards");
        }
    }
    assert_eq!(union, expected.keys().cloned().collect::<BTreeSet<_>>(), "the shards hold other keys than the router lists");
}
