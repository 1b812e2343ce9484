//! The resync rate controller: how fast a resync (or an online verify) may read and send now.
//!
//! `resync_rate_max_kib` is a budget the resync shares with the application: the controller
//! measures how fast the application writes on this node and gives the resync what is left of
//! the budget, never less than `resync_rate_min_kib` (a busy device must still converge) and never
//! more than the maximum. A resync that competes with application writes for the same disk and
//! link would otherwise slow every write down for as long as it runs.
//!
//! Sending is paced by a token bucket refilled at the current rate. Pure: the caller passes the
//! time (milliseconds from any fixed origin) and the running total of application write bytes.

/// The application's write rate is sampled over windows of at least this long.
const SAMPLE_MS: u64 = 100;
/// Budget left unused is kept for at most this long at the current rate, so a resync that paused
/// (waiting for a barrier ack, say) does not burst once it resumes.
const BURST_MS: u64 = 100;

/// The configured bounds of a resync's rate (`resync_rate_max_kib`, `resync_rate_min_kib`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    pub max_bytes_per_s: u64,
    /// At most `max_bytes_per_s`, above zero (the configuration checks it).
    pub min_bytes_per_s: u64,
}

#[derive(Debug, Clone)]
pub struct ResyncRate {
    max_bytes_per_s: u64,
    min_bytes_per_s: u64,
    /// Smoothed application write rate.
    app_bytes_per_s: u64,
    sample_start_ms: u64,
    sample_start_app_bytes: u64,
    last_ms: u64,
    /// Bytes that may still be sent at once; negative after a chunk larger than what was left,
    /// which is paid back by waiting.
    budget_bytes: i64,
}

impl ResyncRate {
    /// A controller starting at `now_ms`, when the application had written `app_write_bytes`.
    pub fn new(limits: RateLimits, now_ms: u64, app_write_bytes: u64) -> ResyncRate {
        debug_assert!(limits.min_bytes_per_s <= limits.max_bytes_per_s && limits.min_bytes_per_s > 0);
        ResyncRate {
            max_bytes_per_s: limits.max_bytes_per_s,
            min_bytes_per_s: limits.min_bytes_per_s,
            app_bytes_per_s: 0,
            sample_start_ms: now_ms,
            sample_start_app_bytes: app_write_bytes,
            last_ms: now_ms,
            budget_bytes: 0,
        }
    }

    /// The rate the resync may use now: what the application leaves of the maximum.
    pub fn rate_bytes_per_s(&self) -> u64 {
        self.max_bytes_per_s.saturating_sub(self.app_bytes_per_s).clamp(self.min_bytes_per_s, self.max_bytes_per_s)
    }

    /// The application's write rate as last measured.
    pub fn app_write_bytes_per_s(&self) -> u64 {
        self.app_bytes_per_s
    }

    /// Moves the clock to `now_ms`: refills the budget and samples the application's write rate
    /// (`app_write_bytes` is its running total). A clock that goes backwards counts as no time.
    pub fn advance(&mut self, now_ms: u64, app_write_bytes: u64) {
        let elapsed_ms = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        let rate = self.rate_bytes_per_s();
        let refill = clamp_i64(u128::from(rate) * u128::from(elapsed_ms) / 1000);
        let cap = clamp_i64(u128::from(rate) * u128::from(BURST_MS) / 1000);
        self.budget_bytes = self.budget_bytes.saturating_add(refill).min(cap);

        let window_ms = self.last_ms - self.sample_start_ms;
        if window_ms >= SAMPLE_MS {
            let written = app_write_bytes.saturating_sub(self.sample_start_app_bytes);
            let sample = (u128::from(written) * 1000 / u128::from(window_ms)).min(u128::from(u64::MAX)) as u64;
            // Half old, half new: a burst shows within a sample or two, a single quiet window
            // does not hand the whole budget back to the resync.
            self.app_bytes_per_s = self.app_bytes_per_s / 2 + sample / 2;
            self.sample_start_ms = self.last_ms;
            self.sample_start_app_bytes = app_write_bytes;
        }
    }

    /// Milliseconds to wait before the next chunk may go (0: now).
    pub fn wait_ms(&self) -> u64 {
        if self.budget_bytes >= 0 {
            return 0;
        }
        let debt = u128::from(self.budget_bytes.unsigned_abs());
        (debt * 1000).div_ceil(u128::from(self.rate_bytes_per_s())).min(u128::from(u64::MAX)) as u64
    }

    /// `bytes` were sent (or read, for verify).
    pub fn spend(&mut self, bytes: u64) {
        self.budget_bytes = self.budget_bytes.saturating_sub(clamp_i64(u128::from(bytes)));
    }
}

fn clamp_i64(value: u128) -> i64 {
    value.min(i64::MAX as u128) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Drives the controller one millisecond at a time from `from_ms` to `to_ms` while the
    /// application writes `app_bytes_per_s`; sends `chunk` bytes whenever allowed. Returns the
    /// bytes sent and the application's running total.
    fn run(rate: &mut ResyncRate, from_ms: u64, to_ms: u64, app: (u64, u64), chunk: u64) -> (u64, u64) {
        let (app_bytes_per_s, mut app_total) = app;
        let mut sent = 0;
        for now in from_ms..to_ms {
            app_total += app_bytes_per_s / 1000;
            rate.advance(now, app_total);
            while rate.wait_ms() == 0 {
                rate.spend(chunk);
                sent += chunk;
            }
        }
        (sent, app_total)
    }

    fn limits(max_bytes_per_s: u64, min_bytes_per_s: u64) -> RateLimits {
        RateLimits { max_bytes_per_s, min_bytes_per_s }
    }

    fn within(value: u64, expected: u64, tolerance: u64) -> bool {
        value.abs_diff(expected) <= tolerance
    }

    #[test]
    fn an_idle_application_leaves_the_whole_maximum() {
        let mut rate = ResyncRate::new(limits(10 * MIB, MIB / 4), 0, 0);
        let (sent, _) = run(&mut rate, 0, 10_000, (0, 0), 256 << 10);
        assert!(within(sent, 100 * MIB, MIB), "sent {sent} in 10 s at 10 MiB/s");
        assert_eq!(rate.rate_bytes_per_s(), 10 * MIB);
    }

    #[test]
    fn application_writes_take_their_share_of_the_maximum() {
        let mut rate = ResyncRate::new(limits(100 * MIB, MIB), 0, 0);
        let (_, app) = run(&mut rate, 0, 2_000, (60 * MIB, 0), 256 << 10);
        assert!(within(rate.app_write_bytes_per_s(), 60 * MIB, MIB), "{}", rate.app_write_bytes_per_s());
        assert!(within(rate.rate_bytes_per_s(), 40 * MIB, MIB), "{}", rate.rate_bytes_per_s());
        let (sent, _) = run(&mut rate, 2_000, 12_000, (60 * MIB, app), 256 << 10);
        assert!(within(sent, 400 * MIB, 4 * MIB), "resync sent {sent} in 10 s beside 60 MiB/s of writes");
    }

    #[test]
    fn a_busy_application_still_leaves_the_minimum() {
        let mut rate = ResyncRate::new(limits(50 * MIB, 2 * MIB), 0, 0);
        let (_, app) = run(&mut rate, 0, 2_000, (200 * MIB, 0), 64 << 10);
        assert_eq!(rate.rate_bytes_per_s(), 2 * MIB);
        let (sent, _) = run(&mut rate, 2_000, 12_000, (200 * MIB, app), 64 << 10);
        assert!(within(sent, 20 * MIB, MIB), "minimum rate not kept: {sent}");
    }

    #[test]
    fn the_resync_speeds_up_again_when_the_application_stops() {
        let mut rate = ResyncRate::new(limits(100 * MIB, MIB), 0, 0);
        let (_, app) = run(&mut rate, 0, 2_000, (80 * MIB, 0), 256 << 10);
        assert!(rate.rate_bytes_per_s() < 25 * MIB);
        run(&mut rate, 2_000, 3_000, (0, app), 256 << 10);
        assert!(within(rate.rate_bytes_per_s(), 100 * MIB, MIB), "{}", rate.rate_bytes_per_s());
    }

    #[test]
    fn no_burst_after_a_pause() {
        let mut rate = ResyncRate::new(limits(10 * MIB, MIB), 0, 0);
        rate.advance(60_000, 0);
        let mut sent = 0;
        while rate.wait_ms() == 0 {
            rate.spend(4096);
            sent += 4096;
        }
        assert!(sent <= MIB + 4096, "a minute idle let {sent} bytes out at once");
        assert!(rate.wait_ms() > 0);
    }

    #[test]
    fn the_wait_pays_back_a_large_chunk() {
        let mut rate = ResyncRate::new(limits(MIB, MIB / 4), 0, 0);
        rate.spend(MIB);
        assert_eq!(rate.wait_ms(), 1000);
        rate.advance(500, 0);
        assert_eq!(rate.wait_ms(), 500);
        rate.advance(400, 0);
        assert_eq!(rate.wait_ms(), 500, "a clock going backwards adds no budget");
        rate.advance(1000, 0);
        assert_eq!(rate.wait_ms(), 0);
    }
}
