//! A Knative cold start on a real node whose containerd does not hold the
//! revision's image: the function image is pushed into a loopback OCI
//! registry (go-containerregistry's, `hack/build-upstream.sh registry
//! crane`), the revision names it by digest, the node's containerd is told
//! to pull from that registry over plain HTTP, every `ste-function` image
//! is removed from the node before the wake — and ONE request through
//! Knative's activator gets the function's body back after the kubelet
//! pulled the image (its `Pulling` and `Pulled` events, in order between
//! the pod's binding and the first response).
//!
//! Needs root, `hack/build-upstream.sh` (kubelet, crictl, knative-*,
//! registry, crane) and `hack/build-images.sh pause function queue-proxy`.

use std::time::{Duration, Instant};

use ste_bench::cluster::{self, AgentArgs, Arm, UpArgs};
use ste_bench::coldstart::Knative;
use ste_bench::knative::real_image::{self, ImageState};
use ste_bench::knative::{self, real};
use ste_bench::real_node::{self as rn, RealNodeArgs};
use ste_testkit::repo_root;

fn check_prerequisites() {
    if let Some(missing) = real::missing_prerequisite(&["registry", "crane"]) {
        panic!("{missing}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_with_the_image_absent_pulls_it_from_the_loopback_registry_and_answers() {
    check_prerequisites();
    let started = Instant::now();
    let (dir, _guard) = ste_testkit::test_dir("knative-real-image-");
    let up = UpArgs::plain(Arm::Stock, 1, 0, dir.clone());
    let real = RealNodeArgs {
        real_nodes: 1,
        images_dir: repo_root().join("target/images"),
    };
    let record = cluster::up_with_real(&up, &AgentArgs::default(), &real)
        .await
        .expect("cluster up with one real node");

    let checks = async {
        let logs = dir.join("logs");
        let pushed = real_image::push_function(&repo_root().join("target/images"), &logs)
            .expect("the function image pushed into the loopback registry");
        assert!(
            pushed
                .image
                .starts_with(&format!("{}/ste-function@sha256:", pushed.registry.host)),
            "{}",
            pushed.image
        );
        rn::trust_registry(&dir, &pushed.registry.host).unwrap();
        let mut knative_processes = Knative::start(&record, &logs)
            .await
            .expect("Knative controller and autoscaler");
        knative::configure_autoscaler(&record).await.unwrap();
        let mut activator = real::ActivatorProcess::start(&record, &logs, Duration::from_secs(90))
            .await
            .expect("Knative's activator, connected to the autoscaler");
        real::create_function_service_of(&record, "fn-img", &pushed.image)
            .await
            .unwrap();
        real::wait_up_then_zero(&record, "fn-img", Duration::from_secs(180))
            .await
            .expect("the first pod Ready on the real node (image pulled), then back at zero");

        real_image::prepare(&dir, &record, &pushed.image, ImageState::Absent)
            .await
            .expect("the function image removed from the node");
        let node = rn::node(&dir, "real-node-0").unwrap();
        let left: Vec<String> = rn::images(&node)
            .unwrap()
            .into_iter()
            .filter(|i| i.contains("ste-function"))
            .collect();
        assert!(left.is_empty(), "still on the node: {left:?}");

        let (wake, detail) = real::cold_start_detailed(&record, "fn-img", Duration::from_secs(120))
            .await
            .expect("one request through the activator");
        eprintln!("{:?}\n{detail:?}", wake.ms);
        assert!(
            wake.answered(),
            "the activator answered {} {:?}",
            wake.status,
            wake.body
        );
        assert!(wake.problems().is_empty(), "hops: {:?}", wake.problems());
        assert_eq!(detail.node.as_deref(), Some("real-node-0"));
        let pull = detail
            .image
            .expect("the kubelet's Pulled event of the user container");
        assert!(pull.pulled, "the kubelet did not pull: {pull:?}");
        assert!(pull.kubelet_ms.is_some_and(|ms| ms > 0.0), "{pull:?}");
        let hop = |h: &str| {
            *wake
                .ms
                .get(h)
                .unwrap_or_else(|| panic!("{h} not seen: {:?}", wake.ms))
        };
        let (bound, pulling, pulled) = (
            hop("pod bound"),
            hop(real::IMAGE_PULLING),
            hop(real::IMAGE_PULLED),
        );
        let first = hop(real::FIRST_RESPONSE);
        assert!(
            bound <= pulling + 0.5 && pulling <= pulled && pulled <= first,
            "bound {bound} ≤ pulling {pulling} ≤ pulled {pulled} ≤ first response {first}"
        );
        assert!(
            rn::images(&node).unwrap().contains(&pushed.image),
            "the node holds the pulled image"
        );
        activator.check().expect("the activator still running");
        knative_processes.check().expect("Knative still running");
    };
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(checks)).await;
    let down = cluster::down(&cluster::DownArgs { dir: dir.clone() }).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    down.expect("cluster down");
    eprintln!("test took {:?}", started.elapsed());
}
