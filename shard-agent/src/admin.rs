//! The admin HTTP port: /livez, /readyz, /metrics.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;

use crate::state::AgentState;

pub fn router(state: Arc<AgentState>) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn livez(State(state): State<Arc<AgentState>>) -> impl IntoResponse {
    if state.is_live() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the supervisor loop is stuck\n",
        )
    }
}

async fn readyz(State(state): State<Arc<AgentState>>) -> impl IntoResponse {
    let etcd = match (state.etcd_healthy(), state.etcd_pid()) {
        (true, Some(pid)) => format!("healthy (pid {pid})"),
        (false, Some(pid)) => format!("not healthy (pid {pid})"),
        (_, None) => "not running".to_string(),
    };
    let registration = match (state.registration_enabled, state.registered()) {
        (false, _) => "disabled",
        (true, true) => "registered",
        (true, false) => "not registered",
    };
    let mut report = format!(
        "shard {}\netcd: {etcd}\nregistration: {registration}\n",
        state.shard_name
    );
    if state.draining() {
        report.push_str("draining\n");
    }
    if state.is_ready() {
        (StatusCode::OK, format!("ok\n{report}"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{report}"),
        )
    }
}

async fn metrics(State(state): State<Arc<AgentState>>) -> impl IntoResponse {
    let mut body = String::new();
    match encode(&mut body, &state.metrics.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("encoding metrics failed: {err}\n"),
        ),
    }
}
