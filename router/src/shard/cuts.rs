//! Revision cuts: for each global revision G at which this shard committed,
//! the shard's own revision right after it. A List at global revision R reads
//! the shard at the last cut ≤ R, which is exactly the shard's state once
//! every write ≤ R was applied (the shard commits in G order).

use std::collections::VecDeque;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutLookup {
    /// Read the shard at this revision of its own.
    At(i64),
    /// The shard held no keys at that global revision (it joined later, empty).
    Empty,
    /// The shard's state at that revision is not known (before the router
    /// loaded it, or before it lost its data): answer ErrCompacted.
    Unknown,
}

#[derive(Debug)]
pub struct Cuts {
    entries: VecDeque<(i64, i64)>,
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
        self.entries.push_back((g, shard_revision));
        self.before_first = before;
    }

    pub fn push(&mut self, g: i64, shard_revision: i64) {
        if let Some(last) = self.entries.back_mut() {
            if last.0 == g {
                last.1 = last.1.max(shard_revision);
                return;
            }
        }
        self.entries.push_back((g, shard_revision));
    }

    pub fn at(&self, g: i64) -> CutLookup {
        let after = self.entries.partition_point(|(cut_g, _)| *cut_g <= g);
        match after.checked_sub(1) {
            Some(index) => CutLookup::At(self.entries[index].1),
            None => self.before_first,
        }
    }

    pub fn latest_shard_revision(&self) -> Option<i64> {
        self.entries.back().map(|(_, rev)| *rev)
    }

    /// Forgets cuts no longer needed to read at `g` or later, and returns the
    /// shard revision that may be compacted physically.
    pub fn compact(&mut self, g: i64) -> Option<i64> {
        while self.entries.len() > 1 && self.entries[1].0 <= g {
            self.entries.pop_front();
        }
        match self.entries.front() {
            Some((first_g, rev)) if *first_g <= g => Some(*rev),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
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
    fn a_shard_that_joined_empty_reads_as_empty_before_it_joined() {
        let mut cuts = Cuts::unloaded();
        cuts.reset(50, 1, CutLookup::Empty);
        assert_eq!(cuts.at(10), CutLookup::Empty);
        assert_eq!(cuts.compact(10), None);
    }
}
