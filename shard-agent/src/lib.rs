//! ste-shard-agent: runs a single-member RAM-disk etcd on a worker, keeps it
//! healthy, and registers it as an STE shard (`shards.ste.dev`) for the
//! routers. See `ste-shard-agent run --help`.

pub mod admin;
pub mod agent;
pub mod config;
pub mod etcd;
pub mod metrics;
pub mod registration;
pub mod state;

pub use agent::{run, AgentError};
pub use config::{Config, ConfigError, RunArgs};
