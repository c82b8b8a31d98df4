//! Replication factor 2: every key also has a copy on a second shard, so
//! losing one shard loses nothing.
//!
//! A replica copy lives under a reserved prefix on its shard, one per
//! version (`REPLICA_PREFIX` + key length + key + mod revision, holding the
//! same envelope bytes as the primary), outside every range a client can
//! read or write. The copy of a new version is written in parallel with the
//! primary Txn of each group commit; the copy of the version it replaces is
//! deleted only after the primary committed, so a write that fails never
//! leaves a key without a valid copy. The index says which shard holds the
//! copy of the indexed version; a copy is used only if its envelope matches
//! the index exactly. When a shard is lost, its keys whose copies
//! are valid are promoted to their new ring owners invisibly (same
//! revisions, no events); only keys without a valid copy are deleted
//! visibly. A repair pass re-creates missing copies after failures, restarts
//! and ring changes.

//!
//! `copies` writes and deletes copies with each group commit; `restore`
//! brings keys back from their copies (a shard lost, or emptied under a
//! router restart); `repair` re-creates the copies that are missing.

pub mod copies;
mod repair;
mod restore;
