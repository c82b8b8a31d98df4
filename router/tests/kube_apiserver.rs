//! The real kube-apiserver (built from k8s.io/kubernetes at the pinned
//! version) storing pods through the router over 3 shards, everything else
//! in a durable etcd, as `--etcd-servers-overrides=/pods#…` installs it.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use ste_etcd_proto::pb::RangeRequest;
use ste_testkit::{shard_specs, start_shards, wait_until, Etcd, KubeApiserver, Router};

fn pod(name: &str) -> String {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "nginx"}]}
    })
    .to_string()
}

fn call(api: &KubeApiserver, args: &[&str]) -> (u16, Value) {
    let (code, body) = api.curl(args).expect("curl runs");
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn create(api: &KubeApiserver, name: &str) -> (u16, Value) {
    let body = pod(name);
    call(
        api,
        &[
            "/api/v1/namespaces/default/pods",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
        ],
    )
}

fn rv(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Every pod name, listed page by page with `limit`.
fn list_names(api: &KubeApiserver, limit: usize) -> (Vec<String>, u64) {
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let path = format!("/api/v1/namespaces/default/pods?limit={limit}&continue={token}");
        let (code, list) = call(api, &[&path]);
        assert_eq!(code, 200, "list failed: {list}");
        names.extend(
            list["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["metadata"]["name"].as_str().unwrap().to_string()),
        );
        match list["metadata"]["continue"].as_str() {
            Some(next) if !next.is_empty() => token = next.to_string(),
            _ => {
                return (
                    names,
                    list["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap()
                        .parse()
                        .unwrap(),
                )
            }
        }
    }
}

async fn keys_under(etcd_endpoint: &str, prefix: &[u8]) -> usize {
    let channel = tonic::transport::Channel::from_shared(etcd_endpoint.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut end = prefix.to_vec();
    *end.last_mut().unwrap() += 1;
    ste_etcd_proto::pb::kv_client::KvClient::new(channel)
        .range(RangeRequest {
            key: Bytes::copy_from_slice(prefix),
            range_end: Bytes::from(end),
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .count as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_apiserver_stores_pods_through_the_router() {
    let durable = Etcd::start("durable").await.unwrap();
    let shards = start_shards(3).await.unwrap();
    let router = Router::start(shard_specs(&shards)).await.unwrap();
    let router_addr = router.addr;
    let mut api = KubeApiserver::start(&durable.endpoint(), Some(&router.endpoint()))
        .await
        .unwrap();

    let mut last_rv = 0;
    for i in 0..30 {
        let (code, created) = create(&api, &format!("web-{i:02}"));
        assert_eq!(code, 201, "create web-{i:02}: {created}");
        assert!(rv(&created) > last_rv, "resourceVersions increase");
        last_rv = rv(&created);
    }
    // The pods are in the shards, spread over all three, and not in the durable etcd.
    let mut per_shard = Vec::new();
    for shard in &shards {
        per_shard.push(keys_under(&shard.endpoint(), b"/registry/pods/").await);
    }
    assert_eq!(per_shard.iter().sum::<usize>(), 30, "{per_shard:?}");
    assert!(
        per_shard.iter().all(|n| *n > 0),
        "every shard holds pods: {per_shard:?}"
    );
    assert_eq!(keys_under(&durable.endpoint(), b"/registry/pods/").await, 0);
    assert!(keys_under(&durable.endpoint(), b"/registry/namespaces/").await > 0);

    // Pagination returns every pod exactly once.
    let (names, list_rv) = list_names(&api, 7);
    assert_eq!(names.len(), 30);
    assert_eq!(names.iter().collect::<BTreeSet<_>>().len(), 30);

    // Optimistic concurrency: a stale update is a 409.
    let mut stale: Value = serde_json::from_str(&pod("web-00")).unwrap();
    stale["metadata"]["resourceVersion"] = json!("1");
    let (code, _) = call(
        &api,
        &[
            "/api/v1/namespaces/default/pods/web-00",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/json",
            "-d",
            &stale.to_string(),
        ],
    );
    assert_eq!(code, 409);

    // A watch from the list's revision sees each change once, in order.
    let mut watch = Command::new("curl")
        .args([
            "-sk",
            "-N",
            "--max-time",
            "60",
            "-H",
            &format!("Authorization: Bearer {}", api.token),
        ])
        .arg(format!(
            "{}/api/v1/namespaces/default/pods?watch=1&resourceVersion={list_rv}",
            api.url()
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(watch.stdout.take().unwrap());
    let reader = std::thread::spawn(move || {
        let mut events = Vec::new();
        for line in lines.lines() {
            let event: Value = serde_json::from_str(&line.unwrap()).unwrap();
            let done = event["type"] == "DELETED";
            events.push((
                event["type"].as_str().unwrap().to_string(),
                event["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                rv(&event["object"]),
            ));
            if done {
                break;
            }
        }
        events
    });
    let (code, patched) = call(
        &api,
        &[
            "/api/v1/namespaces/default/pods/web-00",
            "-X",
            "PATCH",
            "-H",
            "Content-Type: application/merge-patch+json",
            "-d",
            r#"{"metadata":{"labels":{"patched":"yes"}}}"#,
        ],
    );
    assert_eq!(code, 200, "{patched}");
    let (code, _) = call(
        &api,
        &[
            "/api/v1/namespaces/default/pods/web-01?gracePeriodSeconds=0",
            "-X",
            "DELETE",
        ],
    );
    assert_eq!(code, 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reader.is_finished() {
        assert!(
            Instant::now() < deadline,
            "watch did not see the delete within 30s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = reader.join().unwrap();
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(
        events.first().map(|e| (e.0.as_str(), e.1.as_str())),
        Some(("MODIFIED", "web-00")),
        "{events:?}"
    );
    assert_eq!(
        events.last().map(|e| (e.0.as_str(), e.1.as_str())),
        Some(("DELETED", "web-01")),
        "{events:?}"
    );
    assert!(
        events.windows(2).all(|w| w[0].2 < w[1].2),
        "resourceVersions increase: {events:?}"
    );

    // The router restarts: kube-apiserver relists, nothing is lost, revisions move on.
    router.stop().await.unwrap();
    let router = Router::start_at(Router::test_config(shard_specs(&shards)), router_addr)
        .await
        .unwrap();
    wait_until(
        "kube-apiserver to serve pods again after the router restart",
        Duration::from_secs(60),
        || async { matches!(create(&api, "after-router-restart").0, 201 | 409) },
    )
    .await;
    let (names, _) = list_names(&api, 10);
    assert_eq!(names.len(), 30, "29 old pods and the new one: {names:?}");
    let (_, newest) = call(
        &api,
        &["/api/v1/namespaces/default/pods/after-router-restart"],
    );
    assert!(rv(&newest) > last_rv);

    // kube-apiserver restarts: every pod is still there.
    api.restart().await.unwrap();
    let (names, _) = list_names(&api, 500);
    assert_eq!(names.len(), 30);
    router.stop().await.unwrap();
}
