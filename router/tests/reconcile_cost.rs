//! Measurement, not a CI test (`--ignored`): how long a shard's writes wait
//! while the router reconciles it. One shard of pod-sized keys; a key is
//! rewritten behind the router's back and another appears, so the router's
//! next fenced write fails and the shard is reconciled before the retry.
//!
//! cargo test --release -p ste-router --test reconcile_cost -- --ignored --nocapture

use std::time::Instant;

use bytes::Bytes;
use ste_etcd_proto::pb::{kv_client::KvClient, PutRequest, RangeRequest};
use ste_testkit::{shapes, shard_specs, start_shards, Router};

const KEYS: usize = 30_000;
const VALUE_BYTES: usize = 2048;
const ROUNDS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run it with --ignored --nocapture"]
async fn time_from_a_fence_failure_to_the_next_acknowledged_write() {
    let shards = start_shards(1).await.unwrap();
    let router = Router::start(shard_specs(&shards)).await.unwrap();
    let mut kv = KvClient::new(router.channel().await.unwrap());
    let value = Bytes::from(vec![b'x'; VALUE_BYTES]);
    let mut writers = Vec::new();
    for w in 0..16 {
        let (mut kv, value) = (kv.clone(), value.clone());
        writers.push(tokio::spawn(async move {
            for i in (w..KEYS).step_by(16) {
                let key = Bytes::from(format!("/registry/pods/d/p{i:06}"));
                kv.put(PutRequest {
                    key,
                    value: value.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let mut direct = shards[0].kv().await.unwrap();
    for round in 0..ROUNDS {
        let key = Bytes::from(format!("/registry/pods/d/p{round:06}"));
        let known = kv
            .range(RangeRequest {
                key: key.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .kvs
            .remove(0);
        let stored = direct
            .range(RangeRequest {
                key: key.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .kvs
            .remove(0)
            .value;
        let ghost = Bytes::from(format!("/registry/pods/d/ghost{round}"));
        direct
            .put(PutRequest {
                key: ghost,
                value: stored.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        direct
            .put(PutRequest {
                key: key.clone(),
                value: stored,
                ..Default::default()
            })
            .await
            .unwrap();

        let started = Instant::now();
        assert!(
            kv.txn(shapes::update(&key, known.mod_revision, &value))
                .await
                .is_err(),
            "the fence must fail"
        );
        let retried = kv
            .txn(shapes::update(&key, known.mod_revision, &value))
            .await
            .unwrap()
            .into_inner();
        assert!(retried.succeeded);
        println!("{KEYS} keys x {VALUE_BYTES} B, round {round}: fence failure -> next write acknowledged in {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
    }
    router.stop().await.unwrap();
}
