//! A shard's write queue: txns wait there for the next group commit (see
//! `store::write`), and hear back what was committed.

use std::collections::BTreeSet;

use bytes::Bytes;
use ste_etcd_proto::pb::{TxnRequest, TxnResponse};
use tokio::sync::oneshot;

use crate::error::StoreResult;

/// A txn waiting in its shard's queue for the next group commit.
pub struct PendingTxn {
    pub(crate) req: TxnRequest,
    pub(crate) keys: BTreeSet<Bytes>,
    pub(crate) reply: oneshot::Sender<StoreResult<Committed>>,
}

/// What a group commit hands back to the txn's caller.
pub struct Committed {
    pub(crate) response: TxnResponse,
    /// The revision to wait for and answer with: the txn's own, or for a
    /// read-only txn the revision its reads saw (the last write before it).
    pub(crate) visible_at: i64,
}
