//! Quorum as this replica counts it: which peers' votes count (by lease and by the generation
//! they hold), and what that lets a primary do with writes.

use super::weakened::{is_weakened, Rule};
use super::{Peer, Replica};
use crate::core::quorum::{self, evaluate, Admission, AdmissionInputs, QuorumPolicy, QuorumState, VoterView};
use crate::core::states::{ReplState, Role};
use crate::core::sync_decision::{same_uuid, UUID_JUST_CREATED};
use std::time::Instant;

impl Replica {
    /// Counts the votes at `now`. A peer counts once its state is known; for a primary, only
    /// while the peer's lease holds (see `LinkTiming::lease`).
    pub fn quorum(&self, now: Instant) -> QuorumState {
        self.quorum_with_leases(now, true)
    }

    /// [`Replica::quorum`], choosing whether leases count (they always do, but a promotion waits
    /// for the first ping of a peer that connected a moment ago: see `Engine::promote`).
    pub fn quorum_with_leases(&self, now: Instant, leases: bool) -> QuorumState {
        self.quorum_counting(now, leases, true)
    }

    /// `unconfirmed`: whether a witness's vote in this node's election counts before the
    /// witness reports the generation this node's promotion started. A vote won in this node's
    /// election is an answer to a request sent less than a lease ago, like a ping's: it counts
    /// until then, even before the voter has taken the new generation (a witness takes it from
    /// the State this primary sends once its export runs, and a starting ublk device reads its
    /// partition table before that). Not a data node this primary resyncs, though: it lacks
    /// what it is being sent. Write completions do not count such a witness (see
    /// [`Replica::election_unconfirmed`]).
    fn quorum_counting(&self, now: Instant, leases: bool, unconfirmed: bool) -> QuorumState {
        let elected = |p: &Peer| {
            self.role == Role::Primary
                && (if p.witness { unconfirmed || self.votes_for_me(p) } else { p.repl == ReplState::Established })
                && self.elected.is_some_and(|(asked, granted)| granted & (1 << p.node_id) != 0 && now.saturating_duration_since(asked) < self.timing.lease())
        };
        self.count_votes(|p| p.connected && (elected(p) || ((!leases || p.lease.holds(now, &self.timing)) && self.votes_for_me(p))))
    }

    /// Whether this primary has quorum only by counting witnesses that voted for it and have
    /// not yet reported the generation its promotion started. Reads may go on (they change
    /// nothing), but a write must not complete yet: a witness holds no data, so such a write
    /// lives on this node alone, and if this node is cut off before its State reaches the
    /// witness, the witness never learns that generation and elects a data node that lacks
    /// it (simulator seed 180326: a primary cut off 2 ms after its promotion acknowledged a
    /// second of writes and flushes the next primary never had). Completions wait for the
    /// witness's State, which releases them (or fail with the lease, under `io-error`).
    pub(super) fn election_unconfirmed(&self, now: Instant) -> bool {
        self.role == Role::Primary
            && self.quorum_policy != QuorumPolicy::Off
            && self.elected.is_some()
            && self.quorum(now).has_quorum
            && !self.quorum_counting(now, true, false).has_quorum
    }

    /// Counts the votes of the peers `counts` accepts (with every peer's departure and the
    /// primaries it sees, which the count needs whatever the vote is for).
    pub(super) fn count_votes(&self, counts: impl Fn(&Peer) -> bool) -> QuorumState {
        let views: Vec<VoterView> = self
            .peers
            .iter()
            .map(|p| VoterView {
                node_id: p.node_id,
                reachable: counts(p),
                departed: self.departed(p),
                sees_primary: p.last_state.filter(|_| p.connected).map_or(0, |s| s.primaries),
            })
            .collect();
        evaluate(self.quorum_policy, self.sb.node_id, &views)
    }

    /// Whether `peer`'s vote counts for this node, judged by the generation it holds (a
    /// witness: the newest primary generation it has seen). A primary needs voters that know its
    /// current generation (and are not being resynced by it); a candidate needs voters
    /// that know no generation newer than its own. Otherwise a secondary left behind could form
    /// a majority with a witness once the primary is gone, and promote without the writes
    /// acknowledged meanwhile.
    pub(super) fn votes_for_me(&self, peer: &Peer) -> bool {
        let Some(state) = peer.last_state else { return false };
        let same = |uuid: u64| same_uuid(state.current_uuid, uuid);
        if self.role == Role::Primary {
            // A voter that took part in (or heard of) a later election may have made another
            // primary since: it no longer counts for this one.
            if state.term > self.sb.terms.highest {
                return false;
            }
            // A node this primary is resyncing does not count: it lacks writes acknowledged
            // before it came back, and once done it could vote for a node that lacks them too
            // (the simulator found an acknowledged FUA write lost that way). Nor does a data
            // node that is connected but not replicating (its decision waits, say, for a resync
            // it runs to end): the writes acknowledged meanwhile would live on this node alone,
            // and that node could be promoted without them (seed 3713).
            let receives_writes = peer.witness || peer.repl == ReplState::Established;
            // A voter still at the generation this primary left counts meanwhile if it receives
            // the writes; a witness does not (the peer this primary lost holds that generation
            // too, and the witness could elect it without the writes since; seed 8332).
            let left = self.left_generation != 0 && same(self.left_generation) && !peer.witness;
            return receives_writes && (same(self.sb.uuids.current) || left);
        }
        let knows_nothing = peer.witness && same(UUID_JUST_CREATED);
        knows_nothing || self.knows_generation(state.current_uuid)
    }

    /// Whether this primary would have quorum but for voters that have yet to confirm the
    /// generation it started last (they report the one it left; its `State` is on its way to
    /// them): completions wait for them, whatever `on_no_quorum` says.
    /// Never while fencing fails requests: a failed handler's refusal is not quorum's.
    pub(super) fn confirming_generation(&self, now: Instant) -> bool {
        if self.role != Role::Primary || self.left_generation == 0 || self.fence_admission().is_some() {
            return false;
        }
        let at = |p: &Peer, uuid: u64| p.last_state.is_some_and(|s| same_uuid(s.current_uuid, uuid));
        let confirmed = self.count_votes(|p| {
            p.connected
                && p.lease.holds(now, &self.timing)
                && (p.witness || p.repl == ReplState::Established)
                && (at(p, self.sb.uuids.current) || at(p, self.left_generation))
        });
        confirmed.has_quorum
    }

    /// Whether `uuid` is this node's generation or one it has moved past (its history, or where
    /// one of its bitmaps starts): not newer than its data.
    pub fn knows_generation(&self, uuid: u64) -> bool {
        let same = |u: u64| u != 0 && same_uuid(u, uuid);
        same(self.sb.uuids.current) || self.sb.uuids.history.iter().chain(self.sb.peers.iter().map(|p| &p.bitmap_uuid)).any(|u| same(*u))
    }

    /// Whether a connected node reports another primary and holds a generation this node does
    /// not know, i.e. one started after this node's: evidence that another node was promoted
    /// past this one. A stale primary seen next to this one (directly, with a generation this
    /// node left behind, or through a node that follows this node's generation) is no such
    /// evidence: a primary whose lease lapsed for a moment must not give up for it.
    ///
    /// A connected node whose data descends from this node's current generation (it is in its
    /// history) is such evidence too, whether or not it sees that primary now: only a primary
    /// starts a generation, and one that started after this node's could only be promoted past
    /// it.
    ///
    /// So is a connected node that knows a later election than the one that made this primary.
    fn newer_primary_seen(&self) -> bool {
        let me = 1u32 << self.sb.node_id;
        let mine = self.sb.uuids.current;
        self.peers.iter().filter(|p| p.connected).filter_map(|p| p.last_state).any(|s| {
            if s.term > self.sb.terms.highest {
                return true;
            }
            let newer = !self.knows_generation(s.current_uuid);
            newer && (s.primaries & !me != 0 || s.history.iter().any(|h| *h != 0 && same_uuid(*h, mine)))
        })
    }

    /// The inputs of `core::quorum::admission` as this node sees them at `now`. The peers'
    /// generations are only looked at when they matter (no quorum, another primary seen): not
    /// on every write.
    fn admission_inputs(&self, now: Instant) -> AdmissionInputs {
        let quorum = self.quorum(now);
        AdmissionInputs {
            policy: self.quorum_policy,
            on_no_quorum: self.on_no_quorum,
            quorum,
            newer_primary_seen: !quorum.has_quorum && self.newer_primary_seen(),
            superseded_latched: self.superseded_latched,
        }
    }

    /// What quorum lets this node do with writes at `now` (see `core::quorum::admission`); a
    /// secondary's writes are refused earlier, by role.
    /// A node being demoted still answers the requests it took as primary under the same
    /// quorum, and fails those it may not complete rather than holding them: it has no time
    /// as primary left to wait for (a flush taken before a demotion began completed without
    /// quorum once the cut-off peer's link went, and the write it made durable was not on the
    /// node promoted next; seed 7650).
    /// Fencing decides first (see `replica/fencing.rs`): while it holds or fails requests,
    /// quorum cannot let them through.
    pub fn admission(&self, now: Instant) -> Admission {
        if let Some(fenced) = self.fence_admission() {
            return fenced;
        }
        if !self.answers_as_primary() || self.quorum_policy == QuorumPolicy::Off || is_weakened(Rule::IoWithoutQuorum) {
            return Admission::Proceed;
        }
        match quorum::admission(&self.admission_inputs(now)) {
            Admission::Hold if self.demoting => Admission::Refuse,
            admission => admission,
        }
    }

    /// Another node was promoted while this primary had no quorum (a connected node reports
    /// it, with a generation newer than this node's): the writes it holds can never be
    /// acknowledged (the new primary does not have them), and it steps down.
    pub fn superseded(&self, now: Instant) -> bool {
        self.role == Role::Primary && self.quorum_policy != QuorumPolicy::Off && quorum::superseded(&self.admission_inputs(now))
    }
}

#[cfg(test)]
mod tests {
    use crate::core::quorum::QuorumPolicy;
    use crate::core::states::{DiskState, ReplState, Role};
    use crate::frontend::BlockRequest;
    use crate::replica::testing::{answers, primary_replicating, secondary_state, settled, two_node_replica, vote_request, with_data_peer_and_witness, write};
    use crate::replica::{Action, LocalIo, PromoteStep};
    use crate::wire::Message;

    #[test]
    fn a_primary_without_quorum_next_to_newer_data_was_superseded() {
        let (mut r, t0) = two_node_replica();
        r.quorum_policy = QuorumPolicy::Majority;
        r.disk = DiskState::UpToDate;
        r.role = Role::Primary;
        let mine = r.sb.uuids.current;
        r.link_up(1, t0);
        // The peer sees no primary now: the one promoted past this node is out of its reach.
        let state = secondary_state;
        r.peer_mut(1).last_state = Some(state(mine, [0; 4]));
        assert!(!r.superseded(t0), "the peer follows this node's generation");
        r.peer_mut(1).last_state = Some(state(0x7770, [mine & !1, 0, 0, 0]));
        assert!(r.superseded(t0), "the peer's generation descends from this node's");
        r.peer_mut(1).last_state = Some(state(0x7770, [0x1230, 0, 0, 0]));
        assert!(!r.superseded(t0), "unrelated newer data proves nothing about a promotion past this node");
    }

    #[test]
    fn a_primary_elected_by_a_witness_alone_completes_writes_once_the_witness_reports_its_generation() {
        let (mut r, t0) = with_data_peer_and_witness(Role::Secondary);
        // The data peer is gone: the promotion starts a generation it lacks.
        r.peer_lost(t0, 1, "gone", 0);
        assert!(matches!(r.promote(t0, false), Ok(PromoteStep::Waiting)));
        let (ballot, _) = vote_request(&mut r, 2);
        let left = r.sb.uuids.current;
        r.vote_received(2, ballot, true);
        assert!(matches!(r.promote(t0, false), Ok(PromoteStep::Promoted(_))));
        r.promoted();
        assert_ne!(r.sb.uuids.current, left, "a new generation, for the data peer that is gone");
        r.take_actions();
        // Reads go on: they change nothing (a starting ublk device reads its partition table).
        r.submit(t0, 1, BlockRequest::Read { offset: 0, len: 4096 }, |_| 0);
        assert!(r.take_actions().iter().any(|a| matches!(a, Action::Io { op: LocalIo::Read { .. }, .. })), "the read is made");
        // A write is made, but its completion waits for the witness to know the generation.
        r.submit(t0, 2, write(0, 4096), |_| 0);
        let tag = settled(&mut r)
            .into_iter()
            .find_map(|a| match a {
                Action::Io { tag, op: LocalIo::Write { .. } } => Some(tag),
                _ => None,
            })
            .expect("the local write");
        r.io_done(t0, tag, Ok(None));
        assert!(answers(&r.take_actions()).is_empty(), "the witness still reports the generation left: cut off now, it would elect the data peer without this write");
        let generation = r.peer(2).generation;
        r.receive(t0, 2, generation, Message::State(secondary_state(r.sb.uuids.current, [left, 0, 0, 0]))).expect("a State");
        assert_eq!(answers(&r.take_actions()), vec![(2, Ok(None))], "the witness knows the generation now");
    }

    #[test]
    fn a_vote_just_won_does_not_count_for_a_node_this_primary_resyncs() {
        let (mut r, t0) = primary_replicating();
        r.quorum_policy = QuorumPolicy::Majority;
        r.elected = Some((t0, 1 << 1));
        let state = secondary_state(r.sb.uuids.current, [0; 4]);
        r.peer_mut(1).last_state = Some(state);
        assert!(r.quorum(t0).has_quorum, "the voter replicates: its vote counts within the lease");
        r.peer_mut(1).repl = ReplState::SyncSource;
        assert!(!r.quorum(t0).has_quorum, "a write acknowledged now would live on this node alone");
    }
}
