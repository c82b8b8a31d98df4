//! The shard's committer: one long-lived task per shard takes the txns
//! queued since its last round, plans and commits them as group commits
//! under the shard's write lock, and answers each txn on its own channel
//! as soon as its batch is committed.
//!
//! Callers never take the write lock and no task is spawned per write:
//! a write is a message to the committer and an answer back. A finished
//! write is answered while the committer already sends the next batch
//! (before, the caller that held the lock committed whatever had queued
//! meanwhile before it could return its own answer). The committer owns the
//! revisions it assigns, so a caller that goes away changes nothing.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};

use futures::FutureExt;
use tokio::sync::mpsc;
use tracing::error;

use crate::shard::queue::PendingTxn;
use crate::shard::Shard;
use crate::store::Store;

impl Store {
    /// Hands `pending` to the committer of `shard` (started if none runs).
    pub(crate) fn enqueue(self: &Arc<Self>, shard: &Arc<Shard>, pending: PendingTxn) {
        shard.queue.send(pending, || {
            let (sender, receiver) = mpsc::unbounded_channel();
            tokio::spawn(run(Arc::downgrade(self), Arc::downgrade(shard), receiver));
            sender
        });
    }
}

/// The committer's loop; it ends when the shard (or the store) is dropped.
async fn run(
    store: Weak<Store>,
    shard: Weak<Shard>,
    mut queue: mpsc::UnboundedReceiver<PendingTxn>,
) {
    while let Some(first) = queue.recv().await {
        let Some(store) = store.upgrade() else {
            return;
        };
        let Some(shard) = shard.upgrade() else {
            // The shard left the store: its keys are elsewhere now, nothing
            // of these txns was written; their callers queue them there.
            first.moved();
            while let Ok(pending) = queue.try_recv() {
                pending.moved();
            }
            return;
        };
        let round = async {
            let mut state = shard.write.lock().await;
            // Everything queued until the lock was ours goes in this round.
            let mut queued = vec![first];
            while let Ok(pending) = queue.try_recv() {
                queued.push(pending);
            }
            store.commit_queued(&shard, &mut state, queued).await;
        };
        // A bug in one round must not stop the shard's writes for good (its
        // txns' callers hear that their write was dropped).
        if AssertUnwindSafe(round).catch_unwind().await.is_err() {
            error!(shard = %shard.id, "a group commit panicked; its writes were dropped");
        }
    }
}
