//! The key space of a shard, and helpers on keys. Clients own everything
//! below `RESERVED_PREFIX`; from there on the router keeps its own keys: the
//! leader fence, the shard marker and the replica copies. Keys the router
//! keeps are copied out of the buffers they arrived in (`own_key`).

use bytes::Bytes;
use ste_etcd_proto::mvccpb::KeyValue;

/// Keys from here on are the router's own on every shard (replica copies,
/// the leader fence); clients can neither read nor write them.
pub const RESERVED_PREFIX: &[u8] = b"\xff\xff\xff\xffste/";
/// The epoch of the router allowed to write this shard (see `leader`).
pub const FENCE_KEY: &[u8] = b"\xff\xff\xff\xffste/leader";
/// Written on a shard once the router holds its keys in its index (loaded,
/// joined, or reconciled after losing its data). A shard without it when a
/// router starts is new or lost its data: with replication, the copies of
/// the keys placed on it are then its keys, not leftovers of deletes.
pub const MARKER_KEY: &[u8] = b"\xff\xff\xff\xffste/shard";

/// Where replica copies live, inside the router's reserved range.
pub const REPLICA_PREFIX: &[u8] = b"\xff\xff\xff\xffste/replica/";

/// The copy of `key` at global revision `revision`.
pub fn replica_key(key: &[u8], revision: i64) -> Bytes {
    let mut out = Vec::with_capacity(REPLICA_PREFIX.len() + 12 + key.len());
    out.extend_from_slice(REPLICA_PREFIX);
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&revision.to_be_bytes());
    Bytes::from(out)
}

/// (key, revision) of a copy's key.
pub(crate) fn parse_replica_key(stored: &[u8]) -> Option<(Bytes, i64)> {
    let rest = stored.strip_prefix(REPLICA_PREFIX)?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let key = rest.get(4..4 + len)?;
    let revision = i64::from_be_bytes(rest.get(4 + len..)?.try_into().ok()?);
    Some((Bytes::copy_from_slice(key), revision))
}

/// Clamps a client range to the part below the reserved prefix; None if nothing is left.
pub fn clamp_range(key: &Bytes, range_end: &Bytes) -> Option<(Bytes, Bytes)> {
    if key.as_ref() >= RESERVED_PREFIX {
        return None;
    }
    let reserved = Bytes::from_static(RESERVED_PREFIX);
    let end = if range_end.is_empty() {
        range_end.clone()
    } else if range_end.as_ref() == [0] || range_end.as_ref() > RESERVED_PREFIX {
        reserved
    } else {
        range_end.clone()
    };
    Some((key.clone(), end))
}

/// A key the router keeps (index, leases) in an allocation of its own. Keys
/// arrive as slices of the request or shard response they were decoded
/// from, and a slice keeps that whole buffer, value and all, alive for as
/// long as the key exists.
pub fn own_key(key: &Bytes) -> Bytes {
    Bytes::copy_from_slice(key)
}

/// A key-value copied out of the buffer it was decoded from.
pub(crate) fn owned_kv(kv: KeyValue) -> KeyValue {
    KeyValue {
        key: own_key(&kv.key),
        value: Bytes::copy_from_slice(&kv.value),
        ..kv
    }
}

/// The first key after `last`.
pub fn next_key(last: &[u8]) -> Bytes {
    let mut next = last.to_vec();
    next.push(0);
    Bytes::from(next)
}

/// All keys clients can write: everything below the router's reserved prefix.
pub(crate) fn router_keys() -> (Bytes, Bytes) {
    (
        Bytes::from_static(&[0]),
        Bytes::from_static(RESERVED_PREFIX),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_keys_round_trip_and_sort_after_every_client_key() {
        for key in [&b"/registry/pods/a"[..], b"", b"k\x00with-nul", b"\xff\xff"] {
            let stored = replica_key(key, 1_795_394_212_754_644);
            assert_eq!(
                parse_replica_key(&stored),
                Some((Bytes::copy_from_slice(key), 1_795_394_212_754_644))
            );
            assert!(clamp_range(&stored, &Bytes::new()).is_none());
        }
        let all = clamp_range(&Bytes::from_static(b"\0"), &Bytes::from_static(b"\0")).unwrap();
        assert_eq!(all.1.as_ref(), RESERVED_PREFIX);
        assert!(clamp_range(&Bytes::from_static(FENCE_KEY), &Bytes::new()).is_none());
        let pods = clamp_range(
            &Bytes::from_static(b"/registry/pods/"),
            &Bytes::from_static(b"/registry/pods0"),
        )
        .unwrap();
        assert_eq!(pods.1.as_ref(), b"/registry/pods0");
    }
}
