//! The sweep's results: every step, the highest sustained rate per arm and
//! bridge mode, the ratios between arms; as coldstart.json (`{"sweep": …}`),
//! coldstart.md and the figure.

use std::path::Path;

use serde::Serialize;

use super::step::StepResult;
use super::verdict::{highest_sustained, ratio};
use super::{SweepArgs, DEFINITION};

/// The highest rate one arm with one bridge mode sustained.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Highest {
    pub arm: String,
    pub bridge: String,
    /// None: not even the lowest rate was sustained.
    pub highest_per_s: Option<f64>,
    /// The next rate up failed only because the pool ran dry: the arm may
    /// sustain more than this (raise --sweep-pool).
    pub pool_limited_above: bool,
}

/// One series' highest sustained rate over a reference arm's (no bridge).
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Ratio {
    /// "Ste", "Ste + bridge aggressive", …
    pub series: String,
    /// "Stock" or "Stock-qps".
    pub against: String,
    /// None when either has no sustained rate.
    pub ratio: Option<f64>,
}

/// The `sweep` section of coldstart.json.
#[derive(Serialize, Clone, Debug)]
pub struct SweepReport {
    pub definition: String,
    pub duration_s: f64,
    pub deadline_s: f64,
    pub pool: usize,
    pub rates_per_s: Vec<f64>,
    pub bridge_modes: Vec<String>,
    pub steps: Vec<StepResult>,
    pub highest: Vec<Highest>,
    pub ratios: Vec<Ratio>,
}

/// How a series is named in the ratios: `Ste`, `Ste + bridge aggressive`.
pub fn series_name(arm: &str, bridge: &str) -> String {
    match bridge {
        "none" => arm.to_string(),
        mode => format!("{arm} + bridge {mode}"),
    }
}

impl SweepReport {
    pub fn new(args: &SweepArgs, rates: &[f64], modes: &[String], pool: usize) -> SweepReport {
        SweepReport {
            definition: DEFINITION.into(),
            duration_s: args.sweep_duration.as_secs_f64(),
            deadline_s: args.sweep_deadline.as_secs_f64(),
            pool,
            rates_per_s: rates.to_vec(),
            bridge_modes: modes.to_vec(),
            steps: Vec::new(),
            highest: Vec::new(),
            ratios: Vec::new(),
        }
    }

    /// Recomputes `highest` and `ratios` from `steps`.
    pub fn conclude(&mut self) {
        self.highest = highest(&self.steps);
        self.ratios = ratios(&self.highest);
    }

    /// coldstart.json: `{"sweep": self}`.
    pub fn write_json(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::write(
            dir.join("coldstart.json"),
            serde_json::to_string_pretty(&serde_json::json!({ "sweep": self }))?,
        )?;
        Ok(())
    }

    /// coldstart.json, coldstart.md and the figure.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        self.write_json(dir)?;
        std::fs::write(dir.join("coldstart.md"), self.markdown())?;
        crate::plots::write_suite(
            crate::plots::Suite::Coldstart,
            "coldstart",
            serde_json::json!({ "sweep": self }),
            dir,
        )?;
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let mut out = format!(
            "Open-loop sweep: {} s per step, deadline {} s, pool of {} revisions.\n\n",
            self.duration_s, self.deadline_s, self.pool
        );
        out.push_str(
            "| arm | bridge | offered /s | scheduled | sent | answered | timed out | pool misses | not sent | achieved /s | bound p50 / p95 / p99 (ms) | Ready p50 / p95 / p99 (ms) | Endpoints p50 / p95 / p99 (ms) | pods created / bound | duplicates created / bound | sustained |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|---:|---|\n",
        );
        for s in &self.steps {
            let c = &s.counts;
            out.push_str(&format!(
                "| {:?} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} / {} | {} |\n",
                s.arm,
                s.bridge,
                s.rate_per_s,
                c.scheduled,
                c.sent,
                c.answered,
                c.timed_out,
                c.pool_misses,
                c.send_failed,
                s.achieved_per_s,
                s.bound_ms.cell(),
                s.ready_ms.cell(),
                s.endpoints_ms.cell(),
                s.pods.pods_created,
                s.pods.pods_bound,
                s.pods.extra_created,
                s.pods.extra_bound,
                verdict_cell(s),
            ));
        }
        out.push_str("\n| arm | bridge | highest sustained /s |\n|---|---|---:|\n");
        for h in &self.highest {
            let rate = match (h.highest_per_s, h.pool_limited_above) {
                (Some(r), false) => format!("{r}"),
                (Some(r), true) => format!("≥ {r} (pool ran dry above)"),
                (None, true) => "– (pool ran dry)".into(),
                (None, false) => "none".into(),
            };
            out.push_str(&format!("| {} | {} | {} |\n", h.arm, h.bridge, rate));
        }
        if !self.ratios.is_empty() {
            out.push_str(
                "\n| series | against | ratio of highest sustained rates |\n|---|---|---:|\n",
            );
            for r in &self.ratios {
                let ratio = r.ratio.map_or("–".into(), |v| format!("×{v}"));
                out.push_str(&format!("| {} | {} | {} |\n", r.series, r.against, ratio));
            }
        }
        out.push_str(&format!("\n{}\n", self.definition));
        out
    }
}

fn verdict_cell(s: &StepResult) -> String {
    if s.verdict.sustained {
        "yes".into()
    } else {
        format!("no: {}", s.verdict.reasons.join("; "))
    }
}

/// One line per step for the log.
pub fn one_line(s: &StepResult) -> String {
    let c = &s.counts;
    format!(
        "{}/s: scheduled {}, answered {}, timed out {}, pool misses {}, Endpoints p50/p95/p99 {} ms, duplicates created {} / bound {}, {}",
        s.rate_per_s,
        c.scheduled,
        c.answered,
        c.timed_out,
        c.pool_misses,
        s.endpoints_ms.cell(),
        s.pods.extra_created,
        s.pods.extra_bound,
        verdict_cell(s)
    )
}

/// Per arm and bridge mode, in the order they ran.
pub fn highest(steps: &[StepResult]) -> Vec<Highest> {
    let mut series: Vec<(String, String)> = Vec::new();
    for s in steps {
        let key = (format!("{:?}", s.arm), s.bridge.clone());
        if !series.contains(&key) {
            series.push(key);
        }
    }
    series
        .into_iter()
        .map(|(arm, bridge)| {
            let mine: Vec<(f64, &super::verdict::Verdict)> = steps
                .iter()
                .filter(|s| format!("{:?}", s.arm) == arm && s.bridge == bridge)
                .map(|s| (s.rate_per_s, &s.verdict))
                .collect();
            let (highest_per_s, pool_limited_above) = highest_sustained(&mine);
            Highest {
                arm,
                bridge,
                highest_per_s,
                pool_limited_above,
            }
        })
        .collect()
}

/// Every series against stock and stock-qps without the bridge, when those ran.
pub fn ratios(highest: &[Highest]) -> Vec<Ratio> {
    let reference = |arm: &str| highest.iter().find(|h| h.arm == arm && h.bridge == "none");
    let mut out = Vec::new();
    for against in ["Stock", "Stock-qps"] {
        let Some(base) = reference(against) else {
            continue;
        };
        for h in highest.iter().filter(|h| *h != base) {
            out.push(Ratio {
                series: series_name(&h.arm, &h.bridge),
                against: against.into(),
                ratio: ratio(h.highest_per_s, base.highest_per_s),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(arm: &str, bridge: &str, rate: Option<f64>) -> Highest {
        Highest {
            arm: arm.into(),
            bridge: bridge.into(),
            highest_per_s: rate,
            pool_limited_above: false,
        }
    }

    #[test]
    fn every_series_is_compared_with_stock_and_stock_qps() {
        let all = [
            h("Stock", "none", Some(2.0)),
            h("Stock-qps", "none", Some(4.0)),
            h("Ste", "none", Some(2.0)),
            h("Ste", "aggressive", Some(10.0)),
        ];
        let r = ratios(&all);
        let find = |series: &str, against: &str| {
            r.iter()
                .find(|x| x.series == series && x.against == against)
                .map(|x| x.ratio)
        };
        assert_eq!(find("Ste + bridge aggressive", "Stock"), Some(Some(5.0)));
        assert_eq!(
            find("Ste + bridge aggressive", "Stock-qps"),
            Some(Some(2.5))
        );
        assert_eq!(find("Stock-qps", "Stock"), Some(Some(2.0)));
        assert_eq!(find("Stock", "Stock-qps"), Some(Some(0.5)));
        assert_eq!(find("Stock", "Stock"), None, "no series against itself");
        assert_eq!(r.len(), 6);
        // Without stock-qps, and with a stock that sustained nothing.
        let r = ratios(&[h("Stock", "none", None), h("Ste", "none", Some(1.0))]);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].ratio, None);
    }
}
