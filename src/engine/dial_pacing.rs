//! When a dialer tries its peer again: soon after an attempt that failed, later after links that
//! go as soon as they come up. The dialer's thread (`connection::spawn_dialers`) keeps one per
//! peer and asks it before each attempt; it reads no clock (the times are given).

use std::time::{Duration, Instant};

pub const DIAL_INTERVAL: Duration = Duration::from_millis(300);
/// After a peer refused the connection (it is StandAlone, or refuses this node): it will not
/// change its mind within a dial interval, and each refusal costs it a handshake.
pub const REFUSED_RETRY: Duration = Duration::from_secs(2);
/// A link this node dialed that goes within `FLAP_WINDOW` of coming up went for a reason a
/// moment does not change (a secondary whose disk is full fails the first writes of every
/// resync; a peer that breaks the protocol again): the next dial waits twice as long as the last
/// wait, up to `FLAP_WAIT_MAX`, so a flapping link costs a handshake, a resync's first blocks and
/// two log lines every few seconds, not three times a second. A link that lasts resets the wait.
const FLAP_WINDOW: Duration = Duration::from_secs(10);
const FLAP_WAIT_MAX: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct DialPacing {
    /// When the last attempt started.
    last_attempt: Option<Instant>,
    /// When the attempt that made the current link started, while it lives.
    linked_at: Option<Instant>,
    /// The least time between two attempts.
    wait: Duration,
}

impl Default for DialPacing {
    fn default() -> Self {
        DialPacing { last_attempt: None, linked_at: None, wait: DIAL_INTERVAL }
    }
}

impl DialPacing {
    /// How long to wait before the next attempt, the peer being unlinked at `now`; `None`: go.
    /// At most one attempt per wait, also when the last one connected and was closed at once
    /// (a peer that refuses after its handshake).
    pub fn wait_before_attempt(&mut self, now: Instant) -> Option<Duration> {
        if let Some(at) = self.linked_at.take() {
            self.wait = if now.saturating_duration_since(at) < FLAP_WINDOW {
                (self.wait * 2).clamp(DIAL_INTERVAL, FLAP_WAIT_MAX)
            } else {
                DIAL_INTERVAL
            };
        }
        let rest = self.wait.checked_sub(now.saturating_duration_since(self.last_attempt?))?;
        (!rest.is_zero()).then_some(rest)
    }

    pub fn attempting(&mut self, now: Instant) {
        self.last_attempt = Some(now);
    }

    /// The attempt made a link.
    pub fn linked(&mut self) {
        self.linked_at = self.last_attempt;
    }

    /// The attempt made no link (the peer could not be reached, or went during the handshake,
    /// or refused): it was down, cut off or restarting, and when it answers again that is news
    /// the flapping wait must not sit out, as a peer that never linked is not waited for either
    /// (the caller still sleeps between attempts). The link it makes is one that quorum counts: a
    /// witness that waited 5 s after a peer's restart left that peer without quorum as long, and
    /// a failover to it took twice as long (seen in `tests/chaos.rs`, where links live a few
    /// seconds between faults).
    pub fn failed(&mut self) {
        self.wait = DIAL_INTERVAL;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The waits a dialer makes over links that each lasted `lasted`.
    fn waits_after_links(pacing: &mut DialPacing, start: Instant, lasted: Duration, links: usize) -> Vec<u128> {
        let mut now = start;
        let mut waits = Vec::new();
        for _ in 0..links {
            pacing.attempting(now);
            pacing.linked();
            now += lasted;
            let wait = pacing.wait_before_attempt(now).unwrap_or_default();
            waits.push((wait + lasted).as_millis());
            now += wait;
        }
        waits
    }

    #[test]
    fn a_link_that_goes_at_once_makes_the_next_dial_wait_longer_and_one_that_lasts_resets_it() {
        let start = Instant::now();
        let mut pacing = DialPacing::default();
        let quick = Duration::from_millis(50);
        assert_eq!(waits_after_links(&mut pacing, start, quick, 6), [600, 1200, 2400, 4800, 5000, 5000]);
        let now = start + Duration::from_secs(60);
        pacing.attempting(now);
        pacing.linked();
        assert_eq!(pacing.wait_before_attempt(now + FLAP_WINDOW), None, "a link that lasted: dial at once");
        pacing.attempting(now + FLAP_WINDOW);
        assert_eq!(pacing.wait_before_attempt(now + FLAP_WINDOW), Some(DIAL_INTERVAL), "then once per interval");
    }

    #[test]
    fn a_peer_whose_dial_failed_is_dialed_again_at_the_interval_even_after_flapping_links() {
        let start = Instant::now();
        let mut pacing = DialPacing::default();
        waits_after_links(&mut pacing, start, Duration::from_millis(50), 6);
        let now = start + Duration::from_secs(60);
        pacing.attempting(now);
        pacing.linked();
        // The link goes at once (the peer was killed); the next dial must wait out the flapping.
        let went = now + Duration::from_millis(50);
        assert_eq!(pacing.wait_before_attempt(went), Some(FLAP_WAIT_MAX - Duration::from_millis(50)));
        let tried = now + FLAP_WAIT_MAX;
        pacing.attempting(tried);
        pacing.failed();
        assert_eq!(pacing.wait_before_attempt(tried + DIAL_INTERVAL), None, "the peer's return is news: dial again at once");
        pacing.attempting(tried + DIAL_INTERVAL);
        pacing.failed();
        assert_eq!(pacing.wait_before_attempt(tried + DIAL_INTERVAL), Some(DIAL_INTERVAL));
    }
}
