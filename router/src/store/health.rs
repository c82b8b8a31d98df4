//! The periodic pass: health-check every shard, reconcile what needs it, expire leases.

use tracing::warn;

use crate::store::Store;

impl Store {
    /// Health checks every shard and repairs what needs it. Called periodically.
    pub async fn maintain(&self) {
        for shard in self.shard_list() {
            if shard.check().await.is_err() {
                // Whatever happened while it was away must be checked on return.
                let mut state = shard.write.lock().await;
                state.needs_reconcile |= shard.is_loaded();
                shard.note_reconcile(&state);
                continue;
            }
            self.metrics.shard_checked(shard.id.as_str());
            // A replacement the check (or any answer) noticed stays pending
            // until one reconciliation handles it: if the shard is busy, its
            // next write batch reconciles first (`ensure_reconciled`).
            if let Ok(mut state) = shard.write.try_lock() {
                if state.needs_reconcile || !shard.is_loaded() || shard.pending_replacement() {
                    if let Err(err) = self.reconcile(&shard, &mut state).await {
                        warn!(shard = %shard.id, error = %err, "reconciliation failed; will retry");
                    }
                }
            }
        }
        let duplicates = !self.duplicates.lock().expect("duplicates lock").is_empty();
        if duplicates {
            self.resolve_duplicates().await;
        }
        self.expire_leases().await;
    }
}
