//! The value envelope: what the router stores in a shard instead of the bare
//! value. It carries the global revisions of the key so that they survive a
//! router restart and a move between shards (a shard's own revisions are
//! meaningless outside that shard).
//!
//! Layout (little endian): magic `STE\x01`, mod_revision, create_revision,
//! version, lease, lease_ttl (i64 each), then the client's value bytes.

use bytes::{BufMut, Bytes, BytesMut};

const MAGIC: &[u8; 4] = b"STE\x01";
const HEADER_LEN: usize = MAGIC.len() + 5 * 8;

/// Global metadata of one stored version of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Meta {
    pub mod_revision: i64,
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
    /// The lease's granted TTL, kept so that a restarted router can re-grant
    /// the lease (etcd itself renews every lease on a leader change).
    pub lease_ttl: i64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("value is not an STE envelope (it was not written by ste-router)")]
pub struct NotAnEnvelope;

pub fn encode(meta: &Meta, value: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(HEADER_LEN + value.len());
    buf.put_slice(MAGIC);
    for field in [
        meta.mod_revision,
        meta.create_revision,
        meta.version,
        meta.lease,
        meta.lease_ttl,
    ] {
        buf.put_i64_le(field);
    }
    buf.put_slice(value);
    buf.freeze()
}

/// The stored value, and the client's value as a slice of it: the event
/// and the answer share the envelope's buffer instead of copying the value
/// again (the request it came in may be much larger than the value).
pub fn encode_shared(meta: &Meta, value: &[u8]) -> (Bytes, Bytes) {
    let stored = encode(meta, value);
    let value = stored.slice(HEADER_LEN..);
    (stored, value)
}

/// Splits a stored value into its metadata and the client's value, without copying the value.
pub fn decode(stored: &Bytes) -> Result<(Meta, Bytes), NotAnEnvelope> {
    if stored.len() < HEADER_LEN || &stored[..MAGIC.len()] != MAGIC {
        return Err(NotAnEnvelope);
    }
    let field = |i: usize| {
        let at = MAGIC.len() + i * 8;
        i64::from_le_bytes(stored[at..at + 8].try_into().expect("8 bytes"))
    };
    let meta = Meta {
        mod_revision: field(0),
        create_revision: field(1),
        version: field(2),
        lease: field(3),
        lease_ttl: field(4),
    };
    Ok((meta, stored.slice(HEADER_LEN..)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_metadata_and_value() {
        let meta = Meta {
            mod_revision: 1_700_000_000_000_123,
            create_revision: 42,
            version: 7,
            lease: -3,
            lease_ttl: 3600,
        };
        let stored = encode(&meta, b"pod spec");
        let (decoded, value) = decode(&stored).unwrap();
        assert_eq!(decoded, meta);
        assert_eq!(&value[..], b"pod spec");
    }

    #[test]
    fn foreign_values_are_rejected() {
        assert_eq!(decode(&Bytes::from_static(b"plain")), Err(NotAnEnvelope));
        let mut fake = vec![0u8; HEADER_LEN];
        fake[..4].copy_from_slice(b"XTE\x01");
        assert_eq!(decode(&Bytes::from(fake)), Err(NotAnEnvelope));
    }
}
