//! STE's benchmarks and the local control plane they run on.

pub mod api;
pub mod arms;
pub mod audit;
pub mod churn;
pub mod cluster;
pub mod coldstart;
pub mod external;
pub mod failure;
pub mod host;
pub mod interrupt;
pub mod jobs;
pub mod knative;
pub mod load;
pub mod measure;
pub mod members;
pub mod model;
pub mod plots;
pub mod progress;
pub mod real_node;
pub mod record;
pub mod registry;
pub mod ring;
pub mod router_bench;
pub mod startup;
pub mod stats;
