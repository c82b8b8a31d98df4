//! Where a pod may go, decided from the node cache the way the scheduler's
//! default filters would, and only when that is clearly safe.
//!
//! Filters: node Ready and schedulable, taints tolerated (NoSchedule and
//! NoExecute), `nodeSelector`, required node affinity, CPU/memory/pods (and
//! any other requested resource) fitting the node's allocatable minus what
//! is bound there. Score: fewest pods of the same revision first (Knative's
//! default preferred anti-affinity on `kubernetes.io/hostname`), then nodes
//! already holding the images, then the least requested CPU.
//!
//! Anything the cache cannot judge (volumes claims, host ports, pod
//! affinity, required topology spread, another scheduler, pods asking for
//! preemption) makes the template "not clearly safe": the bridge then stands
//! aside and the scheduler does its job.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, PodSpec, Taint, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Requested resources in base units (CPU in millicores, everything else as
/// its integer quantity; memory in bytes).
pub type Resources = BTreeMap<String, i128>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Unsafe {
    #[error("pod template uses {0}, which the bridge leaves to the scheduler")]
    Feature(&'static str),
    #[error("cannot parse quantity {value:?} of {resource}")]
    Quantity { resource: String, value: String },
}

/// Parses a Kubernetes quantity into base units; CPU in millicores
/// (`milli = true`), anything else rounded up to whole units.
pub fn parse_quantity(q: &str, milli: bool) -> Option<i128> {
    let q = q.trim();
    if q.is_empty() {
        return None;
    }
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let (number, exp10): (&str, i32) = if let Some(rest) = suffix
        .strip_prefix(['e', 'E'])
        .filter(|r| !r.is_empty() && r.parse::<i32>().is_ok())
    {
        (number, rest.parse().ok()?)
    } else {
        (number, 0)
    };
    let value: f64 = number.parse().ok()?;
    let multiplier: f64 = match if exp10 != 0 { "" } else { suffix } {
        "" => 10f64.powi(exp10),
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => return None,
    };
    let base = value * multiplier * if milli { 1000.0 } else { 1.0 };
    if !base.is_finite() || base < 0.0 {
        return None;
    }
    Some(base.ceil() as i128)
}

fn add_quantities(
    into: &mut Resources,
    list: Option<&BTreeMap<String, Quantity>>,
    max: bool,
) -> Result<(), Unsafe> {
    for (name, q) in list.into_iter().flatten() {
        let v = parse_quantity(&q.0, name == "cpu").ok_or_else(|| Unsafe::Quantity {
            resource: name.clone(),
            value: q.0.clone(),
        })?;
        let slot = into.entry(name.clone()).or_insert(0);
        *slot = if max { (*slot).max(v) } else { *slot + v };
    }
    Ok(())
}

/// What a pod requests, as the scheduler counts it: the sum of the
/// containers (and restartable init containers), at least the largest init
/// container, plus the pod overhead.
pub fn pod_requests(spec: &PodSpec) -> Result<Resources, Unsafe> {
    let mut sum = Resources::new();
    for c in &spec.containers {
        add_quantities(
            &mut sum,
            c.resources.as_ref().and_then(|r| r.requests.as_ref()),
            false,
        )?;
    }
    let mut init_max = Resources::new();
    for c in spec.init_containers.iter().flatten() {
        let sidecar = c.restart_policy.as_deref() == Some("Always");
        add_quantities(
            if sidecar { &mut sum } else { &mut init_max },
            c.resources.as_ref().and_then(|r| r.requests.as_ref()),
            !sidecar,
        )?;
    }
    for (k, v) in init_max {
        let slot = sum.entry(k).or_insert(0);
        *slot = (*slot).max(v);
    }
    add_quantities(&mut sum, spec.overhead.as_ref(), false)?;
    Ok(sum)
}

/// Rejects templates whose placement depends on something the cache cannot
/// see or the scheduler alone should decide.
pub fn check_template(spec: &PodSpec) -> Result<(), Unsafe> {
    if spec.node_name.as_deref().is_some_and(|n| !n.is_empty()) {
        return Err(Unsafe::Feature("spec.nodeName"));
    }
    if spec
        .scheduler_name
        .as_deref()
        .is_some_and(|s| s != "default-scheduler")
    {
        return Err(Unsafe::Feature("another scheduler"));
    }
    if spec
        .volumes
        .iter()
        .flatten()
        .any(|v| v.persistent_volume_claim.is_some() || v.ephemeral.is_some())
    {
        return Err(Unsafe::Feature("persistent or ephemeral volume claims"));
    }
    if spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| {
            c.ports
                .iter()
                .flatten()
                .any(|p| p.host_port.is_some_and(|h| h != 0))
        })
    {
        return Err(Unsafe::Feature("host ports"));
    }
    if spec.host_network == Some(true) {
        return Err(Unsafe::Feature("host network"));
    }
    if let Some(affinity) = &spec.affinity {
        if affinity.pod_affinity.as_ref().is_some_and(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
                .is_some_and(|r| !r.is_empty())
        }) {
            return Err(Unsafe::Feature("required pod affinity"));
        }
        if affinity.pod_anti_affinity.as_ref().is_some_and(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
                .is_some_and(|r| !r.is_empty())
        }) {
            return Err(Unsafe::Feature("required pod anti-affinity"));
        }
    }
    if spec
        .topology_spread_constraints
        .iter()
        .flatten()
        .any(|t| t.when_unsatisfiable == "DoNotSchedule")
    {
        return Err(Unsafe::Feature("required topology spread constraints"));
    }
    if spec.resource_claims.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(Unsafe::Feature("dynamic resource claims"));
    }
    pod_requests(spec).map(|_| ())
}

fn tolerates(taint: &Taint, tolerations: &[Toleration]) -> bool {
    tolerations.iter().any(|t| {
        if t.effect
            .as_deref()
            .is_some_and(|e| !e.is_empty() && e != taint.effect)
        {
            return false;
        }
        let key = t.key.as_deref().unwrap_or("");
        let op = t.operator.as_deref().unwrap_or("Equal");
        if key.is_empty() {
            // An empty key with Exists tolerates every taint.
            return op == "Exists";
        }
        if key != taint.key {
            return false;
        }
        match op {
            "Exists" => true,
            "Equal" | "" => {
                t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
            }
            _ => false,
        }
    })
}

fn requirement_matches(req: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = req.values.as_deref().unwrap_or(&[]);
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if req.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

fn term_matches(term: &NodeSelectorTerm, node: &Node) -> bool {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let name = node.metadata.name.as_deref();
    let exprs = term.match_expressions.as_deref().unwrap_or(&[]);
    let fields = term.match_fields.as_deref().unwrap_or(&[]);
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
        && fields
            .iter()
            .all(|r| r.key == "metadata.name" && requirement_matches(r, name))
}

/// Whether `node` passes every filter except resources.
pub fn node_admits(node: &Node, spec: &PodSpec) -> bool {
    if node
        .spec
        .as_ref()
        .is_some_and(|s| s.unschedulable == Some(true))
    {
        return false;
    }
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if !ready {
        return false;
    }
    let tolerations = spec.tolerations.as_deref().unwrap_or(&[]);
    for taint in node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or(&[])
    {
        if (taint.effect == "NoSchedule" || taint.effect == "NoExecute")
            && !tolerates(taint, tolerations)
        {
            return false;
        }
    }
    let labels = node.metadata.labels.clone().unwrap_or_default();
    if let Some(selector) = &spec.node_selector {
        if selector.iter().any(|(k, v)| labels.get(k) != Some(v)) {
            return false;
        }
    }
    if let Some(required) = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
    {
        if !required
            .node_selector_terms
            .iter()
            .any(|t| term_matches(t, node))
        {
            return false;
        }
    }
    true
}

/// What is bound on each node, from the pod cache plus the bridge's own
/// recent creations not yet seen by the cache.
#[derive(Default, Debug, Clone)]
pub struct NodeUsage {
    pub requested: Resources,
    pub pods: i128,
    /// Pods of each revision (spread).
    pub by_revision: HashMap<String, u32>,
    /// Images of the pods running here (a node that runs an image holds it).
    pub images: std::collections::HashSet<String>,
}

impl NodeUsage {
    pub fn add(
        &mut self,
        requests: &Resources,
        revision: Option<&str>,
        images: impl IntoIterator<Item = String>,
    ) {
        for (k, v) in requests {
            *self.requested.entry(k.clone()).or_insert(0) += v;
        }
        self.pods += 1;
        if let Some(r) = revision {
            *self.by_revision.entry(r.to_string()).or_insert(0) += 1;
        }
        self.images.extend(images);
    }
}

/// Per-node usage of every non-terminal bound pod.
pub fn usage_from_pods<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> HashMap<String, NodeUsage> {
    let mut usage: HashMap<String, NodeUsage> = HashMap::new();
    for pod in pods {
        let Some(spec) = &pod.spec else { continue };
        let Some(node) = spec.node_name.as_deref().filter(|n| !n.is_empty()) else {
            continue;
        };
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded") | Some("Failed")) {
            continue;
        }
        // A pod whose requests do not parse still takes a pod slot.
        let requests = pod_requests(spec).unwrap_or_default();
        let revision = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(crate::REVISION_UID_LABEL))
            .map(String::as_str);
        let images = spec.containers.iter().filter_map(|c| c.image.clone());
        usage
            .entry(node.to_string())
            .or_default()
            .add(&requests, revision, images);
    }
    usage
}

fn allocatable(node: &Node) -> Result<Resources, Unsafe> {
    let mut out = Resources::new();
    add_quantities(
        &mut out,
        node.status.as_ref().and_then(|s| s.allocatable.as_ref()),
        false,
    )?;
    Ok(out)
}

fn node_has_images(node: &Node, usage: Option<&NodeUsage>, images: &[String]) -> bool {
    if images.is_empty() {
        return false;
    }
    let listed: std::collections::HashSet<&str> = node
        .status
        .as_ref()
        .and_then(|s| s.images.as_ref())
        .into_iter()
        .flatten()
        .flat_map(|i| i.names.iter().flatten().map(String::as_str))
        .collect();
    images
        .iter()
        .all(|i| listed.contains(i.as_str()) || usage.is_some_and(|u| u.images.contains(i)))
}

/// Picks the best node for one pod of `spec` (revision `revision`), or None
/// when no node is clearly safe. `usage` must include pods already placed
/// in this batch.
/// How a candidate node ranks; the greatest wins: fewest pods of this
/// revision already there, the revision's image present, least CPU requested,
/// then the name (lowest first) so equal nodes are chosen deterministically.
type NodeScore = (
    std::cmp::Reverse<u32>,
    bool,
    std::cmp::Reverse<i128>,
    std::cmp::Reverse<String>,
);

pub fn choose_node<'a>(
    nodes: &'a [std::sync::Arc<Node>],
    usage: &HashMap<String, NodeUsage>,
    spec: &PodSpec,
    requests: &Resources,
    revision: Option<&str>,
) -> Option<&'a Node> {
    let images: Vec<String> = spec
        .containers
        .iter()
        .filter_map(|c| c.image.clone())
        .collect();
    let mut best: Option<(NodeScore, &Node)> = None;
    for node in nodes {
        let Some(name) = node.metadata.name.as_deref() else {
            continue;
        };
        if node.metadata.deletion_timestamp.is_some() || !node_admits(node, spec) {
            continue;
        }
        let Ok(alloc) = allocatable(node) else {
            continue;
        };
        let used = usage.get(name);
        // Pods slot.
        let pods_alloc = alloc.get("pods").copied().unwrap_or(110);
        if used.map_or(0, |u| u.pods) + 1 > pods_alloc {
            continue;
        }
        // Every requested resource must be advertised and fit.
        let fits = requests.iter().all(|(k, v)| {
            if *v == 0 {
                return true;
            }
            let Some(a) = alloc.get(k) else { return false };
            used.and_then(|u| u.requested.get(k)).copied().unwrap_or(0) + v <= *a
        });
        if !fits {
            continue;
        }
        let same = revision
            .and_then(|r| used.and_then(|u| u.by_revision.get(r)))
            .copied()
            .unwrap_or(0);
        let cpu_used = used
            .and_then(|u| u.requested.get("cpu"))
            .copied()
            .unwrap_or(0);
        let key = (
            std::cmp::Reverse(same),
            node_has_images(node, used, &images),
            std::cmp::Reverse(cpu_used),
            std::cmp::Reverse(name.to_string()),
        );
        if best.as_ref().is_none_or(|(k, _)| key > *k) {
            best = Some((key, node));
        }
    }
    best.map(|(_, n)| n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    fn node(name: &str, cpu: &str, extra: serde_json::Value) -> Arc<Node> {
        let mut n = json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "zone": "a"}},
            "spec": {},
            "status": {"allocatable": {"cpu": cpu, "memory": "8Gi", "pods": "10"},
                       "conditions": [{"type": "Ready", "status": "True"}]}
        });
        merge(&mut n, extra);
        Arc::new(serde_json::from_value(n).unwrap())
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    fn spec(extra: serde_json::Value) -> PodSpec {
        let mut s = json!({"containers": [{"name": "user", "image": "img:1",
            "resources": {"requests": {"cpu": "500m", "memory": "100Mi"}}}]});
        merge(&mut s, extra);
        serde_json::from_value(s).unwrap()
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("500m", true), Some(500));
        assert_eq!(parse_quantity("2", true), Some(2000));
        assert_eq!(parse_quantity("0.25", true), Some(250));
        assert_eq!(parse_quantity("1Gi", false), Some(1 << 30));
        assert_eq!(parse_quantity("100M", false), Some(100_000_000));
        assert_eq!(parse_quantity("1e3", false), Some(1000));
        assert_eq!(parse_quantity("12Zi", false), None);
        assert_eq!(parse_quantity("", false), None);
    }

    #[test]
    fn requests_sum_containers_and_max_init() {
        let s = spec(
            json!({"initContainers": [{"name": "i", "resources": {"requests": {"cpu": "2"}}}],
            "overhead": {"cpu": "100m"}}),
        );
        let r = pod_requests(&s).unwrap();
        assert_eq!(r["cpu"], 2100);
        assert_eq!(r["memory"], 100 * 1024 * 1024);
    }

    #[test]
    fn filters_taints_selector_affinity_and_capacity() {
        let nodes = vec![
            node(
                "tainted",
                "4",
                json!({"spec": {"taints": [{"key": "gpu", "effect": "NoSchedule"}]}}),
            ),
            node(
                "notready",
                "4",
                json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
            ),
            node("small", "400m", json!({})),
            node("ok", "4", json!({})),
        ];
        let s = spec(json!({}));
        let req = pod_requests(&s).unwrap();
        let usage = HashMap::new();
        assert_eq!(
            choose_node(&nodes, &usage, &s, &req, None)
                .unwrap()
                .metadata
                .name
                .as_deref(),
            Some("ok")
        );

        let tolerant = spec(
            json!({"tolerations": [{"key": "gpu", "operator": "Exists"}], "nodeSelector": {"zone": "a"},
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["tainted"]}]}]}}}}),
        );
        assert_eq!(
            choose_node(&nodes, &usage, &tolerant, &req, None)
                .unwrap()
                .metadata
                .name
                .as_deref(),
            Some("tainted")
        );

        let wrong_zone = spec(json!({"nodeSelector": {"zone": "b"}}));
        assert!(choose_node(&nodes, &usage, &wrong_zone, &req, None).is_none());

        // "ok" is full once 3.6 CPUs are bound there.
        let mut full = HashMap::new();
        full.entry("ok".to_string())
            .or_insert_with(NodeUsage::default)
            .add(&[("cpu".to_string(), 3600)].into(), None, []);
        assert!(choose_node(&nodes, &full, &s, &req, None).is_none());
    }

    #[test]
    fn spreads_then_prefers_image() {
        let nodes = vec![
            node("a", "4", json!({})),
            node(
                "b",
                "4",
                json!({"status": {"images": [{"names": ["img:1"]}]}}),
            ),
            node("c", "4", json!({})),
        ];
        let s = spec(json!({}));
        let req = pod_requests(&s).unwrap();
        let mut usage = HashMap::new();
        assert_eq!(
            choose_node(&nodes, &usage, &s, &req, Some("rev"))
                .unwrap()
                .metadata
                .name
                .as_deref(),
            Some("b")
        );
        // b already has one pod of the revision: c (which runs the image for another revision) beats a.
        usage
            .entry("b".to_string())
            .or_insert_with(NodeUsage::default)
            .add(&req, Some("rev"), ["img:1".to_string()]);
        usage
            .entry("c".to_string())
            .or_insert_with(NodeUsage::default)
            .add(&Resources::new(), Some("other"), ["img:1".to_string()]);
        assert_eq!(
            choose_node(&nodes, &usage, &s, &req, Some("rev"))
                .unwrap()
                .metadata
                .name
                .as_deref(),
            Some("c")
        );
        // One on each: the next goes where the revision has the fewest, then the image.
        usage
            .entry("c".to_string())
            .or_insert_with(NodeUsage::default)
            .add(&req, Some("rev"), []);
        assert_eq!(
            choose_node(&nodes, &usage, &s, &req, Some("rev"))
                .unwrap()
                .metadata
                .name
                .as_deref(),
            Some("a")
        );
    }

    #[test]
    fn unsafe_templates() {
        assert_eq!(
            check_template(&spec(json!({"schedulerName": "other"}))),
            Err(Unsafe::Feature("another scheduler"))
        );
        assert_eq!(
            check_template(&spec(
                json!({"volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "c"}}]})
            )),
            Err(Unsafe::Feature("persistent or ephemeral volume claims"))
        );
        assert!(matches!(
            check_template(&spec(
                json!({"containers": [{"name": "user", "resources": {"requests": {"cpu": "lots"}}}]})
            )),
            Err(Unsafe::Quantity { .. })
        ));
        assert_eq!(check_template(&spec(json!({}))), Ok(()));
    }
}
