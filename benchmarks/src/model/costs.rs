//! CPU per component from a churn results file: for each arm, the CPU
//! seconds each process spent per Deployment and the cores it spends with
//! no load at all (leases, heartbeats, resyncs), fitted over the file's steps.

use std::path::Path;

use serde::Deserialize;

use super::error::ModelError;
use crate::arms::Arm;

/// One step of `ste-bench churn`'s results.json (the fields the model reads).
#[derive(Deserialize, Clone, Debug)]
pub struct Step {
    pub arm: Arm,
    #[serde(default)]
    pub client_qps: Option<u32>,
    #[serde(default = "one")]
    pub etcd_members: usize,
    pub offered_per_s: f64,
    pub sent: usize,
    pub achieved_per_s: f64,
    pub sustained: bool,
    pub cpu_seconds: Vec<(String, f64)>,
    #[serde(default)]
    pub bound_p999_ms: f64,
    #[serde(default)]
    pub bound_samples: Vec<(f64, f64)>,
}

fn one() -> usize {
    1
}

impl Step {
    /// Seconds the CPU was measured over: from the first Deployment until
    /// every pod was bound (the last bound sample), at least the sending
    /// time; without samples (a file rebuilt from a table), the sending time
    /// plus the step's p99.9 create→bound.
    pub fn window_s(&self) -> f64 {
        let sending = self.sent as f64 / self.offered_per_s;
        if self.bound_samples.is_empty() {
            return sending + self.bound_p999_ms / 1e3;
        }
        let last_bound = self.bound_samples.iter().map(|s| s.0).fold(0.0, f64::max);
        sending.max(last_bound)
    }

    /// Cores the measured processes used on average over the step.
    pub fn cores_used(&self) -> f64 {
        self.cpu_seconds.iter().map(|(_, c)| c).sum::<f64>() / self.window_s()
    }
}

/// One component's cost.
#[derive(Clone, Debug, PartialEq)]
pub struct Cost {
    pub component: String,
    /// CPU seconds per Deployment, on top of idle.
    pub per_deployment_s: f64,
    /// Cores spent whatever the load.
    pub idle_cores: f64,
}

/// The costs of one arm (at one durable-etcd member count) and its steps.
#[derive(Clone, Debug)]
pub struct ArmCosts {
    pub arm: Arm,
    pub etcd_members: usize,
    pub costs: Vec<Cost>,
    pub steps: Vec<Step>,
}

/// Reads a churn results.json.
pub fn load(path: &Path) -> Result<Vec<Step>, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Read {
        path: path.into(),
        source,
    })?;
    let steps: Vec<Step> = serde_json::from_str(&text).map_err(|source| ModelError::Parse {
        path: path.into(),
        source,
    })?;
    if let Some(bad) = steps
        .iter()
        .find(|s| s.sent == 0 || s.offered_per_s.is_nan() || s.offered_per_s <= 0.0)
    {
        return Err(ModelError::BadStep {
            path: path.into(),
            arm: format!("{:?}", bad.arm),
        });
    }
    Ok(steps)
}

/// `cpu = idle · window + per · deployments`, least squares over the steps
/// (window s, deployments, cpu s), both terms kept non-negative: when the
/// free fit makes one negative, the better of the two one-term fits. With
/// one step or steps of one rate the two cannot be told apart: idle is 0 and
/// every CPU second is charged to the Deployments (overstating the cost at
/// higher rates).
pub fn fit(points: &[(f64, f64, f64)]) -> (f64, f64) {
    let (mut ww, mut wn, mut nn, mut wc, mut nc) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for &(w, n, c) in points {
        ww += w * w;
        wn += w * n;
        nn += n * n;
        wc += w * c;
        nc += n * c;
    }
    let det = ww * nn - wn * wn;
    if nn <= 0.0 {
        return (0.0, 0.0);
    }
    let per_only = (0.0, (nc / nn).max(0.0));
    if points.len() < 2 || det <= 1e-6 * ww * nn {
        return per_only;
    }
    let idle = (wc * nn - nc * wn) / det;
    let per = (nc * ww - wc * wn) / det;
    if idle >= 0.0 && per >= 0.0 {
        return (idle, per);
    }
    let idle_only = ((wc / ww).max(0.0), 0.0);
    let residual = |(i, p): (f64, f64)| -> f64 {
        points
            .iter()
            .map(|&(w, n, c)| (c - i * w - p * n).powi(2))
            .sum()
    };
    if residual(idle_only) < residual(per_only) {
        idle_only
    } else {
        per_only
    }
}

/// The steps grouped by arm and member count (in the file's order), each
/// with its fitted costs. Steps at different client limits are pooled: the
/// CPU a Deployment costs does not depend on how fast the clients may send.
pub fn by_arm(steps: &[Step]) -> Vec<ArmCosts> {
    let mut arms: Vec<ArmCosts> = Vec::new();
    for step in steps.iter().filter(|s| s.arm != Arm::External) {
        match arms
            .iter_mut()
            .find(|a| a.arm == step.arm && a.etcd_members == step.etcd_members)
        {
            Some(arm) => arm.steps.push(step.clone()),
            None => arms.push(ArmCosts {
                arm: step.arm,
                etcd_members: step.etcd_members,
                costs: Vec::new(),
                steps: vec![step.clone()],
            }),
        }
    }
    for arm in &mut arms {
        arm.costs = costs_of(&arm.steps);
    }
    arms
}

fn costs_of(steps: &[Step]) -> Vec<Cost> {
    let mut names: Vec<&str> = Vec::new();
    for (name, _) in steps.iter().flat_map(|s| &s.cpu_seconds) {
        if !names.contains(&name.as_str()) {
            names.push(name);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let points: Vec<(f64, f64, f64)> = steps
                .iter()
                .map(|s| {
                    let cpu = s
                        .cpu_seconds
                        .iter()
                        .find(|(n, _)| n == name)
                        .map_or(0.0, |(_, c)| *c);
                    (s.window_s(), s.sent as f64, cpu)
                })
                .collect();
            let (idle_cores, per_deployment_s) = fit(&points);
            Cost {
                component: name.to_string(),
                per_deployment_s,
                idle_cores,
            }
        })
        .collect()
}
