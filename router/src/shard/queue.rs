//! A shard's write queue: txns wait there for the shard's committer (one
//! task per shard, see `store::write::committer`), which commits them in
//! groups and answers each on its own channel.

use std::collections::BTreeSet;
use std::sync::Mutex;

use bytes::Bytes;
use ste_etcd_proto::pb::{TxnRequest, TxnResponse};
use tokio::sync::{mpsc, oneshot};

use crate::error::StoreResult;

/// A txn waiting in its shard's queue for the next group commit.
pub struct PendingTxn {
    pub(crate) req: TxnRequest,
    pub(crate) keys: BTreeSet<Bytes>,
    pub(crate) reply: oneshot::Sender<Reply>,
}

impl PendingTxn {
    /// Answers the txn's caller (who may have gone away: nothing to do then).
    pub(crate) fn answer(self, result: StoreResult<Committed>) {
        let _ = self.reply.send(Reply::Done(result));
    }

    /// A move took the keys elsewhere before the txn was planned: nothing
    /// was written, and the request goes back to be queued on the new shard.
    pub(crate) fn moved(self) {
        let _ = self.reply.send(Reply::Moved(self.req, self.keys));
    }
}

/// What the committer tells a queued txn's caller.
pub enum Reply {
    Done(StoreResult<Committed>),
    /// Not written: queue it again where its keys are now.
    Moved(TxnRequest, BTreeSet<Bytes>),
}

/// What a group commit hands back to the txn's caller.
pub struct Committed {
    pub(crate) response: TxnResponse,
    /// The revision to wait for and answer with: the txn's own, or for a
    /// read-only txn the revision its reads saw (the last write before it).
    pub(crate) visible_at: i64,
}

/// The sending end of the shard's committer channel. The committer is
/// started by the shard's first write (it needs the store, which the shard
/// does not know), stops when the shard is dropped, and is started again
/// if it stopped otherwise (its runtime went away).
#[derive(Default)]
pub struct WriteQueue {
    sender: Mutex<Option<mpsc::UnboundedSender<PendingTxn>>>,
}

impl WriteQueue {
    /// Hands `pending` to the committer, started by `start` if none runs.
    pub(crate) fn send(
        &self,
        pending: PendingTxn,
        start: impl FnOnce() -> mpsc::UnboundedSender<PendingTxn>,
    ) {
        let mut sender = self.sender.lock().expect("write queue lock");
        let pending = match sender.as_ref() {
            Some(running) => match running.send(pending) {
                Ok(()) => return,
                Err(mpsc::error::SendError(pending)) => pending,
            },
            None => pending,
        };
        let fresh = start();
        // The receiver was just made and is held by the new committer.
        let _ = fresh.send(pending);
        *sender = Some(fresh);
    }
}
