//! Out-of-sync bits that survive into a connection between nodes whose generations agree.
//!
//! Equal current UUIDs end the decision table in "in sync", and nothing else would ever resync
//! blocks one node still has marked for the other. Such bits exist when an online verify found
//! blocks that differ: the verifying node marked them in its bitmap for the peer (the peer marked
//! itself Outdated), and the operator reconnects to repair them. At that connection the node
//! holding the bits becomes the source of a bitmap resync, so exactly those blocks flow, and the
//! peer ends UpToDate again.
//!
//! Both nodes evaluate this on the same inputs (each side's bitmap weight travels in `State`), so
//! they agree on the direction without another round trip.

use super::sync_decision::{SyncDecision, UuidView};

/// Turns an "in sync" decision into a bitmap resync when exactly one side holds out-of-sync
/// bits for the other and may be its source. `my_bits` is this node's bitmap weight for the peer,
/// `peer_bits` the peer's for this node. Bits on both sides leave the decision alone: which copy
/// is right is then the operator's call (`invalidate` on the node to overwrite).
pub fn resync_leftover_bits(decision: SyncDecision, me: &UuidView, my_bits: u64, peer: &UuidView, peer_bits: u64) -> SyncDecision {
    if decision != SyncDecision::InSync {
        return decision;
    }
    let may_send = |source: &UuidView, target: &UuidView| !source.inconsistent && !target.is_primary;
    match (my_bits > 0, peer_bits > 0) {
        (true, false) if may_send(me, peer) => SyncDecision::BitmapSource,
        (false, true) if may_send(peer, me) => SyncDecision::BitmapTarget,
        _ => decision,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn view(node_id: u8) -> UuidView {
        UuidView {
            node_id,
            current: 0x1230,
            bitmap_for_peer: 0,
            history: [0; 4],
            crashed_primary: false,
            is_primary: false,
            inconsistent: false,
        }
    }

    #[test]
    fn the_side_holding_bits_is_the_source() {
        let (a, b) = (view(0), view(1));
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &a, 1, &b, 0), SyncDecision::BitmapSource);
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &b, 0, &a, 1), SyncDecision::BitmapTarget);
    }

    #[test]
    fn no_bits_or_bits_on_both_sides_stay_in_sync() {
        let (a, b) = (view(0), view(1));
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &a, 0, &b, 0), SyncDecision::InSync);
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &a, 3, &b, 5), SyncDecision::InSync);
    }

    #[test]
    fn never_into_a_primary_nor_out_of_an_inconsistent_disk() {
        let (a, mut b) = (view(0), view(1));
        b.is_primary = true;
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &a, 8, &b, 0), SyncDecision::InSync);
        let (mut a, b) = (view(0), view(1));
        a.inconsistent = true;
        assert_eq!(resync_leftover_bits(SyncDecision::InSync, &a, 8, &b, 0), SyncDecision::InSync);
    }

    #[test]
    fn other_decisions_are_kept() {
        let (a, b) = (view(0), view(1));
        for d in [SyncDecision::FullTarget, SyncDecision::BitmapTarget, SyncDecision::SplitBrain] {
            assert_eq!(resync_leftover_bits(d, &a, 8, &b, 0), d);
        }
    }

    proptest! {
        #[test]
        fn both_sides_agree(
            a_flags in any::<(bool, bool)>(), b_flags in any::<(bool, bool)>(),
            a_bits in 0u64..3, b_bits in 0u64..3,
        ) {
            let (mut a, mut b) = (view(0), view(1));
            (a.is_primary, a.inconsistent) = a_flags;
            (b.is_primary, b.inconsistent) = b_flags;
            let from_a = resync_leftover_bits(SyncDecision::InSync, &a, a_bits, &b, b_bits);
            let from_b = resync_leftover_bits(SyncDecision::InSync, &b, b_bits, &a, a_bits);
            prop_assert_eq!(from_a, from_b.mirrored());
        }
    }
}
