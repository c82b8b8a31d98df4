//! One level below the pod hops on every arm alike: kube-apiserver's own
//! timing of its calls to the pod store (`etcd_request_duration_seconds`,
//! by operation, for `resource="pods"`), read from its `/metrics` before
//! and after a step. The pod store is the durable etcd on stock, the RAM
//! etcd on override and ste-router on STE, so this is the time each arm's
//! store took per call as kube-apiserver saw it (its client included).

use serde::Serialize;

/// The pod store operations reported, in order.
const OPERATIONS: [&str; 4] = ["create", "update", "get", "delete"];
const SUM: &str = "etcd_request_duration_seconds_sum{";
const COUNT: &str = "etcd_request_duration_seconds_count{";

/// kube-apiserver's `/metrics` text.
pub async fn read(client: &kube::Client) -> anyhow::Result<String> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    Ok(client.request_text(request).await?)
}

/// One operation on the pod store during a step.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct StoreCalls {
    pub operation: &'static str,
    pub per_deployment: f64,
    /// Mean time per call as kube-apiserver measured it, ms.
    pub mean_ms: f64,
}

/// (sum of seconds, count) of `operation` on pods in a metrics text.
fn sum_count(text: &str, operation: &str) -> (f64, f64) {
    let wanted = format!("operation=\"{operation}\"");
    let mut total = (0.0, 0.0);
    for line in text.lines() {
        let is_sum = line.starts_with(SUM);
        if !(is_sum || line.starts_with(COUNT)) {
            continue;
        }
        if !(line.contains("resource=\"pods\"") && line.contains(&wanted)) {
            continue;
        }
        let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        if is_sum {
            total.0 += value;
        } else {
            total.1 += value;
        }
    }
    total
}

/// Each operation's calls per Deployment and mean time between two readings.
pub fn between(before: &str, after: &str, deployments: usize) -> Vec<StoreCalls> {
    OPERATIONS
        .iter()
        .map(|operation| {
            let (sum0, count0) = sum_count(before, operation);
            let (sum1, count1) = sum_count(after, operation);
            let calls = count1 - count0;
            StoreCalls {
                operation,
                per_deployment: calls / deployments.max(1) as f64,
                mean_ms: (sum1 - sum0) / calls * 1e3,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(create: (f64, u64), update: (f64, u64)) -> String {
        format!(
            "# TYPE etcd_request_duration_seconds histogram
etcd_request_duration_seconds_bucket{{group=\"\",operation=\"create\",resource=\"pods\",le=\"0.005\"}} 1
etcd_request_duration_seconds_sum{{group=\"\",operation=\"create\",resource=\"pods\"}} {}
etcd_request_duration_seconds_count{{group=\"\",operation=\"create\",resource=\"pods\"}} {}
etcd_request_duration_seconds_sum{{group=\"\",operation=\"update\",resource=\"pods\"}} {}
etcd_request_duration_seconds_count{{group=\"\",operation=\"update\",resource=\"pods\"}} {}
etcd_request_duration_seconds_sum{{group=\"apps\",operation=\"create\",resource=\"replicasets\"}} 99
etcd_request_duration_seconds_count{{group=\"apps\",operation=\"create\",resource=\"replicasets\"}} 99
",
            create.0, create.1, update.0, update.1
        )
    }

    #[test]
    fn only_pod_calls_count_and_a_step_is_the_difference() {
        let before = text((1.0, 100), (2.0, 300));
        let after = text((1.5, 200), (3.2, 700));
        let calls = between(&before, &after, 100);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        let create = &calls[0];
        assert_eq!(create.operation, "create");
        assert!(close(create.per_deployment, 1.0) && close(create.mean_ms, 5.0));
        let update = &calls[1];
        assert!(close(update.per_deployment, 4.0) && close(update.mean_ms, 3.0));
        assert!(close(calls[2].per_deployment, 0.0) && calls[2].mean_ms.is_nan());
    }
}
