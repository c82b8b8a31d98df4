//! Measurement shared by the suites: watches that time-stamp each object as
//! it arrives, and CPU seconds per component.

pub mod prometheus;

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;
use tokio::sync::oneshot;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, WatchEvent, WatchParams};

use crate::api::{client_for, dynamic, resource_of};
use crate::cluster::{Arm, ClusterRecord};
use crate::stats::process_group_cpu_seconds;

/// Follows the namespace's pods from `resource_version` on and calls
/// `on_pod` with each event's pod and its arrival time (sub-millisecond,
/// unlike the 1-second condition timestamps). Like a reflector, it re-watches
/// from the last resourceVersion when kube-apiserver ends the watch, and
/// relists on 410.
pub fn watch_pods<F>(
    record: &ClusterRecord,
    resource_version: &str,
    on_pod: F,
) -> anyhow::Result<tokio::task::JoinHandle<()>>
where
    F: FnMut(&Value, Instant) + Send + 'static,
{
    watch_objects(record, &resource_of::<Pod>(), resource_version, on_pod)
}

/// [`watch_pods`], and a signal sent once kube-apiserver has answered the
/// first watch request (the watch is open: what follows arrives as it happens).
pub fn watch_pods_started<F>(
    record: &ClusterRecord,
    resource_version: &str,
    on_pod: F,
) -> anyhow::Result<(tokio::task::JoinHandle<()>, oneshot::Receiver<()>)>
where
    F: FnMut(&Value, Instant) + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let task = watch(
        record,
        &resource_of::<Pod>(),
        resource_version,
        on_pod,
        Some(tx),
    )?;
    Ok((task, rx))
}

/// [`watch_objects`], and a signal sent once kube-apiserver has answered the
/// first watch request (see [`watch_pods_started`]).
pub fn watch_objects_started<F>(
    record: &ClusterRecord,
    resource: &ApiResource,
    resource_version: &str,
    on_object: F,
) -> anyhow::Result<(tokio::task::JoinHandle<()>, oneshot::Receiver<()>)>
where
    F: FnMut(&Value, Instant) + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let task = watch(record, resource, resource_version, on_object, Some(tx))?;
    Ok((task, rx))
}

/// Waits (at most `within`) until every watch in `opened` is open.
pub async fn all_open(opened: Vec<oneshot::Receiver<()>>, within: Duration) -> anyhow::Result<()> {
    let all = futures::future::join_all(opened);
    match tokio::time::timeout(within, all).await {
        Ok(results) if results.iter().all(|r| r.is_ok()) => Ok(()),
        Ok(_) => anyhow::bail!("a watch ended before it opened"),
        Err(_) => anyhow::bail!("the watches did not open within {within:?}"),
    }
}

/// [`watch_pods`] for any namespaced resource. A raw watch (`Api::watch`),
/// not `kube::runtime::watcher`: the suites need each event as it arrives,
/// from a given resourceVersion, without the watcher's initial list.
pub fn watch_objects<F>(
    record: &ClusterRecord,
    resource: &ApiResource,
    resource_version: &str,
    on_object: F,
) -> anyhow::Result<tokio::task::JoinHandle<()>>
where
    F: FnMut(&Value, Instant) + Send + 'static,
{
    watch(record, resource, resource_version, on_object, None)
}

fn watch<F>(
    record: &ClusterRecord,
    resource: &ApiResource,
    resource_version: &str,
    mut on_object: F,
    mut opened: Option<oneshot::Sender<()>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>>
where
    F: FnMut(&Value, Instant) + Send + 'static,
{
    let api = dynamic(&client_for(record)?, &record.namespace, resource);
    let mut last = resource_version.to_string();
    Ok(tokio::spawn(async move {
        loop {
            let gone = follow(&api, &mut last, &mut on_object, &mut opened).await;
            if gone {
                // Too old: relist, report what is there now, and watch from the list.
                let Ok(list) = api.list(&ListParams::default()).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let now = Instant::now();
                for object in &list.items {
                    if let Ok(value) = serde_json::to_value(object) {
                        on_object(&value, now);
                    }
                }
                if let Some(rv) = list.metadata.resource_version {
                    last = rv;
                }
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }))
}

/// One watch request from `last` until kube-apiserver ends it; `true` when
/// it answered 410 Gone (a relist is needed).
async fn follow<F>(
    api: &Api<DynamicObject>,
    last: &mut String,
    on_object: &mut F,
    opened: &mut Option<oneshot::Sender<()>>,
) -> bool
where
    F: FnMut(&Value, Instant),
{
    let params = WatchParams::default().timeout(290);
    let Ok(stream) = api.watch(&params, last).await else {
        return false;
    };
    if let Some(opened) = opened.take() {
        let _ = opened.send(());
    }
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        let now = Instant::now();
        let object = match event {
            Ok(WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o)) => o,
            Ok(WatchEvent::Bookmark(b)) => {
                *last = b.metadata.resource_version;
                continue;
            }
            Ok(WatchEvent::Error(status)) => return status.code == 410,
            Err(_) => return false,
        };
        if let Some(rv) = &object.metadata.resource_version {
            last.clone_from(rv);
        }
        if let Ok(value) = serde_json::to_value(&object) {
            on_object(&value, now);
        }
    }
    false
}

/// CPU seconds each component used between two [`cpu_by_component`] readings.
pub fn cpu_used(before: &[(String, f64)], after: &[(String, f64)]) -> Vec<(String, f64)> {
    after
        .iter()
        .map(|(name, spent)| {
            let earlier = before
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, b)| *b)
                .unwrap_or(0.0);
            (name.clone(), spent - earlier)
        })
        .collect()
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
