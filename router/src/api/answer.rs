//! How every service answers: a store result as a gRPC response, recorded in the metrics.

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
