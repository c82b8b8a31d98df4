//! The real agent with the real router: two `ste-shard-agent` processes
//! register `Shard`s in a real kube-apiserver (over a real etcd), and a
//! router started in this process watches them (`membership.kube`), with one
//! static bootstrap shard. Clients write and watch through the router all
//! along; the router's contents, its watch stream, the shards' own contents
//! and the record of acknowledged writes must agree after every change:
//! - both shards join (members, keys moved to them, `status.phase: Active`);
//! - SIGTERM to one agent: the router drains it without a failed write or an
//!   event nobody wrote, the agent exits 0 and deletes its Shard;
//! - kill -9 of the other (its etcd dies with it): declared Lost, DELETE
//!   events for exactly its keys, `status.phase: Lost`;
//! - with `replication_factor = 2` the same kill loses nothing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{process_alive, write_kubeconfig, Agent};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::PostParams;
use kube::{Api, Client, CustomResourceExt};
use ste_etcd_proto::mvccpb::event::EventType;
use ste_etcd_proto::pb::{
    kv_client::KvClient, request_op::Request, watch_client::WatchClient, watch_request::RequestUnion,
    DeleteRangeRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchRequest,
};
use ste_shard_api::{Shard, ShardPhase};
use ste_testkit::{shapes, shard_specs, start_shards, wait_until, Etcd, KubeApiserver, Router};
use tokio::sync::{mpsc, Mutex};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const PREFIX: &[u8] = b"/registry/pods/";
const PREFIX_END: &[u8] = b"/registry/pods0";
const WRITERS: usize = 4;
const KEYS_PER_WRITER: usize = 150;
const SENTINEL: &[u8] = b"/registry/pods/zz-sentinel";

// ---------------------------------------------------------------- cluster

/// Durable etcd and kube-apiserver with the Shard CRD, and a client.
struct ControlPlane {
    _etcd: Etcd,
    _apiserver: KubeApiserver,
    dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
    client: Client,
}

async fn control_plane() -> ControlPlane {
    // STE_TEST_LOG=ste_router=debug shows the router's side when a test fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("STE_TEST_LOG"))
        .with_test_writer()
        .try_init();
    let etcd = Etcd::start("durable").await.expect("durable etcd");
    let apiserver = KubeApiserver::start(&etcd.endpoint(), None).await.expect("kube-apiserver");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = write_kubeconfig(dir.path(), &apiserver.api());
    let client = ste_shard_agent::registration::client(Some(kubeconfig.to_str().expect("utf-8 path")))
        .await
        .expect("kube client");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &Shard::crd()).await.expect("creating the Shard CRD");
    let shards: Api<Shard> = Api::all(client.clone());
    wait_until("shards.ste.dev to be served", Duration::from_secs(30), || async {
        shards.list(&Default::default()).await.is_ok()
    })
    .await;
    ControlPlane { _etcd: etcd, _apiserver: apiserver, dir, kubeconfig, client }
}

/// A router watching Shard registrations, with fast membership decisions.
async fn router(bootstrap: &[Etcd], client: &Client, replication_factor: u8) -> Router {
    let mut config = Router::test_config(shard_specs(bootstrap));
    config.store.replication_factor = replication_factor;
    config.membership.kube = Some(client.clone());
    config.membership.interval = Duration::from_millis(200);
    config.membership.lost_after = Duration::from_secs(3);
    config.maintain_interval = Duration::from_millis(200);
    Router::start_with(config).await.expect("router")
}

fn agent(name: &str, plane: &ControlPlane) -> Agent {
    Agent::start(
        name,
        &[
            &format!("--kubeconfig={}", plane.kubeconfig.display()),
            &format!("--node-name=node-{name}"),
            "--heartbeat-interval=1s",
            "--drain-timeout=60s",
        ],
    )
}

async fn shard_object(client: &Client, name: &str) -> Option<Shard> {
    Api::<Shard>::all(client.clone()).get_opt(name).await.expect("reading the Shard")
}

async fn phase(client: &Client, name: &str) -> Option<ShardPhase> {
    shard_object(client, name).await.and_then(|s| s.status).and_then(|s| s.phase)
}

/// Waits for `status.phase: Lost`, showing the Shard when it does not come.
async fn wait_lost(client: &Client, name: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while phase(client, name).await != Some(ShardPhase::Lost) {
        let shard = shard_object(client, name).await;
        assert!(std::time::Instant::now() < deadline, "{name} not reported Lost within 20s: {:?}", shard.map(|s| s.status));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn http(addr: std::net::SocketAddr, path: &str) -> String {
    let response = reqwest::get(format!("http://{addr}{path}")).await.expect("admin request");
    assert_eq!(response.status().as_u16(), 200, "GET {path}");
    response.text().await.expect("admin body")
}

/// Names of the router's members (GET /shards).
async fn members(router: &Router) -> BTreeSet<String> {
    let body: serde_json::Value = serde_json::from_str(&http(router.admin_addr, "/shards").await).expect("/shards JSON");
    body["shards"].as_array().expect("shards").iter().map(|s| s["name"].as_str().expect("name").to_string()).collect()
}

async fn metric(router: &Router, name: &str) -> f64 {
    http(router.admin_addr, "/metrics")
        .await
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

async fn current_revision(kv: &mut KvClient<Channel>) -> i64 {
    kv.range(RangeRequest { key: Bytes::from_static(b"/x"), ..Default::default() })
        .await
        .expect("range")
        .into_inner()
        .header
        .expect("header")
        .revision
}

/// Keys stored directly in one etcd (a shard seen without the router).
async fn keys_at(endpoint: &str) -> BTreeSet<Bytes> {
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

// ---------------------------------------------------------------- workload

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

fn key(writer: usize, i: usize) -> Bytes {
    Bytes::from(format!("/registry/pods/w{writer}/pod-{i:04}"))
}

/// Writers that create, update and delete their own keys with
/// kube-apiserver's compare-and-swap shapes, and one watch over all keys.
struct Workload {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Ack>>>,
    /// Keys of writes that failed (outcome unknown to the client).
    failed: Arc<Mutex<Vec<Bytes>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    events: mpsc::UnboundedReceiver<Result<Vec<Event>, tonic::Status>>,
}

impl Workload {
    async fn start(channel: Channel, initial: usize) -> Workload {
        let mut kv = KvClient::new(channel.clone());
        let acked = Arc::new(Mutex::new(Vec::new()));
        for writer in 0..WRITERS {
            for i in 0..initial {
                let (k, value) = (key(writer, i), Bytes::from(format!("init-{writer}-{i}")));
                let answer = kv.txn(shapes::create(&k, &value)).await.expect("initial create").into_inner();
                assert!(answer.succeeded, "initial create of {k:?}");
                acked.lock().await.push(Ack { revision: answer.header.expect("header").revision, key: k, value: Some(value) });
            }
        }
        let start = current_revision(&mut kv).await;

        let (req_tx, req_rx) = mpsc::channel(1);
        let create = WatchCreateRequest {
            key: Bytes::from_static(PREFIX),
            range_end: Bytes::from_static(PREFIX_END),
            start_revision: start + 1,
            ..Default::default()
        };
        req_tx.send(WatchRequest { request_union: Some(RequestUnion::CreateRequest(create)) }).await.expect("watch request");
        let mut stream = WatchClient::new(channel.clone()).watch(ReceiverStream::new(req_rx)).await.expect("watch").into_inner();
        assert!(stream.message().await.expect("watch created").expect("watch answer").created);
        let (events_tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _keep_open = req_tx;
            loop {
                match stream.message().await {
                    Ok(Some(response)) if response.canceled => {
                        let _ = events_tx.send(Err(tonic::Status::cancelled(response.cancel_reason)));
                        return;
                    }
                    Ok(Some(response)) => {
                        let batch = response
                            .events
                            .into_iter()
                            .map(|e| {
                                let kv = e.kv.unwrap_or_default();
                                let value = (e.r#type == EventType::Put as i32).then_some(kv.value);
                                Event { revision: kv.mod_revision, key: kv.key, value }
                            })
                            .collect();
                        if events_tx.send(Ok(batch)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        let _ = events_tx.send(Err(status));
                        return;
                    }
                }
            }
        });

        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let (mut kv, stop, acked, failed) = (kv.clone(), stop.clone(), acked.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                // xorshift: reproducible choices without a dependency.
                let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (writer as u64 + 1);
                let mut random = move || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed
                };
                // key -> mod revision this writer believes (None: re-read first).
                let mut known: BTreeMap<Bytes, Option<i64>> = BTreeMap::new();
                for i in 0..KEYS_PER_WRITER {
                    known.insert(key(writer, i), if i < initial { None } else { Some(0) });
                }
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let k = key(writer, random() as usize % KEYS_PER_WRITER);
                    let revision = match known[&k] {
                        Some(revision) => revision,
                        None => match kv.range(RangeRequest { key: k.clone(), ..Default::default() }).await {
                            Ok(answer) => answer.into_inner().kvs.first().map(|kv| kv.mod_revision).unwrap_or(0),
                            Err(_) => {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                        },
                    };
                    let value = Bytes::from(format!("v{writer}-{n}"));
                    let (request, written) = if revision != 0 && random() % 10 < 3 {
                        let delete = DeleteRangeRequest { key: k.clone(), ..Default::default() };
                        let request = TxnRequest {
                            compare: vec![shapes::mod_revision_is(&k, revision)],
                            success: vec![RequestOp { request: Some(Request::RequestDeleteRange(delete)) }],
                            failure: vec![shapes::get(&k)],
                        };
                        (request, None)
                    } else {
                        (shapes::update(&k, revision, &value), Some(value))
                    };
                    match kv.txn(request).await {
                        Ok(answer) => {
                            let answer = answer.into_inner();
                            if answer.succeeded {
                                let rev = answer.header.expect("header").revision;
                                acked.lock().await.push(Ack { revision: rev, key: k.clone(), value: written.clone() });
                                known.insert(k, Some(if written.is_some() { rev } else { 0 }));
                            } else {
                                // Only this writer writes its keys: a conflict means the key was lost.
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
        Workload { stop, acked, failed, tasks, events }
    }

    /// Lets the writers run until `more` further writes were acknowledged.
    async fn run_for(&self, more: usize) {
        let target = self.acked.lock().await.len() + more;
        let acked = self.acked.clone();
        wait_until("writes to be acknowledged", Duration::from_secs(60), || {
            let acked = acked.clone();
            async move { acked.lock().await.len() >= target }
        })
        .await;
    }

    async fn failed(&self) -> Vec<Bytes> {
        self.failed.lock().await.clone()
    }

    /// Keys acknowledged at a revision above `revision`.
    async fn written_after(&self, revision: i64) -> BTreeSet<Bytes> {
        self.acked.lock().await.iter().filter(|a| a.revision > revision).map(|a| a.key.clone()).collect()
    }

    /// Stops the writers and collects the watch's events up to a sentinel write.
    async fn finish(mut self, kv: &mut KvClient<Channel>) -> (Vec<Ack>, Vec<Bytes>, Vec<Event>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("writer");
        }
        let sentinel = Bytes::from_static(SENTINEL);
        let answer = kv.txn(shapes::create(&sentinel, &Bytes::from_static(b"end"))).await.expect("sentinel").into_inner();
        assert!(answer.succeeded);
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
        (acked, failed, events)
    }
}

/// Every acknowledged write after the watch started is in it exactly as
/// acknowledged, revisions never go back, and every other event passes
/// `allowed_extra`. Returns the state the watch describes.
fn check_history(acked: &[Ack], events: &[Event], allowed_extra: impl Fn(&Event) -> bool) -> BTreeMap<Bytes, Bytes> {
    for pair in events.windows(2) {
        assert!(pair[0].revision <= pair[1].revision, "watch revisions went back: {pair:?}");
    }
    let mut by_revision: BTreeMap<(i64, Bytes), &Event> = BTreeMap::new();
    for event in events {
        assert!(by_revision.insert((event.revision, event.key.clone()), event).is_none(), "duplicate event {event:?}");
    }
    let first_watched = events.first().map(|e| e.revision).unwrap_or(i64::MAX);
    for ack in acked.iter().filter(|a| a.revision >= first_watched) {
        let event = by_revision.get(&(ack.revision, ack.key.clone()));
        let event = event.unwrap_or_else(|| panic!("acknowledged write {ack:?} has no event"));
        assert_eq!(event.value, ack.value, "the watch disagrees with an acknowledged write at {}", ack.revision);
    }
    let acked_at: BTreeSet<(i64, Bytes)> = acked.iter().map(|a| (a.revision, a.key.clone())).collect();
    for event in events {
        if !acked_at.contains(&(event.revision, event.key.clone())) {
            assert!(allowed_extra(event), "event that no client wrote: {event:?}");
        }
    }
    let mut state = BTreeMap::new();
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

/// The router lists exactly `expected`, and the live shards hold each of
/// those keys once (primary copies only: `replicas` = false).
async fn check_contents(kv: &mut KvClient<Channel>, expected: &BTreeMap<Bytes, Bytes>, shards: &[String], replicas: bool) {
    let answer = kv
        .range(RangeRequest { key: Bytes::from_static(PREFIX), range_end: Bytes::from_static(PREFIX_END), ..Default::default() })
        .await
        .expect("list through the router")
        .into_inner();
    let listed: BTreeMap<Bytes, Bytes> =
        answer.kvs.into_iter().filter(|kv| kv.key.as_ref() != SENTINEL).map(|kv| (kv.key, kv.value)).collect();
    assert_eq!(listed.len(), expected.len(), "the router holds a different number of keys than the watch describes");
    assert!(listed == *expected, "the router's contents differ from the watch's state");
    if replicas {
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

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_join_drain_on_sigterm_and_are_declared_lost_after_kill() {
    let plane = control_plane().await;
    let bootstrap = start_shards(1).await.expect("bootstrap shard");
    let router = router(&bootstrap, &plane.client, 1).await;
    let channel = router.channel().await.expect("router channel");
    let mut kv = KvClient::new(channel.clone());
    let workload = Workload::start(channel.clone(), 100).await;
    workload.run_for(100).await;

    // (a) Both agents register; the router takes their shards in.
    let mut a = agent("agent-a", &plane);
    let mut b = agent("agent-b", &plane);
    let all: BTreeSet<String> = ["shard-0", "agent-a", "agent-b"].map(String::from).into();
    wait_until("both agents' shards to join and keys to settle", Duration::from_secs(60), || async {
        members(&router).await == all && metric(&router, "ste_router_keys_to_move").await == 0.0
    })
    .await;
    for name in ["agent-a", "agent-b"] {
        wait_until("status.phase: Active", Duration::from_secs(20), || async {
            phase(&plane.client, name).await == Some(ShardPhase::Active)
        })
        .await;
    }
    workload.run_for(200).await;
    assert!(!keys_at(&a.endpoint()).await.is_empty(), "agent-a's shard got no keys");
    assert!(!keys_at(&b.endpoint()).await.is_empty(), "agent-b's shard got no keys");
    assert!(metric(&router, "ste_router_keys_moved_total").await > 0.0);
    assert!(workload.failed().await.is_empty(), "writes failed during the joins: {:?}", workload.failed().await);

    // (b) SIGTERM: spec.drain, the router moves every key off, Drained, exit 0.
    let a_etcd = a.etcd_pid().expect("agent-a's etcd");
    a.signal(libc::SIGTERM);
    let status = a.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "agent-a exited with {status}\n{}", a.logs());
    assert!(shard_object(&plane.client, "agent-a").await.is_none(), "agent-a's Shard is deleted");
    assert!(!process_alive(a_etcd), "agent-a's etcd stopped");
    assert!(!members(&router).await.contains("agent-a"));
    let drained_at = current_revision(&mut kv).await;
    workload.run_for(200).await;
    assert!(workload.failed().await.is_empty(), "writes failed during the drain: {:?}", workload.failed().await);

    // (c) kill -9: etcd dies with the agent; the shard is declared Lost.
    wait_until("keys to settle", Duration::from_secs(30), || async {
        metric(&router, "ste_router_keys_to_move").await == 0.0
    })
    .await;
    let b_etcd = b.etcd_pid().expect("agent-b's etcd");
    let before_kill = current_revision(&mut kv).await;
    // A key also on the bootstrap shard is a copy an interrupted move left on
    // agent-b (under load a shard Txn can time out); the router's key is the
    // other one, so it is not lost with agent-b.
    let elsewhere = keys_at(&bootstrap[0].endpoint()).await;
    let doomed: BTreeSet<Bytes> = keys_at(&b.endpoint()).await.into_iter().filter(|k| !elsewhere.contains(k)).collect();
    assert!(!doomed.is_empty());
    b.signal(libc::SIGKILL);
    b.wait_exit(Duration::from_secs(10)).await;
    wait_until("agent-b's etcd to die with it (PDEATHSIG)", Duration::from_secs(10), || async { !process_alive(b_etcd) }).await;
    wait_until("agent-b's shard to be declared lost", Duration::from_secs(30), || async {
        !members(&router).await.contains("agent-b")
    })
    .await;
    wait_lost(&plane.client, "agent-b").await;
    let message = shard_object(&plane.client, "agent-b").await.and_then(|s| s.status).and_then(|s| s.message);
    workload.run_for(200).await;
    // Keys written between the look at agent-b's etcd and the kill may have been there too.
    let written_since = workload.written_after(before_kill).await;
    let (acked, failed, events) = workload.finish(&mut kv).await;

    let acked_at: BTreeSet<(i64, Bytes)> = acked.iter().map(|a| (a.revision, a.key.clone())).collect();
    let lost: Vec<&Event> = events
        .iter()
        .filter(|e| e.value.is_none() && !acked_at.contains(&(e.revision, e.key.clone())) && !failed.contains(&e.key))
        .collect();
    assert!(!lost.is_empty(), "the lost shard's keys got no DELETE events");
    let lost_revision = lost[0].revision;
    assert!(lost_revision > drained_at, "an unwritten event before the kill: {:?}", lost[0]);
    let failed_keys: BTreeSet<Bytes> = failed.iter().cloned().collect();
    let state = check_history(&acked, &events, |e| {
        let lost_delete = e.value.is_none()
            && e.revision == lost_revision
            && (doomed.contains(&e.key) || written_since.contains(&e.key));
        // A write whose outcome the client did not learn (agent-b's keys, during the kill).
        let unknown = failed_keys.contains(&e.key) && e.revision > before_kill;
        lost_delete || unknown
    });
    for key in &doomed {
        assert!(!state.contains_key(key) || written_since.contains(key) || failed_keys.contains(key),
            "{key:?} was on the lost shard and is still listed");
    }
    check_contents(&mut kv, &state, &[bootstrap[0].endpoint()], false).await;
    assert!(metric(&router, "ste_router_keys_lost_total").await >= lost.len() as f64);
    assert!(message.is_some_and(|m| !m.is_empty()), "the Lost status says why");
    router.stop().await.expect("router stop");
    drop(plane.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replication_a_killed_agent_loses_nothing() {
    let plane = control_plane().await;
    let bootstrap = start_shards(1).await.expect("bootstrap shard");
    let router = router(&bootstrap, &plane.client, 2).await;
    let channel = router.channel().await.expect("router channel");
    let mut kv = KvClient::new(channel.clone());
    let a = agent("agent-a", &plane);
    let mut b = agent("agent-b", &plane);
    let all: BTreeSet<String> = ["shard-0", "agent-a", "agent-b"].map(String::from).into();
    wait_until("both agents' shards to join", Duration::from_secs(60), || async { members(&router).await == all }).await;
    let workload = Workload::start(channel.clone(), 100).await;
    workload.run_for(200).await;
    wait_until("keys placed and every key replicated", Duration::from_secs(60), || async {
        metric(&router, "ste_router_keys_to_move").await == 0.0
            && metric(&router, "ste_router_keys_under_replicated").await == 0.0
    })
    .await;
    for name in ["agent-a", "agent-b"] {
        assert_eq!(phase(&plane.client, name).await, Some(ShardPhase::Active), "{name}");
    }
    let doomed = keys_at(&b.endpoint()).await;
    assert!(!doomed.is_empty());

    let b_etcd = b.etcd_pid().expect("agent-b's etcd");
    b.signal(libc::SIGKILL);
    b.wait_exit(Duration::from_secs(10)).await;
    wait_until("agent-b's etcd to die with it", Duration::from_secs(10), || async { !process_alive(b_etcd) }).await;
    wait_until("agent-b's shard to be declared lost", Duration::from_secs(30), || async {
        !members(&router).await.contains("agent-b")
    })
    .await;
    wait_lost(&plane.client, "agent-b").await;
    workload.run_for(200).await;
    let (acked, failed, events) = workload.finish(&mut kv).await;
    // No DELETE for agent-b's keys: the only events nobody acknowledged are
    // writes whose outcome the client did not learn.
    let failed_keys: BTreeSet<Bytes> = failed.iter().cloned().collect();
    let state = check_history(&acked, &events, |e| failed_keys.contains(&e.key));
    check_contents(&mut kv, &state, &[], true).await;
    let survivors = state.keys().filter(|k| doomed.contains(*k)).count();
    assert!(survivors > 0, "none of agent-b's keys survived");
    assert_eq!(metric(&router, "ste_router_keys_lost_total").await, 0.0);
    let restored = metric(&router, "ste_router_keys_restored_total").await;
    assert!(restored >= survivors as f64, "restored {restored}, survivors {survivors}");
    wait_until("every key replicated again", Duration::from_secs(30), || async {
        metric(&router, "ste_router_keys_under_replicated").await == 0.0
    })
    .await;
    assert!(!keys_at(&a.endpoint()).await.is_empty());
    router.stop().await.expect("router stop");
}
