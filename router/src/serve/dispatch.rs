//! Which service answers a call: the gRPC path's service name
//! (`/etcdserverpb.KV/Range` → KV) picks one of tonic's generated servers,
//! which decodes the message, calls the handler in `api/` and encodes the
//! answer. No router framework in between: six names, one `match`.

use std::convert::Infallible;

use http::{Request, Response};
use hyper::body::Incoming;
use ste_etcd_proto::pb::{
    cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use tonic::body::Body;
use tonic::codegen::BoxFuture;
use tonic::server::NamedService;
use tower_service::Service;

use crate::api::{
    cluster::ClusterService, kv::KvService, lease::LeaseService, maintenance::MaintenanceService,
    watch::WatchService,
};

/// etcd's services and gRPC health (`H`: tonic-health's server, whose
/// service type is not named by its crate).
#[derive(Clone)]
pub struct Services<H> {
    pub kv: KvServer<KvService>,
    pub watch: WatchServer<WatchService>,
    pub lease: LeaseServer<LeaseService>,
    pub maintenance: MaintenanceServer<MaintenanceService>,
    pub cluster: ClusterServer<ClusterService>,
    pub health: H,
}

/// One of [`Services`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Named {
    Kv,
    Watch,
    Lease,
    Maintenance,
    Cluster,
    Health,
}

/// The service a gRPC path (`/package.Service/Method`) names.
fn named<H: NamedService>(path: &str) -> Option<Named> {
    let service = path.strip_prefix('/')?.split_once('/')?.0;
    [
        (KvServer::<KvService>::NAME, Named::Kv),
        (WatchServer::<WatchService>::NAME, Named::Watch),
        (LeaseServer::<LeaseService>::NAME, Named::Lease),
        (
            MaintenanceServer::<MaintenanceService>::NAME,
            Named::Maintenance,
        ),
        (ClusterServer::<ClusterService>::NAME, Named::Cluster),
        (H::NAME, Named::Health),
    ]
    .into_iter()
    .find_map(|(name, which)| (name == service).then_some(which))
}

type Answer = Result<Response<Body>, Infallible>;

impl<H: super::Health> hyper::service::Service<Request<Incoming>> for Services<H> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Response<Body>, Infallible>;

    /// tonic's generated servers are always ready (their `poll_ready` is
    /// `Ready(Ok(()))`), so `call` needs no readiness dance; each is a few
    /// `Arc`s to clone.
    fn call(&self, request: Request<Incoming>) -> Self::Future {
        match named::<H>(request.uri().path()) {
            Some(Named::Kv) => self.kv.clone().call(request),
            Some(Named::Watch) => self.watch.clone().call(request),
            Some(Named::Lease) => self.lease.clone().call(request),
            Some(Named::Maintenance) => self.maintenance.clone().call(request),
            Some(Named::Cluster) => self.cluster.clone().call(request),
            Some(Named::Health) => self.health.clone().call(request),
            None => Box::pin(std::future::ready(unimplemented(request.uri().path()))),
        }
    }
}

fn unimplemented(path: &str) -> Answer {
    let status = tonic::Status::unimplemented(format!("no service for {path}"));
    Ok(status.into_http())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Health;
    impl NamedService for Health {
        const NAME: &'static str = "grpc.health.v1.Health";
    }

    #[test]
    fn a_path_names_its_service() {
        assert_eq!(named::<Health>("/etcdserverpb.KV/Range"), Some(Named::Kv));
        assert_eq!(
            named::<Health>("/etcdserverpb.Watch/Watch"),
            Some(Named::Watch)
        );
        assert_eq!(
            named::<Health>("/etcdserverpb.Maintenance/Status"),
            Some(Named::Maintenance)
        );
        assert_eq!(
            named::<Health>("/grpc.health.v1.Health/Check"),
            Some(Named::Health)
        );
        assert_eq!(named::<Health>("/etcdserverpb.Auth/Authenticate"), None);
        assert_eq!(named::<Health>("/etcdserverpb.KV"), None);
        assert_eq!(named::<Health>(""), None);
    }

    #[test]
    fn an_unknown_service_is_unimplemented() {
        let answer = unimplemented("/x.Y/Z").unwrap();
        assert_eq!(answer.headers()["grpc-status"], "12");
    }
}
