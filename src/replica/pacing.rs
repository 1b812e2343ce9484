//! Pacing of the walks that read ranges for a peer: a resync as its source and an online
//! verify. The rate controller (`core::resync_rate`) gives a walk what the application's writes
//! leave of `resync_rate_max_kib`, never less than `resync_rate_min_kib`. It lives here, not in
//! a driver, so the simulator paces its walks on its own clock exactly as the daemon does.
//!
//! One controller per peer: a resync and a verify with the same peer never run at once (a verify
//! needs an Established peer), and starting either starts the budget over.

use super::Replica;
use crate::core::resync_rate::ResyncRate;
use std::time::{Duration, Instant};

impl Replica {
    /// A walk with `peer_id` starts now: its budget starts empty, its measure of the
    /// application's writes from what was written so far.
    pub(super) fn start_pacing(&mut self, peer_id: u8, now: Instant) {
        let rate = ResyncRate::new(self.resync_rate, self.millis(now), self.app_write_bytes);
        self.peer_mut(peer_id).sync.pace = Some(rate);
    }

    /// How long the walk with `peer_id` waits before its next read, when it must.
    pub(super) fn pace_wait(&mut self, peer_id: u8, now: Instant) -> Option<Duration> {
        let (now_ms, app_write_bytes) = (self.millis(now), self.app_write_bytes);
        let pace = self.peer_mut(peer_id).sync.pace.as_mut()?;
        pace.advance(now_ms, app_write_bytes);
        Some(pace.wait_ms()).filter(|&ms| ms > 0).map(Duration::from_millis)
    }

    /// The walk with `peer_id` read `bytes`: the budget pays for them.
    pub(super) fn paced(&mut self, peer_id: u8, bytes: u64) {
        if let Some(pace) = self.peer_mut(peer_id).sync.pace.as_mut() {
            pace.spend(bytes);
        }
    }

    /// `now` in milliseconds since this replica attached: the controller's clock.
    fn millis(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.attached_at).as_millis()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use crate::core::resync_rate::RateLimits;
    use crate::replica::testing::primary_replicating;
    use crate::replica::{Replica, VerifyStep};
    use std::time::{Duration, Instant};

    const MIB: u64 = 1 << 20;

    /// Runs a verify with peer 1 to its end, answering each request at once and writing
    /// `app_bytes_per_ms` of application data every millisecond; returns how long it took.
    fn verify_duration(r: &mut Replica, t0: Instant, app_bytes_per_ms: u64) -> Duration {
        let generation = r.verify_start(t0).expect("an Established peer")[0].1;
        let mut now = t0;
        let tick = Duration::from_millis(1);
        loop {
            match r.verify_next(now, 1, generation) {
                VerifyStep::Read { offset, len } => {
                    r.verify_chunk_read(1, offset, len, vec![[0u8; 32]; (len / 4096) as usize]);
                    r.verify_reply_received(1, offset, (len / 4096) as u32, &[]);
                }
                VerifyStep::Pace(wait) => {
                    let wait = wait.max(tick);
                    r.app_write_bytes += app_bytes_per_ms * wait.as_millis() as u64;
                    now += wait;
                }
                VerifyStep::Finished => return now - t0,
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn an_idle_application_leaves_a_verify_the_maximum_rate() {
        let (mut r, t0) = primary_replicating();
        r.resync_rate = RateLimits { max_bytes_per_s: 4 * MIB, min_bytes_per_s: MIB };
        let took = verify_duration(&mut r, t0, 0);
        let expected = Duration::from_millis(r.sb.data_size * 1000 / (4 * MIB));
        assert!(took.abs_diff(expected) < expected / 20, "{} MiB took {took:?} at 4 MiB/s", r.sb.data_size / MIB);
    }

    #[test]
    fn a_verify_beside_application_writes_gets_what_they_leave_and_never_less_than_the_minimum() {
        for (app_mib_per_s, walk_mib_per_s) in [(2, 2), (7, 1)] {
            let (mut r, t0) = primary_replicating();
            r.resync_rate = RateLimits { max_bytes_per_s: 4 * MIB, min_bytes_per_s: MIB };
            let took = verify_duration(&mut r, t0, app_mib_per_s * MIB / 1000);
            let expected = Duration::from_millis(r.sb.data_size * 1000 / (walk_mib_per_s * MIB));
            // The controller samples the application over 100 ms windows: the first ones go
            // at the maximum.
            assert!(took.abs_diff(expected) < expected / 10, "writes at {app_mib_per_s} MiB/s: took {took:?}, expected {expected:?}");
        }
    }

    #[test]
    fn a_resync_source_waits_for_the_budget_its_last_chunk_spent() {
        use crate::core::states::ReplState;
        use crate::replica::{ResyncChunk, ResyncStep};
        let (mut r, t0) = crate::replica::testing::two_node_replica();
        r.link_up(1, t0);
        r.peer_mut(1).repl = ReplState::SyncSource;
        r.resync_rate = RateLimits { max_bytes_per_s: 4 * MIB, min_bytes_per_s: MIB };
        r.bitmaps[0].set_range(0, 2 * MIB);
        r.resync_source_started(t0, 1);
        let ResyncStep::Read { offset, len, .. } = r.resync_next(t0, 1, false) else { panic!("a first read") };
        r.resync_chunk_read(1, offset, len, ResyncChunk::Data(bytes::Bytes::from(vec![0u8; len as usize])));
        let owed = Duration::from_millis((len * 1000).div_ceil(4 * MIB));
        assert_eq!(r.resync_next(t0, 1, false), ResyncStep::Pace(owed), "{len} bytes at 4 MiB/s");
        let waited = Duration::from_millis(31);
        assert_eq!(r.resync_next(t0 + waited, 1, false), ResyncStep::Pace(owed - waited));
        assert!(matches!(r.resync_next(t0 + owed, 1, false), ResyncStep::Read { offset: next, .. } if next == offset + len));
    }
}
