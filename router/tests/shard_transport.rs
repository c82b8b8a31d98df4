//! The router's own shard connections (`shard/transport.rs`) against a real
//! etcd: Txns on the connection the caller polls itself (the committer's),
//! Txns sent while another is on it, a shard restarted between calls, and a
//! peer that never answers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ste_etcd_proto::pb::{
    request_op::Request, response_op::Response, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use ste_router::shard::{EtcdShard, ShardClient};
use ste_router::ShardSpec;
use ste_testkit::Etcd;
use tonic::Code;

fn put(key: &str, value: &str) -> TxnRequest {
    TxnRequest {
        success: vec![RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: Bytes::copy_from_slice(key.as_bytes()),
                value: Bytes::copy_from_slice(value.as_bytes()),
                ..Default::default()
            })),
        }],
        ..Default::default()
    }
}

async fn value_of(shard: &EtcdShard, key: &str) -> Option<Bytes> {
    let answer = shard
        .range(RangeRequest {
            key: Bytes::copy_from_slice(key.as_bytes()),
            ..Default::default()
        })
        .await
        .expect("range");
    answer.kvs.into_iter().next().map(|kv| kv.value)
}

fn client(etcd: &Etcd, timeout: Duration) -> EtcdShard {
    let spec = ShardSpec::parse(&format!("s={}", etcd.endpoint())).unwrap();
    EtcdShard::connect(&spec, timeout, None).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txns_on_the_callers_own_connection_survive_concurrency_and_restarts() {
    let mut etcd = Etcd::start("transport").await.unwrap();
    let shard = Arc::new(client(&etcd, Duration::from_secs(10)));

    // One at a time: the committer's case.
    for i in 0..20 {
        let answer = shard.txn(&put("/k/seq", &format!("v{i}"))).await.unwrap();
        assert!(answer.succeeded);
        assert!(matches!(
            answer.responses[0].response,
            Some(Response::ResponsePut(_))
        ));
    }
    assert_eq!(value_of(&shard, "/k/seq").await.unwrap(), "v19");

    // Many at once: one holds the own connection, the others go on the
    // shared one; every write lands.
    let calls: Vec<_> = (0..32)
        .map(|i| {
            let shard = shard.clone();
            tokio::spawn(async move { shard.txn(&put(&format!("/k/{i}"), "x")).await })
        })
        .collect();
    for call in calls {
        assert!(call.await.unwrap().unwrap().succeeded);
    }
    for i in 0..32 {
        assert_eq!(value_of(&shard, &format!("/k/{i}")).await.unwrap(), "x");
    }

    // The shard restarts between two calls: the next call sees the closed
    // connection before sending anything, connects again and succeeds.
    etcd.restart().await.unwrap();
    let answer = shard.txn(&put("/k/after", "restart")).await;
    assert!(
        answer.as_ref().is_ok_and(|a| a.succeeded),
        "the first Txn after a restart: {answer:?}"
    );
    assert_eq!(value_of(&shard, "/k/after").await.unwrap(), "restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_answers_times_out_and_the_next_call_connects_afresh() {
    // Accepts connections and reads them, never writes a byte.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (count, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    let mute = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
            let _ = count.send(held.len());
        }
    });
    let spec = ShardSpec::parse(&format!("mute=http://127.0.0.1:{port}")).unwrap();
    let shard = EtcdShard::connect(&spec, Duration::from_millis(300), None).unwrap();
    for _ in 0..2 {
        let started = Instant::now();
        let err = shard.txn(&put("/k", "v")).await.unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // The timed-out connection was dropped: the second call made a new one.
    let connections = tokio::time::timeout(Duration::from_secs(5), async {
        let mut last = 0;
        while last < 2 {
            last = accepted.recv().await.expect("the listener runs");
        }
        last
    })
    .await
    .expect("two connections within 5 s");
    assert_eq!(connections, 2);
    mute.abort();
}
