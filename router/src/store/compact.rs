//! Compaction: the history, then each shard up to its cut at the revision.

use crate::error::{StoreError, StoreResult};
use crate::store::Store;

impl Store {
    pub fn compact(&self, revision: i64) -> StoreResult<i64> {
        let current = self.sequencer.published();
        if revision > current {
            return Err(StoreError::FutureRevision);
        }
        if !self.history.compact(revision) {
            return Err(StoreError::Compacted);
        }
        self.compact_shards(revision);
        Ok(current)
    }

    pub(crate) fn compact_overflow(&self) {
        if let Some(revision) = self.history.overflow_revision() {
            if self.history.compact(revision) {
                self.compact_shards(revision);
            }
        }
    }

    fn compact_shards(&self, revision: i64) {
        for shard in self.shard_list() {
            let physical = shard.cuts.lock().expect("cuts lock").compact(revision);
            if let Some(shard_revision) = physical {
                tokio::spawn(async move {
                    if let Err(err) = shard.compact(shard_revision).await {
                        // Already compacted further, or briefly down: harmless.
                        tracing::debug!(shard = %shard.id, error = %err, "shard compaction skipped");
                    }
                });
            }
        }
    }
}
