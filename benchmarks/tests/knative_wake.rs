//! Revisions woken the way Knative's activator wakes them: request stats
//! over the autoscaler's websocket (ste_bench::knative::stats), against the
//! real local control plane (kube-apiserver, kube-controller-manager,
//! kube-scheduler, kwok) and Knative Serving's own controller and autoscaler
//! (hack/knative, built by hack/build-upstream.sh). The bench never patches
//! a Deployment: the autoscaler must decide, patch, and later take the
//! revisions back to zero by itself.

use std::time::{Duration, Instant};

use serde_json::Value;
use ste_bench::cluster::{self, Arm, ClusterRecord, RunningCluster, UpArgs};
use ste_bench::coldstart::{self, Knative};
use ste_bench::knative::{self, hops::Hop};

fn get(record: &ClusterRecord, path: &str) -> Value {
    let (code, body) = record.api().curl(&[path]).unwrap();
    assert_eq!(code, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// The field managers that own a Deployment's `spec.replicas`.
fn replicas_managers(record: &ClusterRecord, service: &str) -> Vec<String> {
    let d = get(
        record,
        &format!(
            "/apis/apps/v1/namespaces/default/deployments/{}",
            coldstart::deployment_of(service)
        ),
    );
    d["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| !m["fieldsV1"]["f:spec"]["f:replicas"].is_null())
        .filter_map(|m| m["manager"].as_str().map(String::from))
        .collect()
}

/// Requests answered 2xx.
fn succeeded(c: ste_bench::audit::log::WriteCount) -> u64 {
    c.writes - c.conflicts - c.throttled - c.failed
}

/// The audit log's writes from the first wake on tell the same story as the
/// watches: every wake cost at least one Deployment patch by the
/// autoscaler, one ReplicaSet scale by the Deployment controller, one pod
/// by the ReplicaSet controller, and every pod created was bound by the
/// scheduler (no bridge, no webhook here).
async fn api_writes_match_the_wakes(dir: &std::path::Path, round: &knative::hops::WakeRound) {
    let first = *round.sent.values().min().expect("wakes sent");
    let window = ste_bench::audit::Window::since(first);
    let log = ste_bench::audit::log_path(dir);
    let writes = ste_bench::audit::count_writes_flushed(&log, &window, Duration::from_secs(15))
        .await
        .expect("the audit log covers the round");
    let writes = ste_bench::audit::WritesPerWake::new(&writes, round.wakes.len(), window.length());
    eprintln!(
        "{}",
        ste_bench::audit::table::markdown(&[("stock, 3 wakes".into(), &writes)])
    );
    let wakes = round.wakes.len() as u64;
    let patches = succeeded(writes.writes("knative-autoscaler", "deployments", "patch"));
    assert!(
        patches >= wakes,
        "autoscaler Deployment patches: {patches} for {wakes} wakes"
    );
    let scales = succeeded(writes.writes(
        "kube-controller-manager/deployment-controller",
        "replicasets",
        "update",
    ));
    assert!(
        scales >= wakes,
        "ReplicaSet scales: {scales} for {wakes} wakes"
    );
    let pods = succeeded(writes.writes(
        "kube-controller-manager/replicaset-controller",
        "pods",
        "create",
    ));
    assert!(pods >= wakes, "pods created: {pods} for {wakes} wakes");
    let bound = succeeded(writes.writes("kube-scheduler", "pods/binding", "create"));
    assert_eq!(bound, pods, "every pod created was bound by the scheduler");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_autoscaler_wakes_revisions_from_activator_stats_and_takes_them_back_to_zero() {
    let started = Instant::now();
    // STE_KEEP_TEST_DIR=1 keeps the cluster's and the components' logs.
    let (dir, _guard) = ste_testkit::test_dir("knative-wake-");
    let mut up = UpArgs::plain(Arm::Stock, 2, 4, dir.clone());
    up.audit = true;
    let record = cluster::up(&up).await.expect("cluster up");
    let running = RunningCluster::new(record.clone());
    let record = running.record();
    let leases = coldstart::keep_node_leases(record).unwrap();
    let mut knative_processes = Knative::start(record, &dir.join("logs"))
        .await
        .expect("Knative controller and autoscaler");
    knative::configure_autoscaler(record).await.unwrap();
    let client = ste_bench::api::client_for(record).unwrap();
    let services: Vec<String> = (0..3).map(|i| format!("wake-{i}")).collect();
    for s in &services {
        coldstart::create_service(&client, s, "100m").await.unwrap();
    }
    coldstart::wait_at_zero(&client, &services, Duration::from_secs(90))
        .await
        .expect("revisions at zero");
    knative::wait_autoscaler_quiet(record, Duration::from_secs(2), Duration::from_secs(90))
        .await
        .expect("the autoscaler done with the new revisions");
    let activator = knative::connect_activator(Duration::from_secs(30))
        .await
        .expect("the autoscaler's stat server");

    let round = knative::wake_round(
        record,
        &activator,
        &services,
        "stock",
        Duration::from_secs(120),
    )
    .await
    .expect("every revision woken through the autoscaler");
    eprintln!("{}", knative::markdown(std::slice::from_ref(&round)));
    assert_eq!(round.wakes.len(), services.len());
    for wake in &round.wakes {
        for hop in [
            Hop::Scaled,
            Hop::PodCreated,
            Hop::PodBound,
            Hop::PodReady,
            Hop::Endpoints,
        ] {
            assert!(
                wake.ms.contains_key(&hop),
                "{}: no {} seen: {:?}",
                wake.revision,
                hop.name(),
                wake.ms
            );
        }
        assert!(
            wake.out_of_order().is_empty(),
            "{}: hops out of order: {:?}",
            wake.revision,
            wake.ms
        );
    }
    assert!(round.stat_messages >= services.len() as u64);
    api_writes_match_the_wakes(&dir, &round).await;
    // The autoscaler patched spec.replicas (its field manager is its binary's
    // name), nobody else but the Knative controller that made the Deployment.
    for s in &services {
        let managers = replicas_managers(record, s);
        assert!(
            managers.iter().any(|m| m == "knative-autoscaler")
                && managers.iter().all(|m| m.starts_with("knative-")),
            "{s}: spec.replicas managed by {managers:?}"
        );
    }

    // No more requests: the autoscaler scales them back to zero by itself.
    knative::back_to_zero(record, &activator, &services, Duration::from_secs(120))
        .await
        .expect("the autoscaler took the revisions back to zero");
    activator.stop();
    knative_processes
        .check()
        .expect("Knative's components still running");
    leases.abort();
    eprintln!("test took {:?}", started.elapsed());
}

/// `ste-bench coldstart --arms stock --revisions 1 --repeats 2` with no
/// bridge: two repeats, each on its own cluster, every round keeps its
/// repeat and its wakes, and the spread table covers both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coldstart_repeats_keep_every_round_and_report_their_spread() {
    let started = Instant::now();
    let (dir, _guard) = ste_testkit::test_dir("coldstart-repeats-");
    let args = coldstart::ColdstartArgs {
        arms: vec![Arm::Stock],
        revisions: vec![1],
        nodes: 2,
        shards: 2,
        client_qps: None,
        fsync_delay: None,
        topology: Default::default(),
        bridge_modes: Vec::new(),
        bridge_bin: None,
        settle: 1,
        wake: knative::Wake::Stats,
        repeats: 2,
        warmup: true,
        sweep: Default::default(),
        output: dir.clone(),
    };
    let results = coldstart::run(args)
        .await
        .expect("two repeats of one round");
    let repeats: Vec<u64> = results.iter().map(|r| r.repeat).collect();
    assert_eq!(repeats, [0, 1]);
    for r in &results {
        let hops = r.hops.as_ref().expect("woken through the autoscaler");
        assert_eq!(hops.wakes.len(), r.revisions, "{r:?}");
        assert!(r.pods_seen >= r.revisions, "{r:?}");
        // Without the bridge each revision's one pod is bound, and no other.
        assert_eq!(r.pods_bound, r.revisions, "{r:?}");
        assert!(r.ready_p50_ms >= r.bound_p50_ms, "{r:?}");
        // Every arm is audited: the round's writes, counted per wake.
        let writes = r.api_writes.as_ref().expect("the round's API writes");
        assert_eq!(writes.wakes, r.revisions);
        let patches = succeeded(writes.writes("knative-autoscaler", "deployments", "patch"));
        assert!(patches >= r.revisions as u64, "{writes:?}");
        let created = succeeded(writes.writes(
            "kube-controller-manager/replicaset-controller",
            "pods",
            "create",
        ));
        assert!(
            created as usize >= r.revisions && created as usize <= r.pods_seen,
            "{writes:?}"
        );
    }
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("coldstart.json")).unwrap())
            .unwrap();
    let saved = saved.as_array().expect("a list of rounds");
    assert_eq!(saved.len(), results.len());
    assert!(saved.iter().any(|r| r["repeat"] == 1));
    let table = std::fs::read_to_string(dir.join("coldstart.md")).unwrap();
    assert!(
        table.contains("| Stock | none | 1 | 2 |"),
        "no spread row over both repeats:\n{table}"
    );
    assert!(
        table.contains("| Stock r1 ×1 bridge none | knative-autoscaler |"),
        "no writes-per-wake rows:\n{table}"
    );
    assert!(saved[0]["api_writes"]["rows"].is_array(), "{}", saved[0]);
    // The plots read both repeats as such.
    let plots = ste_bench::plots::input::coldstart(
        "c",
        &[("coldstart.json".into(), Value::Array(saved.clone()))],
    )
    .expect("the plots read the rounds");
    let mut seen: Vec<usize> = plots.latencies.iter().map(|s| s.repeat).collect();
    seen.sort();
    assert_eq!(seen, [0, 1]);
    eprintln!("{table}\ntest took {:?}", started.elapsed());
}

/// `ste-bench coldstart --arms stock --sweep 1 --sweep-duration 5s
/// --sweep-pool 4`: one open-loop step through the autoscaler. Its counts
/// add up (scheduled = sent + pool misses + not sent, sent = answered +
/// timed out), the pool is never used past its size, every answered wake
/// went through its hops in order, the verdict follows the counts, and
/// coldstart.json / coldstart.md / the figure hold the sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_loop_sweep_step_counts_every_wake_it_schedules() {
    let started = Instant::now();
    let (dir, _guard) = ste_testkit::test_dir("coldstart-sweep-");
    let pool = 4;
    let args = coldstart::ColdstartArgs {
        arms: vec![Arm::Stock],
        revisions: vec![1],
        nodes: 2,
        shards: 2,
        client_qps: None,
        fsync_delay: None,
        topology: Default::default(),
        bridge_modes: Vec::new(),
        bridge_bin: None,
        settle: 1,
        wake: knative::Wake::Stats,
        repeats: 1,
        warmup: false,
        sweep: coldstart::sweep::SweepArgs {
            rates: vec![1.0],
            sweep_duration: Duration::from_secs(5),
            sweep_pool: Some(pool),
            sweep_deadline: Duration::from_secs(90),
            sweep_p95_max: Duration::from_secs(90),
            sweep_bridge_modes: vec!["none".into()],
        },
        output: dir.clone(),
    };
    let report = coldstart::sweep::run(&args)
        .await
        .expect("a one-step sweep");
    assert_eq!(report.steps.len(), 1);
    let step = &report.steps[0];
    let c = step.counts;
    eprintln!("{}", coldstart::sweep::report::one_line(step));
    assert!(c.consistent(), "{c:?}");
    assert_eq!(c.scheduled, 5, "1/s for 5 s, the first at 0");
    assert_eq!(step.wakes.len() as u64, c.sent);
    // A revision is back in the pool only ≥ 6 s after its answer (the
    // autoscaler's grace): within 5 s none can be woken twice.
    assert!(c.sent <= pool as u64, "{c:?}");
    assert_eq!(c.timed_out, 0, "every wake answered within 90 s: {c:?}");
    assert_eq!(step.verdict.pool_limited, c.pool_misses > 0);
    assert_eq!(step.verdict.sustained, step.verdict.reasons.is_empty());
    if c.pool_misses > 0 {
        assert!(!step.verdict.sustained);
    }
    for w in step.wakes.iter().filter(|w| w.answered) {
        for hop in [Hop::Scaled, Hop::PodCreated, Hop::PodBound, Hop::Endpoints] {
            assert!(
                w.ms.contains_key(&hop),
                "{}: no {}: {:?}",
                w.revision,
                hop.name(),
                w.ms
            );
        }
        let hops = ste_bench::knative::hops::WakeHops {
            revision: w.revision.clone(),
            ms: w.ms.clone(),
        };
        assert!(hops.out_of_order().is_empty(), "{:?}", w.ms);
    }
    let p = step.endpoints_ms;
    assert_eq!(p.p50.is_some(), c.answered > 0);
    if let (Some(p50), Some(p99)) = (p.p50, p.p99) {
        assert!(p50 <= p99);
    }
    assert_eq!(report.highest.len(), 1);
    assert_eq!(
        report.highest[0].highest_per_s.is_some(),
        step.verdict.sustained
    );
    // What the run wrote.
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("coldstart.json")).unwrap())
            .unwrap();
    let s = &saved["sweep"]["steps"][0];
    assert_eq!(s["scheduled"], c.scheduled);
    assert_eq!(s["pool_misses"], c.pool_misses);
    let table = std::fs::read_to_string(dir.join("coldstart.md")).unwrap();
    assert!(table.contains("| Stock | none | 1 | 5 |"), "{table}");
    assert!(table.contains("SUSTAINED"), "{table}");
    if c.answered > 0 {
        assert!(
            dir.join("coldstart-lines.svg").exists(),
            "the sweep's figure"
        );
    }
    eprintln!("{table}\ntest took {:?}", started.elapsed());
}
