//! Progress of a resync or an online verify, as `status` shows it: a figure that never runs
//! backwards.
//!
//! A pass is defined over the bytes it has to move (or check). Bytes that become out of sync
//! while it runs join the total, so `total - remaining` (the bytes done) never shrinks. The
//! percentage is that over the total, held at its highest value: a burst of newly dirtied bytes
//! pauses the figure until the pass catches up, instead of moving it back (a progress bar that
//! runs backwards is how operators learn to distrust a resync). Totals and remaining bytes stay
//! exact; only the percentage is held.
//!
//! Pure: the caller observes the remaining bytes (the bitmap's weight, say) and passes the time.

#[derive(Debug, Clone, PartialEq)]
pub struct SyncProgress {
    total_bytes: u64,
    remaining_bytes: u64,
    done_percent: f64,
}

impl SyncProgress {
    /// A pass that has `remaining_bytes` to go.
    pub fn start(remaining_bytes: u64) -> SyncProgress {
        let mut progress = SyncProgress { total_bytes: remaining_bytes, remaining_bytes, done_percent: 0.0 };
        progress.observe(remaining_bytes);
        progress
    }

    /// Records how many bytes are left. More than last time means bytes became out of sync
    /// during the pass: they join the total.
    pub fn observe(&mut self, remaining_bytes: u64) {
        self.total_bytes += remaining_bytes.saturating_sub(self.remaining_bytes);
        self.remaining_bytes = remaining_bytes;
        let percent = if self.total_bytes == 0 { 100.0 } else { self.done_bytes() as f64 * 100.0 / self.total_bytes as f64 };
        self.done_percent = self.done_percent.max(percent);
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    pub fn remaining_bytes(&self) -> u64 {
        self.remaining_bytes
    }

    pub fn done_bytes(&self) -> u64 {
        self.total_bytes - self.remaining_bytes
    }

    /// Percent done, never lower than any value shown before.
    pub fn done_percent(&self) -> f64 {
        self.done_percent
    }

    /// Average rate since the pass started `elapsed_ms` ago.
    pub fn rate_bytes_per_s(&self, elapsed_ms: u64) -> u64 {
        (u128::from(self.done_bytes()) * 1000 / u128::from(elapsed_ms.max(1))) as u64
    }

    /// Seconds left at the average rate; `None` before anything was done.
    pub fn eta_s(&self, elapsed_ms: u64) -> Option<u64> {
        let rate = self.rate_bytes_per_s(elapsed_ms);
        (rate > 0).then(|| self.remaining_bytes.div_ceil(rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_plain_pass_counts_down_to_100() {
        let mut p = SyncProgress::start(1000);
        assert_eq!(p.done_percent(), 0.0);
        p.observe(750);
        assert_eq!((p.done_bytes(), p.done_percent()), (250, 25.0));
        assert_eq!(p.rate_bytes_per_s(1000), 250);
        assert_eq!(p.eta_s(1000), Some(3));
        p.observe(0);
        assert_eq!(p.done_percent(), 100.0);
        assert_eq!(p.eta_s(2000), Some(0));
    }

    #[test]
    fn newly_dirtied_bytes_join_the_total_and_the_figure_holds() {
        let mut p = SyncProgress::start(1000);
        p.observe(500);
        assert_eq!(p.done_percent(), 50.0);
        // Application writes dirty 1000 more bytes: 500 of 2000 done is 25%, shown as 50%.
        p.observe(1500);
        assert_eq!((p.total_bytes(), p.done_bytes()), (2000, 500));
        assert_eq!(p.done_percent(), 50.0);
        p.observe(400);
        assert_eq!(p.done_percent(), 80.0);
        p.observe(0);
        assert_eq!((p.total_bytes(), p.done_percent()), (2000, 100.0));
    }

    #[test]
    fn nothing_to_do_is_done() {
        let p = SyncProgress::start(0);
        assert_eq!(p.done_percent(), 100.0);
        assert_eq!(p.eta_s(10), None);
    }

    proptest! {
        /// Whatever the remaining bytes do, the figures shown never go back.
        #[test]
        fn never_runs_backwards(start in 0u64..1 << 40, steps in proptest::collection::vec(0u64..1 << 40, 1..64)) {
            let mut p = SyncProgress::start(start);
            for remaining in steps {
                let (percent, done, total) = (p.done_percent(), p.done_bytes(), p.total_bytes());
                p.observe(remaining);
                prop_assert!(p.done_percent() >= percent);
                prop_assert!(p.done_bytes() >= done);
                prop_assert!(p.total_bytes() >= total);
                prop_assert!(p.done_percent() <= 100.0);
                prop_assert_eq!(p.remaining_bytes(), remaining);
            }
        }
    }
}
