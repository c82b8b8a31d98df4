//! Placement: consistent hashing of full keys over the live shards.
//!
//! Each shard owns `vnodes` points on the ring so that adding or removing one
//! shard moves only about 1/N of the keys. The ring only decides where NEW
//! keys go; a key that exists is found through the index (see `store`), so a
//! ring change never makes an existing key unreachable.

use std::fmt;
use std::sync::Arc;

use hashring::HashRing;

/// A shard's stable name. Placement hashes the name, not the address, so a
/// shard that moves to another address keeps its keys.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(Arc<str>);

impl ShardId {
    pub fn new(name: &str) -> Self {
        ShardId(Arc::from(name))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct VirtualNode {
    shard: ShardId,
    replica: u32,
}

pub struct Ring {
    ring: HashRing<VirtualNode>,
    vnodes: u32,
    members: Vec<ShardId>,
}

impl Ring {
    pub fn new(vnodes: u32) -> Self {
        Ring {
            ring: HashRing::new(),
            vnodes: vnodes.max(1),
            members: Vec::new(),
        }
    }

    pub fn add(&mut self, shard: &ShardId) {
        if self.members.contains(shard) {
            return;
        }
        self.members.push(shard.clone());
        self.members.sort();
        for replica in 0..self.vnodes {
            self.ring.add(VirtualNode {
                shard: shard.clone(),
                replica,
            });
        }
    }

    pub fn remove(&mut self, shard: &ShardId) {
        self.members.retain(|m| m != shard);
        for replica in 0..self.vnodes {
            self.ring.remove(&VirtualNode {
                shard: shard.clone(),
                replica,
            });
        }
    }

    /// The shard a new key is placed on, or None when the ring is empty.
    pub fn locate(&self, key: &[u8]) -> Option<ShardId> {
        self.ring.get(&key).map(|node| node.shard.clone())
    }

    /// Where the replica of a key held by `primary` goes: another member,
    /// chosen by hashing the key with a salt, so replicas spread evenly and
    /// move only when the ring changes around them.
    pub fn locate_replica(&self, key: &[u8], primary: &ShardId) -> Option<ShardId> {
        if self.members.iter().all(|m| m == primary) {
            return None;
        }
        let mut salted = Vec::with_capacity(key.len() + 10);
        for salt in 0u8..8 {
            salted.clear();
            salted.extend_from_slice(key);
            salted.extend_from_slice(b"\0replica");
            salted.push(salt);
            if let Some(shard) = self.locate(&salted) {
                if &shard != primary {
                    return Some(shard);
                }
            }
        }
        self.members.iter().find(|m| *m != primary).cloned()
    }

    pub fn members(&self) -> &[ShardId] {
        &self.members
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_of(names: &[&str]) -> Ring {
        let mut ring = Ring::new(64);
        for name in names {
            ring.add(&ShardId::new(name));
        }
        ring
    }

    #[test]
    fn keys_spread_over_every_shard() {
        let ring = ring_of(&["a", "b", "c"]);
        let mut counts = std::collections::HashMap::new();
        for i in 0..3000 {
            let key = format!("/registry/pods/default/pod-{i}");
            *counts
                .entry(ring.locate(key.as_bytes()).unwrap())
                .or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3);
        for (shard, count) in counts {
            assert!(count > 600, "shard {shard} got only {count} of 3000 keys");
        }
    }

    #[test]
    fn adding_a_shard_moves_only_keys_to_the_new_shard() {
        let before = ring_of(&["a", "b", "c"]);
        let mut after = ring_of(&["a", "b", "c"]);
        after.add(&ShardId::new("d"));
        let mut moved = 0;
        for i in 0..4000 {
            let key = format!("/registry/pods/ns/p{i}");
            let (old, new) = (
                before.locate(key.as_bytes()).unwrap(),
                after.locate(key.as_bytes()).unwrap(),
            );
            if old != new {
                assert_eq!(new.as_str(), "d", "{key} moved between old shards");
                moved += 1;
            }
        }
        assert!(moved > 500 && moved < 1600, "moved {moved} of 4000");
    }

    #[test]
    fn placement_is_stable_across_instances_and_empty_ring_places_nothing() {
        let one = ring_of(&["x", "y"]);
        let two = ring_of(&["y", "x"]);
        for i in 0..100 {
            let key = format!("k{i}");
            assert_eq!(one.locate(key.as_bytes()), two.locate(key.as_bytes()));
        }
        assert_eq!(Ring::new(8).locate(b"k"), None);
    }
}
