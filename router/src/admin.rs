//! The admin HTTP port: /livez, /readyz, /metrics.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use prometheus_client::encoding::text::encode;

use crate::membership::Membership;
use crate::metrics::ShardLabels;
use crate::ring::ShardId;
use crate::shard::ShardSpec;
use crate::store::Store;

#[derive(Clone)]
struct AdminState {
    store: Arc<Store>,
    membership: Membership,
}

pub fn router(store: Arc<Store>, membership: Membership) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/shards", get(shards).post(join_shard))
        .route("/shards/{name}/drain", post(drain_shard))
        .with_state(AdminState { store, membership })
}

/// GET /shards: members, their keys, bytes and state (JSON).
async fn shards(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!("{}\n", state.membership.describe()),
    )
}

#[derive(serde::Deserialize)]
struct JoinRequest {
    name: String,
    endpoint: String,
}

/// POST /shards {"name": …, "endpoint": …}: a shard joins (registrations
/// normally do this; for clusters without the Shard resource and for tests).
async fn join_shard(State(state): State<AdminState>, body: String) -> impl IntoResponse {
    let request: JoinRequest = match serde_json::from_str(&body) {
        Ok(request) => request,
        Err(err) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("expected {{\"name\": …, \"endpoint\": …}}: {err}\n"),
            )
        }
    };
    match ShardSpec::parse(&format!("{}={}", request.name, request.endpoint)) {
        Ok(spec) => {
            state.membership.request_join(&spec);
            (StatusCode::ACCEPTED, format!("shard {} will join\n", request.name))
        }
        Err(reason) => (StatusCode::BAD_REQUEST, format!("{reason}\n")),
    }
}

/// POST /shards/{name}/drain: move the shard's keys off, then remove it.
async fn drain_shard(State(state): State<AdminState>, Path(name): Path<String>) -> impl IntoResponse {
    if state.membership.request_drain(&ShardId::new(&name)) {
        (StatusCode::ACCEPTED, format!("shard {name} will be drained\n"))
    } else {
        (StatusCode::NOT_FOUND, format!("shard {name} is not a member\n"))
    }
}

async fn readyz(State(AdminState { store, .. }): State<AdminState>) -> impl IntoResponse {
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

async fn metrics(State(AdminState { store, .. }): State<AdminState>) -> impl IntoResponse {
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
        m.shard_bytes
            .get_or_create(&ShardLabels { shard: shard.id.to_string() })
            .set(shard.db_bytes.load(std::sync::atomic::Ordering::Relaxed));
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
