//! The ste-router binary killed with SIGKILL (no graceful stop) again and
//! again while several clients write with kube-apiserver's create / update /
//! delete Txn shapes, restarted on the same address each time, over real etcd
//! shards: once while it moves keys to a shard that joined, and (with
//! `--replication-factor 2`) while it writes an emptied shard's keys back
//! from their replica copies.
//!
//! Every client keeps its own record of each of its keys: the state the last
//! acknowledged write (or read) left, and the writes whose answer was an
//! error (each may or may not have applied, and excuses only its own value).
//! At the end every key must be exactly what that record says (value,
//! mod_revision, create_revision and version), every acknowledged write must
//! have got a higher revision than every write acknowledged before it was
//! sent (across restarts too), and the shards must hold each key once, on its
//! ring owner (replica copies aside).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ste_etcd_proto::mvccpb::KeyValue;
use ste_etcd_proto::pb::{
    kv_client::KvClient, request_op::Request, response_op::Response, DeleteRangeRequest,
    RangeRequest, RequestOp, TxnRequest, TxnResponse,
};
use ste_router::ring::{Ring, ShardId};
use ste_testkit::workload::{http, key, metric, PREFIX, PREFIX_END};
use ste_testkit::{free_port, shapes, start_shards, wait_until, Etcd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};

// ---------------------------------------------------------------------------
// The router binary as a process that can be SIGKILLed and restarted.

struct RouterProcess {
    child: Option<Child>,
    listen: SocketAddr,
    admin: SocketAddr,
    args: Vec<String>,
    log: PathBuf,
    starts: usize,
}

impl RouterProcess {
    /// Starts `ste-router` on fresh ports with `--shards` and `extra` flags.
    async fn start(shards: &[&Etcd], extra: &[String], log: PathBuf) -> RouterProcess {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let shard_list: Vec<String> = shards
            .iter()
            .map(|s| format!("{}={}", s.name, s.endpoint()))
            .collect();
        let mut args = vec![
            "--listen".to_string(),
            listen.to_string(),
            "--admin-listen".into(),
            admin.to_string(),
            "--shards".into(),
            shard_list.join(","),
            "--shard-timeout".into(),
            "3s".into(),
            "--load-timeout".into(),
            "10s".into(),
        ];
        args.extend(extra.iter().cloned());
        let mut router = RouterProcess {
            child: None,
            listen,
            admin,
            args,
            log,
            starts: 0,
        };
        router.spawn().await;
        router
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ste-router"))
            .args(&self.args)
            .env("RUST_LOG", "ste_router=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting ste-router");
        self.child = Some(child);
        self.starts += 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((200, _)) = admin_get(self.admin, "/readyz").await {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none(),
                "ste-router exited at start {} ({exited:?}); log: {}",
                self.starts,
                self.log.display()
            );
            assert!(
                Instant::now() < deadline,
                "ste-router not ready within 30s at start {}; log: {}",
                self.starts,
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL (std's `Child::kill` on Unix), then reap it.
    fn kill9(&mut self) {
        let mut child = self.child.take().expect("a running router");
        child.kill().expect("SIGKILL ste-router");
        let status = child.wait().expect("reaping ste-router");
        assert!(
            !status.success(),
            "the router exited by itself before the SIGKILL: {status}"
        );
    }

    /// Same flags, same addresses.
    async fn restart(&mut self) {
        self.spawn().await;
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.listen)
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `GET path` on the admin port: (status, body), None while nothing answers.
async fn admin_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer))
        .await
        .ok()?
        .ok()?;
    let code = answer.split_whitespace().nth(1)?.parse().ok()?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

async fn router_metric(router: &RouterProcess, name: &str) -> f64 {
    match admin_get(router.admin, "/metrics").await {
        Some((200, text)) => metric(&text, name),
        _ => f64::NAN,
    }
}

async fn member_names(router: &RouterProcess) -> BTreeSet<String> {
    let Some((200, body)) = admin_get(router.admin, "/shards").await else {
        return BTreeSet::new();
    };
    let members: serde_json::Value = serde_json::from_str(&body).unwrap();
    members["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

// ---------------------------------------------------------------------------
// Clients and their record of what was acknowledged.

const WRITERS: usize = 6;

/// A key's stored state as a client sees it.
#[derive(Clone, PartialEq)]
struct Stored {
    value: Bytes,
    mod_revision: i64,
    create_revision: i64,
    version: i64,
}

/// The part of a value that tells writes apart (the rest is padding).
fn short(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    match text.find("\"writer\"") {
        Some(at) => text[at..].split('}').next().unwrap_or_default().to_string(),
        None => text.chars().take(40).collect(),
    }
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{{{} mod {} create {} version {}}}",
            short(&self.value),
            self.mod_revision,
            self.create_revision,
            self.version
        )
    }
}

fn stored(kv: Option<&KeyValue>) -> Option<Stored> {
    kv.map(|kv| Stored {
        value: kv.value.clone(),
        mod_revision: kv.mod_revision,
        create_revision: kv.create_revision,
        version: kv.version,
    })
}

/// A write whose answer was an error: what the key looks like if it applied.
#[derive(Clone)]
enum Attempt {
    /// `create_revision` None: a create (then it equals the mod revision).
    Put {
        value: Bytes,
        create_revision: Option<i64>,
        version: i64,
        sent_after: i64,
    },
    Delete,
}

impl std::fmt::Debug for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attempt::Put {
                value,
                create_revision,
                version,
                sent_after,
            } => write!(
                f,
                "put {{{} create {create_revision:?} version {version}, sent after {sent_after}}}",
                short(value)
            ),
            Attempt::Delete => write!(f, "delete"),
        }
    }
}

impl Attempt {
    fn explains(&self, seen: &Option<Stored>) -> bool {
        match (self, seen) {
            (Attempt::Delete, None) => true,
            (
                Attempt::Put {
                    value,
                    create_revision,
                    version,
                    sent_after,
                },
                Some(s),
            ) => {
                s.value == value
                    && s.version == *version
                    && s.create_revision == create_revision.unwrap_or(s.mod_revision)
                    && s.mod_revision > *sent_after
            }
            _ => false,
        }
    }
}

#[derive(Clone, Debug, Default)]
struct KeyRecord {
    /// The state the last acknowledged write or read left (None: absent).
    certain: Option<Stored>,
    /// Revision of the last acknowledged write of this key (0: none).
    last_ack: i64,
    /// Writes since the last acknowledged one whose answer was an error.
    unknown: Vec<Attempt>,
    /// Read it before writing again (an answer was an error).
    stale: bool,
}

impl KeyRecord {
    fn explains(&self, seen: &Option<Stored>) -> bool {
        *seen == self.certain || self.unknown.iter().any(|a| a.explains(seen))
    }
}

#[derive(Default)]
struct Shared {
    keys: Mutex<BTreeMap<Bytes, KeyRecord>>,
    violations: Mutex<Vec<String>>,
    /// The highest revision of any acknowledged write so far.
    max_acked: AtomicI64,
    acked: AtomicUsize,
    errors: AtomicUsize,
    /// Writers that have created all of their keys once.
    loaded: AtomicUsize,
    stop: AtomicBool,
}

impl Shared {
    fn violation(&self, text: String) {
        eprintln!("VIOLATION: {text}");
        self.violations.lock().unwrap().push(text);
    }

    fn acked(&self) -> usize {
        self.acked.load(Ordering::SeqCst)
    }

    /// An acknowledged write got `revision`: it must be above every write
    /// acknowledged before it was sent (`floor`).
    fn record_ack(&self, what: &str, revision: i64, floor: i64) {
        if revision <= floor {
            self.violation(format!("{what} was acknowledged at revision {revision}, not above {floor} acknowledged before it was sent"));
        }
        self.max_acked.fetch_max(revision, Ordering::SeqCst);
        self.acked.fetch_add(1, Ordering::SeqCst);
    }
}

fn value(writer: usize, n: u64) -> Bytes {
    // About the size of a small pod object.
    Bytes::from(format!(
        "{{\"kind\":\"Pod\",\"apiVersion\":\"v1\",\"metadata\":{{\"writer\":{writer},\"write\":{n}}},\"spec\":\"{}\"}}",
        "x".repeat(400)
    ))
}

fn guarded_delete(key: &Bytes, revision: i64) -> TxnRequest {
    TxnRequest {
        compare: vec![shapes::mod_revision_is(key, revision)],
        success: vec![RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: key.clone(),
                ..Default::default()
            })),
        }],
        failure: vec![shapes::get(key)],
    }
}

/// The key as the failure branch's get read it.
fn failure_read(answer: &TxnResponse) -> Option<Stored> {
    answer.responses.iter().find_map(|r| match &r.response {
        Some(Response::ResponseRange(range)) => Some(stored(range.kvs.first())),
        _ => None,
    })?
}

fn client(endpoint: &str) -> KvClient<Channel> {
    let channel = Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    KvClient::new(channel)
}

/// One client: creates its `keys` keys, then updates, deletes and re-creates
/// them at random with kube-apiserver's Txn shapes, retrying after failures,
/// until told to stop.
async fn writer(writer: usize, keys: usize, endpoint: String, shared: Arc<Shared>) {
    let mut kv = client(&endpoint);
    let mut rng = StdRng::seed_from_u64(writer as u64 + 11);
    let mut n = 0u64;
    let mut next_create = 0;
    while !shared.stop.load(Ordering::SeqCst) {
        let k = if next_create < keys {
            key(writer, next_create)
        } else {
            key(writer, rng.random_range(0..keys))
        };
        let record = shared
            .keys
            .lock()
            .unwrap()
            .entry(k.clone())
            .or_default()
            .clone();
        if record.stale {
            let floor = shared.max_acked.load(Ordering::SeqCst);
            match kv
                .range(RangeRequest {
                    key: k.clone(),
                    ..Default::default()
                })
                .await
            {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    let header = answer.header.map(|h| h.revision).unwrap_or(0);
                    if header < floor {
                        shared.violation(format!("a read of {k:?} answered at revision {header}, below {floor} already acknowledged"));
                    }
                    let seen = stored(answer.kvs.first());
                    if !record.explains(&seen) {
                        shared.violation(format!("a read of {k:?} found {seen:?}; the last acknowledged write (at {}) left {:?}, and the failed writes since were {:?}", record.last_ack, record.certain, record.unknown));
                    }
                    let mut records = shared.keys.lock().unwrap();
                    let entry = records.get_mut(&k).unwrap();
                    entry.certain = seen;
                    entry.stale = false;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
            continue;
        }
        n += 1;
        let written = value(writer, n);
        let (request, attempt) = match &record.certain {
            None => (
                shapes::update(&k, 0, &written),
                Attempt::Put {
                    value: written.clone(),
                    create_revision: None,
                    version: 1,
                    sent_after: 0,
                },
            ),
            Some(current) if rng.random_bool(0.25) => {
                (guarded_delete(&k, current.mod_revision), Attempt::Delete)
            }
            Some(current) => (
                shapes::update(&k, current.mod_revision, &written),
                Attempt::Put {
                    value: written.clone(),
                    create_revision: Some(current.create_revision),
                    version: current.version + 1,
                    sent_after: 0,
                },
            ),
        };
        let floor = shared.max_acked.load(Ordering::SeqCst);
        let attempt = match attempt {
            Attempt::Put {
                value,
                create_revision,
                version,
                ..
            } => Attempt::Put {
                value,
                create_revision,
                version,
                sent_after: floor,
            },
            Attempt::Delete => Attempt::Delete,
        };
        match kv.txn(request).await {
            Ok(answer) => {
                let answer = answer.into_inner();
                let revision = answer.header.as_ref().map(|h| h.revision).unwrap_or(0);
                if answer.succeeded {
                    shared.record_ack(&format!("a write of {k:?}"), revision, floor);
                    let after = match attempt {
                        Attempt::Put {
                            value,
                            create_revision,
                            version,
                            ..
                        } => Some(Stored {
                            value,
                            mod_revision: revision,
                            create_revision: create_revision.unwrap_or(revision),
                            version,
                        }),
                        Attempt::Delete => None,
                    };
                    shared.keys.lock().unwrap().insert(
                        k.clone(),
                        KeyRecord {
                            certain: after,
                            last_ack: revision,
                            unknown: Vec::new(),
                            stale: false,
                        },
                    );
                    if next_create < keys {
                        next_create += 1;
                        if next_create == keys {
                            shared.loaded.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                } else {
                    // Only this client writes its keys: the compare fails only
                    // if one of its failed writes applied after all.
                    let seen = failure_read(&answer);
                    if !record.explains(&seen) {
                        shared.violation(format!("a write of {k:?} expecting {:?} (last acknowledged at {}) found {seen:?}; failed writes since: {:?}", record.certain, record.last_ack, record.unknown));
                    }
                    shared.keys.lock().unwrap().get_mut(&k).unwrap().certain = seen;
                }
            }
            Err(_) => {
                shared.errors.fetch_add(1, Ordering::SeqCst);
                {
                    let mut records = shared.keys.lock().unwrap();
                    let entry = records.get_mut(&k).unwrap();
                    entry.unknown.push(attempt);
                    entry.stale = true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Running the clients, and the checks at the end.

struct Clients {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Clients {
    fn start(endpoint: &str, keys_per_writer: usize) -> Clients {
        let shared = Arc::new(Shared::default());
        let tasks = (0..WRITERS)
            .map(|w| {
                tokio::spawn(writer(
                    w,
                    keys_per_writer,
                    endpoint.to_string(),
                    shared.clone(),
                ))
            })
            .collect();
        Clients { shared, tasks }
    }

    async fn wait_loaded(&self) {
        let shared = self.shared.clone();
        wait_until(
            "every client to create its keys",
            Duration::from_secs(60),
            || {
                let shared = shared.clone();
                async move { shared.loaded.load(Ordering::SeqCst) == WRITERS }
            },
        )
        .await;
    }

    /// Until `more` further writes were acknowledged.
    async fn run_for(&self, more: usize) {
        let target = self.shared.acked() + more;
        let shared = self.shared.clone();
        wait_until("writes to be acknowledged", Duration::from_secs(30), || {
            let shared = shared.clone();
            async move { shared.acked() >= target }
        })
        .await;
    }

    async fn stop(self) -> Arc<Shared> {
        self.shared.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.expect("a client panicked");
        }
        self.shared
    }
}

/// Client keys stored directly on one shard (replica copies excluded).
async fn shard_client_keys(shard: &Etcd) -> BTreeSet<Bytes> {
    let mut kv = shard.kv().await.expect("connect to shard");
    let answer = kv
        .range(RangeRequest {
            key: Bytes::from_static(&[0]),
            range_end: Bytes::from_static(ste_router::keys::RESERVED_PREFIX),
            keys_only: true,
            ..Default::default()
        })
        .await
        .expect("range on shard")
        .into_inner();
    answer.kvs.into_iter().map(|kv| kv.key).collect()
}

/// Number of keys on a shard in [from, to) (0 while it does not answer).
async fn shard_count(shard: &Etcd, from: &[u8], to: &[u8]) -> i64 {
    let Ok(mut kv) = shard.kv().await else {
        return 0;
    };
    kv.range(RangeRequest {
        key: Bytes::copy_from_slice(from),
        range_end: Bytes::copy_from_slice(to),
        count_only: true,
        ..Default::default()
    })
    .await
    .map(|a| a.into_inner().count)
    .unwrap_or(0)
}

/// The end of the replica-copy range (the prefix with its last byte raised).
fn replica_range_end() -> Vec<u8> {
    let mut end = ste_router::keys::REPLICA_PREFIX.to_vec();
    *end.last_mut().unwrap() += 1;
    end
}

/// (key, global mod revision) of every replica copy on a shard.
async fn shard_copies(shard: &Etcd) -> BTreeSet<(Bytes, i64)> {
    let mut kv = shard.kv().await.expect("connect to shard");
    let prefix = ste_router::keys::REPLICA_PREFIX;
    let answer = kv
        .range(RangeRequest {
            key: Bytes::from_static(prefix),
            range_end: Bytes::from(replica_range_end()),
            keys_only: true,
            ..Default::default()
        })
        .await
        .expect("range on shard")
        .into_inner();
    // Layout: prefix, key length (u32 BE), key, revision (i64 BE).
    answer
        .kvs
        .into_iter()
        .filter_map(|kv| {
            let rest = kv.key.get(prefix.len()..)?;
            let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
            let key = Bytes::copy_from_slice(rest.get(4..4 + len)?);
            let revision = i64::from_be_bytes(rest.get(4 + len..)?.try_into().ok()?);
            Some((key, revision))
        })
        .collect()
}

fn ring_of(shards: &[&Etcd]) -> Ring {
    let mut ring = Ring::new(ste_router::StoreConfig::default().vnodes);
    for shard in shards {
        ring.add(&ShardId::new(&shard.name));
    }
    ring
}

/// Where each key is on the shards: key -> shards holding it; problems as text.
async fn placement(shards: &[&Etcd]) -> (BTreeMap<Bytes, Vec<String>>, Vec<String>) {
    let ring = ring_of(shards);
    let mut on: BTreeMap<Bytes, Vec<String>> = BTreeMap::new();
    let mut problems = Vec::new();
    for shard in shards {
        for key in shard_client_keys(shard).await {
            on.entry(key).or_default().push(shard.name.clone());
        }
    }
    for (key, holders) in &on {
        let owner = ring.locate(key).map(|o| o.to_string()).unwrap_or_default();
        if holders.len() > 1 {
            problems.push(format!("{key:?} is on {holders:?}"));
        } else if holders[0] != owner {
            problems.push(format!(
                "{key:?} is on {} but the ring places it on {owner}",
                holders[0]
            ));
        }
    }
    (on, problems)
}

/// Copies of the wrong version or on the key's own shard do not count.
async fn missing_copies(
    shards: &[&Etcd],
    listed: &BTreeMap<Bytes, Stored>,
    on: &BTreeMap<Bytes, Vec<String>>,
) -> Vec<String> {
    let mut copies: BTreeMap<(Bytes, i64), Vec<String>> = BTreeMap::new();
    for shard in shards {
        for copy in shard_copies(shard).await {
            copies.entry(copy).or_default().push(shard.name.clone());
        }
    }
    listed
        .iter()
        .filter(|(key, s)| {
            let primary = on.get(*key).and_then(|h| h.first());
            !copies
                .get(&((*key).clone(), s.mod_revision))
                .is_some_and(|holders| holders.iter().any(|h| Some(h) != primary))
        })
        .map(|(key, s)| format!("{key:?} at {}", s.mod_revision))
        .collect()
}

async fn list_router(endpoint: &str) -> BTreeMap<Bytes, Stored> {
    let mut kv = client(endpoint).max_decoding_message_size(256 << 20);
    let answer = kv
        .range(RangeRequest {
            key: Bytes::from_static(PREFIX),
            range_end: Bytes::from_static(PREFIX_END),
            ..Default::default()
        })
        .await
        .expect("list through the router")
        .into_inner();
    answer
        .kvs
        .iter()
        .map(|kv| (kv.key.clone(), stored(Some(kv)).unwrap()))
        .collect()
}

/// Every key is what its client's record says; the shards hold each key
/// once, on its ring owner; with replication, a copy of each key's current
/// version is on another shard.
async fn check_final(router: &RouterProcess, shared: &Shared, shards: &[&Etcd], replication: bool) {
    // Moves and replica repairs run in the background after a restart.
    let deadline = Instant::now() + Duration::from_secs(45);
    let (on, problems) = loop {
        let (on, problems) = placement(shards).await;
        if problems.is_empty() || Instant::now() >= deadline {
            break (on, problems);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let listed = list_router(&router.endpoint()).await;
    let records = shared.keys.lock().unwrap().clone();
    let mut wrong = Vec::new();
    for (key, record) in &records {
        let seen = listed.get(key).cloned();
        if !record.explains(&seen) {
            wrong.push(format!(
                "{key:?}: the router has {seen:?}; the last acknowledged write (at {}) left {:?}; failed writes since: {:?}",
                record.last_ack, record.certain, record.unknown
            ));
        }
    }
    for key in listed.keys().filter(|k| !records.contains_key(*k)) {
        wrong.push(format!("{key:?} is listed but no client ever wrote it"));
    }
    let on_shards: BTreeSet<&Bytes> = on.keys().collect();
    let listed_keys: BTreeSet<&Bytes> = listed.keys().collect();
    let only_on_shards: Vec<_> = on_shards.difference(&listed_keys).collect();
    let only_listed: Vec<_> = listed_keys.difference(&on_shards).collect();
    let mut missing = Vec::new();
    if replication {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            missing = missing_copies(shards, &listed, &on).await;
            if missing.is_empty() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let violations = shared.violations.lock().unwrap().clone();
    eprintln!(
        "{} writes acknowledged, {} answered with an error, {} keys at the end, {} router starts; log: {}",
        shared.acked(),
        shared.errors.load(Ordering::SeqCst),
        listed.len(),
        router.starts,
        router.log.display()
    );
    let first = |v: &[String]| v.iter().take(10).cloned().collect::<Vec<_>>().join("\n  ");
    assert!(
        violations.is_empty(),
        "{} violations while the clients ran:\n  {}",
        violations.len(),
        first(&violations)
    );
    assert!(
        wrong.is_empty(),
        "{} keys differ from what was acknowledged:\n  {}",
        wrong.len(),
        first(&wrong)
    );
    assert!(
        problems.is_empty(),
        "{} keys are misplaced on the shards:\n  {}",
        problems.len(),
        first(&problems)
    );
    assert!(
        only_on_shards.is_empty() && only_listed.is_empty(),
        "the shards and the router disagree: on shards only {only_on_shards:?}, listed only {only_listed:?}"
    );
    assert!(
        missing.is_empty(),
        "{} keys have no replica copy of their current version on another shard:\n  {}",
        missing.len(),
        first(&missing)
    );
    assert!(shared.acked() > 0 && !listed.is_empty());
}

fn log_file(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("ste-kill9-{name}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    eprintln!("router log: {}", path.display());
    path
}

async fn kill_and_restart(router: &mut RouterProcess, why: &str) {
    router.kill9();
    eprintln!("SIGKILL {} ({why})", router.starts);
    router.restart().await;
}

fn cleanup(log: &Path) {
    let _ = std::fs::remove_file(log);
}

// ---------------------------------------------------------------------------
// The scenarios.

/// Five SIGKILLs of the router under six writing clients over three shards;
/// the third while the router moves keys to a fourth shard that joined
/// through the admin API (its membership survives in --membership-cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_writes_and_during_a_key_move() {
    let shards = start_shards(4).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("members.json");
    let log = log_file("move");
    let first_three: Vec<&Etcd> = shards[..3].iter().collect();
    let mut router = RouterProcess::start(
        &first_three,
        &["--membership-cache".into(), cache.display().to_string()],
        log.clone(),
    )
    .await;
    let clients = Clients::start(&router.endpoint(), 500);
    clients.wait_loaded().await;
    let mut rng = StdRng::seed_from_u64(9);

    for _ in 0..2 {
        clients.run_for(rng.random_range(100..400)).await;
        kill_and_restart(&mut router, "under writes").await;
    }

    // A fourth shard joins; the router is killed once it has begun moving keys there.
    clients.run_for(100).await;
    let new = &shards[3];
    let body = format!(
        r#"{{"name": "{}", "endpoint": "{}"}}"#,
        new.name,
        new.endpoint()
    );
    let (code, answer) = http(router.admin, "POST", "/shards", &body).await;
    assert_eq!(code, 202, "{answer}");
    // Keys move 128 to a shard Txn; a few keys may also be created there by
    // the clients (the ring places new keys on it at once).
    let deadline = Instant::now() + Duration::from_secs(30);
    while shard_count(new, &[0], ste_router::keys::RESERVED_PREFIX).await < 64 {
        assert!(
            Instant::now() < deadline,
            "no keys moved to the new shard within 30s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    router.kill9();
    let all: Vec<&Etcd> = shards.iter().collect();
    let ring = ring_of(&all);
    let (on, _) = placement(&all).await;
    let destined: Vec<&Bytes> = on
        .keys()
        .filter(|k| ring.locate(k).is_some_and(|o| o.as_str() == new.name))
        .collect();
    let moved = destined
        .iter()
        .filter(|k| on[**k].contains(&new.name))
        .count();
    let twice = on.values().filter(|h| h.len() > 1).count();
    eprintln!(
        "SIGKILL {} during the move: {moved} of {} keys on {} ({}), {twice} keys on two shards",
        router.starts,
        destined.len(),
        new.name,
        if moved < destined.len() {
            "the move was under way"
        } else {
            "the move had finished"
        }
    );
    router.restart().await;
    let members = member_names(&router).await;
    assert!(
        members.contains(&new.name),
        "the router restarted after a SIGKILL during a move forgot the shard that joined ({members:?}; cache: {:?})",
        std::fs::read_to_string(&cache).ok()
    );

    for _ in 0..2 {
        clients.run_for(rng.random_range(100..400)).await;
        kill_and_restart(&mut router, "under writes, after the join").await;
    }
    clients.run_for(200).await;
    let shared = clients.stop().await;
    check_final(&router, &shared, &all, false).await;
    cleanup(&log);
}

/// With --replication-factor 2: a SIGKILL under writes, then two shards in
/// turn come back empty (RAM disk lost) and the router is SIGKILLed while it
/// repairs them: once while it writes the shard's keys back from their
/// replica copies, once while it copies other shards' keys there again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_replica_repair() {
    let mut shards = start_shards(3).await.unwrap();
    let log = log_file("repair");
    let all: Vec<&Etcd> = shards.iter().collect();
    let mut router = RouterProcess::start(
        &all,
        &["--replication-factor".into(), "2".into()],
        log.clone(),
    )
    .await;
    let clients = Clients::start(&router.endpoint(), 300);
    clients.wait_loaded().await;
    wait_until("every key replicated", Duration::from_secs(30), || async {
        router_metric(&router, "ste_router_keys_under_replicated").await == 0.0
    })
    .await;
    clients.run_for(200).await;
    kill_and_restart(&mut router, "under writes").await;

    // shard-1: killed once the first of its keys is back (writing them back
    // from their copies); shard-2: once a quarter of the copies it held for
    // other shards' keys is back (the repair pass copying them again).
    for (victim, copies_wanted) in [(1, None), (2, Some(4))] {
        clients.run_for(200).await;
        let before = shard_count(&shards[victim], &[0], ste_router::keys::RESERVED_PREFIX).await;
        let copies_before = shard_count(
            &shards[victim],
            ste_router::keys::REPLICA_PREFIX,
            &replica_range_end(),
        )
        .await;
        assert!(
            before > 0 && copies_before > 0,
            "{} holds {before} keys and {copies_before} copies",
            shards[victim].name
        );
        shards[victim].restart_empty().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let (keys, copies) = loop {
            let keys = shard_count(&shards[victim], &[0], ste_router::keys::RESERVED_PREFIX).await;
            let copies = shard_count(
                &shards[victim],
                ste_router::keys::REPLICA_PREFIX,
                &replica_range_end(),
            )
            .await;
            let back = match copies_wanted {
                None => keys > 0,
                Some(fraction) => copies * fraction >= copies_before,
            };
            if back {
                break (keys, copies);
            }
            assert!(
                Instant::now() < deadline,
                "the router wrote nothing back to the emptied {} within 30s",
                shards[victim].name
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        router.kill9();
        eprintln!(
            "SIGKILL {} during the repair of {}: {keys} of {before} keys and {copies} of {copies_before} copies back",
            router.starts, shards[victim].name
        );
        router.restart().await;
    }
    clients.run_for(300).await;
    let shared = clients.stop().await;
    let all: Vec<&Etcd> = shards.iter().collect();
    check_final(&router, &shared, &all, true).await;
    cleanup(&log);
}

/// The shortest form of the loss `sigkill_during_replica_repair` finds: with
/// --replication-factor 2, the router is SIGKILLed, one shard comes back
/// empty while the router is down, and the router starts again. Each of that
/// shard's keys still has its copy on another shard, so none may be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_started_while_a_shard_is_empty_keeps_its_keys_with_replication() {
    let mut shards = start_shards(3).await.unwrap();
    let log = log_file("empty-at-start");
    let all: Vec<&Etcd> = shards.iter().collect();
    let mut router = RouterProcess::start(
        &all,
        &["--replication-factor".into(), "2".into()],
        log.clone(),
    )
    .await;
    let mut kv = client(&router.endpoint());
    let mut written = BTreeMap::new();
    for i in 0..300 {
        let k = key(0, i);
        let v = value(0, i as u64);
        let answer = kv.txn(shapes::create(&k, &v)).await.unwrap().into_inner();
        assert!(answer.succeeded);
        written.insert(k, v);
    }
    wait_until("every key replicated", Duration::from_secs(30), || async {
        router_metric(&router, "ste_router_keys_under_replicated").await == 0.0
    })
    .await;
    let on_emptied = shard_client_keys(&shards[1]).await;
    assert!(!on_emptied.is_empty());
    router.kill9();
    shards[1].restart_empty().await.unwrap();
    router.restart().await;
    let listed = list_router(&router.endpoint()).await;
    let lost: Vec<&Bytes> = written
        .keys()
        .filter(|k| !listed.contains_key(*k))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of the {} keys of the emptied {} are gone after the restart (e.g. {:?}); log: {}",
        lost.len(),
        on_emptied.len(),
        shards[1].name,
        lost.first(),
        log.display()
    );
    for (k, v) in &written {
        assert_eq!(&listed[k].value, v, "{k:?}");
    }
    cleanup(&log);
}
