//! `ste-bench members`: the edge paper's experiment ("Rearchitecting
//! Kubernetes for the Edge"): how the durable etcd's member count changes
//! its write latency and throughput, and what that does to pod
//! create→bound latency on stock (pods in that etcd) and on STE (pods in RAM
//! shards, off the Raft path).
//!
//! Part 1, etcd alone: for each member count, a fresh durable etcd (members
//! on 127.0.0.1, each fsync delayed by --fsync-delay) gets Puts of 256-byte
//! values from one gRPC client connected to the first member, open loop at
//! each offered rate (latency from when the Put was due), then closed loop
//! with --writers concurrent writers (saturated throughput). Part 2, pods:
//! churn bursts (a Deployment every --interarrival) on each --arms arm at each
//! member count, through the pod-churn load of [`crate::load`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use ste_etcd_proto::pb::{kv_client::KvClient, PutRequest};
use tonic::transport::Channel;

use crate::arms::{Arm, Topology};
use crate::cluster;
use crate::load::{self, ArmResult, ChurnArgs, Mode};
use crate::progress::Progress;
use crate::stats::Samples;

#[derive(clap::Args, Clone, Debug)]
pub struct MembersArgs {
    /// Member counts of the durable etcd to compare.
    #[arg(long, env = "STE_MEMBERS_COUNTS", value_delimiter = ',', default_value = "1,3,5", value_parser = crate::arms::parse_members)]
    pub members: Vec<usize>,
    /// Delay added to every fsync/fdatasync of each member.
    #[arg(long, env = "STE_MEMBERS_FSYNC_DELAY", default_value = "8ms", value_parser = humantime::parse_duration)]
    pub fsync_delay: Duration,
    /// Offered etcd write rates (Puts/s), open loop, one after the other.
    #[arg(
        long,
        env = "STE_MEMBERS_WRITE_RATES",
        value_delimiter = ',',
        default_value = "50,200"
    )]
    pub write_rates: Vec<f64>,
    /// How long each write rate (and the saturated phase) runs.
    #[arg(long, env = "STE_MEMBERS_WRITE_DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub write_duration: Duration,
    /// Concurrent writers of the saturated phase.
    #[arg(long, env = "STE_MEMBERS_WRITERS", default_value_t = 32)]
    pub writers: usize,
    /// Arms whose pod create→bound latency is measured at each member count
    /// (empty: etcd alone).
    #[arg(
        long,
        env = "STE_MEMBERS_ARMS",
        value_enum,
        value_delimiter = ',',
        default_value = "stock,ste"
    )]
    pub arms: Vec<Arm>,
    /// Time between two Deployments (offered rate 1/T) of the pod phase.
    #[arg(long, env = "STE_MEMBERS_INTERARRIVAL", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub interarrival: Duration,
    /// How long Deployments are sent in the pod phase.
    #[arg(long, env = "STE_MEMBERS_DURATION", default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Fake nodes of the pod phase.
    #[arg(long, env = "STE_MEMBERS_NODES", default_value_t = 20)]
    pub nodes: usize,
    /// RAM shards of the ste arm.
    #[arg(long, env = "STE_MEMBERS_SHARDS", default_value_t = 2)]
    pub shards: usize,
    /// Client QPS of controller-manager and scheduler, on every arm: a
    /// number, or `default` for Kubernetes' own limits.
    #[arg(long, env = "STE_MEMBERS_CLIENT_QPS", default_value = "200", value_parser = crate::arms::parse_qps)]
    pub client_qps: ::std::option::Option<u32>,
    /// Where clusters, logs and results go.
    #[arg(
        long,
        env = "STE_MEMBERS_OUTPUT",
        default_value = "target/bench/members"
    )]
    pub output: PathBuf,
}

/// etcd alone at one member count and one load.
#[derive(Serialize, Clone, Debug)]
pub struct WriteResult {
    pub members: usize,
    /// None: the saturated phase (closed loop, `writers` at once).
    pub offered_per_s: Option<f64>,
    pub sent: usize,
    pub acknowledged: usize,
    pub errors: usize,
    pub achieved_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Serialize, Clone, Debug)]
pub struct MembersReport {
    pub fsync_delay_ms: f64,
    pub writes: Vec<WriteResult>,
    pub pods: Vec<ArmResult>,
}

async fn connect(endpoint: &str) -> anyhow::Result<KvClient<Channel>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let channel = Channel::from_shared(endpoint.to_string())?
                .connect()
                .await?;
            let mut kv = KvClient::new(channel);
            kv.put(put(0)).await?;
            anyhow::Ok(kv)
        };
        match attempt.await {
            Ok(kv) => return Ok(kv),
            Err(err) if Instant::now() > deadline => {
                return Err(err).context(format!("etcd at {endpoint} did not take a write"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn put(i: usize) -> PutRequest {
    PutRequest {
        key: format!("/bench/{i:08}").into_bytes().into(),
        value: vec![b'x'; 256].into(),
        ..Default::default()
    }
}

/// Open loop: Put i is due at start + i/rate, whether or not earlier ones returned.
async fn open_loop(
    kv: &KvClient<Channel>,
    members: usize,
    rate: f64,
    duration: Duration,
) -> WriteResult {
    let total = (duration.as_secs_f64() * rate).floor() as usize;
    let samples = Arc::new(Mutex::new((Samples::default(), 0usize)));
    let mut progress = Progress::new(
        format!("etcd, {members} member(s), {rate}/s: sent"),
        total as u64,
    );
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let acknowledged = samples.lock().expect("samples").0.len();
        progress.update(i as u64 + 1, &format!("acknowledged {acknowledged}"));
        let (mut kv, samples) = (kv.clone(), samples.clone());
        tasks.push(tokio::spawn(async move {
            let ok = kv.put(put(i)).await.is_ok();
            let mut s = samples.lock().expect("samples");
            if ok {
                s.0.push(due.elapsed());
            } else {
                s.1 += 1;
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (samples, errors) = samples.lock().expect("samples").clone();
    progress.finish(total as u64, &format!("acknowledged {}", samples.len()));
    summary(members, Some(rate), total, &samples, errors, elapsed)
}

/// Closed loop: `writers` tasks each Put one after the other for `duration`.
async fn saturated(
    kv: &KvClient<Channel>,
    members: usize,
    writers: usize,
    duration: Duration,
) -> WriteResult {
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut kv = kv.clone();
        tasks.push(tokio::spawn(async move {
            let (mut samples, mut errors, mut i) = (Samples::default(), 0, 0);
            while Instant::now() < end {
                let at = Instant::now();
                match kv.put(put(w * 1_000_000 + i)).await {
                    Ok(_) => samples.push(at.elapsed()),
                    Err(_) => errors += 1,
                }
                i += 1;
            }
            (samples, errors)
        }));
    }
    let (mut all, mut errors) = (Samples::default(), 0);
    for task in tasks {
        if let Ok((samples, e)) = task.await {
            all.extend(&samples);
            errors += e;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    summary(members, None, all.len() + errors, &all, errors, elapsed)
}

fn summary(
    members: usize,
    offered_per_s: Option<f64>,
    sent: usize,
    samples: &Samples,
    errors: usize,
    elapsed_s: f64,
) -> WriteResult {
    WriteResult {
        members,
        offered_per_s,
        sent,
        acknowledged: samples.len(),
        errors,
        achieved_per_s: samples.len() as f64 / elapsed_s.max(1e-9),
        p50_ms: samples.percentile(50.0) / 1e3,
        p99_ms: samples.percentile(99.0) / 1e3,
    }
}

/// Part 1 at one member count.
async fn etcd_writes(args: &MembersArgs, members: usize) -> anyhow::Result<Vec<WriteResult>> {
    let dir = args.output.join(format!("etcd-m{members}"));
    let record = cluster::durable_etcd_only(&dir, members, Some(args.fsync_delay)).await?;
    let outcome = async {
        let kv = connect(&record.durable_etcd[0]).await?;
        let mut results = Vec::new();
        for rate in &args.write_rates {
            eprintln!(
                "  etcd, {members} member(s): {rate} Puts/s for {:?}",
                args.write_duration
            );
            results.push(open_loop(&kv, members, *rate, args.write_duration).await);
        }
        eprintln!(
            "  etcd, {members} member(s): {} writers for {:?}",
            args.writers, args.write_duration
        );
        results.push(saturated(&kv, members, args.writers, args.write_duration).await);
        anyhow::Ok(results)
    }
    .await;
    cluster::stop(&record).await?;
    outcome
}

/// Part 2 at one member count: the pod-churn load on each arm.
async fn pod_latency(args: &MembersArgs, members: usize) -> anyhow::Result<Vec<ArmResult>> {
    let churn = ChurnArgs {
        arms: args.arms.clone(),
        mode: Mode::Burst,
        interarrival: args.interarrival,
        duration: args.duration,
        initial: 0,
        nodes: args.nodes,
        shards: args.shards,
        client_qps: vec![args.client_qps],
        sweep: Vec::new(),
        fsync_delay: Some(args.fsync_delay),
        output: args.output.join(format!("pods-m{members}")),
        topology: Topology {
            etcd_members: members,
            replication_factor: 1,
            ..Default::default()
        },
        external: Default::default(),
        repeats: 1,
    };
    let mut results = Vec::new();
    for arm in &args.arms {
        eprintln!("  pods, {arm:?} arm, {members} member(s)");
        results.extend(load::run_arm(&churn, *arm, args.client_qps).await?);
    }
    Ok(results)
}

pub async fn run(args: MembersArgs) -> anyhow::Result<MembersReport> {
    if args.members.is_empty() {
        bail!("--members needs at least one member count");
    }
    if args.write_rates.iter().any(|r| r.is_nan() || *r <= 0.0) {
        bail!("--write-rates must be positive");
    }
    if args.interarrival.is_zero() || args.duration.is_zero() || args.write_duration.is_zero() {
        bail!("--interarrival, --duration and --write-duration must be positive");
    }
    if args.arms.contains(&Arm::Tuned) {
        bail!("the tuned arm has no durable etcd members to count");
    }
    std::fs::create_dir_all(&args.output)?;
    let mut report = MembersReport {
        fsync_delay_ms: args.fsync_delay.as_secs_f64() * 1e3,
        writes: Vec::new(),
        pods: Vec::new(),
    };
    for (i, members) in args.members.iter().enumerate() {
        eprintln!(
            "[{}/{}] durable etcd of {members} member(s)",
            i + 1,
            args.members.len()
        );
        report.writes.extend(etcd_writes(&args, *members).await?);
        if !args.arms.is_empty() {
            report.pods.extend(pod_latency(&args, *members).await?);
        }
    }
    print_report(&args, &report);
    let path = args.output.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    crate::plots::write_suite(
        crate::plots::Suite::Members,
        "members",
        serde_json::to_value(&report)?,
        &args.output,
    )?;
    eprintln!("raw results: {}", path.display());
    Ok(report)
}

fn print_report(args: &MembersArgs, report: &MembersReport) {
    println!();
    println!(
        "Durable etcd against its member count (members on 127.0.0.1, fsync delay {:?} each, no network delay between members; one client on the first member)",
        args.fsync_delay
    );
    println!();
    println!(
        "| members | load | acknowledged/sent | errors | achieved Puts/s | Put p50 / p99 ms |"
    );
    println!("|---|---|---|---|---|---|");
    for w in &report.writes {
        let load = match w.offered_per_s {
            Some(rate) => format!("{rate:.0}/s offered"),
            None => format!("{} writers, saturated", args.writers),
        };
        println!(
            "| {} | {load} | {}/{} | {} | {:.0} | {:.1} / {:.1} |",
            w.members, w.acknowledged, w.sent, w.errors, w.achieved_per_s, w.p50_ms, w.p99_ms
        );
    }
    if report.pods.is_empty() {
        return;
    }
    println!();
    println!(
        "Pod create→bound, a Deployment every {:?} for {:?}, {} on every arm",
        args.interarrival,
        args.duration,
        crate::arms::qps_name(args.client_qps)
    );
    println!();
    println!("| arm | members | bound/sent | achieved/s | create→bound p50 / p99 ms |");
    println!("|---|---|---|---|---|");
    for r in &report.pods {
        println!(
            "| {:?} | {} | {}/{} | {:.1} | {:.0} / {:.0} |",
            r.arm,
            r.etcd_members,
            r.bound,
            r.sent,
            r.achieved_per_s,
            r.bound_p50_ms,
            r.bound_p99_ms
        );
    }
    println!();
    for ste in report.pods.iter().filter(|r| r.arm == Arm::Ste) {
        let stock = report
            .pods
            .iter()
            .find(|r| r.arm == Arm::Stock && r.etcd_members == ste.etcd_members);
        if let Some(stock) = stock {
            println!(
                "Ste vs Stock, {} member(s): create→bound p50 ×{:.2}, p99 ×{:.2}",
                ste.etcd_members,
                ste.bound_p50_ms / stock.bound_p50_ms,
                ste.bound_p99_ms / stock.bound_p99_ms
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: MembersArgs,
    }

    #[test]
    fn defaults_compare_one_three_and_five_members_on_stock_and_ste() {
        let cli = Cli::try_parse_from(["members"]).unwrap();
        assert_eq!(cli.args.members, vec![1, 3, 5]);
        assert_eq!(cli.args.arms, vec![Arm::Stock, Arm::Ste]);
        assert_eq!(cli.args.client_qps, Some(200));
        let cli = Cli::try_parse_from(["members", "--client-qps", "default"]).unwrap();
        assert_eq!(cli.args.client_qps, None);
        assert!(Cli::try_parse_from(["members", "--members", "2"]).is_err());
    }
}
