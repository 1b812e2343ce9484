//! The decision at connect: from both nodes' generation UUIDs, who (if anyone) resyncs whom.
//!
//! Both nodes run [`decide`] on the same pair of [`UuidView`]s (each from its own side), and the
//! function is antisymmetric, so they agree without another round trip. The table and its
//! reasoning are in docs/DESIGN.md ("Generation UUIDs"); the rule numbers below match it.

pub use crate::meta::uuids::{same as same_uuid, UUID_JUST_CREATED};
use crate::meta::uuids::history_position;
use crate::wire::DataPosition;

/// One node's side of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UuidView {
    pub node_id: u8,
    pub current: u64,
    /// This node's bitmap UUID for the *other* node (0 when it tracks nothing for it).
    pub bitmap_for_peer: u64,
    pub history: [u64; 4],
    /// Metadata said "primary" at attach: the node crashed while primary and its activity log's
    /// extents were marked out of sync.
    pub crashed_primary: bool,
    pub is_primary: bool,
    /// Disk is Inconsistent: it can only ever be a target.
    pub inconsistent: bool,
    /// How far the data goes (`DataPosition`): of two copies of one generation, the later
    /// election's is the newer; within one, the further copy holds every durable write of the
    /// nearer.
    pub data_position: DataPosition,
    /// The node stopped without a clean shutdown as a secondary and has not been resynced
    /// from this peer since: its activity log's extents (in its bitmap) may lack writes.
    pub cache_lost: bool,
}

impl UuidView {
    fn just_created(&self) -> bool {
        same_uuid(self.current, UUID_JUST_CREATED)
    }

    fn in_history(&self, uuid: u64) -> bool {
        self.history_index(uuid).is_some()
    }

    /// Where `uuid` is in this node's history (0: the generation it left last).
    fn history_index(&self, uuid: u64) -> Option<usize> {
        history_position(&self.history, uuid)
    }

    /// Whether this node's bitmap holds every block `peer` may lack: it tracks the peer from
    /// the peer's current generation, or from an older one of its own past that the peer's
    /// current descends from (the peer followed this node further than this node noted: the
    /// bits since the older generation include those since the newer; a primary tracks a peer
    /// that went silent from the generation the peer last reported, seed 17).
    fn tracks(&self, peer: &UuidView) -> bool {
        if self.bitmap_for_peer == 0 {
            return false;
        }
        if same_uuid(self.bitmap_for_peer, peer.current) {
            return true;
        }
        match (self.history_index(peer.current), self.history_index(self.bitmap_for_peer)) {
            (Some(theirs), Some(tracked)) => theirs < tracked,
            _ => false,
        }
    }
}

/// Which way data flows after connecting, from the point of view of the node that decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncDecision {
    /// Same data; replicate from here on.
    InSync,
    /// Resync the blocks set in either node's bitmap for the other; this node sends.
    BitmapSource,
    BitmapTarget,
    /// Resync every block.
    FullSource,
    FullTarget,
    /// Both wrote since they last agreed, and both still track changes from that common point
    /// (equal bitmap UUIDs): an after-split-brain policy could resolve it from the bitmaps.
    SplitBrain,
    /// Both wrote since they last agreed, with no common bitmap: only the operator can resolve it.
    SplitBrainManual,
    /// No shared ancestry: these disks never held the same data.
    Unrelated,
    /// The UUIDs call for a sync the states forbid; the reason says what the operator must do.
    Refused(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// This node is Inconsistent yet the UUIDs make it the source.
    InconsistentSource,
    /// This node is primary yet the UUIDs make it the target: syncing would overwrite live data.
    PrimaryWouldBeTarget,
    /// The peer is Inconsistent or primary and would be the wrong side (mirror of the above).
    PeerCannotFollow,
}

impl SyncDecision {
    /// The same decision as seen from the peer.
    pub fn mirrored(self) -> SyncDecision {
        use SyncDecision::*;
        match self {
            BitmapSource => BitmapTarget,
            BitmapTarget => BitmapSource,
            FullSource => FullTarget,
            FullTarget => FullSource,
            other => other,
        }
    }

    pub fn is_source(self) -> bool {
        matches!(self, SyncDecision::BitmapSource | SyncDecision::FullSource)
    }

    pub fn is_target(self) -> bool {
        matches!(self, SyncDecision::BitmapTarget | SyncDecision::FullTarget)
    }
}

/// Decides from `me`'s side. `decide(a, b) == decide(b, a).mirrored()` for every input.
pub fn decide(me: &UuidView, peer: &UuidView) -> SyncDecision {
    let by_uuids = decide_by_uuids(me, peer);
    check_states(finish_interrupted_resync(inconsistent_side_loses(by_uuids, me, peer), me, peer), me, peer)
}

/// Diverged or unrelated histories where one side is Inconsistent (a resync into it was cut
/// off): no split brain, since nothing on that side is usable data; the other side's copy
/// flows in full. (Nothing acknowledged depends on a node being resynced: it counts for no
/// primary's quorum and gives no vote.) Unrelated too: a node in the middle of a resync from a
/// third node still carries the generation it had, which a peer that moved on through more
/// generations than its history holds no longer knows (simulator seed 9664: the pair refused
/// each other for good as "wrong disk"); a wrong disk attached by mistake is Consistent.
/// Both sides Inconsistent: neither holds usable data, so neither is a source and nothing
/// diverged that a policy or an operator must judge; they wait for a third node to resync them
/// (seed 490911: two targets of one source that lost power, their histories too short to
/// relate them, refused each other as a split brain for good).
fn inconsistent_side_loses(decision: SyncDecision, me: &UuidView, peer: &UuidView) -> SyncDecision {
    // Not when the Inconsistent side was being resynced with a later election's data than the
    // other holds: part of it is acknowledged writes the other lacks (seed 35721: an
    // interrupted resync target took the older election's copy in full over a FUA write).
    let (inconsistent, consistent) = if me.inconsistent { (me, peer) } else { (peer, me) };
    let older_copy = consistent.data_position.term < inconsistent.data_position.term;
    match decision {
        SyncDecision::SplitBrain | SyncDecision::SplitBrainManual | SyncDecision::Unrelated if me.inconsistent && peer.inconsistent => {
            SyncDecision::Refused(Refusal::InconsistentSource)
        }
        SyncDecision::SplitBrain | SyncDecision::SplitBrainManual | SyncDecision::Unrelated if me.inconsistent != peer.inconsistent && !older_copy => {
            if me.inconsistent {
                SyncDecision::FullTarget
            } else {
                SyncDecision::FullSource
            }
        }
        d => d,
    }
}

fn decide_by_uuids(me: &UuidView, peer: &UuidView) -> SyncDecision {
    use SyncDecision::*;
    // 1. Two fresh disks: nothing to copy until one is declared the source.
    if me.just_created() && peer.just_created() {
        return InSync;
    }
    // 1b. The same generation, one side primary, and a bitmap UUID at that generation: what
    //     the secondary recorded since, it applied from a primary of this generation (a
    //     secondary writes nothing of its own, and a primary that writes without a peer starts
    //     a new generation), so the primary holds it or newer. It is the source; the bitmaps
    //     are merged, so every block either side recorded is sent again. (Without this, a
    //     secondary that lost its link to a live primary marked the blocks it had just applied
    //     and then claimed to be the source: the primary refused, and the pair never
    //     reconnected.)
    let tracking = me.bitmap_for_peer != 0 || peer.bitmap_for_peer != 0;
    if same_uuid(me.current, peer.current) && tracking && me.is_primary != peer.is_primary && !me.crashed_primary && !peer.crashed_primary {
        return if me.is_primary { BitmapSource } else { BitmapTarget };
    }
    // 2. A bitmap UUID says "I recorded every change since the peer was at this UUID": a bitmap
    //    resync suffices. Checked before the just-created rule so an interrupted initial sync
    //    resumes from its bitmap instead of starting over.
    //    Between nodes of the same generation the rules for it (4) decide instead: a crash as
    //    primary, or an interrupted resync, says more there than who tracks whom.
    let apart = !same_uuid(me.current, peer.current);
    let mine_tracks_peer = apart && me.tracks(peer);
    let peer_tracks_me = apart && peer.tracks(me);
    if mine_tracks_peer && !peer_tracks_me {
        return BitmapSource;
    }
    if peer_tracks_me && !mine_tracks_peer {
        return BitmapTarget;
    }
    // 3. Exactly one fresh disk: everything flows from the other.
    if me.just_created() {
        return FullTarget;
    }
    if peer.just_created() {
        return FullSource;
    }
    // 4. Same current UUID.
    if same_uuid(me.current, peer.current) {
        return decide_same_current(me, peer);
    }
    // 5. One node's current is in the other's history: the other moved on without a bitmap
    //    for it. Unless both track each other from one generation: each recorded what it
    //    changed since, so the two bitmaps together hold every block that differs (the
    //    simulator found 1.5 % of resyncs copying the whole disk, most of them so).
    let tracked_alike = me.bitmap_for_peer != 0 && same_uuid(me.bitmap_for_peer, peer.bitmap_for_peer);
    match (peer.in_history(me.current), me.in_history(peer.current)) {
        (true, false) => return if tracked_alike { BitmapTarget } else { FullTarget },
        (false, true) => return if tracked_alike { BitmapSource } else { FullSource },
        // Each is the other's past: histories that contradict each other; never guess.
        (true, true) => return SplitBrainManual,
        (false, false) => {}
    }
    // 6. Both rotated away from the same current: both wrote independently.
    if me.bitmap_for_peer != 0 && same_uuid(me.bitmap_for_peer, peer.bitmap_for_peer) {
        return SplitBrain;
    }
    // 7. Shared ancestry somewhere in the histories: split brain without usable bitmaps.
    let related = me.history.iter().chain([&me.bitmap_for_peer]).any(|u| *u != 0 && peer.in_history(*u))
        || (peer.bitmap_for_peer != 0 && me.in_history(peer.bitmap_for_peer));
    if related {
        return SplitBrainManual;
    }
    // 8. Nothing in common.
    Unrelated
}

fn decide_same_current(me: &UuidView, peer: &UuidView) -> SyncDecision {
    use SyncDecision::*;
    // A primary of a later election adopted this generation (promoted with every peer in
    // sync) and wrote on: its copy is the newer one, whoever crashed before.
    if me.data_position.term != peer.data_position.term && !me.inconsistent && !peer.inconsistent {
        return if me.data_position.term > peer.data_position.term { BitmapSource } else { BitmapTarget };
    }
    // An Inconsistent side is the target of a resync that was interrupted: it stays one, of a
    // copy at least as far into the stream as its own. Outside that resync's blocks it holds
    // its own copy, and what that copy holds beyond a nearer peer's position the peer lacks
    // (writes acknowledged with this node's ack among them): a resync from the nearer peer
    // would take those blocks back to its older data. Neither is a source then; they wait for
    // a third node (seed 40857: cut off mid-resync from a primary of a newer generation, a
    // node was resynced from an Outdated node of its own generation that had left before the
    // last writes, and was elected without one it had acknowledged). So too when the peer
    // crashed as primary of an earlier election and follows a later one (seed 2311), but not
    // when its position is where its term began: a primary records no more than that, and
    // after a power loss that is all its position says, however far its disk goes.
    if me.inconsistent != peer.inconsistent && inconsistent_further(me, peer) {
        let consistent = if me.inconsistent { peer } else { me };
        let at_term_start = consistent.data_position.epoch == 0 && consistent.data_position.fua == 0;
        if !(consistent.crashed_primary && at_term_start) {
            return Refused(Refusal::InconsistentSource);
        }
    }
    // A crash as primary leaves writes in the activity log's extents that may not have reached
    // the peer (or reached only the peer). Those extents are already in the crashed side's
    // bitmap; they flow from the side that is primary now, else from the side that crashed,
    // unless that side is Inconsistent: it was made the target of a resync since it crashed,
    // which gave up what only it held, and it can be no source (seed 29991 of the long run:
    // a primary detached by a failed metadata write kept its crash marker, became the target
    // of the new primary, both lost power, and the two waited for each other for good).
    if me.crashed_primary || peer.crashed_primary {
        return match (me.is_primary, peer.is_primary) {
            (true, false) => BitmapSource,
            (false, true) => BitmapTarget,
            _ if me.inconsistent != peer.inconsistent => {
                if me.inconsistent {
                    BitmapTarget
                } else {
                    BitmapSource
                }
            }
            _ => match (me.crashed_primary, peer.crashed_primary) {
                (true, false) => BitmapSource,
                (false, true) => BitmapTarget,
                // Both crashed as primary with the same UUID: their writes after the last common
                // point are within both activity logs; the lower node id wins deterministically.
                _ if me.node_id < peer.node_id => BitmapSource,
                _ => BitmapTarget,
            },
        };
    }
    // An Inconsistent side is the target of a resync that was interrupted: it stays one (of a
    // copy as far as its own, see above).
    match (me.inconsistent, peer.inconsistent) {
        (true, false) => return BitmapTarget,
        (false, true) => return BitmapSource,
        _ => {}
    }
    // A side that lost its disk's cache is resynced where its bitmap says, from a copy at
    // least as far into the primary's stream: what it lost was never flushed, but what it
    // holds beyond the other's position was (the other lacks acknowledged, flushed writes;
    // seed 333), and it is the source then.
    match (me.cache_lost, peer.cache_lost) {
        (true, false) if me.data_position <= peer.data_position => return BitmapTarget,
        (false, true) if peer.data_position <= me.data_position => return BitmapSource,
        (true, false) => return BitmapSource,
        (false, true) => return BitmapTarget,
        _ => {}
    }
    // A leftover bitmap UUID means the end of a resync was missed: finish it. Unless the
    // other copy is further into the stream: then the bitmap UUID is older than the copy it
    // would overwrite. A secondary recorded what it applied for a peer that was away, and the
    // peer came to this generation through a third node that was further still; as the
    // source, the nearer copy took back blocks of the further one (seed 18564: an Outdated
    // secondary resynced a node that held a killed primary's whole stream, and the device that
    // primary left behind served again with a block older than its filesystem had seen). The
    // further copy holds every flushed write of the nearer one, and the bitmaps are merged.
    match (me.bitmap_for_peer != 0, peer.bitmap_for_peer != 0) {
        (true, false) if peer.data_position > me.data_position => BitmapTarget,
        (false, true) if me.data_position > peer.data_position => BitmapSource,
        (true, false) => BitmapSource,
        (false, true) => BitmapTarget,
        // Each recorded for the other (two secondaries that lost their primary, each marking
        // what it applied lately): the bits decide (see `leftover_bits`).
        _ => InSync,
    }
}

/// Of two nodes one of which is Inconsistent, the Inconsistent one's own copy goes further
/// into the stream than the other's (see `decide_same_current`).
fn inconsistent_further(me: &UuidView, peer: &UuidView) -> bool {
    let (inconsistent, consistent) = if me.inconsistent { (me, peer) } else { (peer, me) };
    inconsistent.data_position > consistent.data_position
}

/// Same UUIDs but one side Inconsistent: a resync into it was interrupted after its UUIDs were
/// adopted; it stays the target.
fn finish_interrupted_resync(decision: SyncDecision, me: &UuidView, peer: &UuidView) -> SyncDecision {
    let both_fresh = me.just_created() && peer.just_created();
    if decision != SyncDecision::InSync || me.inconsistent == peer.inconsistent || both_fresh {
        return decision;
    }
    if me.inconsistent {
        SyncDecision::BitmapTarget
    } else {
        SyncDecision::BitmapSource
    }
}

/// Refuses what the nodes' states forbid: an Inconsistent source, a primary as target. Also
/// applied to a split brain's resolution, which the UUIDs alone do not decide.
pub fn check_states(decision: SyncDecision, me: &UuidView, peer: &UuidView) -> SyncDecision {
    use SyncDecision::*;
    if decision.is_source() && me.inconsistent || decision.is_target() && me.is_primary {
        return Refused(if me.inconsistent && decision.is_source() {
            Refusal::InconsistentSource
        } else {
            Refusal::PrimaryWouldBeTarget
        });
    }
    if decision.is_target() && peer.inconsistent || decision.is_source() && peer.is_primary {
        return Refused(Refusal::PeerCannotFollow);
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::SyncDecision::*;
    use super::*;
    use proptest::prelude::*;

    fn position(term: u64, epoch: u64) -> DataPosition {
        DataPosition { term, epoch, fua: 0 }
    }

    fn view(node_id: u8, current: u64) -> UuidView {
        UuidView {
            node_id,
            current,
            bitmap_for_peer: 0,
            history: [0; 4],
            crashed_primary: false,
            is_primary: false,
            inconsistent: false,
            data_position: DataPosition::default(),
            cache_lost: false,
        }
    }

    fn both(a: &UuidView, b: &UuidView) -> SyncDecision {
        let d = decide(a, b);
        let mirrored = match decide(b, a) {
            Refused(_) => d,
            other => other.mirrored(),
        };
        if !matches!(d, Refused(_)) {
            assert_eq!(d, mirrored, "decisions disagree for {a:?} / {b:?}");
        }
        d
    }

    #[test]
    fn a_node_behind_that_both_track_from_one_generation_gets_a_bitmap_resync() {
        let ahead = UuidView { history: [0x61, 0x51, 0, 0], bitmap_for_peer: 0x51, ..view(0, 0x71) };
        let behind = UuidView { bitmap_for_peer: 0x51, ..view(1, 0x61) };
        assert_eq!(both(&ahead, &behind), BitmapSource);
        // Tracked from 0x51 by the node ahead only: its bits since 0x51 hold what the other
        // lacks of its writes, and the other, at 0x61, wrote nothing of its own.
        let untracked = UuidView { bitmap_for_peer: 0, ..behind };
        assert_eq!(both(&ahead, &untracked), BitmapSource);
        let unknown = UuidView { bitmap_for_peer: 0, ..ahead };
        assert_eq!(both(&unknown, &untracked), FullSource, "nothing says what it lacks");
    }

    #[test]
    fn a_node_that_lost_its_cache_is_the_target_unless_it_is_further() {
        let lost = UuidView { cache_lost: true, data_position: position(2, 7), ..view(0, 0x51) };
        let behind = UuidView { data_position: position(2, 5), ..view(1, 0x51) };
        assert_eq!(both(&lost, &behind), BitmapSource, "the other lacks flushed writes");
        let ahead = UuidView { data_position: position(2, 7), ..behind };
        assert_eq!(both(&lost, &ahead), BitmapTarget);
    }

    #[test]
    fn of_one_generation_the_later_election_s_copy_wins_over_a_crashed_primary() {
        let crashed = UuidView { crashed_primary: true, data_position: position(3, 9), ..view(0, 0x51) };
        let later = UuidView { data_position: position(4, 1), ..view(1, 0x51) };
        assert_eq!(decide(&later, &crashed), BitmapSource);
        assert_eq!(decide(&crashed, &later), BitmapTarget);
    }

    #[test]
    fn diverged_histories_with_an_inconsistent_side_are_a_full_sync_into_it() {
        let target = UuidView { inconsistent: true, history: [0x30, 0, 0, 0], ..view(0, 0x40) };
        let other = UuidView { history: [0x30, 0, 0, 0], ..view(1, 0x50) };
        assert_eq!(decide(&target, &other), FullTarget);
        assert_eq!(decide(&other, &target), FullSource);
    }

    #[test]
    fn two_inconsistent_nodes_are_no_split_brain_and_neither_is_a_source() {
        // Seed 490911: two targets of one source that lost power; each tracked the other from
        // the same generation, and their currents are too far apart for the histories.
        let a = UuidView { inconsistent: true, bitmap_for_peer: 0x5F2E, ..view(1, 0xC36C) };
        let b = UuidView { inconsistent: true, bitmap_for_peer: 0x5F2E, ..view(2, 0x3D6E) };
        assert_eq!(decide_by_uuids(&a, &b), SplitBrain, "the UUIDs alone diverge");
        assert_eq!(decide(&a, &b), Refused(Refusal::InconsistentSource));
        assert_eq!(decide(&b, &a), Refused(Refusal::InconsistentSource));
        let unrelated = UuidView { bitmap_for_peer: 0, ..b };
        assert_eq!(decide(&UuidView { bitmap_for_peer: 0, ..a }, &unrelated), Refused(Refusal::InconsistentSource));
    }

    #[test]
    fn an_interrupted_target_never_becomes_the_source_by_its_bitmap_uuid() {
        // The target lost its source (a primary that crashed) mid-resync; it had marked what it
        // applied lately for it, under the same generation.
        let target = UuidView { bitmap_for_peer: 0x50, inconsistent: true, ..view(1, 0x51) };
        let crashed = UuidView { crashed_primary: true, ..view(2, 0x51) };
        assert_eq!(decide(&target, &crashed), BitmapTarget);
        assert_eq!(decide(&crashed, &target), BitmapSource);
    }

    #[test]
    fn a_crashed_primary_made_a_resync_target_since_is_no_source() {
        // alpha crashed as primary, became beta's target and lost its source mid-resync; beta,
        // primary meanwhile, crashed too: both carry the crash marker, alpha has the lower id.
        let alpha = UuidView { crashed_primary: true, inconsistent: true, ..view(0, 0x51) };
        let beta = UuidView { crashed_primary: true, ..view(1, 0x51) };
        assert_eq!(decide(&alpha, &beta), BitmapTarget);
        assert_eq!(decide(&beta, &alpha), BitmapSource);
        // And with only the Inconsistent side marked.
        let beta = view(1, 0x51);
        assert_eq!(decide(&alpha, &beta), BitmapTarget);
        assert_eq!(decide(&beta, &alpha), BitmapSource);
    }

    #[test]
    fn fresh_pair_is_in_sync_until_forced() {
        let mut a = view(0, UUID_JUST_CREATED);
        let mut b = view(1, UUID_JUST_CREATED);
        a.inconsistent = true;
        b.inconsistent = true;
        assert_eq!(both(&a, &b), InSync);
    }

    #[test]
    fn forced_primary_fully_syncs_a_fresh_peer() {
        let a = view(0, 0x1000);
        let mut b = view(1, UUID_JUST_CREATED);
        b.inconsistent = true;
        assert_eq!(both(&a, &b), FullSource);
    }

    #[test]
    fn interrupted_initial_sync_resumes_from_the_bitmap() {
        let mut a = view(0, 0x1000);
        a.bitmap_for_peer = UUID_JUST_CREATED;
        let mut b = view(1, UUID_JUST_CREATED);
        b.inconsistent = true;
        assert_eq!(both(&a, &b), BitmapSource);
    }

    #[test]
    fn primary_that_lost_its_peer_resyncs_it_by_bitmap() {
        let mut a = view(0, 0x2001);
        a.bitmap_for_peer = 0x1000;
        a.history = [0x1000, 0, 0, 0];
        let b = view(1, 0x1000);
        assert_eq!(both(&a, &b), BitmapSource);
    }

    #[test]
    fn crashed_primary_becomes_target_of_the_promoted_peer() {
        // alpha crashed as primary at 0x1000; beta promoted alone and rotated to 0x3001.
        let mut alpha = view(0, 0x1001);
        alpha.crashed_primary = true;
        let mut beta = view(1, 0x3001);
        beta.bitmap_for_peer = 0x1000;
        beta.is_primary = true;
        assert_eq!(both(&alpha, &beta), BitmapTarget);
    }

    #[test]
    fn crashed_primary_with_unchanged_peer_resyncs_its_activity_log() {
        let mut alpha = view(0, 0x1001);
        alpha.crashed_primary = true;
        let beta = view(1, 0x1000);
        assert_eq!(both(&alpha, &beta), BitmapSource);
    }

    #[test]
    fn missed_resync_end_is_finished() {
        let mut a = view(0, 0x1000);
        a.bitmap_for_peer = 0x0800;
        let b = view(1, 0x1000);
        assert_eq!(both(&a, &b), BitmapSource);
    }

    #[test]
    fn a_bitmap_uuid_on_the_nearer_copy_does_not_make_it_the_source_of_a_further_one() {
        // The holder recorded for the peer while it was away; the peer caught up through a
        // third node further into the stream than the holder.
        let holder = UuidView { bitmap_for_peer: 0x0800, data_position: position(2, 9), ..view(0, 0x1000) };
        let further = UuidView { data_position: position(2, 12), ..view(1, 0x1000) };
        assert_eq!(both(&holder, &further), BitmapTarget);
        let equally_far = UuidView { data_position: position(2, 9), ..further };
        assert_eq!(both(&holder, &equally_far), BitmapSource, "a missed resync end, as before");
    }

    #[test]
    fn history_without_bitmap_means_full_sync() {
        let mut a = view(0, 0x3000);
        a.history = [0x2000, 0x1000, 0, 0];
        let b = view(1, 0x1000);
        assert_eq!(both(&a, &b), FullSource);
    }

    #[test]
    fn both_rotated_from_the_same_uuid_is_split_brain() {
        let mut a = view(0, 0x2001);
        a.bitmap_for_peer = 0x1000;
        a.history = [0x1000, 0, 0, 0];
        let mut b = view(1, 0x3001);
        b.bitmap_for_peer = 0x1000;
        b.history = [0x1000, 0, 0, 0];
        assert_eq!(both(&a, &b), SplitBrain);
    }

    #[test]
    fn shared_history_only_is_manual_split_brain() {
        let mut a = view(0, 0x2000);
        a.history = [0x1000, 0, 0, 0];
        let mut b = view(1, 0x3000);
        b.history = [0x1000, 0, 0, 0];
        assert_eq!(both(&a, &b), SplitBrainManual);
    }

    #[test]
    fn unrelated_disks_are_refused() {
        assert_eq!(both(&view(0, 0x2000), &view(1, 0x3000)), Unrelated);
    }

    #[test]
    fn a_peer_tracked_from_an_older_generation_than_its_own_gets_a_bitmap_resync() {
        // The primary tracks the peer from 0x2000; the peer followed it to 0x3000 first.
        let primary = UuidView { bitmap_for_peer: 0x2000, history: [0x3000, 0x2000, 0, 0], is_primary: true, ..view(0, 0x4000) };
        let peer = UuidView { history: [0x2000, 0, 0, 0], ..view(1, 0x3000) };
        assert_eq!(both(&primary, &peer), BitmapSource);
        // Tracked from a generation newer than the peer's: its bits miss what came between.
        let primary = UuidView { bitmap_for_peer: 0x3000, history: [0x3000, 0x2000, 0, 0], is_primary: true, ..view(0, 0x4000) };
        let peer = view(1, 0x2000);
        assert_eq!(both(&primary, &peer), FullSource);
    }

    #[test]
    fn an_inconsistent_node_holding_a_later_election_takes_nothing_from_an_older_copy() {
        let target = UuidView { inconsistent: true, bitmap_for_peer: 0x1000, data_position: position(3, 3), ..view(0, 0x3001) };
        let older = UuidView { bitmap_for_peer: 0x1000, data_position: position(2, 0), ..view(1, 0x2001) };
        assert_ne!(decide(&target, &older), FullTarget, "it holds acknowledged writes of election 3");
        let newer = UuidView { data_position: position(4, 0), ..older };
        assert_eq!(both(&target, &newer), FullTarget);
    }

    #[test]
    fn an_inconsistent_node_with_a_generation_its_peer_forgot_takes_a_full_sync() {
        let target = UuidView { inconsistent: true, ..view(0, 0x2000) };
        let source = UuidView { history: [0x5000, 0x4000, 0x3000, 0x2800], ..view(1, 0x6000) };
        assert_eq!(both(&target, &source), FullTarget);
    }

    #[test]
    fn primary_is_never_overwritten() {
        let mut a = view(0, 0x1000);
        a.is_primary = true;
        let mut b = view(1, 0x2001);
        b.bitmap_for_peer = 0x1000;
        assert_eq!(decide(&a, &b), Refused(Refusal::PrimaryWouldBeTarget));
        assert_eq!(decide(&b, &a), Refused(Refusal::PeerCannotFollow));
    }

    #[test]
    fn a_secondary_that_marked_what_it_applied_resyncs_from_its_primary() {
        let mut primary = view(0, 0x2001);
        primary.is_primary = true;
        let mut secondary = view(1, 0x2000);
        secondary.bitmap_for_peer = 0x2000;
        assert_eq!(decide(&primary, &secondary), BitmapSource);
        assert_eq!(decide(&secondary, &primary), BitmapTarget);
        primary.bitmap_for_peer = 0x2000;
        assert_eq!(decide(&primary, &secondary), BitmapSource, "both marked: still the primary");
    }

    #[test]
    fn inconsistent_node_is_never_a_source() {
        let mut a = view(0, 0x2001);
        a.bitmap_for_peer = 0x1000;
        a.inconsistent = true;
        let b = view(1, 0x1000);
        assert_eq!(decide(&a, &b), Refused(Refusal::InconsistentSource));
    }

    #[test]
    fn inconsistent_side_with_same_uuid_stays_target() {
        let a = view(0, 0x1000);
        let mut b = view(1, 0x1000);
        b.inconsistent = true;
        assert_eq!(both(&a, &b), BitmapSource);
    }

    #[test]
    fn an_inconsistent_node_further_into_the_stream_takes_nothing_from_a_nearer_copy() {
        // Seed 40857: n1, cut off mid-resync from a primary of a newer generation, still holds
        // its own copy at epoch 24 outside that resync's blocks; n0, Outdated, left at epoch 6.
        let cut_off = UuidView { inconsistent: true, bitmap_for_peer: 0x50, data_position: position(3, 24), ..view(1, 0x51) };
        let nearer = UuidView { bitmap_for_peer: 0x50, data_position: position(3, 6), ..view(0, 0x51) };
        assert_eq!(decide(&cut_off, &nearer), Refused(Refusal::InconsistentSource));
        assert_eq!(decide(&nearer, &cut_off), Refused(Refusal::InconsistentSource));
        // A copy as far, or further, resyncs it.
        for epoch in [24, 30] {
            let source = UuidView { data_position: position(3, epoch), ..nearer };
            assert_eq!(both(&source, &cut_off), BitmapSource, "from epoch {epoch}");
        }
        // So does a later election's copy, whatever its epoch.
        let later = UuidView { data_position: position(4, 1), ..nearer };
        assert_eq!(both(&later, &cut_off), BitmapSource);
        // Seed 2311: the nearer copy crashed as primary of an earlier election and follows this
        // one; no source either.
        let crashed = UuidView { crashed_primary: true, data_position: position(3, 4), ..nearer };
        assert_eq!(decide(&cut_off, &crashed), Refused(Refusal::InconsistentSource));
        assert_eq!(decide(&crashed, &cut_off), Refused(Refusal::InconsistentSource));
        // But a crashed primary at its term's start (all a power loss leaves it to say) still
        // resyncs its activity log's extents into it.
        let own_term = UuidView { data_position: position(3, 0), ..crashed };
        assert_eq!(both(&own_term, &cut_off), BitmapSource);
    }

    fn arb_uuid() -> impl Strategy<Value = u64> {
        prop_oneof![Just(0u64), Just(UUID_JUST_CREATED), 0x1000u64..0x1006]
    }

    fn arb_view(node_id: u8) -> impl Strategy<Value = UuidView> {
        (arb_uuid(), arb_uuid(), proptest::array::uniform4(arb_uuid()), any::<bool>(), any::<bool>(), any::<bool>(), (0..3u64, 0..3u64, 0..2u64))
            .prop_map(move |(current, bitmap_for_peer, history, crashed_primary, is_primary, inconsistent, (term, epoch, fua))| UuidView {
                node_id,
                current: current.max(UUID_JUST_CREATED),
                bitmap_for_peer,
                history,
                crashed_primary,
                is_primary,
                inconsistent,
                data_position: DataPosition { term, epoch, fua },
                cache_lost: false,
            })
    }

    proptest! {
        #[test]
        fn both_sides_agree(a in arb_view(0), b in arb_view(1)) {
            let (da, db) = (decide(&a, &b), decide(&b, &a));
            match (da, db) {
                (Refused(_), Refused(_)) => {}
                (Refused(_), _) | (_, Refused(_)) => prop_assert!(false, "one side refused alone: {da:?} / {db:?}"),
                _ => prop_assert_eq!(da, db.mirrored()),
            }
            prop_assert!(!(da.is_source() && a.inconsistent));
            prop_assert!(!(da.is_target() && a.is_primary));
        }
    }
}
