//! The scenario suites' figures from their results files: job bursts,
//! durable-etcd members, losing the RAM store, ring changes and the router
//! against plain etcd. Each reads only the fields it draws; several files
//! are repeats (bars show the median and a whisker from lowest to highest).

use serde::Deserialize;
use serde_json::Value;

use super::groups::{GroupChart, GroupPanel, GroupValue, Kind};
use super::input::{rows, InputError, LatencySet, Load, SuitePlots};

/// One value before repeats are merged.
fn at(series: &str, category: usize, value: f64, high: Option<f64>) -> GroupValue {
    GroupValue {
        series: series.into(),
        category,
        value,
        high,
        spread: None,
        note: None,
    }
}

/// Repeats of the same series and category as one value: the median (of
/// p50 and of p99 alike), with the lowest and highest value as its spread
/// when there were several.
pub fn merge(values: Vec<GroupValue>) -> Vec<GroupValue> {
    let mut groups: Vec<Vec<GroupValue>> = Vec::new();
    for v in values {
        match groups
            .iter_mut()
            .find(|g| g[0].series == v.series && g[0].category == v.category)
        {
            Some(g) => g.push(v),
            None => groups.push(vec![v]),
        }
    }
    groups
        .into_iter()
        .map(|g| {
            let mut main: Vec<f64> = g.iter().map(|v| v.value).collect();
            let highs: Vec<f64> = g.iter().filter_map(|v| v.high).collect();
            main.sort_by(|a, b| a.total_cmp(b));
            let spread = (main.len() > 1).then(|| (main[0], main[main.len() - 1]));
            GroupValue {
                series: g[0].series.clone(),
                category: g[0].category,
                value: median(&main),
                high: (!highs.is_empty()).then(|| {
                    let mut h = highs.clone();
                    h.sort_by(|a, b| a.total_cmp(b));
                    median(&h)
                }),
                spread,
                note: g.iter().find_map(|v| v.note.clone()),
            }
        })
        .collect()
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return 0.0;
    }
    (sorted[(n - 1) / 2] + sorted[n / 2]) / 2.0
}

fn panel(title: &str, kind: Kind, categories: &[&str], y_label: &str) -> GroupPanel {
    GroupPanel {
        title: title.into(),
        kind,
        categories: categories.iter().map(|c| c.to_string()).collect(),
        x_label: String::new(),
        y_label: y_label.into(),
        values: Vec::new(),
    }
}

/// A results file that is one JSON object (not a list).
fn object<T: serde::de::DeserializeOwned>(
    what: &str,
    value: &Value,
    expected: &'static str,
) -> Result<T, InputError> {
    serde_json::from_value(value.clone()).map_err(|source| InputError::Shape {
        what: what.into(),
        expected,
        source,
    })
}

fn suite(name: &str) -> SuitePlots {
    SuitePlots {
        name: name.into(),
        ..Default::default()
    }
}

#[derive(Deserialize)]
struct JobsRow {
    arm: String,
    scenario: String,
    pods: usize,
    all_created_s: f64,
    all_bound_s: f64,
    all_running_s: f64,
}

/// How a reader names a jobs scenario.
fn burst_title(scenario: &str, pods: usize) -> String {
    match scenario {
        "jobs-x1" => format!("{pods} Jobs × 1 pod, created at once"),
        "job-x-pods" => format!("1 Job × {pods} pods"),
        other => other.to_string(),
    }
}

/// `ste-bench jobs`: per burst, seconds until the last pod was created,
/// bound and Running, per arm.
pub fn jobs(name: &str, runs: &[(String, Value)]) -> Result<SuitePlots, InputError> {
    let mut panels: Vec<(String, GroupPanel)> = Vec::new();
    for (what, value) in runs {
        let list: Vec<JobsRow> = rows(what, value, "ste-bench jobs's results.json")?;
        for row in list {
            let index = match panels.iter().position(|p| p.0 == row.scenario) {
                Some(i) => i,
                None => {
                    let title = burst_title(&row.scenario, row.pods);
                    let p = panel(
                        &title,
                        Kind::Bars,
                        &["all created", "all bound", "all Running"],
                        "seconds from the burst's start",
                    );
                    panels.push((row.scenario.clone(), p));
                    panels.len() - 1
                }
            };
            let arm = row.arm.to_lowercase();
            let times = [row.all_created_s, row.all_bound_s, row.all_running_s];
            for (c, s) in times.into_iter().enumerate() {
                panels[index].1.values.push(at(&arm, c, s, None));
            }
        }
    }
    let mut plots = suite(name);
    plots.groups.push(GroupChart {
        file: "bursts".into(),
        title: "Job bursts: seconds until the last pod was created, bound, Running".into(),
        panels: finish(panels.into_iter().map(|p| p.1).collect()),
    });
    Ok(plots)
}

/// Panels with their repeats merged.
fn finish(panels: Vec<GroupPanel>) -> Vec<GroupPanel> {
    panels
        .into_iter()
        .map(|mut p| {
            p.values = merge(std::mem::take(&mut p.values));
            p
        })
        .collect()
}

#[derive(Deserialize)]
struct MembersFile {
    writes: Vec<WriteRow>,
    #[serde(default)]
    pods: Vec<PodRow>,
}

#[derive(Deserialize)]
struct WriteRow {
    members: usize,
    offered_per_s: Option<f64>,
    achieved_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Deserialize)]
struct PodRow {
    arm: String,
    #[serde(default)]
    etcd_members: Option<usize>,
    bound_samples: Vec<(f64, f64)>,
}

fn members_label(n: usize) -> String {
    match n {
        1 => "1 member".into(),
        n => format!("{n} members"),
    }
}

fn write_load(row: &WriteRow) -> String {
    match row.offered_per_s {
        Some(rate) => format!("{}/s", super::ticks::trim(rate)),
        None => "saturated".into(),
    }
}

/// The series of the Put figure: the durable etcd at one member count, in
/// the colour of the stock arm on that many members.
fn etcd_label(n: usize) -> String {
    format!("etcd {}", members_label(n))
}

/// `ste-bench members`: durable etcd's Put latency and throughput per
/// member count and load, and pod create→bound per arm at each count.
pub fn members(name: &str, runs: &[(String, Value)]) -> Result<SuitePlots, InputError> {
    let mut plots = suite(name);
    plots.latency = "create → pod bound".into();
    plots.load_axis = "members of the durable etcd".into();
    let mut files = Vec::new();
    for (what, value) in runs {
        let file: MembersFile = object(what, value, "ste-bench members's results.json")?;
        if file.writes.is_empty() && file.pods.is_empty() {
            return Err(InputError::Empty(what.clone()));
        }
        files.push(file);
    }
    let mut loads: Vec<(Option<f64>, String)> = Vec::new();
    for w in files.iter().flat_map(|f| &f.writes) {
        if !loads.iter().any(|(rate, _)| *rate == w.offered_per_s) {
            loads.push((w.offered_per_s, write_load(w)));
        }
    }
    // Offered rates up, saturation last.
    loads.sort_by(|a, b| match (a.0, b.0) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
    let labels: Vec<&str> = loads.iter().map(|(_, l)| l.as_str()).collect();
    let mut latency = panel(
        "Put latency p50, p99 (from when due), per load",
        Kind::Percentiles,
        &labels,
        "Put latency",
    );
    let mut rate = panel(
        "Puts acknowledged per second, per load",
        Kind::Bars,
        &labels,
        "Puts/s",
    );
    for (repeat, file) in files.iter().enumerate() {
        for w in &file.writes {
            let c = loads
                .iter()
                .position(|(r, _)| *r == w.offered_per_s)
                .unwrap_or(0);
            let series = etcd_label(w.members);
            latency
                .values
                .push(at(&series, c, w.p50_ms, Some(w.p99_ms)));
            rate.values.push(at(&series, c, w.achieved_per_s, None));
        }
        for p in &file.pods {
            let n = p.etcd_members.unwrap_or(1);
            plots.latencies.push(LatencySet {
                arm: p.arm.to_lowercase(),
                load: Load {
                    value: n as f64,
                    label: members_label(n),
                },
                repeat,
                latencies_ms: p.bound_samples.iter().map(|s| s.1).collect(),
            });
        }
    }
    if !latency.values.is_empty() {
        plots.groups.push(GroupChart {
            file: "writes".into(),
            title: "Durable etcd alone: Put latency and throughput per member count".into(),
            panels: finish(vec![latency, rate]),
        });
    }
    Ok(plots)
}

#[derive(Deserialize)]
struct FailureRow {
    arm: String,
    pods_before: usize,
    pods_lost: usize,
    pods_recreated: usize,
    whole_after_s: Option<f64>,
    list_errors: usize,
    watch_errors: usize,
    watch_relists: usize,
    pods_listed_after: usize,
    pods_in_store_after: Option<usize>,
    churn_errors: usize,
}

/// "SteRf2" → "ste rf 2"; "Override" → "override".
fn victim_arm(arm: &str) -> String {
    let arm = arm.to_lowercase();
    match arm.strip_prefix("sterf") {
        Some(rf) => format!("ste rf {rf}"),
        None => arm,
    }
}

/// `ste-bench failure`: per arm, what killing its RAM store cost.
pub fn failure(name: &str, runs: &[(String, Value)]) -> Result<SuitePlots, InputError> {
    let mut before = 0;
    let mut pods = panel(
        "",
        Kind::Bars,
        &["lost", "recreated", "listed, not in store"],
        "steady pods",
    );
    let mut whole = panel(
        "time until every ReplicaSet is whole again",
        Kind::Bars,
        &["kill → whole"],
        "seconds",
    );
    let mut client = panel(
        "errors and relists a client saw",
        Kind::Bars,
        &["watch errors", "relists", "list errors", "churn errors"],
        "count",
    );
    for (what, value) in runs {
        let list: Vec<FailureRow> = rows(what, value, "ste-bench failure's results.json")?;
        for r in list {
            let arm = victim_arm(&r.arm);
            before = before.max(r.pods_before);
            let missing = r
                .pods_in_store_after
                .map(|s| r.pods_listed_after.saturating_sub(s))
                .unwrap_or(0);
            for (c, n) in [r.pods_lost, r.pods_recreated, missing].iter().enumerate() {
                pods.values.push(at(&arm, c, *n as f64, None));
            }
            // Listed by kube-apiserver but gone from the store: its cache
            // hides the loss, nothing recreates the pods, so never whole.
            let whole_after = r.whole_after_s.filter(|_| missing == 0);
            let mut w = at(&arm, 0, whole_after.unwrap_or(0.0), None);
            if r.whole_after_s.is_none() {
                w.note = Some("not whole".into());
            } else if whole_after.is_none() {
                w.note = Some(format!("never: {missing} listed, not stored"));
            }
            whole.values.push(w);
            let counts = [
                r.watch_errors,
                r.watch_relists,
                r.list_errors,
                r.churn_errors,
            ];
            for (c, n) in counts.iter().enumerate() {
                client.values.push(at(&arm, c, *n as f64, None));
            }
        }
    }
    pods.title = format!("steady pods after the kill (of {before} before)");
    let mut plots = suite(name);
    plots.groups.push(GroupChart {
        file: "losses".into(),
        title: "Killing the RAM store (and wiping it) in the middle of churn, per arm".into(),
        panels: finish(vec![pods, whole, client]),
    });
    Ok(plots)
}

#[derive(Deserialize)]
struct RingRun {
    keys: usize,
    phases: Vec<RingPhase>,
}

#[derive(Deserialize)]
struct RingPhase {
    phase: String,
    duration_s: f64,
    keys_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn keys_label(keys: usize) -> String {
    if keys >= 1000 && keys.is_multiple_of(1000) {
        format!("{}k keys", keys / 1000)
    } else {
        format!("{keys} keys")
    }
}

/// `ste-bench ring`: client latency per phase, and how long moving the
/// keys took on join and on drain, per key count.
pub fn ring(name: &str, runs: &[(String, Value)]) -> Result<SuitePlots, InputError> {
    let mut counts: Vec<usize> = Vec::new();
    let mut all = Vec::new();
    for (what, value) in runs {
        let list: Vec<RingRun> = rows(what, value, "ste-bench ring's JSON file")?;
        counts.extend(list.iter().map(|r| r.keys));
        all.extend(list);
    }
    counts.sort_unstable();
    counts.dedup();
    let labels: Vec<String> = counts.iter().map(|k| keys_label(*k)).collect();
    let labels: Vec<&str> = labels.iter().map(|s| s.as_str()).collect();
    let mut latency = panel(
        "client requests, p50 and p99, during each phase",
        Kind::Percentiles,
        &labels,
        "request latency",
    );
    let mut seconds = panel("seconds to move the keys", Kind::Bars, &labels, "seconds");
    let mut speed = panel("keys moved per second", Kind::Bars, &labels, "keys/s");
    for run in &all {
        let c = counts.iter().position(|k| *k == run.keys).unwrap_or(0);
        for p in &run.phases {
            // Every phase is STE's: shades of its blue, not other arms' colours.
            let series = format!("ste {}", p.phase);
            latency
                .values
                .push(at(&series, c, p.p50_ms, Some(p.p99_ms)));
            if p.phase != "baseline" {
                seconds.values.push(at(&series, c, p.duration_s, None));
                speed.values.push(at(&series, c, p.keys_per_s, None));
            }
        }
    }
    let mut plots = suite(name);
    plots.groups.push(GroupChart {
        file: "moves".into(),
        title: "Ring changes: a shard joins, then one drains, under client load".into(),
        panels: finish(vec![latency, seconds, speed]),
    });
    Ok(plots)
}

#[derive(Deserialize)]
struct RouterRow {
    arm: String,
    shards: usize,
    get_p50_us: f64,
    get_p99_us: f64,
    create_p50_us: f64,
    create_p99_us: f64,
    update_p50_us: f64,
    update_p99_us: f64,
    watch_p50_us: f64,
    watch_p99_us: f64,
    list_all_ms: f64,
    saturated_writes_per_s: f64,
}

fn router_arm(row: &RouterRow) -> String {
    match (row.arm.as_str(), row.shards) {
        ("etcd", _) => "plain etcd".into(),
        (_, 1) => "router 1 shard".into(),
        (_, n) => format!("router {n} shards"),
    }
}

/// `ste-bench router`: p50/p99 per operation per arm, saturated writes
/// and a paged List, plain etcd against the router at N shards.
pub fn router(name: &str, runs: &[(String, Value)]) -> Result<SuitePlots, InputError> {
    let mut ops = panel(
        "one client, sequential: p50 and p99 per operation",
        Kind::Percentiles,
        &["get", "create", "update", "write → watch event"],
        "latency",
    );
    let mut writes = panel(
        "writes/s at saturation (concurrent clients)",
        Kind::Bars,
        &["creates"],
        "writes/s",
    );
    let mut list = panel(
        "paged List of every key (limit 500)",
        Kind::Bars,
        &["List"],
        "ms",
    );
    for (what, value) in runs {
        let list_rows: Vec<RouterRow> = rows(what, value, "ste-bench router's JSON file")?;
        for r in list_rows {
            let arm = router_arm(&r);
            let pairs = [
                (r.get_p50_us, r.get_p99_us),
                (r.create_p50_us, r.create_p99_us),
                (r.update_p50_us, r.update_p99_us),
                (r.watch_p50_us, r.watch_p99_us),
            ];
            for (c, (p50, p99)) in pairs.into_iter().enumerate() {
                ops.values
                    .push(at(&arm, c, p50 / 1000.0, Some(p99 / 1000.0)));
            }
            writes
                .values
                .push(at(&arm, 0, r.saturated_writes_per_s, None));
            list.values.push(at(&arm, 0, r.list_all_ms, None));
        }
    }
    let mut plots = suite(name);
    plots.groups.push(GroupChart {
        file: "ops".into(),
        title: "ste-router against one plain etcd (all on RAM disks)".into(),
        panels: finish(vec![ops, writes, list]),
    });
    Ok(plots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_merge_into_a_median_with_its_spread() {
        let merged = merge(vec![
            at("a", 0, 3.0, Some(9.0)),
            at("a", 0, 1.0, Some(5.0)),
            at("a", 0, 2.0, Some(7.0)),
            at("b", 0, 4.0, None),
        ]);
        assert_eq!(merged.len(), 2);
        assert_eq!(
            (merged[0].value, merged[0].high, merged[0].spread),
            (2.0, Some(7.0), Some((1.0, 3.0)))
        );
        assert_eq!(merged[1].spread, None);
        assert_eq!(victim_arm("SteRf2"), "ste rf 2");
        assert_eq!(keys_label(30000), "30k keys");
    }
}
