//! A peer this node stops replicating to, because its link went or because it was left behind
//! (pull-ahead): everything it may lack goes into its bitmap, the writes and flushes waiting
//! for it complete, and a primary owes a new generation before any of them completes.

use super::{Action, Replica};
use crate::core::sync_decision::same_uuid;
use crate::core::inflight::LocalFailure;
use crate::core::states::{ReplState, Role};
use std::time::Instant;

impl Replica {
    /// The link to `peer_id` is gone (`sent_bytes` went out on it), for `reason`.
    pub fn peer_lost(&mut self, now: Instant, peer_id: u8, reason: &str, sent_bytes: u64) {
        let standing = |r: &Replica| (r.primaries(), r.demoting_peers(), r.sync_target_of(), r.resyncs_other_than(None));
        let before = standing(self);
        // A primary that stepped down without waiting for its writes in flight (its disk
        // failed) told so in a State that overtook them, and its link went before they
        // arrived: it was primary for what this node and the others hold (seed 127200: one
        // secondary had its last write, the other not, and neither recorded it for the other).
        let was_primary = self.peer(peer_id).role == Role::Primary || self.recent.came_from(peer_id, now);
        let disk_before = self.peer(peer_id).disk;
        let (was, last_generation) = self.link_down(peer_id, reason, sent_bytes);
        tracing::warn!(resource = %self.resource, peer = %self.peer(peer_id).name, was = %was, "connection lost: {reason}");
        // Before the writes waiting for the peer complete: fencing may hold them.
        self.fence_lost_peer(peer_id, disk_before);
        // A node this one was still resyncing has not taken its generation (a resync's end
        // does that, see `finish_resync_as_source`) and is tracked from an older one already.
        // Unless the resync's end went out: the target may have taken the generation and
        // reported it UpToDate to the others before the link went, so it holds this node's
        // generation as much as a peer in sync did (seed 124072: a primary wrote on in it, and
        // the target, of the same generation, was elected without those writes).
        let tracked = self.sb.peers[self.peer(peer_id).slot].bitmap_uuid != 0;
        let done_sent = self.peer(peer_id).sync.walk.done_sent.is_some();
        let held_mine = !(was == ReplState::SyncSource && tracked && !done_sent);
        self.stops_following(now, peer_id, last_generation, held_mine);
        if was_primary {
            self.primary_lost(peer_id);
        }
        if standing(self) != before {
            self.standing_changed(None);
        }
        // Its queue no longer holds writes back.
        self.release_for_room(now);
    }

    /// The peer no longer receives this node's writes. `last_generation`: the generation it
    /// last reported while in sync (see `Replica::mark_recent_for`). `held_mine`: it may hold
    /// this node's current generation, so a primary owes a new one (a peer still behind, being
    /// resynced, is told apart by its older generation already: a new one for it would only
    /// use up history, and a link that flapped during a resync used up all four entries within
    /// seconds, after which two nodes could no longer tell they shared a past).
    pub(super) fn stops_following(&mut self, now: Instant, peer_id: u8, last_generation: Option<u64>, held_mine: bool) {
        let peer = self.peer_mut(peer_id);
        let slot = peer.slot;
        let lost = peer.tl.drain_lost();
        for s in &lost {
            self.mark_out_of_sync(slot, s.offset, s.len);
        }
        for (offset, len) in self.inflight.pending_for(peer_id) {
            self.mark_out_of_sync(slot, offset, len);
        }
        // Marked (in memory): an eviction of their extents writes these bits first.
        for s in lost.into_iter().filter(|s| s.write) {
            self.release_extents(s.offset, s.len);
        }
        self.start_waiting();
        self.mark_recent_for(peer_id, last_generation);
        // A witness holds no data, so losing it starts no new generation. For a data peer the
        // new generation starts before the next write completes, which needs quorum (see
        // `Replica::generation_pending`).
        if self.answers_as_primary() && held_mine && !self.peer(peer_id).witness && !self.generation_pending.contains(&slot) {
            self.track_from_reported(slot, last_generation);
            self.generation_pending.push(slot);
        }
        let failed = self.disk == crate::core::states::DiskState::Failed;
        for mut finished in self.inflight.peer_lost(peer_id) {
            if failed {
                finished.local_failure.get_or_insert(LocalFailure::Io);
            }
            self.write_finished(now, finished);
        }
        for flush in self.flushes.iter_mut() {
            flush.peers_pending.retain(|id| *id != peer_id);
        }
        self.finish_flushes(now);
    }

    /// A primary lost a data peer that tracks nothing yet, and whose last `State` in sync
    /// named an older generation of this node's than its current (the link was already silent
    /// when this node started the current one, for another lost peer): the peer holds that
    /// generation, not the current one, so it is tracked from it. Otherwise the generation owed
    /// to it would track it from the current one, which it never had, and its next connect
    /// would copy the whole disk (seed 17).
    fn track_from_reported(&mut self, slot: usize, reported: Option<u64>) {
        let uuids = self.sb.uuids;
        let older = reported.filter(|g| !same_uuid(*g, uuids.current) && uuids.left(*g));
        if let Some(generation) = older.filter(|_| self.sb.peers[slot].bitmap_uuid == 0) {
            // Bit 0: this node was primary when the peer parted (see `Generation::new_current`).
            self.sb.peers[slot].bitmap_uuid = (generation & !1) | 1;
            self.persist(super::MetaWrite::Superblock);
        }
    }

    /// The primary's link went: the last writes it sent may have reached some secondaries and
    /// not others (those in flight when it died), so each secondary records what it applied
    /// lately for every other data peer. Whichever of them is promoted next resyncs those
    /// blocks into the others (see `Replica::promote_now`); if the primary comes back instead,
    /// secondaries that follow it again forget these marks (see `only_primary_resyncs`).
    fn primary_lost(&mut self, primary_id: u8) {
        if self.role == Role::Primary || self.witness {
            return;
        }
        let others: Vec<(u8, Option<u64>)> = self
            .peers
            .iter()
            .filter(|p| p.node_id != primary_id && !p.witness)
            .map(|p| (p.node_id, Some(p.last_state.map_or(self.sb.uuids.current, |s| s.current_uuid))))
            .collect();
        for (peer_id, generation) in others {
            self.mark_recent_for(peer_id, generation);
        }
    }

    /// Re-runs the connect-time decision with `peer_id`; a peer it cannot go on with is dropped.
    pub fn reconsider_or_drop(&mut self, peer_id: u8) {
        if let Err(reason) = self.reconsider(peer_id) {
            self.drop_link(peer_id, reason);
        }
    }

    /// [`Replica::reconsider_or_drop`] for every connected peer whose stream is idle (after a
    /// promotion, say, a peer may now need a sync).
    pub fn reconsider_all_or_drop(&mut self) {
        for (peer_id, reason) in self.reconsider_all() {
            self.drop_link(peer_id, reason);
        }
    }

    /// Asks the driver to drop the current link to `peer_id`.
    pub fn drop_link(&mut self, peer_id: u8, reason: String) {
        let generation = self.peer(peer_id).generation;
        self.outbox.push(Action::DropLink { peer: peer_id, generation, reason });
    }

    /// Whether the driver was asked, in the actions not yet taken, to drop the link `generation`
    /// to `peer_id`: a driver that hands over several frames at once stops there, as if the
    /// link had gone after that frame.
    pub fn dropping(&self, peer_id: u8, generation: u64) -> bool {
        self.outbox.iter().any(|action| matches!(action, Action::DropLink { peer, generation: g, .. } if *peer == peer_id && *g == generation))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{secondary_state, three_node_replica};
    use super::super::{LocalIo, RecentWrites, STATE_FLAG_BESIDE_DEMOTION, STATE_FLAG_DEMOTING, STATE_FLAG_FOLLOWING};
    use super::{ReplState, Replica, Role};
    use crate::core::states::DiskState;
    use std::time::Instant;

    /// Node 0, Secondary; node 1 its primary; node 2 another secondary that follows node 1.
    /// Node 0 has applied one write of node 1's stream.
    fn following_node_1() -> (Replica, Instant) {
        let (mut r, t0) = three_node_replica();
        r.disk = DiskState::UpToDate;
        for (id, role) in [(1, Role::Primary), (2, Role::Secondary)] {
            r.link_up(id, t0);
            let mut state = secondary_state(r.sb.uuids.current, [0; 4]);
            (state.role, state.primaries, state.flags) = (role.to_wire(), 1 << 1, STATE_FLAG_FOLLOWING);
            let peer = r.peer_mut(id);
            (peer.repl, peer.role, peer.disk, peer.last_state) = (ReplState::Established, role, DiskState::UpToDate, Some(state));
        }
        r.take_actions();
        let write = LocalIo::Write { offset: 8192, data: bytes::Bytes::from(vec![1u8; 4096]), fua: false };
        r.peer_write_received(t0, 1, (1, 1), 8192, 4096, false, write);
        (r, t0)
    }

    fn marked(r: &Replica, id: u8) -> u64 {
        r.bitmaps[r.peer(id).slot].weight()
    }

    #[test]
    fn a_secondary_marks_its_recent_writes_for_a_peer_it_loses_but_not_for_the_primary_that_sent_them() {
        let (mut r, t0) = following_node_1();
        assert_eq!((marked(&r, 1), marked(&r, 2)), (0, 0), "both follow the primary");
        // The primary goes: node 2 may have missed its last write, the primary did not.
        r.peer_lost(t0, 1, "link lost", 0);
        assert_eq!(marked(&r, 1), 0, "the primary sent the write itself");
        assert_eq!(marked(&r, 2), 1, "node 2 may lack it");
        // Node 2 goes too: still nothing for node 1.
        r.peer_lost(t0, 2, "link lost", 0);
        assert_eq!(marked(&r, 1), 0);
    }

    /// A State of node 2's that sees no primary, `flags` set.
    fn sees_no_primary(r: &Replica, flags: u32) -> crate::wire::PeerState {
        crate::wire::PeerState { flags, primaries: 0, ..secondary_state(r.sb.uuids.current, [0; 4]) }
    }

    #[test]
    fn a_peer_that_hears_the_primary_step_down_first_is_not_taken_for_one_that_lost_it() {
        let (mut r, _) = following_node_1();
        r.peer_state_received(2, sees_no_primary(&r, STATE_FLAG_BESIDE_DEMOTION)).expect("a fitting State");
        assert_eq!(marked(&r, 2), 0, "node 1 steps down beside node 2: no loss");
        // Node 1's State saying so reaches this node, behind its writes.
        let demoting = crate::wire::PeerState { flags: STATE_FLAG_DEMOTING, ..secondary_state(r.sb.uuids.current, [0; 4]) };
        r.peer_state_received(1, demoting).expect("a fitting State");
        r.peer_state_received(2, sees_no_primary(&r, 0)).expect("a fitting State");
        assert_eq!(marked(&r, 2), 0, "node 2 took node 1's last writes before the demotion ended");
        assert_eq!(r.peer(2).demotion_excused, 0);
    }

    #[test]
    fn a_peer_that_shows_no_demotion_beside_it_while_the_primary_stays_lost_it() {
        let (mut r, _) = following_node_1();
        r.peer_state_received(2, sees_no_primary(&r, STATE_FLAG_BESIDE_DEMOTION)).expect("a fitting State");
        assert_eq!(marked(&r, 2), 0);
        // Node 1 is still primary here, and node 2 no longer says it steps down beside it: its
        // link to node 1 went.
        r.peer_state_received(2, sees_no_primary(&r, 0)).expect("a fitting State");
        assert_eq!(marked(&r, 2), 1, "node 2 may lack node 1's last write");
    }

    #[test]
    fn a_primary_that_stepped_down_just_before_its_link_went_is_lost_as_a_primary() {
        // Seed 127200: node 1's disk failed; its State saying it is Secondary overtook its last
        // write to node 2, and its link went before that write arrived.
        let stepped_down = || {
            let (mut r, t0) = following_node_1();
            r.peer_mut(1).role = Role::Secondary;
            (r, t0)
        };
        let (mut r, t0) = stepped_down();
        r.peer_lost(t0, 1, "link lost", 0);
        assert_eq!(marked(&r, 2), 1, "node 2 may lack the write node 1 streamed here lately");
        // Long after its last write, a node that stepped down is an ordinary secondary.
        let (mut r, t0) = stepped_down();
        let later = t0 + 2 * RecentWrites::window_for(&r.timing);
        r.peer_lost(later, 1, "link lost", 0);
        assert_eq!(marked(&r, 2), 0, "nothing streamed here lately");
    }

    #[test]
    fn a_link_asked_to_drop_is_dropping_until_the_driver_takes_the_actions() {
        let (mut replica, t0) = three_node_replica();
        let first = replica.link_up(1, t0);
        replica.link_up(2, t0);
        replica.take_actions();
        assert!(!replica.dropping(1, first));
        replica.drop_link(1, "a frame of this batch said so".into());
        assert!(replica.dropping(1, first));
        assert!(!replica.dropping(2, replica.peer(2).generation), "only that peer");
        assert!(!replica.dropping(1, first + 1), "only that link");
        replica.take_actions();
        assert!(!replica.dropping(1, first), "the driver took the request");
    }

    /// A primary resyncing a peer it tracks from an older generation, the resync's end sent
    /// or not, then the link lost before the target's answer.
    fn primary_losing_its_sync_target(finish: bool) -> Replica {
        let (mut r, t0) = super::super::testing::primary_replicating();
        let slot = r.peer(1).slot;
        r.sb.peers[slot].bitmap_uuid = 0x50;
        r.peer_mut(1).repl = ReplState::SyncSource;
        r.resync_source_started(t0, 1);
        if finish {
            assert_eq!(r.resync_next(t0, 1, false), crate::replica::ResyncStep::Finished, "nothing to send");
        }
        r.take_actions();
        r.peer_lost(t0, 1, "silence", 0);
        r
    }

    #[test]
    fn a_sync_target_told_the_resync_is_over_is_owed_a_new_generation() {
        let r = primary_losing_its_sync_target(true);
        assert_eq!(r.generation_pending, [r.peer(1).slot], "it may hold this generation and be elected in it");
        assert_eq!(r.sb.peers[r.peer(1).slot].bitmap_uuid, 0x50, "still tracked from where its bits start");
        let r = primary_losing_its_sync_target(false);
        assert!(r.generation_pending.is_empty(), "mid-resync it holds an older generation already");
    }
}
