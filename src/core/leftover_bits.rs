//! Out-of-sync bits that survive into a connection between nodes whose generations agree.
//!
//! Equal current UUIDs end the decision table in "in sync", and nothing else would ever resync
//! blocks one node still has marked for the other. Such bits exist when an online verify found
//! blocks that differ: the verifying node marked them in its bitmap for the peer (the peer marked
//! itself Outdated), and the operator reconnects to repair them. At that connection the node
//! holding the bits becomes the source of a bitmap resync, so exactly those blocks flow, and the
//! peer ends UpToDate again.
//!
//! Equal generations mean both nodes applied the same primary's writes, though not
//! necessarily all of them: when either holds bits (secondaries mark the writes they applied
//! lately when they lose the primary), the copy further into the primary's stream sends (its
//! data position: it holds every flushed write of the other), Outdated or not (seed 79004);
//! of two equally far, the side that is not Outdated, then the one holding bits, then the
//! lower node id. Leaving both as they were left two UpToDate copies different for good
//! (simulator seed 459). A primary is the source whenever either side holds bits.
//!
//! Nodes weigh such bits when they connect, and on a live link once neither side sees a
//! primary (then no write changes them; DRBD resyncs what its secondaries marked when they
//! lose their primary too). An Outdated copy further into the stream than a good one, holding
//! bits for it, sends them: it holds every flushed write of the good copy and more.
//!
//! Both nodes evaluate this on the same inputs (each side's bitmap weight and disk state travel
//! in `State`), so they agree on the direction without another round trip.

use super::states::DiskState;
use super::sync_decision::SyncDecision;
use crate::wire::DataPosition;

/// One side of the connection, as both nodes see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitsHolder {
    /// Set bits in this side's bitmap for the other side.
    pub bits_for_other: u64,
    pub disk: DiskState,
    pub is_primary: bool,
    /// How far the data goes (see `UuidView::data_position`), then the node id: the order
    /// between two sides that may both send.
    pub position: (DataPosition, u8),
}

impl BitsHolder {
    /// May send a resync to `target`: good data, and never into a primary.
    fn may_send_to(&self, target: &BitsHolder) -> bool {
        self.bits_for_other > 0
            && matches!(self.disk, DiskState::UpToDate | DiskState::Consistent)
            && !target.is_primary
            && (target.bits_for_other == 0 || target.disk == DiskState::Outdated)
    }

    /// Further into the election's stream than `target`, with usable data, while either side
    /// holds bits for the other, and neither is a primary: the further copy is the source,
    /// whatever the two disk states say. It holds every flushed write of the nearer copy, and
    /// flushed writes of its own the nearer copy lacks; the bitmaps are merged, so every block
    /// either side marked flows from it. An Outdated copy is Outdated to the primary that went
    /// on without it, not to a nearer copy (simulator seed 79004: a node that lost its cache at
    /// a power loss, Consistent at 2/13, resynced an Outdated one at 2/15, both holding bits,
    /// and took from it a FLUSHed write only the Outdated copy and the lost primary held).
    /// Left "in sync" instead, the good copy could not be elected (the further voters refuse
    /// it), the Outdated ones could not either, and no one was primary for good (seeds 14903,
    /// 28685, 34613, 38129); a good copy that takes an Outdated source's data ends Outdated,
    /// and the rule that brings an all-Outdated cluster back then confirms them all.
    /// Copies of different elections never get here: the later election's is the source
    /// (`sync_decision::decide_same_current`).
    fn further_with_bits(&self, target: &BitsHolder) -> bool {
        matches!(self.disk, DiskState::UpToDate | DiskState::Consistent | DiskState::Outdated)
            && !self.is_primary
            && !target.is_primary
            && (self.bits_for_other > 0 || target.bits_for_other > 0)
            && self.position.0 > target.position.0
    }

    /// A primary resyncs a peer whenever either side holds bits for the other: nothing goes
    /// into a primary, and what the peer holds that the primary lacks was never acknowledged
    /// in the primary's term (both holding bits once left them "in sync"; seed 3117).
    /// An Outdated primary too: a fence-peer answer "the peer is primary" (exit code 6)
    /// outdates a primary (a verify runs on the primary, so it outdates a secondary), and a peer of the same generation that is not primary shows the
    /// answer wrong (one promoted since would hold a newer generation), while the primary
    /// holds every write acknowledged in it. Left "in sync", each side's bits stayed set, the
    /// other confirmed the Outdated primary UpToDate, and a block the peer failed to write
    /// after a protocol B acknowledgement stayed different for good (seed 214903).
    fn is_primary_with_bits(&self, other: &BitsHolder) -> bool {
        self.is_primary
            && !other.is_primary
            && matches!(self.disk, DiskState::UpToDate | DiskState::Consistent | DiskState::Outdated)
            && (self.bits_for_other > 0 || other.bits_for_other > 0)
    }

    /// Holds bits, good data, and the target is no primary: the target's bits alone stand in
    /// the way (both sides are then ordered by position).
    fn may_send_either_way(&self, target: &BitsHolder) -> bool {
        self.bits_for_other > 0 && matches!(self.disk, DiskState::UpToDate | DiskState::Consistent) && !target.is_primary
    }

    /// The order between two sides that may both send: further into the stream first, then
    /// (equally far) the side holding bits, then the lower node id.
    fn sends_before(&self, other: &BitsHolder) -> bool {
        let key = |s: &BitsHolder| (s.position.0, s.bits_for_other > 0, std::cmp::Reverse(s.position.1));
        key(self) > key(other)
    }
}

/// Two Outdated copies, either holding bits for the other: neither is better, and left "in
/// sync" their blocks there stayed different while the rule that brings an all-Outdated cluster
/// back confirmed them UpToDate (seed 143529). Ordered like two good copies: the further one
/// holds every flushed write of the nearer; of two equally far, the one holding bits.
fn both_outdated_with_bits(me: &BitsHolder, peer: &BitsHolder) -> bool {
    me.disk == DiskState::Outdated
        && peer.disk == DiskState::Outdated
        && !me.is_primary
        && !peer.is_primary
        && (me.bits_for_other > 0 || peer.bits_for_other > 0)
}

/// Turns an "in sync" decision into a bitmap resync when one side holds out-of-sync bits for the
/// other and may be its source (see the module documentation). Any other decision stands.
pub fn resync_leftover_bits(decision: SyncDecision, me: &BitsHolder, peer: &BitsHolder) -> SyncDecision {
    if decision != SyncDecision::InSync {
        return decision;
    }
    if me.further_with_bits(peer) {
        return SyncDecision::BitmapSource;
    }
    if peer.further_with_bits(me) {
        return SyncDecision::BitmapTarget;
    }
    match (me.may_send_to(peer), peer.may_send_to(me)) {
        (true, false) => SyncDecision::BitmapSource,
        (false, true) => SyncDecision::BitmapTarget,
        _ if me.is_primary_with_bits(peer) => SyncDecision::BitmapSource,
        _ if peer.is_primary_with_bits(me) => SyncDecision::BitmapTarget,
        // The node ids differ, so the order is total: one side sends.
        _ if me.may_send_either_way(peer) && peer.may_send_either_way(me) || both_outdated_with_bits(me, peer) => {
            if me.sends_before(peer) {
                SyncDecision::BitmapSource
            } else {
                SyncDecision::BitmapTarget
            }
        }
        _ => decision,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(term: u64, epoch: u64, fua: u64) -> DataPosition {
        DataPosition { term, epoch, fua }
    }

    fn side(bits_for_other: u64, disk: DiskState) -> BitsHolder {
        BitsHolder { bits_for_other, disk, is_primary: false, position: (at(1, 5, 0), 0) }
    }

    #[test]
    fn with_bits_on_both_good_sides_the_further_copy_is_the_source() {
        let near = side(3, DiskState::UpToDate);
        let far = BitsHolder { position: (at(1, 9, 0), 1), ..near };
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &far, &near), SyncDecision::BitmapSource);
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &near, &far), SyncDecision::BitmapTarget);
        let twin = BitsHolder { position: (at(1, 5, 0), 1), ..near };
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &near, &twin), SyncDecision::BitmapSource, "equally far: the lower node id");
        // An acknowledged FUA write past the last barrier is further on than the barrier.
        let fua = BitsHolder { position: (at(1, 5, 17), 1), ..near };
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &near, &fua), SyncDecision::BitmapTarget);
    }

    #[test]
    fn two_outdated_copies_with_bits_for_either_resync_from_the_further() {
        // Seed 143529: left "in sync", their blocks stayed different.
        let near = side(32, DiskState::Outdated);
        let far = BitsHolder { bits_for_other: 0, position: (at(5, 45, 0), 1), ..near };
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &near, &far), SyncDecision::BitmapTarget);
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &far, &near), SyncDecision::BitmapSource);
        let none = BitsHolder { bits_for_other: 0, ..near };
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &none, &far), SyncDecision::InSync, "no bits, nothing to resync");
    }

    #[test]
    fn an_outdated_copy_further_than_a_good_one_without_bits_sends_it_its_bits() {
        // Seeds 14903, 28685, 34613, 38129: left "in sync", no one could be elected.
        let behind = BitsHolder { position: (at(1, 30, 0), 1), ..side(0, DiskState::UpToDate) };
        let further = BitsHolder { position: (at(1, 31, 0), 0), ..side(1, DiskState::Outdated) };
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &further, &behind), SyncDecision::BitmapSource);
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &behind, &further), SyncDecision::BitmapTarget);
        let level = BitsHolder { position: behind.position, ..further };
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &level, &behind), SyncDecision::InSync, "not further: no sign it holds more");
        // A good copy behind it that holds bits too takes them from the further one (seed 79004).
        let with_bits = BitsHolder { bits_for_other: 2, ..behind };
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &with_bits, &further), SyncDecision::BitmapTarget);
    }

    #[test]
    fn of_two_outdated_copies_equally_far_the_one_holding_bits_sends() {
        let with = BitsHolder { position: (at(1, 5, 0), 1), ..side(4, DiskState::Outdated) };
        let without = BitsHolder { position: (at(1, 5, 0), 0), ..side(0, DiskState::Outdated) };
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &with, &without), SyncDecision::BitmapSource);
        let both = BitsHolder { bits_for_other: 1, ..without };
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &with, &both), SyncDecision::BitmapTarget, "both: the lower node id");
    }

    #[test]
    fn the_side_holding_bits_is_the_source() {
        let (a, b) = (side(1, DiskState::UpToDate), side(0, DiskState::Outdated));
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &a, &b), SyncDecision::BitmapSource);
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &b, &a), SyncDecision::BitmapTarget);
    }

    #[test]
    fn with_bits_on_both_sides_equally_far_the_outdated_one_is_the_target() {
        let (a, b) = (side(1, DiskState::UpToDate), side(7, DiskState::Outdated));
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &a, &b), SyncDecision::BitmapSource);
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &b, &a), SyncDecision::BitmapTarget);
    }

    #[test]
    fn a_further_copy_is_the_source_whatever_the_disk_states_say() {
        // Seed 79004: n2 (Consistent after a power loss, 2/13, 32 bits for n0) resynced n0
        // (Outdated, 2/15, 28 bits for n2), and a FLUSHed write only n0 held was lost.
        let nearer = BitsHolder { position: (at(2, 13, 0), 2), ..side(32, DiskState::Consistent) };
        let further = BitsHolder { position: (at(2, 15, 0), 0), ..side(28, DiskState::Outdated) };
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &further, &nearer), SyncDecision::BitmapSource);
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &nearer, &further), SyncDecision::BitmapTarget);
        // Bits on one side only, either side: the further copy still sends (the bitmaps merge).
        let further_without = BitsHolder { bits_for_other: 0, ..further };
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &further_without, &nearer), SyncDecision::BitmapSource);
        let good_further_without = BitsHolder { disk: DiskState::UpToDate, ..further_without };
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &good_further_without, &nearer), SyncDecision::BitmapSource);
        // Never out of an Inconsistent copy, nor into or out of a primary by this rule.
        let inconsistent = BitsHolder { disk: DiskState::Inconsistent, ..further };
        assert_ne!(resync_leftover_bits(SyncDecision::InSync, &inconsistent, &nearer), SyncDecision::BitmapSource);
        let primary = BitsHolder { is_primary: true, ..nearer };
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &further, &primary), SyncDecision::BitmapTarget, "the primary sends");
    }

    #[test]
    fn a_primary_resyncs_its_peer_when_both_hold_bits() {
        let (a, b) = (side(2063, DiskState::UpToDate), side(30, DiskState::UpToDate));
        let primary = BitsHolder { is_primary: true, ..a };
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &primary, &b), SyncDecision::BitmapSource);
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &b, &primary), SyncDecision::BitmapTarget);
        let empty = BitsHolder { bits_for_other: 0, ..primary };
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &empty, &b), SyncDecision::BitmapSource, "the peer's bits alone");
    }

    #[test]
    fn an_outdated_primary_resyncs_its_peer_when_either_holds_bits() {
        let peer = side(448, DiskState::UpToDate);
        let primary = BitsHolder { is_primary: true, position: (at(1, 4, 0), 1), ..side(19, DiskState::Outdated) };
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &primary, &peer), SyncDecision::BitmapSource);
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &peer, &primary), SyncDecision::BitmapTarget);
        let secondary = BitsHolder { is_primary: false, ..primary };
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &secondary, &peer), SyncDecision::BitmapTarget, "an Outdated secondary is the target");
        let inconsistent = BitsHolder { disk: DiskState::Inconsistent, ..primary };
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &inconsistent, &peer), SyncDecision::InSync, "never out of an Inconsistent disk");
    }

    #[test]
    fn no_bits_stay_in_sync() {
        let (a, b) = (side(0, DiskState::UpToDate), side(0, DiskState::Outdated));
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &a, &b), SyncDecision::InSync);
    }

    #[test]
    fn never_into_a_primary_nor_out_of_a_disk_without_good_data() {
        let (a, mut b) = (side(8, DiskState::UpToDate), side(0, DiskState::UpToDate));
        b.is_primary = true;
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &a, &b), SyncDecision::BitmapTarget, "the primary sends instead");
        for disk in [DiskState::Inconsistent, DiskState::Outdated] {
            let (a, b) = (side(8, disk), side(0, DiskState::UpToDate));
            assert_eq!(resync_leftover_bits(SyncDecision::InSync, &a, &b), SyncDecision::InSync, "{disk}");
        }
    }

    #[test]
    fn other_decisions_are_kept() {
        let (a, b) = (side(8, DiskState::UpToDate), side(0, DiskState::UpToDate));
        for d in [SyncDecision::FullTarget, SyncDecision::BitmapTarget, SyncDecision::SplitBrain] {
            assert_eq!(resync_leftover_bits(d, &a, &b), d);
        }
    }

    fn arb_side() -> impl Strategy<Value = BitsHolder> {
        let disks = [DiskState::Inconsistent, DiskState::Outdated, DiskState::Consistent, DiskState::UpToDate];
        (0u64..3, prop::sample::select(disks.to_vec()), any::<bool>(), (0u64..2, 0u64..2, 0u64..2))
            .prop_map(|(bits_for_other, disk, is_primary, (term, epoch, fua))| BitsHolder {
                bits_for_other,
                disk,
                is_primary,
                position: (at(term, epoch, fua), 0),
            })
    }

    proptest! {
        #[test]
        fn both_sides_agree(a in arb_side(), b in arb_side()) {
            let b = BitsHolder { position: (b.position.0, 1), ..b };
            let from_a = resync_leftover_bits(SyncDecision::InSync, &a, &b);
            let from_b = resync_leftover_bits(SyncDecision::InSync, &b, &a);
            prop_assert_eq!(from_a, from_b.mirrored());
        }
    }
}
