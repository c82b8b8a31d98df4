//! Unix sockets on both sides of the router, with real processes: shards
//! reached at `unix:///…` (etcd's `--listen-client-urls unix:///…`), clients
//! on the router's own socket (`listen_unix`), a shard that is killed and
//! comes back on the same socket, and the real kube-apiserver storing pods
//! through the router's socket.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use ste_etcd_proto::pb::{
    kv_client::KvClient, watch_client::WatchClient, watch_request::RequestUnion, PutRequest,
    RangeRequest, WatchCreateRequest, WatchRequest,
};
use ste_router::ShardSpec;
use ste_testkit::{start_shards, Etcd, KubeApiserver, Router};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// The shards at their Unix sockets, under the same names as over TCP.
fn unix_specs(shards: &[Etcd]) -> Vec<ShardSpec> {
    shards
        .iter()
        .map(|s| ShardSpec::parse(&format!("{}={}", s.name, s.unix_endpoint())).unwrap())
        .collect()
}

/// A gRPC channel to a Unix socket.
async fn unix_channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .expect("connects to the Unix socket")
}

fn key(i: usize) -> Bytes {
    Bytes::from(format!("/registry/pods/default/p{i:03}"))
}

/// Keys under /registry/ that `shard` holds (read from it directly, over TCP).
async fn keys_on(shard: &Etcd) -> i64 {
    shard
        .kv()
        .await
        .unwrap()
        .range(RangeRequest {
            key: Bytes::from_static(b"/registry/"),
            range_end: Bytes::from_static(b"/registry0"),
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .count
}

fn socket_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("router.sock")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_and_clients_over_unix_sockets() {
    let mut shards = start_shards(2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let mut config = Router::test_config(unix_specs(&shards));
    config.listen_unix = Some(socket.clone());
    let router = Router::start_with(config).await.unwrap();
    let channel = unix_channel(&socket).await;
    let mut kv = KvClient::new(channel.clone());

    // A watch on the router's socket sees the writes made on it.
    let (watch_tx, watch_rx) = tokio::sync::mpsc::channel(1);
    watch_tx
        .send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: Bytes::from_static(b"/registry/pods/"),
                range_end: Bytes::from_static(b"/registry/pods0"),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
    let mut events = WatchClient::new(channel)
        .watch(tokio_stream::wrappers::ReceiverStream::new(watch_rx))
        .await
        .unwrap()
        .into_inner();
    assert!(events.message().await.unwrap().unwrap().created);

    for i in 0..40 {
        kv.put(PutRequest {
            key: key(i),
            value: Bytes::from(format!("v{i}")),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let mut seen = 0;
    while seen < 40 {
        let message = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("events arrive")
            .unwrap()
            .unwrap();
        seen += message.events.len();
    }
    assert_eq!(seen, 40);
    let got = kv
        .range(RangeRequest {
            key: key(7),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&got.kvs[0].value[..], b"v7");
    // The writes went over the shards' sockets into both shards.
    let (a, b) = (keys_on(&shards[0]).await, keys_on(&shards[1]).await);
    assert_eq!(a + b, 40);
    assert!(a > 0 && b > 0, "both shards hold keys: {a} and {b}");

    // A shard killed and restarted on the same socket: the router connects
    // again by itself and writes to every key go through.
    shards[1].kill();
    shards[1].restart().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..40 {
        loop {
            let put = kv
                .put(PutRequest {
                    key: key(i),
                    value: Bytes::from_static(b"after restart"),
                    ..Default::default()
                })
                .await;
            match put {
                Ok(_) => break,
                Err(status) if Instant::now() < deadline => {
                    eprintln!("put {i} while the shard comes back: {status}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => panic!("put {i} still fails after 30 s: {status}"),
            }
        }
    }

    drop(events);
    router.stop().await.unwrap();
    assert!(
        !socket.exists(),
        "the router removes its socket when it stops"
    );
}

fn pod(name: &str) -> String {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "nginx"}]}
    })
    .to_string()
}

/// kube-apiserver's etcd client accepts `unix:///path` in its server lists
/// (etcd's clientv3 dials the socket; kube-apiserver only wraps the dialer
/// when an egress selector is configured): pods go through the router's
/// socket, the router reaches its shard over the shard's socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_apiserver_stores_pods_through_the_routers_unix_socket() {
    let durable = Etcd::start("durable").await.unwrap();
    let shards = start_shards(1).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = socket_in(&dir);
    let mut config = Router::test_config(unix_specs(&shards));
    config.listen_unix = Some(socket.clone());
    let router = Router::start_with(config).await.unwrap();
    let api = KubeApiserver::start(
        &durable.endpoint(),
        Some(&format!("unix://{}", socket.display())),
    )
    .await
    .unwrap();

    let (code, body) = api
        .curl(&[
            "/api/v1/namespaces/default/pods",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            &pod("over-unix"),
        ])
        .unwrap();
    assert_eq!(code, 201, "create failed: {body}");
    let (code, body) = api
        .curl(&["/api/v1/namespaces/default/pods/over-unix"])
        .unwrap();
    assert_eq!(code, 200, "get failed: {body}");
    let created: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(created["metadata"]["name"], "over-unix");

    // The pod is in the router (read over its TCP port) and in its shard.
    let mut kv = KvClient::new(router.channel().await.unwrap());
    let stored = kv
        .range(RangeRequest {
            key: Bytes::from_static(b"/registry/pods/default/over-unix"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.kvs.len(), 1);
    assert_eq!(keys_on(&shards[0]).await, 1);
    drop(api);
    router.stop().await.unwrap();
}
