//! Revision cuts: for each batch of global revisions [first, last] a shard
//! committed as one Txn, the shard's own revision right after it. A List at
//! global revision R reads the shard at the last cut ≤ R, which is exactly
//! the shard's state once every write ≤ R was applied (the shard commits in
//! global revision order). An R inside a batch is read at the cut before the
//! batch, plus the batch's events up to R from the history.

use std::collections::VecDeque;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutLookup {
    /// Read the shard at this revision of its own.
    At(i64),
    /// R falls inside a batch: read the shard at `base` (None: it held
    /// nothing then) and apply the batch's events from `from` up to R.
    Within { base: Option<i64>, from: i64 },
    /// The shard held no keys at that global revision (it joined later, empty).
    Empty,
    /// The shard's state at that revision is not known (before the router
    /// loaded it, or before it lost its data): answer ErrCompacted.
    Unknown,
}

#[derive(Debug, Clone, Copy)]
struct Cut {
    first: i64,
    last: i64,
    shard_revision: i64,
}

#[derive(Debug)]
pub struct Cuts {
    entries: VecDeque<Cut>,
    before_first: CutLookup,
}

impl Cuts {
    pub fn unloaded() -> Self {
        Cuts {
            entries: VecDeque::new(),
            before_first: CutLookup::Unknown,
        }
    }

    /// Restarts the cut list at (g, shard_revision); what came before is `before`.
    pub fn reset(&mut self, g: i64, shard_revision: i64, before: CutLookup) {
        self.entries.clear();
        self.entries.push_back(Cut {
            first: g,
            last: g,
            shard_revision,
        });
        self.before_first = before;
    }

    pub fn push(&mut self, g: i64, shard_revision: i64) {
        self.push_batch(g, g, shard_revision);
    }

    pub fn push_batch(&mut self, first: i64, last: i64, shard_revision: i64) {
        if let Some(tail) = self.entries.back_mut() {
            // One revision may commit in several shard Txns (large deletes).
            if tail.first == first && tail.last == last {
                tail.shard_revision = tail.shard_revision.max(shard_revision);
                return;
            }
        }
        self.entries.push_back(Cut {
            first,
            last,
            shard_revision,
        });
    }

    pub fn at(&self, g: i64) -> CutLookup {
        let after = self.entries.partition_point(|cut| cut.first <= g);
        let Some(index) = after.checked_sub(1) else {
            return self.before_first;
        };
        let cut = self.entries[index];
        if g >= cut.last {
            return CutLookup::At(cut.shard_revision);
        }
        let base = match index.checked_sub(1) {
            Some(previous) => Some(self.entries[previous].shard_revision),
            None => match self.before_first {
                CutLookup::Empty => None,
                CutLookup::At(revision) => Some(revision),
                _ => return CutLookup::Unknown,
            },
        };
        CutLookup::Within {
            base,
            from: cut.first,
        }
    }

    /// The first global revision the cuts cover (reads below it answer `before_first`).
    pub fn first_revision(&self) -> Option<i64> {
        self.entries.front().map(|cut| cut.first)
    }

    /// The last global revision the cuts cover (writes, moves, reconciliations, the load).
    pub fn latest_revision(&self) -> Option<i64> {
        self.entries.back().map(|cut| cut.last)
    }

    pub fn latest_shard_revision(&self) -> Option<i64> {
        self.entries.back().map(|cut| cut.shard_revision)
    }

    /// Forgets cuts no longer needed to read at `g` or later, and returns the
    /// shard revision that may be compacted physically.
    pub fn compact(&mut self, g: i64) -> Option<i64> {
        while self.entries.len() > 1 && self.entries[1].last < g {
            self.entries.pop_front();
        }
        match self.entries.front() {
            Some(cut) if cut.last <= g => Some(cut.shard_revision),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_finds_the_last_cut_at_or_below() {
        let mut cuts = Cuts::unloaded();
        cuts.reset(100, 5, CutLookup::Unknown);
        cuts.push(103, 6);
        cuts.push(107, 7);
        assert_eq!(cuts.at(99), CutLookup::Unknown);
        assert_eq!(cuts.at(100), CutLookup::At(5));
        assert_eq!(cuts.at(106), CutLookup::At(6));
        assert_eq!(cuts.at(1_000), CutLookup::At(7));
        assert_eq!(cuts.compact(105), Some(6));
        assert_eq!(cuts.at(105), CutLookup::At(6));
        assert_eq!(cuts.len(), 2);
    }

    #[test]
    fn reads_inside_a_batch_start_from_the_cut_before_it() {
        let mut cuts = Cuts::unloaded();
        cuts.reset(10, 3, CutLookup::Unknown);
        cuts.push_batch(11, 15, 4);
        assert_eq!(cuts.at(10), CutLookup::At(3));
        assert_eq!(
            cuts.at(12),
            CutLookup::Within {
                base: Some(3),
                from: 11
            }
        );
        assert_eq!(cuts.at(15), CutLookup::At(4));
        // Compacting inside the batch keeps the cut its reads start from.
        assert_eq!(cuts.compact(13), Some(3));
        assert_eq!(
            cuts.at(13),
            CutLookup::Within {
                base: Some(3),
                from: 11
            }
        );
    }

    #[test]
    fn a_shard_that_joined_empty_reads_as_empty_before_it_joined() {
        let mut cuts = Cuts::unloaded();
        cuts.reset(50, 1, CutLookup::Empty);
        assert_eq!(cuts.at(10), CutLookup::Empty);
        assert_eq!(cuts.compact(10), None);
    }
}
