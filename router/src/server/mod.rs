//! The etcd v3 gRPC services, one file each. They translate requests into
//! calls on the store and the store's errors into etcd's statuses.

pub mod cluster;
pub mod kv;
pub mod lease;
pub mod maintenance;
pub mod watch;

use std::time::Instant;

use tonic::{Response, Status};

use crate::error::StoreError;
use crate::metrics::Metrics;

/// Turns a store result into a gRPC answer and records it.
pub(crate) fn answer<T>(
    metrics: &Metrics,
    method: &'static str,
    started: Instant,
    result: Result<T, StoreError>,
) -> Result<Response<T>, Status> {
    let result = result.map(Response::new).map_err(Status::from);
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    };
    metrics.rpc(method, code, started.elapsed().as_secs_f64());
    result
}
