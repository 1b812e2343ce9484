//! What a peer's `State` changes here, and the connect-time decision: in sync, which way a
//! resync goes, a split brain and its policies, or a refusal. Also where a secondary follows
//! its primary's new generation, and where a resync ends on the source's side.

use super::declaration::DeclarationStep;
use super::weakened::{is_weakened, Rule};
use super::{
    MetaWrite, Replica, STATE_FLAG_AHEAD, STATE_FLAG_BESIDE_DEMOTION, STATE_FLAG_CACHE_LOST, STATE_FLAG_CRASHED_PRIMARY, STATE_FLAG_DEMOTING, STATE_FLAG_DISCARD_MY_DATA,
    STATE_FLAG_FOLLOWING, STATE_FLAG_LEAVING, STATE_FLAG_REPAIR_PENDING, STATE_FLAG_RESYNCS_OTHER,
};
use crate::core::leftover_bits::{resync_leftover_bits, BitsHolder};
use crate::core::quorum::QuorumPolicy;
use crate::core::split_brain::{self, SbResolution, SbSide, SplitBrainPolicies};
use crate::core::states::{DiskState, ReplState, Role};
use crate::core::sync_decision::{check_states, decide, same_uuid, Refusal, SyncDecision, UuidView};
use crate::meta::MetaFlags;
use crate::wire::{DataPosition, Message, PeerState};

/// BitmapRuns frames carry at most this many runs.
const RUNS_PER_FRAME: usize = 4096;

/// The peer's side of the connect-time decision, from its last `State`.
fn peer_view(peer_id: u8, state: &PeerState) -> UuidView {
    UuidView {
        node_id: peer_id,
        current: state.current_uuid,
        bitmap_for_peer: state.bitmap_uuid,
        history: state.history,
        crashed_primary: state.flags & STATE_FLAG_CRASHED_PRIMARY != 0,
        is_primary: Role::from_wire(state.role) == Some(Role::Primary),
        inconsistent: DiskState::from_wire(state.disk) == Some(DiskState::Inconsistent),
        data_position: state.data_position,
        cache_lost: state.flags & STATE_FLAG_CACHE_LOST != 0,
    }
}

impl Replica {
    /// A `State` from `peer_id`. The error is why the link must be dropped.
    pub fn peer_state_received(&mut self, peer_id: u8, state: PeerState) -> Result<(), String> {
        if state.resynced_by == Some(self.node_id()) && self.sync_target_of() == Some(peer_id) {
            // Each decided on a State of the other's that was already out of date: both wait
            // to be resynced by the other. A new link brings fresh States to decide on.
            return Err("both sides decided to be resynced by the other: deciding again on a new connection".into());
        }
        let standing_before = (self.primaries(), self.demoting_peers());
        let peer = self.peer_mut(peer_id);
        peer.role = Role::from_wire(state.role).ok_or("State with an unknown role")?;
        peer.was_primary |= peer.role == Role::Primary;
        let disk_before = std::mem::replace(&mut peer.disk, DiskState::from_wire(state.disk).ok_or("State with an unknown disk state")?);
        // A third node that turned out Inconsistent, or waiting for its own lost cache's repair,
        // may be what a decision with a node that lost its cache waited for (see `reconsider`):
        // that decision is taken again below.
        let pending = |s: Option<PeerState>| s.is_some_and(|s| s.flags & STATE_FLAG_REPAIR_PENDING != 0);
        let now_no_better = !peer.witness
            && (disk_before != DiskState::Inconsistent && peer.disk == DiskState::Inconsistent || !pending(peer.last_state) && pending(Some(state)));
        if peer.role == Role::Primary && self.vote_given.is_some_and(|v| v.candidate == peer_id) {
            // The candidate won and says so: from here on it is a primary this node sees, and
            // when it goes, another election may start at once.
            self.vote_given = None;
        }
        let peer = self.peer_mut(peer_id);
        let saw_before = peer.last_state.map_or(0, |s| s.primaries);
        let lagged_before = peer.last_state.filter(|_| peer.role == Role::Primary).map_or(0, |s| s.lagging);
        peer.last_state = Some(state);
        if peer.resync_end_unconfirmed.is_some_and(|uuid| !same_uuid(uuid, state.bitmap_uuid)) {
            peer.resync_end_unconfirmed = None;
        }
        if state.term > self.sb.terms.highest && self.role != Role::Primary {
            // A later election happened: this node votes in none up to it (a primary keeps the
            // term it was elected in, which the peer's vote no longer counts for).
            self.sb.terms.highest = state.term;
            self.persist(MetaWrite::Superblock);
        }
        if self.peer(peer_id).role != Role::Primary {
            // Whatever a peer's loss of this one was excused by, this node hears for itself now.
            for peer in self.peers.iter_mut() {
                peer.demotion_excused &= !(1 << peer_id);
            }
        }
        self.peer_stopped_seeing(peer_id, saw_before & !state.primaries, &state);
        if state.flags & STATE_FLAG_LEAVING != 0 && !self.departed(self.peer(peer_id)) {
            self.set_departed(peer_id, true);
            tracing::info!(resource = %self.resource, peer = %self.peer(peer_id).name, "peer is leaving cleanly (Outdated): no longer counted for quorum");
        }
        // A primary of an election older than one this witness took part in is stale (it was
        // superseded, or will be): its generation is not learned (three witnesses that took a
        // stale primary's generation after a heal let no candidate count them again, and no
        // primary was ever elected; seed 992 with witnesses).
        let stale_primary = state.data_position.term < self.sb.terms.highest;
        if self.witness && self.peer(peer_id).role == Role::Primary && !stale_primary {
            // A witness votes by the newest primary generation it has seen, and says so.
            let mut known = self.generation();
            if known.witness_learns(state.current_uuid, &state.history) {
                self.set_generation(known);
                // Durable before anyone hears it: after a restart the witness must not vote
                // for a generation older than one it told others about.
                self.persist(MetaWrite::Superblock);
                self.broadcast_state();
            }
        }
        // A primary that went Ahead of this node is not followed into its new generation.
        self.follow_ahead(peer_id, state.flags & STATE_FLAG_AHEAD != 0);
        let peer = self.peer(peer_id);
        let follows = peer.role == Role::Primary && peer.repl == ReplState::Established;
        // Not when the primary records blocks this node lacks (its bitmap UUID for this node):
        // the decision below resyncs them first.
        let tracked = state.bitmap_uuid != 0;
        if follows && !tracked && self.disk == DiskState::UpToDate && self.role != Role::Primary {
            if !same_uuid(state.current_uuid, self.sb.uuids.current) {
                self.follow_primary(peer_id, state.current_uuid, state.data_position.term);
            } else if state.data_position.term > self.sb.terms.of_data {
                // Promoted without a new generation (every peer in sync): the data is that
                // election's now.
                self.set_data_position(DataPosition { term: state.data_position.term, ..DataPosition::default() });
                self.persist(MetaWrite::Superblock);
            }
        }
        self.abandon_decision_on_a_stale_state(peer_id, &state);
        let peer = self.peer(peer_id);
        // The resync is over here once the target's State says it applied this node's
        // ResyncDone: it no longer names this node as its source (every State it sent from its
        // bitmap to that point did, so none from before the end can pass for it), it holds
        // the generation the ResyncDone named (this node, a primary, may have started a newer
        // one since: the target follows it once the resync is over here), and its disk is a
        // resync's end, UpToDate or Outdated. Which of the two is the target's to say: a copy
        // is no better than its source as the target last saw it (see
        // `Replica::resync_done_received`), and this node's disk may have changed both ways
        // since its ResyncDone went out; waiting for one of them in particular left a source
        // SyncSource for good (seeds 242792, 153553).
        let named = peer.sync.walk.done_sent;
        let adopted = named.is_some_and(|uuid| same_uuid(state.current_uuid, uuid));
        let ended = state.resynced_by != Some(self.node_id()) && matches!(peer.disk, DiskState::UpToDate | DiskState::Outdated);
        if peer.repl == ReplState::SyncSource && ended && peer.pending_sync.is_none() && adopted {
            self.finish_resync_as_source(peer_id);
        }
        let result = self.reconsider(peer_id);
        if (self.primaries(), self.demoting_peers()) != standing_before {
            self.standing_changed(Some(peer_id));
        } else if now_no_better {
            for (id, reason) in self.reconsider_all_but(Some(peer_id)) {
                self.drop_link(id, reason);
            }
        } else if lagged_before & !state.lagging != 0 {
            // The primary keeps those peers in step again: what this node kept for them while
            // it did not may be stale now, which only a decision with them tells (see
            // `only_primary_resyncs`; after a three-node first sync, the first node resynced
            // kept the primary's bits for the other, and showed it Outdated while the primary
            // stayed).
            let caught_up: Vec<u8> = self.peers.iter().filter(|p| lagged_before & !state.lagging & (1 << p.node_id) != 0).map(|p| p.node_id).collect();
            for id in caught_up {
                if let Err(reason) = self.reconsider(id) {
                    self.drop_link(id, reason);
                }
            }
        }
        result
    }

    /// Two nodes decide on each other's States, and either may decide on one that is out of
    /// date: this node decided a resync with `peer_id` and sent its bitmap while the peer,
    /// unknown to it, already waited for a resync with a third node, so it decided nothing (its
    /// State saying so was on its way). The peer declines the bitmap and answers with its State
    /// (see [`Replica::bitmap_declined`]); on that State this node drops its decision too, as
    /// `reconsider` would not have taken it, and both wait for that resync's end, whose State
    /// decides again. No bitmap of the peer's can be under way: it decided nothing. (Such links
    /// were dropped as violations and reconnected, an operator seeing a lost connection each
    /// time: seed 205246 twice; over seeds 0-199, 53 of the 125 such drops.)
    fn abandon_decision_on_a_stale_state(&mut self, peer_id: u8, state: &PeerState) {
        let Some(decided) = self.peer(peer_id).pending_sync else { return };
        if !busy_with_a_third_node(state, self.node_id(), decided) {
            return;
        }
        let name = self.peer(peer_id).name.clone();
        tracing::info!(resource = %self.resource, peer = %name, decision = ?decided, "{name} waits for a resync with a third node: the decision taken on its earlier State is dropped");
        self.peer_mut(peer_id).pending_sync = None;
        // Links paused for a resync into this node, and what this node's State says, come back.
        self.standing_changed(Some(peer_id));
    }

    /// Whether this node waits for a resync with a third node in a way its States show
    /// `peer_id` (see [`Replica::abandon_decision_on_a_stale_state`]): it is being resynced by
    /// a third node, which stops any decision, or it resyncs one and the peer decided to be
    /// its source (a peer that decided to be its target names this node in its State as its
    /// source, before its bitmap).
    pub(super) fn waits_for_a_third_resync_seen_by(&self, peer_id: u8) -> bool {
        let peer_is_target = self.peer(peer_id).last_state.is_some_and(|s| s.resynced_by == Some(self.node_id()));
        self.sync_target_of().is_some_and(|source| source != peer_id) || !peer_is_target && self.resyncs_other_than(Some(peer_id))
    }

    /// A bitmap from `peer_id`, which decided a resync on an out-of-date State of this node's
    /// (see [`Replica::waits_for_a_third_resync_seen_by`]): nothing of it is applied, and with
    /// its last part this node's State goes to the peer, which drops its decision on it.
    pub(super) fn bitmap_declined(&mut self, peer_id: u8, last: bool) {
        if last {
            tracing::debug!(resource = %self.resource, peer = %self.peer(peer_id).name, "a bitmap sent on an out-of-date State: declined, this node waits for a third node's resync");
            self.send_state_to(peer_id);
        }
    }

    /// The primaries this node sees, or whether a third node resyncs it, changed (`except`:
    /// the peer whose news it was, decided by the caller). Others see primaries through this
    /// node (a witness especially) and wait while it is being resynced: the news is passed on;
    /// and a decision that waited here (see [`Replica::only_primary_resyncs`] and
    /// `wait_for_third_resync`) is taken now, before the peer's bitmap can arrive.
    pub fn standing_changed(&mut self, except: Option<u8>) {
        self.broadcast_state();
        for (id, reason) in self.reconsider_all_but(except) {
            self.drop_link(id, reason);
        }
    }

    /// A data peer stopped following the primary (its link here or to the primary is gone):
    /// what this node applied lately may have missed it too. If this node tracked nothing for
    /// it yet, it starts tracking from the generation the peer last reported, so their next
    /// connect finds a bitmap resync (not a full sync) even if this node followed the
    /// primary's new generation before it noticed the peer was gone. Only a generation this
    /// node held (its current one or one in its history) will do: a peer's newer one, which
    /// this node never had, would make it look like the peer's past and this node its source
    /// (seed 15: a node cut off before the primary's last generation resynced an older copy
    /// into a node that held acknowledged writes).
    pub fn mark_recent_for(&mut self, peer_id: u8, peer_generation: Option<u64>) {
        let peer = self.peer(peer_id);
        if self.role == Role::Primary || peer.witness {
            return;
        }
        let slot = peer.slot;
        for (offset, len) in self.recent.missed_by(peer_id) {
            self.mark_out_of_sync(slot, offset, len);
        }
        if let Some(uuid) = peer_generation.filter(|uuid| self.sb.peers[slot].bitmap_uuid == 0 && self.sb.uuids.held(*uuid)) {
            self.sb.peers[slot].bitmap_uuid = uuid & !1;
            self.persist(MetaWrite::Superblock);
        }
    }

    /// `peer_id`'s State says it no longer sees the primaries `stopped` (node-id bits). Those
    /// this node still sees did not just demote as far as it knows, so the peer lost them, and
    /// what they sent lately may have missed it: this node's recent writes are marked for it.
    /// Unless the State says a demotion goes on beside the peer: that primary told it, behind
    /// its last writes, that it steps down, and told this node the same on another link, not
    /// here yet; its last writes reach the peer before the demotion ends. The mark then waits:
    /// this node hearing that primary step down clears it, and a State of the peer's with no
    /// demotion beside it while this node still sees that primary marks as before (as does
    /// this node losing the primary, see `Replica::primary_lost`). Marked at once, every clean
    /// switchover of three data nodes resynced the last writes between the two secondaries,
    /// and often dropped a link on decisions taken on either side of the demotion.
    fn peer_stopped_seeing(&mut self, peer_id: u8, stopped: u32, state: &PeerState) {
        let still = self.primaries();
        let peer = self.peer_mut(peer_id);
        let lost = (peer.demotion_excused | stopped) & still;
        if state.flags & STATE_FLAG_BESIDE_DEMOTION != 0 {
            peer.demotion_excused = lost;
            return;
        }
        peer.demotion_excused = 0;
        if lost != 0 {
            self.mark_recent_for(peer_id, Some(state.current_uuid));
        }
    }

    /// An in-sync primary started a new generation (it lost or left behind another peer): take
    /// it over, and start tracking for the peers that do not follow it either.
    fn follow_primary(&mut self, primary_id: u8, current: u64, data_term: u64) {
        let absent = self.slots_not_following(primary_id);
        let mut generation = self.generation();
        generation.follow(current, &absent);
        self.set_generation(generation);
        if data_term != self.sb.terms.of_data {
            self.set_data_position(DataPosition { term: data_term, ..DataPosition::default() });
        }
        self.persist(MetaWrite::Superblock);
        tracing::info!(resource = %self.resource, uuid = format_args!("{current:016X}"), "following the primary's new generation");
        self.broadcast_state();
        // A decision that waited for both sides to follow the same generation (see
        // `Replica::only_primary_resyncs`) is taken now; the primary's is its caller's.
        for (id, reason) in self.reconsider_all_but(Some(primary_id)) {
            self.drop_link(id, reason);
        }
    }

    /// The peer's `State` says whether it is Ahead of this node (pull-ahead): follow it into
    /// Behind (this node's data is then Outdated) and out of it (the connect-time decision then
    /// starts the resync).
    fn follow_ahead(&mut self, peer_id: u8, peer_ahead: bool) {
        let peer = self.peer_mut(peer_id);
        match (peer_ahead, peer.repl) {
            (true, ReplState::Established | ReplState::SyncTarget) => {
                peer.repl = ReplState::Behind;
                tracing::warn!(resource = %self.resource, peer = %self.peer(peer_id).name, "Behind: the peer's send queue filled up; it resyncs what this node misses once this node has caught up");
                if self.disk == DiskState::UpToDate {
                    self.sb.flags.remove(MetaFlags::WAS_UP_TO_DATE);
                    self.persist(MetaWrite::Superblock);
                    self.disk = DiskState::Outdated;
                    self.broadcast_state();
                }
            }
            (false, ReplState::Behind) => peer.repl = ReplState::Off,
            _ => {}
        }
    }

    /// The target confirmed it holds this node's data (UpToDate, or Outdated as this node is):
    /// the resync is over. A source that moved into a
    /// newer generation since its `ResyncDone` keeps tracking the target from the generation
    /// that named: a secondary that followed its primary (the target does not follow a
    /// secondary, and without a bitmap UUID their next decision copied the whole disk), or a
    /// primary that started one as another resync ended (seed 474: the decision, taken at once
    /// on the target's State of the older generation, copied the whole disk; from the bitmap
    /// UUID it resyncs what was written since, and the target then holds the new generation).
    pub fn finish_resync_as_source(&mut self, peer_id: u8) {
        let slot = self.peer(peer_id).slot;
        let target_at = self.peer(peer_id).sync.walk.done_sent.unwrap_or(self.sb.uuids.current);
        let mut generation = self.generation();
        generation.resync_finished_as_source(slot, target_at);
        self.set_generation(generation);
        self.clear_crash_marker(peer_id, false);
        self.persist(MetaWrite::Bitmap(slot));
        self.persist(MetaWrite::Superblock);
        let peer = self.peer_mut(peer_id);
        peer.repl = ReplState::Established;
        peer.resync = None;
        tracing::info!(resource = %self.resource, peer = %self.peer(peer_id).name, "resync finished: the peer holds this node's data");
        // A resync into this node that waited for this one is decided now, before its
        // source's bitmap can arrive.
        self.standing_changed(Some(peer_id));
    }

    /// After a crash as primary, the activity log's extents are repaired once a resync with
    /// every data peer has completed; until then the marker stays (in memory and in the
    /// metadata), so the peers not yet met still resync those extents and a second crash does
    /// not forget them. `all`: the marker goes whole (see `Replica::resync_done_received`).
    pub fn clear_crash_marker(&mut self, peer_id: u8, all: bool) {
        if !self.crashed_primary {
            return;
        }
        self.crash_repair_pending.retain(|id| *id != peer_id && !all);
        if self.crash_repair_pending.is_empty() {
            self.crashed_primary = false;
            if self.role != Role::Primary {
                self.sb.flags.remove(MetaFlags::PRIMARY_IND);
            }
        }
    }

    /// Re-runs the connect-time decision with every peer whose state is known (after a
    /// promotion, say, a peer may now need a sync). Returns the peers to drop, with why.
    pub fn reconsider_all(&mut self) -> Vec<(u8, String)> {
        self.reconsider_all_but(None)
    }

    /// [`Replica::reconsider_all`] but for `except`: the source of a resync that just ended
    /// here, whose last State predates that end (its next one reopens the decision).
    pub fn reconsider_all_but(&mut self, except: Option<u8>) -> Vec<(u8, String)> {
        let ids: Vec<u8> =
            self.peers.iter().filter(|p| p.last_state.is_some() && Some(p.node_id) != except).map(|p| p.node_id).collect();
        ids.into_iter().filter_map(|id| self.reconsider(id).err().map(|reason| (id, reason))).collect()
    }

    /// Decides what to do with a connected peer whose state is known and whose link is not
    /// syncing. The error is why the link must be dropped.
    pub fn reconsider(&mut self, peer_id: u8) -> Result<(), String> {
        let peer = self.peer(peer_id);
        let Some(peer_state) = peer.last_state else { return Ok(()) };
        if !peer.connected || !matches!(peer.repl, ReplState::Off | ReplState::Established) || peer.pending_sync.is_some() {
            return Ok(());
        }
        if peer.resync_end_unconfirmed.is_some() {
            // The resync it ran into this node just ended here; its States until it ends there
            // too still carry the bitmap UUID of that resync, which would restart it.
            return Ok(());
        }
        if peer.witness || self.witness {
            // A witness only votes: no data and no generations flow either way.
            if peer.repl == ReplState::Off {
                tracing::info!(resource = %self.resource, peer = %peer.name, "connected (witness link: votes only)");
                self.peer_mut(peer_id).repl = ReplState::Established;
            }
            return Ok(());
        }
        if self.stopping || peer_state.flags & STATE_FLAG_LEAVING != 0 {
            // A node going down decides nothing and is given no decision: its Disconnect
            // follows its State on the same link, and a bitmap sent to it arrived as it left
            // (it refused it and logged a lost connection, at every `down` of three nodes).
            // Their next connect decides.
            return Ok(());
        }
        // Leftover bits are weighed at connect, and on an established link between two
        // secondaries. Once neither sees a primary, no write changes the bits, and nothing
        // else would resync them (seed 14903: a node resynced from an Outdated primary took
        // that primary's bits for a third node it was already connected to, and the two never
        // weighed them). While a primary writes, a resync between its secondaries waits, and
        // what they recorded for each other while both follow it is stale and forgotten (see
        // `only_primary_resyncs`). Bits on a primary's own live link are its stream's business
        // (a lost write, a lagging peer, an online verify's marks).
        let weigh_bits = peer.repl == ReplState::Off || self.role != Role::Primary && peer.role != Role::Primary;
        let my_bits = BitsHolder {
            bits_for_other: self.bitmaps[peer.slot].weight(),
            disk: self.disk,
            is_primary: self.role == Role::Primary,
            position: (self.data_position(), self.node_id()),
        };
        let peer_bits = BitsHolder {
            bits_for_other: peer_state.bitmap_weight,
            disk: peer.disk,
            is_primary: peer.role == Role::Primary,
            position: (peer_state.data_position, peer_id),
        };
        let (mine, theirs, name) = (self.uuid_view(peer), peer_view(peer_id, &peer_state), peer.name.clone());
        let decided = decide(&mine, &theirs);
        // Only a primary resyncs a node that sees it (see `Replica::only_primary_resyncs`): a
        // resync from a secondary, begun while this node saw no primary, gives way to a
        // primary that can be the source. Its link goes; losing it reopens the decision here.
        let third_source = self.sync_target_of().filter(|id| *id != peer_id);
        if let Some(source) = third_source {
            if self.peer(peer_id).role == Role::Primary && decided.is_target() && self.peer(source).role != Role::Primary {
                let reason = format!("{name} is primary: it resyncs this node, not a secondary");
                tracing::info!(resource = %self.resource, peer = %self.peer(source).name, "{reason}: stopping the resync from this peer");
                self.drop_link(source, reason);
                return Ok(());
            }
        }
        // One resync into a node at a time: while this node or the peer is being resynced by a
        // third node (the peer names its source in its State), nothing but "in sync" is
        // decided between them; that resync's end brings a new State and a new decision.
        // Deciding now would pit two sources against one target, or refuse an Inconsistent
        // node for good.
        // Nor is a node resynced while it resyncs another: what it reads for its target must
        // not change under the walk (a block that arrived after the walk read it was lost to
        // the target; seed 224).
        let busy = |r: &Replica, d: SyncDecision| {
            let peer_busy = busy_with_a_third_node(&peer_state, r.node_id(), d);
            let me_busy = third_source.is_some() || d.is_target() && r.resyncs_other_than(Some(peer_id));
            me_busy || peer_busy
        };
        if busy(self, decided) {
            return self.wait_for_third_resync(peer_id, decided);
        }
        match self.declaration_step(peer_id, &peer_state) {
            DeclarationStep::Decide => {}
            DeclarationStep::WaitForPeer => return Ok(()),
            DeclarationStep::TookIt => return self.reconsider(peer_id),
        }
        let decision = match decided {
            d @ (SyncDecision::SplitBrain | SyncDecision::SplitBrainManual) => self.after_split_brain(peer_id, d)?,
            // No shared history left, under quorum: the generations since the copies parted
            // outnumber what the histories keep (seed 218616: a node partitioned through six
            // generations of two primaries refused the primary for good as a "wrong disk"; a
            // primary that starts a generation for each data peer it loses does the same in
            // one election while a node stays away). The data positions still order the
            // copies: the later election's, or within one election the one further into its
            // stream, flows in full, as for a split brain without bitmaps. A wrong disk of the
            // same resource name is then overwritten if its copy is the older; copies at the
            // same position, or without quorum, are still refused (`after_split_brain` says
            // which).
            SyncDecision::Unrelated if self.quorum_policy != QuorumPolicy::Off => {
                self.after_split_brain(peer_id, SyncDecision::Unrelated)?
            }
            // Blocks an online verify marked are resynced by reconnecting, or between two
            // secondaries (once neither sees a primary: see `only_primary_resyncs`).
            d if weigh_bits => resync_leftover_bits(d, &my_bits, &peer_bits),
            d => d,
        };
        // Leftover bits turn "in sync" into a resync: the rules above hold for it too (seed
        // 23033: a node resyncing a third took a resync from another peer at once, each end
        // handed the next its bits for the third, and three secondaries resynced one another
        // in a ring, refusing their votes meanwhile: nobody was ever promoted).
        if decision != decided && busy(self, decision) {
            return self.wait_for_third_resync(peer_id, decision);
        }
        let Some(decision) = self.only_primary_resyncs(peer_id, &peer_state, decision) else {
            tracing::debug!(resource = %self.resource, peer = %name, decision = ?decided, "the target sees a primary that is not the source: only that primary resyncs it");
            return Ok(());
        };
        // Nor is a node resynced while its demotion is under way (see `Replica::demoting`);
        // its next State, once done, reopens the decision on both sides.
        if decision.is_target() && self.demoting || decision.is_source() && peer_state.flags & STATE_FLAG_DEMOTING != 0 {
            tracing::debug!(resource = %self.resource, peer = %name, decision = ?decision, "the target is being demoted: deciding after it");
            return Ok(());
        }
        // Nor by a third node while a primary's demotion is under way beside the target: that
        // primary's last writes still reach it and would land among the resync's older copies
        // (seed 16107: a FUA write of the demoting primary, overwritten by a secondary's resync
        // of the target's lost cache). A demoting source is itself the one its target reports.
        let beside_demotion = if decision.is_target() {
            self.demoting_peers() & !(1 << peer_id) != 0
        } else {
            decision.is_source() && !self.demoting && peer_state.flags & STATE_FLAG_BESIDE_DEMOTION != 0
        };
        if beside_demotion {
            tracing::debug!(resource = %self.resource, peer = %name, decision = ?decision, "a primary's demotion is under way beside the target: deciding after it");
            return Ok(());
        }
        // A node whose disk lost its cache holds no good copy of its activity log's extents,
        // and an Inconsistent node none of its interrupted resync's blocks: neither resyncs
        // the other; both wait for a third node (seed 44941: the node that lost its cache
        // overwrote an acknowledged write the Inconsistent one held).
        // With two data nodes no third comes, nor when every other data node is here and
        // Inconsistent too (seed 1861: the source that lost its cache was resyncing both), or
        // waiting for its own lost cache's repair (seed 26872: two such nodes each waited for
        // the other): the node that lost its cache is then the source (its disk holds
        // everything but its extents' last unflushed writes, which no FLUSH made durable).
        let no_better = |p: &super::Peer| {
            p.connected && (p.disk == DiskState::Inconsistent || p.last_state.is_some_and(|s| s.flags & STATE_FLAG_REPAIR_PENDING != 0))
        };
        let third_data_node = self.peers.iter().any(|p| !p.witness && p.node_id != peer_id && !no_better(p));
        let peer_inconsistent = self.peer(peer_id).disk == DiskState::Inconsistent;
        let lost_cache_into_inconsistent = third_data_node
            && (decision.is_source() && self.cache_repair_pending.contains(&peer_id) && peer_inconsistent
                || decision.is_target() && peer_state.flags & STATE_FLAG_CACHE_LOST != 0 && self.disk == DiskState::Inconsistent);
        if lost_cache_into_inconsistent {
            tracing::info!(resource = %self.resource, peer = %name, "one side lost its disk's cache, the other is Inconsistent: waiting for a node with good data");
            return Ok(());
        }
        match decision {
            SyncDecision::InSync => {
                let peer = self.peer_mut(peer_id);
                let was = peer.repl;
                peer.repl = ReplState::Established;
                if self.disk != DiskState::UpToDate && self.confirmed_up_to_date_by(peer_id) {
                    self.disk = DiskState::UpToDate;
                    self.broadcast_state();
                } else if was == ReplState::Off && self.peer(peer_id).role == Role::Primary {
                    // This node may now follow that primary (`STATE_FLAG_FOLLOWING`).
                    self.broadcast_state();
                }
                if was == ReplState::Off {
                    tracing::info!(resource = %self.resource, peer = %name, "in sync, replicating");
                }
                Ok(())
            }
            d if d.is_source() || d.is_target() => {
                tracing::info!(resource = %self.resource, peer = %name, decision = ?d,
                    mine = format_args!("{:016X}/{:016X}", mine.current, mine.bitmap_for_peer),
                    theirs = format_args!("{:016X}/{:016X}", theirs.current, theirs.bitmap_for_peer),
                    "resync needed");
                let peer = self.peer_mut(peer_id);
                peer.pending_sync = Some(d);
                let slot = peer.slot;
                if d.is_target() {
                    // Only the source writes here until the resync ends; the other peers hold
                    // off their decisions with this node meanwhile.
                    self.pause_links_but(peer_id);
                    if self.disk == DiskState::Inconsistent {
                        self.take_over_interrupted_resyncs(slot);
                    }
                    self.broadcast_state();
                }
                self.send_bitmap(peer_id, slot);
                Ok(())
            }
            SyncDecision::Unrelated => {
                self.peer_mut(peer_id).want_connect = false;
                Err(format!("{name}'s data has no history in common with this node's: wrong disk? not connecting"))
            }
            // Two primaries under quorum: the older one (its generation is the other's past)
            // steps down by itself (see `Engine::step_down`), and its next State reopens the
            // decision. Until then the link stays up, idle, on both sides. Judged by
            // generations, not by this instant's quorum: a lease that lapses for a moment must
            // not refuse for good.
            //
            // The same with one primary and a node whose data is newer than it (a primary
            // promoted past it started that generation, though the node may not see it now):
            // the primary steps down (see `Replica::newer_primary_seen`), and the node waits.
            SyncDecision::Refused(Refusal::PrimaryWouldBeTarget | Refusal::PeerCannotFollow)
                if self.quorum_policy != QuorumPolicy::Off && (self.role == Role::Primary || self.peer(peer_id).role == Role::Primary) =>
            {
                if self.role == Role::Primary && !self.knows_generation(peer_state.current_uuid) {
                    tracing::info!(resource = %self.resource, peer = %name, "{name} holds a newer generation: stepping down before resyncing from it");
                } else {
                    tracing::info!(resource = %self.resource, peer = %name, "{name} is an older primary: waiting for it to step down");
                }
                Ok(())
            }
            // Neither side can be the source now because one of them is Inconsistent (its
            // source went away mid-resync): a passing state, not a verdict. The link stays up,
            // idle, and the State that says it was resynced (by a third node) decides again.
            SyncDecision::Refused(Refusal::InconsistentSource | Refusal::PeerCannotFollow)
                if self.disk == DiskState::Inconsistent || self.peer(peer_id).disk == DiskState::Inconsistent =>
            {
                if self.disk == DiskState::Inconsistent && self.give_up_further_copy() {
                    tracing::warn!(resource = %self.resource, position = ?self.data_position(),
                        "every data peer is here and none holds a copy as far as this Inconsistent node's: what only it held is lost; resyncing from the furthest of them");
                    self.broadcast_state();
                    return self.reconsider(peer_id);
                }
                tracing::info!(resource = %self.resource, peer = %name, "no source between this node and {name} while one is Inconsistent: waiting for a third node to resync it");
                Ok(())
            }
            SyncDecision::Refused(why) => {
                self.peer_mut(peer_id).want_connect = false;
                Err(format!("cannot sync with {name}: {why:?} (demote the primary or invalidate the stale node)"))
            }
            _ => unreachable!("every decision is handled"),
        }
    }

    /// An Inconsistent node whose own copy goes further than a peer's of its generation takes
    /// nothing from it and waits for a node at least as far (see
    /// `sync_decision::decide_same_current`). With every data peer connected, in that
    /// generation and each nearer, no such node exists: what went beyond their copies
    /// is held by this node alone, mixed with an interrupted resync's blocks, and is lost
    /// whatever it waits for. It gives that copy up: its data position becomes the furthest
    /// peer's, durably, and the peers decide again on its next State (seed 1753: a node cut off
    /// mid-resync from a copy that a nearer one then overwrote waited for good). Returns
    /// whether it did.
    fn give_up_further_copy(&mut self) -> bool {
        let (mine, current) = (self.data_position(), self.sb.uuids.current);
        let mut furthest = None;
        for peer in self.peers.iter().filter(|p| !p.witness) {
            match peer.last_state.filter(|_| peer.connected) {
                Some(state) if same_uuid(state.current_uuid, current) && state.data_position < mine => {
                    furthest = furthest.max(Some(state.data_position))
                }
                _ => return false,
            }
        }
        let Some(furthest) = furthest else { return false };
        self.set_data_position(furthest);
        self.persist(MetaWrite::Superblock);
        true
    }

    /// A resync with a third node runs into this node or into the peer: nothing flows between
    /// them until it ends, whose State reopens the decision. Nothing but "in sync" is decided
    /// meanwhile (deciding now would pit two sources against one target, or refuse an
    /// Inconsistent node for good), and a link that was in sync stops carrying writes: a
    /// primary's write that reached the target could be overwritten by the source's older
    /// copy of the block, read before the source applied that write (the streams of two nodes
    /// are not ordered with each other). A primary drops the link (its writes to the peer go
    /// to the bitmap, as for any lost link, and it records from then on); a secondary only
    /// marks it idle.
    fn wait_for_third_resync(&mut self, peer_id: u8, decided: SyncDecision) -> Result<(), String> {
        let peer = self.peer(peer_id);
        let name = peer.name.clone();
        match peer.repl {
            // Should a third node have started a resync into it before this promotion, that
            // peer took this link idle and drops it on this primary's next write.
            ReplState::Established if self.role == Role::Primary => Ok(()),
            ReplState::Established => {
                tracing::info!(resource = %self.resource, peer = %name, "a resync with a third node is under way: idle with {name} until it ends");
                self.peer_mut(peer_id).repl = ReplState::Off;
                Ok(())
            }
            ReplState::Off if decided == SyncDecision::InSync => Ok(()),
            _ => {
                tracing::debug!(resource = %self.resource, peer = %name, decision = ?decided, "a resync with a third node is under way: deciding after it");
                Ok(())
            }
        }
    }

    /// An Inconsistent node (a resync into it was interrupted) holds, where that resync's bits
    /// are, its own older data: the new source resends all of it. Those bits are still in the
    /// slot of the interrupted resync's source (a target clears them as the blocks become
    /// durable, see `Replica::resync_durable`). Where the interrupted resync already rewrote
    /// the node, it holds the old source's data, which differs from the new source's where the
    /// old one's bits for it said (recorded here as they came) or where the resync changed the
    /// block (recorded for every peer). Only the old source's slot goes in while this process
    /// knows which it was (`resynced_from`; nothing when the same source takes it up
    /// again): the other slots' bits say where this node differs from their peers, among them
    /// every block the resync changed, which the new source may hold already. After a restart
    /// that is not known, and every slot's bits go in (a block resent that was equal costs
    /// only its transfer).
    fn take_over_interrupted_resyncs(&mut self, slot: usize) {
        let block = u64::from(self.bitmaps[slot].block_size());
        let from = self.resynced_from;
        let others: Vec<(u64, u64)> = self
            .peers
            .iter()
            .filter(|p| p.slot != slot && !p.witness && from.is_none_or(|id| id == p.node_id))
            .flat_map(|p| self.bitmaps[p.slot].runs().collect::<Vec<_>>())
            .collect();
        if others.is_empty() {
            return;
        }
        for (start, blocks) in others {
            self.bitmaps[slot].set_range(start * block, blocks * block);
        }
        self.persist(MetaWrite::Bitmap(slot));
    }

    /// This node is about to be resynced by `source`: every other link in sync goes idle (see
    /// [`Replica::wait_for_third_resync`]), so no write but the source's lands here until the
    /// end. A primary among them cannot be (see [`Replica::only_primary_resyncs`]) unless it
    /// was promoted meanwhile; its writes then arrive on an idle link and drop it.
    fn pause_links_but(&mut self, source: u8) {
        for peer in self.peers.iter_mut().filter(|p| p.node_id != source && !p.witness && p.repl == ReplState::Established) {
            tracing::info!(resource = %self.resource, peer = %peer.name, "being resynced by another node: idle with this peer until it ends");
            peer.repl = ReplState::Off;
        }
    }

    /// A resync writes the target's blocks from the source's reads, which are ordered with the
    /// source's own writes but not with a third node's: a primary's write that reached the
    /// target before the source applied it would be overwritten by the source's older copy.
    /// So a node that sees a primary is resynced by that primary only, and a secondary
    /// resyncs a node only while neither sees a primary (after the primary is gone, the
    /// source records every write of its own for the target until the end, see
    /// `Replica::slots_not_following`). A source following a primary the target does not see
    /// would end the resync with the target in that primary's generation but without its
    /// writes since, which reach the source only: the witnesses, knowing that generation,
    /// would vote for the target (seed 48329: resynced by a secondary of a primary it could
    /// not reach, a node was elected without the writes that primary acknowledged next).
    /// Two secondaries that both follow the same primary
    /// in the same generation hold the same data (each has all that primary's writes, or gets
    /// them in order on its stream from it), so what each recorded for the other is stale: it
    /// is forgotten and they are in sync. Unless the primary says it does not keep the peer
    /// in step (see [`Replica::lagging_peers`]): they are in sync as far as the primary's
    /// stream goes, and what this node recorded is what the peer lacks, kept for the resync
    /// that primary or a later decision starts. Returns `None` while the decision must wait.
    fn only_primary_resyncs(&mut self, peer_id: u8, peer_state: &PeerState, decision: SyncDecision) -> Option<SyncDecision> {
        if !decision.is_target() && !decision.is_source() {
            return Some(decision);
        }
        let both_see = self.primaries() | peer_state.primaries;
        let others = both_see & !(1u32 << self.node_id()) & !(1u32 << peer_id);
        if others == 0 {
            return Some(decision);
        }
        let common = self.primaries() & peer_state.primaries & !(1u32 << self.node_id()) & !(1u32 << peer_id);
        let both_follow = self.follows_primary() && peer_state.flags & STATE_FLAG_FOLLOWING != 0;
        if !(common != 0 && both_follow && same_uuid(peer_state.current_uuid, self.sb.uuids.current)) {
            return None;
        }
        let slot = self.peer(peer_id).slot;
        // Unless such a primary says it does not keep the peer in step: the peer's State
        // predates that, and what this node recorded for it is what it lacks (seed 421356).
        // The bits stay; their bitmap UUID goes, as the peer is at this node's generation: an
        // older one would outlive the generations both follow from here and no longer name
        // the peer's at their next decision, a full sync (seed 786). A generation started
        // without the peer sets a new one (`Generation::follow`).
        let lags = |p: &super::Peer| common & (1 << p.node_id) != 0 && p.says_lagging(peer_id);
        let stale_bits = self.bitmaps[slot].weight() > 0 && !self.peers.iter().any(lags);
        if stale_bits || self.sb.peers[slot].bitmap_uuid != 0 {
            if stale_bits {
                tracing::info!(resource = %self.resource, peer = %self.peer(peer_id).name, blocks = self.bitmaps[slot].weight(),
                    "both follow the same primary in the same generation: what this node recorded for the peer is stale, forgotten");
                self.bitmaps[slot].clear_all();
                self.persist(MetaWrite::Bitmap(slot));
            }
            self.sb.peers[slot].bitmap_uuid = 0;
            self.persist(MetaWrite::Superblock);
            // The peer hears it: its decision may wait for this node's States to drop that
            // bitmap UUID (a resync from this node that just ended there, see
            // `Peer::resync_end_unconfirmed`; seed 404: the UUID this node started tracking
            // the peer from as it followed the primary was the resync's, and the peer waited
            // for good).
            if !is_weakened(Rule::ForgetsBitsSilently) {
                self.send_state_to(peer_id);
            }
        }
        Some(SyncDecision::InSync)
    }

    /// A split brain: the policies or the operator's `--discard-my-data` pick the victim, whose
    /// changes are then overwritten from the survivor. With shared bitmaps (`SplitBrain`) that
    /// is a bitmap resync of both sides' changes; with only shared history (or, under quorum,
    /// none left: `Unrelated` between copies at different data positions), a full sync.
    /// Otherwise the link is refused and the node stays StandAlone.
    fn after_split_brain(&mut self, peer_id: u8, decision: SyncDecision) -> Result<SyncDecision, String> {
        let peer = self.peer(peer_id);
        let theirs = peer.last_state.ok_or("split brain without the peer's state")?;
        let mine = self.uuid_view(peer);
        let me = SbSide {
            node_id: self.node_id(),
            is_primary: self.role == Role::Primary,
            was_primary_at_split: mine.bitmap_for_peer & 1 != 0,
            changed_blocks: self.bitmaps[peer.slot].weight(),
            discard_my_data: self.discard_my_data,
        };
        let them = SbSide {
            node_id: peer_id,
            is_primary: Role::from_wire(theirs.role) == Some(Role::Primary),
            was_primary_at_split: theirs.bitmap_uuid & 1 != 0,
            changed_blocks: theirs.bitmap_weight,
            discard_my_data: theirs.flags & STATE_FLAG_DISCARD_MY_DATA != 0,
        };
        let bitmaps_usable = decision == SyncDecision::SplitBrain;
        // Without shared bitmaps nothing says which blocks differ: only the operator may choose.
        let policies = if bitmaps_usable { self.split_brain } else { SplitBrainPolicies::default() };
        let name = peer.name.clone();
        let both = format!(
            "this node current {:016X} bitmap {:016X} changed {} blocks, {name} current {:016X} bitmap {:016X} changed {} blocks",
            mine.current, mine.bitmap_for_peer, me.changed_blocks, theirs.current_uuid, theirs.bitmap_uuid, them.changed_blocks
        );
        // Under quorum the copy of the later election wins (see `replica/election.rs`): the
        // other's changes since they parted were never acknowledged, or acknowledged under
        // protocol A by a primary that had lost its quorum without knowing. Two copies of one
        // election are ordered by how far each goes into that election's stream: the further
        // holds every durable write of the nearer (see `DataPosition`), and only that
        // election's primary wrote. Their "changes" are that primary's writes each took while
        // the other was away, under generations the other never saw (seed 302406: a primary
        // that started a generation for each peer it lost; a follower cut off in one of them
        // and one resynced in a later one were refused as a split brain, for good).
        let (my_position, their_position) = (self.data_position(), theirs.data_position);
        let same_election = my_position.term == their_position.term;
        let ordered = self.quorum_policy != QuorumPolicy::Off && my_position != their_position;
        if decision == SyncDecision::Unrelated && !ordered {
            // Nothing orders them: refused as unrelated data (see `reconsider`).
            return Ok(SyncDecision::Unrelated);
        }
        if ordered {
            // A primary of the earlier election steps down first (it was superseded); the link
            // waits idle meanwhile (see the refusals in `reconsider`).
            if my_position < their_position && me.is_primary {
                return Ok(SyncDecision::Refused(Refusal::PrimaryWouldBeTarget));
            }
            if their_position < my_position && them.is_primary {
                return Ok(SyncDecision::Refused(Refusal::PeerCannotFollow));
            }
        }
        let later = if my_position > their_position { SbResolution::DiscardTheirs } else { SbResolution::DiscardMine };
        let by_position = ordered.then_some(later);
        let resolved = match by_position.unwrap_or_else(|| split_brain::resolve(&policies, &me, &them)) {
            SbResolution::DiscardMine if bitmaps_usable => SyncDecision::BitmapTarget,
            SbResolution::DiscardMine => SyncDecision::FullTarget,
            SbResolution::DiscardTheirs if bitmaps_usable => SyncDecision::BitmapSource,
            SbResolution::DiscardTheirs => SyncDecision::FullSource,
            SbResolution::Disconnect(why) => {
                let reason = format!(
                    "split brain detected with {name}: both changed data since they last agreed ({both}); not connecting ({why}). Decide which node's changes to drop and run `blkrepl connect --discard-my-data` there"
                );
                tracing::error!(resource = %self.resource, "{reason}");
                self.peer_mut(peer_id).want_connect = false;
                return Err(reason);
            }
        };
        // The resolution passes the same state checks as any decision (an Inconsistent copy is
        // never a source, whatever its election: a resync into it was cut off), before anything
        // is logged, counted or cleared for it.
        let resolved = check_states(resolved, &mine, &peer_view(peer_id, &theirs));
        if let SyncDecision::Refused(_) = resolved {
            return Ok(resolved);
        }
        let victim = if resolved.is_target() { "this node" } else { name.as_str() };
        if by_position.is_some() {
            // Not a split brain of acknowledged data: under quorum the side of the earlier
            // election never completed a write after they parted.
            let kept = if same_election { "the copy further into the election's stream is kept" } else { "the later election's data is kept" };
            tracing::warn!(resource = %self.resource,
                "diverged from {name} ({both}): {kept}; {victim}'s changes since they parted are discarded (under quorum none was acknowledged, but under protocol A what was in flight when its quorum ended)");
        } else {
            tracing::warn!(resource = %self.resource, "split brain with {name} ({both}): resolved, {victim}'s changes are discarded ({resolved:?})");
        }
        if resolved.is_target() {
            self.discard_my_data = false;
            self.divergences_resolved += 1;
        }
        Ok(resolved)
    }

    /// Sends this node's bitmap for `peer` (bitmap `slot`) in frames of at most
    /// `RUNS_PER_FRAME` runs.
    fn send_bitmap(&mut self, peer: u8, slot: usize) {
        let runs: Vec<(u64, u64)> = self.bitmaps[slot].runs().collect();
        let mut chunks = runs.chunks(RUNS_PER_FRAME).peekable();
        if chunks.peek().is_none() {
            self.send(peer, Message::BitmapRuns { last: true, runs: Vec::new() });
        }
        while let Some(chunk) = chunks.next() {
            self.send(peer, Message::BitmapRuns { last: chunks.peek().is_none(), runs: chunk.to_vec() });
        }
    }
}

/// Whether the node whose State this is waits for a resync with a third node in a way that
/// rules out `decided` between it and `me`: a third node resyncs it (one source at a time), or
/// it resyncs a third node and `me` would resync it (what it reads for its target must not
/// change under the walk).
fn busy_with_a_third_node(state: &PeerState, me: u8, decided: SyncDecision) -> bool {
    state.resynced_by.is_some_and(|source| source != me) || decided.is_source() && state.flags & STATE_FLAG_RESYNCS_OTHER != 0
}

#[cfg(test)]
mod tests {
    use crate::core::states::{DiskState, ReplState, Role};
    use crate::replica::testing::{secondary_state, two_node_replica};
    use crate::replica::{Action, MetaWrite, Replica};
    use crate::wire::{Message, PeerState};

    #[test]
    fn an_interrupted_resync_taken_up_again_brings_only_what_its_source_had_left() {
        let (mut r, _) = crate::replica::testing::three_node_replica();
        let (beta, gamma) = (r.peer(1).slot, r.peer(2).slot);
        let runs = |r: &Replica, slot: usize| r.bitmaps[slot].runs().collect::<Vec<_>>();
        // Left of a resync from beta, cut off; where this node differs from gamma (blocks the
        // resync changed among them).
        r.bitmaps[beta].set_range(0, 4 * 4096);
        r.bitmaps[gamma].set_range(100 * 4096, 4096);
        r.resynced_from = Some(1);
        r.take_over_interrupted_resyncs(beta);
        assert_eq!(runs(&r, beta), [(0, 4)], "beta again: where it stood");
        r.take_over_interrupted_resyncs(gamma);
        assert_eq!(runs(&r, gamma), [(0, 4), (100, 1)], "gamma: also what beta had left");
        // After a restart the source is not known: every slot's bits.
        r.resynced_from = None;
        r.take_over_interrupted_resyncs(beta);
        assert_eq!(runs(&r, beta), [(0, 4), (100, 1)]);
    }

    fn primary_state(current_uuid: u64, history: [u64; 4]) -> PeerState {
        PeerState { role: Role::Primary.to_wire(), primaries: 1 << 1, ..secondary_state(current_uuid, history) }
    }

    #[test]
    fn a_secondary_follows_its_primary_into_a_new_generation_durably_before_saying_so() {
        let (mut r, t0) = two_node_replica();
        r.disk = DiskState::UpToDate;
        r.sb.uuids.current = 0xA0;
        r.link_up(1, t0);
        r.peer_mut(1).repl = ReplState::Established;
        r.take_actions();
        r.peer_state_received(1, primary_state(0xB0, [0xA0, 0, 0, 0])).unwrap();
        assert_eq!(r.sb.uuids.current, 0xB0);
        let actions = r.take_actions();
        let persisted = actions.iter().position(|a| matches!(a, Action::Persist(MetaWrite::Superblock)));
        let announced = actions.iter().position(
            |a| matches!(a, Action::Send { msg: Message::State(s), .. } if s.current_uuid == 0xB0),
        );
        assert!(persisted.is_some() && persisted < announced, "{actions:?}");
        assert_eq!(r.peer(1).repl, ReplState::Established, "still in sync with its primary");
    }

    #[test]
    fn under_quorum_copies_with_no_history_left_in_common_sync_in_full_from_the_further_data_position() {
        use crate::core::quorum::QuorumPolicy;
        use crate::core::sync_decision::SyncDecision;
        use crate::wire::DataPosition;
        // One copy, at `uuids`, of the election of `term`, `epoch` epochs into its stream, on a
        // primary or not.
        struct Copy {
            uuids: (u64, [u64; 4]),
            term: u64,
            epoch: u64,
            primary: bool,
            disk: DiskState,
        }
        fn meets(quorum: QuorumPolicy, me: Copy, peer: Copy) -> (Replica, Result<(), String>) {
            let (mut r, t0) = two_node_replica();
            (r.quorum_policy, r.disk) = (quorum, me.disk);
            r.role = if me.primary { Role::Primary } else { Role::Secondary };
            (r.sb.uuids.current, r.sb.uuids.history) = me.uuids;
            // A primary's position is its open epoch; a secondary's, what it holds durably.
            (r.sb.terms.of_data, r.sb.terms.epoch_of_data, r.epoch) = (me.term, me.epoch, me.epoch);
            r.link_up(1, t0);
            r.take_actions();
            let mut state = if peer.primary { primary_state(peer.uuids.0, peer.uuids.1) } else { secondary_state(peer.uuids.0, peer.uuids.1) };
            state.data_position = DataPosition { term: peer.term, epoch: peer.epoch, fua: 0 };
            state.disk = peer.disk.to_wire();
            let result = r.peer_state_received(1, state);
            (r, result)
        }
        // One node parted at 0xA0, elected in term 3, 5 epochs into its stream; the other went
        // through more generations since than a history holds (a primary starts one for each
        // data peer it loses).
        let behind = |primary| Copy { uuids: (0xA0, [0x90, 0, 0, 0]), term: 3, epoch: 5, primary, disk: DiskState::UpToDate };
        let far = |term, primary| Copy { uuids: (0xF0, [0xE0, 0xD0, 0xC0, 0xB0]), term, epoch: 9, primary, disk: DiskState::UpToDate };
        let inconsistent = |copy: Copy| Copy { disk: DiskState::Inconsistent, ..copy };
        // The later election's copy flows in full; within one election, the copy further into
        // its stream (the primary's, which holds everything it wrote).
        for term in [4, 3] {
            let (r, result) = meets(QuorumPolicy::Majority, behind(false), far(term, true));
            assert_eq!(result, Ok(()));
            assert_eq!(r.peer(1).pending_sync, Some(SyncDecision::FullTarget), "term {term}");
            assert_eq!(r.divergences_resolved, 1);
        }
        // Without quorum nothing orders them, nor do two copies at one position.
        let level = Copy { epoch: 5, ..far(3, false) };
        for (quorum, peer) in [(QuorumPolicy::Off, far(4, true)), (QuorumPolicy::Majority, level)] {
            let (r, result) = meets(quorum, behind(false), peer);
            assert!(result.as_ref().is_err_and(|why| why.contains("wrong disk")), "quorum {quorum}: {result:?}");
            assert!(!r.peer(1).want_connect, "refused for good");
        }

        // The mirror: the primary of the later election, or further into the same one, is the
        // source, and stays primary.
        for term in [4, 3] {
            let (r, result) = meets(QuorumPolicy::Majority, far(term, true), behind(false));
            assert_eq!(result, Ok(()));
            assert_eq!(r.peer(1).pending_sync, Some(SyncDecision::FullSource), "term {term}");
            assert_eq!(r.role, Role::Primary);
        }
        // A primary is never overwritten so (a disk of another cluster, of a later term, says
        // nothing of this one's elections): the link waits idle, and the primary goes on.
        let (r, result) = meets(QuorumPolicy::Majority, behind(true), far(4, false));
        assert_eq!(result, Ok(()));
        assert_eq!((r.peer(1).pending_sync, r.role), (None, Role::Primary));
        assert!(r.peer(1).want_connect);
        // Nor is a copy of the later election the source while Inconsistent (a resync into it
        // was cut off): the link waits idle for a node that holds the whole copy.
        for (me, peer) in [(inconsistent(far(4, false)), behind(false)), (behind(false), inconsistent(far(4, false)))] {
            let (r, result) = meets(QuorumPolicy::Majority, me, peer);
            assert_eq!(result, Ok(()));
            assert_eq!(r.peer(1).pending_sync, None);
            assert!(r.peer(1).want_connect);
            assert_eq!(r.divergences_resolved, 0, "nothing was resolved");
        }
    }

    #[test]
    fn under_quorum_two_copies_of_one_election_that_both_changed_since_they_parted_are_ordered_by_data_position() {
        use crate::core::quorum::QuorumPolicy;
        use crate::core::sync_decision::SyncDecision;
        use crate::wire::DataPosition;
        // Seed 302406: a primary started a generation for each peer it lost. This node holds
        // its generation 0xB0, the peer 0xC0; each tracks the other from 0xA0, where they
        // parted, and each took some of that one primary's writes the other did not.
        fn meets(quorum: QuorumPolicy, my_epoch: u64, their_epoch: u64) -> (Replica, Result<(), String>) {
            let (mut r, t0) = two_node_replica();
            (r.quorum_policy, r.disk) = (quorum, DiskState::UpToDate);
            (r.sb.uuids.current, r.sb.uuids.history) = (0xB0, [0xA0, 0x90, 0, 0]);
            let slot = r.peer(1).slot;
            r.sb.peers[slot].bitmap_uuid = 0xA0;
            r.bitmaps[slot].set_range(0, 8192);
            (r.sb.terms.of_data, r.sb.terms.epoch_of_data, r.epoch) = (3, my_epoch, my_epoch);
            r.link_up(1, t0);
            r.take_actions();
            let state = PeerState {
                bitmap_uuid: 0xA0,
                bitmap_weight: 2,
                data_position: DataPosition { term: 3, epoch: their_epoch, fua: 0 },
                ..secondary_state(0xC0, [0xA0, 0x90, 0, 0])
            };
            let result = r.peer_state_received(1, state);
            (r, result)
        }
        // The copy further into the election's stream holds the other's writes: a resync of
        // both sides' bits from it, without an operator.
        let (r, result) = meets(QuorumPolicy::Majority, 9, 5);
        assert_eq!(result, Ok(()));
        assert_eq!(r.peer(1).pending_sync, Some(SyncDecision::BitmapSource));
        let (r, result) = meets(QuorumPolicy::Majority, 5, 9);
        assert_eq!(result, Ok(()));
        assert_eq!(r.peer(1).pending_sync, Some(SyncDecision::BitmapTarget));
        assert_eq!(r.divergences_resolved, 1);
        // At one position, or without quorum, nothing orders them: the split-brain policies
        // decide (here: disconnect).
        for (quorum, mine, theirs) in [(QuorumPolicy::Majority, 7, 7), (QuorumPolicy::Off, 9, 5)] {
            let (r, result) = meets(quorum, mine, theirs);
            assert!(result.as_ref().is_err_and(|why| why.contains("split brain detected")), "quorum {quorum}: {result:?}");
            assert!(!r.peer(1).want_connect, "refused for good");
        }
    }

    #[test]
    fn a_node_being_demoted_takes_no_resync_until_its_demotion_is_done() {
        let (mut r, t0) = two_node_replica();
        r.disk = DiskState::UpToDate;
        r.role = Role::Primary;
        r.begin_demotion(t0);
        r.link_up(1, t0);
        r.take_actions();
        let current = r.sb.uuids.current;
        // The new primary holds bits for this node: it would resync it.
        let with_bits = PeerState { bitmap_weight: 3, ..primary_state(current, [0; 4]) };
        r.peer_state_received(1, with_bits).expect("a fitting State");
        assert!(r.peer(1).pending_sync.is_none(), "its own writes may still land");
        assert!(r.take_actions().iter().all(|a| !matches!(a, Action::Send { msg: Message::BitmapRuns { .. }, .. })));
        r.finish_demotion();
        assert_eq!(r.peer(1).pending_sync, Some(crate::core::sync_decision::SyncDecision::BitmapTarget));
    }

    #[test]
    fn no_third_node_resyncs_a_node_while_a_primary_beside_it_is_being_demoted() {
        let (mut r, t0) = crate::replica::testing::three_node_replica();
        r.disk = DiskState::UpToDate;
        let current = r.sb.uuids.current;
        r.link_up(2, t0);
        let demoting = PeerState { flags: crate::replica::STATE_FLAG_DEMOTING, ..secondary_state(current, [0; 4]) };
        r.peer_state_received(2, demoting).expect("a fitting State");
        assert_eq!(r.demoting_peers(), 1 << 2);
        let flags = r.take_actions().iter().rev().find_map(|a| match a {
            Action::Send { peer: 2, msg: Message::State(s), .. } => Some(s.flags),
            _ => None,
        });
        assert!(flags.is_some_and(|f| f & crate::replica::STATE_FLAG_BESIDE_DEMOTION != 0), "the others hear of it: {flags:?}");
        // A secondary whose missed resync end leaves it the source of this node.
        r.link_up(1, t0);
        let source = PeerState { bitmap_uuid: current, bitmap_weight: 3, ..secondary_state(current, [0; 4]) };
        r.peer_state_received(1, source).expect("a fitting State");
        assert!(r.peer(1).pending_sync.is_none(), "the demoting primary's last writes may still land here");
        // The demotion is over: the decision is taken.
        r.peer_state_received(2, secondary_state(current, [0; 4])).expect("a fitting State");
        assert_eq!(r.peer(1).pending_sync, Some(crate::core::sync_decision::SyncDecision::BitmapTarget));
    }

    /// A follower of node 2 (primary, lagging the nodes in `lagging`) with bits for node 1,
    /// which it recorded while node 1 missed the primary's writes, and node 1 connected; and
    /// node 1's State saying it follows node 2 too.
    fn follower_with_bits_for_a_follower(lagging: u32) -> (Replica, std::time::Instant, PeerState) {
        let (mut r, t0) = crate::replica::testing::three_node_replica();
        r.disk = DiskState::UpToDate;
        let current = r.sb.uuids.current;
        r.link_up(2, t0);
        r.peer_state_received(2, PeerState { primaries: 1 << 2, lagging, ..primary_state(current, [0; 4]) }).expect("the primary's State");
        assert!(r.follows_primary());
        let slot = r.peer(1).slot;
        r.bitmaps[slot].set_range(0, 4096);
        r.sb.peers[slot].bitmap_uuid = current & !1;
        r.link_up(1, t0);
        r.take_actions();
        let follower = PeerState { primaries: 1 << 2, flags: crate::replica::STATE_FLAG_FOLLOWING, ..secondary_state(current, [0; 4]) };
        (r, t0, follower)
    }

    #[test]
    fn two_followers_of_one_primary_forget_their_bits_for_each_other_and_say_so() {
        let (mut r, _, follower) = follower_with_bits_for_a_follower(0);
        let slot = r.peer(1).slot;
        r.peer_state_received(1, follower).expect("a fitting State");
        assert_eq!(r.peer(1).repl, ReplState::Established, "in sync: each has the primary's writes or gets them in order");
        assert_eq!((r.bitmaps[slot].weight(), r.sb.peers[slot].bitmap_uuid), (0, 0));
        let told = r.take_actions().into_iter().any(|a| matches!(a, Action::Send { peer: 1, msg: Message::State(s), .. } if s.bitmap_uuid == 0));
        assert!(told, "node 1 hears that the bits are gone (its decision may wait for it)");
    }

    #[test]
    fn bits_kept_while_the_primary_lagged_a_follower_are_forgotten_once_it_no_longer_does() {
        // A three-node first sync: this node's resync ended first and took the primary's bits
        // for node 1, whose own resync was not over when the primary's last State left; the
        // two linked "in sync" with the bits kept, and this node showed node 1 Outdated for as
        // long as the primary stayed.
        let (mut r, _, follower) = follower_with_bits_for_a_follower(1 << 1);
        let slot = r.peer(1).slot;
        r.peer_state_received(1, follower).expect("a fitting State");
        assert_eq!(r.peer(1).repl, ReplState::Established);
        assert_eq!(r.bitmaps[slot].weight(), 1, "the primary says it lags node 1: what node 1 lacks is kept");
        let current = r.sb.uuids.current;
        r.peer_state_received(2, PeerState { primaries: 1 << 2, ..primary_state(current, [0; 4]) }).expect("the primary's State");
        assert_eq!(r.bitmaps[slot].weight(), 0, "both follow the primary, which keeps node 1 in step: stale");
        assert_eq!((r.peer(1).repl, r.peer(1).pending_sync), (ReplState::Established, None));
    }

    #[test]
    fn a_primary_with_a_new_generation_since_its_resync_done_resyncs_the_target_by_bitmap() {
        // Seed 474: the target confirms the end at the generation the ResyncDone named, which
        // the primary has left since; without a bitmap UUID at it, a full sync.
        let (mut r, _) = crate::replica::testing::primary_replicating();
        let named = r.sb.uuids.current;
        let slot = r.peer(1).slot;
        r.peer_mut(1).repl = ReplState::SyncSource;
        r.peer_mut(1).sync.walk.done_sent = Some(named);
        let mut generation = r.generation();
        generation.new_current(0x7700, true, true, &[slot]);
        r.set_generation(generation);
        let confirmed = PeerState { history: [named & !1, 0, 0, 0], ..secondary_state(named, [0; 4]) };
        r.peer_state_received(1, PeerState { primaries: 1, ..confirmed }).expect("the target's State");
        assert_eq!(r.sb.peers[slot].bitmap_uuid, named & !1, "tracks the target from the generation it holds");
        assert_eq!(r.peer(1).pending_sync, Some(crate::core::sync_decision::SyncDecision::BitmapSource));
    }

    #[test]
    fn a_follower_keeps_its_bits_for_a_peer_the_primary_says_it_lags_and_records_for_it() {
        // Seed 421356: the peer's State says it follows, but the primary lost it (or is Ahead
        // of it) since: the bits are what the peer lacks.
        let (mut r, t0, follower) = follower_with_bits_for_a_follower(1 << 1);
        let (slot, current) = (r.peer(1).slot, r.sb.uuids.current);
        r.peer_state_received(1, follower).expect("a fitting State");
        assert_eq!(r.peer(1).repl, ReplState::Established, "no resync but the primary's");
        assert_eq!((r.bitmaps[slot].weight(), r.sb.peers[slot].bitmap_uuid), (1, 0), "the bits kept, their anchor the peer's generation");
        assert_eq!(r.slots_not_following(2), vec![slot], "what it applies from the primary is recorded for the peer");
        // The primary keeps the peer in step again: the next decision forgets them.
        r.peer_state_received(2, PeerState { primaries: 1 << 2, ..primary_state(current, [0; 4]) }).expect("the primary's State");
        assert!(r.slots_not_following(2).is_empty());
        r.link_down(1, "test", 0);
        r.link_up(1, t0);
        r.peer_state_received(1, follower).expect("a fitting State");
        assert_eq!((r.bitmaps[slot].weight(), r.sb.peers[slot].bitmap_uuid), (0, 0), "forgotten");
    }

    #[test]
    fn a_node_that_lost_its_cache_resyncs_an_inconsistent_peer_once_the_third_awaits_its_own_repair() {
        // Seed 26872: nodes 0 and 2 lost their caches and repaired each other; node 1, still to
        // repair both, is Inconsistent. Each waited for the other to resync it.
        let (mut r, t0) = crate::replica::testing::three_node_replica();
        r.disk = DiskState::UpToDate;
        let current = r.sb.uuids.current;
        r.cache_repair_pending = vec![1];
        r.link_up(2, t0);
        r.peer_state_received(2, secondary_state(current, [0; 4])).expect("node 2's State");
        let slot = r.peer(1).slot;
        r.bitmaps[slot].set_range(0, 4096);
        r.sb.peers[slot].bitmap_uuid = current & !1;
        r.link_up(1, t0);
        r.take_actions();
        let inconsistent = PeerState { disk: DiskState::Inconsistent.to_wire(), ..secondary_state(current, [0; 4]) };
        r.peer_state_received(1, inconsistent).expect("node 1's State");
        assert!(r.peer(1).pending_sync.is_none(), "node 2 may be a better source: waiting for it");
        let repair_pending = PeerState { flags: super::STATE_FLAG_REPAIR_PENDING, ..secondary_state(current, [0; 4]) };
        r.peer_state_received(2, repair_pending).expect("node 2's State");
        assert_eq!(r.peer(1).pending_sync, Some(crate::core::sync_decision::SyncDecision::BitmapSource), "nobody better comes");
        assert_ne!(r.peer_state_for(r.peer(2)).flags & super::STATE_FLAG_REPAIR_PENDING, 0, "this node's States say its own repair is pending");
    }

    #[test]
    fn a_secondary_following_a_primary_this_node_cannot_see_does_not_resync_it() {
        let (mut r, t0) = crate::replica::testing::three_node_replica();
        r.disk = DiskState::UpToDate;
        let current = r.sb.uuids.current;
        r.link_up(1, t0);
        r.take_actions();
        // Node 1 holds bits for this node and follows node 2, a primary this node has no link
        // to: the resync would give this node the generation without the primary's writes
        // since, which reach node 1 only.
        let follower = PeerState { bitmap_weight: 3, primaries: 1 << 2, ..secondary_state(current, [0; 4]) };
        r.peer_state_received(1, follower).expect("a fitting State");
        assert!(r.peer(1).pending_sync.is_none(), "only that primary resyncs this node");
        // The primary is gone: node 1's data is final, the decision is taken.
        let alone = PeerState { bitmap_weight: 3, ..secondary_state(current, [0; 4]) };
        r.peer_state_received(1, alone).expect("a fitting State");
        assert_eq!(r.peer(1).pending_sync, Some(crate::core::sync_decision::SyncDecision::BitmapTarget));
    }

    #[test]
    fn leftover_bits_start_no_resync_into_a_node_that_resyncs_a_third() {
        let (mut r, t0) = crate::replica::testing::three_node_replica();
        r.disk = DiskState::UpToDate;
        let current = r.sb.uuids.current;
        r.link_up(2, t0);
        r.peer_mut(2).repl = ReplState::SyncSource;
        r.take_actions();
        // A peer of the same generation with bits for this node: in sync by generations, a
        // resync into this node by its leftover bits.
        r.link_up(1, t0);
        let with_bits = PeerState { bitmap_weight: 3, ..secondary_state(current, [0; 4]) };
        r.peer_state_received(1, with_bits).expect("a fitting State");
        assert!(r.peer(1).pending_sync.is_none(), "what it reads for its own target must not change under the walk");
        // Its resync of the third node is over: the decision is taken.
        r.peer_mut(2).repl = ReplState::Established;
        r.peer_state_received(1, with_bits).expect("a fitting State");
        assert_eq!(r.peer(1).pending_sync, Some(crate::core::sync_decision::SyncDecision::BitmapTarget));
    }

    #[test]
    fn a_failed_metadata_write_fails_the_disk_and_drops_what_it_would_have_announced() {
        let (mut r, t0) = two_node_replica();
        r.disk = DiskState::UpToDate;
        r.link_up(1, t0);
        r.take_actions();
        let rest = vec![
            Action::Send { peer: 1, msg: Message::Ping, lane: crate::replica::Lane::Control, sent_write: None },
            Action::StartResync { peer: 1, generation: 1 },
            Action::DropLink { peer: 1, generation: 1, reason: "x".into() },
        ];
        r.persist_failed(t0, MetaWrite::Superblock, "EIO", rest);
        assert_eq!(r.disk, DiskState::Failed);
        let actions = r.take_actions();
        assert!(actions.iter().all(|a| matches!(a, Action::DropLink { peer: 1, .. })), "the queued ping and resync are dropped: {actions:?}");
        assert!(matches!(&actions[..], [_, Action::DropLink { reason, .. }] if reason == crate::replica::DETACHED), "{actions:?}");
        r.peer_lost(t0, 1, "dropped", 0);
        assert_eq!(r.link_refusal(1), Some(crate::replica::DETACHED), "no link until `down` and `up`");
        r.new_current_uuid(false).ok();
        assert!(r.take_actions().is_empty(), "a Failed disk is written no more");
    }

    #[test]
    fn a_peer_going_down_is_given_no_resync_decision() {
        // This node holds bits for beta: a decision with it is a bitmap resync, this node the
        // source, unless beta says it is leaving.
        let decide_on = |flags: u32| {
            let (mut r, t0) = two_node_replica();
            r.disk = DiskState::UpToDate;
            let slot = r.peer(1).slot;
            r.sb.peers[slot].bitmap_uuid = r.sb.uuids.current;
            r.mark_out_of_sync(slot, 0, 4096);
            r.link_up(1, t0);
            r.take_actions();
            let state = PeerState { flags, ..secondary_state(r.sb.uuids.current, [0; 4]) };
            r.peer_state_received(1, state).expect("a fitting State");
            r.take_actions().iter().filter(|a| matches!(a, Action::Send { msg: Message::BitmapRuns { .. }, .. })).count()
        };
        assert_eq!(decide_on(0), 1, "a bitmap resync of beta");
        assert_eq!(decide_on(super::STATE_FLAG_LEAVING), 0, "its Disconnect follows: nothing is decided");
    }

    #[test]
    fn a_source_ends_the_resync_only_on_a_state_after_its_resync_done() {
        let (mut r, t0) = crate::replica::testing::primary_replicating();
        r.peer_mut(1).repl = ReplState::SyncSource;
        r.resync_source_started(t0, 1);
        let up_to_date = PeerState { primaries: 1, ..secondary_state(r.sb.uuids.current, [0; 4]) };
        r.peer_state_received(1, up_to_date).expect("a fitting State");
        assert_eq!(r.peer(1).repl, ReplState::SyncSource, "a State from before the target took the bitmap ends nothing");
        assert_eq!(r.resync_next(t0, 1, false), crate::replica::ResyncStep::Finished, "nothing to send");
        assert!(r.take_actions().iter().any(|a| matches!(a, Action::Send { msg: Message::ResyncDone { .. }, .. })));
        r.peer_state_received(1, up_to_date).expect("a fitting State");
        assert_eq!(r.peer(1).repl, ReplState::Established);
        let _ = t0;
    }

    #[test]
    fn a_source_ends_its_resync_on_the_targets_first_state_that_no_longer_names_it_whatever_disk_each_took() {
        // Seed 242792: Outdated as the ResyncDone went out (a primary stepping down), the
        // source was confirmed UpToDate again by a third node before its Outdated target
        // answered; it waited for an UpToDate answer for ever, and the two never linked.
        // Seed 153553: UpToDate as it went out, the source stepped down (Outdated) before the
        // target had written the resync's last blocks; the target took the Outdated it saw
        // then, the source (UpToDate again) waited for an UpToDate answer, and it stayed
        // SyncSource through two partitions, the target idle with it for good.
        let answers = [DiskState::UpToDate, DiskState::Outdated];
        for (at_done, after) in [(DiskState::Outdated, DiskState::UpToDate), (DiskState::UpToDate, DiskState::Outdated), (DiskState::UpToDate, DiskState::UpToDate)] {
            for target_took in answers {
                let (mut r, t0) = crate::replica::testing::secondary_of_primary();
                r.peer_mut(1).role = Role::Secondary;
                r.peer_mut(1).repl = ReplState::SyncSource;
                r.disk = at_done;
                r.resync_source_started(t0, 1);
                assert_eq!(r.resync_next(t0, 1, false), crate::replica::ResyncStep::Finished, "nothing to send");
                r.disk = after;
                let answer = PeerState { disk: target_took.to_wire(), ..secondary_state(r.sb.uuids.current, [0; 4]) };
                let applying = PeerState { resynced_by: Some(r.node_id()), ..answer };
                r.peer_state_received(1, applying).expect("a fitting State");
                assert_eq!(r.peer(1).repl, ReplState::SyncSource, "a State naming this node its source was sent before the end");
                r.peer_state_received(1, answer).expect("a fitting State");
                assert_eq!(r.peer(1).repl, ReplState::Established, "{at_done} at the ResyncDone, {after} at the answer, {target_took} taken");
            }
        }
    }

    /// Node 0 of three data nodes, UpToDate, linked to nodes 1 and 2 (both in its generation),
    /// with nothing decided yet.
    fn three_linked() -> (Replica, std::time::Instant) {
        let (mut r, t0) = crate::replica::testing::three_node_replica();
        r.disk = DiskState::UpToDate;
        for id in [1, 2] {
            r.link_up(id, t0);
            r.peer_mut(id).last_state = Some(secondary_state(r.sb.uuids.current, [0; 4]));
        }
        r.take_actions();
        (r, t0)
    }

    #[test]
    fn outdated_peers_in_sync_confirm_no_one_while_either_side_holds_bits() {
        // Seed 143529: every data peer in sync, Outdated, in this generation confirmed this
        // node UpToDate although it held bits for one of them.
        let (mut r, _) = three_linked();
        (r.disk, r.sb.uuids.current) = (DiskState::Outdated, 0xA0);
        for id in [1, 2] {
            let peer = r.peer_mut(id);
            (peer.repl, peer.disk) = (ReplState::Established, DiskState::Outdated);
            peer.last_state = Some(secondary_state(0xA0, [0; 4]));
        }
        assert!(r.confirmed_up_to_date_by(1), "all in sync, no bits: the cluster comes back");
        let slot = r.peer(2).slot;
        r.bitmaps[slot].set_range(0, 4096);
        assert!(!r.confirmed_up_to_date_by(1), "bits for node 2");
        r.bitmaps[slot].clear_all();
        r.peer_mut(1).disk = DiskState::UpToDate;
        r.peer_mut(1).last_state = Some(PeerState { bitmap_weight: 1, ..secondary_state(0xA0, [0; 4]) });
        assert!(!r.confirmed_up_to_date_by(1), "an UpToDate peer that holds bits for this node");
    }

    #[test]
    fn leftover_bits_on_an_established_link_are_weighed_once_neither_side_sees_a_primary() {
        // Seed 14903: this node, Outdated and further on, took bits for node 1 (UpToDate,
        // behind) from a resync while already linked to it; no one weighed them, and no one
        // could be elected.
        use crate::wire::DataPosition;
        let (mut r, _) = three_linked();
        r.disk = DiskState::Outdated;
        r.set_data_position(DataPosition { term: 1, epoch: 31, fua: 0 });
        let slot = r.peer(1).slot;
        r.bitmaps[slot].set_range(0, 4096);
        r.peer_mut(1).repl = ReplState::Established;
        let behind = PeerState { data_position: DataPosition { term: 1, epoch: 30, fua: 0 }, ..secondary_state(r.sb.uuids.current, [0; 4]) };
        let following = PeerState { primaries: 1 << 2, ..behind };
        r.peer_state_received(1, following).expect("a fitting State");
        assert!(r.peer(1).pending_sync.is_none(), "a primary writes: bits on a live link are its stream's");
        assert_eq!(r.peer(1).repl, ReplState::Established);
        r.peer_state_received(1, behind).expect("a fitting State");
        assert_eq!(r.peer(1).pending_sync, Some(crate::core::sync_decision::SyncDecision::BitmapSource), "the further copy sends its bits");
    }

    #[test]
    fn an_inconsistent_node_further_than_every_data_peer_gives_its_copy_up_once_all_are_here() {
        // Seed 1753: cut off mid-resync from a copy that a nearer one overwrote since, a node
        // further than both its peers waited for a node as far, which no longer existed.
        use crate::core::sync_decision::SyncDecision;
        use crate::wire::DataPosition;
        let (mut r, t0) = three_linked();
        (r.disk, r.sb.uuids.current) = (DiskState::Inconsistent, 0xA0);
        r.set_data_position(DataPosition { term: 1, epoch: 43, fua: 308 });
        let at = |epoch| PeerState { data_position: DataPosition { term: 1, epoch, fua: 0 }, ..secondary_state(r.sb.uuids.current, [0; 4]) };
        let (nearer, nearest) = (at(41), at(40));
        r.link_down(2, "cut", 0);
        r.peer_state_received(1, nearer).expect("waits, the link stays");
        assert_eq!((r.peer(1).pending_sync, r.data_position().epoch), (None, 43), "node 2 is away: it may hold a copy as far");
        r.take_actions();
        r.link_up(2, t0);
        r.peer_state_received(2, nearest).expect("a fitting State");
        assert_eq!(r.data_position(), DataPosition { term: 1, epoch: 41, fua: 0 }, "the furthest peer's");
        let actions = r.take_actions();
        let persisted = actions.iter().position(|a| matches!(a, Action::Persist(MetaWrite::Superblock)));
        let told = actions.iter().position(|a| matches!(a, Action::Send { msg: Message::State(s), .. } if s.data_position.epoch == 41));
        assert!(persisted.is_some() && persisted < told, "durably before the peers hear of it: {actions:?}");
        assert_eq!(r.peer(2).pending_sync, None, "node 2 is still nearer");
        // Node 1, as far now, resyncs it.
        r.peer_state_received(1, nearer).expect("a fitting State");
        assert_eq!(r.peer(1).pending_sync, Some(SyncDecision::BitmapTarget));
    }

    #[test]
    fn a_bitmap_sent_on_a_state_from_before_a_third_nodes_resync_is_declined_with_this_nodes_state() {
        // Seed 205246: node 1 decided to resync this node while node 2 already was about to;
        // its bitmap dropped the link as a violation, and the pair reconnected.
        let (mut r, t0) = three_linked();
        r.peer_mut(2).pending_sync = Some(crate::core::sync_decision::SyncDecision::BitmapTarget);
        let generation = r.peer(1).generation;
        let runs = Message::BitmapRuns { last: true, runs: vec![(0, 8)] };
        r.receive(t0, 1, generation, runs.clone()).expect("declined, not a violation");
        let slot = r.peer(1).slot;
        assert_eq!(r.bitmaps[slot].weight(), 0, "nothing of it applied");
        let told = r.take_actions().into_iter().any(|a| matches!(a, Action::Send { peer: 1, msg: Message::State(s), .. } if s.resynced_by == Some(2)));
        assert!(told, "node 1 hears that node 2 resyncs this node");
        // Not waiting for anyone, the same bitmap is a violation, as before.
        r.peer_mut(2).pending_sync = None;
        assert!(r.receive(t0, 1, generation, runs).unwrap_err().contains("no sync decision"));
    }

    #[test]
    fn a_decision_taken_on_a_state_from_before_the_peers_wait_for_a_third_resync_is_dropped_on_its_next() {
        let (mut r, _) = three_linked();
        r.peer_mut(1).pending_sync = Some(crate::core::sync_decision::SyncDecision::BitmapSource);
        let waits = PeerState { resynced_by: Some(2), ..secondary_state(r.sb.uuids.current, [0; 4]) };
        r.peer_state_received(1, waits).expect("a fitting State");
        assert_eq!(r.peer(1).pending_sync, None);
        assert_eq!(r.peer(1).repl, ReplState::Off, "idle until that resync ends");
        // A peer that resyncs a third node cannot be this node's target meanwhile, but may be its
        // source.
        let resyncs_other = PeerState { flags: super::STATE_FLAG_RESYNCS_OTHER, ..secondary_state(r.sb.uuids.current, [0; 4]) };
        r.peer_mut(1).pending_sync = Some(crate::core::sync_decision::SyncDecision::BitmapTarget);
        r.peer_state_received(1, resyncs_other).expect("a fitting State");
        assert_eq!(r.peer(1).pending_sync, Some(crate::core::sync_decision::SyncDecision::BitmapTarget), "its source may resync others");
        r.peer_mut(1).pending_sync = Some(crate::core::sync_decision::SyncDecision::BitmapSource);
        r.peer_state_received(1, resyncs_other).expect("a fitting State");
        assert_eq!(r.peer(1).pending_sync, None);
    }

    #[test]
    fn a_node_that_lost_its_cache_resyncs_inconsistent_peers_once_no_good_copy_can_come() {
        let (mut r, t0) = crate::replica::testing::three_node_replica();
        r.disk = DiskState::UpToDate;
        r.sb.uuids.current = 0xA0;
        r.cache_repair_pending = vec![1, 2];
        r.link_up(1, t0);
        r.link_up(2, t0);
        r.take_actions();
        let inconsistent = PeerState { disk: DiskState::Inconsistent.to_wire(), ..secondary_state(0xA0, [0; 4]) };
        r.peer_state_received(1, inconsistent).expect("a fitting State");
        assert!(r.peer(1).pending_sync.is_none(), "gamma may hold good data: wait for it");
        r.peer_state_received(2, inconsistent).expect("a fitting State");
        let sources = [1, 2].map(|p| r.peer(p).pending_sync.is_some_and(|d| d.is_source()));
        assert_eq!(sources, [true, true], "nobody better can come: this node resyncs both");
    }

}
