//! Faults with real processes: router restarts during writes and watches,
//! shards killed and brought back with and without their data.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use ste_etcd_proto::mvccpb::event::EventType;
use ste_etcd_proto::pb::{
    kv_client::KvClient, lease_client::LeaseClient, watch_client::WatchClient,
    watch_request::RequestUnion, LeaseGrantRequest, LeaseLeasesRequest, PutRequest, RangeRequest,
    WatchCreateRequest, WatchRequest, WatchResponse,
};
use ste_testkit::{shapes, shard_specs, start_shards, wait_until, Router};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

const PODS: &[u8] = b"/registry/pods/";
const PODS_END: &[u8] = b"/registry/pods0";

fn lazy_channel(endpoint: &str) -> Channel {
    Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_lazy()
}

async fn list(
    kv: &mut KvClient<Channel>,
) -> Result<BTreeMap<Bytes, (Bytes, i64, i64)>, tonic::Status> {
    let r = kv
        .range(RangeRequest {
            key: Bytes::from_static(PODS),
            range_end: Bytes::from_static(PODS_END),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(
        r.count as usize,
        r.kvs.len(),
        "count must match the listed keys"
    );
    Ok(r.kvs
        .into_iter()
        .map(|kv| (kv.key, (kv.value, kv.mod_revision, kv.create_revision)))
        .collect())
}

async fn watch(
    channel: Channel,
    start_revision: i64,
) -> mpsc::UnboundedReceiver<Result<WatchResponse, tonic::Status>> {
    let (req_tx, req_rx) = mpsc::channel(4);
    req_tx
        .send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: Bytes::from_static(PODS),
                range_end: Bytes::from_static(PODS_END),
                start_revision,
                prev_kv: true,
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
        let _keep = req_tx;
        loop {
            match stream.message().await {
                Ok(Some(r)) => {
                    if tx.send(Ok(r)).is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(status) => {
                    let _ = tx.send(Err(status));
                    return;
                }
            }
        }
    });
    rx
}

async fn next_response(
    rx: &mut mpsc::UnboundedReceiver<Result<WatchResponse, tonic::Status>>,
) -> Result<WatchResponse, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(15), rx.recv())
        .await
        .expect("watch answer within 15s")
        .expect("watch stream open")
}

fn pod(i: usize) -> Bytes {
    Bytes::from(format!("/registry/pods/default/pod-{i:04}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_restart_during_writes_loses_no_acknowledged_write() {
    let shards = start_shards(3).await.unwrap();
    let router = Router::start(shard_specs(&shards)).await.unwrap();
    let addr = router.addr;
    let channel = lazy_channel(&router.endpoint());
    let mut kv = KvClient::new(channel.clone());

    // A lease-attached key must survive too (events use leases).
    let lease = LeaseClient::new(channel.clone())
        .lease_grant(LeaseGrantRequest { ttl: 3600, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id;
    kv.put(PutRequest {
        key: Bytes::from_static(b"/registry/pods/default/leased"),
        value: Bytes::from_static(b"l"),
        lease,
        ..Default::default()
    })
    .await
    .unwrap();

    let mut events = watch(channel.clone(), 0).await;
    assert!(next_response(&mut events).await.unwrap().created);

    // A writer that keeps going through the restart, retrying what failed.
    let writer = tokio::spawn({
        let mut kv = kv.clone();
        async move {
            let mut acknowledged = Vec::new();
            for i in 0..150 {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                loop {
                    let put = PutRequest {
                        key: pod(i),
                        value: Bytes::from(format!("v{i}")),
                        ..Default::default()
                    };
                    match kv.put(put).await {
                        Ok(r) => {
                            acknowledged.push((i, r.into_inner().header.unwrap().revision));
                            break;
                        }
                        Err(status) => {
                            assert!(
                                tokio::time::Instant::now() < deadline,
                                "write {i} kept failing: {status}"
                            );
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }
            acknowledged
        }
    });

    wait_until(
        "40 writes before the restart",
        Duration::from_secs(20),
        || {
            let mut kv = kv.clone();
            async move { list(&mut kv).await.map(|l| l.len() > 40).unwrap_or(false) }
        },
    )
    .await;
    let before = list(&mut kv).await.unwrap();
    router.stop().await.unwrap();
    // The open watch ends with an error the client can resume from.
    loop {
        match next_response(&mut events).await {
            Ok(r) => assert!(!r.canceled, "no cancel expected before the stream ends"),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable);
                break;
            }
        }
    }
    let router = Router::start_at(Router::test_config(shard_specs(&shards)), addr)
        .await
        .unwrap();

    let acknowledged = writer.await.unwrap();
    assert_eq!(acknowledged.len(), 150);
    let revisions: Vec<i64> = acknowledged.iter().map(|(_, r)| *r).collect();
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "revisions went backwards across the restart: {revisions:?}"
    );

    let after = list(&mut kv).await.unwrap();
    for (key, (value, mod_revision, create_revision)) in &before {
        let (v, m, c) = after
            .get(key)
            .unwrap_or_else(|| panic!("{key:?} lost by the restart"));
        // Keys not rewritten after the restart keep their revisions exactly.
        if !acknowledged
            .iter()
            .any(|(i, r)| pod(*i) == key && r > mod_revision)
        {
            assert_eq!(
                (v, m, c),
                (value, mod_revision, create_revision),
                "{key:?} changed"
            );
        }
    }
    for (i, _) in &acknowledged {
        assert_eq!(
            after.get(&pod(*i)).map(|(v, _, _)| v.clone()),
            Some(Bytes::from(format!("v{i}")))
        );
    }
    let leased = after
        .get(&Bytes::from_static(b"/registry/pods/default/leased"))
        .expect("leased key kept");
    assert_eq!(leased.0, Bytes::from_static(b"l"));
    let leases = LeaseClient::new(channel.clone())
        .lease_leases(LeaseLeasesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        leases.leases.iter().any(|l| l.id == lease),
        "lease re-created after restart"
    );

    // History from before the restart is gone: clients relist (410 in kube-apiserver).
    let old = acknowledged[0].1;
    let mut stale = watch(channel.clone(), old).await;
    assert!(next_response(&mut stale).await.unwrap().created);
    let compacted = next_response(&mut stale).await.unwrap();
    assert!(compacted.canceled && compacted.compact_revision > old);

    // The rebuilt index answers optimistic concurrency with the old revisions.
    let key = pod(3);
    let current = after[&key].1;
    let txn = shapes::update(&key, current, &Bytes::from_static(b"updated"));
    let r = kv.txn(txn).await.unwrap().into_inner();
    assert!(r.succeeded);
    assert!(r.header.unwrap().revision > *revisions.last().unwrap());
    router.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_shard_fails_only_its_keys_and_comes_back() {
    let mut shards = start_shards(3).await.unwrap();
    let router = Router::start(shard_specs(&shards)).await.unwrap();
    let channel = lazy_channel(&router.endpoint());
    let mut kv = KvClient::new(channel.clone());
    for i in 0..60 {
        kv.put(PutRequest {
            key: pod(i),
            value: Bytes::from(format!("v{i}")),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let before = list(&mut kv).await.unwrap();
    // Which keys shard-1 holds, asked of the shard itself.
    let on_victim: Vec<Bytes> = shards[1]
        .kv()
        .await
        .unwrap()
        .range(RangeRequest {
            key: Bytes::from_static(PODS),
            range_end: Bytes::from_static(PODS_END),
            keys_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert!(
        on_victim.len() > 5 && on_victim.len() < 40,
        "shard-1 holds {} of 60 keys",
        on_victim.len()
    );
    let survivor = (0..60).map(pod).find(|k| !on_victim.contains(k)).unwrap();

    let mut events = watch(channel.clone(), 0).await;
    assert!(next_response(&mut events).await.unwrap().created);

    shards[1].kill();
    // A write goes to the shard: refused, naming it.
    let err = kv
        .put(PutRequest {
            key: on_victim[1].clone(),
            value: Bytes::from_static(b"x"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(
        err.message().contains("shard-1"),
        "the error names the shard: {err}"
    );
    // Once the router knows the shard is down, a read of its keys is refused
    // too: the value cache answers only for settled shards (before the
    // router notices, it may still answer the last committed value, which
    // is what a read just before the kill would have returned).
    let err = kv
        .range(RangeRequest {
            key: on_victim[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(
        err.message().contains("shard-1"),
        "the error names the shard: {err}"
    );
    // A list would miss keys: it is refused rather than answered wrong.
    assert_eq!(list(&mut kv).await.unwrap_err().code(), Code::Unavailable);
    // Other keys keep working, and their events flow.
    kv.put(PutRequest {
        key: survivor.clone(),
        value: Bytes::from_static(b"still here"),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = next_response(&mut events).await.unwrap();
    assert_eq!(r.events.len(), 1);
    assert_eq!(r.events[0].kv.as_ref().unwrap().key, survivor);

    // Back with its data: nothing changed, no events.
    shards[1].restart().await.unwrap();
    wait_until(
        "the shard's keys to be served again",
        Duration::from_secs(20),
        || {
            let mut kv = kv.clone();
            async move { list(&mut kv).await.is_ok() }
        },
    )
    .await;
    let after = list(&mut kv).await.unwrap();
    for key in &on_victim {
        assert_eq!(after[key], before[key], "{key:?} changed across the outage");
    }

    // Back without its data (a RAM disk after a reboot): its keys are
    // announced deleted, once each, so controllers recreate them.
    shards[1].restart_empty().await.unwrap();
    let mut deleted = Vec::new();
    while deleted.len() < on_victim.len() {
        let r = next_response(&mut events).await.unwrap();
        for event in r.events {
            assert_eq!(
                event.r#type,
                EventType::Delete as i32,
                "unexpected event {event:?}"
            );
            let kv = event.kv.unwrap();
            let prev = event
                .prev_kv
                .expect("a lost key's DELETE carries its last value when the history still has it");
            assert_eq!(prev.key, kv.key);
            deleted.push(kv.key);
        }
    }
    deleted.sort();
    let mut expected = on_victim.clone();
    expected.sort();
    assert_eq!(deleted, expected);
    let remaining = list(&mut kv).await.unwrap();
    assert_eq!(remaining.len(), 60 - on_victim.len());
    assert!(on_victim.iter().all(|k| !remaining.contains_key(k)));
    // The lost keys can be created again.
    kv.put(PutRequest {
        key: on_victim[0].clone(),
        value: Bytes::from_static(b"recreated"),
        ..Default::default()
    })
    .await
    .unwrap();
    router.stop().await.unwrap();
}

/// A shard write the router could not confirm may or may not have happened;
/// the router then reconciles the shard with its index. Here the shard is
/// changed behind the router's back (as an applied write with an unknown
/// outcome would leave it): one key rewritten with the same bytes, one key
/// the router never announced. Reconciliation reads keys only and fetches
/// just the changed ones; it must announce exactly the unknown key (a PUT),
/// leave the rewritten-but-equal key silent and keep every other key as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_announces_exactly_what_changed_on_the_shard() {
    let shards = start_shards(1).await.unwrap();
    let router = Router::start(shard_specs(&shards)).await.unwrap();
    let channel = lazy_channel(&router.endpoint());
    let mut kv = KvClient::new(channel.clone());
    for i in 0..40 {
        kv.put(PutRequest {
            key: pod(i),
            value: Bytes::from(format!("v{i}")),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let before = list(&mut kv).await.unwrap();
    let start = before.values().map(|(_, m, _)| *m).max().unwrap() + 1;
    let mut events = watch(channel.clone(), start).await;
    assert!(next_response(&mut events).await.unwrap().created);

    // Behind the router's back, with values only the router could have written.
    let mut direct = shards[0].kv().await.unwrap();
    let stored = |key: Bytes| {
        let mut direct = direct.clone();
        async move {
            direct
                .range(RangeRequest {
                    key,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .kvs
                .remove(0)
                .value
        }
    };
    let same = stored(pod(0)).await;
    let copied = stored(pod(1)).await;
    let changed = stored(pod(3)).await;
    direct
        .put(PutRequest {
            key: pod(0),
            value: same,
            ..Default::default()
        })
        .await
        .unwrap();
    let ghost = Bytes::from_static(b"/registry/pods/default/ghost");
    direct
        .put(PutRequest {
            key: ghost.clone(),
            value: copied,
            ..Default::default()
        })
        .await
        .unwrap();
    // A key the router knows, changed to another value (as a write whose
    // answer was lost would leave it): announced as an update of what
    // watchers knew, with that as prev_kv (kube-apiserver's watch refuses a
    // non-create event without one).
    direct
        .put(PutRequest {
            key: pod(2),
            value: changed,
            ..Default::default()
        })
        .await
        .unwrap();

    // The router's next write to pod 0 fails its fence: the shard is reconciled.
    let (_, rev0, _) = before[&pod(0)];
    let refused = kv
        .txn(shapes::update(&pod(0), rev0, &Bytes::from_static(b"after")))
        .await;
    assert!(
        refused.is_err(),
        "a write fenced on a stale shard revision must not be acknowledged: {refused:?}"
    );
    wait_until(
        "the unknown key to be announced",
        Duration::from_secs(20),
        || {
            let mut kv = kv.clone();
            let ghost = ghost.clone();
            async move { list(&mut kv).await.is_ok_and(|l| l.contains_key(&ghost)) }
        },
    )
    .await;
    let r = next_response(&mut events).await.unwrap();
    assert_eq!(
        r.events.len(),
        2,
        "one event for the unknown key, one for the changed one: {:?}",
        r.events
    );
    // Events of one revision come in key order: "ghost" < "pod-0002".
    let (ghost_event, updated_event) = (&r.events[0], &r.events[1]);
    assert_eq!(ghost_event.r#type, EventType::Put as i32);
    let announced = ghost_event.kv.as_ref().unwrap();
    assert_eq!(announced.key, ghost);
    assert_eq!(
        announced.value,
        Bytes::from_static(b"v1"),
        "it carries the value the shard holds"
    );
    assert_eq!(
        (announced.create_revision, announced.version),
        (announced.mod_revision, 1),
        "an unknown key is created"
    );
    assert!(ghost_event.prev_kv.is_none());
    let updated = updated_event.kv.as_ref().unwrap();
    assert_eq!(
        (updated.key.clone(), updated.value.clone()),
        (pod(2), Bytes::from_static(b"v3"))
    );
    assert_eq!(
        updated.mod_revision, announced.mod_revision,
        "one reconciliation, one revision"
    );
    let (_, rev2, created2) = before[&pod(2)];
    assert_eq!(
        (updated.create_revision, updated.version),
        (created2, 2),
        "its creation goes on, its version steps"
    );
    let prev = updated_event
        .prev_kv
        .as_ref()
        .expect("an update carries prev_kv");
    assert_eq!(
        (prev.value.clone(), prev.mod_revision),
        (Bytes::from_static(b"v2"), rev2),
        "prev_kv is what watchers knew"
    );

    let after = list(&mut kv).await.unwrap();
    assert_eq!(after.len(), before.len() + 1);
    for (key, was) in before.iter().filter(|(k, _)| **k != pod(2)) {
        assert_eq!(
            &after[key], was,
            "{key:?} changed although its meaning on the shard did not"
        );
    }
    // Pod 0 is writable again at the revision clients know.
    let updated = kv
        .txn(shapes::update(&pod(0), rev0, &Bytes::from_static(b"after")))
        .await
        .unwrap()
        .into_inner();
    assert!(updated.succeeded);
    let (status, metrics) =
        ste_testkit::workload::http(router.admin_addr, "GET", "/metrics", "").await;
    assert_eq!(status, 200);
    let reconciled = ste_testkit::workload::metric(
        &metrics,
        &format!(
            "ste_router_reconciliations_total{{shard=\"{}\"}}",
            shards[0].name
        ),
    );
    assert!(reconciled >= 1.0, "the shard was reconciled ({reconciled})");
    router.stop().await.unwrap();
}

/// A shard's etcd recreated empty (a rebooted node's RAM disk) with the same
/// cluster and member ids, and written to before any health check looked at
/// it: the write's own shard revision, below what the router saw before,
/// must give the loss away. Every key the shard lost is then announced
/// deleted, the new key stays, and the shard's old history is not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_recreated_empty_and_written_before_any_check_is_still_reconciled() {
    let mut shards = start_shards(1).await.unwrap();
    let mut config = Router::test_config(shard_specs(&shards));
    // No periodic check: only the writes themselves can notice.
    config.maintain_interval = Duration::from_secs(3600);
    let router = Router::start_with(config).await.unwrap();
    let channel = lazy_channel(&router.endpoint());
    let mut kv = KvClient::new(channel.clone());
    for i in 0..20 {
        kv.put(PutRequest {
            key: pod(i),
            value: Bytes::from(format!("v{i}")),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let before = list(&mut kv).await.unwrap();
    let last = before.values().map(|(_, m, _)| *m).max().unwrap();
    let mut events = watch(channel.clone(), last + 1).await;
    assert!(next_response(&mut events).await.unwrap().created);

    shards[0].restart_empty().await.unwrap();
    let fresh = Bytes::from_static(b"/registry/pods/default/fresh");
    let later = pod(100);
    // The first requests may meet the reconnect; each either fails or lands.
    wait_until(
        "a create on the recreated shard",
        Duration::from_secs(20),
        || {
            let mut kv = kv.clone();
            let fresh = fresh.clone();
            async move {
                kv.txn(shapes::create(&fresh, &Bytes::from_static(b"new")))
                    .await
                    .is_ok_and(|r| r.into_inner().succeeded)
            }
        },
    )
    .await;
    wait_until("a second write", Duration::from_secs(20), || {
        let mut kv = kv.clone();
        let later = later.clone();
        async move {
            kv.put(PutRequest {
                key: later,
                value: Bytes::from_static(b"later"),
                ..Default::default()
            })
            .await
            .is_ok()
        }
    })
    .await;

    let mut deleted = Vec::new();
    let mut put = Vec::new();
    while deleted.len() < before.len() || put.len() < 2 {
        for event in next_response(&mut events).await.unwrap().events {
            let key = event.kv.unwrap().key;
            if event.r#type == EventType::Delete as i32 {
                deleted.push(key);
            } else {
                put.push(key);
            }
        }
    }
    deleted.sort();
    assert_eq!(
        deleted,
        before.keys().cloned().collect::<Vec<_>>(),
        "every lost key announced deleted, once"
    );
    assert_eq!(put, vec![fresh.clone(), later.clone()]);
    let now = list(&mut kv).await.unwrap();
    assert_eq!(now.keys().cloned().collect::<Vec<_>>(), vec![fresh, later]);
    // The old history is gone with the etcd: not answered from the new one.
    let old = kv
        .range(RangeRequest {
            key: Bytes::from_static(PODS),
            range_end: Bytes::from_static(PODS_END),
            revision: last,
            ..Default::default()
        })
        .await;
    assert!(
        old.is_err(),
        "a read at a revision from before the loss must fail, got {old:?}"
    );
    router.stop().await.unwrap();
}
