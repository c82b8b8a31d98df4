//! Two routers, one writer: leader election in a real etcd (standing in for
//! the cluster's durable etcd), takeover when the leader goes away, and the
//! shard fence that stops a router which lost leadership from writing.

use std::time::Duration;

use bytes::Bytes;
use ste_etcd_proto::pb::{kv_client::KvClient, PutRequest, RangeRequest};
use ste_router::leader::LeaderConfig;
use ste_router::shard::FENCE_KEY;
use ste_testkit::{shard_specs, start_shards, wait_until, Etcd, Router};
use tonic::transport::{Channel, Endpoint};

async fn readyz(router: &Router) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(router.admin_addr).await else {
        return 0;
    };
    let _ = stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer).await;
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn put(endpoint: &str, key: &str) -> Result<i64, String> {
    let channel: Channel = Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .timeout(Duration::from_secs(3))
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let answer = KvClient::new(channel)
        .put(PutRequest {
            key: Bytes::from(key.to_string()),
            value: Bytes::from_static(b"v"),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok(answer.into_inner().header.unwrap().revision)
}

fn config(shards: &[Etcd], durable: &Etcd, identity: &str) -> ste_router::RouterConfig {
    let mut config = Router::test_config(shard_specs(shards));
    config.leader = Some(LeaderConfig {
        endpoint: durable.endpoint(),
        tls: None,
        key: "/ste/router/leader".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(4),
        renew_deadline: Duration::from_secs(3),
        retry_period: Duration::from_millis(300),
    });
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_router_serves_and_a_standby_takes_over() {
    // STE_TEST_LOG=ste_router=debug shows the routers' side when this fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("STE_TEST_LOG"))
        .with_test_writer()
        .try_init();
    let durable = Etcd::start("durable").await.unwrap();
    let shards = start_shards(2).await.unwrap();

    // Routers under election answer /livez at once but serve only as leader.
    let a = Router::start_with(config(&shards, &durable, "router-a"))
        .await
        .unwrap();
    wait_until("router-a to lead", Duration::from_secs(30), || async {
        readyz(&a).await == 200
    })
    .await;
    let b = Router::start_with(config(&shards, &durable, "router-b"))
        .await
        .unwrap();
    assert_eq!(readyz(&b).await, 503, "the standby must not be ready");
    assert!(
        put(&b.endpoint(), "/registry/pods/default/x")
            .await
            .is_err(),
        "the standby served a write"
    );
    let mut last = 0;
    for i in 0..20 {
        last = put(&a.endpoint(), &format!("/registry/pods/default/p{i}"))
            .await
            .unwrap();
    }

    // The leader stops (it releases leadership): the standby takes over with every key.
    a.stop().await.unwrap();
    wait_until("router-b to take over", Duration::from_secs(30), || async {
        readyz(&b).await == 200
    })
    .await;
    let channel = Endpoint::from_shared(b.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let listed = KvClient::new(channel)
        .range(RangeRequest {
            key: Bytes::from_static(b"/registry/pods/"),
            range_end: Bytes::from_static(b"/registry/pods0"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.kvs.len(), 20);
    let next = put(&b.endpoint(), "/registry/pods/default/after")
        .await
        .unwrap();
    assert!(
        next > last,
        "revisions went back across the takeover: {next} after {last}"
    );

    // A newer leader's fence on a shard (as if another router took over while
    // this one was partitioned from kube-apiserver): its next write is refused
    // and it steps down.
    let mut shard_kv = shards[0].kv().await.unwrap();
    shard_kv
        .put(PutRequest {
            key: Bytes::from_static(FENCE_KEY),
            value: Bytes::from(format!("{:020}", 1_000_000)),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut refused = false;
    for i in 0..20 {
        // Keys spread over both shards: some land on the fenced one.
        if put(&b.endpoint(), &format!("/registry/pods/default/q{i}"))
            .await
            .is_err()
        {
            refused = true;
            break;
        }
    }
    assert!(
        refused,
        "writes to a shard fenced by a newer epoch were accepted"
    );
    wait_until("router-b to step down", Duration::from_secs(30), || async {
        readyz(&b).await != 200
    })
    .await;
    b.stop().await.unwrap();
}
