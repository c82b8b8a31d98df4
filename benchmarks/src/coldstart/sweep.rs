//! `ste-bench coldstart --sweep 1,2,5,10`: the open-loop cold-starts-per-
//! second sweep. Per arm (one cluster each, as the rounds), per bridge mode
//! (`--sweep-bridge-modes`, `none` by default) and per rate: wakes sent at
//! fixed times (not after the previous one finished) through the bench's
//! activator to Knative's autoscaler, each on a revision at zero taken from
//! a pool of Knative Services made up front ([`plan`]); each wake followed
//! to its pod IP in the private Endpoints ([`step`]); whether the arm
//! sustained the rate, the highest rate each arm sustained and the ratios
//! between arms ([`verdict`], [`report`]).

pub mod plan;
pub mod report;
pub mod step;
pub mod verdict;

use std::path::Path;
use std::time::Duration;

use anyhow::bail;

use super::{
    bridge_binary, bridge_flags, create_service, keep_node_leases, start_bridge, wait_at_zero,
};
use super::{BridgeProcess, ColdstartArgs, Knative};
use crate::api::client_for;
use crate::cluster::{self, Arm, ClusterRecord};
use crate::progress::Progress;
use report::SweepReport;
use step::{StepPlan, StepResult};

macro_rules! sustained_definition {
    () => {
        "A rate is SUSTAINED when no wake met an empty pool, every wake sent was answered (pod IP \
         in the revision's private Endpoints) within --sweep-deadline, at least 95 % of the \
         scheduled wakes were answered, and the p95 wake → Endpoints of the wakes scheduled in \
         the last third of the step is at most 2× that of the middle third (no growing \
         backlog; the first third is a warm-up, before any woken revision is scaled back to \
         zero), and the step's p95 wake → Endpoints is at most --sweep-p95-max. An arm's \
         highest sustained rate is the highest rate at which it and every lower rate were \
         sustained."
    };
}

/// The definition `--help`, coldstart.md and coldstart.json give.
pub const DEFINITION: &str = sustained_definition!();

/// The sweep's flags (flattened into `ste-bench coldstart`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SweepArgs {
    /// Run the open-loop sweep instead of the rounds: cold starts per second, one step per value.
    #[arg(
        long = "sweep",
        value_delimiter = ',',
        env = "STE_COLDSTART_SWEEP",
        value_parser = parse_rate,
        long_help = concat!(
            "Run the open-loop sweep instead of the rounds (--revisions is then ignored): cold \
             starts per second, one step per value, e.g. 1,2,5,10. Per arm, bridge mode and rate, \
             wakes are sent at fixed times for --sweep-duration through Knative's autoscaler \
             (request stats, as --wake stats), each on a revision at zero from a pool of \
             --sweep-pool Knative Services; a wake due with no revision at zero is counted as a \
             pool miss. ",
            sustained_definition!()
        )
    )]
    pub rates: Vec<f64>,
    /// How long each step sends wakes.
    #[arg(long, env = "STE_COLDSTART_SWEEP_DURATION", default_value = "30s", value_parser = parse_positive_duration)]
    pub sweep_duration: Duration,
    /// Knative Services woken in turn (default: the highest rate × 45 s, the
    /// time a revision takes to answer and be back at zero, 2 to 150).
    #[arg(long, env = "STE_COLDSTART_SWEEP_POOL", value_parser = parse_pool)]
    pub sweep_pool: Option<usize>,
    /// A wake not answered (pod IP in the private Endpoints) this long after
    /// its scheduled time is given up (timed out).
    #[arg(long, env = "STE_COLDSTART_SWEEP_DEADLINE", default_value = "30s", value_parser = parse_positive_duration)]
    pub sweep_deadline: Duration,
    /// A step is sustained only if its p95 wake → private Endpoints is at
    /// most this: a queue that no longer grows but holds every cold start
    /// for seconds is not a rate a user would call sustained.
    #[arg(long, env = "STE_COLDSTART_SWEEP_P95_MAX", default_value = "1s", value_parser = parse_positive_duration)]
    pub sweep_p95_max: Duration,
    /// Bridge modes the sweep runs, each a series of every rate: `none` (no
    /// bridge) and any of --bridge-modes' modes.
    #[arg(
        long,
        value_delimiter = ',',
        env = "STE_COLDSTART_SWEEP_BRIDGE_MODES",
        default_value = "none"
    )]
    pub sweep_bridge_modes: Vec<String>,
}

impl SweepArgs {
    pub fn requested(&self) -> bool {
        !self.rates.is_empty()
    }
}

/// A rate in wakes per second: a positive number up to 1000.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 && r <= 1000.0 => Ok(r),
        _ => Err(format!(
            "{text:?} is not a rate in wakes per second (a number above 0, at most 1000)"
        )),
    }
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text.trim()) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be longer than 0".into()),
        Err(e) => Err(format!("{text:?}: {e} (e.g. 30s, 2m)")),
    }
}

fn parse_pool(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=plan::POOL_MAX).contains(&n) => Ok(n),
        _ => Err(format!(
            "{text:?}: the pool is a number of Knative Services, 1 to {}",
            plan::POOL_MAX
        )),
    }
}

/// The sweep's bridge modes, checked: `none` or a bridge mode, no repeats.
fn modes(args: &SweepArgs) -> anyhow::Result<Vec<String>> {
    let mut modes: Vec<String> = Vec::new();
    for m in args.sweep_bridge_modes.iter().map(|m| m.trim()) {
        if m.is_empty() || modes.iter().any(|k| k == m) {
            continue;
        }
        if m != "none" {
            bridge_flags(m).map_err(|e| anyhow::anyhow!("--sweep-bridge-modes: {e}"))?;
        }
        modes.push(m.to_string());
    }
    if modes.is_empty() {
        bail!("--sweep-bridge-modes: name at least one mode (none, default, aggressive, …)");
    }
    Ok(modes)
}

/// Runs the sweep for `args.arms`, writes coldstart.json (`{"sweep": …}`),
/// coldstart.md and the figure into `args.output`.
pub async fn run(args: &ColdstartArgs) -> anyhow::Result<SweepReport> {
    if args.repeats > 1 {
        bail!("--repeats repeats the rounds; the sweep runs each arm once (leave --repeats at 1)");
    }
    let mut rates = args.sweep.rates.clone();
    rates.sort_by(f64::total_cmp);
    rates.dedup();
    let modes = modes(&args.sweep)?;
    let bridge_bin = match modes.iter().any(|m| m != "none") {
        true => Some(bridge_binary(args)?),
        false => None,
    };
    let pool = args
        .sweep
        .sweep_pool
        .unwrap_or_else(|| plan::default_pool(&rates));
    std::fs::create_dir_all(&args.output)?;
    let mut report = SweepReport::new(&args.sweep, &rates, &modes, pool);
    for &arm in &args.arms {
        let steps = run_arm(args, arm, &rates, &modes, pool, bridge_bin.as_deref()).await?;
        report.steps.extend(steps);
        report.conclude();
        // Kept after every arm, so a long run that fails later keeps its steps.
        report.write_json(&args.output)?;
    }
    report.write(&args.output)?;
    println!("{}", report.markdown());
    eprintln!(
        "results in {}",
        args.output.join("coldstart.json").display()
    );
    Ok(report)
}

/// One arm's cluster with Knative and the pool at zero, every mode and rate.
async fn run_arm(
    args: &ColdstartArgs,
    arm: Arm,
    rates: &[f64],
    modes: &[String],
    pool_size: usize,
    bridge_bin: Option<&Path>,
) -> anyhow::Result<Vec<StepResult>> {
    let env = args.environment();
    let dir = std::path::absolute(
        args.output
            .join(format!("sweep-{}", crate::arms::dir_name(arm, &env))),
    )?;
    eprintln!(
        "== {arm:?} arm, sweep: cluster with {} nodes, {}, pool of {pool_size}",
        args.nodes,
        crate::arms::qps_name(crate::arms::client_qps(arm, env.client_qps))
    );
    let record = cluster::up_arm(arm, &env, dir.clone()).await?;
    let leases = keep_node_leases(&record)?;
    let result = async {
        let mut knative = Knative::start(&record, &dir.join("logs")).await?;
        // Before the Services: a later change resyncs every PodAutoscaler.
        crate::knative::configure_autoscaler(&record).await?;
        let services = make_pool(&record, pool_size).await?;
        crate::knative::wait_autoscaler_quiet(
            &record,
            Duration::from_secs(2),
            Duration::from_secs(300),
        )
        .await?;
        let activator = crate::knative::connect_activator(Duration::from_secs(30)).await?;
        let mut pool = plan::Pool::new(services.iter().map(|s| super::revision_of(s)));
        let mut steps = Vec::new();
        for mode in modes {
            let series = Series {
                args,
                arm,
                mode,
                dir: &dir,
                bridge_bin,
            };
            let run = series.run(&record, &activator, &mut pool, rates, &mut knative);
            match run.await {
                Ok(s) => steps.extend(s),
                Err(e) => {
                    activator.stop();
                    return Err(e);
                }
            }
        }
        activator.stop();
        anyhow::Ok(steps)
    }
    .await;
    leases.abort();
    cluster::stop(&record).await?;
    result
}

/// Services created at once before waiting for them: 150 at once left the
/// last 24 created at `Ready=Unknown, Deploying` for good on this machine.
const POOL_BATCH: usize = 25;

/// Creates the pool's Knative Services, `POOL_BATCH` at a time, each batch
/// waited for until its revisions are Ready at zero.
async fn make_pool(record: &ClusterRecord, size: usize) -> anyhow::Result<Vec<String>> {
    let client = client_for(record)?;
    let services: Vec<String> = (0..size).map(|i| format!("sweep-{i}")).collect();
    let mut progress = Progress::new("sweep pool: Knative Services Ready at zero", size as u64);
    for (b, batch) in services.chunks(POOL_BATCH).enumerate() {
        for s in batch {
            create_service(&client, s, "100m").await?;
        }
        let within = Duration::from_secs(300 + 2 * batch.len() as u64);
        wait_at_zero(&client, batch, within).await?;
        progress.update((b * POOL_BATCH + batch.len()) as u64, "Ready at zero");
    }
    progress.finish(size as u64, "pool ready");
    Ok(services)
}

/// Every rate of one arm and bridge mode.
struct Series<'a> {
    args: &'a ColdstartArgs,
    arm: Arm,
    mode: &'a str,
    dir: &'a Path,
    bridge_bin: Option<&'a Path>,
}

/// The bridge's counters a step records (the change over the step), by
/// the short name the report uses. The tap's show whether it wrote a wake's
/// 0→1 or stood aside: a wake whose Deployment the bridge's cache did not
/// show at 0 is not in `tap_wakes_seen`.
const BRIDGE_COUNTERS: [(&str, &str); 13] = [
    ("pods_created", "ste_activator_bridge_pods_created_total"),
    (
        "duplicates_deleted",
        "ste_activator_bridge_duplicates_deleted_total",
    ),
    (
        "duplicates_gated",
        "ste_activator_bridge_duplicates_gated_total",
    ),
    ("handed_over", "ste_activator_bridge_handed_over_total"),
    ("held_deleted", "ste_activator_bridge_held_deleted_total"),
    (
        "tap_wakes_seen",
        "ste_activator_bridge_tap_wakes_seen_total",
    ),
    (
        "tap_scaled",
        "ste_activator_bridge_tap_wakes_total{result=\"scaled\"}",
    ),
    (
        "tap_skipped",
        "ste_activator_bridge_tap_wakes_total{result=\"skipped\"}",
    ),
    ("tap_reverts", "ste_activator_bridge_tap_reverts_total"),
    (
        "own_pods_fill",
        "ste_activator_bridge_decisions_total{decision=\"own_pods_fill\"}",
    ),
    (
        "already_decided",
        "ste_activator_bridge_decisions_total{decision=\"already_decided\"}",
    ),
    (
        "deployment_at_zero",
        "ste_activator_bridge_decisions_total{decision=\"deployment_at_zero\"}",
    ),
    (
        "late_pod_gated",
        "ste_activator_bridge_decisions_total{decision=\"late_pod_gated\"}",
    ),
];

async fn bridge_counters(
    bridge: &BridgeProcess,
) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let m = bridge.metrics().await?;
    Ok(BRIDGE_COUNTERS
        .iter()
        .map(|(short, series)| (short.to_string(), super::metric_sum(&m, series)))
        .collect())
}

impl Series<'_> {
    async fn run(
        &self,
        record: &ClusterRecord,
        activator: &crate::knative::stats::Activator,
        pool: &mut plan::Pool,
        rates: &[f64],
        knative: &mut Knative,
    ) -> anyhow::Result<Vec<StepResult>> {
        let (bridge, tap) = match (self.mode, self.bridge_bin) {
            ("none", _) | (_, None) => (None, None),
            (mode, Some(bin)) => {
                let log = self
                    .dir
                    .join("logs")
                    .join(format!("bridge-sweep-{mode}.log"));
                let (b, tap) = start_bridge(bin, record, &log, mode, self.args.settle).await?;
                (Some(b), tap)
            }
        };
        // With the tap, this series' stats go through the bridge, as the
        // rounds' do: an activator of its own, connected to the tap.
        let through_tap = match &tap {
            Some(addr) => {
                Some(crate::knative::connect_activator_at(addr, Duration::from_secs(30)).await?)
            }
            None => None,
        };
        let activator = through_tap.as_ref().unwrap_or(activator);
        let mut steps = Vec::new();
        for &rate in rates {
            knative.check()?;
            let before = match &bridge {
                Some(b) => Some(bridge_counters(b).await?),
                None => None,
            };
            let plan = StepPlan {
                arm: self.arm,
                bridge: self.mode,
                rate,
                duration: self.args.sweep.sweep_duration,
                deadline: self.args.sweep.sweep_deadline,
                p95_max: self.args.sweep.sweep_p95_max,
            };
            let mut result = step::run(record, activator, pool, &plan).await?;
            if let (Some(b), Some(before)) = (&bridge, before) {
                let after = bridge_counters(b).await?;
                result.bridge_counters = Some(
                    after
                        .iter()
                        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
                        .collect(),
                );
            }
            eprintln!("    {}", report::one_line(&result));
            steps.push(result);
        }
        if let Some(a) = through_tap {
            a.stop();
        }
        if let Some(b) = bridge {
            b.stop();
        }
        Ok(steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        sweep: SweepArgs,
    }

    #[test]
    fn flags_parse_and_bad_input_is_a_clear_error() {
        let cli = Cli::try_parse_from([
            "t",
            "--sweep",
            "1,2.5,10",
            "--sweep-duration",
            "45s",
            "--sweep-pool",
            "12",
        ])
        .unwrap();
        assert_eq!(cli.sweep.rates, [1.0, 2.5, 10.0]);
        assert_eq!(cli.sweep.sweep_duration, Duration::from_secs(45));
        assert_eq!(cli.sweep.sweep_pool, Some(12));
        assert_eq!(cli.sweep.sweep_bridge_modes, ["none"]);
        assert!(cli.sweep.requested());
        for (flag, value, says) in [
            ("--sweep", "1,x", "not a rate"),
            ("--sweep", "0", "not a rate"),
            ("--sweep", "-2", "not a rate"),
            ("--sweep-duration", "0s", "longer than 0"),
            ("--sweep-duration", "soon", "e.g. 30s"),
            ("--sweep-pool", "0", "1 to 1000"),
            ("--sweep-pool", "5000", "1 to 1000"),
        ] {
            let arg = format!("{flag}={value}");
            let err = Cli::try_parse_from(["t", arg.as_str()]).unwrap_err();
            assert!(err.to_string().contains(says), "{flag} {value}: {err}");
        }
        let none = Cli::try_parse_from(["t"]).unwrap();
        assert!(!none.sweep.requested());
    }

    #[test]
    fn the_help_defines_sustained() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("SUSTAINED"), "{help}");
        assert!(help.contains("STE_COLDSTART_SWEEP_POOL"), "{help}");
    }

    #[test]
    fn bridge_modes_are_checked_and_deduplicated() {
        let args = |m: &[&str]| SweepArgs {
            sweep_bridge_modes: m.iter().map(|s| s.to_string()).collect(),
            ..SweepArgs::default()
        };
        assert_eq!(
            modes(&args(&["none", "aggressive", "none"])).unwrap(),
            ["none", "aggressive"]
        );
        let err = modes(&args(&["fast"])).unwrap_err().to_string();
        assert!(err.contains("not a bridge mode"), "{err}");
        assert!(modes(&args(&[""])).is_err());
    }
}
