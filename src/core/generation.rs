//! Where generation UUIDs rotate. Pure: the caller supplies the fresh random value and persists
//! the result before any write happens under the new generation.

use super::sync_decision::same_uuid;
use crate::meta::Superblock;

/// A node's UUIDs as this module sees them (the superblock stores them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub current: u64,
    pub history: [u64; 4],
    /// One bitmap UUID per peer slot.
    pub bitmap: Vec<u64>,
}

impl Generation {
    /// The UUIDs a superblock holds.
    pub fn of(sb: &Superblock) -> Generation {
        Generation { current: sb.uuids.current, history: sb.uuids.history, bitmap: sb.peers.iter().map(|p| p.bitmap_uuid).collect() }
    }

    /// Writes these UUIDs into `sb` (in memory: the caller persists it).
    pub fn store_in(self, sb: &mut Superblock) {
        sb.uuids.current = self.current;
        sb.uuids.history = self.history;
        for (slot, uuid) in sb.peers.iter_mut().zip(self.bitmap) {
            slot.bitmap_uuid = uuid;
        }
    }

    /// Keeps the newest entries; the oldest falls off.
    pub fn push_history(&mut self, uuid: u64) {
        if uuid == 0 || self.history.iter().any(|h| same_uuid(*h, uuid)) {
            return;
        }
        self.history.rotate_right(1);
        self.history[0] = uuid;
    }

    /// Starts a new generation because this node writes without the peers in `absent_slots`
    /// following: each of them whose bitmap slot is empty starts tracking from the old current
    /// UUID, with bit 0 saying whether this node was primary at that moment (the split-brain
    /// policy "discard-younger-primary" reads it; comparisons ignore bit 0). Returns the slots that started tracking (their bitmaps must be set in full when the
    /// old generation was the just-created one: the peer holds none of this node's data).
    pub fn new_current(&mut self, fresh: u64, primary: bool, was_primary: bool, absent_slots: &[usize]) -> Vec<usize> {
        self.rotate((fresh & !1) | u64::from(primary), was_primary, absent_slots)
    }

    /// A secondary in sync with a primary that started a new generation follows it. The peers
    /// in `absent_slots` do not receive the primary's writes through this node's view either,
    /// so they start tracking here too: if the primary dies, this node can still bring them up
    /// to date from its own bitmap.
    pub fn follow(&mut self, primary_current: u64, absent_slots: &[usize]) -> Vec<usize> {
        self.rotate(primary_current, false, absent_slots)
    }

    fn rotate(&mut self, next: u64, was_primary: bool, absent_slots: &[usize]) -> Vec<usize> {
        let old = self.current;
        let mut started = Vec::new();
        for &slot in absent_slots {
            if self.bitmap[slot] == 0 {
                self.bitmap[slot] = (old & !1) | u64::from(was_primary);
                started.push(slot);
            }
        }
        // Always into history too, even when a bitmap slot took it: the history is the whole
        // ancestry a resync target inherits (`resync_finished_as_target`), and a slot's UUID
        // does not travel with it. Without this a node resynced by a primary that had started
        // a generation without a third node could not tell that node's data was its own past:
        // a split brain where a full sync (at least) suffices.
        self.push_history(old & !1);
        self.current = next;
        started
    }

    /// A diskless witness votes by the newest primary generation it has seen (see
    /// `core::quorum`). It takes a primary's generation unless it has moved past it already (its
    /// history holds it): at a heal, an old primary that lost quorum and still reports the
    /// generation the witness left for the new primary's must not pull the witness back, or the
    /// primary that has quorum would lose it to the one that has not. The generation it leaves
    /// goes into its history, and so does the primary's own history. Returns whether it changed.
    pub fn witness_learns(&mut self, primary_current: u64, primary_history: &[u64]) -> bool {
        let known = |uuid: u64| same_uuid(uuid, self.current) || self.history.iter().any(|h| *h != 0 && same_uuid(*h, uuid));
        if known(primary_current) {
            return false;
        }
        let old = self.current;
        for uuid in primary_history.iter().rev() {
            self.push_history(*uuid & !1);
        }
        self.push_history(old & !1);
        self.current = primary_current;
        true
    }

    /// This node was the source of a finished resync to `slot`: the bitmap's starting point is
    /// history now. Unless the target ended at `target_at`, a generation this node has left
    /// since: the slot then tracks from there (the bits hold what changed since).
    pub fn resync_finished_as_source(&mut self, slot: usize, target_at: u64) {
        let old = std::mem::take(&mut self.bitmap[slot]);
        if same_uuid(target_at, self.current) {
            self.push_history(old & !1);
            return;
        }
        if old != 0 && !same_uuid(old, target_at) {
            self.push_history(old & !1);
        }
        self.bitmap[slot] = target_at & !1;
    }

    /// This node was the target of a finished resync from `slot`: it now holds the source's
    /// generation.
    pub fn resync_finished_as_target(&mut self, slot: usize, current: u64, history: [u64; 4]) {
        self.current = current;
        self.history = history;
        self.bitmap[slot] = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation() -> Generation {
        Generation { current: 0x1000, history: [0; 4], bitmap: vec![0, 0] }
    }

    #[test]
    fn a_witness_never_goes_back_to_a_generation_it_left() {
        let mut w = Generation { current: 0x1000, history: [0; 4], bitmap: vec![] };
        // The new primary's generation: taken, the old one goes into history.
        assert!(w.witness_learns(0x2001, &[0x0500, 0, 0, 0]));
        assert_eq!((w.current, w.history), (0x2001, [0x1000, 0x0500, 0, 0]));
        // The old primary comes back from a partition with the old generation: ignored.
        assert!(!w.witness_learns(0x1001, &[0x0500, 0, 0, 0]));
        assert!(!w.witness_learns(0x2000, &[]), "bit 0 is not part of the identity");
        // A later generation of the lineage is taken again.
        assert!(w.witness_learns(0x3001, &[0x2000, 0, 0, 0]));
        assert_eq!(w.current, 0x3001);
        assert!(!w.witness_learns(0x1000, &[]), "still in history");
    }

    #[test]
    fn absent_peer_starts_tracking_from_the_old_current() {
        let mut g = generation();
        assert_eq!(g.new_current(0x2000, true, true, &[1]), vec![1]);
        assert_eq!(g.current, 0x2001);
        assert_eq!(g.bitmap, vec![0, 0x1001], "bit 0: was primary when tracking began");
    }

    #[test]
    fn already_tracking_peer_keeps_its_older_start() {
        let mut g = generation();
        g.new_current(0x2000, true, true, &[1]);
        assert!(g.new_current(0x3000, true, true, &[1]).is_empty());
        assert_eq!(g.bitmap[1], 0x1001);
        assert_eq!(g.history[0], 0x2000);
    }

    #[test]
    fn finished_resync_moves_the_bitmap_uuid_into_history() {
        let mut g = generation();
        g.new_current(0x2000, true, true, &[1]);
        g.resync_finished_as_source(1, 0x2000);
        assert_eq!(g.bitmap[1], 0);
        assert_eq!(g.history[0], 0x1000);
    }

    #[test]
    fn a_target_left_behind_by_a_newer_generation_is_tracked_from_the_one_it_took() {
        let mut g = generation();
        g.new_current(0x2000, true, true, &[1]);
        // The source followed a primary into 0x3000 after its resync's end named 0x2000.
        g.follow(0x3001, &[1]);
        g.resync_finished_as_source(1, 0x2000);
        assert_eq!(g.bitmap[1], 0x2000, "a bitmap resync, not a full one, brings the rest");
    }

    #[test]
    fn a_follower_tracks_the_peers_the_primary_left_behind() {
        let mut g = Generation { current: 0x1000, history: [0; 4], bitmap: vec![0, 0] };
        assert_eq!(g.follow(0x2001, &[1]), vec![1]);
        assert_eq!((g.current, g.bitmap[1]), (0x2001, 0x1000));
        assert_eq!(g.history[0], 0x1000, "the ancestry is complete either way");
        g.follow(0x3001, &[]);
        assert_eq!(g.history[..2], [0x2000, 0x1000]);
    }

    #[test]
    fn history_keeps_the_newest_four() {
        let mut g = generation();
        for uuid in [0x10, 0x20, 0x30, 0x40, 0x50] {
            g.push_history(uuid);
        }
        assert_eq!(g.history, [0x50, 0x40, 0x30, 0x20]);
    }
}
