//! The lease facade: grants and keep-alives in memory, revocation and expiry as multi-shard deletes.

use std::sync::Arc;
use std::time::Instant;

use tracing::warn;

use crate::error::{StoreError, StoreResult};
use crate::leases::LeaseInfo;
use crate::store::Store;

use crate::store::delete::Selection;

impl Store {
    pub fn lease_grant(&self, id: i64, ttl: i64) -> StoreResult<(i64, i64)> {
        self.check_open()?;
        self.leases.grant(id, ttl)
    }

    pub async fn lease_revoke(self: &Arc<Self>, id: i64) -> StoreResult<i64> {
        self.check_open()?;
        if !self.leases.begin_revoke(id) {
            return Err(StoreError::LeaseNotFound);
        }
        let store = self.clone();
        self.detached(async move {
            let (revision, _) = store.delete_many(Selection::Lease(id)).await?;
            store.leases.remove(id);
            Ok(revision)
        })
        .await
    }

    pub fn lease_keep_alive(&self, id: i64) -> Option<i64> {
        self.leases.keep_alive(id)
    }

    pub fn lease_info(&self, id: i64) -> Option<LeaseInfo> {
        self.leases.info(id)
    }

    pub fn lease_ids(&self) -> Vec<i64> {
        self.leases.ids()
    }

    pub(crate) async fn expire_leases(&self) {
        for id in self.leases.expired(Instant::now()) {
            if !self.leases.begin_revoke(id) {
                continue;
            }
            match self.delete_many(Selection::Lease(id)).await {
                Ok(_) => self.leases.remove(id),
                Err(err) => warn!(lease = id, error = %err, "expiring lease failed; will retry"),
            }
        }
    }
}
