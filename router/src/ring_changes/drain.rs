//! A shard leaves the ring on purpose: out of the ring, keys moved off, then removed.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::info;

use crate::error::{StoreError, StoreResult};
use crate::placement::ring::ShardId;
use crate::shard::Shard;
use crate::store::Store;

/// What became of a shard removal request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainProgress {
    /// Keys are still on the shard (they are being moved).
    Moving { keys_left: usize },
    /// The shard holds nothing any more and left the ring and the store.
    Removed,
}

impl Store {
    /// Takes a shard out of the ring: new keys go elsewhere and `rebalance`
    /// moves its keys off. Refused for the last shard in the ring.
    pub fn begin_drain(&self, id: &ShardId) -> StoreResult<()> {
        let shard = self
            .shard(id)
            .ok_or_else(|| StoreError::NotFound(format!("shard {id} is not a member")))?;
        if shard.is_draining() {
            return Ok(());
        }
        {
            let mut ring = self.ring.write().expect("ring lock");
            if ring.members().iter().all(|m| m == id) {
                return Err(StoreError::NotReady(format!(
                    "shard {id} is the last shard in the ring; its keys have nowhere to go"
                )));
            }
            ring.remove(id);
        }
        shard.set_draining(true);
        self.note_ring_change();
        self.metrics.ring_change("drain");
        info!(shard = %id, "draining shard: moving its keys off");
        Ok(())
    }

    /// Removes a draining shard once it holds no keys.
    pub async fn finish_drain(&self, id: &ShardId) -> StoreResult<DrainProgress> {
        let Some(shard) = self.shard(id) else {
            return Ok(DrainProgress::Removed);
        };
        let keys_left = self.keys_on(id);
        if keys_left > 0 {
            return Ok(DrainProgress::Moving { keys_left });
        }
        let state = shard.write.lock().await;
        let keys_left = self.keys_on(id);
        if keys_left > 0 {
            return Ok(DrainProgress::Moving { keys_left });
        }
        // Its last write or move is the newest revision at which reading it matters.
        self.remove_shard(&shard, state.last_revision);
        info!(shard = %id, "drained shard left the store");
        Ok(DrainProgress::Removed)
    }

    pub(crate) fn remove_shard(&self, shard: &Arc<Shard>, last_revision: i64) {
        shard
            .removed_at
            .fetch_max(last_revision.max(1), Ordering::AcqRel);
        // Reads before this revision would need the shard's data.
        self.range_floor.fetch_max(last_revision, Ordering::AcqRel);
        self.shards.write().expect("shards lock").remove(&shard.id);
        self.ring.write().expect("ring lock").remove(&shard.id);
    }
}
