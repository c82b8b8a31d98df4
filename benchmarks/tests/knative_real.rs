//! A Knative cold start on a real node, to the first HTTP response through
//! Knative's own activator: a cluster with one real node (kubelet +
//! containerd, no kwok node), Knative's controller, autoscaler and activator
//! as host processes, a Knative Service of the function image (min-scale 0)
//! whose first pod the autoscaler takes back to zero; then ONE request sent
//! to the activator gets the function's body back, and every hop from the
//! request to the response is seen: autoscaler patch, pod created, bound,
//! user container started, pod Ready (queue-proxy's probe of the user
//! container), pod IP in the revision's private Endpoints, first response.
//!
//! Needs root, `hack/build-upstream.sh` (kubelet, crictl, knative-*) and
//! `hack/build-images.sh pause function queue-proxy`. Missing pieces fail
//! the test with what to run.

use std::time::{Duration, Instant};

use ste_bench::cluster::{self, AgentArgs, Arm, UpArgs};
use ste_bench::coldstart::Knative;
use ste_bench::knative::{self, real};
use ste_bench::real_node::RealNodeArgs;
use ste_testkit::repo_root;

fn check_prerequisites() {
    if let Some(missing) = real::missing_prerequisite(&[]) {
        panic!("{missing}");
    }
}

/// The cold start's writes in the audit log: the autoscaler's Deployment
/// patch, the ReplicaSet controller's pod, the scheduler's binding of that
/// pod, and the kubelet's pod status.
async fn cold_start_writes_match(dir: &std::path::Path, window: ste_bench::audit::Window) {
    let log = ste_bench::audit::log_path(dir);
    let writes = ste_bench::audit::count_writes_flushed(&log, &window, Duration::from_secs(30))
        .await
        .expect("the audit log covers the cold start");
    let writes = ste_bench::audit::WritesPerWake::new(&writes, 1, window.length());
    eprintln!(
        "{}",
        ste_bench::audit::table::markdown(&[("stock, real node".into(), &writes)])
    );
    let ok = |c: ste_bench::audit::log::WriteCount| c.writes - c.conflicts - c.throttled - c.failed;
    let patches = ok(writes.writes("knative-autoscaler", "deployments", "patch"));
    assert!(
        patches >= 1,
        "no Deployment patch by the autoscaler: {writes:?}"
    );
    let pods = ok(writes.writes(
        "kube-controller-manager/replicaset-controller",
        "pods",
        "create",
    ));
    assert!(pods >= 1, "no pod created: {writes:?}");
    let bound = ok(writes.writes("kube-scheduler", "pods/binding", "create"));
    assert_eq!(bound, pods, "every pod created bound by the scheduler");
    let status = ok(writes.writes("kubelet", "pods/status", "patch"));
    assert!(status >= 1, "no pod status from the kubelet: {writes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_through_the_activator_wakes_a_revision_on_a_real_node_and_gets_the_function_body(
) {
    check_prerequisites();
    let started = Instant::now();
    // STE_KEEP_TEST_DIR=1 keeps the cluster's and the components' logs.
    let (dir, _guard) = ste_testkit::test_dir("knative-real-");
    let mut up = UpArgs::plain(Arm::Stock, 1, 0, dir.clone());
    up.audit = true;
    let real = RealNodeArgs {
        real_nodes: 1,
        images_dir: repo_root().join("target/images"),
    };
    let record = cluster::up_with_real(&up, &AgentArgs::default(), &real)
        .await
        .expect("cluster up with one real node");
    eprintln!("cluster up: {:.1}s", started.elapsed().as_secs_f64());

    let checks = async {
        let logs = dir.join("logs");
        let mut knative_processes = Knative::start(&record, &logs)
            .await
            .expect("Knative controller and autoscaler");
        knative::configure_autoscaler(&record).await.unwrap();
        let mut activator = real::ActivatorProcess::start(&record, &logs, Duration::from_secs(90))
            .await
            .expect("Knative's activator, connected to the autoscaler");
        real::create_function_service(&record, "fn-real")
            .await
            .unwrap();
        real::wait_up_then_zero(&record, "fn-real", Duration::from_secs(180))
            .await
            .expect("the first pod Ready on the real node, then the revision back at zero");
        eprintln!("revision at zero: {:.1}s", started.elapsed().as_secs_f64());

        let from = Instant::now();
        let wake = real::cold_start(&record, "fn-real", Duration::from_secs(120))
            .await
            .expect("one request through the activator");
        cold_start_writes_match(&dir, ste_bench::audit::Window::since(from)).await;
        eprintln!(
            "{}",
            real::markdown(&[("stock".into(), vec![wake.clone()])])
        );
        assert!(
            wake.answered(),
            "the activator answered {} {:?}, not the function's body",
            wake.status,
            wake.body
        );
        assert!(
            wake.problems().is_empty(),
            "hops: {:?} ({:?})",
            wake.problems(),
            wake.ms
        );
        activator.check().expect("the activator still running");
        knative_processes
            .check()
            .expect("Knative's components still running");
    };
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(checks)).await;
    let down = cluster::down(&cluster::DownArgs { dir: dir.clone() }).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    down.expect("cluster down");
    eprintln!("test took {:?}", started.elapsed());
}
