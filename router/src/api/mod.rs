//! The etcd v3 gRPC services, one file each. They translate requests into
//! calls on the store and the store's errors into etcd's statuses.

mod answer;
pub mod cluster;
pub mod kv;
pub mod lease;
pub mod maintenance;
pub mod watch;
