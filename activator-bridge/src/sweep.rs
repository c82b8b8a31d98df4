//! The sweep over gated pods (leader only, every half second): a gated pod
//! its ReplicaSet still wants (one of the bridge's pods failed, the cache was
//! behind, or a bridge restarted between gating and cleaning up) loses its
//! gate and goes to the scheduler; a surplus one is deleted once the
//! ReplicaSet controller has had `gated_grace` to delete it itself.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde_json::json;
use tokio::time::Instant;
use tracing::info;

use crate::bridge::{prune_reservations, Bridge};
use crate::podmeta::{controller_uid, is_gated, is_live, replicaset_of, GATE};
use crate::podwrite::{pod_key, Written};

/// What the sweep does with the gated pods of one ReplicaSet.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    pub ungate: Vec<String>,
    pub delete: Vec<String>,
}

/// `gated` oldest first; `missing` = wanted replicas minus live ungated pods;
/// `old_enough` tells whether a pod's grace is over.
pub fn plan(gated: &[String], missing: usize, old_enough: impl Fn(&str) -> bool) -> Plan {
    let ungate: Vec<String> = gated.iter().take(missing).cloned().collect();
    let delete = gated
        .iter()
        .skip(missing)
        .filter(|p| old_enough(p))
        .cloned()
        .collect();
    Plan { ungate, delete }
}

impl Bridge {
    pub(crate) async fn sweep(&self) {
        if !self.leading.load(Ordering::SeqCst) || !self.synced() {
            return;
        }
        let pods = self.pods.state();
        let mut by_owner: BTreeMap<String, Vec<Arc<Pod>>> = BTreeMap::new();
        for p in pods.iter().filter(|p| is_gated(p) && is_live(p)) {
            if let Some(owner) = controller_uid(&p.metadata) {
                by_owner
                    .entry(owner.to_string())
                    .or_default()
                    .push(p.clone());
            }
        }
        let now = Instant::now();
        let plans: Vec<(Vec<Arc<Pod>>, Plan)> = {
            let mut seen = self.gated_seen.lock().unwrap();
            let live: HashSet<String> = by_owner
                .values()
                .flatten()
                .filter_map(|p| p.uid())
                .collect();
            seen.retain(|uid, _| live.contains(uid));
            let mut reservations = self.reservations.lock().unwrap();
            prune_reservations(&mut reservations, &pods);
            by_owner
                .into_iter()
                .filter_map(|(owner, mut gated)| {
                    let rs = self
                        .replicasets
                        .find(|rs| rs.metadata.uid.as_deref() == Some(owner.as_str()))?;
                    // Wanted by the ReplicaSet AND by its revision: a
                    // ReplicaSet still at 1 whose Deployment is back at 0
                    // is the controllers catching up; its late pod stays
                    // gated (and is deleted as surplus), see `admission`.
                    let want = rs
                        .spec
                        .as_ref()
                        .and_then(|s| s.replicas)
                        .unwrap_or(1)
                        .min(self.desired(&rs));
                    let have = pods
                        .iter()
                        .filter(|p| {
                            // The bridge's pods the Deployment still holds count too.
                            replicaset_of(&p.metadata) == Some(owner.as_str())
                                && is_live(p)
                                && !is_gated(p)
                        })
                        .count()
                        + reservations.iter().filter(|r| r.owner == owner).count();
                    let missing = (want.max(0) as usize).saturating_sub(have);
                    gated.sort_by_key(|p| p.creation_timestamp().map(|t| t.0));
                    let names: Vec<String> = gated.iter().map(|p| p.name_any()).collect();
                    for p in &gated {
                        seen.entry(p.uid().unwrap_or_default()).or_insert(now);
                    }
                    let grace = self.settings.gated_grace;
                    let old_enough = |name: &str| {
                        gated
                            .iter()
                            .find(|p| p.name_any() == name)
                            .and_then(|p| seen.get(&p.uid().unwrap_or_default()))
                            .is_some_and(|at| at.elapsed() >= grace)
                    };
                    let plan = plan(&names, missing, old_enough);
                    Some((gated, plan))
                })
                .collect()
        };
        for (gated, plan) in plans {
            for name in &plan.ungate {
                if let Some(p) = gated.iter().find(|p| &p.name_any() == name) {
                    self.ungate(p).await;
                }
            }
            for name in &plan.delete {
                if let Some(p) = gated.iter().find(|p| &p.name_any() == name) {
                    self.delete_gated(p).await;
                }
            }
        }
    }

    async fn ungate(&self, pod: &Pod) {
        let remaining: Vec<_> = pod
            .spec
            .as_ref()
            .and_then(|s| s.scheduling_gates.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|g| g.name != GATE)
            .collect();
        let patch = json!({"spec": {"schedulingGates": remaining}});
        if self
            .patch_seen(pod, patch, "removing the scheduling gate")
            .await
            == Written::Done
        {
            self.metrics.gates_removed.inc();
            info!(pod = %pod_key(pod), "gated pod still wanted: gate removed, the scheduler places it");
        }
    }

    async fn delete_gated(&self, pod: &Pod) {
        if self.delete_seen(pod, "deleting a surplus gated pod").await == Written::Done {
            self.metrics.gated_deleted.inc();
            info!(pod = %pod_key(pod), "surplus gated pod deleted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_ungates_the_oldest_missing_and_deletes_old_surplus() {
        let gated: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let p = plan(&gated, 1, |n| n != "c");
        assert_eq!(p.ungate, vec!["a"]);
        assert_eq!(p.delete, vec!["b"]);
        let p = plan(&gated, 0, |_| false);
        assert!(p.ungate.is_empty() && p.delete.is_empty());
        let p = plan(&gated, 5, |_| true);
        assert_eq!(p.ungate.len(), 3);
        assert!(p.delete.is_empty());
    }
}
