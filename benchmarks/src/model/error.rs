//! What can go wrong reading the model's inputs.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not the results file expected: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: a {arm} step sent nothing or has no positive offered rate")]
    BadStep { path: PathBuf, arm: String },
    #[error("{path} has no churn step of an arm the tool started")]
    NoArms { path: PathBuf },
    #[error("{path} has no saturated write row for {what}")]
    NoSaturatedRow { path: PathBuf, what: String },
    #[error("--cores must be positive numbers, got {0}")]
    BadCores(f64),
    #[error("{flag} must be positive, got {value}")]
    NotPositive { flag: &'static str, value: f64 },
}
