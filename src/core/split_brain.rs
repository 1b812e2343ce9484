//! After a split brain: which side's changes are dropped, by the resource's policies or by the
//! operator's `connect --discard-my-data`, or nobody's (disconnect and wait for the operator).
//!
//! Both nodes run [`resolve`] on the same two [`SbSide`]s from their own point of view; it is
//! antisymmetric, so they agree without another round trip. A side that is primary now is never
//! chosen as the victim: its data is live under a user, and overwriting it by resync would pull
//! the device out from under a mounted filesystem.

/// Policy when neither node is primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterSb0Pri {
    #[default]
    Disconnect,
    /// The side that changed nothing since the split loses; both changed: disconnect.
    DiscardZeroChanges,
    /// The side with fewer changed blocks loses.
    DiscardLeastChanges,
    /// The side that became primary after the split loses (the one primary at the split keeps).
    DiscardYoungerPrimary,
}

/// Policy when exactly one node is primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterSb1Pri {
    #[default]
    Disconnect,
    /// Apply the zero-primaries policy; accept its answer only if the secondary loses.
    Consensus,
    /// The secondary loses.
    DiscardSecondary,
}

/// Policy when both nodes are primary: always disconnect (either victim is live).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterSb2Pri {
    #[default]
    Disconnect,
}

impl AfterSb0Pri {
    pub fn parse(text: &str) -> Result<Self, String> {
        Ok(match text {
            "disconnect" => Self::Disconnect,
            "discard-zero-changes" => Self::DiscardZeroChanges,
            "discard-least-changes" => Self::DiscardLeastChanges,
            "discard-younger-primary" => Self::DiscardYoungerPrimary,
            other => return Err(format!(
                "\"{other}\" is not one of \"disconnect\", \"discard-zero-changes\", \"discard-least-changes\", \"discard-younger-primary\""
            )),
        })
    }
}

impl AfterSb1Pri {
    pub fn parse(text: &str) -> Result<Self, String> {
        Ok(match text {
            "disconnect" => Self::Disconnect,
            "consensus" => Self::Consensus,
            "discard-secondary" => Self::DiscardSecondary,
            other => return Err(format!("\"{other}\" is not one of \"disconnect\", \"consensus\", \"discard-secondary\"")),
        })
    }
}

impl AfterSb2Pri {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "disconnect" => Ok(Self::Disconnect),
            other => Err(format!(
                "\"{other}\": with two primaries the only policy is \"disconnect\" (either victim's data is live); demote one node and it is resolved by after_sb_0pri/1pri"
            )),
        }
    }
}

/// The three policies of a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SplitBrainPolicies {
    pub zero_primaries: AfterSb0Pri,
    pub one_primary: AfterSb1Pri,
    pub two_primaries: AfterSb2Pri,
}

impl SplitBrainPolicies {
    /// The first policy (key and value) that discards a side with changes, if any. Under
    /// quorum a split brain only comes from an override, and either side may hold writes that
    /// were acknowledged under quorum (the younger primary was promoted with quorum; a
    /// secondary may be an old primary that stepped down): such a policy would drop them. Only
    /// `disconnect` and `discard-zero-changes` (which drops nothing) are safe there.
    pub fn discarding_changes(&self) -> Option<(&'static str, &'static str)> {
        match (self.zero_primaries, self.one_primary) {
            (AfterSb0Pri::DiscardYoungerPrimary, _) => Some(("after_sb_0pri", "discard-younger-primary")),
            (AfterSb0Pri::DiscardLeastChanges, _) => Some(("after_sb_0pri", "discard-least-changes")),
            (_, AfterSb1Pri::DiscardSecondary) => Some(("after_sb_1pri", "discard-secondary")),
            _ => None,
        }
    }
}

/// One side of a split brain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SbSide {
    pub node_id: u8,
    pub is_primary: bool,
    /// It was primary when it started tracking changes for the other (bit 0 of its bitmap UUID).
    pub was_primary_at_split: bool,
    /// Blocks it changed since the split (its bitmap weight for the other).
    pub changed_blocks: u64,
    /// The operator asked this side to drop its changes (`connect --discard-my-data`).
    pub discard_my_data: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SbResolution {
    /// This node's changes are dropped: it becomes the resync target.
    DiscardMine,
    /// The peer's changes are dropped: this node is the resync source.
    DiscardTheirs,
    /// Nobody is dropped automatically; the reason says what the operator can do.
    Disconnect(&'static str),
}

impl SbResolution {
    fn mirrored(self) -> Self {
        match self {
            Self::DiscardMine => Self::DiscardTheirs,
            Self::DiscardTheirs => Self::DiscardMine,
            other => other,
        }
    }
}

/// Decides from `me`'s side. `resolve(p, a, b) == resolve(p, b, a).mirrored()`.
pub fn resolve(policies: &SplitBrainPolicies, me: &SbSide, peer: &SbSide) -> SbResolution {
    use SbResolution::*;
    let decided = match (me.discard_my_data, peer.discard_my_data) {
        (true, true) => return Disconnect("both nodes were told to discard their data: tell only the victim"),
        (true, false) => DiscardMine,
        (false, true) => DiscardTheirs,
        (false, false) => by_policy(policies, me, peer),
    };
    let victim_is_primary = match decided {
        DiscardMine => me.is_primary,
        DiscardTheirs => peer.is_primary,
        Disconnect(_) => false,
    };
    if victim_is_primary {
        return Disconnect("the node whose changes would be dropped is primary: demote it first");
    }
    decided
}

fn by_policy(policies: &SplitBrainPolicies, me: &SbSide, peer: &SbSide) -> SbResolution {
    use SbResolution::*;
    match (me.is_primary, peer.is_primary) {
        (false, false) => zero_primaries(policies.zero_primaries, me, peer),
        (true, true) => match policies.two_primaries {
            AfterSb2Pri::Disconnect => Disconnect("after_sb_2pri is disconnect"),
        },
        (true, false) => one_primary(policies, me, peer),
        (false, true) => one_primary(policies, peer, me).mirrored(),
    }
}

/// `me` is the primary.
fn one_primary(policies: &SplitBrainPolicies, me: &SbSide, peer: &SbSide) -> SbResolution {
    use SbResolution::*;
    match policies.one_primary {
        AfterSb1Pri::Disconnect => Disconnect("after_sb_1pri is disconnect"),
        AfterSb1Pri::DiscardSecondary => DiscardTheirs,
        AfterSb1Pri::Consensus => match zero_primaries(policies.zero_primaries, me, peer) {
            DiscardTheirs => DiscardTheirs,
            _ => Disconnect("after_sb_1pri is consensus and after_sb_0pri does not pick the secondary"),
        },
    }
}

fn zero_primaries(policy: AfterSb0Pri, me: &SbSide, peer: &SbSide) -> SbResolution {
    use SbResolution::*;
    match policy {
        AfterSb0Pri::Disconnect => Disconnect("after_sb_0pri is disconnect"),
        AfterSb0Pri::DiscardZeroChanges => match (me.changed_blocks == 0, peer.changed_blocks == 0) {
            (true, false) => DiscardMine,
            (false, true) => DiscardTheirs,
            (true, true) => by_node_id(me, peer),
            (false, false) => Disconnect("after_sb_0pri is discard-zero-changes and both nodes changed data"),
        },
        AfterSb0Pri::DiscardLeastChanges => least_changes(me, peer),
        AfterSb0Pri::DiscardYoungerPrimary => match (me.was_primary_at_split, peer.was_primary_at_split) {
            (true, false) => DiscardTheirs,
            (false, true) => DiscardMine,
            _ => least_changes(me, peer),
        },
    }
}

fn least_changes(me: &SbSide, peer: &SbSide) -> SbResolution {
    use std::cmp::Ordering::*;
    match me.changed_blocks.cmp(&peer.changed_blocks) {
        Less => SbResolution::DiscardMine,
        Greater => SbResolution::DiscardTheirs,
        Equal => by_node_id(me, peer),
    }
}

/// The fixed tiebreaker: the higher node id loses.
fn by_node_id(me: &SbSide, peer: &SbSide) -> SbResolution {
    if me.node_id > peer.node_id {
        SbResolution::DiscardMine
    } else {
        SbResolution::DiscardTheirs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn side(node_id: u8, changed_blocks: u64) -> SbSide {
        SbSide { node_id, is_primary: false, was_primary_at_split: false, changed_blocks, discard_my_data: false }
    }

    fn zero(policy: AfterSb0Pri) -> SplitBrainPolicies {
        SplitBrainPolicies { zero_primaries: policy, ..Default::default() }
    }

    #[test]
    fn default_policies_disconnect() {
        let r = resolve(&SplitBrainPolicies::default(), &side(1, 0), &side(2, 5));
        assert!(matches!(r, SbResolution::Disconnect(_)));
    }

    #[test]
    fn discard_zero_changes() {
        let p = zero(AfterSb0Pri::DiscardZeroChanges);
        assert_eq!(resolve(&p, &side(1, 0), &side(2, 5)), SbResolution::DiscardMine);
        assert_eq!(resolve(&p, &side(1, 3), &side(2, 0)), SbResolution::DiscardTheirs);
        assert!(matches!(resolve(&p, &side(1, 3), &side(2, 5)), SbResolution::Disconnect(_)));
    }

    #[test]
    fn discard_least_changes_with_node_id_tiebreak() {
        let p = zero(AfterSb0Pri::DiscardLeastChanges);
        assert_eq!(resolve(&p, &side(1, 2), &side(2, 5)), SbResolution::DiscardMine);
        assert_eq!(resolve(&p, &side(1, 5), &side(2, 5)), SbResolution::DiscardTheirs);
        assert_eq!(resolve(&p, &side(2, 5), &side(1, 5)), SbResolution::DiscardMine);
    }

    #[test]
    fn discard_younger_primary_keeps_the_one_primary_at_the_split() {
        let p = zero(AfterSb0Pri::DiscardYoungerPrimary);
        let old = SbSide { was_primary_at_split: true, ..side(2, 1) };
        assert_eq!(resolve(&p, &side(1, 100), &old), SbResolution::DiscardMine);
    }

    #[test]
    fn one_primary_policies_never_drop_the_primary() {
        let primary = SbSide { is_primary: true, ..side(1, 10) };
        let secondary = side(2, 50);
        let discard_secondary = SplitBrainPolicies { one_primary: AfterSb1Pri::DiscardSecondary, ..Default::default() };
        assert_eq!(resolve(&discard_secondary, &primary, &secondary), SbResolution::DiscardTheirs);
        let consensus = SplitBrainPolicies {
            zero_primaries: AfterSb0Pri::DiscardLeastChanges,
            one_primary: AfterSb1Pri::Consensus,
            ..Default::default()
        };
        // Least changes would drop the primary: no consensus.
        assert!(matches!(resolve(&consensus, &primary, &secondary), SbResolution::Disconnect(_)));
        assert_eq!(resolve(&consensus, &primary, &side(2, 3)), SbResolution::DiscardTheirs);
    }

    #[test]
    fn the_operator_chooses_the_victim_but_not_a_primary() {
        let victim = SbSide { discard_my_data: true, ..side(1, 1000) };
        assert_eq!(resolve(&SplitBrainPolicies::default(), &victim, &side(2, 1)), SbResolution::DiscardMine);
        let live = SbSide { is_primary: true, ..victim };
        assert!(matches!(resolve(&SplitBrainPolicies::default(), &live, &side(2, 1)), SbResolution::Disconnect(_)));
    }

    fn any_side(id: u8) -> impl Strategy<Value = SbSide> {
        (any::<bool>(), any::<bool>(), 0u64..4, any::<bool>()).prop_map(move |(p, w, c, d)| SbSide {
            node_id: id,
            is_primary: p,
            was_primary_at_split: w,
            changed_blocks: c,
            discard_my_data: d,
        })
    }

    fn any_policies() -> impl Strategy<Value = SplitBrainPolicies> {
        (0..4usize, 0..3usize).prop_map(|(z, o)| SplitBrainPolicies {
            zero_primaries: [
                AfterSb0Pri::Disconnect,
                AfterSb0Pri::DiscardZeroChanges,
                AfterSb0Pri::DiscardLeastChanges,
                AfterSb0Pri::DiscardYoungerPrimary,
            ][z],
            one_primary: [AfterSb1Pri::Disconnect, AfterSb1Pri::Consensus, AfterSb1Pri::DiscardSecondary][o],
            two_primaries: AfterSb2Pri::Disconnect,
        })
    }

    proptest! {
        /// Both nodes reach the same answer, and a primary is never the victim.
        #[test]
        fn both_sides_agree_and_primaries_survive(p in any_policies(), a in any_side(1), b in any_side(2)) {
            let mine = resolve(&p, &a, &b);
            prop_assert_eq!(mine, resolve(&p, &b, &a).mirrored());
            prop_assert!(!(mine == SbResolution::DiscardMine && a.is_primary));
            prop_assert!(!(mine == SbResolution::DiscardTheirs && b.is_primary));
        }
    }
}
