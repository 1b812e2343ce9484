//! Switches that each weaken one replication rule, for the simulator's demonstrations that its
//! checkers catch what the rule prevents (`tests/replica_sim_weakened.rs`). The switches exist
//! only in builds with the `weakened-rules` feature; in every other build [`is_weakened`] is a
//! constant `false` and the branches it guards are compiled out.

/// A rule that can be weakened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// A primary reads and writes without quorum.
    IoWithoutQuorum,
    /// A primary that was superseded does not step down.
    NoStepDown,
    /// Two followers of one primary forget their bits for each other without a State saying
    /// so (the peer may wait for it for good).
    ForgetsBitsSilently,
    /// A resync block that changes what this node held is recorded for no other peer.
    ResyncRecordsForNobody,
    /// A secondary never flushes its disk: it acknowledges barriers, and lets extents leave its
    /// activity log, without a flush.
    SecondaryWithoutFlush,
    /// An online verify reads blocks a write in flight is still changing.
    VerifyBesideWrites,
    /// Writes that wait for room in a send queue wait for ever.
    RoomNeverMade,
    /// A primary's writes into cold extents start before their activity-log transaction is
    /// durable.
    WritesBeforeTheirLog,
    /// A device left behind by a daemon killed as primary serves again whatever data this node
    /// holds by then (only a primary seen, or a vote refused, gives it up).
    LeftBehindOnAnyData,
    /// Under protocol B a secondary acknowledges a write as received as it arrives, before it
    /// goes to the disk (a step still waiting then is dropped if the link goes).
    RecvAckOnArrival,
    /// A fresh node in sync with a node declared in sync decides on its State (a full sync
    /// into itself) instead of taking the declared generation from it.
    DeclarationNotPassedOn,
}

#[cfg(feature = "weakened-rules")]
thread_local! {
    static WEAKENED: std::cell::Cell<Option<Rule>> = const { std::cell::Cell::new(None) };
}

/// Weakens `rule` (`None`: no rule) for the replicas this thread runs.
#[cfg(feature = "weakened-rules")]
pub fn weaken(rule: Option<Rule>) {
    WEAKENED.with(|weakened| weakened.set(rule));
}

/// Whether `rule` is weakened for this thread's replicas.
#[inline]
pub(crate) fn is_weakened(rule: Rule) -> bool {
    #[cfg(feature = "weakened-rules")]
    return WEAKENED.with(|weakened| weakened.get() == Some(rule));
    #[cfg(not(feature = "weakened-rules"))]
    {
        let _ = rule;
        false
    }
}
