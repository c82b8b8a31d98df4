//! `ste-bench coldstart-real --images …`: a cold start on a real node with
//! the revision's image already in the node's containerd, or not (issue 14:
//! image-aware placement measured on a real node).
//!
//! The function image is pushed into a loopback registry ([`crate::registry`])
//! and the revision names it by digest, `127.0.0.1:<port>/ste-function@sha256:…`
//! (Knative resolves tags to digests by asking the registry; a digest it
//! leaves alone). Before each wake the real nodes' containerds are set to the
//! scenario: the image pulled through the CRI where it should be present,
//! every `ste-function` image removed (`ctr images rm --sync`, its layers
//! collected) where it should be absent, so there the kubelet pulls it.
//! With `one-node` (two real nodes or more) only `real-node-1` holds it —
//! not real-node-0, which a placement without an image preference picks
//! first on a tie (the bridge's does, by name) — and
//! the wake waits until both nodes' status says so: that is what the
//! scheduler's ImageLocality and the bridge's placement read.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::core::v1::Node;
use serde::Serialize;

use super::real::{self, ImagePull, RealWake, WakeDetail, FIRST_RESPONSE, IMAGE_PULLED};
use crate::cluster::ClusterRecord;
use crate::real_node::{self, REAL_NODE_PREFIX};
use crate::registry::Registry;

/// Where the revision's image is before a wake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageState {
    /// In every real node's containerd.
    Present,
    /// In none: the kubelet pulls it from the loopback registry.
    Absent,
    /// Only in real-node-1's (needs two real nodes or more): which node
    /// does the pod go to? Not real-node-0, the one a tie goes to.
    OneNode,
}

impl ImageState {
    pub fn name(self) -> &'static str {
        match self {
            ImageState::Present => "present",
            ImageState::Absent => "absent",
            ImageState::OneNode => "one-node",
        }
    }

    /// Whether real node `index` holds the image in this state.
    fn on_node(self, index: usize) -> bool {
        match self {
            ImageState::Present => true,
            ImageState::Absent => false,
            ImageState::OneNode => index == 1,
        }
    }
}

/// The substring of every name the function image has on a node (the
/// imported `localhost/ste-function:v0.1.0` and the registry's digest).
const FUNCTION_REPO: &str = "ste-function";

/// The loopback registry holding the function image, and its digest reference.
pub struct FunctionImage {
    pub registry: Registry,
    pub image: String,
}

/// Starts the registry (log in `logs`) and pushes `images_dir/function.tar`.
pub fn push_function(images_dir: &Path, logs: &Path) -> anyhow::Result<FunctionImage> {
    let registry = Registry::start(logs)?;
    let archive = images_dir.join("function.tar");
    anyhow::ensure!(
        archive.is_file(),
        "{} missing: run hack/build-images.sh function",
        archive.display()
    );
    let image = registry.push(&archive, "ste-function:v0.1.0")?;
    Ok(FunctionImage { registry, image })
}

/// One cold start of the image scenario.
#[derive(Clone, Debug, Serialize)]
pub struct ImageWake {
    pub state: ImageState,
    pub wake: RealWake,
    pub detail: WakeDetail,
}

impl ImageWake {
    fn pulled(&self) -> bool {
        self.detail.image.as_ref().is_some_and(|i| i.pulled)
    }

    /// Whether the pod ran on a node that held the image before the wake.
    fn on_image_node(&self) -> Option<bool> {
        let node = self.detail.node.as_deref()?;
        let index = node.strip_prefix(REAL_NODE_PREFIX)?.parse().ok()?;
        Some(self.state.on_node(index))
    }
}

/// Sets every real node of the cluster in `dir` to `state` for `image`.
pub async fn prepare(
    dir: &Path,
    record: &ClusterRecord,
    image: &str,
    state: ImageState,
) -> anyhow::Result<()> {
    let nodes = real_node::read_record(dir)?
        .context("no real nodes recorded")?
        .nodes;
    anyhow::ensure!(
        state != ImageState::OneNode || nodes.len() >= 2,
        "--images one-node needs --real-nodes 2 or more"
    );
    let mut wanted = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let want = state.on_node(i);
        if want {
            if !real_node::images(node)?.iter().any(|n| n == image) {
                real_node::pull_image(node, image)?;
            }
        } else {
            // An image a container still uses keeps its layers.
            real_node::wait_no_container(node, "user-container", Duration::from_secs(60)).await?;
            real_node::remove_images(node, FUNCTION_REPO)?;
        }
        wanted.push((node.name.clone(), want));
    }
    if state == ImageState::OneNode {
        wait_node_status(record, image, &wanted, Duration::from_secs(120)).await?;
    }
    Ok(())
}

/// Waits until each node's status lists `image` exactly where wanted (the
/// kubelet refreshes its image list every 30 s, its status every 10 s).
async fn wait_node_status(
    record: &ClusterRecord,
    image: &str,
    wanted: &[(String, bool)],
    within: Duration,
) -> anyhow::Result<()> {
    let nodes: kube::Api<Node> = kube::Api::all(crate::api::client_for(record)?);
    let deadline = Instant::now() + within;
    loop {
        let mut wrong = Vec::new();
        for (name, want) in wanted {
            let node = nodes.get(name).await?;
            if node_lists(&node, image) != *want {
                wrong.push(name.as_str());
            }
        }
        if wrong.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the status of {wrong:?} did not show {image} as wanted within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Whether a node's status lists `image` among its images.
fn node_lists(node: &Node, image: &str) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.images.as_ref())
        .into_iter()
        .flatten()
        .any(|i| i.names.iter().flatten().any(|n| n == image))
}

/// `rounds` rounds of one cold start per state (states interleaved), each
/// prepared by [`prepare`], each answered by the function, each followed by
/// the revision back at zero.
pub async fn cold_starts(
    dir: &Path,
    record: &ClusterRecord,
    service: &str,
    image: &str,
    states: &[ImageState],
    rounds: usize,
) -> anyhow::Result<Vec<ImageWake>> {
    let mut out = Vec::new();
    for round in 0..rounds {
        for state in states {
            prepare(dir, record, image, *state).await?;
            let (wake, detail) =
                real::cold_start_detailed(record, service, Duration::from_secs(120)).await?;
            anyhow::ensure!(
                wake.answered(),
                "image {} round {round}: the activator answered {} {:?}",
                state.name(),
                wake.status,
                wake.body
            );
            let w = ImageWake {
                state: *state,
                wake,
                detail,
            };
            eprintln!(
                "    image {} round {round}: node {:?}, pulled {}, first response {:?} ms",
                state.name(),
                w.detail.node,
                w.pulled(),
                w.wake.ms.get(FIRST_RESPONSE)
            );
            out.push(w);
            real::back_to_zero(record, service, Duration::from_secs(120)).await?;
        }
    }
    Ok(out)
}

fn p50_max(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    match (v.get(v.len() / 2), v.last()) {
        (Some(p50), Some(max)) => format!("{p50:.0} / {max:.0}"),
        _ => "–".into(),
    }
}

/// Columns of the image table, ms from the request (p50 / max).
const COLUMNS: [&str; 4] = [
    "pod bound",
    IMAGE_PULLED,
    "container started",
    FIRST_RESPONSE,
];

/// Per arm and state: cold starts, how many pulled, how many ran on a node
/// holding the image, the kubelet's own pull time and the hops.
pub fn markdown(arms: &[(String, Vec<ImageWake>)]) -> String {
    let mut out = String::from(
        "| arm | image | cold starts | pulled | on a node with the image | kubelet's pull p50 / max (ms) |",
    );
    for c in COLUMNS {
        out.push_str(&format!(" {c} p50 / max (ms) |"));
    }
    out.push_str("\n|---|---|---:|---:|---:|---:|");
    out.push_str(&"---:|".repeat(COLUMNS.len()));
    out.push('\n');
    for (arm, wakes) in arms {
        let mut by_state: BTreeMap<&str, Vec<&ImageWake>> = BTreeMap::new();
        for w in wakes {
            by_state.entry(w.state.name()).or_default().push(w);
        }
        for (state, ws) in by_state {
            let pulled = ws.iter().filter(|w| w.pulled()).count();
            let on_image = ws
                .iter()
                .filter(|w| w.on_image_node() == Some(true))
                .count();
            let kubelet: Vec<f64> = ws
                .iter()
                .filter_map(|w| {
                    w.detail
                        .image
                        .as_ref()
                        .and_then(|i: &ImagePull| i.kubelet_ms)
                })
                .collect();
            out.push_str(&format!(
                "| {arm} | {state} | {} | {pulled} | {on_image} | {} |",
                ws.len(),
                p50_max(kubelet)
            ));
            for c in COLUMNS {
                let v = ws
                    .iter()
                    .filter_map(|w| w.wake.ms.get(c).copied())
                    .collect();
                out.push_str(&format!(" {} |", p50_max(v)));
            }
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wake(state: ImageState, node: &str, pull_ms: Option<f64>, first: f64) -> ImageWake {
        ImageWake {
            state,
            wake: RealWake {
                revision: "r".into(),
                ms: [(FIRST_RESPONSE.to_string(), first)].into_iter().collect(),
                status: 200,
                body: crate::real_node::FUNCTION_BODY.into(),
            },
            detail: WakeDetail {
                node: Some(node.into()),
                image: Some(ImagePull {
                    pulled: pull_ms.is_some(),
                    kubelet_ms: pull_ms,
                    size_bytes: None,
                }),
            },
        }
    }

    #[test]
    fn only_real_node_1_holds_the_image_in_one_node() {
        assert!(ImageState::OneNode.on_node(1));
        assert!(!ImageState::OneNode.on_node(0));
        assert!(ImageState::Present.on_node(3));
        assert!(!ImageState::Absent.on_node(0));
    }

    #[test]
    fn the_table_counts_pulls_and_pods_on_the_image_node() {
        let wakes = vec![
            wake(ImageState::OneNode, "real-node-1", None, 1500.0),
            wake(ImageState::OneNode, "real-node-0", Some(400.0), 2000.0),
            wake(ImageState::OneNode, "real-node-1", None, 1600.0),
            wake(ImageState::Absent, "real-node-0", Some(300.0), 1900.0),
        ];
        let table = markdown(&[("stock".into(), wakes)]);
        let rows: Vec<&str> = table.lines().skip(2).collect();
        assert_eq!(rows.len(), 2, "{table}");
        assert!(
            rows[0].starts_with("| stock | absent | 1 | 1 | 0 | 300 / 300 |"),
            "{table}"
        );
        assert!(
            rows[1].starts_with("| stock | one-node | 3 | 1 | 2 | 400 / 400 |"),
            "{table}"
        );
        assert!(rows[1].ends_with(" 1600 / 2000 |"), "{table}");
        assert_eq!(
            rows[1].matches('|').count(),
            table.lines().next().unwrap().matches('|').count()
        );
    }
}
