//! What the plots draw, in types of their own: latencies per arm and load,
//! lines over time, and cold-start hops. Suites fill them; so does
//! `ste-bench plot --from` from a recorded `results.json`, through the same
//! readers ([`churn`], [`startup`]), so a replot draws what the run drew.

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use super::lines::{Line, LineChart};

/// One load step: the value it sorts by and how a reader names it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Load {
    pub value: f64,
    pub label: String,
}

/// The latencies of one arm at one load in one repeat.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct LatencySet {
    pub arm: String,
    pub load: Load,
    /// 0 for the first run; spread over repeats comes from several.
    #[serde(default)]
    pub repeat: usize,
    pub latencies_ms: Vec<f64>,
}

/// One cold start (one revision woken once): milliseconds from the wake to
/// each hop it reached, in hop order (see [`COLDSTART_HOPS`]).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Wake {
    pub arm: String,
    /// Revisions woken at once in this round.
    pub revisions: usize,
    #[serde(default)]
    pub repeat: usize,
    pub hops_ms: Vec<(String, f64)>,
}

/// The hops of a Knative cold start, in order; a wake lists those it reached.
/// `container started` and `IP listed` are the real node's (`coldstart-real`:
/// Knative's activator sends the request to a pod IP listed not ready,
/// before the pod is Ready).
pub const COLDSTART_HOPS: [&str; 9] = [
    "wake",
    "scaled",
    "created",
    "bound",
    "container started",
    "IP listed",
    "ready",
    "endpoints",
    "first response",
];

/// Everything one suite's figures are made of.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct SuitePlots {
    /// File name prefix, e.g. `churn`.
    pub name: String,
    /// What the latency measures, e.g. "create → pod bound".
    pub latency: String,
    /// What the loads are, e.g. "offered Deployments/s".
    pub load_axis: String,
    pub latencies: Vec<LatencySet>,
    #[serde(default)]
    pub lines: Vec<LineChart>,
    #[serde(default)]
    pub wakes: Vec<Wake>,
    /// Values per arm at a few categories (bars, p50/p99 marks).
    #[serde(default)]
    pub groups: Vec<super::groups::GroupChart>,
}

/// A results file the readers do not understand.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{what}: expected {expected}: {source}")]
    Shape {
        what: String,
        expected: &'static str,
        source: serde_json::Error,
    },
    #[error("{0}: no results in it")]
    Empty(String),
}

/// The fields of `ste-bench churn`'s results.json the plots use.
#[derive(Deserialize)]
struct ChurnRow {
    arm: String,
    #[serde(default)]
    client_qps: Option<u32>,
    /// Members of the durable etcd (1 when absent).
    #[serde(default)]
    etcd_members: Option<u32>,
    offered_per_s: f64,
    sent: usize,
    /// (seconds from start to bound, create→bound ms) per Deployment.
    bound_samples: Vec<(f64, f64)>,
}

/// The fields of `ste-bench startup`'s results.json the plots use.
#[derive(Deserialize)]
struct StartupRow {
    arm: String,
    parallelism: usize,
    deployments_per_s: f64,
    running_ms: Vec<f64>,
}

pub(super) fn rows<T: serde::de::DeserializeOwned>(
    what: &str,
    value: &Value,
    expected: &'static str,
) -> Result<Vec<T>, InputError> {
    let rows: Vec<T> =
        serde_json::from_value(value.clone()).map_err(|source| InputError::Shape {
            what: what.into(),
            expected,
            source,
        })?;
    if rows.is_empty() {
        return Err(InputError::Empty(what.into()));
    }
    Ok(rows)
}

/// The arm's name in plots: lowercase, with its durable etcd's members when
/// more than one, and its client limits when the runs used more than one setting.
fn churn_arm(row: &ChurnRow, several_qps: bool) -> String {
    let mut arm = row.arm.to_lowercase();
    if let Some(n) = row.etcd_members.filter(|n| *n > 1) {
        arm = format!("{arm} {n} members");
    }
    // stock-qps names its raised limits itself.
    match (several_qps, row.client_qps) {
        (true, Some(q)) if !arm.contains("qps") => format!("{arm} qps {q}"),
        _ => arm,
    }
}

/// Churn's figures from one results.json per repeat (`runs[i]` is repeat i).
pub fn churn(name: &str, runs: &[(String, Value)]) -> Result<SuitePlots, InputError> {
    let mut plots = SuitePlots {
        name: name.into(),
        latency: "create → pod bound".into(),
        load_axis: "offered Deployments/s".into(),
        ..Default::default()
    };
    let mut panels: Vec<(String, Vec<Line>)> = Vec::new();
    for (repeat, (what, value)) in runs.iter().enumerate() {
        let rows: Vec<ChurnRow> = rows(what, value, "ste-bench churn's results.json")?;
        let several_qps = rows.iter().any(|r| r.client_qps != rows[0].client_qps);
        for row in &rows {
            let arm = churn_arm(row, several_qps);
            let load = Load {
                value: row.offered_per_s,
                label: format!("{}/s", super::ticks::trim(row.offered_per_s)),
            };
            plots.latencies.push(LatencySet {
                arm: arm.clone(),
                load: load.clone(),
                repeat,
                latencies_ms: row.bound_samples.iter().map(|s| s.1).collect(),
            });
            if repeat == 0 {
                add_throughput(&mut panels, row, arm, &load);
            }
        }
    }
    panels.sort_by(|a, b| natural(&a.0).total_cmp(&natural(&b.0)));
    plots.lines.push(LineChart {
        title: "pods bound per second against the offered load".into(),
        x_label: "seconds from the first Deployment".into(),
        y_label: "pods bound per second".into(),
        log_x: false,
        log_y: false,
        markers: false,
        panels,
    });
    Ok(plots)
}

/// The leading number of a panel title ("20/s" → 20), for sorting.
fn natural(title: &str) -> f64 {
    let digits: String = title
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    digits.parse().unwrap_or(f64::MAX)
}

fn add_throughput(panels: &mut Vec<(String, Vec<Line>)>, row: &ChurnRow, arm: String, load: &Load) {
    let sending = row.sent as f64 / row.offered_per_s;
    let title = format!("offered {}", load.label);
    let index = match panels.iter().position(|p| p.0 == title) {
        Some(i) => i,
        None => {
            panels.push((
                title,
                vec![Line {
                    arm: "offered".into(),
                    points: vec![
                        (0.0, row.offered_per_s),
                        (sending, row.offered_per_s),
                        (sending, 0.0),
                    ],
                }],
            ));
            panels.len() - 1
        }
    };
    panels[index].1.push(Line {
        arm,
        points: per_second(&row.bound_samples, sending),
    });
}

/// Events per second in one-second bins, drawn as a step line, from
/// (seconds from start, _) samples, up to at least `until` seconds.
pub fn per_second(samples: &[(f64, f64)], until: f64) -> Vec<(f64, f64)> {
    let seconds = samples
        .iter()
        .map(|s| s.0)
        .fold(until, f64::max)
        .ceil()
        .max(1.0) as usize;
    let mut bins = vec![0usize; seconds];
    for (t, _) in samples {
        bins[(t.max(0.0) as usize).min(seconds - 1)] += 1;
    }
    bins.iter()
        .enumerate()
        .flat_map(|(i, n)| [(i as f64, *n as f64), ((i + 1) as f64, *n as f64)])
        .collect()
}

/// Startup's figures from one results.json per repeat.
pub fn startup(name: &str, runs: &[(String, Value)]) -> Result<SuitePlots, InputError> {
    let mut plots = SuitePlots {
        name: name.into(),
        latency: "create → pod Running".into(),
        load_axis: "Deployments created at once".into(),
        ..Default::default()
    };
    let mut throughput: Vec<Line> = Vec::new();
    for (repeat, (what, value)) in runs.iter().enumerate() {
        let rows: Vec<StartupRow> = rows(what, value, "ste-bench startup's results.json")?;
        for row in rows {
            let arm = row.arm.to_lowercase();
            plots.latencies.push(LatencySet {
                arm: arm.clone(),
                load: Load {
                    value: row.parallelism as f64,
                    label: format!("P={}", row.parallelism),
                },
                repeat,
                latencies_ms: row.running_ms,
            });
            let point = (row.parallelism as f64, row.deployments_per_s);
            match throughput.iter_mut().find(|l| l.arm == arm) {
                Some(line) => line.points.push(point),
                None => throughput.push(Line {
                    arm,
                    points: vec![point],
                }),
            }
        }
    }
    for line in &mut throughput {
        line.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    plots.lines.push(LineChart {
        title: "Deployments fully available per second".into(),
        x_label: "Deployments created at once".into(),
        y_label: "Deployments/s".into(),
        log_x: true,
        log_y: false,
        markers: true,
        panels: vec![(String::new(), throughput)],
    });
    Ok(plots)
}

/// Hops as `ste-bench coldstart` names them in its rounds' `wakes[].ms`,
/// and as the plots do.
const ROUND_HOPS: [(&str, &str); 5] = [
    ("scaled", "scaled"),
    ("pod_created", "created"),
    ("pod_bound", "bound"),
    ("pod_ready", "ready"),
    ("endpoints", "endpoints"),
];

/// A round of wakes as `ste-bench coldstart` records it (its `hops` field,
/// or the round itself).
#[derive(Deserialize)]
struct Round {
    arm: String,
    revisions: usize,
    wakes: Vec<RoundWake>,
}

#[derive(Deserialize)]
struct RoundWake {
    ms: std::collections::BTreeMap<String, f64>,
}

/// A round's arm as the plots name arms: "Ste, bridge aggressive" →
/// "ste+bridge aggressive", "Stock, bridge none" → "stock".
fn round_arm(arm: &str) -> String {
    let arm = arm.trim().to_lowercase();
    match arm.split_once(", bridge ") {
        Some((base, "none")) => base.to_string(),
        Some((base, mode)) => format!("{base}+bridge {mode}"),
        None => arm,
    }
}

/// The wakes of one results row: a [`Wake`] itself, a round with `wakes`,
/// or a coldstart result whose `hops` holds the round (none when null).
fn row_wakes(row: &Value, repeat: usize) -> Result<Vec<Wake>, serde_json::Error> {
    // A coldstart round run with --repeats names its repeat itself.
    let own = row.get("repeat").and_then(Value::as_u64).unwrap_or(0) as usize;
    let repeat = repeat.max(own);
    if row.get("hops_ms").is_some() {
        let mut wake: Wake = serde_json::from_value(row.clone())?;
        wake.repeat = wake.repeat.max(repeat);
        return Ok(vec![wake]);
    }
    let round = match row.get("hops") {
        Some(Value::Null) => return Ok(Vec::new()),
        Some(hops) if row.get("wakes").is_none() => hops,
        _ => row,
    };
    let round: Round = serde_json::from_value(round.clone())?;
    Ok(round
        .wakes
        .iter()
        .map(|w| Wake {
            arm: round_arm(&round.arm),
            revisions: round.revisions,
            repeat,
            hops_ms: std::iter::once(("wake".to_string(), 0.0))
                .chain(
                    ROUND_HOPS
                        .iter()
                        .filter_map(|(key, name)| w.ms.get(*key).map(|ms| (name.to_string(), *ms))),
                )
                .collect(),
        })
        .collect())
}

/// Cold start's figures from results files (one per repeat), each a JSON
/// list of [`Wake`]s, of rounds (`{arm, revisions, wakes: [{ms: {hop: ms}}]}`)
/// or of `ste-bench coldstart` results holding a round in `hops`; or the
/// open-loop sweep's `{"sweep": …}` (its figure: [`super::sweep::chart`]).
pub fn coldstart(name: &str, runs: &[(String, Value)]) -> Result<SuitePlots, InputError> {
    let mut wakes: Vec<Wake> = Vec::new();
    let mut sweeps = Vec::new();
    for (repeat, (what, value)) in runs.iter().enumerate() {
        // `coldstart --sweep` writes {"sweep": …}.
        if let Some(sweep) = value.get("sweep") {
            let chart = super::sweep::chart(sweep).map_err(|source| InputError::Shape {
                what: what.clone(),
                expected: "coldstart --sweep's {\"sweep\": {steps: [{arm, bridge, rate_per_s, endpoints_ms}]}}",
                source,
            })?;
            sweeps.push(
                chart.ok_or_else(|| InputError::Empty(format!("{what}: a sweep without steps")))?,
            );
            continue;
        }
        let list: Vec<Value> = rows(what, value, "a JSON list")?;
        for row in &list {
            wakes.extend(row_wakes(row, repeat).map_err(|source| InputError::Shape {
                what: what.clone(),
                expected:
                    "wakes {arm, revisions, hops_ms} or coldstart rounds {arm, revisions, wakes}",
                source,
            })?);
        }
    }
    if wakes.is_empty() && sweeps.is_empty() {
        let what = runs
            .iter()
            .map(|r| r.0.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(InputError::Empty(format!("{what}: no wake with hops")));
    }
    let mut plots = coldstart_from_wakes(name, wakes);
    plots.lines.extend(sweeps);
    Ok(plots)
}

/// Cold start's figures from wakes: the CDF is of each wake's last hop.
pub fn coldstart_from_wakes(name: &str, wakes: Vec<Wake>) -> SuitePlots {
    let mut plots = SuitePlots {
        name: name.into(),
        latency: "wake → last hop reached".into(),
        load_axis: "revisions woken at once".into(),
        ..Default::default()
    };
    for w in &wakes {
        let Some((_, ms)) = w.hops_ms.last() else {
            continue;
        };
        let load = Load {
            value: w.revisions as f64,
            label: match w.revisions {
                1 => "1 revision".to_string(),
                n => format!("{n} revisions"),
            },
        };
        match plots
            .latencies
            .iter_mut()
            .find(|s| s.arm == w.arm && s.load == load && s.repeat == w.repeat)
        {
            Some(set) => set.latencies_ms.push(*ms),
            None => plots.latencies.push(LatencySet {
                arm: w.arm.clone(),
                load,
                repeat: w.repeat,
                latencies_ms: vec![*ms],
            }),
        }
    }
    plots.wakes = wakes;
    plots
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_second_counts_each_second() {
        let samples = [(0.1, 5.0), (0.9, 5.0), (2.5, 5.0)];
        assert_eq!(
            per_second(&samples, 2.0),
            vec![
                (0.0, 2.0),
                (1.0, 2.0),
                (1.0, 0.0),
                (2.0, 0.0),
                (2.0, 1.0),
                (3.0, 1.0)
            ]
        );
    }

    #[test]
    fn a_file_of_another_shape_is_an_error_not_a_panic() {
        let err = churn("churn", &[("x.json".into(), serde_json::json!({"a": 1}))]).unwrap_err();
        assert!(err.to_string().contains("x.json"), "{err}");
        let err = startup("s", &[("y.json".into(), serde_json::json!([]))]).unwrap_err();
        assert!(matches!(err, InputError::Empty(_)));
    }

    #[test]
    fn coldstart_reads_the_suites_rounds_and_plain_wakes() {
        let results = serde_json::json!([
            {"arm": "ste", "bridge": "none", "revisions": 2, "hops": {
                "arm": "ste", "revisions": 2, "scale_pace_ms": 5.0,
                "wakes": [
                    {"revision": "r1", "ms": {"scaled": 10.0, "pod_created": 30.0, "pod_bound": 40.0,
                        "pod_ready": 90.0, "endpoints": 120.0, "endpoint_slice": 118.0}},
                    {"revision": "r2", "ms": {"scaled": 12.0, "pod_created": 35.0}}
                ]}},
            {"arm": "stock", "bridge": "none", "revisions": 2, "hops": null},
            {"arm": "stock", "revisions": 1, "hops_ms": [["wake", 0.0], ["bound", 50.0]]}
        ]);
        let plots = coldstart("c", &[("r.json".into(), results)]).unwrap();
        assert_eq!(plots.wakes.len(), 3);
        let names: Vec<&str> = plots.wakes[0]
            .hops_ms
            .iter()
            .map(|h| h.0.as_str())
            .collect();
        assert_eq!(
            names,
            ["wake", "scaled", "created", "bound", "ready", "endpoints"]
        );
        assert_eq!(plots.wakes[1].hops_ms.last().unwrap().1, 35.0);
        assert_eq!(round_arm("Ste, bridge aggressive"), "ste+bridge aggressive");
        assert_eq!(round_arm("Stock, bridge none"), "stock");
        let none = serde_json::json!([{"arm": "x", "hops": null}]);
        let err = coldstart("c", &[("n.json".into(), none)]);
        assert!(matches!(err, Err(InputError::Empty(_))));
    }

    #[test]
    fn coldstart_rounds_keep_their_own_repeat() {
        let round = |repeat: u64, ms: f64| {
            serde_json::json!({"arm": "stock", "bridge": "none", "revisions": 1, "repeat": repeat,
                "hops": {"arm": "Stock, bridge none", "revisions": 1,
                    "wakes": [{"revision": "r", "ms": {"scaled": ms}}]}})
        };
        let results = serde_json::json!([round(0, 10.0), round(1, 20.0), round(2, 30.0)]);
        let plots = coldstart("c", &[("r.json".into(), results)]).unwrap();
        let mut repeats: Vec<usize> = plots.latencies.iter().map(|s| s.repeat).collect();
        repeats.sort();
        assert_eq!(repeats, [0, 1, 2]);
    }
}
