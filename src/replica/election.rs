//! Promotion under quorum is an election: a candidate counts only the voters that answered its
//! request with their vote, and a voter gives its vote to one candidate at a time.
//!
//! Counting votes by lease alone lets two nodes promote at once: right after a partition cuts
//! them apart, each still holds a lease on the other's last ping answer, so each counts the
//! other, neither sees the other primary (that news cannot cross the partition), and both
//! reach a majority (the simulator found this). Asking each voter first closes it: a vote is
//! an answer to this candidacy's request, sent after the request (so a cut link gives none),
//! and a voter that gave its vote promotes nobody else, itself included, for a ping timeout:
//! by then the candidate, if it won, is primary in every State the voter receives, or the
//! voter has dropped its link to it (and the candidate's lease on it has lapsed, see
//! `LinkTiming::lease`). A candidate also refuses to vote for others while it waits, so two
//! simultaneous candidates both lose and the cluster manager tries again.
//!
//! Elections are numbered (terms, kept in the superblock as `Terms`): a candidate asks for
//! votes in the term after the highest it knows, a voter gives its vote only in a term higher
//! than any it voted in or heard of, and remembers it durably before answering. So a primary
//! elected in term t no longer counts a voter that has since voted in (or heard of) a later
//! election: it was superseded, even if that voter's vote lapsed and it could reach it again.
//! The data carries the term of the primary whose generation it holds: when two copies
//! diverged (a primary wrote after losing its quorum, before it knew), the later election's
//! copy is kept, without an operator.

use super::{MetaWrite, Peer, PromoteRefusal, Promotion, Replica};
use crate::core::quorum::QuorumPolicy;
use crate::core::states::Role;
use crate::wire::{DataPosition, Message};
use std::time::Instant;

/// This node's request for votes, while it lasts.
#[derive(Debug, Clone, Copy)]
pub struct Candidacy {
    ballot: u64,
    term: u64,
    asked_at: Instant,
    /// When this promotion request first asked: a data peer that has not answered is waited
    /// for, asking again, until a ping timeout after it (its link is dropped by then if it is
    /// dead, and a peer no longer connected is not waited for).
    since: Instant,
    force: bool,
    /// Peers asked, that answered, that gave their vote (one bit per node id).
    asked: u32,
    answered: u32,
    granted: u32,
}

/// The vote this node gave last: to whom, and when.
#[derive(Debug, Clone, Copy)]
pub struct VoteGiven {
    pub(super) candidate: u8,
    at: Instant,
}

/// What a promotion request led to.
#[derive(Debug)]
pub enum PromoteStep {
    /// Primary now; the driver starts the export (see [`Replica::promoted`]).
    Promoted(Promotion),
    /// The votes were asked for: call [`Replica::promote`] again once frames have arrived (or a
    /// moment later); it answers within a lease.
    Waiting,
}

impl Replica {
    /// Asks to promote this node (`force`: even without an UpToDate disk, and starting a new
    /// generation for every peer). Without quorum it is promoted at once; under quorum the
    /// first call asks every connected peer for its vote and the driver calls again until the
    /// answer is no longer [`PromoteStep::Waiting`].
    pub fn promote(&mut self, now: Instant, force: bool) -> Result<PromoteStep, PromoteRefusal> {
        self.check_left_behind(now)?;
        self.promote_checks(now, force)?;
        if self.quorum_policy == QuorumPolicy::Off {
            self.sb.terms.highest += 1;
            self.set_data_position(DataPosition { term: self.sb.terms.highest, ..DataPosition::default() });
            return Ok(PromoteStep::Promoted(self.promote_now(force)));
        }
        // A candidacy left from an earlier request (its driver gave up on it) is not this one.
        let current = |c: &Candidacy| c.force == force && now.saturating_duration_since(c.asked_at) < 2 * self.timing.lease();
        let candidacy = match self.candidacy.filter(current) {
            Some(candidacy) => candidacy,
            None => {
                self.ask_for_votes(now, force, now);
                return Ok(PromoteStep::Waiting);
            }
        };
        // A later election began after this one asked (this node heard of it, or a voter took
        // part in it): the votes given for this one are stale, and it asks again, in a term
        // above it. A primary of the earlier term would be a lame duck: the voters of the later
        // one never learn its generations, and once it lost a peer it could never count them
        // again (seed 6423: elected in term 5 after a witness took part in term 7, it held its
        // writes without quorum for good while every node was connected).
        if self.sb.terms.highest > candidacy.term {
            self.ask_for_votes(now, force, candidacy.since);
            return Ok(PromoteStep::Waiting);
        }
        // Every data peer asked answers before the votes are counted, and a refusal for data
        // further on than this node's ends the candidacy: that peer may hold acknowledged
        // writes this node lacks, and a majority of witnesses, which hold none, would elect
        // this node without them (seed 48329: the votes of three witnesses made a candidate
        // primary before the answer of the one data peer that held the last epoch of the
        // demoted primary's writes). Such a voter sends its State before its answer, so its
        // position here is the one it refused by. A refusal for another reason (it is being
        // resynced, or voted for another candidate) claims no data and only withholds a vote.
        let mask = |keep: &dyn Fn(&Peer) -> bool| self.peers.iter().filter(|p| keep(p)).fold(0u32, |m, p| m | 1 << p.node_id);
        let mine = self.data_position();
        let data_asked = mask(&|p| !p.witness) & candidacy.asked;
        let further = mask(&|p| p.last_state.is_some_and(|s| s.data_position > mine));
        let refused = data_asked & candidacy.answered & !candidacy.granted & further;
        let unanswered = data_asked & !candidacy.answered & mask(&|p| p.connected);
        if refused != 0 {
            self.candidacy = None;
            let name = self.peer(refused.trailing_zeros() as u8).name.clone();
            return Err(self.vote_refused(name));
        }
        if unanswered != 0 {
            if self.candidacy_open(&candidacy, now) {
                return Ok(PromoteStep::Waiting);
            }
            if now.saturating_duration_since(candidacy.since) < self.timing.ping_timeout {
                self.ask_for_votes(now, force, candidacy.since);
                return Ok(PromoteStep::Waiting);
            }
            self.candidacy = None;
            let name = self.peer(unanswered.trailing_zeros() as u8).name.clone();
            return Err(PromoteRefusal::VoteUnanswered { name });
        }
        let moved_on = |p: &Peer| p.last_state.is_some_and(|s| s.term > candidacy.term);
        let count = self.count_votes(|p| p.connected && candidacy.granted & (1 << p.node_id) != 0 && !moved_on(p) && self.votes_for_me(p));
        if count.has_quorum && count.other_primary.is_none() {
            self.candidacy = None;
            self.elected = Some((candidacy.asked_at, candidacy.granted));
            self.sb.terms.highest = self.sb.terms.highest.max(candidacy.term);
            self.set_data_position(DataPosition { term: candidacy.term, ..DataPosition::default() });
            return Ok(PromoteStep::Promoted(self.promote_now(force)));
        }
        let all_answered = candidacy.answered == candidacy.asked;
        if all_answered || !self.candidacy_open(&candidacy, now) {
            self.candidacy = None;
            if let Some(other) = count.other_primary {
                let name = self.peers.iter().find(|p| p.node_id == other).map_or_else(|| format!("node {other}"), |p| p.name.clone());
                return Err(PromoteRefusal::OtherPrimary { name });
            }
            return Err(PromoteRefusal::NoQuorum { votes: count.votes, voters: count.voters, needed: count.needed });
        }
        Ok(PromoteStep::Waiting)
    }

    /// Whether `candidacy` still collects votes: answers count only within a lease of the
    /// request (see `LinkTiming::lease`), like ping answers.
    fn candidacy_open(&self, candidacy: &Candidacy, now: Instant) -> bool {
        now.saturating_duration_since(candidacy.asked_at) < self.timing.lease()
    }

    /// Asks the connected peers for their votes, in a term above any this node knows or asked
    /// in (a voter that granted the last request holds its term).
    fn ask_for_votes(&mut self, now: Instant, force: bool, since: Instant) {
        let ballot = self.uuids.next();
        let term = self.sb.terms.highest.max(self.candidacy.map_or(0, |c| c.term)) + 1;
        let asked: Vec<u8> = self.peers.iter().filter(|p| p.connected && p.last_state.is_some()).map(|p| p.node_id).collect();
        let mask = asked.iter().fold(0u32, |m, id| m | 1 << id);
        self.candidacy = Some(Candidacy { ballot, term, asked_at: now, since, force, asked: mask, answered: 0, granted: 0 });
        let position = self.data_position();
        for peer in asked {
            self.send(peer, Message::VoteRequest { ballot, term, position });
        }
    }

    /// A peer's answer to a request for votes; an answer to an older ballot is ignored.
    pub fn vote_received(&mut self, peer_id: u8, ballot: u64, granted: bool) {
        let Some(candidacy) = self.candidacy.as_mut().filter(|c| c.ballot == ballot) else { return };
        candidacy.answered |= 1 << peer_id;
        if granted {
            candidacy.granted |= 1 << peer_id;
        }
    }

    /// `candidate` asks for this node's vote in election `term`, its data at `position` (see
    /// `Replica::data_position`): given unless this node is primary, sees one, waits
    /// for votes itself, gave its vote to another node less than a ping timeout ago, knows a
    /// term as high, or holds data further on (it could hold flushed writes the candidate
    /// lacks). A vote given is durable before it is sent.
    pub fn vote_requested(&mut self, now: Instant, candidate: u8, ballot: u64, term: u64, position: DataPosition) {
        let busy_elsewhere = self.vote_given_to(now).is_some_and(|id| id != candidate);
        let candidate_myself = self.candidacy.is_some_and(|c| self.candidacy_open(&c, now));
        let stale_term = term <= self.sb.terms.highest;
        // A node being resynced holds part of newer data than its generation says: it cannot
        // tell whether the candidate has that data, so it vouches for nobody meanwhile.
        let being_resynced = self.sync_target_of().is_some();
        let further = !self.witness && self.data_position() > position;
        let granted = self.role != Role::Primary
            && self.primaries() == 0
            && !candidate_myself
            && !busy_elsewhere
            && !stale_term
            && !being_resynced
            && !further;
        if granted {
            self.vote_given = Some(VoteGiven { candidate, at: now });
            self.sb.terms.highest = term;
            self.persist(MetaWrite::Superblock);
        } else {
            tracing::info!(resource = %self.resource, candidate = %self.peer(candidate).name, term, known = self.sb.terms.highest,
                busy_elsewhere, candidate_myself, being_resynced, further, primaries = self.primaries(), "vote refused");
        }
        if stale_term || further {
            // The candidate learns the later term from this node's State (`Vote` carries none):
            // asking again in a term the voters already hold would be refused forever (seed
            // 5187 with a witness: two candidates that lost the same term). And the position
            // this node refuses by: a refusal for data further on ends the candidacy (see
            // `Replica::promote`).
            self.send_state_to(candidate);
        }
        self.send(candidate, Message::Vote { ballot, granted });
    }

    /// The node this node gave its vote to less than a ping timeout before `now`.
    pub fn vote_given_to(&self, now: Instant) -> Option<u8> {
        self.vote_given.filter(|v| now.saturating_duration_since(v.at) < self.timing.ping_timeout).map(|v| v.candidate)
    }
}

#[cfg(test)]
mod tests {
    use super::PromoteStep;
    use crate::core::quorum::QuorumPolicy;
    use crate::core::states::{DiskState, ReplState, Role};
    use crate::replica::testing::{secondary_state, two_node_replica, vote_request, with_data_peer_and_witness};
    use crate::replica::{Action, PromoteRefusal, Replica};
    use crate::wire::{DataPosition, Message, PeerState};
    use std::time::{Duration, Instant};

    fn candidate() -> (Replica, Instant) {
        let (mut r, t0) = two_node_replica();
        r.quorum_policy = QuorumPolicy::Majority;
        r.disk = DiskState::UpToDate;
        r.link_up(1, t0);
        r.peer_mut(1).last_state = Some(secondary_state(r.sb.uuids.current, [0; 4]));
        r.peer_mut(1).repl = ReplState::Established;
        r.peer_mut(1).disk = DiskState::UpToDate;
        let timing = r.timing;
        assert!(r.peer_mut(1).lease.ping_due(t0, &timing));
        r.peer_mut(1).lease.answered();
        r.take_actions();
        (r, t0)
    }

    fn ballot_sent(r: &mut Replica) -> u64 {
        vote_request(r, 1).0
    }

    #[test]
    fn a_candidate_is_promoted_only_once_a_majority_gave_its_vote() {
        let (mut r, t0) = candidate();
        assert!(matches!(r.promote(t0, false), Ok(PromoteStep::Waiting)), "the lease alone is not enough");
        let ballot = ballot_sent(&mut r);
        r.vote_received(1, ballot ^ 1, true);
        assert!(matches!(r.promote(t0, false), Ok(PromoteStep::Waiting)), "an answer to another ballot counts nothing");
        r.vote_received(1, ballot, true);
        assert!(matches!(r.promote(t0, false), Ok(PromoteStep::Promoted(_))));
    }

    #[test]
    fn votes_given_before_a_later_election_began_elect_nobody() {
        let (mut r, t0) = candidate();
        let _ = r.promote(t0, false);
        let (ballot, term) = vote_request(&mut r, 1);
        r.vote_received(1, ballot, true);
        // The voter took part in a later election since it answered: its vote is stale.
        let mut moved_on = secondary_state(r.sb.uuids.current, [0; 4]);
        moved_on.term = term + 1;
        r.peer_mut(1).last_state = Some(moved_on);
        assert!(matches!(r.promote(t0, false), Err(PromoteRefusal::NoQuorum { votes: 1, .. })), "no promotion on a stale vote");

        // A new candidacy; this node hears of a later election before the vote counts: it asks
        // again, in a term above that one, and is elected in it.
        r.peer_mut(1).last_state = Some(secondary_state(r.sb.uuids.current, [0; 4]));
        assert!(matches!(r.promote(t0, false), Ok(PromoteStep::Waiting)));
        let (ballot, term) = vote_request(&mut r, 1);
        r.vote_received(1, ballot, true);
        r.sb.terms.highest = term + 1;
        assert!(matches!(r.promote(t0, false), Ok(PromoteStep::Waiting)), "not elected in the earlier term");
        let (ballot, term) = vote_request(&mut r, 1);
        assert_eq!(term, r.sb.terms.highest + 1);
        moved_on.term = term;
        r.peer_mut(1).last_state = Some(moved_on);
        r.vote_received(1, ballot, true);
        assert!(matches!(r.promote(t0, false), Ok(PromoteStep::Promoted(_))));
        assert_eq!(r.data_position().term, term, "primary of the later term");
    }

    #[test]
    fn a_data_peer_that_answers_no_request_is_asked_again_until_a_ping_timeout() {
        let (mut r, t0) = candidate();
        assert!(matches!(r.promote(t0, false), Ok(PromoteStep::Waiting)));
        let (_, first_term) = vote_request(&mut r, 1);
        // The peer still answers pings (its lease holds) but never the request.
        let later = t0 + r.timing.lease();
        let timing = r.timing;
        assert!(r.peer_mut(1).lease.ping_due(later, &timing));
        r.peer_mut(1).lease.answered();
        assert!(matches!(r.promote(later, false), Ok(PromoteStep::Waiting)), "its votes lapsed: asked again");
        let (_, term) = vote_request(&mut r, 1);
        assert!(term > first_term, "in a term above the one a voter may have granted");
        let timeout = t0 + r.timing.ping_timeout;
        assert!(r.peer_mut(1).lease.ping_due(timeout, &timing));
        r.peer_mut(1).lease.answered();
        let answer = r.promote(timeout, false);
        assert!(
            matches!(answer, Err(PromoteRefusal::VoteUnanswered { .. })),
            "refused a ping timeout after the first request, not asked again and again: {answer:?}"
        );
        assert!(matches!(r.promote(timeout, false), Ok(PromoteStep::Waiting)), "a new request asks again");
    }

    #[test]
    fn a_refused_vote_ends_the_candidacy_at_once() {
        let (mut r, t0) = candidate();
        let _ = r.promote(t0, false);
        let ballot = ballot_sent(&mut r);
        r.vote_received(1, ballot, false);
        assert!(matches!(r.promote(t0, false), Err(PromoteRefusal::NoQuorum { .. })));
    }

    #[test]
    fn a_majority_with_a_witness_waits_for_the_data_peer_whose_refusal_for_further_data_ends_the_candidacy() {
        let (mut r, t0) = with_data_peer_and_witness(Role::Secondary);
        assert!(matches!(r.promote(t0, false), Ok(PromoteStep::Waiting)));
        let ballot = ballot_sent(&mut r);
        r.vote_received(2, ballot, true);
        assert!(
            matches!(r.promote(t0, false), Ok(PromoteStep::Waiting)),
            "two of three votes, but the data peer, which may hold writes this node lacks, has not answered"
        );
        // It refuses by data further on than this node's (its State, sent before the answer).
        let further = DataPosition { epoch: r.data_position().epoch + 1, ..r.data_position() };
        r.peer_mut(1).last_state = Some(PeerState { data_position: further, ..secondary_state(r.sb.uuids.current, [0; 4]) });
        r.vote_received(1, ballot, false);
        assert!(matches!(r.promote(t0, false), Err(PromoteRefusal::VoteRefused { name }) if name == "beta"));
        assert_eq!(r.role, Role::Secondary);

        // A refusal that claims no data (the peer is being resynced, say) withholds one vote:
        // this node's and the witness's elect it.
        r.peer_mut(1).last_state = Some(secondary_state(r.sb.uuids.current, [0; 4]));
        assert!(matches!(r.promote(t0, false), Ok(PromoteStep::Waiting)));
        let ballot = ballot_sent(&mut r);
        r.vote_received(2, ballot, true);
        r.vote_received(1, ballot, false);
        assert!(matches!(r.promote(t0, false), Ok(PromoteStep::Promoted(_))));
    }

    #[test]
    fn a_voter_gives_one_vote_at_a_time_and_not_while_a_candidate_itself() {
        let (mut r, t0) = candidate();
        r.vote_requested(t0, 1, 5, 1, DataPosition::default());
        assert!(r.take_actions().iter().any(|a| matches!(a, Action::Send { msg: Message::Vote { ballot: 5, granted: true }, .. })));
        assert!(matches!(r.promote(t0, false), Err(PromoteRefusal::VotedFor { .. })), "it voted for node 1");
        let later = t0 + r.timing.ping_timeout + Duration::from_millis(1);
        let timing = r.timing;
        assert!(r.peer_mut(1).lease.ping_due(later, &timing));
        r.peer_mut(1).lease.answered();
        assert!(matches!(r.promote(later, false), Ok(PromoteStep::Waiting)), "the vote given has lapsed");
        r.take_actions();
        r.vote_requested(later, 1, 6, 9, DataPosition::default());
        assert!(
            r.take_actions().iter().any(|a| matches!(a, Action::Send { msg: Message::Vote { ballot: 6, granted: false }, .. })),
            "a candidate votes for nobody else"
        );
    }
}
