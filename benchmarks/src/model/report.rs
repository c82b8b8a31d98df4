//! The model's tables: the predicted sustained churn per arm and core
//! count, every resource's ceiling, and the check against the churn file's
//! own measurements.

use super::ceilings::{bottleneck, ceilings, Ceiling, Plane};
use super::costs::ArmCosts;
use super::facts::{ClientLimit, Layout};

/// A table: header and rows of cells.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn markdown(&self) -> String {
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        let mut out = line(&self.header);
        out.push_str(&line(&vec!["---".to_string(); self.header.len()]));
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }

    /// Columns padded to their widest cell.
    pub fn text(&self) -> String {
        let widths: Vec<usize> = (0..self.header.len())
            .map(|i| {
                std::iter::once(&self.header)
                    .chain(&self.rows)
                    .filter_map(|r| r.get(i))
                    .map(|c| c.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
                .collect();
            format!("{}\n", padded.join("  ").trim_end())
        };
        let mut out = line(&self.header);
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }
}

/// `plane` with `cores` and `limit`.
fn at(plane: &Plane, cores: f64, limit: ClientLimit) -> Plane {
    Plane {
        cores,
        limit,
        ..*plane
    }
}

fn cell(c: Option<&Ceiling>) -> String {
    match c {
        Some(c) if c.per_s.is_finite() => format!("{:.1}/s: {}", c.per_s, short(&c.resource)),
        Some(c) => format!("unbounded: {}", short(&c.resource)),
        None => "—".into(),
    }
}

/// A resource's name without its arithmetic in parentheses.
fn short(resource: &str) -> &str {
    resource.split(" (").next().unwrap_or(resource)
}

/// Predicted sustained churn (and bottleneck) per arm, limit and core count.
pub fn predictions(
    arms: &[ArmCosts],
    plane: &Plane,
    cores: &[f64],
    limits: &[ClientLimit],
) -> Table {
    let mut header = vec!["arm".to_string(), "client limits".into()];
    header.extend(cores.iter().map(|c| format!("{c} cores")));
    let mut rows = Vec::new();
    for arm in arms {
        for limit in dedup_limits(arm, limits) {
            let mut row = vec![arm_name(arm), limit.name()];
            for &c in cores {
                let all = ceilings(arm, &at(plane, c, limit));
                row.push(cell(bottleneck(&all)));
            }
            rows.push(row);
        }
    }
    Table { header, rows }
}

/// The limits `arm` really runs at (stock-qps runs every asked limit but
/// `unlimited` at 200: one row).
fn dedup_limits(arm: &ArmCosts, limits: &[ClientLimit]) -> Vec<ClientLimit> {
    let mut out: Vec<ClientLimit> = Vec::new();
    for l in limits.iter().map(|l| l.for_arm(arm.arm)) {
        if !out.contains(&l) {
            out.push(l);
        }
    }
    out
}

fn arm_name(arm: &ArmCosts) -> String {
    if arm.etcd_members == 1 {
        format!("{:?}", arm.arm)
    } else {
        format!("{:?} ({} etcd members)", arm.arm, arm.etcd_members)
    }
}

/// Every resource's ceiling per arm and core count (client rows per limit).
pub fn ceilings_table(
    arms: &[ArmCosts],
    plane: &Plane,
    cores: &[f64],
    limits: &[ClientLimit],
) -> Table {
    let mut header = vec!["arm".to_string(), "resource".into()];
    header.extend(cores.iter().map(|c| format!("{c} cores (Deployments/s)")));
    let mut rows = Vec::new();
    for arm in arms {
        let mut names: Vec<String> = Vec::new();
        let mut grid: Vec<Vec<Ceiling>> = Vec::new();
        for &c in cores {
            let mut column = Vec::new();
            for limit in dedup_limits(arm, limits) {
                column.extend(ceilings(arm, &at(plane, c, limit)));
            }
            for ceiling in &column {
                let name = without_cores(&ceiling.resource);
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            grid.push(column);
        }
        for name in names {
            let mut row = vec![arm_name(arm), name.clone()];
            for column in &grid {
                let found = column.iter().find(|c| without_cores(&c.resource) == name);
                row.push(found.map_or("—".into(), |c| format!("{:.1}", c.per_s)));
            }
            rows.push(row);
        }
    }
    Table { header, rows }
}

fn without_cores(resource: &str) -> String {
    if resource.starts_with("control-plane CPU") {
        "control-plane CPU".into()
    } else {
        resource.to_string()
    }
}

/// CPU per component: fitted idle cores and CPU ms per Deployment.
pub fn costs_table(arms: &[ArmCosts], layout: Layout) -> Table {
    let header = [
        "arm",
        "steps",
        "component",
        "where (this layout)",
        "CPU ms per Deployment",
        "idle cores",
    ]
    .map(String::from)
    .to_vec();
    let mut rows = Vec::new();
    for arm in arms {
        for cost in &arm.costs {
            rows.push(vec![
                arm_name(arm),
                arm.steps.len().to_string(),
                cost.component.clone(),
                if super::facts::on_control_plane(&cost.component, layout) {
                    "control plane".into()
                } else {
                    "workers".into()
                },
                format!("{:.2}", cost.per_deployment_s * 1e3),
                format!("{:.2}", cost.idle_cores),
            ]);
        }
    }
    Table { header, rows }
}

/// The model on the machine the file was measured on (`cores`, every
/// process on it) against each arm's measured rates at the recorded limits;
/// then out of sample: costs fitted WITHOUT the arm's highest step (when two
/// others are left), on the cores the measured processes really used in
/// that step (the churn client and the machine's other processes used the
/// rest; the file does not measure them).
pub fn check_table(arms: &[ArmCosts], plane: &Plane, cores: f64) -> Table {
    let header = [
        "arm",
        "client limits",
        "highest sustained offered/s",
        "highest achieved/s",
        "model",
        "÷ achieved",
        "cores used at the highest step",
        "model at those cores, fitted without that step",
        "÷ achieved",
    ]
    .map(String::from)
    .to_vec();
    let mut rows = Vec::new();
    for arm in arms {
        let mut recorded: Vec<Option<u32>> = Vec::new();
        for s in &arm.steps {
            if !recorded.contains(&s.client_qps) {
                recorded.push(s.client_qps);
            }
        }
        for qps in recorded {
            let steps: Vec<_> = arm.steps.iter().filter(|s| s.client_qps == qps).collect();
            let sustained = steps
                .iter()
                .filter(|s| s.sustained)
                .map(|s| s.offered_per_s)
                .fold(f64::NAN, f64::max);
            let achieved = steps.iter().map(|s| s.achieved_per_s).fold(0.0, f64::max);
            let top = (0..steps.len())
                .max_by(|&a, &b| steps[a].offered_per_s.total_cmp(&steps[b].offered_per_s));
            let used = top.map_or(cores, |i| steps[i].cores_used());
            let others: Vec<_> = (0..steps.len())
                .filter(|&i| Some(i) != top)
                .map(|i| steps[i].clone())
                .collect();
            let held_out = match others.len() {
                0 | 1 => None,
                _ => super::costs::by_arm(&others).into_iter().next(),
            };
            let limit = qps.map_or(ClientLimit::Default, ClientLimit::Qps);
            let model_of = |costs: &ArmCosts, c: f64| {
                let plane = Plane {
                    layout: Layout::OneMachine,
                    ..at(plane, c, limit)
                };
                bottleneck(&ceilings(costs, &plane)).cloned()
            };
            let model_at = |c: f64| model_of(arm, c);
            let ratio = |m: &Option<Ceiling>| {
                m.as_ref()
                    .map_or("—".into(), |m| format!("×{:.2}", m.per_s / achieved))
            };
            let full = model_at(cores);
            let measured = held_out.as_ref().and_then(|h| model_of(h, used));
            rows.push(vec![
                arm_name(arm),
                limit.name(),
                if sustained.is_nan() {
                    "none".into()
                } else {
                    format!("{sustained:.1}")
                },
                format!("{achieved:.1}"),
                cell(full.as_ref()),
                ratio(&full),
                format!("{used:.2}"),
                if held_out.is_some() {
                    cell(measured.as_ref())
                } else {
                    "— (fewer than 3 steps)".into()
                },
                ratio(&measured),
            ]);
        }
    }
    Table { header, rows }
}
