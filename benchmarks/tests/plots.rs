//! The figures drawn from a small fixed result set: their structure (series
//! per arm and load, log axes, one colour per arm kept across figures,
//! legend entries each once), read from the description each figure returns
//! and cross-checked in its SVG. Not pixels.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Value};
use ste_bench::plots::command::Suite;
use ste_bench::plots::figure::Axis;
use ste_bench::plots::input::Wake;
use ste_bench::plots::{render, Description, Figure};

/// A churn results.json as `ste-bench churn` writes it (fields the plots
/// do not read included), `arms` × `rates`, latencies spread by `scale`.
fn churn_results(arms: &[&str], rates: &[f64], scale: f64) -> Value {
    let mut rows = Vec::new();
    for (a, arm) in arms.iter().enumerate() {
        for rate in rates {
            let samples: Vec<(f64, f64)> = (0..40)
                .map(|i| {
                    (
                        i as f64 / rate,
                        scale * (20.0 + 7.0 * a as f64 + i as f64 * rate / 5.0),
                    )
                })
                .collect();
            rows.push(json!({
                "arm": arm, "mode": "Burst", "client_qps": 200, "sustained": true,
                "offered_per_s": rate, "sent": 40, "bound": 40, "achieved_per_s": rate,
                "bound_p50_ms": 0.0, "bound_samples": samples,
            }));
        }
    }
    Value::Array(rows)
}

fn startup_results() -> Value {
    let mut rows = Vec::new();
    for arm in ["Stock", "Tuned", "Ste"] {
        for p in [1usize, 10, 50] {
            rows.push(json!({
                "arm": arm, "parallelism": p, "deployments_per_s": 3.0 + p as f64 / 4.0,
                "running_ms": (0..p).map(|i| 80.0 + 30.0 * i as f64).collect::<Vec<_>>(),
            }));
        }
    }
    Value::Array(rows)
}

fn wakes() -> Vec<Wake> {
    let mut wakes = Vec::new();
    for (a, arm) in ["stock", "stock qps 200", "ste", "ste+bridge"]
        .iter()
        .enumerate()
    {
        for revisions in [1usize, 5] {
            for i in 0..revisions {
                let base = 100.0 * (4 - a) as f64 + 10.0 * i as f64;
                let hops = ["wake", "scaled", "created", "bound", "ready", "endpoints"]
                    .iter()
                    .enumerate()
                    .map(|(h, name)| (name.to_string(), base * h as f64))
                    .collect();
                wakes.push(Wake {
                    arm: arm.to_string(),
                    revisions,
                    repeat: 0,
                    hops_ms: hops,
                });
            }
        }
    }
    wakes
}

fn figures(suite: Suite, name: &str, repeats: Vec<Value>) -> Vec<Figure> {
    let runs: Vec<(String, Value)> = repeats
        .into_iter()
        .enumerate()
        .map(|(i, v)| (format!("repeat {i}"), v))
        .collect();
    render(&suite.read(name, &runs).expect("fixture reads")).expect("figures render")
}

fn by_file<'a>(figures: &'a [Figure], suffix: &str) -> &'a Figure {
    figures
        .iter()
        .find(|f| f.description.file.ends_with(suffix))
        .unwrap_or_else(|| panic!("no figure *{suffix}"))
}

/// The checks every figure passes; Err names the first broken one.
fn check(d: &Description, svg: &str) -> Result<(), String> {
    let mut colour_of: HashMap<&str, &str> = HashMap::new();
    let mut key_of: HashMap<&str, &str> = HashMap::new();
    for s in &d.series {
        let arm = s.key.as_str();
        if *colour_of.entry(arm).or_insert(&s.colour) != s.colour {
            return Err(format!("{}: {arm} drawn in two colours", d.file));
        }
        if *key_of.entry(&s.colour).or_insert(arm) != arm {
            return Err(format!(
                "{}: {} and {arm} share colour {}",
                d.file,
                key_of[s.colour.as_str()],
                s.colour
            ));
        }
        if !svg.contains(&format!("stroke=\"{}\"", s.colour))
            && !svg.contains(&format!("fill=\"{}\"", s.colour))
        {
            return Err(format!(
                "{}: {arm}'s colour {} is not in the SVG",
                d.file, s.colour
            ));
        }
    }
    let mut labels = HashSet::new();
    let mut looks = HashSet::new();
    for e in &d.legend {
        if !labels.insert(&e.label) {
            return Err(format!("{}: legend entry {} twice", d.file, e.label));
        }
        if !looks.insert((&e.colour, &e.mark)) {
            return Err(format!(
                "{}: two legend entries look alike ({} {})",
                d.file, e.colour, e.mark
            ));
        }
        if !has_text(svg, &e.label) {
            return Err(format!(
                "{}: legend text {} not in the SVG",
                d.file, e.label
            ));
        }
    }
    if !(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>")) {
        return Err(format!("{}: not one SVG document", d.file));
    }
    Ok(())
}

/// A <text> element reading `text` (plotters writes it on a line of its own).
fn has_text(svg: &str, text: &str) -> bool {
    let escaped = text
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;");
    svg.contains(&format!(">\n{escaped}\n</text>"))
}

/// Polylines drawn in `colour` (lines, whiskers, outlines).
fn polylines(svg: &str, colour: &str) -> usize {
    svg.split("<polyline")
        .skip(1)
        .filter(|p| p.contains(&format!("stroke=\"{colour}\"")))
        .count()
}

#[test]
fn churn_figures_have_a_line_per_arm_and_rate_on_a_log_axis() {
    let figures = figures(
        Suite::Churn,
        "churn",
        vec![churn_results(
            &["Stock", "Tuned", "Ste"],
            &[10.0, 20.0],
            1.0,
        )],
    );
    let names: Vec<&str> = figures
        .iter()
        .map(|f| f.description.file.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "churn-latency-cdf.svg",
            "churn-p50-p99.svg",
            "churn-lines.svg"
        ]
    );
    for f in &figures {
        check(&f.description, &f.svg).unwrap();
    }
    let cdf = &by_file(&figures, "latency-cdf.svg").description;
    assert_eq!(
        (cdf.x_axis, cdf.panels, cdf.series.len()),
        (Axis::Log, 2, 6)
    );
    let arms: HashSet<&str> = cdf.series.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(arms, HashSet::from(["stock", "tuned", "ste"]));
    // Each arm's CDF is a polyline per panel in its colour, besides the legend.
    let cdf_svg = &by_file(&figures, "latency-cdf.svg").svg;
    for s in cdf.series.iter().filter(|s| s.panel == 0) {
        assert!(
            polylines(cdf_svg, &s.colour) >= 2,
            "{} has {} lines",
            s.key,
            polylines(cdf_svg, &s.colour)
        );
    }
    // Log axis: round ticks only (1, 2, 5 × 10^k) in ms or s.
    for label in ["20 ms", "50 ms", "100 ms"] {
        assert!(has_text(cdf_svg, label), "no tick {label}");
    }
    let summary = &by_file(&figures, "p50-p99.svg").description;
    assert_eq!(
        (summary.x_axis, summary.y_axis),
        (Axis::Categories, Axis::Log)
    );
    // p50 and p99 at each of 2 rates per arm.
    assert!(
        summary.series.iter().all(|s| s.points == 4),
        "{:?}",
        summary.series
    );
    let lines = &by_file(&figures, "lines.svg").description;
    assert_eq!(lines.panels, 2);
    assert_eq!(
        lines.series.len(),
        2 * 4,
        "3 arms and the offered load per rate"
    );
}

#[test]
fn an_arm_keeps_its_colour_across_figures_and_suites() {
    let churn = figures(
        Suite::Churn,
        "churn",
        vec![churn_results(&["Stock", "Ste"], &[5.0], 1.0)],
    );
    let startup = figures(Suite::Startup, "startup", vec![startup_results()]);
    let coldstart = render(&ste_bench::plots::input::coldstart_from_wakes(
        "coldstart",
        wakes(),
    ))
    .unwrap();
    let mut colour_of: HashMap<String, String> = HashMap::new();
    for f in churn.iter().chain(&startup).chain(
        coldstart
            .iter()
            .filter(|f| !f.description.file.contains("hops")),
    ) {
        for s in &f.description.series {
            let c = colour_of.entry(s.key.clone()).or_insert(s.colour.clone());
            assert_eq!(*c, s.colour, "{} in {}", s.key, f.description.file);
        }
    }
    assert!(colour_of.len() >= 5, "{colour_of:?}");
}

#[test]
fn repeats_give_the_summary_its_spread() {
    let figures = figures(
        Suite::Churn,
        "churn",
        vec![
            churn_results(&["Stock", "Ste"], &[10.0], 1.0),
            churn_results(&["Stock", "Ste"], &[10.0], 1.5),
            churn_results(&["Stock", "Ste"], &[10.0], 0.8),
        ],
    );
    let summary = by_file(&figures, "p50-p99.svg");
    check(&summary.description, &summary.svg).unwrap();
    assert!(summary.svg.contains("lowest to highest of 3 repeats"));
    let cdf = by_file(&figures, "latency-cdf.svg");
    // Repeats merge into one line per arm and load.
    assert_eq!(cdf.description.series.len(), 2);
    assert_eq!(cdf.description.series[0].points, 120);
}

#[test]
fn startup_figures_mark_every_measured_point() {
    let figures = figures(Suite::Startup, "startup", vec![startup_results()]);
    for f in &figures {
        check(&f.description, &f.svg).unwrap();
    }
    let lines = by_file(&figures, "lines.svg");
    assert_eq!(lines.description.x_axis, Axis::Log);
    assert_eq!(lines.description.series.len(), 3);
    for s in &lines.description.series {
        let dots = lines
            .svg
            .split("<circle")
            .skip(1)
            .filter(|c| c.contains(&format!("fill=\"{}\"", s.colour)))
            .count();
        // 3 measured points, and the legend's mark.
        assert_eq!(dots, 3 + 1, "{}", s.key);
    }
}

#[test]
fn coldstart_hops_stack_in_order_per_arm_and_scale() {
    let figures = render(&ste_bench::plots::input::coldstart_from_wakes(
        "coldstart",
        wakes(),
    ))
    .unwrap();
    let names: Vec<&str> = figures
        .iter()
        .map(|f| f.description.file.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "coldstart-latency-cdf.svg",
            "coldstart-p50-p99.svg",
            "coldstart-hops-p50.svg",
            "coldstart-hops-p95.svg"
        ]
    );
    let hops = by_file(&figures, "hops-p95.svg");
    check_hops(&hops.description);
    assert_eq!(hops.description.panels, 2);
    let legend: Vec<&str> = hops
        .description
        .legend
        .iter()
        .map(|e| e.label.as_str())
        .collect();
    assert_eq!(
        legend,
        ["→ scaled", "→ created", "→ bound", "→ ready", "→ endpoints"]
    );
    // 4 arms × 5 hops in each of 2 panels.
    assert_eq!(hops.description.series.len(), 4 * 5 * 2);
    let cdf = by_file(&figures, "latency-cdf.svg");
    check(&cdf.description, &cdf.svg).unwrap();
    let colours: HashSet<&str> = cdf
        .description
        .series
        .iter()
        .map(|s| s.colour.as_str())
        .collect();
    assert_eq!(
        colours.len(),
        4,
        "stock, stock qps 200, ste, ste+bridge: four colours"
    );
}

/// In the hop figure a colour is a hop (shared by every arm), not an arm.
fn check_hops(d: &Description) {
    let mut colour_of: HashMap<String, &str> = HashMap::new();
    for s in &d.series {
        let hop = s.key.rsplit(' ').next().unwrap().to_string();
        assert_eq!(
            *colour_of.entry(hop.clone()).or_insert(&s.colour),
            s.colour,
            "{hop}"
        );
    }
    let distinct: HashSet<&&str> = colour_of.values().collect();
    assert_eq!(distinct.len(), colour_of.len(), "two hops share a colour");
}

#[test]
fn the_check_catches_two_arms_in_one_colour() {
    let mut figures = figures(
        Suite::Churn,
        "churn",
        vec![churn_results(&["Stock", "Ste"], &[10.0], 1.0)],
    );
    let cdf = &mut figures[0];
    let first = cdf.description.series[0].colour.clone();
    cdf.description.series[1].colour = first;
    assert!(check(&cdf.description, &cdf.svg)
        .unwrap_err()
        .contains("share colour"));
    let dup = cdf.description.legend[0].clone();
    cdf.description.legend.push(dup);
    cdf.description.series.truncate(1);
    assert!(check(&cdf.description, &cdf.svg)
        .unwrap_err()
        .contains("twice"));
}

#[test]
fn a_suite_run_with_results_the_plots_cannot_read_keeps_going() {
    let dir = tempfile::tempdir().unwrap();
    let odd = json!([{"arm": "stock", "no_samples": true}]);
    let written = ste_bench::plots::write_suite(Suite::Churn, "churn", odd, dir.path()).unwrap();
    assert!(written.is_empty());
    let good = churn_results(&["Stock", "Ste"], &[10.0], 1.0);
    let written = ste_bench::plots::write_suite(Suite::Churn, "churn", good, dir.path()).unwrap();
    assert_eq!(written.len(), 3);
    assert!(written.iter().all(|p| p.is_file()));
}

/// `ste-bench jobs`'s results.json: `arms` × both bursts.
fn jobs_results(arms: &[&str], scale: f64) -> Value {
    let mut rows = Vec::new();
    for (a, arm) in arms.iter().enumerate() {
        for (scenario, base) in [("jobs-x1", 1.5), ("job-x-pods", 0.5)] {
            let s = scale * base * (1.0 - 0.1 * a as f64);
            rows.push(json!({
                "arm": arm, "scenario": scenario, "pods": 100,
                "all_created_s": s, "all_bound_s": s * 1.1, "all_running_s": s * 1.3,
            }));
        }
    }
    Value::Array(rows)
}

fn members_results() -> Value {
    let mut writes = Vec::new();
    let mut pods = Vec::new();
    for members in [1usize, 3, 5] {
        for offered in [Some(50.0), Some(200.0), None] {
            let m = members as f64;
            writes.push(json!({
                "members": members, "offered_per_s": offered, "sent": 500, "acknowledged": 500,
                "errors": 0, "achieved_per_s": offered.unwrap_or(600.0 / m),
                "p50_ms": 9.0 * m, "p99_ms": 40.0 * m,
            }));
        }
        for (a, arm) in ["Stock", "Ste"].iter().enumerate() {
            let samples: Vec<(f64, f64)> = (0..30)
                .map(|i| {
                    (
                        i as f64 / 10.0,
                        (50.0 + i as f64) * members as f64 / (1 + a) as f64,
                    )
                })
                .collect();
            pods.push(json!({
                "arm": arm, "etcd_members": members, "client_qps": 200, "offered_per_s": 10.0,
                "sent": 30, "bound_samples": samples,
            }));
        }
    }
    json!({"fsync_delay_ms": 8.0, "writes": writes, "pods": pods})
}

fn failure_results() -> Value {
    json!([
        {"arm": "Override", "killed": "etcd-override", "pods_before": 50, "pods_lost": 0,
         "pods_recreated": 0, "whole_after_s": 0.0, "list_errors": 0, "watch_errors": 0,
         "watch_relists": 0, "pods_listed_after": 50, "pods_in_store_after": 0,
         "churn_requests": 250, "churn_errors": 3},
        {"arm": "SteRf1", "killed": "shard-0", "pods_before": 50, "pods_lost": 16,
         "pods_recreated": 16, "whole_after_s": 2.6, "list_errors": 0, "watch_errors": 0,
         "watch_relists": 1, "pods_listed_after": 50, "pods_in_store_after": 50,
         "churn_requests": 250, "churn_errors": 0},
        {"arm": "SteRf2", "killed": "shard-0", "pods_before": 50, "pods_lost": 0,
         "pods_recreated": 0, "whole_after_s": null, "list_errors": 0, "watch_errors": 0,
         "watch_relists": 0, "pods_listed_after": 50, "pods_in_store_after": 50,
         "churn_requests": 250, "churn_errors": 0}
    ])
}

fn ring_results() -> Value {
    let runs: Vec<Value> = [10_000usize, 30_000]
        .iter()
        .map(|keys| {
            let k = *keys as f64 / 10_000.0;
            let phases: Vec<Value> = [
                ("baseline", 15.0, 1.0),
                ("join", 0.3, 3.0),
                ("drain", 0.2, 5.0),
            ]
            .iter()
            .map(|(phase, s, slow)| {
                json!({"phase": phase, "duration_s": s * k, "keys_moved": 2500.0 * k,
                           "keys_per_s": 8000.0 / slow, "p50_ms": 2.3, "p99_ms": 4.0 * slow * k})
            })
            .collect();
            json!({"keys": keys, "value_bytes": 2048, "shards": 3, "rate": 200, "phases": phases})
        })
        .collect();
    Value::Array(runs)
}

fn router_results() -> Value {
    let rows: Vec<Value> = [
        ("etcd", 0usize),
        ("ste-router", 1),
        ("ste-router", 2),
        ("ste-router", 4),
    ]
    .iter()
    .map(|(arm, shards)| {
        let f = if *shards == 0 {
            1.0
        } else {
            2.0 + *shards as f64 / 10.0
        };
        json!({"arm": arm, "shards": shards,
                   "get_p50_us": 245.0 * f, "get_p99_us": 470.0 * f,
                   "create_p50_us": 331.0 * f, "create_p99_us": 981.0 * f,
                   "update_p50_us": 325.0 * f, "update_p99_us": 966.0 * f,
                   "list_all_ms": 36.7 * f, "watch_p50_us": 272.0 * f, "watch_p99_us": 781.0 * f,
                   "saturated_writes_per_s": 19248.0 / f, "etcd_cpu_us_per_write": 64.0})
    })
    .collect();
    Value::Array(rows)
}

/// Every figure checks; returns them by file name.
fn checked(figures: &[Figure]) -> HashMap<&str, &Figure> {
    for f in figures {
        check(&f.description, &f.svg).unwrap();
    }
    figures
        .iter()
        .map(|f| (f.description.file.as_str(), f))
        .collect()
}

/// Series keys of `d` in `panel`.
fn keys_in(d: &Description, panel: usize) -> Vec<&str> {
    d.series
        .iter()
        .filter(|s| s.panel == panel)
        .map(|s| s.key.as_str())
        .collect()
}

#[test]
fn jobs_figure_has_a_panel_per_burst_and_a_bar_per_arm_and_stage() {
    let arms = ["Stock", "Stock-qps", "Tuned", "Override", "Ste"];
    let figures = figures(
        Suite::Jobs,
        "jobs",
        vec![jobs_results(&arms, 1.0), jobs_results(&arms, 1.4)],
    );
    let by = checked(&figures);
    assert_eq!(by.keys().collect::<Vec<_>>(), [&"jobs-bursts.svg"]);
    let f = by["jobs-bursts.svg"];
    let d = &f.description;
    assert_eq!(
        (d.panels, d.x_axis, d.y_axis),
        (2, Axis::Categories, Axis::Linear)
    );
    assert_eq!(
        keys_in(d, 0),
        ["stock", "stock-qps", "tuned", "override", "ste"]
    );
    // Created, bound, Running per arm; two repeats merge into one bar each.
    assert!(d.series.iter().all(|s| s.points == 3), "{:?}", d.series);
    assert!(has_text(&f.svg, "100 Jobs × 1 pod, created at once"));
    assert!(has_text(&f.svg, "1 Job × 100 pods"));
    let colours: HashSet<&str> = d.series.iter().map(|s| s.colour.as_str()).collect();
    assert_eq!(colours.len(), 5);
}

#[test]
fn members_figures_show_writes_per_member_count_and_pods_per_arm() {
    let figures = figures(Suite::Members, "members", vec![members_results()]);
    let by = checked(&figures);
    let mut names: Vec<&&str> = by.keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            &"members-latency-cdf.svg",
            &"members-p50-p99.svg",
            &"members-writes.svg"
        ]
    );
    let writes = &by["members-writes.svg"].description;
    assert_eq!((writes.panels, writes.y_axis), (2, Axis::Log));
    // One series per member count (the stock arm's colour on that many
    // members), each at three loads, in both panels.
    assert_eq!(
        keys_in(writes, 0),
        ["etcd 1 member", "etcd 3 members", "etcd 5 members"]
    );
    assert!(writes.series.iter().all(|s| s.points == 3));
    let colours: HashSet<&str> = writes.series.iter().map(|s| s.colour.as_str()).collect();
    assert_eq!(colours.len(), 3);
    for label in ["etcd 1 member", "etcd 3 members", "etcd 5 members"] {
        assert!(has_text(&by["members-writes.svg"].svg, label), "{label}");
    }
    let cdf = &by["members-latency-cdf.svg"].description;
    assert_eq!((cdf.panels, cdf.x_axis), (3, Axis::Log));
    assert_eq!(keys_in(cdf, 0), ["stock", "ste"]);
}

#[test]
fn failure_figure_compares_losses_time_and_client_errors_per_arm() {
    let figures = figures(Suite::Failure, "failure", vec![failure_results()]);
    let by = checked(&figures);
    let f = by["failure-losses.svg"];
    let d = &f.description;
    assert_eq!(d.panels, 3);
    for p in 0..3 {
        assert_eq!(keys_in(d, p), ["override", "ste rf 1", "ste rf 2"]);
    }
    // Lost, recreated and listed-but-gone per arm.
    assert_eq!(d.series[0].points, 3);
    assert!(
        has_text(&f.svg, "not whole"),
        "a window without a whole end is said"
    );
    assert!(has_text(
        &f.svg,
        "steady pods after the kill (of 50 before)"
    ));
    // Every bar's value is written above it (16 lost on RF 1).
    assert!(has_text(&f.svg, "16"));
    let colours: HashSet<&str> = d.series.iter().map(|s| s.colour.as_str()).collect();
    assert_eq!(colours.len(), 3);
}

#[test]
fn ring_figure_shows_latency_per_phase_and_move_times_per_key_count() {
    let figures = figures(Suite::Ring, "ring", vec![ring_results()]);
    let by = checked(&figures);
    let f = by["ring-moves.svg"];
    let d = &f.description;
    assert_eq!((d.panels, d.y_axis), (3, Axis::Log));
    assert_eq!(keys_in(d, 0), ["ste baseline", "ste join", "ste drain"]);
    assert_eq!(keys_in(d, 1), ["ste join", "ste drain"]);
    assert!(d.series.iter().all(|s| s.points == 2));
    assert!(has_text(&f.svg, "10k keys") && has_text(&f.svg, "30k keys"));
    // Log axis ticks are round: 2, 5, 10 ms … (p50 2.3 ms to p99 60 ms).
    for tick in ["2 ms", "5 ms", "10 ms", "20 ms", "50 ms"] {
        assert!(has_text(&f.svg, tick), "no tick {tick}");
    }
}

#[test]
fn router_figure_has_p50_and_p99_per_operation_per_arm() {
    let figures = figures(Suite::Router, "router", vec![router_results()]);
    let by = checked(&figures);
    let f = by["router-ops.svg"];
    let d = &f.description;
    assert_eq!(
        keys_in(d, 0),
        [
            "plain etcd",
            "router 1 shard",
            "router 2 shards",
            "router 4 shards"
        ]
    );
    // get, create, update, watch per arm.
    assert!(d
        .series
        .iter()
        .filter(|s| s.panel == 0)
        .all(|s| s.points == 4));
    let labels: Vec<&str> = d.legend.iter().map(|e| e.label.as_str()).collect();
    assert_eq!(labels[4..], ["p50", "p99"]);
    // µs are drawn in ms: 0.2 ms … 2 ms ticks.
    assert!(has_text(&f.svg, "0.2 ms") && has_text(&f.svg, "1 ms"));
}

#[test]
fn new_arms_keep_their_colours_across_suites() {
    let churn = figures(
        Suite::Churn,
        "churn",
        vec![churn_results(
            &["Stock", "Stock-qps", "Tuned", "Override", "Ste"],
            &[10.0],
            1.0,
        )],
    );
    let jobs = figures(
        Suite::Jobs,
        "jobs",
        vec![jobs_results(
            &["Stock", "Stock-qps", "Tuned", "Override", "Ste"],
            1.0,
        )],
    );
    let members = figures(Suite::Members, "members", vec![members_results()]);
    let failure = figures(Suite::Failure, "failure", vec![failure_results()]);
    let mut colour_of: HashMap<String, String> = HashMap::new();
    for f in churn.iter().chain(&jobs).chain(&members).chain(&failure) {
        if f.description.file.contains("writes") {
            continue; // loads, not arms
        }
        for s in &f.description.series {
            let c = colour_of.entry(s.key.clone()).or_insert(s.colour.clone());
            assert_eq!(*c, s.colour, "{} in {}", s.key, f.description.file);
        }
    }
    // stock-qps is orange, override purple, ste blue, as the palette says.
    assert_eq!(colour_of["stock-qps"], "#FF7F0E");
    assert_eq!(colour_of["override"], "#9467BD");
    assert_eq!(colour_of["ste"], "#1F77B4");
}

/// `ste-bench coldstart --sweep`'s coldstart.json: `arms` × rates 1, 2, 5,
/// wake → Endpoints growing with the rate; stock's 5/s step answered nothing.
fn sweep_results() -> Value {
    let mut steps = Vec::new();
    for (arm, bridge, scale) in [
        ("Stock", "none", 3.0),
        ("Stock-qps", "none", 2.0),
        ("Ste", "aggressive+webhook", 1.0),
    ] {
        for rate in [1.0, 2.0, 5.0] {
            let none = arm == "Stock" && rate == 5.0;
            let p = |base: f64| {
                if none {
                    Value::Null
                } else {
                    json!(base * scale * rate)
                }
            };
            steps.push(json!({
                "arm": arm, "bridge": bridge, "rate_per_s": rate, "scheduled": 10,
                "endpoints_ms": {"p50": p(400.0), "p95": p(900.0), "p99": p(1000.0)},
                "verdict": {"sustained": !none, "pool_limited": false, "reasons": []},
                "wakes": []
            }));
        }
    }
    json!({"sweep": {"definition": "d", "steps": steps, "highest": [], "ratios": []}})
}

#[test]
fn the_sweep_figure_has_p50_and_p95_panels_with_a_line_per_series_on_log_axes() {
    let figures = figures(Suite::Coldstart, "coldstart", vec![sweep_results()]);
    assert_eq!(figures.len(), 1, "only the sweep's figure: no rounds");
    let f = by_file(&figures, "coldstart-lines.svg");
    check(&f.description, &f.svg).unwrap();
    let d = &f.description;
    assert_eq!((d.x_axis, d.y_axis, d.panels), (Axis::Log, Axis::Log, 2));
    for panel in 0..2 {
        let mut keys = keys_in(d, panel);
        keys.sort();
        assert_eq!(
            keys,
            ["ste+bridge aggressive+webhook", "stock", "stock-qps"]
        );
    }
    // A step without an answered wake draws no point.
    let stock = d.series.iter().find(|s| s.key == "stock").unwrap();
    assert_eq!(stock.points, 2);
    let ste = d.series.iter().find(|s| s.key.starts_with("ste")).unwrap();
    assert_eq!(ste.points, 3);
    assert!(has_text(&f.svg, "p95 wake → private Endpoints"));
    // Stock keeps the colour it has in every other figure.
    let churn = figures_of_churn_stock_colour();
    assert_eq!(stock.colour, churn);
    // A sweep without steps is an error, not an empty figure.
    let empty = json!({"sweep": {"steps": []}});
    assert!(Suite::Coldstart
        .read("c", &[("e.json".into(), empty)])
        .is_err());
}

fn figures_of_churn_stock_colour() -> String {
    let figures = figures(
        Suite::Churn,
        "churn",
        vec![churn_results(&["stock"], &[10.0], 1.0)],
    );
    let cdf = by_file(&figures, "latency-cdf.svg");
    cdf.description
        .series
        .iter()
        .find(|s| s.key == "stock")
        .expect("stock in churn's CDF")
        .colour
        .clone()
}
