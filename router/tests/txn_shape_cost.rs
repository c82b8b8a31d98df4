//! What the shard Txn of a write costs against one plain etcd, next to the
//! Txn kube-apiserver sends for the same write: same client (the router's
//! own shard connection), same etcd, shapes interleaved so that noise hits
//! them alike. Ignored by default (it measures; run it on a release build):
//!
//! ```sh
//! cargo test --release -p ste-router --test txn_shape_cost -- --ignored --nocapture
//! ```
//!
//! The shapes (docs/router.md, "Hot path: the write path"):
//! - kube-apiserver's create: `mod_revision(key) == 0` → put; no failure ops.
//! - the router's create: the same compare (its per-key fence) and the put
//!   of the value in its envelope.
//! - kube-apiserver's update: `mod_revision(key) == rv` → put; else get key.
//! - the router's update: the fence `mod_revision(key) == shard rv` → put
//!   of the envelope with `prev_kv` (the previous value for the watch event);
//!   no failure ops (a refused fence means the shard changed behind it).
//! - the router's update without `prev_kv`: what dropping it would save.
//! - the router's create under leader election: one more compare, the
//!   leader fence (`FENCE_KEY`'s value is this router's epoch).

use std::time::{Duration, Instant};

use bytes::Bytes;
use ste_etcd_proto::pb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    request_op::Request,
    Compare, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use ste_router::envelope::{self, Meta};
use ste_router::keys::FENCE_KEY;
use ste_router::shard::{EtcdShard, ShardClient};
use ste_router::ShardSpec;
use ste_testkit::Etcd;

const ROUNDS: usize = 2000;
const VALUE: usize = 1024;
const EPOCH: i64 = 7;

fn key(shape: &str, i: usize) -> Bytes {
    Bytes::from(format!("/registry/pods/{shape}/pod-{i:06}"))
}

fn mod_revision_is(key: &Bytes, revision: i64) -> Compare {
    Compare {
        key: key.clone(),
        target: CompareTarget::Mod as i32,
        result: CompareResult::Equal as i32,
        target_union: Some(TargetUnion::ModRevision(revision)),
        range_end: Bytes::new(),
    }
}

fn put(key: &Bytes, value: Bytes, prev_kv: bool) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: key.clone(),
            value,
            prev_kv,
            ..Default::default()
        })),
    }
}

fn get(key: &Bytes) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestRange(RangeRequest {
            key: key.clone(),
            ..Default::default()
        })),
    }
}

fn envelope_of(value: &[u8], revision: i64) -> Bytes {
    let meta = Meta {
        mod_revision: revision,
        create_revision: revision,
        version: 1,
        ..Default::default()
    };
    envelope::encode(&meta, value)
}

/// One shape: builds the Txn for round `i` given the key's current shard revision.
struct Shape {
    name: &'static str,
    prefix: &'static str,
    build: fn(&Bytes, i64, &Bytes) -> TxnRequest,
    samples: Vec<Duration>,
    revisions: Vec<i64>,
    request_bytes: usize,
    answer_bytes: usize,
}

fn k8s_create(key: &Bytes, _: i64, value: &Bytes) -> TxnRequest {
    TxnRequest {
        compare: vec![mod_revision_is(key, 0)],
        success: vec![put(key, value.clone(), false)],
        failure: Vec::new(),
    }
}

fn router_create(key: &Bytes, _: i64, value: &Bytes) -> TxnRequest {
    TxnRequest {
        compare: vec![mod_revision_is(key, 0)],
        success: vec![put(key, envelope_of(value, 1_000_000), false)],
        failure: Vec::new(),
    }
}

fn k8s_update(key: &Bytes, rv: i64, value: &Bytes) -> TxnRequest {
    TxnRequest {
        compare: vec![mod_revision_is(key, rv)],
        success: vec![put(key, value.clone(), false)],
        failure: vec![get(key)],
    }
}

fn router_create_fenced(key: &Bytes, rv: i64, value: &Bytes) -> TxnRequest {
    let mut txn = router_create(key, rv, value);
    txn.compare.push(Compare {
        key: Bytes::from_static(FENCE_KEY),
        target: CompareTarget::Value as i32,
        result: CompareResult::Equal as i32,
        target_union: Some(TargetUnion::Value(Bytes::from(format!("{EPOCH:020}")))),
        range_end: Bytes::new(),
    });
    txn
}

fn router_update(key: &Bytes, rv: i64, value: &Bytes) -> TxnRequest {
    TxnRequest {
        compare: vec![mod_revision_is(key, rv)],
        success: vec![put(key, envelope_of(value, 1_000_000), true)],
        failure: Vec::new(),
    }
}

fn router_update_without_prev(key: &Bytes, rv: i64, value: &Bytes) -> TxnRequest {
    TxnRequest {
        compare: vec![mod_revision_is(key, rv)],
        success: vec![put(key, envelope_of(value, 1_000_000), false)],
        failure: Vec::new(),
    }
}

fn shape(
    name: &'static str,
    prefix: &'static str,
    build: fn(&Bytes, i64, &Bytes) -> TxnRequest,
) -> Shape {
    Shape {
        name,
        prefix,
        build,
        samples: Vec::with_capacity(ROUNDS),
        revisions: vec![0; ROUNDS],
        request_bytes: 0,
        answer_bytes: 0,
    }
}

fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    let at = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[at].as_secs_f64() * 1e6
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --release -- --ignored --nocapture"]
async fn shard_txn_shapes_against_one_plain_etcd() {
    let etcd = Etcd::start_in(
        "shapes",
        std::path::Path::new("/dev/shm"),
        &["--unsafe-no-fsync"],
    )
    .await
    .unwrap();
    let spec = ShardSpec::parse(&format!("s={}", etcd.endpoint())).unwrap();
    let shard = EtcdShard::connect(&spec, Duration::from_secs(10), None).unwrap();
    let value = Bytes::from(vec![b'x'; VALUE]);
    let fence = TxnRequest {
        success: vec![put(
            &Bytes::from_static(FENCE_KEY),
            Bytes::from(format!("{EPOCH:020}")),
            false,
        )],
        ..Default::default()
    };
    shard.txn(&fence).await.unwrap();

    // Creates first (each key once), then updates of the keys they made.
    let mut creates = [
        shape("kube-apiserver create", "kc", k8s_create),
        shape("router create", "rc", router_create),
        shape("router create, leader fence", "rf", router_create_fenced),
    ];
    let mut updates = [
        shape("kube-apiserver update", "kc", k8s_update),
        shape("router update (prev_kv)", "rc", router_update),
        shape(
            "router update, no prev_kv",
            "rc",
            router_update_without_prev,
        ),
    ];
    for i in 0..ROUNDS {
        for s in creates.iter_mut() {
            let k = key(s.prefix, i);
            let req = (s.build)(&k, 0, &value);
            s.request_bytes = prost::Message::encoded_len(&req);
            let started = Instant::now();
            let answer = shard.txn(&req).await.unwrap();
            s.samples.push(started.elapsed());
            assert!(answer.succeeded, "{}: {i}", s.name);
            s.answer_bytes = prost::Message::encoded_len(&answer);
            s.revisions[i] = answer.header.unwrap().revision;
        }
    }
    // The two router update shapes take turns on the router's keys.
    let mut k8s_rv = creates[0].revisions.clone();
    let mut router_rv = creates[1].revisions.clone();
    for (i, (k8s, router)) in k8s_rv.iter_mut().zip(router_rv.iter_mut()).enumerate() {
        for (n, s) in updates.iter_mut().enumerate() {
            let rv = if n == 0 { &mut *k8s } else { &mut *router };
            let k = key(s.prefix, i);
            let req = (s.build)(&k, *rv, &value);
            s.request_bytes = prost::Message::encoded_len(&req);
            let started = Instant::now();
            let answer = shard.txn(&req).await.unwrap();
            s.samples.push(started.elapsed());
            assert!(answer.succeeded, "{}: {i}", s.name);
            s.answer_bytes = prost::Message::encoded_len(&answer);
            *rv = answer.header.unwrap().revision;
        }
    }
    println!("\n{ROUNDS} Txns per shape, {VALUE}-byte values, one etcd on /dev/shm (--unsafe-no-fsync), interleaved:");
    println!("| shape | request B | answer B | p50 µs | p90 µs | p99 µs | mean µs |");
    println!("|---|---|---|---|---|---|---|");
    for s in creates.iter_mut().chain(updates.iter_mut()) {
        let mean =
            s.samples.iter().map(Duration::as_secs_f64).sum::<f64>() / s.samples.len() as f64;
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            s.name,
            s.request_bytes,
            s.answer_bytes,
            percentile(&mut s.samples, 0.5),
            percentile(&mut s.samples, 0.9),
            percentile(&mut s.samples, 0.99),
            mean * 1e6
        );
    }
}
