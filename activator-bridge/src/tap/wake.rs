//! What the tap does with a stat: a stat with load for a revision whose
//! Deployment the bridge's cache shows at 0 replicas is a wake, and the
//! bridge scales that Deployment 0→1 through its scale subresource — only
//! ever 0→1, with the resourceVersion it saw, so any concurrent change (the
//! autoscaler's own patch) wins. Once per revision until the cache sees
//! the Deployment at 0 again. In aggressive mode the Deployment watch then
//! sees the 0→1 and creates the pod as on any Deployment 0→N.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v1::{Scale, ScaleSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::ResourceExt;
use ste_knative_stat::{Stat, WireStatMessages};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::bridge::{Bridge, TapWake, Target, Trigger};
use crate::metrics::TapLabels;
use crate::Mode;

/// Knative's label on a revision's Deployment: the revision's name.
pub const REVISION_LABEL: &str = "serving.knative.dev/revision";

/// What one stat means for its revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No requests held or arrived: nothing to wake.
    NoLoad,
    /// The cache has no Deployment for the revision.
    NoDeployment,
    /// The Deployment already has replicas (the normal case past a wake).
    NotAtZero,
    /// At 0 in the cache, but the tap already scaled it (or is scaling it).
    AlreadyWoken,
    /// Scale it 0→1.
    Wake,
}

/// The decision, from the stat, the cached replicas of the revision's
/// Deployment and whether the tap already woke it since it was last at 0.
pub fn decide(stat: Option<&Stat>, cached_replicas: Option<i32>, woken: bool) -> Verdict {
    if !stat.is_some_and(Stat::has_load) {
        return Verdict::NoLoad;
    }
    match cached_replicas {
        None => Verdict::NoDeployment,
        Some(r) if r != 0 => Verdict::NotAtZero,
        Some(_) if woken => Verdict::AlreadyWoken,
        Some(_) => Verdict::Wake,
    }
}

/// A Deployment's scale set 0→1 by the tap, if `resource_version` is still current.
fn scale_to_one(ns: &str, name: &str, resource_version: Option<String>) -> Scale {
    Scale {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            resource_version,
            ..Default::default()
        },
        spec: Some(ScaleSpec { replicas: Some(1) }),
        status: None,
    }
}

/// How a tap write ended.
#[derive(Debug, PartialEq, Eq)]
enum Written {
    Scaled,
    /// Someone else changed the scale first (it is no longer 0).
    AlreadyScaled,
}

pub struct TapSink(pub Arc<Bridge>);

impl super::StatSink for TapSink {
    fn stats(&self, messages: WireStatMessages, received: Instant) {
        self.0.on_stats(messages, received);
    }
}

fn deployment_key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

impl Bridge {
    /// The revision's Deployment in the cache.
    fn revision_deployment(&self, ns: &str, revision: &str) -> Option<Arc<Deployment>> {
        self.deployments.find(|d| {
            d.metadata.namespace.as_deref() == Some(ns)
                && d.labels().get(REVISION_LABEL).map(String::as_str) == Some(revision)
        })
    }

    fn tap_count(&self, result: &str) {
        self.metrics
            .tap
            .tap_wakes
            .get_or_create(&TapLabels {
                result: result.into(),
            })
            .inc();
    }

    /// Called by the tap for every stat message, after forwarding it.
    pub(crate) fn on_stats(self: &Arc<Self>, messages: WireStatMessages, received: Instant) {
        self.metrics.tap.tap_messages.inc();
        for m in messages.messages {
            let deployment = self.revision_deployment(&m.namespace, &m.name);
            let replicas = deployment
                .as_ref()
                .map(|d| d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1));
            let name = deployment
                .as_ref()
                .map(|d| d.name_any())
                .unwrap_or_default();
            let key = deployment_key(&m.namespace, &name);
            let verdict = {
                let mut woken = self.tapped.lock().unwrap();
                let v = decide(m.stat.as_ref(), replicas, woken.contains_key(&key));
                if v == Verdict::Wake {
                    woken.insert(
                        key.clone(),
                        TapWake {
                            at: received,
                            handed_over: false,
                        },
                    );
                }
                v
            };
            match verdict {
                Verdict::Wake => {
                    self.metrics.tap.tap_wakes_seen.inc();
                    let rv = deployment
                        .as_ref()
                        .and_then(|d| d.metadata.resource_version.clone());
                    let uid = deployment.and_then(|d| d.metadata.uid.clone());
                    let b = self.clone();
                    let ns = m.namespace.clone();
                    tokio::spawn(async move { b.tap_wake(&ns, &name, rv, uid, received).await });
                }
                Verdict::AlreadyWoken => {
                    self.metrics.tap.tap_wakes_seen.inc();
                    self.tap_count("skipped");
                }
                Verdict::NoLoad | Verdict::NoDeployment | Verdict::NotAtZero => {}
            }
        }
    }

    async fn tap_wake(
        &self,
        ns: &str,
        name: &str,
        rv: Option<String>,
        uid: Option<String>,
        received: Instant,
    ) {
        if self.settings.dry_run {
            info!(deployment = %deployment_key(ns, name), "dry run: the tap would scale 0→1");
            self.tap_count("dry_run");
            return;
        }
        // The pod is created alongside the write, not after it: it is held
        // by the Deployment until the ReplicaSet controller catches up, and
        // if this write fails (the wake is forgotten below) the hand-over
        // pass deletes it, as for any wake undone before the hand-over.
        if let Some(uid) = uid {
            self.act_on_own_wake(ns, name, uid);
        }
        match self.write_scale(ns, name, rv).await {
            Ok(Written::Scaled) => {
                let took = received.elapsed();
                self.metrics
                    .tap
                    .tap_stat_to_scaled
                    .observe(took.as_secs_f64());
                self.tap_count("scaled");
                debug!(deployment = %deployment_key(ns, name), latency = ?took, "stat tap: scaled 0→1");
            }
            Ok(Written::AlreadyScaled) => self.tap_count("skipped"),
            Err(err) => {
                self.tap_count("failed");
                warn!(deployment = %deployment_key(ns, name), error = %err, "stat tap: scaling 0→1 failed; the autoscaler's own patch still comes");
                // Let a later stat try again.
                self.tapped
                    .lock()
                    .unwrap()
                    .remove(&deployment_key(ns, name));
            }
        }
    }

    /// PUT the scale 0→1 with the cached resourceVersion; on a conflict, read
    /// the scale once: still 0 → retry with its version, otherwise someone
    /// else scaled it and the tap stands aside.
    async fn write_scale(
        &self,
        ns: &str,
        name: &str,
        rv: Option<String>,
    ) -> Result<Written, kube::Error> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), ns);
        let mut rv = rv;
        for attempt in 0..2 {
            if rv.is_none() {
                let now = api.get_scale(name).await?;
                if now.spec.and_then(|s| s.replicas) != Some(0) {
                    return Ok(Written::AlreadyScaled);
                }
                rv = now.metadata.resource_version;
            }
            match api
                .replace_scale(
                    name,
                    &PostParams::default(),
                    &scale_to_one(ns, name, rv.take()),
                )
                .await
            {
                Ok(_) => return Ok(Written::Scaled),
                Err(kube::Error::Api(e)) if e.code == 409 && attempt == 0 => {}
                Err(kube::Error::Api(e)) if e.code == 409 => return Ok(Written::AlreadyScaled),
                Err(e) => return Err(e),
            }
        }
        Ok(Written::AlreadyScaled)
    }

    /// In aggressive mode, acts on the 0→1 the tap is writing as on one the
    /// Deployment watch sees, without waiting for the write's answer (a
    /// kube-apiserver round trip, ~10 ms at 1 revision) or the watch: under a burst
    /// kube-apiserver delivered those events 1.2 s (p50) to 2.6 s (p95)
    /// after the write (100 wakes, docs/benchmarks.md). The watch's own 0→1
    /// for it is then skipped ([`Bridge::tap_took`]).
    fn act_on_own_wake(&self, ns: &str, name: &str, uid: String) {
        if self.settings.mode != Mode::Aggressive {
            return;
        }
        if let Some(wake) = self
            .tapped
            .lock()
            .unwrap()
            .get_mut(&deployment_key(ns, name))
        {
            wake.handed_over = true;
        }
        self.note_wake();
        self.enqueue(Trigger {
            ns: ns.to_string(),
            name: name.to_string(),
            target: Target::Deployment { replicas: 1, uid },
            at: Instant::now(),
            attempt: 0,
        });
    }

    /// True (once) when the tap already acted on this Deployment's 0→1.
    pub(crate) fn tap_took(&self, ns: &str, name: &str) -> bool {
        self.tapped
            .lock()
            .unwrap()
            .get_mut(&deployment_key(ns, name))
            .is_some_and(|wake| std::mem::take(&mut wake.handed_over))
    }

    /// True while the tap's 0→1 of this Deployment is its current wake (from
    /// the tap's write until the watch shows it back at 0).
    pub(crate) fn tap_pending(&self, ns: &str, name: &str) -> bool {
        self.tapped
            .lock()
            .unwrap()
            .contains_key(&deployment_key(ns, name))
    }

    /// The Deployment is gone: nothing of the tap's to remember about it.
    pub(crate) fn tap_forget(&self, ns: &str, name: &str) {
        self.tapped
            .lock()
            .unwrap()
            .remove(&deployment_key(ns, name));
    }

    /// The Deployment watch saw `ns/name` go from `before` to `now` replicas:
    /// back at 0 ends the tap's wake; within `window` of the tap's wake that
    /// is a revert (the autoscaler scaled it down before taking the stat).
    pub(crate) fn tap_observe(
        &self,
        ns: &str,
        name: &str,
        before: Option<i32>,
        now: i32,
        window: Duration,
    ) {
        if now != 0 || before.is_none_or(|b| b == 0) {
            return;
        }
        let key = deployment_key(ns, name);
        if let Some(TapWake { at, .. }) = self.tapped.lock().unwrap().remove(&key) {
            if at.elapsed() <= window {
                self.metrics.tap.tap_reverts.inc();
                warn!(deployment = %key, after = ?at.elapsed(), "stat tap: Deployment back at 0 right after the tap's wake (a revert)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(concurrency: f64, count: f64) -> Stat {
        Stat {
            average_concurrent_requests: concurrency,
            request_count: count,
            ..Stat::default()
        }
    }

    #[test]
    fn the_first_request_at_zero_is_a_wake() {
        assert_eq!(decide(Some(&stat(1.0, 1.0)), Some(0), false), Verdict::Wake);
        assert_eq!(decide(Some(&stat(0.0, 1.0)), Some(0), false), Verdict::Wake);
        assert_eq!(decide(Some(&stat(0.3, 0.0)), Some(0), false), Verdict::Wake);
    }

    #[test]
    fn no_load_no_deployment_or_replicas_are_not_wakes() {
        assert_eq!(
            decide(Some(&stat(0.0, 0.0)), Some(0), false),
            Verdict::NoLoad
        );
        assert_eq!(decide(None, Some(0), false), Verdict::NoLoad);
        assert_eq!(
            decide(Some(&stat(1.0, 1.0)), None, false),
            Verdict::NoDeployment
        );
        assert_eq!(
            decide(Some(&stat(1.0, 1.0)), Some(3), false),
            Verdict::NotAtZero
        );
    }

    #[test]
    fn once_per_revision_until_back_at_zero() {
        assert_eq!(
            decide(Some(&stat(1.0, 1.0)), Some(0), true),
            Verdict::AlreadyWoken
        );
        // Past the wake the cache shows replicas: not a wake, woken or not.
        assert_eq!(
            decide(Some(&stat(1.0, 0.0)), Some(1), true),
            Verdict::NotAtZero
        );
    }

    #[test]
    fn the_write_is_only_ever_one_replica_at_the_version_seen() {
        let s = scale_to_one("default", "r-00001-deployment", Some("42".into()));
        assert_eq!(s.spec.unwrap().replicas, Some(1));
        assert_eq!(s.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(s.metadata.name.as_deref(), Some("r-00001-deployment"));
    }
}
