//! etcd v3 API types and gRPC stubs, client and server, generated from the
//! vendored protos in `proto/`.
#![allow(clippy::all, missing_docs)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}
pub mod authpb {
    tonic::include_proto!("authpb");
}
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

pub use etcdserverpb as pb;
pub use mvccpb::{Event, KeyValue};
