//! The admin HTTP port: /livez, /readyz, /metrics.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;

use crate::metrics::ShardLabels;
use crate::store::Store;

pub fn router(store: Arc<Store>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(store)
}

async fn readyz(State(store): State<Arc<Store>>) -> impl IntoResponse {
    let mut report = String::new();
    for shard in store.shard_list() {
        let state = match (shard.is_loaded(), shard.is_healthy()) {
            (true, true) => "ok",
            (false, _) => "not loaded",
            (true, false) => "unreachable",
        };
        report.push_str(&format!("shard {} ({}): {}\n", shard.id, shard.endpoint, state));
    }
    if store.is_ready() {
        (StatusCode::OK, format!("ok\n{report}"))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready\n{report}"))
    }
}

async fn metrics(State(store): State<Arc<Store>>) -> impl IntoResponse {
    let m = store.metrics();
    m.revision.set(store.sequencer().published());
    m.compact_revision.set(store.history().compact_revision());
    m.history_events.set(store.history().len() as i64);
    m.leases.set(store.lease_count() as i64);
    for (shard, keys) in store.keys_per_shard() {
        m.shard_keys
            .get_or_create(&ShardLabels { shard: shard.to_string() })
            .set(keys as i64);
    }
    for shard in store.shard_list() {
        m.shard_up
            .get_or_create(&ShardLabels { shard: shard.id.to_string() })
            .set((shard.is_loaded() && shard.is_healthy()) as i64);
    }
    let mut body = String::new();
    match encode(&mut body, &m.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            body,
        ),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("encoding metrics failed: {err}\n"),
        ),
    }
}
