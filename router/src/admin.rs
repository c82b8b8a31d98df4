//! The admin HTTP port: /livez, /readyz, /metrics.

use std::sync::{Arc, RwLock};

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use prometheus_client::encoding::text::encode;

use crate::membership::Membership;
use crate::metrics::ShardLabels;
use crate::placement::ring::ShardId;
use crate::shard::ShardSpec;
use crate::store::Store;

#[derive(Clone)]
struct AdminState {
    store: Arc<Store>,
    membership: Membership,
}

/// What the admin port reports on: the store while this router serves,
/// nothing while it starts or follows another router.
#[derive(Clone, Default)]
pub struct Slot(Arc<RwLock<SlotState>>);

#[derive(Default)]
enum SlotState {
    #[default]
    Starting,
    Following(String),
    Serving(AdminState),
}

impl Slot {
    pub fn set_serving(&self, store: Arc<Store>, membership: Membership) {
        *self.0.write().expect("slot lock") = SlotState::Serving(AdminState { store, membership });
    }

    pub fn set_follower(&self, identity: &str) {
        *self.0.write().expect("slot lock") = SlotState::Following(identity.to_string());
    }

    pub fn clear(&self) {
        *self.0.write().expect("slot lock") = SlotState::Starting;
    }

    fn serving(&self) -> Result<AdminState, (StatusCode, String)> {
        match &*self.0.read().expect("slot lock") {
            SlotState::Serving(state) => Ok(state.clone()),
            SlotState::Following(identity) => Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready\n{identity} is a standby: another router is the leader\n"),
            )),
            SlotState::Starting => Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready\nstarting\n".into(),
            )),
        }
    }
}

pub fn router(slot: Slot) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/shards", get(shards).post(join_shard))
        .route("/shards/{name}/drain", post(drain_shard))
        .with_state(slot)
}

/// GET /shards: members, their keys, bytes and state (JSON).
async fn shards(State(slot): State<Slot>) -> Response {
    match slot.serving() {
        Ok(state) => (
            [(header::CONTENT_TYPE, "application/json")],
            format!("{}\n", state.membership.describe()),
        )
            .into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

#[derive(serde::Deserialize)]
struct JoinRequest {
    name: String,
    endpoint: String,
}

/// POST /shards {"name": …, "endpoint": …}: a shard joins (registrations
/// normally do this; for clusters without the Shard resource and for tests).
async fn join_shard(State(slot): State<Slot>, body: String) -> Response {
    let state = match slot.serving() {
        Ok(state) => state,
        Err(refusal) => return refusal.into_response(),
    };
    let request: JoinRequest = match serde_json::from_str(&body) {
        Ok(request) => request,
        Err(err) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("expected {{\"name\": …, \"endpoint\": …}}: {err}\n"),
            )
                .into_response()
        }
    };
    match ShardSpec::parse(&format!("{}={}", request.name, request.endpoint)) {
        Ok(spec) => {
            state.membership.request_join(&spec);
            (
                StatusCode::ACCEPTED,
                format!("shard {} will join\n", request.name),
            )
                .into_response()
        }
        Err(reason) => (StatusCode::BAD_REQUEST, format!("{reason}\n")).into_response(),
    }
}

/// POST /shards/{name}/drain: move the shard's keys off, then remove it.
async fn drain_shard(State(slot): State<Slot>, Path(name): Path<String>) -> Response {
    let state = match slot.serving() {
        Ok(state) => state,
        Err(refusal) => return refusal.into_response(),
    };
    if state.membership.request_drain(&ShardId::new(&name)) {
        (
            StatusCode::ACCEPTED,
            format!("shard {name} will be drained\n"),
        )
            .into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            format!("shard {name} is not a member\n"),
        )
            .into_response()
    }
}

async fn readyz(State(slot): State<Slot>) -> Response {
    let store = match slot.serving() {
        Ok(state) => state.store,
        Err(refusal) => return refusal.into_response(),
    };
    let mut report = String::new();
    for shard in store.shard_list() {
        let state = match (shard.is_loaded(), shard.is_healthy()) {
            (true, true) => "ok",
            (false, _) => "not loaded",
            (true, false) => "unreachable",
        };
        report.push_str(&format!(
            "shard {} ({}): {}\n",
            shard.id, shard.endpoint, state
        ));
    }
    if store.is_ready() {
        (StatusCode::OK, format!("ok\n{report}")).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{report}"),
        )
            .into_response()
    }
}

async fn metrics(State(slot): State<Slot>) -> Response {
    let store = match slot.serving() {
        Ok(state) => state.store,
        // A standby exports nothing of the store (its metrics would be stale).
        Err(_) => {
            return (
                StatusCode::OK,
                "# ste-router: not serving (standby or starting)\n",
            )
                .into_response()
        }
    };
    let m = store.metrics();
    m.revision.set(store.sequencer().published());
    m.compact_revision.set(store.history().compact_revision());
    m.history_events.set(store.history().len() as i64);
    m.leases.set(store.lease_count() as i64);
    for (shard, keys) in store.keys_per_shard() {
        m.shard_keys
            .get_or_create(&ShardLabels {
                shard: shard.to_string(),
            })
            .set(keys as i64);
    }
    for shard in store.shard_list() {
        m.shard_bytes
            .get_or_create(&ShardLabels {
                shard: shard.id.to_string(),
            })
            .set(shard.db_bytes.load(std::sync::atomic::Ordering::Relaxed));
        m.shard_up
            .get_or_create(&ShardLabels {
                shard: shard.id.to_string(),
            })
            .set((shard.is_loaded() && shard.is_healthy()) as i64);
        // Present from 0, so rate() and alerts see the first reconciliation.
        m.touch_reconciliations(shard.id.as_str());
    }
    let mut body = String::new();
    match encode(&mut body, &m.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("encoding metrics failed: {err}\n"),
        )
            .into_response(),
    }
}
