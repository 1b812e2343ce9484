//! Quorum: whether this node may become primary, and whether a primary may go on completing
//! writes, given which of the configured nodes it can hear right now.
//!
//! Every configured node votes, data nodes and diskless witnesses alike. A node counts itself
//! and each peer the caller deems reachable (connected, within the lease of an answered ping,
//! see [`LinkTiming::lease`], and holding a generation that lets it vote for this node). A peer that left
//! cleanly (`down` while connected) told us so and marked its own disk Outdated first; while
//! every other voter is reachable it stops counting, so the last node standing of an orderly
//! shutdown may still serve. A peer that vanished still counts as a voter: the partition it may
//! be in could hold the majority.
//!
//! Quorum alone does not make two primaries impossible: in a triangle whose A-B edge broke, A
//! and B can each reach the witness and both hold a majority. So each node also reports which
//! nodes it sees as primary, and nobody promotes while any reachable node reports another
//! primary ([`QuorumState::other_primary`]).

use super::states::{DiskState, Role};
use serde::Serialize;
use std::time::Duration;

/// How often a node pings each peer and how long it keeps a link it hears nothing on (the
/// resource's `ping_interval_ms` and `ping_timeout_ms`); the quorum lease follows from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkTiming {
    pub ping_interval: Duration,
    /// A link silent this long is dropped (a dead peer or a partition).
    pub ping_timeout: Duration,
    /// A peer that owes write or barrier acks and sends none for this long is dropped, though
    /// it still answers pings (a hung disk): its writes go to the bitmap, so a protocol-C
    /// primary never waits on it forever.
    pub stall_timeout: Duration,
}

impl LinkTiming {
    /// Failover after a silent partition within about `ping_timeout` (2 s).
    pub const DEFAULT: LinkTiming =
        LinkTiming {
            ping_interval: Duration::from_millis(500),
            ping_timeout: Duration::from_millis(2000),
            stall_timeout: Duration::from_secs(10),
        };

    /// The smallest `ping_timeout` for a given `ping_interval`: a lease of half the timeout
    /// must span two pings, so one late answer does not cost quorum.
    pub const TIMEOUT_PER_INTERVAL: u32 = 4;

    /// How long a primary (or a candidate) may rely on a peer's vote after the last ping that
    /// peer answered, counted from when this node *sent* that ping: half the ping timeout.
    ///
    /// Why an isolated primary always stops acknowledging before another node may promote:
    /// another node promotes only once no node it hears from reports this one as primary, so
    /// every voter this primary relied on must first have dropped its link, which happens a
    /// ping timeout after the voter last received anything from it. The ping whose answer
    /// renewed the lease was sent before that last reception, so the lease ends at least half
    /// a timeout before the earliest drop. That margin also absorbs clock-rate drift: the
    /// order holds as long as the two nodes' clocks run within a factor of 3 of each other's
    /// rate (lease x (1 + d) < timeout x (1 - d) for any drift d below 1/3).
    pub fn lease(&self) -> Duration {
        self.ping_timeout / 2
    }
}

/// The resource's `quorum` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuorumPolicy {
    /// No quorum: a node may promote alone. Split brain is then possible (and detected at
    /// reconnect); only sensible with fencing.
    Off,
    /// More than half of the voters that have not left cleanly.
    Majority,
    /// At least this many voters, this node included.
    Votes(u8),
}

impl std::fmt::Display for QuorumPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuorumPolicy::Off => f.write_str("off"),
            QuorumPolicy::Majority => f.write_str("majority"),
            QuorumPolicy::Votes(n) => write!(f, "{n}"),
        }
    }
}

/// The resource's `on_no_quorum` setting: what a primary does with writes while it has no
/// quorum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnNoQuorum {
    /// Hold completions (and new writes) until quorum returns or the node is demoted.
    SuspendIo,
    /// Fail writes with an I/O error at once.
    IoError,
}

/// Another configured node, as this node sees it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VoterView {
    pub node_id: u8,
    /// Connected and, for a primary's purposes, within the lease.
    pub reachable: bool,
    /// Left cleanly and is Outdated: not a voter until it returns.
    pub departed: bool,
    /// The nodes this peer reports as primary, one bit per node id (itself included); 0 when
    /// it cannot be heard from now.
    pub sees_primary: u32,
}

/// The outcome of [`evaluate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QuorumState {
    /// Voters this node can count, itself included.
    pub votes: u8,
    /// Voters there are (configured nodes minus those that left cleanly).
    pub voters: u8,
    /// Votes needed; 0 when quorum is off.
    pub needed: u8,
    pub has_quorum: bool,
    /// A reachable node reports this node (other than us) as primary.
    pub other_primary: Option<u8>,
}

/// Counts the votes. `peers` holds every other configured node.
pub fn evaluate(policy: QuorumPolicy, me: u8, peers: &[VoterView]) -> QuorumState {
    // Departed voters are discounted only while every other voter is reachable: nodes that saw
    // different departures must not count majorities of different voter sets on two sides of a
    // partition (the simulator found two primaries that way). An orderly shutdown, node by
    // node with the rest connected, still leaves the last one standing with quorum.
    let everyone_else_here = peers.iter().all(|p| p.departed || p.reachable);
    let counted = || peers.iter().filter(|p| !(p.departed && everyone_else_here));
    let voters = 1 + counted().count() as u8;
    let votes = 1 + counted().filter(|p| p.reachable).count() as u8;
    let needed = match policy {
        QuorumPolicy::Off => 0,
        QuorumPolicy::Majority => voters / 2 + 1,
        QuorumPolicy::Votes(n) => n,
    };
    // Every peer heard from counts here, vote or not: a witness that follows a newer primary
    // does not vote for this node, but its news of that primary matters all the more.
    let other_primary = peers
        .iter()
        .map(|p| p.sees_primary & !(1u32 << me))
        .find(|mask| *mask != 0)
        .map(|mask| mask.trailing_zeros() as u8);
    QuorumState { votes, voters, needed, has_quorum: votes >= needed, other_primary }
}

/// What a primary does with a write now (on arrival, and again at its completion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Proceed,
    /// Hold it: a new write before it reaches any disk, a write in flight by its completion.
    Hold,
    /// Fail it: no quorum under io-error, or another node was promoted meanwhile.
    Refuse,
}

/// Everything [`admission`] decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionInputs {
    pub policy: QuorumPolicy,
    pub on_no_quorum: OnNoQuorum,
    pub quorum: QuorumState,
    /// A connected node reports another primary and holds a generation this node does not
    /// know: evidence of a promotion past this node.
    pub newer_primary_seen: bool,
    /// This primary already learned it was superseded and stays primary, disconnected
    /// (`on_suspended_primary_outdated = "disconnect"`).
    pub superseded_latched: bool,
}

/// The rule for a primary's writes. With quorum it completes them, unless it still sees
/// another primary: then it holds them until that one (which cannot have quorum too: votes are
/// tied to generations) has stepped down, never failing them because of it. Without quorum it
/// was superseded if it sees a newer primary: nothing it holds can ever be acknowledged.
/// Otherwise `on_no_quorum` decides.
pub fn admission(i: &AdmissionInputs) -> Admission {
    if i.policy == QuorumPolicy::Off {
        return Admission::Proceed;
    }
    if i.superseded_latched {
        return Admission::Refuse;
    }
    match (i.quorum.has_quorum, i.quorum.other_primary.is_some()) {
        (true, false) => Admission::Proceed,
        (true, true) => Admission::Hold,
        (false, true) if i.newer_primary_seen => Admission::Refuse,
        (false, _) => match i.on_no_quorum {
            OnNoQuorum::SuspendIo => Admission::Hold,
            OnNoQuorum::IoError => Admission::Refuse,
        },
    }
}

/// Whether a primary was superseded: no quorum, and a newer primary seen. It then steps down
/// (or disconnects, per `on_suspended_primary_outdated`).
pub fn superseded(i: &AdmissionInputs) -> bool {
    i.policy != QuorumPolicy::Off && !i.quorum.has_quorum && i.newer_primary_seen
}

/// What this node knows that decides whether it may promote and how good a choice it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromotionInputs {
    pub role: Role,
    pub disk: DiskState,
    pub quorum: QuorumState,
    /// Every configured data peer is connected (so this node knows it is the newest).
    pub all_data_peers_known: bool,
    /// A connected peer has UpToDate data (this node could get it by resync).
    pub peer_up_to_date: bool,
}

impl PromotionInputs {
    /// Whether `primary` (without `--force`) would promote this node now (not already primary).
    pub fn may_promote(&self) -> bool {
        self.role != Role::Primary
            && self.quorum.has_quorum && self.quorum.other_primary.is_none() && self.disk == DiskState::UpToDate
    }

    /// The preference a cluster manager gives this node as primary (higher is better), in the
    /// scale Pacemaker's DRBD agents use: none without quorum or while another node is primary.
    pub fn promotion_score(&self) -> Option<u32> {
        if !self.quorum.has_quorum || self.quorum.other_primary.is_some() {
            return None;
        }
        match self.disk {
            _ if self.role == Role::Primary => Some(10_000),
            DiskState::UpToDate if self.all_data_peers_known => Some(10_000),
            DiskState::UpToDate => Some(1_000),
            _ if self.peer_up_to_date => Some(10),
            DiskState::Consistent => Some(0),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_table() {
        use Admission::*;
        use OnNoQuorum::*;
        let q = |has_quorum: bool, other: bool| QuorumState {
            votes: 0,
            voters: 3,
            needed: 2,
            has_quorum,
            other_primary: other.then_some(1),
        };
        // (quorum, other primary seen, newer primary seen, latched, on_no_quorum) -> admission, superseded
        let rows = [
            (true, false, false, false, SuspendIo, Proceed, false),
            (true, true, false, false, SuspendIo, Hold, false),
            (true, true, true, false, IoError, Hold, false),
            (false, false, false, false, SuspendIo, Hold, false),
            (false, false, false, false, IoError, Refuse, false),
            (false, true, false, false, SuspendIo, Hold, false),
            (false, true, true, false, SuspendIo, Refuse, true),
            (true, false, false, true, SuspendIo, Refuse, false),
        ];
        for (has, other, newer, latched, on_no_quorum, want, superseded_want) in rows {
            let i = AdmissionInputs {
                policy: QuorumPolicy::Majority,
                on_no_quorum,
                quorum: q(has, other),
                newer_primary_seen: newer,
                superseded_latched: latched,
            };
            assert_eq!(admission(&i), want, "{i:?}");
            assert_eq!(superseded(&i), superseded_want, "{i:?}");
            assert_eq!(admission(&AdmissionInputs { policy: QuorumPolicy::Off, ..i }), Proceed);
        }
    }
    use proptest::prelude::*;

    fn peer(node_id: u8, reachable: bool) -> VoterView {
        VoterView { node_id, reachable, departed: false, sees_primary: 0 }
    }

    #[test]
    fn two_nodes_need_both_under_majority() {
        let alone = evaluate(QuorumPolicy::Majority, 1, &[peer(2, false)]);
        assert_eq!((alone.votes, alone.voters, alone.needed, alone.has_quorum), (1, 2, 2, false));
        assert!(evaluate(QuorumPolicy::Majority, 1, &[peer(2, true)]).has_quorum);
    }

    #[test]
    fn a_witness_breaks_the_tie() {
        let q = evaluate(QuorumPolicy::Majority, 1, &[peer(2, false), peer(3, true)]);
        assert_eq!((q.votes, q.voters, q.needed, q.has_quorum), (2, 3, 2, true));
        assert!(!evaluate(QuorumPolicy::Majority, 1, &[peer(2, false), peer(3, false)]).has_quorum);
    }

    #[test]
    fn a_cleanly_departed_peer_stops_counting() {
        let departed = VoterView { departed: true, ..peer(2, false) };
        let q = evaluate(QuorumPolicy::Majority, 1, &[departed]);
        assert_eq!((q.votes, q.voters, q.needed, q.has_quorum), (1, 1, 1, true));
        // Of five, two left cleanly and the other two are here: three voters, all reachable.
        let peers = [VoterView { departed: true, ..peer(2, false) }, VoterView { departed: true, ..peer(3, false) }, peer(4, true), peer(5, true)];
        let q = evaluate(QuorumPolicy::Majority, 1, &peers);
        assert_eq!((q.votes, q.voters, q.needed, q.has_quorum), (3, 3, 2, true));
        // With a voter missing, departures are not discounted: two of five is no majority.
        let peers = [VoterView { departed: true, ..peer(2, false) }, VoterView { departed: true, ..peer(3, false) }, peer(4, true), peer(5, false)];
        let q = evaluate(QuorumPolicy::Majority, 1, &peers);
        assert_eq!((q.votes, q.voters, q.needed, q.has_quorum), (2, 5, 3, false));
    }

    #[test]
    fn fixed_vote_count_and_off() {
        let peers = [peer(2, true), peer(3, false), peer(4, false)];
        assert!(evaluate(QuorumPolicy::Votes(2), 1, &peers).has_quorum);
        assert!(!evaluate(QuorumPolicy::Votes(3), 1, &peers).has_quorum);
        let off = evaluate(QuorumPolicy::Off, 1, &[peer(2, false)]);
        assert!(off.has_quorum);
        assert_eq!(off.needed, 0);
    }

    #[test]
    fn a_primary_seen_through_a_witness_blocks_promotion() {
        // Node 1's link to node 2 broke; the witness (3) still sees 2 as primary.
        let peers = [peer(2, false), VoterView { sees_primary: 1 << 2, ..peer(3, true) }];
        let q = evaluate(QuorumPolicy::Majority, 1, &peers);
        assert!(q.has_quorum);
        assert_eq!(q.other_primary, Some(2));
        let inputs = PromotionInputs {
            role: Role::Secondary,
            disk: DiskState::UpToDate,
            quorum: q,
            all_data_peers_known: false,
            peer_up_to_date: false,
        };
        assert!(!inputs.may_promote());
        assert_eq!(inputs.promotion_score(), None);
        // Reports of this node itself as primary do not count against it.
        let peers = [peer(2, true), VoterView { sees_primary: 1 << 1, ..peer(3, true) }];
        assert_eq!(evaluate(QuorumPolicy::Majority, 1, &peers).other_primary, None);
    }

    #[test]
    fn promotion_scores_order_the_candidates() {
        let quorum = evaluate(QuorumPolicy::Majority, 1, &[peer(2, true), peer(3, true)]);
        let base = PromotionInputs { role: Role::Secondary, disk: DiskState::UpToDate, quorum, all_data_peers_known: true, peer_up_to_date: true };
        let score = |change: &dyn Fn(&mut PromotionInputs)| {
            let mut inputs = base;
            change(&mut inputs);
            inputs.promotion_score()
        };
        let known = score(&|_| {});
        let unknown = score(&|i| i.all_data_peers_known = false);
        let peer_only = score(&|i| i.disk = DiskState::Inconsistent);
        let consistent = score(&|i| {
            i.disk = DiskState::Consistent;
            i.peer_up_to_date = false;
        });
        assert!(known > unknown && unknown > peer_only && peer_only > consistent);
        assert_eq!(consistent, Some(0));
        assert_eq!(score(&|i| { i.disk = DiskState::Inconsistent; i.peer_up_to_date = false; }), None);
        assert_eq!(score(&|i| i.quorum.has_quorum = false), None);
        assert!(base.may_promote());
        let mut outdated = base;
        outdated.disk = DiskState::Outdated;
        assert!(!outdated.may_promote());
        let primary = PromotionInputs { role: Role::Primary, ..base };
        assert!(!primary.may_promote(), "already primary");
        assert_eq!(primary.promotion_score(), Some(10_000), "kept where it is");
    }

    proptest! {
        /// Two disjoint groups of nodes (a partition) can never both hold a majority.
        #[test]
        fn two_sides_of_a_partition_never_both_have_a_majority(nodes in 2u8..=9, split in 0u32..512, departed in 0u32..512) {
            let side = |n: u8| split & (1 << n) != 0;
            let gone = |n: u8| departed & (1 << n) != 0 && n != 0 && n != 1;
            let view = |me: u8| -> QuorumState {
                let peers: Vec<VoterView> = (0..nodes).filter(|n| *n != me).map(|n| VoterView {
                    node_id: n,
                    reachable: side(n) == side(me) && !gone(n),
                    departed: gone(n),
                    sees_primary: 0,
                }).collect();
                evaluate(QuorumPolicy::Majority, me, &peers)
            };
            // Node 0 and node 1 are on opposite sides when their bits differ.
            if side(0) != side(1) {
                prop_assert!(!(view(0).has_quorum && view(1).has_quorum));
            }
        }
    }
}
