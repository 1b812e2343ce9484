//! The promoter's decisions, pure (no I/O; the time is given): from the last [`View`] of its
//! resource, what to do next, and where each outcome leads.
//!
//! The promoter never decides who may be primary: the daemon does, and refuses a promotion
//! without quorum or while another node is primary. What the promoter adds is timing, so that
//! the best-placed node usually promotes first and the others see it and stand down, and the
//! services above the device: started only on a primary with quorum, stopped before a demotion,
//! and stopped as soon as quorum goes.

use super::liveness::{Answers, Liveness};
use super::view::View;
use crate::config::{OnStopFailure, PromoterConfig};
use std::time::{Duration, Instant};

/// After a service failed to start, or a local write failed (and everything was stopped and the
/// node demoted), no promotion for this long, so that another node can take over.
pub const BACK_OFF: Duration = Duration::from_secs(30);

/// A refused promotion is tried again at the next change of the view, or after this long when
/// nothing changes (the refusal's reason may not show in the events).
pub const REFUSED_RETRY: Duration = Duration::from_secs(10);

/// A demotion that failed (the device still in use) is tried again, with the stops, this often.
pub const DEMOTE_RETRY: Duration = Duration::from_secs(5);

/// How long lines that contradict the promoter's own last promotion or demotion are taken for
/// lines sampled before it (the daemon samples every 100 ms; this is a bound, not a wait).
const STALE_LINES: Duration = Duration::from_secs(2);

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing until the view changes, or `until` passes when given.
    Wait(Option<Instant>),
    /// `primary` (never `--force`).
    Promote,
    /// Start every service, in order; report with [`Decider::started`].
    Start,
    /// Stop the first `count` services, last first; report with [`Decider::stopped`].
    Stop { count: usize, why: &'static str },
    /// `secondary`; report with [`Decider::demoted`].
    Demote { why: &'static str },
    /// Leave; `failed` when services could not be stopped or the node not demoted.
    Exit { failed: bool },
}

/// Where this node stands among the data nodes that may be promoted: `rank` of `ranks`, by node
/// id. It spaces the promotions of equally good nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub rank: u32,
    pub ranks: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Not primary as far as the promoter knows; no service runs.
    Secondary,
    /// Primary with quorum; `started` once every service is up.
    Primary { started: bool },
    /// Stop the first `stop` services (last first), then demote if `demote`; not before
    /// `not_before` (a retry).
    Cleanup { stop: usize, demote: bool, not_before: Option<Instant>, why: &'static str },
    Exited { failed: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Hold {
    /// A service failed to start here: no promotion before then.
    Until(Instant),
    /// The daemon refused a promotion: none until the view differs from `view`, or `until`.
    Refused { view: Option<View>, until: Instant },
}

#[derive(Debug)]
pub struct Decider {
    services: usize,
    promote_delay: Duration,
    placement: Placement,
    on_stop_failure: OnStopFailure,
    phase: Phase,
    view: Option<View>,
    /// Whether this node's own last promotion (true) or demotion (false) made it primary, until
    /// a line shows it or the bound passes: lines the daemon sampled before the command took
    /// effect may still arrive, and must not read as a step-down (or a promotion by hand).
    expected: Option<(bool, Instant)>,
    /// Since when this node has been a candidate (may promote, nobody primary).
    candidate_since: Option<Instant>,
    hold: Option<Hold>,
    /// A stop failed since the last successful one (the exit status says so).
    stop_failed: bool,
    shutting_down: bool,
    /// Whether the daemon answers its probes (a hung one sends no events either).
    liveness: Liveness,
}

impl Decider {
    /// `liveness`: how the daemon's answers to the driver's probes are judged.
    pub fn new(config: &PromoterConfig, placement: Placement, liveness: Liveness) -> Decider {
        Decider {
            services: config.commands.len() + config.units.len(),
            promote_delay: config.promote_delay,
            placement,
            on_stop_failure: config.on_stop_failure,
            phase: Phase::Secondary,
            view: None,
            expected: None,
            candidate_since: None,
            hold: None,
            stop_failed: false,
            shutting_down: false,
            liveness,
        }
    }

    /// A new view (`None`: the daemon is not running).
    pub fn observe(&mut self, view: Option<View>, now: Instant) {
        match (&view, self.expected) {
            (None, _) => self.expected = None,
            (Some(v), Some((primary, until))) if v.primary != primary && now < until => return,
            (Some(_), _) => self.expected = None,
        }
        self.view = view;
    }

    /// A probe of the daemon went out at `at`.
    pub fn probe_sent(&mut self, at: Instant) {
        self.liveness.probe_sent(at);
    }

    /// The daemon answered a probe at `at`.
    pub fn probe_answered(&mut self, at: Instant) {
        self.liveness.probe_answered(at);
    }

    /// SIGTERM or SIGINT: stop the services and demote if primary, then exit.
    pub fn shutdown(&mut self) {
        self.shutting_down = true;
    }

    pub fn next(&mut self, now: Instant) -> Step {
        match self.phase.clone() {
            Phase::Exited { failed } => Step::Exit { failed },
            Phase::Cleanup { not_before: Some(t), .. } if t > now && !self.shutting_down => Step::Wait(Some(t)),
            Phase::Cleanup { stop, why, .. } if stop > 0 => Step::Stop { count: stop, why },
            Phase::Cleanup { why, .. } => Step::Demote { why },
            Phase::Primary { started } => {
                let answers = self.liveness.answers(now);
                let why = match &self.view {
                    _ if self.shutting_down => "shutting down",
                    None => "the daemon went away",
                    _ if answers == Answers::Silent => "the daemon does not answer",
                    Some(view) if !view.primary => "the daemon is no longer Primary",
                    Some(view) if !view.quorum => "quorum lost",
                    Some(view) if view.write_failed => "a local write failed",
                    // Woken when a probe out would become a silence.
                    Some(_) if started => return Step::Wait(self.liveness.probe_deadline()),
                    Some(_) => return Step::Start,
                };
                // A daemon that went away or stepped down holds no role to give up; a silent
                // one would not answer the demotion.
                let demote = self.view.as_ref().is_some_and(|v| v.primary) && answers != Answers::Silent;
                if self.view.as_ref().is_some_and(|v| v.write_failed) {
                    // Its disk may be dying: a node whose disk did not fail takes over.
                    self.hold = Some(Hold::Until(now + BACK_OFF));
                }
                self.clean_up(if started { self.services } else { 0 }, demote, why);
                self.next(now)
            }
            Phase::Secondary => self.next_as_secondary(now),
        }
    }

    fn next_as_secondary(&mut self, now: Instant) -> Step {
        if self.shutting_down {
            self.phase = Phase::Exited { failed: self.stop_failed };
            return self.next(now);
        }
        let Some(view) = self.view.clone() else {
            self.candidate_since = None;
            return Step::Wait(None);
        };
        match self.liveness.answers(now) {
            // What the view says may be stale: nothing is started or promoted on it until the
            // daemon answers, and has had its time to learn what happened meanwhile.
            Answers::Silent => {
                self.candidate_since = None;
                return Step::Wait(None);
            }
            Answers::Settling(until) => {
                self.candidate_since = None;
                return Step::Wait(Some(until));
            }
            Answers::Answering => {}
        }
        if view.primary {
            // Primary without this promoter's doing: promoted by hand, or by a promoter that ran
            // before this one. Its services follow the role as if this one had promoted it; without
            // quorum they may still run from before, and stop (stops must find nothing to stop
            // harmless).
            if view.quorum {
                self.phase = Phase::Primary { started: false };
            } else {
                self.clean_up(self.services, true, "Primary without quorum");
            }
            return self.next(now);
        }
        let held_until = match &self.hold {
            Some(Hold::Until(until)) if now < *until => Some(*until),
            Some(Hold::Refused { view: refused, until }) if now < *until && refused.as_ref() == Some(&view) => Some(*until),
            _ => {
                self.hold = None;
                None
            }
        };
        let score = match view.promotion_score {
            Some(score) if view.may_promote && view.quorum && !view.peer_primary && held_until.is_none() => score,
            _ => {
                self.candidate_since = None;
                return Step::Wait(held_until);
            }
        };
        let deadline = *self.candidate_since.get_or_insert(now) + self.delay(score);
        if now >= deadline {
            Step::Promote
        } else {
            Step::Wait(Some(deadline))
        }
    }

    /// How long a candidate with this score waits before promoting: tiers of the daemon's
    /// scores (docs/OPERATIONS.md, "States": 10000, 1000, 10, 0), each `ranks` delays long, so
    /// that any better-scored node goes first whatever its rank; within a tier, by rank.
    fn delay(&self, score: u32) -> Duration {
        let tier = match score {
            10_000.. => 0,
            1_000.. => 1,
            10.. => 2,
            _ => 3,
        };
        self.promote_delay * (tier * self.placement.ranks + self.placement.rank)
    }

    fn clean_up(&mut self, stop: usize, demote: bool, why: &'static str) {
        self.phase = if stop == 0 && !demote { Phase::Secondary } else { Phase::Cleanup { stop, demote, not_before: None, why } };
    }

    /// The role this node's own command gave it, known before a line shows it.
    fn assume_role(&mut self, primary: bool, now: Instant) {
        self.expected = Some((primary, now + STALE_LINES));
        if let Some(view) = &mut self.view {
            view.primary = primary;
        }
    }

    /// The outcome of [`Step::Promote`]: `false` when the daemon refused (or did not answer).
    pub fn promoted(&mut self, ok: bool, now: Instant) {
        self.candidate_since = None;
        if ok {
            self.phase = Phase::Primary { started: false };
            self.assume_role(true, now);
        } else {
            self.hold = Some(Hold::Refused { view: self.view.clone(), until: now + REFUSED_RETRY });
        }
    }

    /// The outcome of [`Step::Start`]: on failure, how many services were tried (the last one
    /// failed, and may have started half-way: it is stopped too).
    pub fn started(&mut self, result: Result<(), usize>, now: Instant) {
        match result {
            Ok(()) => self.phase = Phase::Primary { started: true },
            Err(tried) => {
                self.hold = Some(Hold::Until(now + BACK_OFF));
                self.clean_up(tried, true, "a service failed to start");
            }
        }
    }

    /// The outcome of [`Step::Stop`].
    pub fn stopped(&mut self, ok: bool) {
        let Phase::Cleanup { demote, why, .. } = self.phase else { return };
        self.stop_failed = !ok;
        if !ok && self.on_stop_failure == OnStopFailure::Exit {
            self.phase = Phase::Exited { failed: true };
            return;
        }
        // Under "log" the demotion is tried all the same: it is refused while the device is
        // in use, and retried with the stops.
        self.clean_up(0, demote, why);
    }

    /// The outcome of [`Step::Demote`] (a daemon that is not running counts as demoted: it holds
    /// no role).
    pub fn demoted(&mut self, ok: bool, now: Instant) {
        if ok {
            self.phase = Phase::Secondary;
            self.assume_role(false, now);
        } else if self.shutting_down {
            self.phase = Phase::Exited { failed: true };
        } else {
            self.phase =
                Phase::Cleanup { stop: self.services, demote: true, not_before: Some(now + DEMOTE_RETRY), why: "retrying the demotion" };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServiceCommands;

    const DELAY: Duration = Duration::from_secs(1);
    const PROBE_DEADLINE: Duration = Duration::from_secs(1);
    const SETTLE: Duration = Duration::from_secs(2);

    fn liveness() -> Liveness {
        Liveness::new(PROBE_DEADLINE, SETTLE)
    }

    fn config(services: usize, on_stop_failure: OnStopFailure) -> PromoterConfig {
        PromoterConfig {
            commands: (0..services).map(|i| ServiceCommands { start: format!("start {i}"), stop: format!("stop {i}") }).collect(),
            units: Vec::new(),
            systemctl: "systemctl".into(),
            start_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(60),
            promote_delay: DELAY,
            on_stop_failure,
        }
    }

    fn decider(rank: u32) -> Decider {
        Decider::new(&config(2, OnStopFailure::Log), Placement { rank, ranks: 2 }, liveness())
    }

    /// A secondary that may promote, with the daemon's best score.
    fn candidate() -> View {
        View { primary: false, quorum: true, may_promote: true, promotion_score: Some(10_000), peer_primary: false, write_failed: false }
    }

    fn primary() -> View {
        View { primary: true, quorum: true, may_promote: false, promotion_score: Some(10_000), peer_primary: false, write_failed: false }
    }

    fn without_quorum(view: View) -> View {
        View { quorum: false, may_promote: false, promotion_score: None, ..view }
    }

    /// Promotes `d` (the first-ranked, with the best score) and starts its services.
    fn running(d: &mut Decider, t: Instant) {
        d.observe(Some(candidate()), t);
        assert_eq!(d.next(t), Step::Promote);
        d.promoted(true, t);
        assert_eq!(d.next(t), Step::Start);
        d.started(Ok(()), t);
        d.observe(Some(primary()), t);
        assert_eq!(d.next(t), Step::Wait(None));
    }

    #[test]
    fn the_first_ranked_node_promotes_at_once_and_the_next_one_waits_its_turn() {
        let t = Instant::now();
        let mut second = decider(1);
        second.observe(Some(candidate()), t);
        assert_eq!(second.next(t), Step::Wait(Some(t + DELAY)));
        assert_eq!(second.next(t + DELAY / 2), Step::Wait(Some(t + DELAY)), "the wait runs from when it became a candidate");
        // The first one's promotion shows: it stands down.
        second.observe(Some(View { may_promote: false, promotion_score: None, peer_primary: true, ..candidate() }), t + DELAY / 2);
        assert_eq!(second.next(t + DELAY), Step::Wait(None));
        let mut first = decider(0);
        running(&mut first, t);
    }

    #[test]
    fn a_better_score_goes_first_whatever_the_rank() {
        let t = Instant::now();
        let mut first_ranked = decider(0);
        first_ranked.observe(Some(View { promotion_score: Some(1_000), ..candidate() }), t);
        let mut better = decider(1);
        better.observe(Some(candidate()), t);
        let wait = |d: &mut Decider| match d.next(t) {
            Step::Wait(Some(until)) => until - t,
            other => panic!("{other:?}"),
        };
        assert!(wait(&mut better) < wait(&mut first_ranked));
        let mut last_resort = decider(0);
        last_resort.observe(Some(View { promotion_score: Some(0), ..candidate() }), t);
        assert_eq!(wait(&mut last_resort), DELAY * 6);
    }

    #[test]
    fn no_candidate_without_may_promote_quorum_or_a_score() {
        let t = Instant::now();
        for view in [
            View { may_promote: false, ..candidate() },
            View { quorum: false, ..candidate() },
            View { promotion_score: None, ..candidate() },
            View { peer_primary: true, ..candidate() },
        ] {
            let mut d = decider(0);
            d.observe(Some(view.clone()), t);
            assert_eq!(d.next(t + DELAY * 100), Step::Wait(None), "{view:?}");
        }
        let mut d = decider(0);
        assert_eq!(d.next(t), Step::Wait(None), "a daemon not running is waited for");
    }

    #[test]
    fn a_refused_promotion_waits_for_a_change_never_forces() {
        let t = Instant::now();
        let mut d = decider(0);
        d.observe(Some(candidate()), t);
        assert_eq!(d.next(t), Step::Promote);
        d.promoted(false, t);
        assert_eq!(d.next(t), Step::Wait(Some(t + REFUSED_RETRY)));
        d.observe(Some(candidate()), t);
        assert_eq!(d.next(t), Step::Wait(Some(t + REFUSED_RETRY)), "the same view: no retry");
        d.observe(Some(View { promotion_score: Some(1_000), ..candidate() }), t);
        assert!(matches!(d.next(t), Step::Wait(Some(_))), "a new view: a new turn, with its delay");
        assert_eq!(d.next(t + DELAY * 2), Step::Promote);
        d.promoted(false, t + DELAY * 2);
        let retry = t + DELAY * 2 + REFUSED_RETRY;
        assert_eq!(d.next(retry), Step::Wait(Some(retry + DELAY * 2)), "nothing changed for long: a new turn");
        assert_eq!(d.next(retry + DELAY * 2), Step::Promote);
    }

    #[test]
    fn quorum_lost_stops_the_services_last_first_then_demotes() {
        let t = Instant::now();
        let mut d = decider(0);
        running(&mut d, t);
        d.observe(Some(without_quorum(primary())), t);
        assert_eq!(d.next(t), Step::Stop { count: 2, why: "quorum lost" });
        d.stopped(true);
        assert_eq!(d.next(t), Step::Demote { why: "quorum lost" });
        d.demoted(true, t);
        // A line sampled before the demotion still says Primary: not taken for a promotion by hand.
        d.observe(Some(without_quorum(primary())), t);
        assert_eq!(d.next(t), Step::Wait(None));
        d.observe(Some(without_quorum(candidate())), t);
        d.observe(Some(candidate()), t + DELAY);
        assert_eq!(d.next(t + DELAY), Step::Promote, "quorum back: a candidate again");
    }

    #[test]
    fn a_line_from_before_the_promotion_is_not_a_step_down_but_a_later_one_is() {
        let t = Instant::now();
        let mut d = decider(0);
        d.observe(Some(candidate()), t);
        assert_eq!(d.next(t), Step::Promote);
        d.promoted(true, t);
        d.observe(Some(candidate()), t);
        assert_eq!(d.next(t), Step::Start);
        d.started(Ok(()), t);
        d.observe(Some(primary()), t);
        // The daemon stepped down by itself (another node was promoted): nothing to demote.
        d.observe(Some(View { peer_primary: true, may_promote: false, promotion_score: None, ..candidate() }), t);
        assert_eq!(d.next(t), Step::Stop { count: 2, why: "the daemon is no longer Primary" });
        d.stopped(true);
        assert_eq!(d.next(t), Step::Wait(None));
    }

    #[test]
    fn a_daemon_that_dies_under_the_services_stops_them_without_a_demotion() {
        let t = Instant::now();
        let mut d = decider(0);
        running(&mut d, t);
        d.observe(None, t);
        assert_eq!(d.next(t), Step::Stop { count: 2, why: "the daemon went away" });
        d.stopped(true);
        assert_eq!(d.next(t), Step::Wait(None));
        // Back, and another node is primary: it stays secondary.
        d.observe(Some(View { peer_primary: true, may_promote: false, promotion_score: None, ..candidate() }), t);
        assert_eq!(d.next(t + DELAY * 10), Step::Wait(None));
    }

    #[test]
    fn a_failed_local_write_stops_the_services_demotes_and_backs_off() {
        let t = Instant::now();
        let mut d = decider(0);
        running(&mut d, t);
        d.observe(Some(View { write_failed: true, ..primary() }), t);
        assert_eq!(d.next(t), Step::Stop { count: 2, why: "a local write failed" });
        d.stopped(true);
        assert_eq!(d.next(t), Step::Demote { why: "a local write failed" });
        d.demoted(true, t);
        d.observe(Some(candidate()), t + DELAY);
        assert_eq!(d.next(t + DELAY), Step::Wait(Some(t + BACK_OFF)), "the other node's turn first");
    }

    #[test]
    fn a_failed_start_stops_what_was_tried_demotes_and_backs_off() {
        let t = Instant::now();
        let mut d = decider(0);
        d.observe(Some(candidate()), t);
        assert_eq!(d.next(t), Step::Promote);
        d.promoted(true, t);
        assert_eq!(d.next(t), Step::Start);
        d.started(Err(1), t);
        assert_eq!(d.next(t), Step::Stop { count: 1, why: "a service failed to start" });
        d.stopped(true);
        assert_eq!(d.next(t), Step::Demote { why: "a service failed to start" });
        d.demoted(true, t);
        d.observe(Some(candidate()), t + DELAY);
        assert_eq!(d.next(t + DELAY), Step::Wait(Some(t + BACK_OFF)));
        assert_eq!(d.next(t + BACK_OFF), Step::Promote, "then a new turn, the first-ranked one's");
    }

    #[test]
    fn a_failed_stop_exits_or_retries_as_configured() {
        let t = Instant::now();
        let mut exits = Decider::new(&config(1, OnStopFailure::Exit), Placement { rank: 0, ranks: 1 }, liveness());
        running(&mut exits, t);
        exits.observe(Some(without_quorum(primary())), t);
        assert_eq!(exits.next(t), Step::Stop { count: 1, why: "quorum lost" });
        exits.stopped(false);
        assert_eq!(exits.next(t), Step::Exit { failed: true });

        let mut logs = decider(0);
        running(&mut logs, t);
        logs.observe(Some(without_quorum(primary())), t);
        assert_eq!(logs.next(t), Step::Stop { count: 2, why: "quorum lost" });
        logs.stopped(false);
        assert_eq!(logs.next(t), Step::Demote { why: "quorum lost" });
        logs.demoted(false, t);
        assert_eq!(logs.next(t), Step::Wait(Some(t + DEMOTE_RETRY)));
        assert_eq!(logs.next(t + DEMOTE_RETRY), Step::Stop { count: 2, why: "retrying the demotion" });
        logs.stopped(true);
        assert_eq!(logs.next(t + DEMOTE_RETRY), Step::Demote { why: "retrying the demotion" });
        logs.demoted(true, t + DEMOTE_RETRY);
        assert_eq!(logs.next(t + DEMOTE_RETRY), Step::Wait(None));
    }

    /// Runs `d`'s services from `t`, then its daemon leaves a probe sent at `t` unanswered: the
    /// services are stopped. Returns when the silence was judged.
    fn silenced(d: &mut Decider, t: Instant) -> Instant {
        running(d, t);
        d.probe_sent(t);
        assert_eq!(d.next(t), Step::Wait(Some(t + PROBE_DEADLINE)), "woken to judge the probe");
        let hung = t + PROBE_DEADLINE;
        assert_eq!(d.next(hung), Step::Stop { count: 2, why: "the daemon does not answer" });
        d.stopped(true);
        hung
    }

    #[test]
    fn a_silent_daemon_loses_its_services_without_a_demotion_and_gets_them_back_once_settled() {
        let t = Instant::now();
        let mut d = decider(0);
        let hung = silenced(&mut d, t);
        assert_eq!(d.next(hung), Step::Wait(None), "no demotion asked of a silent daemon, nothing started on its stale view");
        // It answers again, still saying Primary with quorum: that may be from before.
        let back = hung + DELAY * 10;
        d.probe_answered(back);
        assert_eq!(d.next(back), Step::Wait(Some(back + SETTLE)));
        assert_eq!(d.next(back + SETTLE), Step::Start, "still Primary once settled: its services again");
    }

    #[test]
    fn a_primary_answered_late_while_its_promoter_was_busy_is_still_watched() {
        let t = Instant::now();
        let mut d = decider(0);
        running(&mut d, t);
        // A probe answered past its deadline while the decider was carrying out a step: the
        // daemon settles, and the next probe's deadline still wakes the decider.
        d.probe_sent(t);
        d.probe_answered(t + PROBE_DEADLINE * 2);
        let next_probe = t + PROBE_DEADLINE * 2;
        d.probe_sent(next_probe);
        assert_eq!(d.next(next_probe), Step::Wait(Some(next_probe + PROBE_DEADLINE)));
        assert_eq!(d.next(next_probe + PROBE_DEADLINE), Step::Stop { count: 2, why: "the daemon does not answer" });
    }

    #[test]
    fn a_daemon_superseded_while_silent_gets_no_services_back() {
        let t = Instant::now();
        let mut d = decider(0);
        silenced(&mut d, t);
        let back = t + DELAY * 10;
        d.probe_answered(back);
        d.observe(Some(without_quorum(primary())), back + SETTLE / 2);
        d.observe(Some(View { peer_primary: true, may_promote: false, promotion_score: None, ..candidate() }), back + SETTLE / 2);
        assert_eq!(d.next(back + SETTLE), Step::Wait(None));
    }

    #[test]
    fn a_silent_daemon_is_not_promoted() {
        let t = Instant::now();
        let mut d = decider(0);
        d.observe(Some(candidate()), t);
        d.probe_sent(t);
        assert_eq!(d.next(t), Step::Promote, "a probe out is no silence yet");
        let mut silent = decider(0);
        silent.observe(Some(candidate()), t);
        silent.probe_sent(t);
        assert_eq!(silent.next(t + PROBE_DEADLINE), Step::Wait(None));
        silent.probe_answered(t + PROBE_DEADLINE * 2);
        let settled = t + PROBE_DEADLINE * 2 + SETTLE;
        assert_eq!(silent.next(t + PROBE_DEADLINE * 2), Step::Wait(Some(settled)));
        assert_eq!(silent.next(settled), Step::Promote);
    }

    #[test]
    fn shutdown_stops_and_demotes_a_primary_and_leaves_a_secondary_at_once() {
        let t = Instant::now();
        let mut d = decider(0);
        running(&mut d, t);
        d.shutdown();
        assert_eq!(d.next(t), Step::Stop { count: 2, why: "shutting down" });
        d.stopped(true);
        assert_eq!(d.next(t), Step::Demote { why: "shutting down" });
        d.demoted(true, t);
        assert_eq!(d.next(t), Step::Exit { failed: false });

        let mut waiting = decider(1);
        waiting.observe(Some(candidate()), t);
        waiting.shutdown();
        assert_eq!(waiting.next(t), Step::Exit { failed: false });

        let mut stuck = decider(0);
        running(&mut stuck, t);
        stuck.shutdown();
        assert_eq!(stuck.next(t), Step::Stop { count: 2, why: "shutting down" });
        stuck.stopped(true);
        stuck.demoted(false, t);
        assert_eq!(stuck.next(t), Step::Exit { failed: true }, "a shutdown does not retry for ever");
    }

    #[test]
    fn a_node_found_primary_gets_its_services_or_loses_them_without_quorum() {
        let t = Instant::now();
        let mut by_hand = decider(1);
        by_hand.observe(Some(primary()), t);
        assert_eq!(by_hand.next(t), Step::Start);
        let mut left_over = decider(1);
        left_over.observe(Some(without_quorum(primary())), t);
        assert_eq!(left_over.next(t), Step::Stop { count: 2, why: "Primary without quorum" });
        left_over.stopped(true);
        assert_eq!(left_over.next(t), Step::Demote { why: "Primary without quorum" });
    }
}
