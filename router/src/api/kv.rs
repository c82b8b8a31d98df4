//! etcd's KV service.

use std::sync::Arc;
use std::time::Instant;

use ste_etcd_proto::pb::{
    kv_server::Kv, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    PutRequest, PutResponse, RangeRequest, RangeResponse, RangeStreamResponse, TxnRequest,
    TxnResponse,
};
use tonic::{Request, Response, Status};

use super::answer::answer;
use crate::store::Store;

pub struct KvService {
    pub store: Arc<Store>,
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let started = Instant::now();
        let result = self.store.range(request.into_inner()).await;
        answer(self.store.metrics(), "Range", started, result)
    }

    type RangeStreamStream = futures::stream::Empty<Result<RangeStreamResponse, Status>>;

    /// kube-apiserver falls back to Range when streaming is not implemented.
    async fn range_stream(
        &self,
        _request: Request<RangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        Err(Status::unimplemented(
            "ste-router does not implement RangeStream; use Range",
        ))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let started = Instant::now();
        let result = self.store.put(request.into_inner()).await;
        answer(self.store.metrics(), "Put", started, result)
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let started = Instant::now();
        let result = self.store.delete_range(request.into_inner()).await;
        answer(self.store.metrics(), "DeleteRange", started, result)
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let started = Instant::now();
        let result = self.store.txn(request.into_inner()).await;
        answer(self.store.metrics(), "Txn", started, result)
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let started = Instant::now();
        let store = &self.store;
        let result = store
            .compact(request.into_inner().revision)
            .map(|revision| CompactionResponse {
                header: Some(store.header(revision)),
            });
        answer(store.metrics(), "Compact", started, result)
    }
}
