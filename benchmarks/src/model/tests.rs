//! The model's arithmetic on hand-made inputs, and one recorded results file.

use std::path::{Path, PathBuf};

use super::ceilings::{
    bottleneck, ceilings, client_ceilings, store_ceilings, worker_ceilings, Plane,
};
use super::costs::{by_arm, fit, ArmCosts, Cost, Step};
use super::facts::{parse_limit, requests_of, writes_to, Client, ClientLimit, Layout, Store};
use crate::arms::Arm;

fn plane(cores: f64, limit: ClientLimit) -> Plane {
    Plane {
        cores,
        layout: Layout::Workers,
        limit,
        durable_writes_per_s: 700.0,
        ram_writes_per_s: 5000.0,
        durable_write_s: 0.009,
        ram_write_s: 0.001,
        sync_workers: 5.0,
    }
}

fn cost(component: &str, per_ms: f64, idle: f64) -> Cost {
    Cost {
        component: component.into(),
        per_deployment_s: per_ms / 1e3,
        idle_cores: idle,
    }
}

fn arm(arm: Arm, costs: Vec<Cost>) -> ArmCosts {
    ArmCosts {
        arm,
        etcd_members: 1,
        costs,
        steps: Vec::new(),
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6 * b.abs().max(1.0)
}

#[test]
fn fit_separates_idle_cores_from_cost_per_deployment() {
    // 0.5 cores idle, 20 ms per Deployment, at 10/s and 20/s for 20 s.
    let points = [(20.0, 200.0, 10.0 + 4.0), (20.0, 400.0, 10.0 + 8.0)];
    let (idle, per) = fit(&points);
    assert!(close(idle, 0.5) && close(per, 0.02), "{idle} {per}");
}

#[test]
fn fit_of_one_step_charges_everything_to_the_deployments() {
    assert_eq!(fit(&[(10.0, 100.0, 5.0)]), (0.0, 0.05));
    // Two steps at one rate cannot separate the two: per Deployment only
    // (least squares: Σ n·c / Σ n²).
    let (idle, per) = fit(&[(10.0, 100.0, 5.0), (20.0, 200.0, 11.0)]);
    assert!(close(idle, 0.0) && close(per, 2700.0 / 50000.0));
}

#[test]
fn a_fit_that_would_go_negative_keeps_the_better_one_term_fit() {
    // CPU flat while the rate triples: all idle, nothing per Deployment
    // (the free fit gives a slightly negative cost per Deployment).
    let points = [(20.0, 200.0, 6.0), (20.0, 400.0, 5.9), (20.0, 600.0, 5.8)];
    let (idle, per) = fit(&points);
    assert_eq!(per, 0.0);
    assert!(close(idle, 17.7 / 60.0), "{idle}");
}

#[test]
fn requests_and_writes_add_up_from_the_counted_table() {
    assert!(close(requests_of(Client::DeploymentController), 5.11));
    assert!(close(requests_of(Client::ReplicaSetController), 4.38));
    assert!(close(requests_of(Client::Scheduler), 2.0));
    assert!(close(writes_to(Store::Objects), 1.0 + 1.0 + 2.08 + 2.21));
    assert!(close(writes_to(Store::Pods), 6.0));
}

#[test]
fn client_ceilings_are_qps_over_requests() {
    let default = client_ceilings(ClientLimit::Default);
    assert_eq!(default.len(), 3);
    assert!(close(default[0].per_s, 20.0 / 5.11));
    assert!(close(default[2].per_s, 50.0 / 2.0));
    let raised = client_ceilings(ClientLimit::Qps(200));
    assert!(close(raised[0].per_s, 200.0 / 5.11));
    assert!(client_ceilings(ClientLimit::Unlimited).is_empty());
    // stock-qps runs at 200 whatever is asked, except unlimited.
    assert_eq!(
        ClientLimit::Default.for_arm(Arm::StockQps),
        ClientLimit::Qps(200)
    );
    assert_eq!(
        ClientLimit::Default.for_arm(Arm::Stock),
        ClientLimit::Default
    );
}

#[test]
fn stock_sends_every_write_to_the_durable_etcd_and_ste_only_the_objects() {
    let p = plane(32.0, ClientLimit::Unlimited);
    let stock = store_ceilings(Arm::Stock, &p);
    assert!(close(
        stock[0].per_s,
        700.0 / (writes_to(Store::Objects) + 6.0)
    ));
    let ste = store_ceilings(Arm::Ste, &p);
    assert!(close(ste[0].per_s, 700.0 / writes_to(Store::Objects)));
    let over = store_ceilings(Arm::Override, &p);
    assert!(close(over[1].per_s, 5000.0 / 6.0));
}

#[test]
fn workers_wait_for_the_fsync_only_where_the_write_is_durable() {
    let p = plane(32.0, ClientLimit::Unlimited);
    // replicaset-controller: pod create (1) + status (2.21) + 409 (0.17).
    let stock = worker_ceilings(Arm::Stock, &p);
    let ste = worker_ceilings(Arm::Ste, &p);
    assert!(close(stock[1].per_s, 5.0 / (3.21 * 0.009 + 0.17 * 0.001)));
    assert!(close(ste[1].per_s, 5.0 / (2.21 * 0.009 + 1.17 * 0.001)));
    // The deployment controller's writes are durable on both.
    assert!(close(stock[0].per_s, ste[0].per_s));
}

#[test]
fn shards_and_kwok_leave_the_control_plane_and_the_cpu_ceiling_counts_idle() {
    let ste = arm(
        Arm::Ste,
        vec![
            cost("kube-apiserver", 20.0, 0.5),
            cost("ste-router", 4.0, 0.1),
            cost("shards", 5.0, 0.1),
            cost("kwok", 3.0, 0.0),
        ],
    );
    let workers = ceilings(&ste, &plane(2.0, ClientLimit::Unlimited));
    assert!(close(workers[0].per_s, (2.0 - 0.6) / 0.024));
    let one = Plane {
        layout: Layout::OneMachine,
        ..plane(2.0, ClientLimit::Unlimited)
    };
    let all = ceilings(&ste, &one);
    assert!(close(all[0].per_s, (2.0 - 0.7) / 0.032));
    // kwok's 4 workers only bound it on fewer than 4 cores... it has 2 here.
    assert!(all.iter().all(|c| !c.resource.starts_with("kwok")));
}

#[test]
fn a_single_threaded_component_is_bounded_by_one_core_and_named_as_the_bottleneck() {
    let a = arm(
        Arm::Tuned,
        vec![
            cost("kube-apiserver", 1.0, 0.0),
            cost("kube-scheduler", 50.0, 0.0),
        ],
    );
    let all = ceilings(&a, &plane(32.0, ClientLimit::Unlimited));
    let low = bottleneck(&all).expect("a bottleneck");
    assert!(low.resource.starts_with("kube-scheduler CPU"), "{low:?}");
    assert!(close(low.per_s, 20.0));
}

#[test]
fn limits_parse_and_bad_ones_are_refused() {
    assert_eq!(parse_limit("default"), Ok(ClientLimit::Default));
    assert_eq!(parse_limit("200"), Ok(ClientLimit::Qps(200)));
    assert_eq!(parse_limit("unlimited"), Ok(ClientLimit::Unlimited));
    assert!(parse_limit("0").is_err());
    assert!(parse_limit("fast").is_err());
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

#[test]
fn the_recorded_churn_run_loads_and_every_arm_gets_a_bounded_prediction() {
    let args = super::ModelArgs {
        from: repo("docs/results/churn.json"),
        cores: vec![2.0, 32.0],
        client_qps: vec![ClientLimit::Default, ClientLimit::Unlimited],
        members_from: repo("docs/results/members.json"),
        etcd_members: None,
        router_from: repo("docs/results/router.json"),
        fsync_delay: std::time::Duration::from_millis(8),
        sync_workers: 5.0,
        durable_writes_per_s: None,
        base_write: std::time::Duration::from_millis(1),
        layout: Layout::Workers,
        format: super::Format::Markdown,
    };
    let model = super::load(&args).expect("the recorded files load");
    let arms: Vec<Arm> = model.arms.iter().map(|a| a.arm).collect();
    for expected in [Arm::Stock, Arm::StockQps, Arm::Override, Arm::Ste] {
        assert!(
            arms.contains(&expected),
            "{expected:?} missing from {arms:?}"
        );
    }
    for a in &model.arms {
        assert!(a
            .costs
            .iter()
            .all(|c| c.per_deployment_s >= 0.0 && c.idle_cores >= 0.0));
        let apiserver = a.costs.iter().find(|c| c.component == "kube-apiserver");
        assert!(apiserver.is_some_and(|c| c.per_deployment_s > 0.0), "{a:?}");
        // At default limits on 32 cores the deployment controller's client binds.
        let p = Plane {
            cores: 32.0,
            ..model.plane
        };
        let low = ceilings(a, &p);
        let low = bottleneck(&low).expect("a bottleneck");
        assert!(low.per_s.is_finite() && low.per_s > 0.0);
        if a.arm != Arm::StockQps {
            assert!(
                low.resource.starts_with("deployment-controller client"),
                "{low:?}"
            );
        }
    }
    let text = super::render(&model, &args);
    assert!(text.contains("| Ste |") && text.contains("Check:"));
}

#[test]
fn a_missing_or_foreign_file_is_a_clear_error() {
    let missing = super::costs::load(Path::new("/nonexistent/results.json"));
    assert!(matches!(missing, Err(super::ModelError::Read { .. })));
    let foreign = super::costs::load(&repo("docs/results/members.json"));
    assert!(matches!(foreign, Err(super::ModelError::Parse { .. })));
    let rows = super::stores::durable_writes_per_s(&repo("docs/results/members.json"), 7);
    assert!(matches!(
        rows,
        Err(super::ModelError::NoSaturatedRow { .. })
    ));
}

#[test]
fn steps_group_by_arm_and_members() {
    let step = |arm, members, sent: usize, cpu: f64| Step {
        arm,
        client_qps: None,
        etcd_members: members,
        offered_per_s: 10.0,
        sent,
        achieved_per_s: 10.0,
        sustained: true,
        cpu_seconds: vec![("kube-apiserver".into(), cpu)],
        bound_p999_ms: 2000.0,
        bound_samples: vec![(12.0, 50.0)],
    };
    let arms = by_arm(&[
        step(Arm::Stock, 1, 100, 2.0),
        step(Arm::Ste, 1, 100, 1.0),
        step(Arm::Stock, 3, 100, 3.0),
    ]);
    assert_eq!(arms.len(), 3);
    // The window is the last bound sample (12 s) when it is after sending (10 s).
    assert!(close(arms[0].steps[0].window_s(), 12.0));
    assert!(close(arms[0].costs[0].per_deployment_s, 0.02));
}

#[test]
fn the_check_refits_without_the_highest_step_and_uses_the_cores_it_got() {
    // 0.5 cores idle and 40 ms per Deployment; the 30/s step only got 1.5
    // cores, so it achieved (1.5 − 0.5) / 0.04 = 25/s.
    let step = |rate: f64, achieved: f64, window: f64| {
        let sent = rate * 20.0;
        Step {
            arm: Arm::Tuned,
            client_qps: Some(100_000), // far above the CPU ceilings
            etcd_members: 1,
            offered_per_s: rate,
            sent: sent as usize,
            achieved_per_s: achieved,
            sustained: achieved >= 0.95 * rate,
            cpu_seconds: vec![("kube-apiserver".into(), 0.5 * window + 0.04 * sent)],
            bound_p999_ms: (window - 20.0) * 1e3,
            bound_samples: Vec::new(),
        }
    };
    let steps = [
        step(5.0, 5.0, 20.0),
        step(10.0, 10.0, 20.0),
        step(30.0, 25.0, 24.0),
    ];
    let arms = by_arm(&steps);
    let p = Plane {
        limit: ClientLimit::Unlimited,
        ..plane(2.0, ClientLimit::Unlimited)
    };
    let table = super::report::check_table(&arms, &p, 2.0);
    let row = &table.rows[0];
    // Every process on 2 cores: (2 − 0.5) / 0.04 = 37.5/s.
    assert!(row[4].starts_with("37.5/s: control-plane CPU"), "{row:?}");
    // Cores used in the 30/s step: (0.5·24 + 0.04·600) / 24 = 1.5.
    assert_eq!(row[6], "1.50");
    // Fitted on the 5 and 10/s steps alone, at 1.5 cores: 25/s, ×1.00.
    assert!(row[7].starts_with("25.0/s"), "{row:?}");
    assert_eq!(row[8], "×1.00");
}

#[test]
fn tables_render_as_markdown_and_as_padded_text() {
    let table = super::report::Table {
        header: vec!["arm".into(), "32 cores".into()],
        rows: vec![vec!["Ste".into(), "116.3/s".into()]],
    };
    assert_eq!(
        table.markdown(),
        "| arm | 32 cores |\n| --- | --- |\n| Ste | 116.3/s |\n"
    );
    assert_eq!(table.text(), "arm  32 cores\nSte  116.3/s\n");
}

#[test]
fn more_sync_workers_raise_the_worker_ceilings_in_proportion() {
    let p = plane(32.0, ClientLimit::Unlimited);
    let more = Plane {
        sync_workers: 20.0,
        ..p
    };
    let (five, twenty) = (
        worker_ceilings(Arm::Ste, &p),
        worker_ceilings(Arm::Ste, &more),
    );
    assert!(close(twenty[0].per_s, 4.0 * five[0].per_s));
    // ... and kube-controller-manager's core limit (2 × workers) with them.
    let a = arm(Arm::Ste, vec![cost("kube-controller-manager", 100.0, 0.0)]);
    let limited = |plane: &Plane| {
        ceilings(&a, plane)
            .into_iter()
            .find(|c| c.resource.starts_with("kube-controller-manager CPU"))
            .map(|c| c.per_s)
    };
    assert_eq!(limited(&p), Some(100.0));
    assert_eq!(limited(&more), None); // 40 cores of workers > 32: the shared cores bind
}
