//! API writes per wake: a round's writes (see [`super::log`]) divided by
//! its wakes, per component, as the cold-start reports show them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::log::{WriteCount, WriteKey};

/// One component's writes of one resource with one verb, in a round.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct WriteRow {
    pub component: String,
    pub resource: String,
    pub verb: String,
    #[serde(flatten)]
    pub count: WriteCount,
    /// `count.writes` ÷ the round's wakes.
    pub per_wake: f64,
}

/// A round's writes, every row divided by its wakes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct WritesPerWake {
    pub wakes: usize,
    /// Length of the counted window (first wake → end of the round).
    pub window_ms: u64,
    pub rows: Vec<WriteRow>,
}

fn per(count: u64, wakes: usize) -> f64 {
    (count as f64 / wakes.max(1) as f64 * 100.0).round() / 100.0
}

impl WritesPerWake {
    pub fn new(
        writes: &BTreeMap<WriteKey, WriteCount>,
        wakes: usize,
        window: std::time::Duration,
    ) -> Self {
        let rows = writes
            .iter()
            .map(|(key, count)| WriteRow {
                component: key.component.clone(),
                resource: key.resource.clone(),
                verb: key.verb.clone(),
                count: *count,
                per_wake: per(count.writes, wakes),
            })
            .collect();
        WritesPerWake {
            wakes,
            window_ms: window.as_millis() as u64,
            rows,
        }
    }

    /// Adds another round's writes and wakes (e.g. the cold starts of an arm).
    pub fn merge(&mut self, other: &WritesPerWake) {
        let mut counts: BTreeMap<WriteKey, WriteCount> = BTreeMap::new();
        for row in self.rows.iter().chain(&other.rows) {
            let c = counts.entry(row.key()).or_default();
            c.writes += row.count.writes;
            c.conflicts += row.count.conflicts;
            c.throttled += row.count.throttled;
            c.failed += row.count.failed;
        }
        let window = std::time::Duration::from_millis(self.window_ms + other.window_ms);
        *self = WritesPerWake::new(&counts, self.wakes + other.wakes, window);
    }

    /// Writes of `resource` with `verb` by components starting with `component`.
    pub fn writes(&self, component: &str, resource: &str, verb: &str) -> WriteCount {
        let mut total = WriteCount::default();
        for row in self.rows.iter().filter(|r| {
            r.component.starts_with(component) && r.resource == resource && r.verb == verb
        }) {
            total.writes += row.count.writes;
            total.conflicts += row.count.conflicts;
            total.throttled += row.count.throttled;
            total.failed += row.count.failed;
        }
        total
    }

    /// Lease writes of every component in the round: leader election and
    /// node heartbeats, which go on whether anything wakes or not.
    pub fn background(&self) -> WriteCount {
        let mut total = WriteCount::default();
        for row in self.rows.iter().filter(|r| r.is_background()) {
            total.writes += row.count.writes;
            total.conflicts += row.count.conflicts;
            total.throttled += row.count.throttled;
            total.failed += row.count.failed;
        }
        total
    }

    /// Per component, leases left out ([`Self::background`]): its writes,
    /// their sum of conflicts and 429s, and its rows, most writes first.
    pub fn by_component(&self) -> Vec<ComponentWrites<'_>> {
        let mut by: BTreeMap<&str, ComponentWrites> = BTreeMap::new();
        for row in self.rows.iter().filter(|r| !r.is_background()) {
            let c = by.entry(&row.component).or_insert_with(|| ComponentWrites {
                component: &row.component,
                total: WriteCount::default(),
                rows: Vec::new(),
            });
            c.total.writes += row.count.writes;
            c.total.conflicts += row.count.conflicts;
            c.total.throttled += row.count.throttled;
            c.total.failed += row.count.failed;
            c.rows.push(row);
        }
        let mut list: Vec<ComponentWrites> = by.into_values().collect();
        for c in &mut list {
            c.rows.sort_by_key(|r| std::cmp::Reverse(r.count.writes));
        }
        list.sort_by_key(|c| std::cmp::Reverse(c.total.writes));
        list
    }
}

impl WriteRow {
    /// Leases: see [`WritesPerWake::background`].
    pub fn is_background(&self) -> bool {
        self.resource == "leases"
    }

    fn key(&self) -> WriteKey {
        WriteKey {
            component: self.component.clone(),
            resource: self.resource.clone(),
            verb: self.verb.clone(),
        }
    }
}

/// One component's share of a round, see [`WritesPerWake::by_component`].
pub struct ComponentWrites<'a> {
    pub component: &'a str,
    pub total: WriteCount,
    pub rows: Vec<&'a WriteRow>,
}

/// Which client limit paces each component's writes (what the cold-start
/// tables say under their writes-per-wake table).
pub const PACING: &str = "Client limits: knative-autoscaler 10 QPS / burst 20 per clientset, hard-coded \
(knative.dev/serving v0.42.2 cmd/autoscaler/main.go: `cfg.QPS = controllerNum * rest.DefaultQPS`, 2 × 5, \
set after `--kube-api-qps`/`KUBE_API_QPS` are read, so both are ignored; its Deployment patches go through \
its dynamic client, PodAutoscaler/Metric writes through the serving clientset, SKS through the networking one); \
knative-controller 45 / 90 (9 controllers × 5 / 10, knative.dev/pkg injection/sharedmain; it honours \
`--kube-api-qps`/`KUBE_API_QPS`); kube-controller-manager 20 / 30 and kube-scheduler 50 / 100 (Kubernetes' \
defaults; the stock-qps arm raises both); ste-activator-bridge its `--kube-api-qps` (50 / 100); kwok and \
ste-bench unthrottled. A client-side wait leaves no trace here: 429 counts only kube-apiserver's own refusals.";

/// Rounds' writes per wake, one row per round and component: writes per
/// wake, total writes, conflicts and 429s, and the component's top
/// resources (writes per wake, verb).
pub fn markdown(rounds: &[(String, &WritesPerWake)]) -> String {
    let mut out = String::from(
        "| round | component | writes / wake | writes | 409 | 429 | what (writes / wake) |\n|---|---|---:|---:|---:|---:|---|\n",
    );
    for (label, round) in rounds {
        for c in round.by_component() {
            let what: Vec<String> = c
                .rows
                .iter()
                .take(4)
                .map(|r| format!("{} {} {}", r.resource, r.verb, r.per_wake))
                .collect();
            out.push_str(&format!(
                "| {label} | {} | {} | {} | {} | {} | {} |\n",
                c.component,
                per(c.total.writes, round.wakes),
                c.total.writes,
                c.total.conflicts,
                c.total.throttled,
                what.join(", ")
            ));
        }
        let leases = round.background();
        out.push_str(&format!(
            "| {label} | (leases, every component: background) | {} | {} | {} | {} | |\n",
            per(leases.writes, round.wakes),
            leases.writes,
            leases.conflicts,
            leases.throttled
        ));
    }
    out.push('\n');
    out.push_str(PACING);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writes(rows: &[(&str, &str, &str, u64, u64)]) -> BTreeMap<WriteKey, WriteCount> {
        rows.iter()
            .map(|(component, resource, verb, writes, conflicts)| {
                (
                    WriteKey {
                        component: component.to_string(),
                        resource: resource.to_string(),
                        verb: verb.to_string(),
                    },
                    WriteCount {
                        writes: *writes,
                        conflicts: *conflicts,
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    #[test]
    fn writes_are_divided_by_the_wakes_and_grouped_by_component() {
        let counts = writes(&[
            ("knative-autoscaler", "deployments", "patch", 5, 0),
            (
                "knative-autoscaler",
                "podautoscalers/status",
                "update",
                12,
                2,
            ),
            ("kube-scheduler/scheduler", "pods/binding", "create", 5, 0),
            ("ste-bench", "leases", "create", 10, 10),
        ]);
        let round = WritesPerWake::new(&counts, 5, std::time::Duration::from_millis(1500));
        assert_eq!(round.window_ms, 1500);
        let by = round.by_component();
        assert_eq!(by[0].component, "knative-autoscaler");
        assert_eq!((by[0].total.writes, by[0].total.conflicts), (17, 2));
        assert_eq!(by[0].rows[0].resource, "podautoscalers/status");
        assert_eq!(by[0].rows[0].per_wake, 2.4);
        assert_eq!(
            by.len(),
            2,
            "leases are background, not a component's share"
        );
        assert_eq!(round.background().conflicts, 10);
        assert_eq!(round.writes("knative-", "deployments", "patch").writes, 5);
        let table = markdown(&[("r".into(), &round)]);
        assert!(
            table.contains("| r | knative-autoscaler | 3.4 | 17 | 2 | 0 |"),
            "{table}"
        );
        assert!(table.contains("| r | (leases, every component: background) | 2 | 10 | 10 | 0 | |"));
        assert!(table.contains("cmd/autoscaler/main.go"));
    }

    #[test]
    fn rounds_merge_into_one_per_wake_figure() {
        let one = writes(&[("kwok", "pods/status", "patch", 2, 0)]);
        let mut all = WritesPerWake::new(&one, 1, std::time::Duration::from_secs(1));
        let two = writes(&[
            ("kwok", "pods/status", "patch", 3, 1),
            ("ste-bench", "services", "create", 1, 0),
        ]);
        all.merge(&WritesPerWake::new(
            &two,
            2,
            std::time::Duration::from_secs(2),
        ));
        assert_eq!((all.wakes, all.window_ms), (3, 3000));
        let kwok = all.writes("kwok", "pods/status", "patch");
        assert_eq!((kwok.writes, kwok.conflicts), (5, 1));
        assert_eq!(all.rows[0].per_wake, 1.67);
    }
}
