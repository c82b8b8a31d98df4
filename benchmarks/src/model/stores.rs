//! The stores' measured write ceilings: the durable etcd's saturated Puts/s
//! per member count (`ste-bench members`, fsync delayed) and one plain RAM
//! etcd's saturated writes/s (`ste-bench router`, its `etcd` arm).

use std::path::Path;

use serde::Deserialize;

use super::error::ModelError;

#[derive(Deserialize)]
struct Members {
    writes: Vec<WriteRow>,
}

#[derive(Deserialize)]
struct WriteRow {
    members: usize,
    /// None: the saturated (closed-loop writers) row.
    offered_per_s: Option<f64>,
    achieved_per_s: f64,
}

#[derive(Deserialize)]
struct RouterRow {
    arm: String,
    saturated_writes_per_s: f64,
}

fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Read {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ModelError::Parse {
        path: path.into(),
        source,
    })
}

/// Saturated Puts/s of a durable etcd of `members` members, from a
/// `ste-bench members` results file.
pub fn durable_writes_per_s(path: &Path, members: usize) -> Result<f64, ModelError> {
    let file: Members = read(path)?;
    file.writes
        .iter()
        .find(|w| w.members == members && w.offered_per_s.is_none())
        .map(|w| w.achieved_per_s)
        .ok_or_else(|| ModelError::NoSaturatedRow {
            path: path.into(),
            what: format!("{members} member(s)"),
        })
}

/// Saturated writes/s of one plain etcd, from a `ste-bench router` results file.
pub fn ram_writes_per_s(path: &Path) -> Result<f64, ModelError> {
    let rows: Vec<RouterRow> = read(path)?;
    rows.iter()
        .find(|r| r.arm == "etcd")
        .map(|r| r.saturated_writes_per_s)
        .ok_or_else(|| ModelError::NoSaturatedRow {
            path: path.into(),
            what: "the plain etcd arm".into(),
        })
}
