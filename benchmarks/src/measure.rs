//! Measurement shared by the suites: watches that time-stamp each object as
//! it arrives, and CPU seconds per component.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;

use crate::api::{client_for, Authed};
use crate::cluster::{Arm, ClusterRecord};
use crate::stats::process_group_cpu_seconds;

/// Follows pods from `resource_version` on and records bound/Running times per `app` label.
/// Follows pods of the default namespace from `resource_version` on and calls
/// `on_pod` with each event's pod and its arrival time (sub-millisecond, unlike
/// the 1-second condition timestamps). Like a reflector, it re-watches from the
/// last resourceVersion when kube-apiserver ends the watch, and relists on 410.
pub fn watch_pods<F>(
    record: &ClusterRecord,
    resource_version: &str,
    on_pod: F,
) -> anyhow::Result<tokio::task::JoinHandle<()>>
where
    F: FnMut(&Value, Instant) + Send + 'static,
{
    watch_objects(
        record,
        &format!("/api/v1/namespaces/{}/pods", record.namespace),
        resource_version,
        on_pod,
    )
}

/// [`watch_pods`] for any collection path (e.g. `/apis/apps/v1/namespaces/default/deployments`).
pub fn watch_objects<F>(
    record: &ClusterRecord,
    path: &str,
    resource_version: &str,
    mut on_pod: F,
) -> anyhow::Result<tokio::task::JoinHandle<()>>
where
    F: FnMut(&Value, Instant) + Send + 'static,
{
    let http = client_for(record)?;
    let base = format!("{}{path}", record.api_url);
    let record = record.clone();
    let mut last = resource_version.to_string();
    Ok(tokio::spawn(async move {
        loop {
            let url = format!("{base}?watch=1&resourceVersion={last}&allowWatchBookmarks=true&timeoutSeconds=3600");
            let mut gone = false;
            if let Ok(response) = http.get(&url).auth(&record).send().await {
                let mut stream = response.bytes_stream();
                let mut buffer = Vec::new();
                while let Some(Ok(chunk)) = stream.next().await {
                    let now = Instant::now();
                    buffer.extend_from_slice(&chunk);
                    while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buffer.drain(..=end).collect();
                        let Ok(event) = serde_json::from_slice::<Value>(&line) else {
                            continue;
                        };
                        if event["type"] == "ERROR" {
                            gone |= event["object"]["code"] == 410;
                            continue;
                        }
                        if let Some(rv) = event["object"]["metadata"]["resourceVersion"].as_str() {
                            last = rv.to_string();
                        }
                        if event["type"] != "BOOKMARK" {
                            on_pod(&event["object"], now);
                        }
                    }
                }
            }
            if gone {
                // Too old: relist, report what is there now, and watch from the list.
                let Ok(response) = http.get(&base).auth(&record).send().await else {
                    continue;
                };
                let Ok(list) = response.json::<Value>().await else {
                    continue;
                };
                let now = Instant::now();
                for pod in list["items"].as_array().into_iter().flatten() {
                    on_pod(pod, now);
                }
                if let Some(rv) = list["metadata"]["resourceVersion"].as_str() {
                    last = rv.to_string();
                }
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }))
}

/// CPU seconds used so far by each component (its whole process group).
pub fn cpu_by_component(record: &ClusterRecord) -> Vec<(String, f64)> {
    let mut by_kind: Vec<(String, f64)> = Vec::new();
    for process in &record.processes {
        // Shards are summed as one "shards" component, the durable etcd's
        // members as one "etcd-main".
        let kind = if process.name.starts_with("shard-") {
            "shards".to_string()
        } else if process.name.starts_with("etcd-main") {
            "etcd-main".to_string()
        } else {
            process.name.clone()
        };
        let cpu = process_group_cpu_seconds(process.pid);
        match by_kind.iter_mut().find(|(k, _)| *k == kind) {
            Some(entry) => entry.1 += cpu,
            None => by_kind.push((kind, cpu)),
        }
    }
    by_kind
}

/// CPU seconds per 100 Deployments, per component ("n/a" on a cluster the tool did not start).
pub fn cpu_per_100(arm: Arm, cpu_seconds: &[(String, f64)], deployments: usize) -> String {
    if arm == Arm::External {
        return "n/a".into();
    }
    cpu_seconds
        .iter()
        .filter(|(_, s)| *s > 0.0)
        .map(|(n, s)| format!("{n} {:.1}", s * 100.0 / deployments.max(1) as f64))
        .collect::<Vec<_>>()
        .join(", ")
}
