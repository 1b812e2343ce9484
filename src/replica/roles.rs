//! Promotion and demotion: when this node may become primary, what a promotion changes in its
//! generations and metadata, and what becoming secondary again leaves on disk. The driver runs
//! the export around them (started after `promote`, stopped before `finish_demotion`).

use super::weakened::{is_weakened, Rule};
use super::{MetaWrite, Replica};
use crate::core::quorum::PromotionInputs;
use crate::core::states::{DiskState, ReplState, Role};
use crate::core::sync_decision::{same_uuid, UUID_JUST_CREATED};
use crate::meta::{MetaFlags, Superblock};
use std::time::Instant;
use crate::wire::DataPosition;

/// Why this node may not be promoted now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromoteRefusal {
    #[error("this node is a diskless witness: it only votes and can never be primary")]
    Witness,
    #[error("peer {peer} is primary: demote it first")]
    PeerIsPrimary { peer: String },
    #[error("no quorum: {votes} of {voters} votes, {needed} needed")]
    NoQuorum { votes: u8, voters: u8, needed: u8 },
    #[error("a connected node reports {name} as primary (this node cannot reach it directly): demote {name} first")]
    OtherPrimary { name: String },
    #[error("this node is being resynced from {source_name}: wait until it is UpToDate")]
    BeingResynced { source_name: String },
    #[error("this node's disk is {disk}, not UpToDate")]
    NotUpToDate { disk: DiskState },
    #[error("cannot promote with a {disk} disk")]
    NoDisk { disk: DiskState },
    #[error("this node just gave its vote to {name}, which is being promoted: try again in a few seconds")]
    VotedFor { name: String },
    #[error("this node's demotion is still under way (its last writes and flush): try again once it is Secondary")]
    Demoting,
    #[error("this node is going down (`down` is under way)")]
    Stopping,
    #[error("data node {name} refused its vote: its data is further on than this node's (it may hold writes this node lacks); promote {name}, or try again once this node is resynced")]
    VoteRefused { name: String },
    #[error("data node {name} did not answer the request for votes in time: try again later")]
    VoteUnanswered { name: String },
    #[error("the device the previous daemon left behind cannot serve again: {why}")]
    LeftBehindStale { why: String },
}

/// What a promotion changed, to undo it if the export cannot start.
#[derive(Debug)]
pub struct Promotion {
    disk_before: DiskState,
    sb_before: Superblock,
}

impl Replica {
    /// Whether this node may be promoted now, as far as it can tell alone (`force`: even
    /// without an UpToDate disk). Under quorum the votes are then asked for (see
    /// `replica/election.rs`).
    pub(super) fn promote_checks(&self, now: Instant, force: bool) -> Result<(), PromoteRefusal> {
        if self.witness {
            return Err(PromoteRefusal::Witness);
        }
        // Its end would clear the primary's marks under the new promotion (seed 33476: a
        // primary promoted again mid-demotion lost its crash marker, and a write only it held
        // was never resynced).
        if self.demoting {
            return Err(PromoteRefusal::Demoting);
        }
        // Its peers stopped counting it when it said it leaves (see `Replica::leave`).
        if self.stopping {
            return Err(PromoteRefusal::Stopping);
        }
        if let Some(peer) = self.peers.iter().find(|p| p.connected && p.role == Role::Primary) {
            return Err(PromoteRefusal::PeerIsPrimary { peer: peer.name.clone() });
        }
        let quorum = self.quorum(now);
        if !quorum.has_quorum {
            return Err(PromoteRefusal::NoQuorum { votes: quorum.votes, voters: quorum.voters, needed: quorum.needed });
        }
        if let Some(other) = quorum.other_primary {
            let name = self.peers.iter().find(|p| p.node_id == other).map_or_else(|| format!("node {other}"), |p| p.name.clone());
            return Err(PromoteRefusal::OtherPrimary { name });
        }
        if let Some(source) = self.peers.iter().find(|p| p.repl == ReplState::SyncTarget || p.pending_sync.is_some_and(|d| d.is_target())) {
            return Err(PromoteRefusal::BeingResynced { source_name: source.name.clone() });
        }
        if self.disk != DiskState::UpToDate && !force {
            return Err(PromoteRefusal::NotUpToDate { disk: self.disk });
        }
        if matches!(self.disk, DiskState::Diskless | DiskState::Failed) {
            return Err(PromoteRefusal::NoDisk { disk: self.disk });
        }
        if let Some(candidate) = self.vote_given_to(now).filter(|id| *id != self.node_id()) {
            return Err(PromoteRefusal::VotedFor { name: self.peer(candidate).name.clone() });
        }
        Ok(())
    }

    /// Promotes this node, the checks and the election passed (`force`: starting a new
    /// generation for every peer). Its metadata says primary (durably, before anything queued
    /// after) and the role is Primary when this returns; the driver then starts the export and
    /// reports with [`Replica::promoted`] or [`Replica::promotion_failed`].
    pub(super) fn promote_now(&mut self, force: bool) -> Promotion {
        let undo = Promotion { disk_before: self.disk, sb_before: self.sb.clone() };
        // The writes applied here as a secondary but not yet flushed (their barrier still to
        // come) are durable before this node serves them: after a crash as primary only the
        // activity log's extents are resynced, and those writes may lie outside them.
        self.persist(MetaWrite::DataFlush);
        // Peers that will not see this node's writes from the start: a new generation begins,
        // and they track from the old one.
        let absent: Vec<usize> = self
            .peers
            .iter()
            .filter(|p| !p.witness)
            // A peer this node holds bits for lacks blocks it has (the last writes of a primary
            // that died, see `Replica::primary_lost`): it tracks too, and is resynced.
            .filter(|p| force || !(p.connected && p.repl == ReplState::Established && p.disk == DiskState::UpToDate) || self.bitmaps[p.slot].weight() > 0)
            .map(|p| p.slot)
            .collect();
        if force || !absent.is_empty() {
            let was_fresh = same_uuid(self.sb.uuids.current, UUID_JUST_CREATED);
            let mut generation = self.generation();
            let started = generation.new_current(self.uuids.next(), true, false, &absent);
            self.set_generation(generation);
            if was_fresh {
                // A peer of a just-created node holds none of its data: all of it must flow.
                for slot in started {
                    let len = self.bitmaps[slot].blocks() * u64::from(self.bitmaps[slot].block_size());
                    self.mark_out_of_sync(slot, 0, len);
                }
            }
        }
        self.disk = DiskState::UpToDate;
        self.sb.flags.insert(MetaFlags::CONSISTENT | MetaFlags::WAS_UP_TO_DATE | MetaFlags::PRIMARY_IND | MetaFlags::OWN_STREAM);
        // Promoted (with --force, if verify had marked it): this copy is the good one now. So
        // with a disk cache lost in a crash: the writes it may lack were never flushed (an
        // election weighs flushed data), and its copy now overwrites the others'.
        self.sb.flags.remove(MetaFlags::VERIFY_DIFFERS);
        self.sb.flags.remove(MetaFlags::CACHE_LOST);
        self.cache_repair_pending.clear();
        self.sb.flags.remove(MetaFlags::AL_CLEAN);
        self.persist(MetaWrite::Superblock);
        self.role = Role::Primary;
        undo
    }

    /// The export started: the peers hear of the new primary, and the connections that now
    /// call for a resync get one. A peer in sync and UpToDate (one the promotion counted as
    /// present) is not decided again: it follows the new generation when this State reaches
    /// it, and deciding now against its State from before would take it for a node left
    /// behind.
    pub fn promoted(&mut self) {
        self.stepped_down = None;
        // The export started on the device left behind, if there was one: it serves again.
        self.left_behind = None;
        tracing::info!(resource = %self.resource, uuid = format_args!("{:016X}", self.sb.uuids.current), "promoted to Primary");
        self.broadcast_state();
        // A peer the promotion started tracking (see `promote_now`) is decided again too.
        let follows = |p: &&super::Peer| {
            p.connected && p.repl == ReplState::Established && p.disk == DiskState::UpToDate && self.sb.peers[p.slot].bitmap_uuid == 0
        };
        let waiting: Vec<u8> = self.peers.iter().filter(|p| !follows(p)).map(|p| p.node_id).collect();
        for peer in waiting {
            self.reconsider_or_drop(peer);
        }
    }

    /// The export could not start, or the promotion's metadata write failed: back to what the
    /// node was (bits marked for absent peers stay: over-reporting is safe). A Failed disk
    /// stays Failed.
    pub fn promotion_failed(&mut self, undo: Promotion) {
        self.role = Role::Secondary;
        self.elected = None;
        if self.disk == DiskState::Failed {
            return;
        }
        self.disk = undo.disk_before;
        self.sb = undo.sb_before;
        self.persist(MetaWrite::Superblock);
    }

    /// What a cluster manager reads (`status`: `may_promote`, `promotion_score`): whether a
    /// `primary` without `--force` would succeed now, and how much this node is preferred.
    /// None on a witness, which is never a candidate.
    pub fn promotion_inputs(&self, now: Instant) -> Option<PromotionInputs> {
        if self.witness {
            return None;
        }
        Some(PromotionInputs {
            role: self.role,
            disk: self.disk,
            quorum: self.quorum(now),
            all_data_peers_known: self.peers.iter().filter(|p| !p.witness).all(|p| p.last_state.is_some()),
            peer_up_to_date: self.peers.iter().any(|p| p.last_state.is_some() && p.disk == DiskState::UpToDate),
        })
    }

    /// Whether this node answers requests as the primary: it is one, or its demotion is under
    /// way (the writes and flushes it took as primary still complete, under the same rules).
    pub fn answers_as_primary(&self) -> bool {
        self.role == Role::Primary || self.demoting
    }

    /// The first half of becoming Secondary: what is held fails, a new generation owed to lost
    /// peers never starts (while one is owed nothing more completes as acknowledged, see
    /// `Replica::finish_request`), and the peers learn it behind
    /// the writes already sent and ahead of the final flush's barrier: once the barrier is
    /// acked, every peer knows this node is no longer primary and may promote itself, and no
    /// write of this node reaches a peer after that news. The driver then stops the export,
    /// waits for the writes in flight ([`Replica::writes_idle`]), flushes, and calls
    /// [`Replica::finish_demotion`].
    pub fn begin_demotion(&mut self, now: Instant) {
        // The final flush's barrier goes to each of them even if nothing of theirs is left
        // unacknowledged: its ack is what says they heard of the demotion (a protocol-A peer
        // promoted right after `secondary` returned still saw this node as primary).
        self.demotion_stream = self.peers.iter().filter(|p| self.receives_stream(p)).map(|p| p.node_id).collect();
        self.role = Role::Secondary;
        self.demoting = true;
        self.superseded_latched = false;
        self.left_generation = 0;
        self.release_suspended(now, true);
        // Writes waiting for room never started: they are refused, as any new one is now.
        self.release_for_room(now);
        self.broadcast_state_in_stream();
    }

    /// Every write finished and was flushed: the metadata no longer says primary, and the
    /// activity log is empty (its extents need no resync after a crash from now on).
    pub fn finish_demotion(&mut self) {
        self.demotion_stream.clear();
        self.demoting = false;
        self.generation_pending.clear();
        // Unless a crash as primary is still to be repaired with some peer (see
        // `Replica::clear_crash_marker`): a crash after this demotion must not forget it.
        if !self.crashed_primary {
            self.sb.flags.remove(MetaFlags::PRIMARY_IND);
        }
        // Its data holds its whole stream, flushed by the last barrier (the epoch before the
        // open one): as far as a secondary that acknowledged that barrier, no further.
        self.set_data_position(DataPosition { epoch: self.epoch - 1, ..self.data_position() });
        match self.al.mark_clean() {
            Ok(clean) => {
                self.commit_al(clean);
                self.sb.flags.insert(MetaFlags::AL_CLEAN);
            }
            // A write still holds an extent (the driver did not wait): the log stays as it is,
            // and a crash resyncs its extents.
            Err(e) => tracing::error!(resource = %self.resource, error = %e, "demoted with writes in flight: the activity log stays"),
        }
        self.persist(MetaWrite::Superblock);
        // A decision that waited for this primary to step down (a newer primary's resync into
        // it) is taken now that its own writes are done.
        self.standing_changed(None);
        self.cache_lost = false;
        if let Some(why) = self.io_failed.take() {
            self.resync_failed_writes(&why);
        }
    }

    /// Steps down by itself: this primary lost quorum and another node was promoted meanwhile
    /// (see `Replica::superseded`). Nothing it holds was acknowledged and its data lacks the
    /// new primary's writes: it is Outdated, and resyncs from the new primary like any node
    /// that fell behind (it started no generation without quorum, so the new primary's history
    /// holds its own). Returns why, for the log and `status`; the driver demotes it next.
    pub fn step_down(&mut self, now: Instant) -> Option<String> {
        if !self.superseded(now) || is_weakened(Rule::NoStepDown) {
            return None;
        }
        let other = self.quorum(now).other_primary.map(|id| {
            self.peers.iter().find(|p| p.node_id == id).map_or_else(|| format!("node {id}"), |p| p.name.clone())
        });
        // Without a primary in sight, a peer knows a later election or a generation started
        // after this node's: another node may have been promoted, out of reach.
        let why = match &other {
            Some(name) => format!("{name} was promoted while this node had no quorum"),
            None => "a peer knows a later election or a newer generation: another node may have been promoted while this node had no quorum".to_string(),
        };
        tracing::error!(resource = %self.resource,
            "stepping down to Secondary: {why}; the writes held here were never acknowledged and fail; this node resyncs from the new primary");
        self.outdate();
        self.stepped_down = Some(why.clone());
        Some(why)
    }
}

#[cfg(test)]
mod tests {
    use super::PromoteRefusal;
    use crate::core::states::{DiskState, ReplState, Role};
    use crate::meta::MetaFlags;
    use crate::replica::testing::{primary_replicating, secondary_state, settled, two_node_replica};
    use crate::replica::{Action, MetaWrite, Replica, ResyncStep};
    use std::time::Instant;
    use crate::wire::Message;

    #[test]
    fn a_promotion_without_the_peer_starts_a_generation_durably_before_the_peer_hears_of_it() {
        let (mut r, t0) = two_node_replica();
        r.disk = DiskState::UpToDate;
        let before = r.generation().current;
        let undo = r.promote(t0, false).expect("quorum is off, the disk UpToDate");
        assert_eq!(r.role, Role::Primary);
        assert_ne!(r.generation().current, before, "the absent peer tracks from the old generation");
        assert_eq!(r.sb.peers[0].bitmap_uuid & !1, before & !1);
        assert!(r.sb.flags.contains(MetaFlags::PRIMARY_IND));
        r.link_up(1, t0);
        r.promoted();
        let actions = r.take_actions();
        let persisted = actions.iter().position(|a| matches!(a, Action::Persist(MetaWrite::Superblock))).expect("persisted");
        let told = actions.iter().position(|a| matches!(a, Action::Send { msg: Message::State(_), .. })).expect("told");
        assert!(persisted < told, "{actions:?}");
        drop(undo);
    }

    #[test]
    fn a_promotion_is_refused_with_the_reason() {
        let (mut r, t0) = two_node_replica();
        assert_eq!(r.promote(t0, false).unwrap_err(), PromoteRefusal::NotUpToDate { disk: r.disk });
        r.disk = DiskState::UpToDate;
        r.link_up(1, t0);
        r.peer_mut(1).role = Role::Primary;
        assert!(matches!(r.promote(t0, false), Err(PromoteRefusal::PeerIsPrimary { .. })));
        assert_eq!(r.role, Role::Secondary);
        assert!(r.take_actions().iter().all(|a| !matches!(a, Action::Persist(_))), "nothing written");
    }

    #[test]
    fn a_failed_export_undoes_the_promotion() {
        let (mut r, t0) = two_node_replica();
        r.disk = DiskState::Consistent;
        let sb = r.sb.clone();
        let Ok(super::super::PromoteStep::Promoted(undo)) = r.promote(t0, true) else { panic!("--force without quorum promotes at once") };
        r.promotion_failed(undo);
        assert_eq!((r.role, r.disk), (Role::Secondary, DiskState::Consistent));
        assert_eq!(r.sb.uuids.current, sb.uuids.current);
        assert!(!r.sb.flags.contains(MetaFlags::PRIMARY_IND));
    }

    #[test]
    fn demotion_empties_the_activity_log_before_the_superblock_says_clean() {
        let (mut r, t0) = primary_replicating();
        r.submit(t0, 1, crate::frontend::BlockRequest::Write { offset: 0, data: vec![1u8; 4096].into(), fua: false }, |_| 0);
        let id = settled(&mut r).iter().find_map(|a| match a {
            Action::Io { tag: crate::replica::IoTag::Write(id), .. } => Some(*id),
            _ => None,
        }).expect("written");
        r.begin_demotion(t0);
        assert!(!r.writes_idle());
        r.io_done(t0, crate::replica::IoTag::Write(id), Ok(None));
        r.peer_reached(t0, id, 1, crate::core::inflight::AckLevel::Written);
        assert!(r.writes_idle());
        // The driver's last flush: its barrier still goes to the peer, whose ack frees the
        // write's extent there.
        r.submit(t0, 2, crate::frontend::BlockRequest::Flush, |_| 0);
        let epoch = r.peer(1).barriers.back().expect("a barrier to the peer").0;
        r.barrier_acked(t0, 1, epoch);
        r.take_actions();
        r.finish_demotion();
        let actions = r.take_actions();
        assert!(matches!(&actions[..], [Action::Persist(MetaWrite::DataFlush), Action::Persist(MetaWrite::ActivityLog(_)), Action::Persist(MetaWrite::Superblock), ..]), "{actions:?}");
        assert!(r.sb.flags.contains(MetaFlags::AL_CLEAN) && !r.sb.flags.contains(MetaFlags::PRIMARY_IND));
        assert!(r.al.hot_extents().is_empty());
    }

    /// A primary under `quorum` whose FLUSH (request 2) is done locally and waits for the
    /// peer's barrier ack, its demotion begun.
    fn demoting_with_a_flush_awaiting_the_peer(quorum: crate::core::quorum::QuorumPolicy) -> (Replica, Instant) {
        let (mut r, t0) = primary_replicating();
        r.quorum_policy = quorum;
        r.submit(t0, 2, crate::frontend::BlockRequest::Flush, |_| 0);
        let flush = r.take_actions().iter().find_map(|a| match a {
            Action::Io { tag: tag @ crate::replica::IoTag::Flush(_), .. } => Some(*tag),
            _ => None,
        }).expect("the local flush");
        r.io_done(t0, flush, Ok(None));
        r.begin_demotion(t0);
        r.take_actions();
        (r, t0)
    }

    /// The requests answered, and whether with success.
    fn answered(r: &mut Replica) -> Vec<(u64, bool)> {
        r.take_actions().into_iter().filter_map(|a| match a {
            Action::Complete { request, result } => Some((request, result.is_ok())),
            _ => None,
        }).collect()
    }

    #[test]
    fn a_node_being_demoted_fails_what_it_may_not_complete_without_quorum() {
        let (mut r, t0) = demoting_with_a_flush_awaiting_the_peer(crate::core::quorum::QuorumPolicy::Majority);
        // The peer is cut off: its link goes long after its lease, and the flush that waited
        // for its barrier ack would complete on this node alone.
        let later = t0 + std::time::Duration::from_secs(10);
        r.peer_lost(later, 1, "nothing heard", 0);
        assert_eq!(answered(&mut r), vec![(2, false)], "not held: a demoted node has no time as primary left to wait for");
    }

    #[test]
    fn a_node_being_demoted_completes_nothing_after_losing_a_data_peer_that_lacks_its_writes() {
        // Quorum off: the rule is not quorum's; no generation separates the lost peer.
        let (mut r, t0) = demoting_with_a_flush_awaiting_the_peer(crate::core::quorum::QuorumPolicy::Off);
        r.peer_lost(t0, 1, "gone", 0);
        assert_eq!(answered(&mut r), vec![(2, false)], "the peer could be elected without what the flush covered");
        r.finish_demotion();
        assert!(r.generation_pending.is_empty(), "owed no more once demoted");
    }

    #[test]
    fn no_promotion_while_a_demotion_is_under_way() {
        let (mut r, t0) = primary_replicating();
        r.begin_demotion(t0);
        assert!(matches!(r.promote(t0, false), Err(PromoteRefusal::Demoting)));
        r.finish_demotion();
        assert!(!matches!(r.promote(t0, false), Err(PromoteRefusal::Demoting)));
    }

    #[test]
    fn no_promotion_once_the_node_is_leaving() {
        let (mut r, t0) = two_node_replica();
        r.disk = DiskState::UpToDate;
        r.leave();
        assert!(matches!(r.promote(t0, true), Err(PromoteRefusal::Stopping)));
    }

    #[test]
    fn a_promotion_decides_again_only_with_peers_it_did_not_count_as_present() {
        let (mut r, t0) = primary_replicating();
        r.role = Role::Secondary;
        r.peer_mut(1).last_state = Some(secondary_state(r.sb.uuids.current, [0; 4]));
        r.promote(t0, false).expect("in sync with an UpToDate peer");
        r.promoted();
        let actions = r.take_actions();
        assert!(actions.iter().any(|a| matches!(a, Action::Send { msg: Message::State(_), .. })), "{actions:?}");
        assert!(!actions.iter().any(|a| matches!(a, Action::Send { msg: Message::BitmapRuns { .. }, .. })), "it follows: {actions:?}");
        assert!(r.peer(1).pending_sync.is_none());
    }

    #[test]
    fn a_node_being_demoted_tells_how_far_its_whole_stream_goes() {
        let (mut r, t0) = primary_replicating();
        r.submit(t0, 1, crate::replica::testing::write(0, 4096), |_| 0);
        let open = r.data_position();
        r.begin_demotion(t0);
        assert_eq!(r.data_position(), open, "not the position recorded at its promotion (epoch 0)");
        let sent = r.take_actions().into_iter().find_map(|a| match a {
            Action::Send { msg: Message::State(state), .. } => Some(state.data_position),
            _ => None,
        });
        assert_eq!(sent, Some(open), "its peers hear it too");
    }

    #[test]
    fn a_primary_demoted_after_writes_a_resynced_peer_missed_is_further_than_that_peer() {
        // Seed 35913: the target took the primary's open epoch with the ResyncDone, lost the
        // link before the writes that followed in that epoch, and tied with the demoted
        // primary, whose bits for those writes were then resynced by no rule.
        let (mut r, t0) = primary_replicating();
        r.peer_mut(1).repl = ReplState::SyncSource;
        r.resync_source_started(t0, 1);
        assert_eq!(r.resync_next(t0, 1, false), ResyncStep::Finished, "nothing to send");
        let handed = crate::replica::testing::resync_done_position(r.take_actions());
        r.submit(t0, 1, crate::replica::testing::write(0, 4096), |_| 0);
        assert_eq!(crate::replica::testing::data_sent(&settled(&mut r)), vec![0], "sent to the peer");
        r.peer_lost(t0, 1, "gone", 0);
        assert!(r.bitmaps[0].weight() > 0, "the write is marked for the lost peer");
        r.begin_demotion(t0);
        r.submit(t0, 2, crate::frontend::BlockRequest::Flush, |_| 0);
        r.finish_demotion();
        assert!(r.data_position() > handed, "demoted at {:?}, the resynced copy at {handed:?}", r.data_position());
    }

}
