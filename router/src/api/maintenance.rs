//! etcd's Maintenance service: Status (kube-apiserver reads the version from
//! it); the rest concern one etcd member and are answered Unimplemented.

use std::sync::Arc;
use std::time::Instant;

use ste_etcd_proto::pb::{
    maintenance_server::Maintenance, AlarmRequest, AlarmResponse, DefragmentRequest,
    DefragmentResponse, DowngradeRequest, DowngradeResponse, HashKvRequest, HashKvResponse,
    HashRequest, HashResponse, MoveLeaderRequest, MoveLeaderResponse, SnapshotRequest,
    SnapshotResponse, StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

use super::answer::answer;
use crate::store::Store;

pub struct MaintenanceService {
    pub store: Arc<Store>,
}

fn per_shard(what: &str) -> Status {
    Status::unimplemented(format!(
        "ste-router does not implement Maintenance.{what}: run it against each shard's etcd"
    ))
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(
        &self,
        request: Request<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        // etcdctl and clients list alarms; the router has none of its own.
        if request.get_ref().action == 0 {
            return Ok(Response::new(AlarmResponse {
                header: Some(self.store.header(self.store.sequencer().published())),
                alarms: Vec::new(),
            }));
        }
        Err(per_shard("Alarm"))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let started = Instant::now();
        let result = self.store.status().await;
        answer(self.store.metrics(), "Status", started, result)
    }

    async fn defragment(
        &self,
        _: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        Err(per_shard("Defragment"))
    }

    async fn hash(&self, _: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        Err(per_shard("Hash"))
    }

    async fn hash_kv(&self, _: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        Err(per_shard("HashKV"))
    }

    type SnapshotStream = futures::stream::Empty<Result<SnapshotResponse, Status>>;

    async fn snapshot(
        &self,
        _: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(per_shard("Snapshot"))
    }

    async fn move_leader(
        &self,
        _: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        Err(per_shard("MoveLeader"))
    }

    async fn downgrade(
        &self,
        _: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        Err(per_shard("Downgrade"))
    }
}
