//! Fencing, as DRBD's `fencing` policy and `fence-peer` handler: a primary that loses the link
//! to a data peer cannot tell a dead peer from a partition, and the peer, cut off, may be
//! promoted by someone else. Unless the policy is `dont-care`, the primary asks its driver to
//! run the handler (`Action::FencePeer`), whose job is to keep that peer from being promoted
//! (outdate it, or shoot it), and acts on the answer (`Replica::fence_done`):
//!
//! - 3: the peer's disk is Inconsistent; 4: it is Outdated; 7: it was shot (as 4). Recorded
//!   (`Peer::fenced_disk`, shown by `status`) and writes go on.
//! - 5: the peer is unreachable: as 4 if this node is UpToDate; otherwise nothing is settled
//!   and it counts as a failure (below).
//! - 6: the peer is primary: this node outdates itself (durably); as primary it then fails
//!   every request, what it held included: it must not acknowledge writes the other lacks.
//! - anything else, a timeout, a handler that cannot run: the handler is broken.
//!
//! Under `resource-and-stonith` writes and flushes are held from the loss until the answer
//! (new ones and those in flight: not completed, not failed), as DRBD suspends I/O; reads too,
//! since the data here may be older than what a promoted peer acknowledged. A broken handler
//! then fails what is held and every later request with an I/O error (failing is the safe
//! answer: the peer may have been promoted; holding past the handler's timeout is not), until
//! the peer's link is back or the operator runs `resume-io`. Under `resource-only` nothing is
//! held and a broken handler is only logged.
//!
//! A link that comes back before the answer ends the fence as the reconnect decides: once the
//! peer's first `State` arrives, what was held goes on under the usual rules (quorum, a newer
//! primary seen), and the answer, when it comes, is ignored (its connection generation is
//! older than the link's).
//!
//! What is recorded of the peer only shows (status, events); no vote, promotion or resync
//! decision reads it, so a handler that lies weakens nothing. It is not persisted: a restarted
//! node is Secondary, and the peer's State says the rest.

use super::{Action, MetaWrite, Replica};
use crate::config::Fencing;
use crate::core::quorum::Admission;
use crate::core::states::{DiskState, Role};
use std::time::Instant;

/// How a fence-peer run ended, as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceOutcome {
    /// The handler exited with this code.
    Exited(i32),
    /// It could not run, was killed, or ran past its timeout (why, for the log).
    Failed(String),
}

/// One lost peer being fenced.
#[derive(Debug)]
pub(super) struct Fence {
    peer: u8,
    /// The connection that was lost: an answer for an older one is stale.
    generation: u64,
    /// The handler failed: under `resource-and-stonith` requests fail until the peer is back
    /// or `resume-io`.
    broken: bool,
}

impl Replica {
    /// The link to `peer_id` just went (its disk was `disk_before` as last reported): a primary
    /// that fences asks for the handler, once per loss, for a data peer that may hold good
    /// data. Called before the writes waiting for the peer complete, so that under
    /// `resource-and-stonith` they are held.
    pub(super) fn fence_lost_peer(&mut self, peer_id: u8, disk_before: DiskState) {
        let peer = self.peer(peer_id);
        let known_bad = matches!(disk_before, DiskState::Outdated | DiskState::Inconsistent);
        if self.fencing == Fencing::DontCare || self.role != Role::Primary || self.disk != DiskState::UpToDate || peer.witness || known_bad {
            return;
        }
        let generation = peer.generation;
        tracing::warn!(resource = %self.resource, peer = %peer.name, fencing = %self.fencing,
            "lost a data peer that may hold good data: running the fence-peer handler{}",
            if self.fencing == Fencing::ResourceAndStonith { "; writes are held until it answers" } else { "" });
        self.fences.retain(|f| f.peer != peer_id);
        self.fences.push(Fence { peer: peer_id, generation, broken: false });
        self.outbox.push(Action::FencePeer { peer: peer_id, generation });
    }

    /// What fencing lets this primary do with requests now, if it decides: hold them while a
    /// handler has yet to answer, fail them once one failed (`resource-and-stonith` only).
    pub(super) fn fence_admission(&self) -> Option<Admission> {
        if self.fencing != Fencing::ResourceAndStonith || self.role != Role::Primary || self.fences.is_empty() {
            return None;
        }
        Some(if self.fences.iter().any(|f| f.broken) { Admission::Refuse } else { Admission::Hold })
    }

    /// Why fencing suspends this node's I/O, for `status`: `fencing` while a handler has yet
    /// to answer, `fence-failed` while requests fail after a handler failed.
    pub fn io_suspended(&self) -> Option<&'static str> {
        match self.fence_admission()? {
            Admission::Hold => Some("fencing"),
            _ => Some("fence-failed"),
        }
    }

    /// The fence-peer handler for `peer_id`'s lost connection `generation` ended with
    /// `outcome` (see the module's documentation for what each answer does).
    pub fn fence_done(&mut self, now: Instant, peer_id: u8, generation: u64, outcome: FenceOutcome) {
        let name = self.peer(peer_id).name.clone();
        let pending = self.fences.iter().position(|f| f.peer == peer_id && f.generation == generation && !f.broken);
        let stale = self.peer(peer_id).generation != generation || self.role != Role::Primary;
        let Some(index) = pending.filter(|_| !stale) else {
            tracing::info!(resource = %self.resource, peer = %name, ?outcome,
                "fence-peer answered after the link came back, this node stopped being primary, or resume-io: ignored");
            return;
        };
        let stonith = self.fencing == Fencing::ResourceAndStonith;
        match outcome {
            FenceOutcome::Exited(3) => self.peer_fenced(peer_id, DiskState::Inconsistent, "its disk is Inconsistent"),
            FenceOutcome::Exited(4) => self.peer_fenced(peer_id, DiskState::Outdated, "it was outdated"),
            FenceOutcome::Exited(5) if self.disk == DiskState::UpToDate => {
                self.peer_fenced(peer_id, DiskState::Outdated, "it is unreachable, and this node is UpToDate")
            }
            FenceOutcome::Exited(6) => {
                self.fences.remove(index);
                self.outdate_self_for(&name, now);
                return;
            }
            FenceOutcome::Exited(7) => {
                if !stonith {
                    tracing::error!(resource = %self.resource, peer = %name,
                        "fence-peer shot the peer (exit code 7) although fencing is {}, not resource-and-stonith", self.fencing);
                }
                self.peer_fenced(peer_id, DiskState::Outdated, "it was shot (STONITH)");
            }
            broken => {
                let why = match broken {
                    FenceOutcome::Exited(code) => format!("exited with code {code}, which settles nothing"),
                    FenceOutcome::Failed(why) => why,
                };
                if stonith {
                    tracing::error!(resource = %self.resource, peer = %name,
                        "fence-peer failed ({why}): failing every request (the peer may have been promoted) until the peer is back or `blkrepl resume-io`");
                    self.fences[index].broken = true;
                    self.release_suspended(now, false);
                } else {
                    tracing::error!(resource = %self.resource, peer = %name, "fence-peer failed ({why}); fencing is resource-only: I/O goes on");
                    self.fences.remove(index);
                }
                return;
            }
        }
        self.fences.remove(index);
        self.release_suspended(now, false);
    }

    /// Records what the handler said of the peer's disk.
    fn peer_fenced(&mut self, peer_id: u8, disk: DiskState, why: &str) {
        self.peer_mut(peer_id).fenced_disk = Some(disk);
        tracing::info!(resource = %self.resource, peer = %self.peer(peer_id).name, "fence-peer: {why}: its disk is {disk}; I/O goes on");
    }

    /// Exit code 6: the peer is primary. This node's disk is Outdated, durably (a restart
    /// comes back Outdated, never Consistent); what it holds fails, and so do what is in
    /// flight, as it completes (see `Replica::finish_request`), and every later request while
    /// it stays primary (see `Replica::write_refusal`).
    fn outdate_self_for(&mut self, peer: &str, now: Instant) {
        tracing::error!(resource = %self.resource, peer,
            "fence-peer says the peer is primary: outdating this node; its requests fail until it is demoted and resynced");
        if self.outdate() {
            self.persist(MetaWrite::Superblock);
        }
        self.release_suspended(now, true);
        self.broadcast_state();
    }

    /// `peer_id`'s `State` arrived on a new connection: its fence is over, whatever it was,
    /// and the reconnect decides (the caller releases what may go on).
    pub(super) fn fence_ended_by_reconnect(&mut self, peer_id: u8) {
        if self.fences.iter().any(|f| f.peer == peer_id) {
            tracing::info!(resource = %self.resource, peer = %self.peer(peer_id).name, "the fenced peer is back: fencing ends, the connect decides");
            self.fences.retain(|f| f.peer != peer_id);
        }
    }

    /// `blkrepl resume-io`: the operator ends the fences (an answer still to come is then
    /// ignored), and what was held or failing goes on under the usual rules.
    pub fn resume_io(&mut self, now: Instant) -> Result<(), String> {
        let Some(why) = self.io_suspended() else {
            return Err("no I/O is suspended by fencing here".into());
        };
        tracing::warn!(resource = %self.resource, was = why, "resume-io: fencing ends by the operator's word");
        self.fences.clear();
        self.release_suspended(now, false);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::FenceOutcome;
    use crate::config::Fencing;
    use crate::core::states::{DiskState, Role};
    use crate::frontend::{BlockError, BlockRequest, BlockResult};
    use crate::meta::MetaFlags;
    use crate::replica::testing::{primary_replicating, secondary_state, settled, with_data_peer_and_witness};
    use crate::replica::{Action, IoTag, MetaWrite, Replica};
    use crate::wire::Message;
    use bytes::Bytes;
    use std::time::Instant;

    fn write(offset: u64) -> BlockRequest {
        BlockRequest::Write { offset, data: Bytes::from(vec![7u8; 4096]), fua: false }
    }

    fn answers(actions: &[Action]) -> Vec<(u64, BlockResult)> {
        actions.iter().filter_map(|a| match a {
            Action::Complete { request, result } => Some((*request, result.clone())),
            _ => None,
        }).collect()
    }

    fn fence_asked(actions: &[Action]) -> Vec<(u8, u64)> {
        actions.iter().filter_map(|a| match a {
            Action::FencePeer { peer, generation } => Some((*peer, *generation)),
            _ => None,
        }).collect()
    }

    /// A primary under `fencing` with write 1 done locally and awaiting its peer's ack when
    /// the peer's link goes; returns the lost connection's generation.
    fn lost_with_a_write_in_flight(fencing: Fencing) -> (Replica, Instant, u64) {
        let (mut r, t0) = primary_replicating();
        r.fencing = fencing;
        r.submit(t0, 1, write(0), |_| 0);
        let id = settled(&mut r).iter().find_map(|a| match a {
            Action::Io { tag: IoTag::Write(id), .. } => Some(*id),
            _ => None,
        }).expect("the local write");
        r.io_done(t0, IoTag::Write(id), Ok(None));
        assert!(answers(&r.take_actions()).is_empty(), "waits for the peer");
        let generation = r.peer(1).generation;
        r.peer_lost(t0, 1, "gone", 0);
        (r, t0, generation)
    }

    #[test]
    fn resource_and_stonith_holds_writes_and_flushes_until_the_handler_answers() {
        let (mut r, t0, generation) = lost_with_a_write_in_flight(Fencing::ResourceAndStonith);
        let actions = r.take_actions();
        assert_eq!(fence_asked(&actions), vec![(1, generation)]);
        assert!(answers(&actions).is_empty(), "the write in flight is held: {actions:?}");
        r.submit(t0, 2, write(8192), |_| 0);
        r.submit(t0, 3, BlockRequest::Flush, |_| 0);
        for a in settled(&mut r) {
            if let Action::Io { tag: tag @ IoTag::Flush(_), .. } = a {
                r.io_done(t0, tag, Ok(None));
            }
        }
        let actions = r.take_actions();
        assert!(answers(&actions).is_empty() && !actions.iter().any(|a| matches!(a, Action::Io { tag: IoTag::Write(_), .. })), "{actions:?}");
        assert_eq!(r.io_suspended(), Some("fencing"));
        assert_eq!(r.held_count(), 3, "the write in flight, the new one, the flush");
        r.fence_done(t0, 1, generation, FenceOutcome::Exited(4));
        assert_eq!(r.io_suspended(), None);
        assert_eq!(r.peer(1).fenced_disk, Some(DiskState::Outdated));
        let actions = r.take_actions();
        let new_generation = actions.iter().position(|a| matches!(a, Action::Persist(MetaWrite::Superblock))).expect("a new generation");
        let first = actions.iter().position(|a| matches!(a, Action::Complete { .. })).expect("answered");
        assert!(new_generation < first, "the generation owed to the lost peer starts first: {actions:?}");
        let mut done = answers(&actions);
        done.sort_by_key(|(request, _)| *request);
        assert_eq!(done, vec![(1, Ok(None)), (3, Ok(None))]);
        let id = actions.iter().find_map(|a| match a {
            Action::Io { tag: IoTag::Write(id), .. } => Some(*id),
            _ => None,
        }).expect("the held write starts");
        r.io_done(t0, IoTag::Write(id), Ok(None));
        assert_eq!(answers(&r.take_actions()), vec![(2, Ok(None))], "no peer left to wait for");
    }

    #[test]
    fn writes_a_handler_releases_wait_for_a_majority_that_knows_the_new_generation() {
        // Quorum two of three: this node and either its data peer or the witness.
        let (mut r, t0) = with_data_peer_and_witness(Role::Primary);
        r.fencing = Fencing::ResourceAndStonith;
        let left = r.sb.uuids.current;
        r.submit(t0, 1, BlockRequest::Write { offset: 0, data: Bytes::from(vec![7u8; 4096]), fua: true }, |_| 0);
        let id = settled(&mut r).iter().find_map(|a| match a {
            Action::Io { tag: IoTag::Write(id), .. } => Some(*id),
            _ => None,
        }).expect("the local write");
        r.io_done(t0, IoTag::Write(id), Ok(None));
        let generation = r.peer(1).generation;
        r.peer_lost(t0, 1, "gone", 0);
        assert!(answers(&r.take_actions()).is_empty(), "held for the handler");

        // The handler answers while the witness, within its lease, still reports the
        // generation this node leaves: the write is on no other node, and the witness could
        // elect node 1 without it. It waits for the witness to confirm the new generation.
        r.fence_done(t0, 1, generation, FenceOutcome::Exited(5));
        let actions = r.take_actions();
        assert!(actions.iter().any(|a| matches!(a, Action::Persist(MetaWrite::Superblock))), "a new generation: {actions:?}");
        assert_ne!(r.sb.uuids.current, left);
        assert!(answers(&actions).is_empty(), "nothing completes before a majority knows the new generation: {actions:?}");
        assert_eq!(r.held_count(), 1);
        let witness_link = r.peer(2).generation;
        let confirmed = secondary_state(r.sb.uuids.current, [left, 0, 0, 0]);
        r.receive(t0, 2, witness_link, Message::State(confirmed)).expect("the witness's State");
        assert_eq!(answers(&r.take_actions()), vec![(1, Ok(None))], "the witness knows it now");
    }

    #[test]
    fn each_exit_code_does_what_drbd_does() {
        for (code, fenced, disk, ok) in [
            (3, Some(DiskState::Inconsistent), DiskState::UpToDate, true),
            (4, Some(DiskState::Outdated), DiskState::UpToDate, true),
            (5, Some(DiskState::Outdated), DiskState::UpToDate, true),
            (6, None, DiskState::Outdated, false),
            (7, Some(DiskState::Outdated), DiskState::UpToDate, true),
            (0, None, DiskState::UpToDate, false),
            (1, None, DiskState::UpToDate, false),
        ] {
            let (mut r, t0, generation) = lost_with_a_write_in_flight(Fencing::ResourceAndStonith);
            r.take_actions();
            r.fence_done(t0, 1, generation, FenceOutcome::Exited(code));
            let actions = r.take_actions();
            assert_eq!((r.peer(1).fenced_disk, r.disk), (fenced, disk), "exit code {code}");
            let expected: BlockResult = if ok { Ok(None) } else { Err(BlockError::Io) };
            assert_eq!(answers(&actions), vec![(1, expected.clone())], "exit code {code}: {actions:?}");
            if code == 6 {
                assert!(!r.sb.flags.contains(MetaFlags::WAS_UP_TO_DATE), "outdated durably");
                assert!(actions.iter().any(|a| matches!(a, Action::Persist(MetaWrite::Superblock))));
            }
            r.submit(t0, 2, write(8192), |_| 0);
            r.submit(t0, 3, BlockRequest::Read { offset: 0, len: 4096 }, |_| 0);
            let actions = settled(&mut r);
            if ok {
                assert!(answers(&actions).is_empty(), "exit code {code}: served as before: {actions:?}");
            } else {
                assert_eq!(answers(&actions), vec![(2, Err(BlockError::Io)), (3, Err(BlockError::Io))], "exit code {code}");
            }
        }
    }

    #[test]
    fn exit_code_5_settles_nothing_on_a_node_that_is_not_up_to_date() {
        let (mut r, t0, generation) = lost_with_a_write_in_flight(Fencing::ResourceAndStonith);
        r.take_actions();
        r.disk = DiskState::Failed;
        r.fence_done(t0, 1, generation, FenceOutcome::Exited(5));
        assert_eq!(r.peer(1).fenced_disk, None);
        assert_eq!(r.io_suspended(), Some("fence-failed"));
        assert_eq!(answers(&r.take_actions()), vec![(1, Err(BlockError::Io))]);
    }

    #[test]
    fn a_broken_handler_fails_writes_until_resume_io_or_the_peer_is_back() {
        let (mut r, t0, generation) = lost_with_a_write_in_flight(Fencing::ResourceAndStonith);
        r.take_actions();
        r.fence_done(t0, 1, generation, FenceOutcome::Failed("still running after 30 s".into()));
        assert_eq!(answers(&r.take_actions()), vec![(1, Err(BlockError::Io))], "the held write fails");
        assert_eq!(r.io_suspended(), Some("fence-failed"));
        r.submit(t0, 2, write(8192), |_| 0);
        assert_eq!(answers(&settled(&mut r)), vec![(2, Err(BlockError::Io))], "so do new ones");
        r.resume_io(t0).expect("something to resume");
        assert_eq!(r.io_suspended(), None);
        assert!(r.resume_io(t0).is_err(), "nothing left to resume");
        r.submit(t0, 3, write(8192), |_| 0);
        assert!(settled(&mut r).iter().any(|a| matches!(a, Action::Io { tag: IoTag::Write(_), .. })), "writes go on");

        // The same, ended by the peer's return instead.
        let (mut r, t0, generation) = lost_with_a_write_in_flight(Fencing::ResourceAndStonith);
        r.fence_done(t0, 1, generation, FenceOutcome::Exited(127));
        r.link_up(1, t0);
        assert_eq!(r.io_suspended(), Some("fence-failed"), "until its State says what it is");
        r.receive(t0, 1, r.peer(1).generation, Message::State(secondary_state(r.sb.uuids.current, [0; 4]))).expect("a fitting State");
        assert_eq!(r.io_suspended(), None);
    }

    #[test]
    fn an_answer_after_the_link_came_back_is_ignored() {
        let (mut r, t0, generation) = lost_with_a_write_in_flight(Fencing::ResourceAndStonith);
        r.take_actions();
        r.link_up(1, t0);
        r.fence_done(t0, 1, generation, FenceOutcome::Exited(6));
        assert_eq!(r.disk, DiskState::UpToDate, "the old loss's answer changes nothing");
        assert_eq!(r.io_suspended(), Some("fencing"), "held until the peer's State");
        r.receive(t0, 1, r.peer(1).generation, Message::State(secondary_state(r.sb.uuids.current, [0; 4]))).expect("a fitting State");
        assert_eq!(r.io_suspended(), None);
        assert_eq!(answers(&r.take_actions()), vec![(1, Ok(None))], "the reconnect decided: quorum is off, the write completes");
        r.fence_done(t0, 1, generation, FenceOutcome::Exited(4));
        assert_eq!(r.peer(1).fenced_disk, None, "still ignored");
    }

    #[test]
    fn a_detached_node_told_its_peer_is_primary_stays_failed_and_writes_no_metadata() {
        let (mut r, t0, generation) = lost_with_a_write_in_flight(Fencing::ResourceOnly);
        r.detach("a metadata write failed".into());
        r.take_actions();
        r.fence_done(t0, 1, generation, FenceOutcome::Exited(6));
        assert_eq!(r.disk, DiskState::Failed, "Outdated would let it connect again over the failed disk");
        assert!(!r.take_actions().iter().any(|a| matches!(a, Action::Persist(_))), "a detached node writes no metadata");
    }

    #[test]
    fn resource_only_asks_the_handler_and_holds_nothing() {
        let (mut r, t0, generation) = lost_with_a_write_in_flight(Fencing::ResourceOnly);
        let actions = r.take_actions();
        assert_eq!(fence_asked(&actions), vec![(1, generation)]);
        assert_eq!(answers(&actions), vec![(1, Ok(None))]);
        assert_eq!(r.io_suspended(), None);
        r.fence_done(t0, 1, generation, FenceOutcome::Failed("killed by signal 9".into()));
        r.submit(t0, 2, write(8192), |_| 0);
        assert!(settled(&mut r).iter().any(|a| matches!(a, Action::Io { tag: IoTag::Write(_), .. })), "a broken handler is only logged");
    }

    #[test]
    fn no_fence_for_dont_care_a_secondary_or_a_peer_known_outdated() {
        let (mut r, _, _) = lost_with_a_write_in_flight(Fencing::DontCare);
        assert!(fence_asked(&r.take_actions()).is_empty());
        let (mut r, t0) = primary_replicating();
        r.fencing = Fencing::ResourceAndStonith;
        r.role = Role::Secondary;
        r.peer_lost(t0, 1, "gone", 0);
        assert!(fence_asked(&r.take_actions()).is_empty(), "a secondary fences nothing");
        let (mut r, t0) = primary_replicating();
        r.fencing = Fencing::ResourceAndStonith;
        r.peer_mut(1).disk = DiskState::Outdated;
        r.peer_lost(t0, 1, "gone", 0);
        assert!(fence_asked(&r.take_actions()).is_empty(), "its disk is known to be Outdated");
        assert_eq!(r.io_suspended(), None);
    }

    #[test]
    fn what_is_in_flight_when_the_handler_says_the_peer_is_primary_fails_too() {
        let (mut r, t0, generation) = lost_with_a_write_in_flight(Fencing::ResourceOnly);
        r.take_actions();
        r.submit(t0, 2, write(8192), |_| 0);
        r.submit(t0, 3, BlockRequest::Flush, |_| 0);
        let in_flight: Vec<IoTag> = r.take_actions().iter().filter_map(|a| match a {
            Action::Io { tag, .. } => Some(*tag),
            _ => None,
        }).collect();
        assert_eq!(in_flight.len(), 2, "the write and the flush reach the disk: {in_flight:?}");
        r.fence_done(t0, 1, generation, FenceOutcome::Exited(6));
        assert_eq!(r.disk, DiskState::Outdated);
        // The disk completes them: this node's data is given up (the peer may be primary and
        // be elected without them), so neither is acknowledged (seed 194070: a flush that
        // completed here made a protocol A write durable in the checker's eyes, and the node
        // elected next lacked it).
        for tag in in_flight {
            r.io_done(t0, tag, Ok(None));
        }
        assert_eq!(answers(&r.take_actions()), vec![(2, Err(BlockError::Io)), (3, Err(BlockError::Io))]);
    }

    #[test]
    fn a_flush_waiting_for_the_lost_peer_is_held_too() {
        let (mut r, t0) = primary_replicating();
        r.fencing = Fencing::ResourceAndStonith;
        r.submit(t0, 1, BlockRequest::Flush, |_| 0);
        for a in r.take_actions() {
            if let Action::Io { tag: tag @ IoTag::Flush(_), .. } = a {
                r.io_done(t0, tag, Ok(None));
            }
        }
        let generation = r.peer(1).generation;
        r.peer_lost(t0, 1, "gone", 0);
        assert!(answers(&r.take_actions()).is_empty());
        r.fence_done(t0, 1, generation, FenceOutcome::Exited(7));
        assert_eq!(answers(&r.take_actions()), vec![(1, Ok(None))]);
    }
}
