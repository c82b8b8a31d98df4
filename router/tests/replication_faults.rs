//! Fault sequences, not single faults, at replication factor 2: shards
//! emptied one after the other, a shard emptied while another drains, and
//! an emptied shard under writes and reads. "One failure at a time loses
//! nothing" is checked by reading the shards themselves (every key has its
//! primary on one shard and a copy of exactly its version on another), not
//! by trusting the router's metric — and the metric must agree.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use ste_etcd_proto::pb::{
    kv_client::KvClient, watch_client::WatchClient, watch_request::RequestUnion, PutRequest,
    RangeRequest, WatchCreateRequest, WatchRequest, WatchResponse,
};
use ste_router::keys::{REPLICA_PREFIX, RESERVED_PREFIX};
use ste_testkit::workload::{http, metric};
use ste_testkit::{shard_specs, start_shards, wait_until, Etcd, Router};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const PREFIX: &[u8] = b"/registry/pods/";
const PREFIX_END: &[u8] = b"/registry/pods0";
const KEYS: usize = 300;

/// (value, mod revision, create revision, version) of every key, through the router.
type Listed = BTreeMap<Bytes, (Bytes, i64, i64, i64)>;

fn config(shards: &[Etcd], replication_factor: u8) -> ste_router::RouterConfig {
    let mut config = Router::test_config(shard_specs(shards));
    config.store.replication_factor = replication_factor;
    config.membership.interval = Duration::from_millis(100);
    config.maintain_interval = Duration::from_millis(100);
    config
}

async fn list(kv: &mut KvClient<Channel>) -> Result<Listed, tonic::Status> {
    let all = kv
        .range(RangeRequest {
            key: Bytes::from_static(PREFIX),
            range_end: Bytes::from_static(PREFIX_END),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(all
        .kvs
        .into_iter()
        .map(|kv| {
            (
                kv.key,
                (kv.value, kv.mod_revision, kv.create_revision, kv.version),
            )
        })
        .collect())
}

/// (client keys, replica copies as (key, global mod revision)) stored on one shard.
async fn shard_contents(shard: &Etcd) -> Option<(BTreeSet<Bytes>, BTreeSet<(Bytes, i64)>)> {
    let mut kv = shard.kv().await.ok()?;
    let keys = kv
        .range(RangeRequest {
            key: Bytes::from_static(b"\0"),
            range_end: Bytes::from_static(RESERVED_PREFIX),
            keys_only: true,
            ..Default::default()
        })
        .await
        .ok()?
        .into_inner();
    let mut end = REPLICA_PREFIX.to_vec();
    *end.last_mut().unwrap() += 1;
    let copies = kv
        .range(RangeRequest {
            key: Bytes::from_static(REPLICA_PREFIX),
            range_end: Bytes::from(end),
            keys_only: true,
            ..Default::default()
        })
        .await
        .ok()?
        .into_inner();
    let copies = copies
        .kvs
        .iter()
        .map(|kv| {
            let rest = &kv.key[REPLICA_PREFIX.len()..];
            let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            let key = Bytes::copy_from_slice(&rest[4..4 + len]);
            let revision = i64::from_be_bytes(rest[4 + len..].try_into().unwrap());
            (key, revision)
        })
        .collect();
    Some((keys.kvs.into_iter().map(|kv| kv.key).collect(), copies))
}

/// Keys of `expected` that lack, on the shards themselves, a primary on
/// exactly one shard or a copy of exactly their version on another one.
async fn under_replicated(shards: &[&Etcd], expected: &Listed) -> Option<Vec<Bytes>> {
    let mut contents = Vec::new();
    for shard in shards {
        contents.push(shard_contents(shard).await?);
    }
    let missing = expected
        .iter()
        .filter(|(key, (_, mod_revision, _, _))| {
            let primaries: Vec<usize> = (0..contents.len())
                .filter(|i| contents[*i].0.contains(*key))
                .collect();
            let [primary] = primaries[..] else {
                return true;
            };
            !(0..contents.len())
                .any(|i| i != primary && contents[i].1.contains(&((*key).clone(), *mod_revision)))
        })
        .map(|(key, _)| key.clone())
        .collect();
    Some(missing)
}

async fn router_metric(router: &Router, name: &str) -> f64 {
    let (status, text) = http(router.admin_addr, "GET", "/metrics", "").await;
    assert_eq!(status, 200);
    metric(&text, name)
}

/// Waits until the router lists exactly `expected` and every key is
/// replicated on the shards, and the router's metric says so too.
async fn wait_whole(
    router: &Router,
    kv: &KvClient<Channel>,
    shards: &[&Etcd],
    expected: &Listed,
    after: &str,
) {
    wait_until(
        &format!("every key listed and replicated again after {after}"),
        Duration::from_secs(45),
        || {
            let mut kv = kv.clone();
            async move {
                list(&mut kv).await.ok().as_ref() == Some(expected)
                    && under_replicated(shards, expected)
                        .await
                        .is_some_and(|m| m.is_empty())
                    && router_metric(router, "ste_router_keys_under_replicated").await == 0.0
            }
        },
    )
    .await;
}

/// Every event under the prefix from `start` on.
async fn watch(
    channel: Channel,
    start: i64,
) -> (
    mpsc::Sender<WatchRequest>,
    mpsc::UnboundedReceiver<WatchResponse>,
) {
    let (req_tx, req_rx) = mpsc::channel(1);
    req_tx
        .send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: Bytes::from_static(PREFIX),
                range_end: Bytes::from_static(PREFIX_END),
                start_revision: start,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
    let mut stream = WatchClient::new(channel)
        .watch(ReceiverStream::new(req_rx))
        .await
        .unwrap()
        .into_inner();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(response)) = stream.message().await {
            if tx.send(response).is_err() {
                return;
            }
        }
    });
    (req_tx, rx)
}

/// Writes a sentinel and returns every event the watch delivered before it.
async fn events_until_sentinel(
    kv: &mut KvClient<Channel>,
    rx: &mut mpsc::UnboundedReceiver<WatchResponse>,
) -> Vec<String> {
    let sentinel = Bytes::from_static(b"/registry/pods/zz-sentinel");
    kv.put(PutRequest {
        key: sentinel.clone(),
        value: Bytes::from_static(b"s"),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut seen = Vec::new();
    loop {
        let response = tokio::time::timeout(Duration::from_secs(15), rx.recv())
            .await
            .expect("watch answer within 15s")
            .expect("watch open");
        assert!(
            !response.canceled,
            "watch canceled: {}",
            response.cancel_reason
        );
        for event in response.events {
            let kv = event.kv.unwrap();
            if kv.key == sentinel {
                return seen;
            }
            seen.push(format!(
                "{:?} {:?} at {}",
                event.r#type, kv.key, kv.mod_revision
            ));
        }
    }
}

async fn load(kv: &mut KvClient<Channel>) -> Listed {
    for i in 0..KEYS {
        let key = Bytes::from(format!("/registry/pods/default/pod-{i:04}"));
        kv.put(PutRequest {
            key,
            value: Bytes::from(format!("spec-{i}")),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    list(kv).await.unwrap()
}

/// Before the fix, the second failure deleted the keys whose only remaining
/// copy had been on the first shard (300 keys -> 253, with DELETE events no
/// client sent): the first shard's copies for other shards' keys were gone,
/// but the index still named it as their replica, so nothing copied them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_emptied_one_after_the_other_lose_nothing() {
    let mut shards = start_shards(3).await.unwrap();
    let router = Router::start_with(config(&shards, 2)).await.unwrap();
    let channel = router.channel().await.unwrap();
    let mut kv = KvClient::new(channel.clone());
    let expected = load(&mut kv).await;
    assert_eq!(expected.len(), KEYS);
    let start = expected.values().map(|v| v.1).max().unwrap() + 1;
    let (_keep, mut events) = watch(channel, start).await;
    wait_whole(
        &router,
        &kv,
        &shards.iter().collect::<Vec<_>>(),
        &expected,
        "loading",
    )
    .await;

    for victim in 0..shards.len() {
        shards[victim].restart_empty().await.unwrap();
        let name = shards[victim].name.clone();
        wait_whole(
            &router,
            &kv,
            &shards.iter().collect::<Vec<_>>(),
            &expected,
            &format!("{name} came back empty"),
        )
        .await;
    }
    let seen = events_until_sentinel(&mut kv, &mut events).await;
    assert!(
        seen.is_empty(),
        "restoring from copies must be invisible, yet the watch saw: {seen:?}"
    );
    assert_eq!(
        router_metric(&router, "ste_router_keys_under_replicated").await,
        0.0
    );
    router.stop().await.unwrap();
}

/// A shard loses its data while another is draining: the drained shard's
/// keys move off it, the emptied one gets its keys and copies back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_emptied_while_another_drains_loses_nothing() {
    let mut shards = start_shards(4).await.unwrap();
    let router = Router::start_with(config(&shards, 2)).await.unwrap();
    let channel = router.channel().await.unwrap();
    let mut kv = KvClient::new(channel.clone());
    let expected = load(&mut kv).await;
    let start = expected.values().map(|v| v.1).max().unwrap() + 1;
    let (_keep, mut events) = watch(channel, start).await;
    wait_whole(
        &router,
        &kv,
        &shards.iter().collect::<Vec<_>>(),
        &expected,
        "loading",
    )
    .await;

    let drained = shards[3].name.clone();
    let (status, answer) = http(
        router.admin_addr,
        "POST",
        &format!("/shards/{drained}/drain"),
        "",
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    shards[0].restart_empty().await.unwrap();
    wait_until(
        "the drained shard to leave",
        Duration::from_secs(60),
        || async {
            let (_, members) = http(router.admin_addr, "GET", "/shards", "").await;
            !members.contains(&format!("\"{drained}\""))
        },
    )
    .await;
    let remaining: Vec<&Etcd> = shards[..3].iter().collect();
    wait_whole(
        &router,
        &kv,
        &remaining,
        &expected,
        "a drain and an emptied shard",
    )
    .await;
    let (client_keys, _) = shard_contents(&shards[3]).await.unwrap();
    assert!(
        client_keys.is_empty(),
        "the drained shard still holds {} keys",
        client_keys.len()
    );
    let seen = events_until_sentinel(&mut kv, &mut events).await;
    assert!(
        seen.is_empty(),
        "a drain and a restore must be invisible, yet the watch saw: {seen:?}"
    );
    router.stop().await.unwrap();
}

/// An emptied shard under writes and reads (no replication): its lost keys
/// are announced deleted by ONE reconciliation (each one costs
/// kube-apiserver a relist), and meanwhile reads answer Unavailable, never
/// "required revision is a future revision" (the revision asked is not in
/// the future: the shard lost it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_shard_is_reconciled_once_and_reads_never_see_a_future_revision() {
    let mut shards = start_shards(2).await.unwrap();
    let router = Router::start_with(config(&shards, 1)).await.unwrap();
    let channel = router.channel().await.unwrap();
    let mut kv = KvClient::new(channel.clone());
    let loaded = load(&mut kv).await;
    let victim = shards[0].name.clone();
    let reconciled = format!("ste_router_reconciliations_total{{shard=\"{victim}\"}}");
    let checks = format!("ste_router_shard_checks_total{{shard=\"{victim}\"}}");
    assert_eq!(router_metric(&router, &reconciled).await, 0.0);
    let on_victim = shard_contents(&shards[0]).await.unwrap().0;
    assert!(!on_victim.is_empty());

    // Writers and readers keep going through the loss.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for worker in 0..3usize {
        let mut kv = kv.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                i += 1;
                let key = Bytes::from(format!(
                    "/registry/pods/default/pod-{:04}",
                    (i * 7 + worker) % KEYS
                ));
                let result = if worker == 0 {
                    kv.put(PutRequest {
                        key,
                        value: Bytes::from(format!("w{i}")),
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
                } else if i.is_multiple_of(3) {
                    list(&mut kv).await.map(|_| ())
                } else {
                    kv.range(RangeRequest {
                        key,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
                };
                if let Err(status) = result {
                    errors.push(format!("{:?}: {}", status.code(), status.message()));
                }
            }
            errors
        }));
    }
    wait_until("the workload to run", Duration::from_secs(10), || async {
        router_metric(&router, "ste_router_revision").await
            > loaded.values().map(|v| v.1).max().unwrap() as f64 + 20.0
    })
    .await;
    shards[0].restart_empty().await.unwrap();
    wait_until(
        "the emptied shard to be reconciled",
        Duration::from_secs(30),
        || async { router_metric(&router, &reconciled).await >= 1.0 },
    )
    .await;
    // Several more health checks of the shard, with writes landing on it, so
    // a second verdict on the same loss would have had its chance.
    let after = router_metric(&router, &checks).await;
    wait_until(
        "five more health checks of the shard",
        Duration::from_secs(30),
        || async { router_metric(&router, &checks).await >= after + 5.0 },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let mut errors = Vec::new();
    for task in tasks {
        errors.extend(task.await.unwrap());
    }
    assert_eq!(
        router_metric(&router, &reconciled).await,
        1.0,
        "one loss, one reconciliation"
    );
    let future: Vec<&String> = errors
        .iter()
        .filter(|e| e.contains("future revision"))
        .collect();
    assert!(
        future.is_empty(),
        "reads answered a future revision while the shard was reconciled: {future:?}"
    );
    let other: Vec<&String> = errors
        .iter()
        .filter(|e| !e.starts_with("Unavailable"))
        .collect();
    assert!(
        other.is_empty(),
        "only Unavailable is expected while the shard is reconciled: {other:?}"
    );
    // And the router serves everything again: the lost keys are gone (RF 1), the rest intact.
    let now = list(&mut kv).await.unwrap();
    for key in loaded.keys().filter(|k| !on_victim.contains(*k)) {
        assert!(
            now.contains_key(key),
            "{key:?} was not on the emptied shard, yet it is gone"
        );
    }
    router.stop().await.unwrap();
}
