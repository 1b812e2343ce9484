//! The blocks a secondary applied lately, so it can record them for a peer it learns (late)
//! has stopped receiving the primary's writes.
//!
//! A secondary records the primary's writes in its bitmap for every data peer that visibly does
//! not follow the primary. A peer dies or drops its link to the primary a few seconds before
//! anyone notices (the read timeout); the writes it missed in that window must not be missed by
//! this node's bitmap too, or a later resync from here (after the primary dies) would leave them
//! out. Two bitmaps that rotate every window (see [`RecentWrites::window_for`]) cover at least
//! the last window of writes.
//!
//! Each window also remembers whose streams its writes came from: a peer that sent every recent
//! write itself lacks none of them (a primary that crashed before its own write reached its
//! disk has that write's extent in its activity log, and one that lost its disk cache is
//! repaired as such), so nothing is marked for it. Otherwise a primary that demoted and went
//! down cleanly would find its last seconds of writes resynced back into it.

use crate::core::quorum::LinkTiming;
use crate::meta::DirtyBitmap;
use std::time::{Duration, Instant};

pub struct RecentWrites {
    current: DirtyBitmap,
    previous: DirtyBitmap,
    /// The node ids whose streams the writes of `current` and of `previous` came from (bit per id).
    current_from: u32,
    previous_from: u32,
    since: Instant,
    window: Duration,
}

impl RecentWrites {
    /// Longer than the time a lost link goes unnoticed (the ping timeout), plus two pings.
    pub fn window_for(timing: &LinkTiming) -> Duration {
        timing.ping_timeout + 2 * timing.ping_interval
    }

    pub fn new(data_size_bytes: u64, block_size: u32, window: Duration, now: Instant) -> RecentWrites {
        RecentWrites {
            current: DirtyBitmap::new(data_size_bytes, block_size),
            previous: DirtyBitmap::new(data_size_bytes, block_size),
            current_from: 0,
            previous_from: 0,
            since: now,
            window,
        }
    }

    /// A write of `from`'s stream applied here.
    pub fn record(&mut self, offset: u64, len: u64, now: Instant, from: u8) {
        if now.saturating_duration_since(self.since) >= self.window {
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.clear_all();
            self.previous_from = std::mem::take(&mut self.current_from);
            self.since = now;
        }
        self.current.set_range(offset, len);
        self.current_from |= 1 << from;
    }

    /// Whether writes of `peer`'s stream were applied here in the last two windows before `now`:
    /// it was primary lately, whatever its role is now.
    pub fn came_from(&self, peer: u8, now: Instant) -> bool {
        now.saturating_duration_since(self.since) < 2 * self.window && (self.current_from | self.previous_from) & (1 << peer) != 0
    }

    /// The recently written ranges `peer` may lack: none when every one came from its own stream.
    pub fn missed_by(&self, peer: u8) -> Vec<(u64, u64)> {
        if (self.current_from | self.previous_from) & !(1 << peer) == 0 {
            return Vec::new();
        }
        self.ranges()
    }

    /// The recently written byte ranges, block-aligned (a block may appear twice).
    fn ranges(&self) -> Vec<(u64, u64)> {
        let block = u64::from(self.current.block_size());
        [&self.current, &self.previous].into_iter().flat_map(|b| b.runs()).map(|(start, blocks)| (start * block, blocks * block)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_at_least_one_window_and_forgets_after_two() {
        const WINDOW: Duration = Duration::from_secs(3);
        assert_eq!(RecentWrites::window_for(&LinkTiming::DEFAULT), WINDOW);
        let t0 = Instant::now();
        let mut recent = RecentWrites::new(1 << 20, 4096, WINDOW, t0);
        recent.record(0, 4096, t0, 0);
        recent.record(8192, 4096, t0 + WINDOW, 0);
        let sorted = |recent: &RecentWrites| {
            let mut ranges = recent.ranges();
            ranges.sort();
            ranges
        };
        assert_eq!(sorted(&recent), vec![(0, 4096), (8192, 4096)]);
        recent.record(16384, 4096, t0 + 2 * WINDOW, 0);
        assert_eq!(sorted(&recent), vec![(8192, 4096), (16384, 4096)], "the oldest window is forgotten");
    }

    #[test]
    fn a_peer_lacks_none_of_the_writes_it_sent_itself_while_it_was_the_only_sender() {
        const WINDOW: Duration = Duration::from_secs(3);
        let t0 = Instant::now();
        let mut recent = RecentWrites::new(1 << 20, 4096, WINDOW, t0);
        recent.record(0, 4096, t0, 2);
        assert_eq!(recent.missed_by(2), vec![], "node 2 sent the only recent write");
        assert_eq!(recent.missed_by(1), vec![(0, 4096)]);
        // Node 1 was promoted after node 2 within the window: node 2 may lack node 1's writes,
        // and node 1 node 2's last ones.
        recent.record(8192, 4096, t0 + WINDOW, 1);
        assert_eq!(recent.missed_by(2).len(), 2);
        assert_eq!(recent.missed_by(1).len(), 2);
        // Two windows later node 2's writes are forgotten with their sender.
        recent.record(16384, 4096, t0 + 2 * WINDOW, 1);
        assert_eq!(recent.missed_by(1), vec![], "node 1 sent every write still remembered");
        let mut missed = recent.missed_by(2);
        missed.sort();
        assert_eq!(missed, vec![(8192, 4096), (16384, 4096)]);
    }
}
