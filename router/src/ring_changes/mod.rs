//! Ring changes: shards joining, draining and being lost.
//!
//! A key move is invisible to clients: the value (with its envelope, so the
//! same global revisions and version) is written to the new shard and then
//! deleted from the old one under both shards' write locks, and the pair of
//! shard writes gets a global revision of its own that carries no event. Both
//! shards record a cut at that revision, so a List at any revision before it
//! reads the key on the old shard and a List at or after it on the new one:
//! snapshots stay exact across moves and nobody gets 410 for a join.
//!
//! Removing a shard (drained, or lost) makes revisions before its removal
//! unreadable by Range (ErrCompacted → kube-apiserver relists once); watches
//! are served from the router's log and are not affected.
//!
//! Losing a shard, the whole story (each step names where it is done):
//!
//! 1. Noticed. Every answer of a shard's etcd carries its revision; only the
//!    router writes a shard, so a revision below the highest seen, or a new
//!    cluster/member id at the health check, means the etcd lost its data
//!    (`shard::Shard::check`, `went_back`, `push_batch_cut`). A shard that
//!    does not answer is marked unhealthy and `needs_reconcile`
//!    (`store::health`).
//! 2. Back, but empty or behind: reconciled before its next write
//!    (`store::reconcile`). With replication the keys it lost come back from
//!    their copies on the other shards, same revisions, no event
//!    (`replication::restore::restore_in_place`); without, each lost key is
//!    announced deleted and each value the router never announced is
//!    rewritten, at one new revision, so watchers converge on the truth. A
//!    shard found without its marker when a router starts is the same case
//!    (`replication::restore::adopt_replicas`).
//! 3. Gone for good. A registered shard unhealthy for `lost_after` (or whose
//!    registration stopped heartbeating) is declared lost by the membership
//!    loop (`membership`): it leaves the ring; its keys with a valid copy are
//!    promoted to their new owners invisibly, the others are deleted visibly
//!    at one revision (`lost`). A `--shards` shard is never declared lost.
//! 4. The ring settles. Keys the ring now places elsewhere are moved
//!    (`rebalance`), missing copies are written again
//!    (`replication::repair`), and Ranges below the removal revision answer
//!    ErrCompacted (kube-apiserver relists once).
//!
//! Files: `join` (a shard joining), `drain` (leaving on purpose), `lost`
//! (gone for good), `rebalance` (moving misplaced keys).

mod drain;
mod join;
mod lost;
mod rebalance;

pub use drain::DrainProgress;
