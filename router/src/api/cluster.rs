//! etcd's Cluster service: the router presents itself as a one-member cluster
//! (clients that sync endpoints then keep talking to the router).

use std::sync::Arc;

use ste_etcd_proto::pb::{
    cluster_server::Cluster, Member, MemberAddRequest, MemberAddResponse, MemberListRequest,
    MemberListResponse, MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest,
    MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse,
};
use tonic::{Request, Response, Status};

use crate::store::Store;

pub struct ClusterService {
    pub store: Arc<Store>,
    pub member_id: u64,
    pub client_url: String,
}

fn refused(what: &str) -> Status {
    Status::unimplemented(format!(
        "ste-router is a single logical member; Cluster.{what} does not apply (shards join through the router's configuration)"
    ))
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        _: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        Err(refused("MemberAdd"))
    }

    async fn member_remove(
        &self,
        _: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        Err(refused("MemberRemove"))
    }

    async fn member_update(
        &self,
        _: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(refused("MemberUpdate"))
    }

    async fn member_list(
        &self,
        _: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let member = Member {
            id: self.member_id,
            name: "ste-router".into(),
            peer_ur_ls: Vec::new(),
            client_ur_ls: vec![self.client_url.clone()],
            is_learner: false,
        };
        Ok(Response::new(MemberListResponse {
            header: Some(self.store.header(self.store.sequencer().published())),
            members: vec![member],
        }))
    }

    async fn member_promote(
        &self,
        _: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(refused("MemberPromote"))
    }
}
