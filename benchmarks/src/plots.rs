//! SVG plots written by the tool itself (plain SVG: no font or image
//! libraries to install): latency CDFs and bound pods over time per arm.

use std::fmt::Write as _;
use std::path::Path;

use crate::churn::ArmResult;

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 6] = [
    "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

/// One line: a label and its points.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart with linear axes from 0 to the data's maximum.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let max_x = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(0.0, f64::max)
        .max(1e-9);
    let max_y = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        .max(1e-9);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |v: f64| LEFT + v / max_x * plot_w;
    let y = |v: f64| TOP + plot_h - v / max_y * plot_h;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
"#,
        LEFT + plot_w / 2.0,
        escape(title)
    );
    for i in 0..=5 {
        let (vx, vy) = (max_x * i as f64 / 5.0, max_y * i as f64 / 5.0);
        let _ = write!(
            svg,
            r##"<line x1="{px}" y1="{top}" x2="{px}" y2="{bottom}" stroke="#eee"/><text x="{px}" y="{below}" text-anchor="middle">{vx}</text>
<line x1="{left}" y1="{py}" x2="{right}" y2="{py}" stroke="#eee"/><text x="{tick}" y="{py}" text-anchor="end" dominant-baseline="middle">{vy}</text>
"##,
            px = x(vx),
            top = TOP,
            bottom = TOP + plot_h,
            below = TOP + plot_h + 18.0,
            vx = short(vx),
            left = LEFT,
            right = LEFT + plot_w,
            py = y(vy),
            tick = LEFT - 6.0,
            vy = short(vy),
        );
    }
    let _ = write!(
        svg,
        r#"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>
"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 12.0,
        escape(x_label),
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        escape(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<String> = s
            .points
            .iter()
            .map(|(px, py)| format!("{:.1},{:.1}", x(*px), y(*py)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>
<line x1="{lx}" y1="{ly}" x2="{lx2}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{tx}" y="{ly}" dominant-baseline="middle">{}</text>
"#,
            points.join(" "),
            escape(&s.label),
            lx = WIDTH - RIGHT + 15.0,
            lx2 = WIDTH - RIGHT + 35.0,
            tx = WIDTH - RIGHT + 40.0,
            ly = TOP + 10.0 + 20.0 * i as f64,
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn short(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn label(r: &ArmResult) -> String {
    let qps = r
        .client_qps
        .map(|q| format!("qps {q}"))
        .unwrap_or_else(|| "default qps".into());
    format!("{:?} {qps} {:.0}/s", r.arm, r.offered_per_s)
}

/// Writes churn-latency-cdf.svg and churn-bound-over-time.svg into `dir`.
pub fn churn(results: &[ArmResult], dir: &Path) -> std::io::Result<()> {
    let cdf: Vec<Series> = results
        .iter()
        .map(|r| {
            let mut latencies: Vec<f64> = r.bound_samples.iter().map(|s| s.1).collect();
            latencies.sort_by(|a, b| a.total_cmp(b));
            let n = latencies.len().max(1) as f64;
            Series {
                label: label(r),
                points: latencies
                    .iter()
                    .enumerate()
                    .map(|(i, ms)| (*ms, (i + 1) as f64 / n))
                    .collect(),
            }
        })
        .collect();
    std::fs::write(
        dir.join("churn-latency-cdf.svg"),
        line_chart(
            "create → pod bound, CDF",
            "milliseconds",
            "fraction of Deployments",
            &cdf,
        ),
    )?;
    let over_time: Vec<Series> = results
        .iter()
        .map(|r| Series {
            label: label(r),
            points: r
                .bound_samples
                .iter()
                .enumerate()
                .map(|(i, (t, _))| (*t, (i + 1) as f64))
                .collect(),
        })
        .chain(results.iter().take(1).map(|r| Series {
            label: format!("offered {:.0}/s", r.offered_per_s),
            points: vec![(0.0, 0.0), (r.sent as f64 / r.offered_per_s, r.sent as f64)],
        }))
        .collect();
    std::fs::write(
        dir.join("churn-bound-over-time.svg"),
        line_chart(
            "pods bound over time (and the offered load)",
            "seconds from start",
            "Deployments with a bound pod",
            &over_time,
        ),
    )?;
    Ok(())
}

/// Bound pods per second in one-second bins, from a run's (seconds from
/// start, latency) samples, up to `until` seconds.
fn bound_per_second(samples: &[(f64, f64)], until: f64) -> Vec<(f64, f64)> {
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
    // A step line: each bin's rate held over its second.
    bins.iter()
        .enumerate()
        .flat_map(|(i, n)| [(i as f64, *n as f64), ((i + 1) as f64, *n as f64)])
        .collect()
}

/// Writes churn-throughput-<arm>-<qps>-<rate>.svg per arm and step: pods
/// bound per second over time against the offered load. Returns the file names.
pub fn churn_throughput(results: &[ArmResult], dir: &Path) -> std::io::Result<Vec<String>> {
    let mut written = Vec::new();
    for r in results {
        let sending = r.sent as f64 / r.offered_per_s;
        let offered = Series {
            label: format!("offered {:.1}/s", r.offered_per_s),
            points: vec![
                (0.0, r.offered_per_s),
                (sending, r.offered_per_s),
                (sending, 0.0),
            ],
        };
        let bound = Series {
            label: "pods bound/s".into(),
            points: bound_per_second(&r.bound_samples, sending),
        };
        let qps = r
            .client_qps
            .map(|q| format!("qps{q}"))
            .unwrap_or_else(|| "default".into());
        let name = format!(
            "churn-throughput-{:?}-{qps}-{:.0}.svg",
            r.arm, r.offered_per_s
        )
        .to_lowercase();
        std::fs::write(
            dir.join(&name),
            line_chart(
                &format!("{} — pods bound per second", label(r)),
                "seconds from start",
                "per second",
                &[bound, offered],
            ),
        )?;
        written.push(name);
    }
    Ok(written)
}

/// Writes startup-latency.svg (create→Running p50 and p99 against
/// parallelism, per arm) and startup-throughput.svg (Deployments available
/// per second against parallelism) into `dir`.
pub fn startup(results: &[crate::startup::LevelResult], dir: &Path) -> std::io::Result<()> {
    let mut arms: Vec<crate::cluster::Arm> = Vec::new();
    for r in results {
        if !arms.contains(&r.arm) {
            arms.push(r.arm);
        }
    }
    let per_arm = |arm, value: &dyn Fn(&crate::startup::LevelResult) -> f64| -> Vec<(f64, f64)> {
        results
            .iter()
            .filter(|r| r.arm == arm)
            .map(|r| (r.parallelism as f64, value(r)))
            .collect()
    };
    let latency: Vec<Series> = arms
        .iter()
        .flat_map(|arm| {
            [
                Series {
                    label: format!("{arm:?} p50"),
                    points: per_arm(*arm, &|r| r.running_p50_ms),
                },
                Series {
                    label: format!("{arm:?} p99"),
                    points: per_arm(*arm, &|r| r.running_p99_ms),
                },
            ]
        })
        .collect();
    std::fs::write(
        dir.join("startup-latency.svg"),
        line_chart(
            "create → pod Running, p50 and p99",
            "Deployments created at once",
            "milliseconds",
            &latency,
        ),
    )?;
    let throughput: Vec<Series> = arms
        .iter()
        .map(|arm| Series {
            label: format!("{arm:?}"),
            points: per_arm(*arm, &|r| r.deployments_per_s),
        })
        .collect();
    std::fs::write(
        dir.join("startup-throughput.svg"),
        line_chart(
            "Deployments fully available per second",
            "Deployments created at once",
            "Deployments/s",
            &throughput,
        ),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_with_every_series() {
        let svg = line_chart(
            "t <1>",
            "x",
            "y",
            &[
                Series {
                    label: "a".into(),
                    points: vec![(0.0, 0.0), (1.0, 2.0)],
                },
                Series {
                    label: "b".into(),
                    points: vec![(0.5, 1.0)],
                },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("t &lt;1&gt;"));
    }

    #[test]
    fn bound_per_second_counts_each_second() {
        let samples = [(0.1, 5.0), (0.9, 5.0), (2.5, 5.0)];
        let points = bound_per_second(&samples, 2.0);
        // Seconds 0, 1, 2: 2, 0, 1 pods bound, each held over its second.
        assert_eq!(
            points,
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
}
