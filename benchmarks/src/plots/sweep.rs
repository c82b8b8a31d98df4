//! The open-loop cold-start sweep's figure (`ste-bench coldstart --sweep`):
//! wake → pod IP in the private Endpoints, p50 and p95 (one panel each),
//! against the offered cold starts per second, a line per arm and bridge
//! mode, both axes log.

use serde::Deserialize;
use serde_json::Value;

use super::lines::{Line, LineChart};

/// The fields of a sweep step the figure uses.
#[derive(Deserialize)]
struct Step {
    arm: String,
    bridge: String,
    rate_per_s: f64,
    endpoints_ms: Endpoints,
}

#[derive(Deserialize)]
struct Endpoints {
    p50: Option<f64>,
    p95: Option<f64>,
}

#[derive(Deserialize)]
struct Sweep {
    steps: Vec<Step>,
}

/// How the figure names a series: `stock`, `ste+bridge aggressive`.
pub fn series(arm: &str, bridge: &str) -> String {
    let arm = arm.trim().to_lowercase();
    match bridge {
        "none" => arm,
        mode => format!("{arm}+bridge {mode}"),
    }
}

/// The figure of the `sweep` section of coldstart.json; `None` when it has
/// no step.
pub fn chart(sweep: &Value) -> Result<Option<LineChart>, serde_json::Error> {
    let sweep: Sweep = serde_json::from_value(sweep.clone())?;
    if sweep.steps.is_empty() {
        return Ok(None);
    }
    let mut panels = Vec::new();
    for (title, pick) in [
        (
            "p50",
            (|s: &Step| s.endpoints_ms.p50) as fn(&Step) -> Option<f64>,
        ),
        ("p95", |s: &Step| s.endpoints_ms.p95),
    ] {
        let mut lines: Vec<Line> = Vec::new();
        for s in &sweep.steps {
            // A step with no answered wake has no latency to draw.
            let Some(ms) = pick(s).filter(|ms| *ms > 0.0) else {
                continue;
            };
            let arm = series(&s.arm, &s.bridge);
            match lines.iter_mut().find(|l| l.arm == arm) {
                Some(l) => l.points.push((s.rate_per_s, ms)),
                None => lines.push(Line {
                    arm,
                    points: vec![(s.rate_per_s, ms)],
                }),
            }
        }
        for l in &mut lines {
            l.points.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        panels.push((format!("{title} wake → private Endpoints"), lines));
    }
    Ok(Some(LineChart {
        title:
            "open-loop cold starts: wake → pod IP in the private Endpoints against the offered rate"
                .into(),
        x_label: "offered cold starts per second".into(),
        y_label: "ms".into(),
        log_x: true,
        log_y: true,
        markers: true,
        panels,
    }))
}
