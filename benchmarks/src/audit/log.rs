//! Reading the audit log: one JSON event per line, streamed; the writes in
//! a time window counted per component, resource and verb, with their
//! response codes.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

/// The verbs the policy logs.
pub const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("reading the audit log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}, line {line}: not an audit event: {source}")]
    Malformed {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
    #[error("{path}, line {line}: requestReceivedTimestamp {value:?} is not an RFC 3339 UTC time")]
    Timestamp {
        path: PathBuf,
        line: usize,
        value: String,
    },
    #[error("{path}: no event received after the window's end within {waited:?} (batch not written yet?)")]
    NotFlushed { path: PathBuf, waited: Duration },
}

/// The fields of an audit event (audit.k8s.io/v1 `Event`) counted here.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct Event {
    stage: String,
    verb: String,
    #[serde(default)]
    user_agent: String,
    #[serde(default)]
    object_ref: Option<ObjectRef>,
    #[serde(default)]
    response_status: Option<Status>,
    request_received_timestamp: String,
}

#[derive(Deserialize, Debug)]
struct ObjectRef {
    #[serde(default)]
    resource: Option<String>,
    #[serde(default)]
    subresource: Option<String>,
}

#[derive(Deserialize, Debug)]
struct Status {
    #[serde(default)]
    code: Option<u16>,
}

/// Requests received from `from` (inclusive) to `to` (exclusive), wall clock.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub from: SystemTime,
    pub to: SystemTime,
}

impl Window {
    /// The window from `from` until now, both given as [`Instant`]s.
    pub fn since(from: Instant) -> Window {
        Window {
            from: wall_clock(from),
            to: SystemTime::now(),
        }
    }

    pub fn contains(&self, at: SystemTime) -> bool {
        at >= self.from && at < self.to
    }

    pub fn length(&self) -> Duration {
        self.to.duration_since(self.from).unwrap_or_default()
    }
}

/// The wall-clock time of `at` (audit events carry wall-clock times).
pub fn wall_clock(at: Instant) -> SystemTime {
    let now = (Instant::now(), SystemTime::now());
    match now.0.checked_duration_since(at) {
        Some(ago) => now.1 - ago,
        None => now.1 + at.duration_since(now.0),
    }
}

/// Who wrote, what, how.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WriteKey {
    /// From the user agent, see [`component`].
    pub component: String,
    /// `pods`, `pods/binding`, `deployments`, `podautoscalers/status`, …
    pub resource: String,
    pub verb: String,
}

/// Requests of one [`WriteKey`], whatever their answer.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteCount {
    pub writes: u64,
    /// Answered 409 Conflict (stale resourceVersion, or already exists).
    pub conflicts: u64,
    /// Answered 429 Too Many Requests (kube-apiserver's priority and
    /// fairness; a client's own rate limiter never reaches the server).
    pub throttled: u64,
    /// Any other answer ≥ 400.
    pub failed: u64,
}

impl WriteCount {
    fn add(&mut self, code: Option<u16>) {
        self.writes += 1;
        match code {
            Some(409) => self.conflicts += 1,
            Some(429) => self.throttled += 1,
            Some(c) if c >= 400 => self.failed += 1,
            _ => {}
        }
    }
}

/// The component a user agent names: the program, and the controller when
/// the client names one after the build's `kubernetes/<commit>`, e.g.
/// `kube-controller-manager/v1.34.10 (linux/amd64) kubernetes/d4c1c2d/replicaset-controller`
/// → `kube-controller-manager/replicaset-controller`;
/// `knative-autoscaler/v0.0.0 (linux/amd64) kubernetes/$Format` →
/// `knative-autoscaler`. No user agent: `(none)`.
pub fn component(user_agent: &str) -> String {
    let user_agent = user_agent.trim();
    let program = user_agent
        .split(['/', ' '])
        .next()
        .filter(|p| !p.is_empty());
    let Some(program) = program else {
        return "(none)".into();
    };
    let controller = user_agent
        .split_once(" kubernetes/")
        .and_then(|(_, build)| build.split_once('/'))
        .map(|(_, name)| name.trim())
        .filter(|name| !name.is_empty());
    match controller {
        Some(name) => format!("{program}/{name}"),
        None => program.to_string(),
    }
}

/// The writes in `window`, per component, resource and verb, from the audit
/// log `reader` (named `path` in errors). A last line that does not parse
/// is a batch still being written, and is left out; any other line that
/// does not parse is an error.
pub fn count_reader(
    reader: impl BufRead,
    path: &Path,
    window: &Window,
) -> Result<Counted, AuditError> {
    let mut counted = Counted::default();
    let mut torn: Option<AuditError> = None;
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|source| AuditError::Io {
            path: path.into(),
            source,
        })?;
        if let Some(error) = torn.take() {
            return Err(error);
        }
        if line.trim().is_empty() {
            continue;
        }
        let event: Event = match serde_json::from_str(&line) {
            Ok(event) => event,
            Err(source) => {
                torn = Some(AuditError::Malformed {
                    path: path.into(),
                    line: i + 1,
                    source,
                });
                continue;
            }
        };
        let received =
            humantime::parse_rfc3339(&event.request_received_timestamp).map_err(|_| {
                AuditError::Timestamp {
                    path: path.into(),
                    line: i + 1,
                    value: event.request_received_timestamp.clone(),
                }
            })?;
        if received >= window.to {
            counted.after_window = true;
        }
        if !window.contains(received) || !counts(&event) {
            continue;
        }
        let key = WriteKey {
            component: component(&event.user_agent),
            resource: resource(event.object_ref.as_ref()),
            verb: event.verb.clone(),
        };
        let code = event.response_status.as_ref().and_then(|s| s.code);
        counted.writes.entry(key).or_default().add(code);
    }
    Ok(counted)
}

/// What [`count_reader`] found.
#[derive(Debug, Default)]
pub struct Counted {
    pub writes: BTreeMap<WriteKey, WriteCount>,
    /// An event received at or after the window's end was in the log: every
    /// write of the window was written out (batches are in order).
    pub after_window: bool,
}

/// One write request, seen once: its ResponseComplete (or Panic) event.
fn counts(event: &Event) -> bool {
    matches!(event.stage.as_str(), "ResponseComplete" | "Panic")
        && WRITE_VERBS.contains(&event.verb.as_str())
}

fn resource(object: Option<&ObjectRef>) -> String {
    let Some(object) = object else {
        return "(non-resource)".into();
    };
    let resource = object.resource.as_deref().unwrap_or("(none)");
    match object.subresource.as_deref() {
        Some(sub) if !sub.is_empty() => format!("{resource}/{sub}"),
        _ => resource.to_string(),
    }
}

/// [`count_reader`] on the file at `path`.
pub fn count_writes(path: &Path, window: &Window) -> Result<Counted, AuditError> {
    let file = std::fs::File::open(path).map_err(|source| AuditError::Io {
        path: path.into(),
        source,
    })?;
    count_reader(std::io::BufReader::new(file), path, window)
}

/// [`count_writes`] once the log holds an event received after the window
/// (kube-apiserver writes its batches within a second; node lease renewals
/// keep coming), waiting `within` at most.
pub async fn count_writes_flushed(
    path: &Path,
    window: &Window,
    within: Duration,
) -> Result<BTreeMap<WriteKey, WriteCount>, AuditError> {
    let deadline = Instant::now() + within;
    loop {
        let counted = count_writes(path, window)?;
        if counted.after_window {
            return Ok(counted.writes);
        }
        if Instant::now() >= deadline {
            return Err(AuditError::NotFlushed {
                path: path.into(),
                waited: within,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ten events from a real run (knative_wake, stock arm, 2026-12-02),
    /// one line each, as kube-apiserver wrote them.
    const FIXTURE: &str = include_str!("fixture.jsonl");

    fn at(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).unwrap()
    }

    fn all() -> Window {
        Window {
            from: at("2026-12-02T08:00:00Z"),
            to: at("2026-12-02T09:00:00Z"),
        }
    }

    fn count(text: &str, window: &Window) -> Result<Counted, AuditError> {
        count_reader(text.as_bytes(), Path::new("fixture.jsonl"), window)
    }

    fn key(component: &str, resource: &str, verb: &str) -> WriteKey {
        WriteKey {
            component: component.into(),
            resource: resource.into(),
            verb: verb.into(),
        }
    }

    #[test]
    fn components_come_from_the_user_agent() {
        let cases = [
            (
                "kube-controller-manager/v1.34.10 (linux/amd64) kubernetes/unknown/replicaset-controller",
                "kube-controller-manager/replicaset-controller",
            ),
            (
                "kube-scheduler/v1.34.10 (linux/amd64) kubernetes/unknown/scheduler",
                "kube-scheduler/scheduler",
            ),
            (
                "knative-autoscaler/v0.0.0 (linux/amd64) kubernetes/$Format",
                "knative-autoscaler",
            ),
            ("kwok/v0.8.0 (linux/amd64)", "kwok"),
            ("ste-activator-bridge/0.1.0", "ste-activator-bridge"),
            ("ste-bench/0.1.0", "ste-bench"),
            ("", "(none)"),
        ];
        for (agent, expected) in cases {
            assert_eq!(component(agent), expected, "{agent}");
        }
    }

    #[test]
    fn every_write_is_counted_by_component_resource_and_verb() {
        let counted = count(FIXTURE, &all()).unwrap();
        let w = &counted.writes;
        assert_eq!(w.values().map(|c| c.writes).sum::<u64>(), 10);
        let pa = &w[&key("knative-autoscaler", "podautoscalers/status", "update")];
        assert_eq!((pa.writes, pa.conflicts), (2, 1));
        assert_eq!(
            w[&key("knative-autoscaler", "deployments", "patch")].writes,
            1
        );
        let pods = key(
            "kube-controller-manager/replicaset-controller",
            "pods",
            "create",
        );
        assert_eq!(w[&pods].writes, 1);
        let bind = key("kube-scheduler/scheduler", "pods/binding", "create");
        assert_eq!(w[&bind].writes, 1);
        assert_eq!(w[&key("kwok", "pods/status", "patch")].writes, 1);
        assert_eq!(w[&key("ste-bench", "leases", "create")].conflicts, 1);
        assert!(!counted.after_window);
    }

    #[test]
    fn only_requests_received_in_the_window_count() {
        // The wake's second: the autoscaler's patch and what followed it.
        let window = Window {
            from: at("2026-12-02T08:39:28Z"),
            to: at("2026-12-02T08:39:28.300Z"),
        };
        let counted = count(FIXTURE, &window).unwrap();
        let keys: Vec<&WriteKey> = counted.writes.keys().collect();
        assert_eq!(
            keys,
            [
                &key("knative-autoscaler", "deployments", "patch"),
                &key(
                    "kube-controller-manager/deployment-controller",
                    "replicasets",
                    "update"
                ),
                &key(
                    "kube-controller-manager/replicaset-controller",
                    "pods",
                    "create"
                ),
            ]
        );
        assert!(counted.after_window, "later events are in the log");
    }

    #[test]
    fn a_torn_last_line_is_left_out_and_a_torn_middle_line_is_an_error() {
        let last = FIXTURE.lines().last().unwrap();
        let torn = format!("{FIXTURE}{}", &last[..last.len() / 2]);
        let counted = count(&torn, &all()).expect("a batch being written");
        assert_eq!(counted.writes.values().map(|c| c.writes).sum::<u64>(), 10);
        let middle = format!("{}\n{FIXTURE}", &last[..last.len() / 2]);
        let error = count(&middle, &all()).unwrap_err();
        assert!(
            matches!(error, AuditError::Malformed { line: 1, .. }),
            "{error}"
        );
    }

    #[test]
    fn refusals_are_counted_apart() {
        // The real patch line with its answer edited to 429, then to 500.
        let patch = FIXTURE.lines().next().unwrap();
        let throttled = patch.replace("\"code\":200", "\"code\":429");
        let failed = patch.replace("\"code\":200", "\"code\":500");
        assert_ne!(throttled, patch);
        let text = format!("{patch}\n{throttled}\n{failed}\n");
        let counted = count(&text, &all()).unwrap();
        let c = counted.writes[&key("knative-autoscaler", "deployments", "patch")];
        assert_eq!(
            c,
            WriteCount {
                writes: 3,
                conflicts: 0,
                throttled: 1,
                failed: 1
            }
        );
    }

    #[test]
    fn a_bad_timestamp_is_a_clear_error() {
        let line = FIXTURE.lines().next().unwrap();
        let bad = line.replace("2026-12-02T08:39:28.182457Z", "yesterday");
        let error = count(&format!("{bad}\n"), &all()).unwrap_err();
        assert!(error.to_string().contains("\"yesterday\""), "{error}");
    }
}
