//! The blocks a secondary applied lately, so it can record them for a peer it learns (late)
//! has stopped receiving the primary's writes.
//!
//! A secondary records the primary's writes in its bitmap for every data peer that visibly does
//! not follow the primary. A peer dies or drops its link to the primary a few seconds before
//! anyone notices (the read timeout); the writes it missed in that window must not be missed by
//! this node's bitmap too, or a later resync from here (after the primary dies) would leave them
//! out. Two bitmaps that rotate every window (see [`RecentWrites::window_for`]) cover at least
//! the last window of writes.

use crate::core::quorum::LinkTiming;
use crate::meta::DirtyBitmap;
use std::time::{Duration, Instant};

pub struct RecentWrites {
    current: DirtyBitmap,
    previous: DirtyBitmap,
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
            since: now,
            window,
        }
    }

    pub fn record(&mut self, offset: u64, len: u64, now: Instant) {
        if now.saturating_duration_since(self.since) >= self.window {
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.clear_all();
            self.since = now;
        }
        self.current.set_range(offset, len);
    }

    /// The recently written byte ranges, block-aligned (a block may appear twice).
    pub fn ranges(&self) -> Vec<(u64, u64)> {
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
        recent.record(0, 4096, t0);
        recent.record(8192, 4096, t0 + WINDOW);
        let sorted = |recent: &RecentWrites| {
            let mut ranges = recent.ranges();
            ranges.sort();
            ranges
        };
        assert_eq!(sorted(&recent), vec![(0, 4096), (8192, 4096)]);
        recent.record(16384, 4096, t0 + 2 * WINDOW);
        assert_eq!(sorted(&recent), vec![(8192, 4096), (16384, 4096)], "the oldest window is forgotten");
    }
}
