//! Reading Prometheus' text format (ste-router's and etcd's `/metrics`).

use anyhow::Context;

/// The text of `{base}/metrics`.
pub async fn scrape(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    Ok(http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}

/// One sample of a metric without labels.
pub fn metric(text: &str, name: &str) -> anyhow::Result<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("/metrics has no {name}"))
}

/// The sum of the samples of `name` whose labels contain `labels` (e.g.
/// `{method="Txn"}`, or `method="Txn"` to match it among other labels); 0
/// when there is none.
pub fn labeled(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP ste_router_batch_writes Writes committed together.
ste_router_batch_writes_sum 12.0
ste_router_batch_writes_count 4
ste_router_rpc_duration_seconds_sum{method=\"Txn\"} 0.5
ste_router_rpc_duration_seconds_sum{method=\"Range\"} 0.25
ste_router_rpc_duration_seconds_count{method=\"Txn\"} 10
";

    #[test]
    fn samples_are_found_by_name_and_labels() {
        assert_eq!(metric(TEXT, "ste_router_batch_writes_sum").ok(), Some(12.0));
        assert!(
            metric(TEXT, "ste_router_batch_writes").is_err(),
            "a prefix is not a name"
        );
        let txn = "{method=\"Txn\"}";
        assert_eq!(
            labeled(TEXT, "ste_router_rpc_duration_seconds_sum", txn),
            0.5
        );
        assert_eq!(
            labeled(TEXT, "ste_router_rpc_duration_seconds_count", txn),
            10.0
        );
        assert_eq!(
            labeled(TEXT, "ste_router_rpc_duration_seconds_sum", "method="),
            0.75
        );
        assert_eq!(
            labeled(TEXT, "ste_router_rpc_duration_seconds_count", "Put"),
            0.0
        );
    }
}
