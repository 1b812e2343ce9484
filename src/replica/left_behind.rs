//! A device left behind: the previous daemon died as primary, and the kernel still holds its
//! ublk device with the I/O it had not answered, a filesystem perhaps still mounted on it and
//! caching what it read and wrote. That filesystem may carry on only over the data it left:
//! the device serves again through a promotion of this node on the generation it served, and
//! never once another node may have written (a newer generation here or taken from a peer, a
//! primary elsewhere). The check is part of every promotion while the device is left behind,
//! the daemon's own retries and an operator's or cluster manager's `primary` alike, so no
//! promotion can re-attach it over data that changed under it between a check and the
//! promotion.
//!
//! The generation the device served is the metadata's current one at attach, kept in memory
//! only. That is enough across further restarts: the current generation changes only through
//! a resync that adopts another one (or a promotion, which re-attaches the device first), and
//! the superblock write that adopts it also clears the crash marker, so a daemon started after
//! it finds a device it may not resume (see `Attached::left_behind_device`) and attaches it
//! failing.

use super::weakened::{is_weakened, Rule};
use super::{PromoteRefusal, Replica};
use crate::core::states::{ReplState, Role};
use crate::core::sync_decision::same_uuid;
use std::time::Instant;

impl Replica {
    /// Whether the device left behind (if any) may still come back; when it may not, it is
    /// given up for good and the refusal says why (the driver then attaches it failing every
    /// request, so the filesystem on it can be unmounted).
    pub(super) fn check_left_behind(&mut self, now: Instant) -> Result<(), PromoteRefusal> {
        let Some(served) = self.left_behind else { return Ok(()) };
        let Some(why) = self.left_behind_stale(now, served) else { return Ok(()) };
        tracing::warn!(resource = %self.resource, %why, "the device left behind by the previous daemon cannot serve again");
        self.left_behind = None;
        Err(PromoteRefusal::LeftBehindStale { why })
    }

    /// Why the data is no longer the data the device left behind served (`generation`), if it
    /// is not. A resync from a peer of the same generation does not count: it only brings back
    /// the writes of the activity log's extents, and a promotion waits for its end anyway.
    fn left_behind_stale(&self, now: Instant, (generation, term): (u64, u64)) -> Option<String> {
        let any_data = is_weakened(Rule::LeftBehindOnAnyData);
        if !same_uuid(self.sb.uuids.current, generation) && !any_data {
            return Some("this node took newer data from a peer (another node was primary while this daemon was down)".into());
        }
        // A peer promoted while every node was in sync starts no generation, but its election
        // gives the data its term (simulator seed 11442: this node followed it and applied its
        // writes in the same generation).
        if self.sb.terms.of_data != term && !any_data {
            return Some("this node applied the writes of another primary elected while this daemon was down".into());
        }
        let newer = |p: &&super::Peer| !p.last_state.is_some_and(|s| same_uuid(s.current_uuid, generation));
        let target = |p: &&super::Peer| p.repl == ReplState::SyncTarget || p.pending_sync.is_some_and(|d| d.is_target());
        if let Some(source) = self.peers.iter().filter(target).find(newer).filter(|_| !any_data) {
            return Some(format!("this node is taking newer data from {} (another node was primary while this daemon was down)", source.name));
        }
        if let Some(primary) = self.peers.iter().find(|p| p.connected && p.role == Role::Primary) {
            return Some(format!("{} became primary while this daemon was down", primary.name));
        }
        let other = self.quorum(now).other_primary?;
        let name = self.peers.iter().find(|p| p.node_id == other).map_or_else(|| format!("node {other}"), |p| p.name.clone());
        Some(format!("a connected node reports {name} as primary: it became primary while this daemon was down"))
    }

    /// A data peer refused its vote for data further on than this node's. With a device left
    /// behind, that device is given up: this node cannot be promoted before that peer, whose
    /// promotion ends the device anyway, and asking again and again would take the witnesses'
    /// votes from that peer's own election for good (a vote binds its giver for a ping timeout;
    /// simulator seed 1302: the daemon's retries kept every node from being promoted).
    pub(super) fn vote_refused(&mut self, name: String) -> PromoteRefusal {
        if self.left_behind.take().is_none() {
            return PromoteRefusal::VoteRefused { name };
        }
        let why = format!("{name} refused its vote for data further on than this node's (it may hold writes of another primary)");
        tracing::warn!(resource = %self.resource, %why, "the device left behind by the previous daemon cannot serve again");
        PromoteRefusal::LeftBehindStale { why }
    }

    /// The device left behind is not to come back (the operator demoted the node, or the
    /// driver attached it failing): promotions no longer look at it.
    pub fn give_up_left_behind(&mut self) {
        self.left_behind = None;
    }

    /// Whether a device left behind waits to serve again (see the module's doc).
    pub fn has_left_behind(&self) -> bool {
        self.left_behind.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{secondary_state, vote_request, with_data_peer_and_witness};
    use super::super::{PromoteRefusal, PromoteStep, Replica};
    use crate::core::states::{ReplState, Role};
    use crate::wire::{DataPosition, PeerState};
    use std::time::Instant;

    /// A secondary under quorum with a data peer and a witness, restarted with the device it
    /// served as primary left behind (on its current generation).
    fn left_behind() -> (Replica, Instant) {
        let (mut r, t0) = with_data_peer_and_witness(Role::Secondary);
        r.left_behind = Some((r.sb.uuids.current, r.sb.terms.of_data));
        (r, t0)
    }

    /// A promotion now gives the device up, saying `why`, and it is not looked at again.
    fn assert_given_up(r: &mut Replica, t0: Instant, why: &str) {
        let refusal = r.promote(t0, false);
        assert!(matches!(&refusal, Err(PromoteRefusal::LeftBehindStale { why: said }) if said.contains(why)), "{refusal:?}");
        assert!(!r.has_left_behind());
    }

    /// Runs the election to its end with both peers granting their vote.
    fn elect(r: &mut Replica, t0: Instant) -> Result<PromoteStep, PromoteRefusal> {
        match r.promote(t0, false)? {
            PromoteStep::Waiting => {}
            promoted => return Ok(promoted),
        }
        let (ballot, _) = vote_request(r, 1);
        r.vote_received(1, ballot, true);
        r.vote_received(2, ballot, true);
        r.promote(t0, false)
    }

    #[test]
    fn a_device_left_behind_serves_again_through_a_promotion_on_the_generation_it_served() {
        let (mut r, t0) = left_behind();
        assert!(matches!(elect(&mut r, t0), Ok(PromoteStep::Promoted(_))));
        assert!(r.has_left_behind(), "until the export started on it");
        r.promoted();
        assert!(!r.has_left_behind());
    }

    #[test]
    fn a_device_left_behind_is_given_up_once_this_node_holds_another_generation() {
        let (mut r, t0) = left_behind();
        r.sb.uuids.current ^= 0x10;
        assert_given_up(&mut r, t0, "newer data");
        // Given up for good: the next promotion is an ordinary one, on a fresh device.
        assert!(matches!(elect(&mut r, t0), Ok(PromoteStep::Promoted(_))));
    }

    #[test]
    fn a_device_left_behind_is_given_up_once_this_node_followed_a_primary_elected_in_the_same_generation() {
        let (mut r, t0) = left_behind();
        // A peer promoted while every node was in sync keeps the generation; its term is the data's.
        r.sb.terms.of_data += 1;
        assert_given_up(&mut r, t0, "another primary");
    }

    #[test]
    fn a_device_left_behind_is_given_up_while_a_peer_of_another_generation_resyncs_this_node() {
        let (mut r, t0) = left_behind();
        let newer = r.sb.uuids.current ^ 0x10;
        r.peer_mut(1).last_state = Some(secondary_state(newer, [r.sb.uuids.current, 0, 0, 0]));
        r.peer_mut(1).repl = ReplState::SyncTarget;
        assert_given_up(&mut r, t0, "beta");
    }

    #[test]
    fn a_resync_from_a_peer_of_the_same_generation_only_delays_a_device_left_behind() {
        let (mut r, t0) = left_behind();
        r.peer_mut(1).repl = ReplState::SyncTarget;
        assert!(matches!(r.promote(t0, false), Err(PromoteRefusal::BeingResynced { .. })));
        assert!(r.has_left_behind(), "the resync brings back only what this node may have lost");
        r.peer_mut(1).repl = ReplState::Established;
        assert!(matches!(elect(&mut r, t0), Ok(PromoteStep::Promoted(_))));
    }

    #[test]
    fn a_device_left_behind_is_given_up_when_a_peer_is_primary() {
        let (mut r, t0) = left_behind();
        r.peer_mut(1).role = Role::Primary;
        assert_given_up(&mut r, t0, "beta became primary");
        assert!(matches!(r.promote(t0, false), Err(PromoteRefusal::PeerIsPrimary { .. })), "and the ordinary refusal after it");
    }

    #[test]
    fn a_device_left_behind_is_given_up_when_a_data_peer_refuses_its_vote_for_further_data() {
        let (mut r, t0) = left_behind();
        assert!(matches!(r.promote(t0, false), Ok(PromoteStep::Waiting)));
        let (ballot, _) = vote_request(&mut r, 1);
        let further = DataPosition { epoch: r.data_position().epoch + 1, ..r.data_position() };
        r.peer_mut(1).last_state = Some(PeerState { data_position: further, ..secondary_state(r.sb.uuids.current, [0; 4]) });
        r.vote_received(2, ballot, true);
        r.vote_received(1, ballot, false);
        let refusal = r.promote(t0, false);
        assert!(matches!(&refusal, Err(PromoteRefusal::LeftBehindStale { why }) if why.contains("beta refused its vote")), "{refusal:?}");
        assert!(!r.has_left_behind(), "no more candidacies that would hold the witness's vote from beta's election");
    }

    #[test]
    fn a_device_given_up_by_the_driver_is_not_looked_at_again() {
        let (mut r, t0) = left_behind();
        r.give_up_left_behind();
        r.sb.uuids.current ^= 0x10;
        assert!(matches!(elect(&mut r, t0), Ok(PromoteStep::Promoted(_))));
    }
}
