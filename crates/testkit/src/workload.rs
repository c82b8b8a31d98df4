//! A client workload for ring-change tests: writers that create, update and
//! delete their own keys with kube-apiserver's compare-and-swap shapes, an
//! independent record of every acknowledged write (and of every write whose
//! outcome the client did not learn), a watch from the known revision before
//! the first write, and the checks that compare them exactly with the
//! router's and the shards' contents afterwards.
//!
//! The checks are exact: every event is an acknowledged write, or the very
//! value (or delete) of a write whose outcome was unknown, or an excuse the
//! test states (a lost shard's DELETEs); every key's value, mod_revision,
//! create_revision, version and lease follow from those events; the router's
//! List equals that model; and no client key is on two shards.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use ste_etcd_proto::mvccpb::{event::EventType, KeyValue};
use ste_etcd_proto::pb::{
    kv_client::KvClient, request_op::Request, watch_client::WatchClient,
    watch_request::RequestUnion, DeleteRangeRequest, RangeRequest, RequestOp, TxnRequest,
    WatchCreateRequest, WatchProgressRequest, WatchRequest,
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
/// How long the final checks wait for a shard to be reconciled (a write with
/// an unknown outcome, or a copy left by an interrupted move, is put right by
/// the router's next maintenance pass or write to that shard).
const SETTLE: Duration = Duration::from_secs(30);

/// A key as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub value: Bytes,
    pub mod_revision: i64,
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
}

impl From<KeyValue> for Stored {
    fn from(kv: KeyValue) -> Self {
        Stored {
            value: kv.value,
            mod_revision: kv.mod_revision,
            create_revision: kv.create_revision,
            version: kv.version,
            lease: kv.lease,
        }
    }
}

/// One acknowledged write: the revision it got, and the value (None: deleted).
#[derive(Debug, Clone)]
pub struct Ack {
    pub revision: i64,
    pub key: Bytes,
    pub value: Option<Bytes>,
}

/// A write whose outcome the client did not learn (an error, not a failed
/// compare): the value it tried to write (None: a delete).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub key: Bytes,
    pub value: Option<Bytes>,
}

/// One watch event, with everything the router sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The kv's mod_revision (for a DELETE: the deleting revision).
    pub revision: i64,
    pub key: Bytes,
    /// None: a DELETE.
    pub value: Option<Bytes>,
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
    /// The watch asks for prev_kv.
    pub prev: Option<Stored>,
}

enum WatchMessage {
    Events(Vec<Event>),
    /// A progress notification: every event up to this revision was sent.
    Progress(i64),
}

/// One HTTP/1.1 request to an admin port: (status, body).
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
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

/// Everything under the prefix at `revision` (0: the current one).
pub async fn list_at(
    kv: &mut KvClient<Channel>,
    revision: i64,
) -> Result<BTreeMap<Bytes, Stored>, tonic::Status> {
    let answer = kv
        .range(RangeRequest {
            key: Bytes::from_static(PREFIX),
            range_end: Bytes::from_static(PREFIX_END),
            revision,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(answer
        .kvs
        .into_iter()
        .map(|kv| (kv.key.clone(), Stored::from(kv)))
        .collect())
}

/// Paginated like kube-apiserver (limit 7, same revision for every page).
pub async fn list_paged(
    kv: &mut KvClient<Channel>,
    revision: i64,
) -> Result<BTreeMap<Bytes, Stored>, tonic::Status> {
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
            assert!(
                out.insert(kv.key.clone(), Stored::from(kv)).is_none(),
                "a page repeated a key"
            );
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
    failed: Arc<Mutex<Vec<Attempt>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    watch: Watch,
    start: i64,
    initial: BTreeMap<Bytes, Stored>,
}

/// The workload's watch: its messages, and its request stream (progress requests).
struct Watch {
    messages: mpsc::UnboundedReceiver<Result<WatchMessage, tonic::Status>>,
    requests: mpsc::Sender<WatchRequest>,
}

pub fn key(writer: usize, i: usize) -> Bytes {
    Bytes::from(format!("/registry/pods/w{writer}/pod-{i:04}"))
}

fn event_of(e: ste_etcd_proto::mvccpb::Event) -> Event {
    let kv = e.kv.unwrap_or_default();
    Event {
        revision: kv.mod_revision,
        value: (e.r#type == EventType::Put as i32).then(|| kv.value.clone()),
        key: kv.key,
        create_revision: kv.create_revision,
        version: kv.version,
        lease: kv.lease,
        prev: e.prev_kv.map(Stored::from),
    }
}

impl Workload {
    /// Loads `initial` keys per writer, reads the revision `start` after
    /// them (and checks that the router lists exactly them there), opens a
    /// watch from `start + 1`, then starts writers that create, update and
    /// delete their own keys with kube-apiserver's compare-and-swap shapes
    /// until stopped.
    pub async fn start(channel: Channel, initial: usize) -> Workload {
        let mut kv = KvClient::new(channel.clone());
        let mut acked = Vec::new();
        let mut loaded = BTreeMap::new();
        for writer in 0..WRITERS {
            for i in 0..initial {
                let k = key(writer, i);
                let value = Bytes::from(format!("init-{writer}-{i}"));
                let answer = kv
                    .txn(shapes::create(&k, &value))
                    .await
                    .unwrap()
                    .into_inner();
                assert!(answer.succeeded, "{k:?} existed before the workload");
                let revision = answer.header.unwrap().revision;
                acked.push(Ack {
                    revision,
                    key: k.clone(),
                    value: Some(value.clone()),
                });
                loaded.insert(
                    k,
                    Stored {
                        value,
                        mod_revision: revision,
                        create_revision: revision,
                        version: 1,
                        lease: 0,
                    },
                );
            }
        }
        let start = current_revision(&mut kv).await;
        let last_load = acked.last().map(|a| a.revision).unwrap_or(0);
        assert!(
            start >= last_load,
            "the current revision {start} is below an acknowledged write at {last_load}"
        );
        // Nothing else writes under the prefix: the router holds exactly the loads.
        assert_same(
            &list_at(&mut kv, start)
                .await
                .expect("list at the start revision"),
            &loaded,
            "the router's List at the start revision differs from the initial loads",
        );
        assert_same(
            &list_paged(&mut kv, start)
                .await
                .expect("paged list at the start revision"),
            &loaded,
            "the router's paged List at the start revision differs from the initial loads",
        );
        let acked = Arc::new(Mutex::new(acked));

        let (req_tx, req_rx) = mpsc::channel(4);
        req_tx
            .send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key: Bytes::from_static(PREFIX),
                    range_end: Bytes::from_static(PREFIX_END),
                    start_revision: start + 1,
                    prev_kv: true,
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
        let mut stream = WatchClient::new(channel.clone())
            .watch(ReceiverStream::new(req_rx))
            .await
            .unwrap()
            .into_inner();
        assert!(stream.message().await.unwrap().unwrap().created);
        let (messages_tx, messages) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(response)) => {
                        if response.canceled {
                            let _ = messages_tx
                                .send(Err(tonic::Status::cancelled(response.cancel_reason)));
                            return;
                        }
                        // No events, not created, not canceled: a progress notification.
                        let message = if response.events.is_empty() {
                            WatchMessage::Progress(response.header.map(|h| h.revision).unwrap_or(0))
                        } else {
                            WatchMessage::Events(
                                response.events.into_iter().map(event_of).collect(),
                            )
                        };
                        if messages_tx.send(Ok(message)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        let _ = messages_tx.send(Err(status));
                        return;
                    }
                }
            }
        });

        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let (mut kv, stop, acked, failed) =
                (kv.clone(), stop.clone(), acked.clone(), failed.clone());
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
                        None => match kv
                            .range(RangeRequest {
                                key: k.clone(),
                                ..Default::default()
                            })
                            .await
                        {
                            Ok(answer) => answer
                                .into_inner()
                                .kvs
                                .first()
                                .map(|kv| kv.mod_revision)
                                .unwrap_or(0),
                            Err(_) => {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                        },
                    };
                    // Every value is unique, so an event shows which write it is.
                    let value = Bytes::from(format!("v{writer}-{n}"));
                    let (request, written) = if revision != 0 && rng.random_bool(0.3) {
                        (
                            TxnRequest {
                                compare: vec![shapes::mod_revision_is(&k, revision)],
                                success: vec![RequestOp {
                                    request: Some(Request::RequestDeleteRange(
                                        DeleteRangeRequest {
                                            key: k.clone(),
                                            ..Default::default()
                                        },
                                    )),
                                }],
                                failure: vec![shapes::get(&k)],
                            },
                            None,
                        )
                    } else {
                        (shapes::update(&k, revision, &value), Some(value))
                    };
                    match kv.txn(request).await {
                        Ok(answer) => {
                            let answer = answer.into_inner();
                            if answer.succeeded {
                                let rev = answer.header.unwrap().revision;
                                acked.lock().await.push(Ack {
                                    revision: rev,
                                    key: k.clone(),
                                    value: written.clone(),
                                });
                                known.insert(k, Some(if written.is_some() { rev } else { 0 }));
                            } else {
                                // Only this writer writes its keys: a conflict means
                                // an earlier write of unknown outcome landed, or the
                                // shard lost the key.
                                known.insert(k, None);
                            }
                        }
                        Err(_) => {
                            failed.lock().await.push(Attempt {
                                key: k.clone(),
                                value: written,
                            });
                            known.insert(k, None);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }));
        }
        Workload {
            stop,
            acked,
            failed,
            tasks,
            watch: Watch {
                messages,
                requests: req_tx,
            },
            start,
            initial: loaded,
        }
    }

    /// Writes whose outcome the client did not learn, so far.
    pub async fn failed(&self) -> Vec<Attempt> {
        self.failed.lock().await.clone()
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

    /// Stops the writers, writes the sentinel and collects the watch events
    /// up to it.
    pub async fn finish(mut self, kv: &mut KvClient<Channel>) -> Outcome {
        self.stop.store(true, Ordering::Relaxed);
        for task in std::mem::take(&mut self.tasks) {
            task.await.unwrap();
        }
        let sentinel = Bytes::from_static(SENTINEL);
        let answer = kv
            .txn(shapes::create(&sentinel, &Bytes::from_static(b"end")))
            .await
            .expect("writing the sentinel")
            .into_inner();
        assert!(answer.succeeded, "the sentinel existed already");
        let end = answer.header.expect("header").revision;
        self.acked.lock().await.push(Ack {
            revision: end,
            key: sentinel.clone(),
            value: Some(Bytes::from_static(b"end")),
        });
        let mut outcome = Outcome {
            start: self.start,
            end,
            initial: std::mem::take(&mut self.initial),
            acked: std::mem::take(&mut *self.acked.lock().await),
            failed: std::mem::take(&mut *self.failed.lock().await),
            events: Vec::new(),
            watch: Some(self.watch),
        };
        outcome.collect_through(end).await;
        assert!(
            outcome.events.iter().any(|e| e.key == sentinel),
            "the watch reached {end} without the sentinel"
        );
        outcome
    }
}

/// What a finished workload saw; its watch stays open for the final checks.
pub struct Outcome {
    /// The revision read before the writers started; the watch starts after it.
    pub start: i64,
    /// The sentinel's revision.
    pub end: i64,
    /// The keys at `start` (the initial loads).
    pub initial: BTreeMap<Bytes, Stored>,
    /// Every acknowledged write, the initial loads and the sentinel included.
    pub acked: Vec<Ack>,
    /// Every write whose outcome the client did not learn.
    pub failed: Vec<Attempt>,
    /// Every event the watch delivered so far, in order.
    pub events: Vec<Event>,
    /// None only in this module's unit tests of the checks.
    watch: Option<Watch>,
}

impl Outcome {
    /// Collects watch events until the watch has sent everything up to
    /// `revision` (a progress notification at or after it, requested now).
    pub async fn collect_through(&mut self, revision: i64) {
        let watch = self.watch.as_mut().expect("the workload's watch");
        let progress = || WatchRequest {
            request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
        };
        watch
            .requests
            .send(progress())
            .await
            .expect("watch request stream closed");
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), watch.messages.recv())
                .await
                .expect("watch events stopped arriving")
                .expect("watch ended")
                .expect("watch failed");
            match message {
                WatchMessage::Events(batch) => self.events.extend(batch),
                WatchMessage::Progress(at) if at >= revision => return,
                WatchMessage::Progress(_) => {
                    // Answered before `revision` was published here: ask again.
                    watch
                        .requests
                        .send(progress())
                        .await
                        .expect("watch request stream closed");
                }
            }
        }
    }

    /// The keys `placed` on a shard at `revision` (from the exact history)
    /// that no write touched since (acknowledged after it, or of unknown
    /// outcome), with what they held then: what a lost shard's replica
    /// copies must bring back unchanged.
    pub fn untouched_since(
        &self,
        revision: i64,
        placed: impl Fn(&Bytes) -> bool,
    ) -> BTreeMap<Bytes, Stored> {
        let touched: BTreeSet<Bytes> = self
            .acked
            .iter()
            .filter(|a| a.revision > revision)
            .map(|a| a.key.clone())
            .chain(self.failed.iter().map(|a| a.key.clone()))
            .collect();
        let mut at = self.history(|_| false).state_at(revision);
        at.retain(|key, _| placed(key) && !touched.contains(key));
        at
    }

    /// The history checks (see `check_history`) on everything collected so far.
    pub fn history(&self, excuse: impl Fn(&Event) -> bool) -> History {
        check_history(self, excuse)
    }

    /// The final checks: the history is exact (`check_history` with
    /// `excuse`), the router's List (plain and paged) at the current revision
    /// equals the model exactly, and the live `shards` (if any are given)
    /// hold exactly the model's keys, none on two shards. Shards are given a
    /// deadline to be reconciled (a write with unknown outcome or an
    /// interrupted move leaves the shard holding what the router has not
    /// announced until its next maintenance pass); the router's List must be
    /// exact at once. Returns the model at the last revision checked.
    pub async fn check(
        &mut self,
        kv: &mut KvClient<Channel>,
        shards: &[String],
        excuse: impl Fn(&Event) -> bool,
    ) -> BTreeMap<Bytes, Stored> {
        let deadline = Instant::now() + SETTLE;
        for attempt in 1.. {
            let revision = current_revision(kv).await;
            self.collect_through(revision).await;
            let history = check_history(self, &excuse);
            let model = history.state_at(revision);
            let listed = list_at(kv, revision)
                .await
                .expect("list through the router");
            assert_same(&listed, &model, &format!("the router's List at {revision} differs from the acknowledged writes and events"));
            let paged = list_paged(kv, revision)
                .await
                .expect("paginated list through the router");
            assert_same(&paged, &model, &format!("the router's paginated List at {revision} differs from the acknowledged writes and events"));
            let summary = || {
                eprintln!(
                    "workload: {} acknowledged writes, {} of unknown outcome ({} of them seen as events), {} events excused by the test; checked at {revision} after {attempt} look(s)",
                    self.acked.len(),
                    self.failed.len(),
                    history.unknown_outcome,
                    history.excused
                )
            };
            if shards.is_empty() {
                summary();
                return model;
            }
            // The shards are read after `revision`: compare with the newest model.
            let newest = history.state_at(i64::MAX);
            let placement = shard_contents(shards).await;
            let twice = on_two_shards(&placement);
            let held: BTreeSet<Bytes> = placement.values().flatten().cloned().collect();
            let expected: BTreeSet<Bytes> = newest.keys().cloned().collect();
            if twice.is_empty() && held == expected {
                summary();
                return model;
            }
            assert!(
                Instant::now() < deadline,
                "after {SETTLE:?} the shards still disagree with the router: keys on two shards {twice:?}; on shards but not listed {:?}; listed but on no shard {:?}",
                held.difference(&expected).collect::<Vec<_>>(),
                expected.difference(&held).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        unreachable!("the loop returns or panics")
    }
}

/// The model of what the router holds, from the initial loads and the events.
pub struct History {
    initial: BTreeMap<Bytes, Stored>,
    /// (revision, key, the key after it: None when deleted), in event order.
    changes: Vec<(i64, Bytes, Option<Stored>)>,
    /// Events the test's excuse accepted.
    pub excused: usize,
    /// Events that were writes whose outcome the client did not learn.
    pub unknown_outcome: usize,
}

impl History {
    /// Every key as it is at `revision`.
    pub fn state_at(&self, revision: i64) -> BTreeMap<Bytes, Stored> {
        let mut state = self.initial.clone();
        for (_, key, after) in self.changes.iter().take_while(|(at, _, _)| *at <= revision) {
            match after {
                Some(stored) => state.insert(key.clone(), stored.clone()),
                None => state.remove(key),
            };
        }
        state
    }
}

/// The history checks every scenario shares:
/// - every event is after the known start revision, revisions never go back,
///   one (revision, key) at most once;
/// - every acknowledged write after the start revision is an event, exactly
///   as acknowledged;
/// - every other event is excused by `excuse` (the test states which: a lost
///   shard's DELETEs), or is exactly the value (or the delete) of one write
///   whose outcome the client did not learn, each such write excusing at most
///   one event;
/// - applied in order to the initial loads, every event's create_revision,
///   version, lease and prev_kv are what etcd would send (a PUT of an absent
///   key is a create at its own revision with version 1 and no prev_kv; of a
///   present key keeps create_revision, adds 1 to version and carries the
///   previous kv; a DELETE is of a present key, carries it as prev_kv and only
///   key and revision in kv).
pub fn check_history(outcome: &Outcome, excuse: impl Fn(&Event) -> bool) -> History {
    let start = outcome.start;
    let mut seen = BTreeSet::new();
    for pair in outcome.events.windows(2) {
        assert!(
            pair[0].revision <= pair[1].revision,
            "watch revisions went back: {pair:?}"
        );
    }
    for event in &outcome.events {
        assert!(
            event.revision > start,
            "the watch from {} sent an event at or before the start revision {start}: {event:?}",
            start + 1
        );
        assert!(
            seen.insert((event.revision, event.key.clone())),
            "duplicate event {event:?}"
        );
    }
    let acked_at: BTreeMap<(i64, Bytes), &Ack> = outcome
        .acked
        .iter()
        .map(|a| ((a.revision, a.key.clone()), a))
        .collect();
    for ack in &outcome.acked {
        if ack.revision > start {
            assert!(
                seen.contains(&(ack.revision, ack.key.clone())),
                "acknowledged write {ack:?} has no event"
            );
        } else {
            assert!(outcome.initial.get(&ack.key).is_some_and(|s| s.mod_revision == ack.revision), "an acknowledged write at or before the start revision {start} that is not an initial load: {ack:?}");
        }
    }
    let mut unexplained: Vec<Option<&Attempt>> = outcome.failed.iter().map(Some).collect();
    let (mut excused, mut unknown_outcome) = (0, 0);
    let mut state = outcome.initial.clone();
    let mut changes = Vec::with_capacity(outcome.events.len());
    for event in &outcome.events {
        let before = state.get(&event.key).cloned();
        if let Some(ack) = acked_at.get(&(event.revision, event.key.clone())) {
            assert_eq!(
                event.value, ack.value,
                "the watch disagrees with the write acknowledged at {}: {event:?}",
                ack.revision
            );
        } else if excuse(event) {
            excused += 1;
        } else {
            // Necessary excuse: a write answered with an error may still have
            // been applied (the shard committed, the answer was lost), and the
            // router then announces it, at its own revision or at a new one
            // when it reconciles the shard. The client cannot tell, so that
            // write's own value (or delete) of that key may appear, once.
            let attempt = Attempt {
                key: event.key.clone(),
                value: event.value.clone(),
            };
            let Some(slot) = unexplained
                .iter_mut()
                .find(|a| a.is_some_and(|a| *a == attempt))
            else {
                panic!("event that no client wrote: {event:?} (key before it: {before:?})");
            };
            *slot = None;
            unknown_outcome += 1;
        }
        assert_eq!(
            event.prev, before,
            "prev_kv of {event:?} is not the key as it was"
        );
        let after = match &event.value {
            Some(value) => {
                let expected = match &before {
                    Some(b) => (b.create_revision, b.version + 1),
                    None => (event.revision, 1),
                };
                assert_eq!(
                    (event.create_revision, event.version, event.lease),
                    (expected.0, expected.1, 0),
                    "(create_revision, version, lease) of {event:?} after {before:?}"
                );
                Some(Stored {
                    value: value.clone(),
                    mod_revision: event.revision,
                    create_revision: expected.0,
                    version: expected.1,
                    lease: 0,
                })
            }
            None => {
                assert!(
                    before.is_some(),
                    "DELETE of a key that did not exist: {event:?}"
                );
                assert_eq!(
                    (event.create_revision, event.version, event.lease),
                    (0, 0, 0),
                    "a DELETE's kv carries only key and revision: {event:?}"
                );
                None
            }
        };
        match &after {
            Some(stored) => state.insert(event.key.clone(), stored.clone()),
            None => state.remove(&event.key),
        };
        changes.push((event.revision, event.key.clone(), after));
    }
    History {
        initial: outcome.initial.clone(),
        changes,
        excused,
        unknown_outcome,
    }
}

/// Two listings are equal key by key, with every field; the panic names the differences.
pub fn assert_same(got: &BTreeMap<Bytes, Stored>, want: &BTreeMap<Bytes, Stored>, what: &str) {
    if got == want {
        return;
    }
    let mut differences = Vec::new();
    for key in got.keys().chain(want.keys()).collect::<BTreeSet<_>>() {
        let (g, w) = (got.get(key), want.get(key));
        if g != w {
            differences.push(format!("{key:?}: got {g:?}, want {w:?}"));
        }
    }
    panic!(
        "{what} ({} of {} keys differ):\n{}",
        differences.len(),
        want.len(),
        differences
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The current revision, from a Range's header.
pub async fn current_revision(kv: &mut KvClient<Channel>) -> i64 {
    kv.range(RangeRequest {
        key: Bytes::from_static(b"/x"),
        ..Default::default()
    })
    .await
    .expect("range")
    .into_inner()
    .header
    .expect("header")
    .revision
}

/// Client keys stored directly in one etcd (a shard seen without the
/// router). Replica copies live under the reserved prefix
/// `0xff 0xff 0xff 0xff "ste/"`, outside this range.
pub async fn keys_at(endpoint: &str) -> BTreeSet<Bytes> {
    let channel = Channel::from_shared(endpoint.to_string())
        .expect("url")
        .connect()
        .await
        .expect("connect to shard");
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
    answer.kvs.into_iter().map(|kv| kv.key).collect()
}

/// Each shard's client keys, by endpoint.
pub async fn shard_contents(shards: &[String]) -> BTreeMap<String, BTreeSet<Bytes>> {
    let mut out = BTreeMap::new();
    for shard in shards {
        out.insert(shard.clone(), keys_at(shard).await);
    }
    out
}

fn on_two_shards(contents: &BTreeMap<String, BTreeSet<Bytes>>) -> BTreeMap<Bytes, Vec<String>> {
    let mut holders: BTreeMap<Bytes, Vec<String>> = BTreeMap::new();
    for (shard, keys) in contents {
        for key in keys {
            holders.entry(key.clone()).or_default().push(shard.clone());
        }
    }
    holders.retain(|_, shards| shards.len() > 1);
    holders
}

/// Waits until no client key is on two of `shards` (read directly): a copy
/// left by an interrupted move must be deleted by the router's
/// reconciliation. Returns each shard's keys at that moment.
pub async fn wait_no_copies(shards: &[String]) -> BTreeMap<String, BTreeSet<Bytes>> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let contents = shard_contents(shards).await;
        let twice = on_two_shards(&contents);
        if twice.is_empty() {
            return contents;
        }
        assert!(
            Instant::now() < deadline,
            "after {SETTLE:?} these keys are still on two shards: {twice:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where the router places new keys when `members` are the ring: the
/// router's own ring (`ste_router::ring::Ring`, default virtual nodes).
/// Tests use it to know which keys a shard held when it died, and check it
/// against `contents` (what the shards hold, read directly) first, so it is
/// not trusted blindly: every key observed must be on the shard it names.
pub fn placement(
    members: &[&str],
    contents: &BTreeMap<&str, BTreeSet<Bytes>>,
) -> impl Fn(&[u8]) -> String {
    let mut ring = ste_router::ring::Ring::new(ste_router::StoreConfig::default().vnodes);
    for member in members {
        ring.add(&ste_router::ring::ShardId::new(member));
    }
    let locate = move |key: &[u8]| ring.locate(key).expect("a member").as_str().to_string();
    for (shard, keys) in contents {
        for key in keys {
            assert_eq!(
                locate(key),
                *shard,
                "{key:?} is on {shard}, not where the ring of {members:?} places it"
            );
        }
    }
    locate
}

#[cfg(test)]
mod tests {
    //! The history checks refuse what they must: each test breaks one rule.
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::from(s.to_string())
    }

    fn stored(value: &str, mod_revision: i64, create_revision: i64, version: i64) -> Stored {
        Stored {
            value: b(value),
            mod_revision,
            create_revision,
            version,
            lease: 0,
        }
    }

    fn put(
        revision: i64,
        key: &str,
        value: &str,
        create_revision: i64,
        version: i64,
        prev: Option<Stored>,
    ) -> Event {
        Event {
            revision,
            key: b(key),
            value: Some(b(value)),
            create_revision,
            version,
            lease: 0,
            prev,
        }
    }

    fn delete(revision: i64, key: &str, prev: Option<Stored>) -> Event {
        Event {
            revision,
            key: b(key),
            value: None,
            create_revision: 0,
            version: 0,
            lease: 0,
            prev,
        }
    }

    impl Outcome {
        fn clone_without_watch(&self) -> Outcome {
            Outcome {
                start: self.start,
                end: self.end,
                initial: self.initial.clone(),
                acked: self.acked.clone(),
                failed: self.failed.clone(),
                events: self.events.clone(),
                watch: None,
            }
        }
    }

    /// `a` loaded at 5 (the start revision), then acknowledged: `a` updated at
    /// 6, `c` created at 7, `a` deleted at 8.
    fn outcome() -> Outcome {
        let ack = |revision, key: &str, value: Option<&str>| Ack {
            revision,
            key: b(key),
            value: value.map(b),
        };
        Outcome {
            start: 5,
            end: 8,
            initial: [(b("a"), stored("x", 5, 5, 1))].into(),
            acked: vec![
                ack(5, "a", Some("x")),
                ack(6, "a", Some("y")),
                ack(7, "c", Some("z")),
                ack(8, "a", None),
            ],
            failed: Vec::new(),
            events: vec![
                put(6, "a", "y", 5, 2, Some(stored("x", 5, 5, 1))),
                put(7, "c", "z", 7, 1, None),
                delete(8, "a", Some(stored("y", 6, 5, 2))),
            ],
            watch: None,
        }
    }

    #[test]
    fn an_exact_history_gives_the_model() {
        let history = check_history(&outcome(), |_| false);
        assert_eq!(history.state_at(5), [(b("a"), stored("x", 5, 5, 1))].into());
        assert_eq!(
            history.state_at(7),
            [
                (b("a"), stored("y", 6, 5, 2)),
                (b("c"), stored("z", 7, 7, 1))
            ]
            .into()
        );
        assert_eq!(history.state_at(8), [(b("c"), stored("z", 7, 7, 1))].into());
    }

    #[test]
    #[should_panic(expected = "has no event")]
    fn an_acknowledged_write_without_event_fails() {
        let mut o = outcome();
        o.events.pop();
        check_history(&o, |_| false);
    }

    #[test]
    #[should_panic(expected = "at or before the start revision")]
    fn an_event_at_the_start_revision_fails() {
        let mut o = outcome();
        o.events.insert(0, put(5, "a", "x", 5, 1, None));
        check_history(&o, |_| false);
    }

    #[test]
    #[should_panic(expected = "event that no client wrote")]
    fn a_failed_write_does_not_excuse_another_value_of_its_key() {
        let mut o = outcome();
        o.failed.push(Attempt {
            key: b("c"),
            value: Some(b("other")),
        });
        o.events
            .push(put(9, "c", "w", 7, 2, Some(stored("z", 7, 7, 1))));
        check_history(&o, |_| false);
    }

    #[test]
    fn a_failed_write_excuses_its_own_value_once() {
        let mut o = outcome();
        o.failed.push(Attempt {
            key: b("c"),
            value: Some(b("w")),
        });
        o.events
            .push(put(9, "c", "w", 7, 2, Some(stored("z", 7, 7, 1))));
        assert_eq!(check_history(&o, |_| false).unknown_outcome, 1);
        let mut again = o.clone_without_watch();
        again
            .events
            .push(put(10, "c", "w", 7, 3, Some(stored("w", 9, 7, 2))));
        let twice = std::panic::catch_unwind(|| check_history(&again, |_| false));
        assert!(twice.is_err(), "one failed write excused two events");
        o.events.push(delete(10, "c", Some(stored("w", 9, 7, 2))));
        let delete = std::panic::catch_unwind(|| check_history(&o, |_| false));
        assert!(delete.is_err(), "a failed put excused a DELETE of its key");
    }

    #[test]
    #[should_panic(expected = "(create_revision, version, lease)")]
    fn a_version_that_does_not_follow_fails() {
        let mut o = outcome();
        o.events[0].version = 1;
        check_history(&o, |_| false);
    }

    #[test]
    #[should_panic(expected = "prev_kv")]
    fn a_missing_prev_kv_fails() {
        let mut o = outcome();
        o.events[2].prev = None;
        check_history(&o, |_| false);
    }

    #[test]
    #[should_panic(expected = "DELETE of a key that did not exist")]
    fn an_excused_delete_of_an_absent_key_fails() {
        let mut o = outcome();
        o.events.push(delete(9, "a", None));
        check_history(&o, |e| e.value.is_none() && e.revision == 9);
    }
}
