//! Who spends the API budget on what: kube-apiserver's audit log of every
//! write, counted per component (from the client's user agent), resource
//! and verb in a time window ([`log`]), and as writes per wake in the
//! cold-start reports ([`table`]).
//!
//! `cluster up --audit` (`UpArgs::audit`) writes [`POLICY`] into the
//! cluster directory and starts kube-apiserver with it: writes (create,
//! update, patch, delete, deletecollection) at level Metadata (no bodies),
//! one event per request at ResponseComplete (`omitStages:
//! RequestReceived`), everything else (gets, lists, watches) at level None.
//! The log is JSON lines in `D/audit.log`, written in batches by a goroutine
//! of its own (`--audit-log-mode=batch`) so a request never waits on the
//! file; a batch is written at 200 events or after 1 s.

pub mod log;
pub mod table;

use std::path::{Path, PathBuf};

pub use log::{component, count_writes, count_writes_flushed, AuditError, Window};
pub use table::WritesPerWake;

/// The audit policy: writes at Metadata, nothing else.
pub const POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages:
  - RequestReceived
rules:
  - level: Metadata
    verbs: [create, update, patch, delete, deletecollection]
  - level: None
";

/// The audit log of the cluster in `dir`.
pub fn log_path(dir: &Path) -> PathBuf {
    dir.join("audit.log")
}

/// Writes [`POLICY`] into `dir` and returns kube-apiserver's flags for it.
pub fn apiserver_args(dir: &Path) -> std::io::Result<Vec<String>> {
    let policy = dir.join("audit-policy.yaml");
    std::fs::write(&policy, POLICY)?;
    Ok(vec![
        format!("--audit-policy-file={}", policy.display()),
        format!("--audit-log-path={}", log_path(dir).display()),
        "--audit-log-format=json".into(),
        "--audit-log-mode=batch".into(),
        "--audit-log-batch-max-size=200".into(),
        "--audit-log-batch-max-wait=1s".into(),
    ])
}
