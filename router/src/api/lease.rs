//! etcd's Lease service. Leases are kept by the router (see `leases`).

use std::sync::Arc;
use std::time::Instant;

use ste_etcd_proto::pb::{
    lease_server::Lease, LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest,
    LeaseKeepAliveResponse, LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest,
    LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::answer::answer;
use crate::store::Store;

pub struct LeaseService {
    pub store: Arc<Store>,
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        let store = &self.store;
        let result = store
            .lease_grant(req.id, req.ttl)
            .map(|(id, ttl)| LeaseGrantResponse {
                header: Some(store.header(store.sequencer().published())),
                id,
                ttl,
                error: String::new(),
            });
        answer(store.metrics(), "LeaseGrant", started, result)
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let started = Instant::now();
        let store = &self.store;
        let result = store
            .lease_revoke(request.into_inner().id)
            .await
            .map(|revision| LeaseRevokeResponse {
                header: Some(store.header(revision)),
            });
        answer(store.metrics(), "LeaseRevoke", started, result)
    }

    type LeaseKeepAliveStream = ReceiverStream<Result<LeaseKeepAliveResponse, Status>>;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let store = self.store.clone();
        tokio::spawn(async move {
            let closing = store.closing();
            loop {
                let message = tokio::select! {
                    message = inbound.message() => message,
                    _ = closing.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("ste-router is shutting down"))).await;
                        return;
                    }
                };
                let Ok(Some(req)) = message else { return };
                // etcd answers an unknown lease with TTL 0 rather than an error.
                let ttl = store.lease_keep_alive(req.id).unwrap_or(0);
                let response = LeaseKeepAliveResponse {
                    header: Some(store.header(store.sequencer().published())),
                    id: req.id,
                    ttl,
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let req = request.into_inner();
        let header = Some(self.store.header(self.store.sequencer().published()));
        let response = match self.store.lease_info(req.id) {
            Some(info) => LeaseTimeToLiveResponse {
                header,
                id: req.id,
                ttl: info.remaining_seconds,
                granted_ttl: info.granted_ttl,
                keys: if req.keys { info.keys } else { Vec::new() },
            },
            // etcd's answer for an unknown lease.
            None => LeaseTimeToLiveResponse {
                header,
                id: req.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            },
        };
        Ok(Response::new(response))
    }

    async fn lease_leases(
        &self,
        _request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        Ok(Response::new(LeaseLeasesResponse {
            header: Some(self.store.header(self.store.sequencer().published())),
            leases: self
                .store
                .lease_ids()
                .into_iter()
                .map(|id| LeaseStatus { id })
                .collect(),
        }))
    }
}
