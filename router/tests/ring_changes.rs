//! Shards joining, draining and dying while clients write and watch, with
//! real etcd processes. After each change the router's contents, its watch
//! stream, the shards' own contents and an independent record of
//! acknowledged writes must all agree.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use ste_etcd_proto::pb::{kv_client::KvClient, RangeRequest};
use ste_testkit::workload::{
    assert_same, current_revision, http, key, keys_at, list_at, list_paged, metric, placement,
    wait_no_copies, Event, Stored, Workload,
};
use ste_testkit::{shapes, shard_specs, start_shards, wait_until, Etcd, Router};
use tonic::transport::Channel;

async fn members(router: &Router) -> serde_json::Value {
    let (status, body) = http(router.admin_addr, "GET", "/shards", "").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn keys_to_move(router: &Router) -> f64 {
    let (_, text) = http(router.admin_addr, "GET", "/metrics", "").await;
    metric(&text, "ste_router_keys_to_move")
}

/// Keys stored directly on one shard.
async fn shard_keys(shard: &Etcd) -> BTreeSet<Bytes> {
    keys_at(&shard.endpoint()).await
}

fn endpoints(shards: &[&Etcd]) -> Vec<String> {
    shards.iter().map(|s| s.endpoint()).collect()
}

/// Waits until no key is on two shards (copies left by interrupted moves
/// are deleted), checks that every key is where the ring of `members`
/// (name, shard) places it, and returns that placement.
async fn settled_placement(members: &[(&str, &Etcd)]) -> impl Fn(&[u8]) -> String {
    let contents = wait_no_copies(
        &members
            .iter()
            .map(|(_, s)| s.endpoint())
            .collect::<Vec<_>>(),
    )
    .await;
    let by_name: BTreeMap<&str, BTreeSet<Bytes>> = members
        .iter()
        .map(|(name, shard)| (*name, contents[&shard.endpoint()].clone()))
        .collect();
    let names: Vec<&str> = members.iter().map(|(name, _)| *name).collect();
    placement(&names, &by_name)
}

fn test_config(shards: &[Etcd]) -> ste_router::RouterConfig {
    test_config_rf(shards, 1)
}

fn test_config_rf(shards: &[Etcd], replication_factor: u8) -> ste_router::RouterConfig {
    let mut config = Router::test_config(shard_specs(shards));
    config.store.replication_factor = replication_factor;
    config.membership.interval = Duration::from_millis(100);
    config.membership.lost_after = Duration::from_secs(2);
    config.maintain_interval = Duration::from_millis(200);
    config
}

/// SIGKILL a registered shard (one of three members) and wait until the router has declared it lost.
async fn kill_and_wait_lost(router: &Router, shard: &mut Etcd) {
    shard.kill();
    wait_until(
        "the killed shard to be declared lost",
        Duration::from_secs(30),
        || async { members(router).await["shards"].as_array().unwrap().len() == 2 },
    )
    .await;
}

/// A router over `shards`, and a workload already 200 writes past its initial keys.
async fn router_with_workload(
    shards: &[Etcd],
    replication_factor: u8,
) -> (Router, KvClient<Channel>, Workload) {
    let router = Router::start_with(test_config_rf(shards, replication_factor))
        .await
        .unwrap();
    let channel = router.channel().await.unwrap();
    let kv = KvClient::new(channel.clone());
    let workload = Workload::start(channel, 100).await;
    workload.run_for(200).await;
    (router, kv, workload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_join_during_writes_and_keys_move_invisibly() {
    join_during_writes(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_join_during_writes_with_replication() {
    join_during_writes(2).await;
}

async fn join_during_writes(replication_factor: u8) {
    let bootstrap = start_shards(1).await.unwrap();
    let joining = start_shards(2).await.unwrap();
    let (router, mut kv, workload) = router_with_workload(&bootstrap, replication_factor).await;
    // A snapshot taken before the join must read the same after it.
    let before_revision = current_revision(&mut kv).await;
    let before = list_paged(&mut kv, before_revision).await.unwrap();

    for (i, shard) in joining.iter().enumerate() {
        let body = format!(
            r#"{{"name": "worker-{i}", "endpoint": "{}"}}"#,
            shard.endpoint()
        );
        let (status, answer) = http(router.admin_addr, "POST", "/shards", &body).await;
        assert_eq!(status, 202, "{answer}");
    }
    wait_until(
        "both shards to join and their keys to move",
        Duration::from_secs(60),
        || async {
            members(&router).await["shards"].as_array().unwrap().len() == 3
                && keys_to_move(&router).await == 0.0
        },
    )
    .await;
    workload.run_for(200).await;
    let mut outcome = workload.finish(&mut kv).await;
    assert!(
        outcome.failed.is_empty(),
        "writes failed during a join: {:?}",
        outcome.failed
    );

    // Moves are invisible: every event is an acknowledged write, and every
    // key keeps its revisions and version (no excuse for anything).
    outcome
        .check(
            &mut kv,
            &endpoints(&[&bootstrap[0], &joining[0], &joining[1]]),
            |_| false,
        )
        .await;
    for shard in &joining {
        assert!(
            !shard_keys(shard).await.is_empty(),
            "shard {} got no keys",
            shard.name
        );
    }
    assert_same(
        &before,
        &outcome.history(|_| false).state_at(before_revision),
        "the snapshot from before the join is not the writes' state then",
    );
    assert_same(
        &list_paged(&mut kv, before_revision).await.unwrap(),
        &before,
        "a paged snapshot from before the join changed",
    );
    assert_same(
        &list_at(&mut kv, before_revision).await.unwrap(),
        &before,
        "a snapshot from before the join changed",
    );
    // Single-key reads at the old revision find moved keys too.
    for (key, stored) in before.iter().take(40) {
        let got = kv
            .range(RangeRequest {
                key: key.clone(),
                revision: before_revision,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            got.kvs.into_iter().next().map(Stored::from).as_ref(),
            Some(stored),
            "old read of {key:?}"
        );
    }
    let (_, metrics) = http(router.admin_addr, "GET", "/metrics", "").await;
    assert!(
        metric(&metrics, "ste_router_keys_moved_total") > 0.0,
        "{metrics}"
    );
    router.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_shard_hands_over_every_key_during_writes() {
    drain_during_writes(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_shard_hands_over_every_key_with_replication() {
    drain_during_writes(2).await;
}

async fn drain_during_writes(replication_factor: u8) {
    let shards = start_shards(3).await.unwrap();
    let (router, mut kv, workload) = router_with_workload(&shards, replication_factor).await;
    let before_revision = current_revision(&mut kv).await;
    let drained = &shards[1];
    assert!(!shard_keys(drained).await.is_empty());

    let (status, answer) = http(
        router.admin_addr,
        "POST",
        &format!("/shards/{}/drain", drained.name),
        "",
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    wait_until(
        "the drained shard to leave",
        Duration::from_secs(60),
        || async {
            !members(&router).await["shards"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["name"] == drained.name.as_str())
        },
    )
    .await;
    assert!(
        shard_keys(drained).await.is_empty(),
        "keys were left on the drained shard"
    );
    workload.run_for(200).await;
    let mut outcome = workload.finish(&mut kv).await;
    assert!(
        outcome.failed.is_empty(),
        "writes failed during a drain: {:?}",
        outcome.failed
    );
    // Moves are invisible: no excuse for anything.
    outcome
        .check(&mut kv, &endpoints(&[&shards[0], &shards[2]]), |_| false)
        .await;
    // Reading before the removal would need the drained shard: 410 for kube-apiserver.
    let old = list_at(&mut kv, before_revision).await.unwrap_err();
    assert!(old.message().contains("compacted"), "{old:?}");
    // Unknown shards and bad joins are refused clearly.
    assert_eq!(
        http(router.admin_addr, "POST", "/shards/nope/drain", "")
            .await
            .0,
        404
    );
    assert_eq!(
        http(router.admin_addr, "POST", "/shards", "{\"name\": \"x\"}")
            .await
            .0,
        400
    );
    assert_eq!(
        http(
            router.admin_addr,
            "POST",
            "/shards",
            r#"{"name": "x", "endpoint": "127.0.0.1:1"}"#
        )
        .await
        .0,
        400
    );
    router.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_registered_shard_is_declared_lost_with_delete_events() {
    let bootstrap = start_shards(1).await.unwrap();
    let mut workers = start_shards(2).await.unwrap();
    let router = Router::start_with(test_config(&bootstrap)).await.unwrap();
    for (i, shard) in workers.iter().enumerate() {
        let body = format!(
            r#"{{"name": "worker-{i}", "endpoint": "{}"}}"#,
            shard.endpoint()
        );
        assert_eq!(
            http(router.admin_addr, "POST", "/shards", &body).await.0,
            202
        );
    }
    wait_until("workers to join", Duration::from_secs(30), || async {
        members(&router).await["shards"].as_array().unwrap().len() == 3
    })
    .await;
    let channel = router.channel().await.unwrap();
    let mut kv = KvClient::new(channel.clone());
    let workload = Workload::start(channel.clone(), 100).await;
    workload.run_for(200).await;
    wait_until(
        "keys to settle on their shards",
        Duration::from_secs(30),
        || async { keys_to_move(&router).await == 0.0 },
    )
    .await;
    // Which keys the dead shard holds when it dies: the ring's placement,
    // checked first against every shard's contents.
    let placed = settled_placement(&[
        ("shard-0", &bootstrap[0]),
        ("worker-0", &workers[0]),
        ("worker-1", &workers[1]),
    ])
    .await;
    let on_dead = |key: &[u8]| placed(key) == "worker-0";
    let killed_at = current_revision(&mut kv).await;

    kill_and_wait_lost(&router, &mut workers[0]).await;
    workload.run_for(200).await;
    let mut outcome = workload.finish(&mut kv).await;
    let acked_at: BTreeSet<(i64, Bytes)> = outcome
        .acked
        .iter()
        .map(|a| (a.revision, a.key.clone()))
        .collect();
    let lost_revision = outcome
        .events
        .iter()
        .find(|e| {
            e.revision > killed_at
                && e.value.is_none()
                && on_dead(&e.key)
                && !acked_at.contains(&(e.revision, e.key.clone()))
        })
        .expect("the lost shard's keys got no DELETE events")
        .revision;
    // The one excuse besides writes of unknown outcome (checked by value):
    // the dead shard's keys are deleted, all at one revision.
    let lost = |e: &Event| e.value.is_none() && e.revision == lost_revision && on_dead(&e.key);
    outcome
        .check(&mut kv, &endpoints(&[&bootstrap[0], &workers[1]]), lost)
        .await;
    // Exactly the keys the dead shard held then were deleted then.
    let held: BTreeSet<Bytes> = outcome
        .history(lost)
        .state_at(lost_revision - 1)
        .into_keys()
        .filter(|k| on_dead(k))
        .collect();
    let deleted: BTreeSet<Bytes> = outcome
        .events
        .iter()
        .filter(|e| e.revision == lost_revision)
        .map(|e| e.key.clone())
        .collect();
    assert_eq!(
        deleted, held,
        "the events at {lost_revision} are not exactly the DELETEs of the lost shard's keys"
    );
    let (_, metrics) = http(router.admin_addr, "GET", "/metrics", "").await;
    assert_eq!(
        metric(&metrics, "ste_router_keys_lost_total"),
        deleted.len() as f64
    );
    router.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_shards_are_remembered_across_router_restarts() {
    let bootstrap = start_shards(1).await.unwrap();
    let worker = start_shards(1).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&bootstrap);
    config.membership.cache_file = Some(dir.path().join("members.json"));
    let router = Router::start_with(config.clone()).await.unwrap();
    let body = format!(
        r#"{{"name": "worker-0", "endpoint": "{}"}}"#,
        worker[0].endpoint()
    );
    assert_eq!(
        http(router.admin_addr, "POST", "/shards", &body).await.0,
        202
    );
    let mut kv = KvClient::new(router.channel().await.unwrap());
    let mut expected = BTreeMap::new();
    for i in 0..200 {
        let k = key(0, i);
        let v = Bytes::from(format!("v{i}"));
        let answer = kv.txn(shapes::create(&k, &v)).await.unwrap().into_inner();
        assert!(answer.succeeded);
        let revision = answer.header.unwrap().revision;
        expected.insert(
            k,
            Stored {
                value: v,
                mod_revision: revision,
                create_revision: revision,
                version: 1,
                lease: 0,
            },
        );
    }
    wait_until(
        "keys to settle and the cache to be written",
        Duration::from_secs(30),
        || async {
            keys_to_move(&router).await == 0.0
                && std::fs::read_to_string(dir.path().join("members.json"))
                    .is_ok_and(|t| t.contains("worker-0"))
        },
    )
    .await;
    assert!(!shard_keys(&worker[0]).await.is_empty());
    router.stop().await.unwrap();

    let router = Router::start_with(config).await.unwrap();
    let mut kv = KvClient::new(router.channel().await.unwrap());
    // Every key, with its revisions, as written before the restart.
    assert_same(
        &list_at(&mut kv, 0).await.unwrap(),
        &expected,
        "keys on the registered shard after the restart",
    );
    let shards = members(&router).await;
    assert!(
        shards["shards"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "worker-0" && s["origin"] == "registered"),
        "{shards}"
    );
    router.stop().await.unwrap();
}

async fn under_replicated(router: &Router) -> f64 {
    let (_, text) = http(router.admin_addr, "GET", "/metrics", "").await;
    metric(&text, "ste_router_keys_under_replicated")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replication_a_killed_shard_loses_nothing() {
    // STE_TEST_LOG=ste_router=debug shows the router's side when this fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("STE_TEST_LOG"))
        .with_test_writer()
        .try_init();
    let bootstrap = start_shards(1).await.unwrap();
    let mut workers = start_shards(2).await.unwrap();
    let router = Router::start_with(test_config_rf(&bootstrap, 2))
        .await
        .unwrap();
    for (i, shard) in workers.iter().enumerate() {
        let body = format!(
            r#"{{"name": "worker-{i}", "endpoint": "{}"}}"#,
            shard.endpoint()
        );
        assert_eq!(
            http(router.admin_addr, "POST", "/shards", &body).await.0,
            202
        );
    }
    wait_until("workers to join", Duration::from_secs(30), || async {
        members(&router).await["shards"].as_array().unwrap().len() == 3
    })
    .await;
    let channel = router.channel().await.unwrap();
    let mut kv = KvClient::new(channel.clone());
    let workload = Workload::start(channel.clone(), 100).await;
    workload.run_for(200).await;
    wait_until(
        "keys placed and every key replicated",
        Duration::from_secs(30),
        || async { keys_to_move(&router).await == 0.0 && under_replicated(&router).await == 0.0 },
    )
    .await;
    let placed = settled_placement(&[
        ("shard-0", &bootstrap[0]),
        ("worker-0", &workers[0]),
        ("worker-1", &workers[1]),
    ])
    .await;
    let killed_at = current_revision(&mut kv).await;

    kill_and_wait_lost(&router, &mut workers[0]).await;
    workload.run_for(200).await;
    let mut outcome = workload.finish(&mut kv).await;
    // No excuse: no DELETE for the dead shard's keys, and the only events
    // nobody acknowledged are the very writes whose outcome the client did
    // not learn. The restored keys keep their revisions and version.
    let state = outcome
        .check(&mut kv, &endpoints(&[&bootstrap[0], &workers[1]]), |_| {
            false
        })
        .await;
    // Keys on the dead shard at the kill that no write touched since were
    // restored from their copies, unchanged.
    let survivors = outcome.untouched_since(killed_at, |k| placed(k) == "worker-0");
    assert!(
        !survivors.is_empty(),
        "no key of the dead shard was left untouched"
    );
    for (key, then) in &survivors {
        assert_eq!(state.get(key), Some(then), "{key:?} from the dead shard");
    }
    let survivors = survivors.len();
    let (_, metrics) = http(router.admin_addr, "GET", "/metrics", "").await;
    assert_eq!(
        metric(&metrics, "ste_router_keys_lost_total"),
        0.0,
        "lost {} restored {}",
        metric(&metrics, "ste_router_keys_lost_total"),
        metric(&metrics, "ste_router_keys_restored_total")
    );
    let restored = metric(&metrics, "ste_router_keys_restored_total");
    assert!(
        restored >= survivors as f64 && restored > 0.0,
        "restored {restored}, survivors {survivors}"
    );
    // And copies exist again for every key once the repair pass ran.
    wait_until(
        "every key replicated again",
        Duration::from_secs(30),
        || async { under_replicated(&router).await == 0.0 },
    )
    .await;
    router.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replication_a_shard_that_comes_back_empty_gets_its_keys_back() {
    let mut shards = start_shards(3).await.unwrap();
    let (router, mut kv, workload) = router_with_workload(&shards, 2).await;
    wait_until("every key replicated", Duration::from_secs(30), || async {
        under_replicated(&router).await == 0.0
    })
    .await;
    let emptied: BTreeSet<Bytes> = shard_keys(&shards[1]).await;
    assert!(!emptied.is_empty());

    // Its RAM disk is gone (node reboot): same name and address, no data.
    shards[1].restart_empty().await.unwrap();
    wait_until(
        "the shard to hold its keys again",
        Duration::from_secs(30),
        || async { shard_keys(&shards[1]).await.len() >= emptied.len() / 2 },
    )
    .await;
    workload.run_for(200).await;
    let mut outcome = workload.finish(&mut kv).await;
    // No excuse: the emptied shard's keys come back from their copies
    // without events; the only events nobody acknowledged are the very
    // writes whose outcome the client did not learn.
    outcome
        .check(
            &mut kv,
            &endpoints(&[&shards[0], &shards[1], &shards[2]]),
            |_| false,
        )
        .await;
    let (_, metrics) = http(router.admin_addr, "GET", "/metrics", "").await;
    assert_eq!(metric(&metrics, "ste_router_keys_lost_total"), 0.0);
    assert!(metric(&metrics, "ste_router_keys_restored_total") > 0.0);
    router.stop().await.unwrap();
}
