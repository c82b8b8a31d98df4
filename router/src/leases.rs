//! Leases live in the router, not in the shards: a shard expiring a key on
//! its own would create a revision outside the global sequence. The router
//! deletes a lease's keys through its normal write path when it expires.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::error::{StoreError, StoreResult};

/// etcd's limit (MaxLeaseTTL).
const MAX_TTL_SECONDS: i64 = 9_000_000_000;

#[derive(Debug)]
struct Lease {
    ttl: i64,
    deadline: Instant,
    keys: BTreeSet<Bytes>,
    /// Being revoked: no new key may attach, its keys are being deleted.
    revoking: bool,
}

pub struct LeaseInfo {
    pub remaining_seconds: i64,
    pub granted_ttl: i64,
    pub keys: Vec<Bytes>,
}

#[derive(Default)]
pub struct Leases {
    table: Mutex<HashMap<i64, Lease>>,
}

impl Leases {
    pub fn grant(&self, id: i64, ttl: i64) -> StoreResult<(i64, i64)> {
        if ttl > MAX_TTL_SECONDS {
            return Err(StoreError::LeaseTtlTooLarge);
        }
        let ttl = ttl.max(1);
        let mut table = self.table.lock().expect("lease table");
        let id = if id == 0 {
            loop {
                let candidate = rand::random::<i64>() & i64::MAX;
                if candidate != 0 && !table.contains_key(&candidate) {
                    break candidate;
                }
            }
        } else if table.contains_key(&id) {
            return Err(StoreError::LeaseExists);
        } else {
            id
        };
        table.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + Duration::from_secs(ttl as u64),
                keys: BTreeSet::new(),
                revoking: false,
            },
        );
        Ok((id, ttl))
    }

    /// Re-creates a lease found in the shards after a restart, with a fresh
    /// deadline (as etcd renews all leases when a new leader takes over).
    pub fn restore(&self, id: i64, ttl: i64, key: Bytes) {
        let mut table = self.table.lock().expect("lease table");
        let lease = table.entry(id).or_insert_with(|| Lease {
            ttl: ttl.max(1),
            deadline: Instant::now() + Duration::from_secs(ttl.max(1) as u64),
            keys: BTreeSet::new(),
            revoking: false,
        });
        lease.keys.insert(crate::keys::own_key(&key));
    }

    /// The granted TTL of a lease a new key may attach to.
    pub fn attachable_ttl(&self, id: i64) -> StoreResult<i64> {
        let table = self.table.lock().expect("lease table");
        match table.get(&id) {
            Some(lease) if !lease.revoking => Ok(lease.ttl),
            _ => Err(StoreError::LeaseNotFound),
        }
    }

    /// Records that `key` now belongs to lease `new` instead of `old` (0 = none).
    pub fn reattach(&self, key: &Bytes, old: i64, new: i64) {
        if old == new {
            return;
        }
        let mut table = self.table.lock().expect("lease table");
        if old != 0 {
            if let Some(lease) = table.get_mut(&old) {
                lease.keys.remove(key);
            }
        }
        if new != 0 {
            if let Some(lease) = table.get_mut(&new) {
                lease.keys.insert(crate::keys::own_key(key));
            }
        }
    }

    pub fn keep_alive(&self, id: i64) -> Option<i64> {
        let mut table = self.table.lock().expect("lease table");
        let lease = table.get_mut(&id).filter(|l| !l.revoking)?;
        lease.deadline = Instant::now() + Duration::from_secs(lease.ttl as u64);
        Some(lease.ttl)
    }

    pub fn info(&self, id: i64) -> Option<LeaseInfo> {
        let table = self.table.lock().expect("lease table");
        let lease = table.get(&id)?;
        let remaining = lease.deadline.saturating_duration_since(Instant::now());
        Some(LeaseInfo {
            remaining_seconds: remaining.as_secs_f64().ceil() as i64,
            granted_ttl: lease.ttl,
            keys: lease.keys.iter().cloned().collect(),
        })
    }

    pub fn ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .table
            .lock()
            .expect("lease table")
            .keys()
            .copied()
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Marks a lease as being revoked; false if there is no such lease.
    pub fn begin_revoke(&self, id: i64) -> bool {
        let mut table = self.table.lock().expect("lease table");
        match table.get_mut(&id) {
            Some(lease) => {
                lease.revoking = true;
                true
            }
            None => false,
        }
    }

    /// The keys of a lease being revoked; complete while the caller holds every shard's write lock.
    pub fn keys_of(&self, id: i64) -> Vec<Bytes> {
        let table = self.table.lock().expect("lease table");
        table
            .get(&id)
            .map(|l| l.keys.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn remove(&self, id: i64) {
        self.table.lock().expect("lease table").remove(&id);
    }

    pub fn expired(&self, now: Instant) -> Vec<i64> {
        let table = self.table.lock().expect("lease table");
        table
            .iter()
            .filter(|(_, lease)| lease.deadline <= now)
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.table.lock().expect("lease table").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_attach_revoke_cycle() {
        let leases = Leases::default();
        let (id, ttl) = leases.grant(0, 30).unwrap();
        assert!(id > 0);
        assert_eq!(ttl, 30);
        assert!(matches!(leases.grant(id, 5), Err(StoreError::LeaseExists)));
        let key = Bytes::from_static(b"/registry/events/e1");
        assert_eq!(leases.attachable_ttl(id).unwrap(), 30);
        leases.reattach(&key, 0, id);
        assert_eq!(leases.info(id).unwrap().keys, vec![key.clone()]);
        assert!(leases.begin_revoke(id));
        assert!(matches!(
            leases.attachable_ttl(id),
            Err(StoreError::LeaseNotFound)
        ));
        assert_eq!(leases.keep_alive(id), None);
        assert_eq!(leases.keys_of(id), vec![key]);
        leases.remove(id);
        assert!(leases.info(id).is_none());
        assert!(!leases.begin_revoke(id));
    }

    #[test]
    fn expiry_is_reported_after_the_deadline() {
        let leases = Leases::default();
        let (id, _) = leases.grant(7, 1).unwrap();
        assert!(leases.expired(Instant::now()).is_empty());
        assert_eq!(
            leases.expired(Instant::now() + Duration::from_secs(2)),
            vec![id]
        );
    }
}
