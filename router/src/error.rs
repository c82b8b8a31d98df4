//! Errors of the store, and how each becomes the gRPC status a real etcd
//! would send. etcd clients (clientv3, and so kube-apiserver) recognise
//! errors by their exact message, so those strings are etcd's own.

use tonic::{Code, Status};

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    /// A request etcd would accept but the router refuses rather than answer wrongly.
    #[error("ste-router does not support {0}")]
    Unsupported(String),
    /// A transaction whose keys live on more than one shard.
    #[error(
        "ste-router: transaction spans shards ({0}); every key of a Txn must live on one shard"
    )]
    CrossShard(String),
    #[error("ste-router: shard {shard} is unavailable: {reason}")]
    ShardUnavailable { shard: String, reason: String },
    /// A shard refused a request for a reason that is the client's (too large, bad argument…).
    #[error("{0}")]
    ShardRejected(Status),
    #[error("ste-router is not ready: {0}")]
    NotReady(String),
    /// Another router took the lease: this one must not write any more.
    #[error("ste-router: not the leader (another router took over)")]
    NotLeader,
    /// An admin request named something that does not exist.
    #[error("ste-router: {0}")]
    NotFound(String),
    #[error("ste-router internal error: {0}")]
    Internal(String),
}

impl StoreError {
    pub fn unavailable(shard: &str, reason: impl std::fmt::Display) -> Self {
        StoreError::ShardUnavailable {
            shard: shard.to_string(),
            reason: reason.to_string(),
        }
    }
}

impl From<StoreError> for Status {
    fn from(err: StoreError) -> Status {
        let code = match &err {
            StoreError::Compacted | StoreError::FutureRevision | StoreError::LeaseTtlTooLarge => {
                Code::OutOfRange
            }
            StoreError::LeaseNotFound | StoreError::NotFound(_) => Code::NotFound,
            StoreError::NotLeader => Code::Unavailable,
            StoreError::LeaseExists => Code::FailedPrecondition,
            StoreError::EmptyKey
            | StoreError::KeyNotFound
            | StoreError::DuplicateKey
            | StoreError::TooManyOps
            | StoreError::ValueProvided
            | StoreError::LeaseProvided
            | StoreError::Unsupported(_) => Code::InvalidArgument,
            StoreError::CrossShard(_) => Code::FailedPrecondition,
            StoreError::ShardUnavailable { .. } | StoreError::NotReady(_) => Code::Unavailable,
            StoreError::ShardRejected(status) => return status.clone(),
            StoreError::Internal(_) => Code::Internal,
        };
        Status::new(code, err.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;
