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
