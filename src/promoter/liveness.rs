//! Whether the daemon answers (pure: the times are given). The events stream cannot tell a hung
//! daemon from a quiet one: a stopped process (SIGSTOP, a machine paused) and a resource where
//! nothing changes both send nothing. So the driver asks the daemon for its status every ping
//! interval, one request at a time, and reports when each goes out and when it is answered.
//!
//! A probe left unanswered for longer than the daemon's quorum lease (half its ping timeout)
//! makes the daemon silent: its peers drop a daemon that silent once the ping timeout passes and
//! elect another primary, whose promoter starts the services there, so this node's are stopped
//! first (without a demotion, which a hung daemon would not answer either). The quorum keeps
//! the device itself from changing here; the services above it (a virtual IP, a process writing
//! elsewhere) have only this. It narrows the overlap to what the stops take beyond that margin,
//! and is no fence: a node that hangs as a whole hangs its promoter too.
//!
//! A daemon that answers again settles for a ping timeout before its services may start again:
//! a primary resumed after its peers elected another still holds its old state for a moment,
//! until its links' timeouts and the peers' frames tell it that it was superseded.

use std::time::{Duration, Instant};

/// What the daemon's answers allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answers {
    /// Every probe so far was answered in time (one may be out, within its deadline: see
    /// [`Liveness::probe_deadline`]).
    Answering,
    /// A probe went unanswered past its deadline.
    Silent,
    /// Silent, then answered: not to be trusted as primary before the instant given.
    Settling(Instant),
}

#[derive(Debug)]
pub struct Liveness {
    deadline: Duration,
    settle: Duration,
    /// When the probe awaiting its answer went out.
    out_since: Option<Instant>,
    /// After a silence: when the daemon is trusted again.
    trusted_from: Option<Instant>,
}

impl Liveness {
    /// `deadline`: how long a probe may go unanswered; `settle`: how long after a silence the
    /// daemon is not trusted as primary.
    pub fn new(deadline: Duration, settle: Duration) -> Liveness {
        Liveness { deadline, settle, out_since: None, trusted_from: None }
    }

    /// A probe went out at `at` (one already out keeps its earlier start).
    pub fn probe_sent(&mut self, at: Instant) {
        self.out_since.get_or_insert(at);
    }

    /// The daemon answered at `at` (a refusal, or "not running", is an answer too).
    pub fn probe_answered(&mut self, at: Instant) {
        if let Some(since) = self.out_since.take() {
            if at >= since + self.deadline {
                self.trusted_from = Some(at + self.settle);
            }
        }
    }

    pub fn answers(&self, now: Instant) -> Answers {
        match (self.out_since, self.trusted_from) {
            (Some(since), _) if now >= since + self.deadline => Answers::Silent,
            (_, Some(until)) if now < until => Answers::Settling(until),
            _ => Answers::Answering,
        }
    }

    /// When the probe out now becomes a silence, if one is out: a primary's decider wakes then,
    /// settling or not.
    pub fn probe_deadline(&self) -> Option<Instant> {
        self.out_since.map(|since| since + self.deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINE: Duration = Duration::from_secs(1);
    const SETTLE: Duration = Duration::from_secs(2);

    #[test]
    fn a_probe_answered_in_time_leaves_the_daemon_answering() {
        let t = Instant::now();
        let mut l = Liveness::new(DEADLINE, SETTLE);
        assert_eq!(l.answers(t), Answers::Answering);
        l.probe_sent(t);
        assert_eq!((l.answers(t), l.probe_deadline()), (Answers::Answering, Some(t + DEADLINE)));
        l.probe_answered(t + DEADLINE / 2);
        assert_eq!((l.answers(t + DEADLINE * 10), l.probe_deadline()), (Answers::Answering, None));
    }

    #[test]
    fn a_probe_unanswered_past_its_deadline_is_silence_until_answered_then_settles() {
        let t = Instant::now();
        let mut l = Liveness::new(DEADLINE, SETTLE);
        l.probe_sent(t);
        // The next probe, sent while the first is still out, does not move the deadline.
        l.probe_sent(t + DEADLINE / 2);
        assert_eq!(l.answers(t + DEADLINE), Answers::Silent);
        assert_eq!(l.answers(t + DEADLINE * 30), Answers::Silent, "for as long as nothing answers");
        let back = t + DEADLINE * 30;
        l.probe_answered(back);
        assert_eq!(l.answers(back), Answers::Settling(back + SETTLE));
        assert_eq!(l.answers(back + SETTLE), Answers::Answering);
    }

    #[test]
    fn a_late_answer_settles_even_if_nobody_looked_in_between() {
        let t = Instant::now();
        let mut l = Liveness::new(DEADLINE, SETTLE);
        l.probe_sent(t);
        l.probe_answered(t + DEADLINE);
        assert_eq!(l.answers(t + DEADLINE), Answers::Settling(t + DEADLINE + SETTLE));
    }
}
