//! The churn suite's printed report: one row per arm, rate and repeat, the
//! hops below create→bound, and STE's ratios against each other arm —
//! per repeat, and over every repeat's samples pooled.

use std::time::Duration;

use crate::arms::qps_name;
use crate::cluster::Arm;
use crate::host::IdlePolicy;
use crate::load::{ArmResult, ChurnArgs};
use crate::measure::cpu_per_100;
use crate::stats::Samples;

/// The arms STE is compared with, in the report's order.
const BASES: [Arm; 3] = [Arm::Stock, Arm::Tuned, Arm::Override];

pub fn print_report(args: &ChurnArgs, results: &[ArmResult]) {
    println!();
    println!("{}", heading(args));
    println!("Machine: {}", IdlePolicy::read());
    println!();
    print_table(args, results);
    print_hops(args, results);
    print_pod_store(args, results);
    print_router(args, results);
    println!();
    for ratio in ratios(results) {
        println!("{}", ratio.line(args.repeats));
    }
    if !args.sweep.is_empty() {
        print_sustained(args, results);
    }
}

fn heading(args: &ChurnArgs) -> String {
    format!(
        "Pod churn ({:?}): {} for {:?} per step{}, {}",
        args.mode,
        if args.sweep.is_empty() {
            format!("a Deployment every {:?}", args.interarrival)
        } else {
            format!("sweep {:?}/s", args.sweep)
        },
        args.duration,
        if args.repeats > 1 {
            format!(", {} repeats with the arms interleaved", args.repeats)
        } else {
            String::new()
        },
        args.external.heading().unwrap_or_else(|| format!(
                "{} fake nodes, durable etcd of {} member(s) with fsync delay {}, STE replication factor {}, RAM store reached over {}, {}",
                args.nodes,
                args.topology.etcd_members,
                args.fsync_delay
                    .map(|d| format!("{d:?}"))
                    .unwrap_or_else(|| "none".into()),
                args.topology.replication_factor,
                if args.topology.local_sockets { "Unix sockets" } else { "TCP" },
                args.topology.gomaxprocs_name()
            )),
    )
}

/// The arm's name in a row: with its repeat when there are several.
fn label(r: &ArmResult, repeats: u64) -> String {
    if repeats > 1 {
        format!("{:?} #{}", r.arm, r.repeat + 1)
    } else {
        format!("{:?}", r.arm)
    }
}

fn print_table(args: &ChurnArgs, results: &[ArmResult]) {
    println!("| arm | etcd members | client limits (every arm) | offered/s | achieved/s | sustained | bound | create→bound p50 / p99 / p99.9 ms | create→Running p50 / p99 ms | CPU s per 100 Deployments |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let cpu = cpu_per_100(r.arm, &r.cpu_seconds, r.sent);
        let limits = if r.arm == Arm::External {
            "the cluster's own".into()
        } else {
            qps_name(r.client_qps)
        };
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {} | {}/{} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} | {} |",
            label(r, args.repeats), r.etcd_members, limits, r.offered_per_s, r.achieved_per_s,
            if r.sustained { "yes" } else { "no" }, r.bound, r.sent,
            r.bound_p50_ms, r.bound_p99_ms, r.bound_p999_ms, r.running_p50_ms, r.running_p99_ms, cpu
        );
    }
}

/// One level below create→bound: each hop's p50 / p99 per arm and rate.
fn print_hops(args: &ChurnArgs, results: &[ArmResult]) {
    let rows = results.iter().map(|r| {
        let columns = r.hops.iter().map(|h| h.name.to_string()).collect();
        let cells = r
            .hops
            .iter()
            .map(|h| format!("{:.1} / {:.1}", h.p50_ms, h.p99_ms))
            .collect();
        (r, columns, cells)
    });
    let title = "Where the time goes (p50 / p99 ms of each hop; see load/hops.rs):";
    print_per_row(args, title, rows.collect());
}

/// Every arm's pod store as kube-apiserver timed it (load/store_time.rs).
fn print_pod_store(args: &ChurnArgs, results: &[ArmResult]) {
    let rows = results.iter().filter(|r| !r.pod_store.is_empty()).map(|r| {
        let columns = r
            .pod_store
            .iter()
            .map(|c| c.operation.to_string())
            .collect();
        let cells = r
            .pod_store
            .iter()
            .map(|c| format!("{:.1}, {:.2}", c.per_deployment, c.mean_ms))
            .collect();
        (r, columns, cells)
    });
    let title = "kube-apiserver's calls to the pod store (its etcd_request_duration_seconds; calls per Deployment, mean ms):";
    print_per_row(args, title, rows.collect());
}

/// A table with one row per result: its arm and rate, then its cells under
/// the first row's column names. Nothing without rows.
fn print_per_row(args: &ChurnArgs, title: &str, rows: Vec<(&ArmResult, Vec<String>, Vec<String>)>) {
    let Some((_, columns, _)) = rows.first() else {
        return;
    };
    println!();
    println!("{title}");
    println!();
    println!("| arm | offered/s | {} |", columns.join(" | "));
    println!("|---|---|{}", "---|".repeat(columns.len()));
    for (r, _, cells) in &rows {
        println!(
            "| {} | {:.1} | {} |",
            label(r, args.repeats),
            r.offered_per_s,
            cells.join(" | ")
        );
    }
}

/// On the ste arm, the router's own share of each step (load/router_time.rs).
fn print_router(args: &ChurnArgs, results: &[ArmResult]) {
    let rows: Vec<_> = results
        .iter()
        .filter_map(|r| r.router.as_ref().map(|t| (r, t)))
        .collect();
    if rows.is_empty() {
        return;
    }
    println!();
    println!("ste-router during each step (its /metrics):");
    println!();
    println!("| arm | offered/s | Txn calls per Deployment | Txn in the router, mean ms | shard Txn, mean ms | writes per shard Txn | Range calls per Deployment, mean ms |");
    println!("|---|---|---|---|---|---|---|");
    for (r, t) in rows {
        println!(
            "| {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1}, {:.2} |",
            label(r, args.repeats),
            r.offered_per_s,
            t.txn_per_deployment,
            t.txn_mean_ms,
            t.shard_txn_mean_ms,
            t.writes_per_batch,
            t.range_per_deployment,
            t.range_mean_ms
        );
    }
}

/// STE against one other arm at the same client limits, members and
/// offered rate: each repeat's ratios and those of the pooled samples.
#[derive(Debug, PartialEq)]
struct Ratio {
    base: Arm,
    client_qps: Option<u32>,
    offered_per_s: f64,
    /// (repeat, p50 ×, p99 ×, achieved ×), in repeat order.
    per_repeat: Vec<(u64, f64, f64, f64)>,
    /// p50 × and p99 × of every repeat's create→bound samples together.
    pooled: (f64, f64),
}

impl Ratio {
    fn line(&self, repeats: u64) -> String {
        let what = format!(
            "Ste vs {:?} ({}, {:.1}/s offered)",
            self.base,
            qps_name(self.client_qps),
            self.offered_per_s
        );
        if repeats == 1 {
            let (_, p50, p99, achieved) = self.per_repeat[0];
            return format!(
                "{what}: create→bound p50 ×{p50:.2}, p99 ×{p99:.2}, achieved ×{achieved:.2}"
            );
        }
        let each: Vec<String> = self
            .per_repeat
            .iter()
            .map(|(repeat, p50, p99, _)| format!("#{} ×{p50:.2} / ×{p99:.2}", repeat + 1))
            .collect();
        format!(
            "{what}, pooled over {} repeats: create→bound p50 ×{:.2}, p99 ×{:.2} (each repeat p50 / p99: {})",
            self.per_repeat.len(),
            self.pooled.0,
            self.pooled.1,
            each.join(", ")
        )
    }
}

fn same_point(a: &ArmResult, b: &ArmResult) -> bool {
    a.client_qps == b.client_qps
        && a.etcd_members == b.etcd_members
        && (a.offered_per_s - b.offered_per_s).abs() < 1e-6
}

/// Every STE point's ratios against each base arm measured at the same
/// point, matched within a repeat; pooled over the repeats both arms have.
fn ratios(results: &[ArmResult]) -> Vec<Ratio> {
    let mut ratios: Vec<Ratio> = Vec::new();
    for ste in results.iter().filter(|r| r.arm == Arm::Ste) {
        for base_arm in BASES {
            let measured = results
                .iter()
                .any(|b| b.arm == base_arm && b.repeat == ste.repeat && same_point(b, ste));
            if !measured {
                continue;
            }
            let known = ratios.iter().any(|r| {
                r.base == base_arm
                    && r.client_qps == ste.client_qps
                    && (r.offered_per_s - ste.offered_per_s).abs() < 1e-6
            });
            if !known {
                ratios.push(pooled(results, ste, base_arm));
            }
        }
    }
    ratios
}

fn pooled(results: &[ArmResult], ste: &ArmResult, base_arm: Arm) -> Ratio {
    let (mut ste_all, mut base_all) = (Samples::default(), Samples::default());
    let mut per_repeat = Vec::new();
    for s in results
        .iter()
        .filter(|r| r.arm == Arm::Ste && same_point(r, ste))
    {
        let Some(b) = results
            .iter()
            .find(|b| b.arm == base_arm && b.repeat == s.repeat && same_point(b, s))
        else {
            continue;
        };
        per_repeat.push((
            s.repeat,
            s.bound_p50_ms / b.bound_p50_ms,
            s.bound_p99_ms / b.bound_p99_ms,
            s.achieved_per_s / b.achieved_per_s,
        ));
        add(&mut ste_all, s);
        add(&mut base_all, b);
    }
    Ratio {
        base: base_arm,
        client_qps: ste.client_qps,
        offered_per_s: ste.offered_per_s,
        per_repeat,
        pooled: (
            ste_all.percentile(50.0) / base_all.percentile(50.0),
            ste_all.percentile(99.0) / base_all.percentile(99.0),
        ),
    }
}

fn add(samples: &mut Samples, r: &ArmResult) {
    for (_, ms) in &r.bound_samples {
        samples.push(Duration::from_secs_f64(ms / 1e3));
    }
}

/// The highest rate each arm sustained, per repeat.
fn print_sustained(args: &ChurnArgs, results: &[ArmResult]) {
    let runs = if args.external.kubeconfig.is_some() {
        vec![(Arm::External, None)]
    } else {
        args.local_runs()
    };
    for (arm, qps) in runs {
        let best: Vec<String> = (0..args.repeats)
            .map(|repeat| {
                let best = results
                    .iter()
                    .filter(|r| {
                        r.arm == arm && r.client_qps == qps && r.repeat == repeat && r.sustained
                    })
                    .map(|r| r.offered_per_s)
                    .fold(f64::NAN, f64::max);
                if best.is_nan() {
                    "none of the swept rates".into()
                } else {
                    format!("{best:.1}/s")
                }
            })
            .collect();
        let limits = if arm == Arm::External {
            "the cluster's own limits".into()
        } else {
            qps_name(qps)
        };
        println!(
            "highest sustained rate, {arm:?}, {limits}: {}",
            best.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Mode;

    fn result(arm: Arm, repeat: u64, rate: f64, latencies_ms: &[f64]) -> ArmResult {
        let mut samples = Samples::default();
        for ms in latencies_ms {
            samples.push(Duration::from_secs_f64(ms / 1e3));
        }
        ArmResult {
            arm,
            repeat,
            mode: Mode::Burst,
            client_qps: Some(200),
            etcd_members: 1,
            sustained: true,
            offered_per_s: rate,
            sent: latencies_ms.len(),
            bound: latencies_ms.len(),
            achieved_per_s: rate,
            bound_p50_ms: samples.percentile(50.0) / 1e3,
            bound_p99_ms: samples.percentile(99.0) / 1e3,
            bound_p999_ms: samples.percentile(99.9) / 1e3,
            running_p50_ms: f64::NAN,
            running_p99_ms: f64::NAN,
            cpu_seconds: Vec::new(),
            bound_samples: latencies_ms.iter().map(|ms| (0.0, *ms)).collect(),
            hops: Vec::new(),
            router: None,
            pod_store: Vec::new(),
        }
    }

    #[test]
    fn ratios_match_within_a_repeat_and_pool_the_samples() {
        let results = vec![
            result(Arm::Override, 0, 10.0, &[10.0, 20.0, 30.0]),
            result(Arm::Ste, 0, 10.0, &[20.0, 40.0, 60.0]),
            // Repeat 1 ran the other way round, and STE was the faster.
            result(Arm::Ste, 1, 10.0, &[5.0, 10.0, 15.0]),
            result(Arm::Override, 1, 10.0, &[10.0, 20.0, 30.0]),
            // Another rate, with no override to compare with: no ratio.
            result(Arm::Ste, 0, 20.0, &[1.0]),
        ];
        let ratios = ratios(&results);
        assert_eq!(ratios.len(), 1, "{ratios:?}");
        let ratio = &ratios[0];
        assert_eq!((ratio.base, ratio.offered_per_s), (Arm::Override, 10.0));
        // Percentiles are HdrHistogram's (within 0.1 %).
        let close = |a: f64, b: f64| (a - b).abs() <= 0.003 * b;
        let repeats: Vec<u64> = ratio.per_repeat.iter().map(|r| r.0).collect();
        assert_eq!(repeats, [0, 1]);
        let (_, p50, p99, achieved) = ratio.per_repeat[0];
        assert!(close(p50, 2.0) && close(p99, 2.0) && achieved == 1.0);
        let (_, p50, p99, _) = ratio.per_repeat[1];
        assert!(close(p50, 0.5) && close(p99, 0.5));
        // Pooled: STE {5,10,15,20,40,60} against {10,10,20,20,30,30}:
        // p50 15 vs 20, p99 60 vs 30.
        assert!(close(ratio.pooled.0, 0.75), "{:?}", ratio.pooled);
        assert!(close(ratio.pooled.1, 2.0), "{:?}", ratio.pooled);
        let line = ratio.line(2);
        assert!(
            line.contains("pooled over 2 repeats: create→bound p50 ×0.75, p99 ×2.00"),
            "{line}"
        );
        assert!(line.contains("#2 ×0.50 / ×0.50"), "{line}");
    }

    #[test]
    fn one_repeat_reads_as_before() {
        let results = vec![
            result(Arm::Stock, 0, 30.0, &[100.0]),
            result(Arm::Ste, 0, 30.0, &[50.0]),
        ];
        let lines: Vec<String> = ratios(&results).iter().map(|r| r.line(1)).collect();
        assert_eq!(
            lines,
            ["Ste vs Stock (QPS 200, 30.0/s offered): create→bound p50 ×0.50, p99 ×0.50, achieved ×1.00"]
        );
    }
}
