//! On the ste arm, one level below the pod hops: what ste-router itself
//! spent on a step's requests, from its `/metrics` read before and after
//! the step — how many etcd calls kube-apiserver made per Deployment, the
//! router's mean time per call, and the part of a write spent waiting for
//! its shard (the group commit's Txn).

use serde::Serialize;

use crate::measure::prometheus::{labeled, metric, scrape};

/// (sum of seconds, count) of one of the router's histograms.
type SumCount = (f64, f64);

/// The router's counters at one moment.
#[derive(Default, Clone, Copy, Debug, PartialEq)]
pub struct Counters {
    txn: SumCount,
    range: SumCount,
    shard_txn: SumCount,
    /// (writes, batches): writes committed and shard Txns that carried them.
    batches: SumCount,
}

/// Reads the router's counters from its admin address.
pub async fn read(http: &reqwest::Client, admin: &str) -> anyhow::Result<Counters> {
    let text = scrape(http, admin).await?;
    let rpc = |method: &str| {
        let labels = format!("{{method=\"{method}\"}}");
        (
            labeled(&text, "ste_router_rpc_duration_seconds_sum", &labels),
            labeled(&text, "ste_router_rpc_duration_seconds_count", &labels),
        )
    };
    Ok(Counters {
        txn: rpc("Txn"),
        range: rpc("Range"),
        shard_txn: (
            metric(&text, "ste_router_shard_txn_duration_seconds_sum")?,
            metric(&text, "ste_router_shard_txn_duration_seconds_count")?,
        ),
        batches: (
            metric(&text, "ste_router_batch_writes_sum")?,
            metric(&text, "ste_router_batch_writes_count")?,
        ),
    })
}

/// The router's share of one step.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct RouterTime {
    /// Txn calls (kube-apiserver's writes, and its reads of one key inside a
    /// Txn) per Deployment sent.
    pub txn_per_deployment: f64,
    /// Mean time the router took to answer a Txn, ms.
    pub txn_mean_ms: f64,
    /// Mean time of a shard Txn (one per group commit), ms.
    pub shard_txn_mean_ms: f64,
    /// Writes per shard Txn (group commit).
    pub writes_per_batch: f64,
    /// Range calls per Deployment sent, and their mean time in the router, ms.
    pub range_per_deployment: f64,
    pub range_mean_ms: f64,
}

/// What happened between two readings, for `deployments` sent.
pub fn between(before: &Counters, after: &Counters, deployments: usize) -> RouterTime {
    let diff = |a: SumCount, b: SumCount| (a.0 - b.0, a.1 - b.1);
    let mean_ms = |(sum, count): SumCount| sum / count * 1e3;
    let per = deployments.max(1) as f64;
    let txn = diff(after.txn, before.txn);
    let range = diff(after.range, before.range);
    let batches = diff(after.batches, before.batches);
    RouterTime {
        txn_per_deployment: txn.1 / per,
        txn_mean_ms: mean_ms(txn),
        shard_txn_mean_ms: mean_ms(diff(after.shard_txn, before.shard_txn)),
        writes_per_batch: batches.0 / batches.1,
        range_per_deployment: range.1 / per,
        range_mean_ms: mean_ms(range),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_is_the_difference_of_two_readings() {
        let before = Counters {
            txn: (1.0, 1000.0),
            range: (0.5, 100.0),
            shard_txn: (0.2, 400.0),
            batches: (900.0, 400.0),
        };
        let after = Counters {
            txn: (1.6, 2000.0),
            range: (0.5, 100.0),
            shard_txn: (0.5, 900.0),
            batches: (1900.0, 900.0),
        };
        let step = between(&before, &after, 100);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(step.txn_per_deployment, 10.0));
        assert!(close(step.txn_mean_ms, 0.6));
        assert!(close(step.shard_txn_mean_ms, 0.6));
        assert!(close(step.writes_per_batch, 2.0));
        assert!(close(step.range_per_deployment, 0.0));
        assert!(step.range_mean_ms.is_nan(), "no Range: no mean");
    }
}
