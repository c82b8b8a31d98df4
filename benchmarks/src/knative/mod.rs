//! Waking Knative revisions the way Knative's activator does: request
//! statistics to the autoscaler ([`stats`]), which decides and patches the
//! revisions' Deployments at its own pace; per-hop times of each wake from
//! watches ([`hops`]).

pub mod hops;
pub mod objects;
pub mod pods_per_wake;
pub mod port;
pub mod processes;
pub mod real;
pub mod real_image;
pub mod real_run;
pub mod stats;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, Patch, PatchParams};

use crate::api::{client_for, dynamic, resource};
use crate::cluster::ClusterRecord;
use hops::{Hop, HopWatch, WakeRound};
use objects::revision_of;
use stats::{Activator, RevisionKey, AUTOSCALER_STATS_ADDR};

/// How `ste-bench coldstart` wakes revisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Wake {
    /// As Knative's activator: request stats to the autoscaler, which
    /// decides and patches the Deployments at its own pace.
    Stats,
    /// The bench sends the autoscaler's scale patch itself, all at once
    /// (skips the autoscaler's own pace).
    Patch,
}

/// What the autoscaler needs to take revisions back to zero here, applied on
/// top of hack/knative (the same in every arm):
/// - `target-burst-capacity: -1`: the activator is always in the path, as
///   this bench's activator is; otherwise the KPA probes the activator
///   through the revision's Service before scaling to zero, and no activator
///   answers on kwok, so nothing would ever go back to zero.
/// - `stable-window: 6s` (Knative's minimum) and `scale-to-zero-grace-period:
///   6s`, so a revision is back at zero ~15 s after its last request instead
///   of ~90 s. Scaling from zero does not wait for either: the first stat
///   pokes the revision's scaler at once (`MultiScaler.Poke`).
pub const AUTOSCALER_SETTINGS: [(&str, &str); 3] = [
    ("target-burst-capacity", "-1"),
    ("stable-window", "6s"),
    ("scale-to-zero-grace-period", "6s"),
];

/// Applies [`AUTOSCALER_SETTINGS`] to `knative-serving/config-autoscaler`
/// (the autoscaler and controller watch it).
pub async fn configure_autoscaler(record: &ClusterRecord) -> anyhow::Result<()> {
    let data: serde_json::Map<String, serde_json::Value> = AUTOSCALER_SETTINGS
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    Api::<ConfigMap>::namespaced(client_for(record)?, "knative-serving")
        .patch(
            "config-autoscaler",
            &PatchParams::default(),
            &Patch::Merge(json!({ "data": data })),
        )
        .await
        .context("patching config-autoscaler")?;
    Ok(())
}

/// Connects the bench's activator to the autoscaler's stat server, retrying
/// for `within` (it listens a little after taking its lease).
pub async fn connect_activator(within: Duration) -> anyhow::Result<Activator> {
    connect_activator_at(AUTOSCALER_STATS_ADDR, within).await
}

/// [`connect_activator`] to `addr` (the autoscaler's stat server, or the
/// bridge's stat tap in front of it).
pub async fn connect_activator_at(addr: &str, within: Duration) -> anyhow::Result<Activator> {
    let deadline = Instant::now() + within;
    loop {
        match Activator::connect(addr, "activator-ste-bench").await {
            Ok(a) => return Ok(a),
            Err(e) if Instant::now() > deadline => bail!("{e} (for {within:?})"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Waits until Knative's autoscaler has no PodAutoscaler work left in the
/// namespace: no PodAutoscaler changed for `quiet`. Right after Services are
/// made, its KPA reconciles each of them (SKS, Metric, status) through its
/// 10 QPS client for a while, and a wake sent then queues behind that.
pub async fn wait_autoscaler_quiet(
    record: &ClusterRecord,
    quiet: Duration,
    within: Duration,
) -> anyhow::Result<()> {
    let autoscalers = dynamic(
        &client_for(record)?,
        &record.namespace,
        &resource(
            "autoscaling.internal.knative.dev",
            "v1alpha1",
            "PodAutoscaler",
            "podautoscalers",
        ),
    );
    let deadline = Instant::now() + within;
    let (mut last, mut since) = (Vec::new(), Instant::now());
    loop {
        let list = autoscalers.list(&ListParams::default()).await?;
        let mut versions: Vec<String> = list
            .items
            .into_iter()
            .filter_map(|pa| pa.metadata.resource_version)
            .collect();
        versions.sort();
        if versions != last {
            (last, since) = (versions, Instant::now());
        } else if since.elapsed() >= quiet {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("PodAutoscalers still changing after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Wakes the revisions of `services` (namespace of `record`) with one held
/// request each, as the activator would on their first requests; each
/// request is answered when its pod's IP reaches the revision's private
/// Endpoints. Returns when every revision got there (or fails after
/// `within`), with the hops of every wake.
pub async fn wake_round(
    record: &ClusterRecord,
    activator: &Activator,
    services: &[String],
    arm: &str,
    within: Duration,
) -> anyhow::Result<WakeRound> {
    let watch = HopWatch::start(record).await?;
    // Let the watches start before the first stat.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent_before = activator.messages_sent();
    let keys: Vec<(String, RevisionKey)> = services
        .iter()
        .map(|s| {
            let rev = revision_of(s);
            let key = RevisionKey::new(&record.namespace, &rev);
            (rev, key)
        })
        .collect();
    for (rev, key) in &keys {
        watch.woke(rev, Instant::now());
        activator.request_in(key).await?;
    }
    let mut held: Vec<&(String, RevisionKey)> = keys.iter().collect();
    let deadline = Instant::now() + within;
    while !held.is_empty() {
        held.retain(|(rev, key)| {
            let done = watch.reached(rev, Hop::Endpoints);
            if done {
                activator.request_out(key);
            }
            !done
        });
        if Instant::now() > deadline {
            let counts: Vec<String> = Hop::ALL
                .iter()
                .map(|h| format!("{} {}", h.name(), watch.count(*h)))
                .collect();
            watch.stop();
            for (_, key) in &held {
                activator.request_out(key);
            }
            bail!(
                "{arm}: {}/{} revisions with their pod in the private Endpoints after {within:?} ({})",
                keys.len() - held.len(),
                keys.len(),
                counts.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The slices are filled by another controller: give them a moment.
    let slices = Instant::now() + Duration::from_secs(5);
    while watch.count(Hop::EndpointSlice) < keys.len() && Instant::now() < slices {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let wakes = watch.wakes();
    let round = WakeRound {
        sent: watch.sent(),
        arm: arm.into(),
        revisions: keys.len(),
        hops: hops::summarize(&wakes),
        scale_pace_ms: watch.scale_pace_ms(),
        stat_messages: activator.messages_sent() - sent_before,
        wakes,
    };
    watch.stop();
    Ok(round)
}

/// A round woken through the autoscaler, its activator still connected
/// until the revisions are back at zero.
pub struct AutoscalerWake {
    activator: Activator,
    pub round: WakeRound,
}

/// For `ste-bench coldstart --wake stats`: waits until the autoscaler is
/// quiet ([`wait_autoscaler_quiet`]), connects an activator and wakes
/// `services` through it ([`wake_round`], 180 s at most). `stats_addr`:
/// the autoscaler's stat server ([`AUTOSCALER_STATS_ADDR`]) or the bridge's
/// stat tap in front of it.
/// [`configure_autoscaler`] must have run before the Services were made:
/// a config change makes the KPA resync every PodAutoscaler, ~10 s for 100
/// revisions at its 10 QPS, and the wakes would queue behind it.
pub async fn wake_through_autoscaler(
    record: &ClusterRecord,
    services: &[String],
    arm: &str,
    stats_addr: &str,
) -> anyhow::Result<AutoscalerWake> {
    wait_autoscaler_quiet(record, Duration::from_secs(2), Duration::from_secs(120)).await?;
    let activator = connect_activator_at(stats_addr, Duration::from_secs(30)).await?;
    let round = wake_round(record, &activator, services, arm, Duration::from_secs(180)).await;
    if round.is_err() {
        activator.stop();
    }
    Ok(AutoscalerWake {
        round: round?,
        activator,
    })
}

impl AutoscalerWake {
    /// When each revision's wake was sent.
    pub fn sent(&self) -> HashMap<String, Instant> {
        self.round.sent.clone()
    }

    /// Leaves the revisions to the autoscaler until they are back at zero
    /// (180 s at most), then disconnects.
    pub async fn back_to_zero(
        self,
        record: &ClusterRecord,
        services: &[String],
    ) -> anyhow::Result<()> {
        let result =
            back_to_zero(record, &self.activator, services, Duration::from_secs(180)).await;
        self.activator.stop();
        result
    }
}

/// Waits until the activator stopped reporting on every revision (a whole
/// second without requests) and the autoscaler took them back to zero.
pub async fn back_to_zero(
    record: &ClusterRecord,
    activator: &Activator,
    services: &[String],
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while activator.tracked() > 0 {
        if Instant::now() > deadline {
            bail!(
                "the activator still reports on {} revision(s)",
                activator.tracked()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = deadline.saturating_duration_since(Instant::now());
    objects::wait_at_zero(&client_for(record)?, services, left).await
}

/// A plain-text table of rounds: per hop p50 / p95 (ms from the wake).
pub fn markdown(rounds: &[WakeRound]) -> String {
    let mut out = String::from("| arm | revisions | autoscaler patch pace first→last (ms) |");
    for hop in Hop::ALL {
        out.push_str(&format!(" {} p50 / p95 (ms) |", hop.name()));
    }
    out.push_str("\n|---|---:|---:|");
    out.push_str(&"---|".repeat(Hop::ALL.len()));
    out.push('\n');
    for r in rounds {
        out.push_str(&format!(
            "| {} | {} | {} |",
            r.arm, r.revisions, r.scale_pace_ms
        ));
        for h in &r.hops {
            if h.count == 0 {
                out.push_str(" – |");
            } else {
                out.push_str(&format!(" {} / {} |", h.p50_ms, h.p95_ms));
            }
        }
        out.push('\n');
    }
    out
}
