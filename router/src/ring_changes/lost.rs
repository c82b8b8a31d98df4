//! A shard declared lost: its keys promoted from their copies, or announced deleted.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tracing::warn;

use crate::error::StoreResult;
use crate::history::StoredEvent;
use crate::placement::index::IndexEntry;
use crate::placement::ring::ShardId;
use crate::store::Store;

impl Store {
    /// A shard that is gone for good with its data (replication factor 1):
    /// its keys are deleted visibly, one DELETE event each at one revision,
    /// so controllers recreate what they own elsewhere. Returns the number
    /// of keys lost.
    pub async fn declare_lost(&self, id: &ShardId) -> StoreResult<usize> {
        let Some(shard) = self.shard(id) else {
            return Ok(0);
        };
        self.ring.write().expect("ring lock").remove(id);
        self.note_ring_change();
        shard.set_draining(true);
        // Every shard's write lock, in name order like every multi-shard
        // writer (writes in flight to the lost one fail within the shard timeout).
        let members = self.shard_list();
        let mut guards = Vec::with_capacity(members.len());
        for member in &members {
            guards.push((member.id.clone(), member.write.lock().await));
        }
        let entries: Vec<(Bytes, IndexEntry)> = self
            .index
            .read()
            .expect("index lock")
            .iter()
            .filter(|(_, e)| e.shard == *id)
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        // With replication, keys whose copy is valid live on (no events).
        let restored: std::collections::BTreeSet<Bytes> = self
            .promote_replicas(id, &entries)
            .await
            .into_iter()
            .collect();
        for (member, state) in guards.iter_mut() {
            if member != id {
                state.last_revision = state
                    .last_revision
                    .max(self.last_move.load(Ordering::Acquire));
            }
        }
        let mut state = guards
            .into_iter()
            .find(|(member, _)| member == id)
            .map(|(_, state)| state)
            .expect("the lost shard is a member");
        let assigned = self.sequencer.assign();
        let g = assigned.first();
        let mut events = Vec::new();
        {
            let mut index = self.index.write().expect("index lock");
            for (key, entry) in entries.into_iter().filter(|(k, _)| !restored.contains(k)) {
                index.remove(&key);
                self.values.forget(&key, &self.metrics);
                self.leases.reattach(&key, entry.meta.lease, 0);
                let prev = self.last_known_value(&key, &entry);
                events.push(Arc::new(StoredEvent::delete(key, g, prev)));
            }
        }
        let lost = events.len();
        events.sort_by(|a, b| a.key().cmp(b.key()));
        state.last_revision = g;
        shard.removed_at.store(g, Ordering::Release);
        self.metrics.keys_lost(lost);
        self.metrics.events_written(lost);
        self.metrics.ring_change("lost");
        assigned.publish(events);
        drop(state);
        self.sequencer.wait_published(g).await;
        self.remove_shard(&shard, g);
        warn!(shard = %id, keys_lost = lost, keys_restored = restored.len(), revision = g,
            "shard declared lost: keys without a replica were deleted (DELETE events)");
        Ok(lost)
    }
}
