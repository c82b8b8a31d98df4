//! A registered shard joins the ring; keys move to it with `rebalance`.

use std::sync::Arc;

use bytes::Bytes;
use tracing::{info, warn};

use crate::error::StoreResult;
use crate::shard::scan::{delete_silently, scan_shard};
use crate::shard::{CutLookup, Origin, Shard, ShardSpec};
use crate::store::Store;

impl Store {
    /// Adds a shard to the ring (a registered shard joining). Keys the ring
    /// now places on it move there with `rebalance`. A joining shard must be
    /// empty as far as the router knows: keys it holds that the router does
    /// not know (an old incarnation's, or left by an interrupted move) are
    /// discarded, never resurrected.
    pub async fn join(&self, spec: &ShardSpec) -> StoreResult<()> {
        self.check_open()?;
        if let Some(existing) = self.shard(&spec.id) {
            if existing.endpoint != spec.endpoint {
                warn!(shard = %spec.id, known = %existing.endpoint, registered = %spec.endpoint,
                    "shard re-registered at another address; keeping the known one until it is removed");
            }
            return Ok(());
        }
        let spec = ShardSpec {
            origin: Origin::Registered,
            ..spec.clone()
        };
        let shard = Arc::new(
            Shard::connect(&spec, &self.connector)?.with_fencing(self.config.fencing.clone()),
        );
        let scan = scan_shard(&shard).await?;
        let mut revision = scan.revision;
        if !scan.items.is_empty() {
            warn!(shard = %spec.id, keys = scan.items.len(),
                "joining shard holds keys the router does not know; discarding them");
            let stale: Vec<(Bytes, i64)> = scan
                .items
                .iter()
                .map(|item| (item.key.clone(), item.shard_mod_revision))
                .collect();
            revision = delete_silently(&shard, &stale).await?.unwrap_or(revision);
        }
        let at = self.sequencer.published();
        shard
            .cuts
            .lock()
            .expect("cuts lock")
            .reset(at, revision, CutLookup::Empty);
        shard.write.lock().await.last_revision = at;
        // From now on its keys are the router's: a router restarted after it
        // lost them must recognise it (see `MARKER_KEY`).
        shard.write_marker().await?;
        shard.set_loaded(true);
        shard.set_healthy(true);
        self.shards
            .write()
            .expect("shards lock")
            .insert(spec.id.clone(), shard);
        self.ring.write().expect("ring lock").add(&spec.id);
        self.note_ring_change();
        self.metrics.ring_change("join");
        info!(shard = %spec.id, endpoint = %spec.endpoint, revision = at, "shard joined the ring");
        Ok(())
    }
}
