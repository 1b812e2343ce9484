//! Writes in flight on the primary: when each may complete upward, and which may not start yet.
//!
//! A write completes when the local disk has it and every peer it was sent to has reached the
//! acknowledgement level the protocol asks for. Two overlapping writes must land in the same
//! order on every replica, so a write that overlaps one still in flight waits (see
//! [`InflightWrites::overlaps`]).

use std::collections::BTreeMap;

/// How far a peer must have taken a write before it counts as done there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AckLevel {
    /// Handed to the connection (protocol A).
    Sent,
    /// The peer received it (protocol B, `RecvAck`).
    Received,
    /// The peer's disk write completed (protocol C, and any FUA write: `WriteAck`).
    Written,
}

/// Bit set of peer node ids (ids are at most 31).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerSet(u32);

impl PeerSet {
    pub fn insert(&mut self, node_id: u8) {
        self.0 |= 1 << node_id;
    }
    pub fn remove(&mut self, node_id: u8) -> bool {
        let had = self.contains(node_id);
        self.0 &= !(1 << node_id);
        had
    }
    pub fn contains(self, node_id: u8) -> bool {
        self.0 & (1 << node_id) != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn len(self) -> u32 {
        self.0.count_ones()
    }
}

/// Why the local part of a write failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalFailure {
    Io,
    NoSpace,
}

impl LocalFailure {
    /// The errno a NegAck carries for it.
    pub fn errno(self) -> u32 {
        match self {
            LocalFailure::Io => 5,       // EIO
            LocalFailure::NoSpace => 28, // ENOSPC
        }
    }

    /// How a failed disk syscall counts.
    pub fn of(error: &std::io::Error) -> LocalFailure {
        if error.kind() == std::io::ErrorKind::StorageFull {
            LocalFailure::NoSpace
        } else {
            LocalFailure::Io
        }
    }
}

#[derive(Debug)]
struct Inflight {
    offset: u64,
    len: u64,
    level: AckLevel,
    local_pending: bool,
    local_failure: Option<LocalFailure>,
    peers_pending: PeerSet,
}

/// Outcome of a write whose last pending part just finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub id: u64,
    pub offset: u64,
    pub len: u64,
    /// The local write failed: the request fails upward.
    pub local_failure: Option<LocalFailure>,
}

/// Keyed by id in a `BTreeMap`, not a `HashMap`: [`peer_lost`](Self::peer_lost) hands back
/// the writes it finishes in id (submission) order, so the requests they complete are answered
/// in the same order on every run. A hash map's order changes from process to process, which
/// made a simulator seed replay differently from one run to the next.
#[derive(Debug, Default)]
pub struct InflightWrites {
    writes: BTreeMap<u64, Inflight>,
    next_id: u64,
}

impl InflightWrites {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.writes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Whether `[offset, offset+len)` intersects a write still in flight.
    pub fn overlaps(&self, offset: u64, len: u64) -> bool {
        self.writes.values().any(|w| offset < w.offset + w.len && w.offset < offset + len)
    }

    /// The range of write `id`, while it is in flight.
    pub fn range(&self, id: u64) -> Option<(u64, u64)> {
        self.writes.get(&id).map(|w| (w.offset, w.len))
    }

    /// Registers a write that waits for the local disk and for `peers` to reach `level`.
    pub fn start(&mut self, offset: u64, len: u64, level: AckLevel, peers: PeerSet) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        self.writes.insert(
            id,
            Inflight { offset, len, level, local_pending: true, local_failure: None, peers_pending: peers },
        );
        id
    }

    pub fn local_done(&mut self, id: u64, result: Result<(), LocalFailure>) -> Option<Finished> {
        let write = self.writes.get_mut(&id)?;
        write.local_pending = false;
        write.local_failure = result.err();
        self.finish_if_done(id)
    }

    /// `peer` reached `level` for write `id` (a stale or duplicate ack is ignored).
    pub fn peer_reached(&mut self, id: u64, peer: u8, level: AckLevel) -> Option<Finished> {
        let write = self.writes.get_mut(&id)?;
        if level < write.level || !write.peers_pending.remove(peer) {
            return None;
        }
        self.finish_if_done(id)
    }

    /// `peer` is gone: nothing more will come from it. Returns the writes that now finish; the
    /// caller records every affected range in that peer's bitmap (see `pending_for`).
    pub fn peer_lost(&mut self, peer: u8) -> Vec<Finished> {
        let ids: Vec<u64> =
            self.writes.iter().filter(|(_, w)| w.peers_pending.contains(peer)).map(|(id, _)| *id).collect();
        ids.into_iter()
            .filter_map(|id| {
                self.writes.get_mut(&id)?.peers_pending.remove(peer);
                self.finish_if_done(id)
            })
            .collect()
    }

    /// Whether any write waits for `peer`.
    pub fn waits_for(&self, peer: u8) -> bool {
        self.writes.values().any(|w| w.peers_pending.contains(peer))
    }

    /// Ranges still waiting for `peer`.
    pub fn pending_for(&self, peer: u8) -> Vec<(u64, u64)> {
        self.writes.values().filter(|w| w.peers_pending.contains(peer)).map(|w| (w.offset, w.len)).collect()
    }

    fn finish_if_done(&mut self, id: u64) -> Option<Finished> {
        let write = &self.writes[&id];
        if write.local_pending || !write.peers_pending.is_empty() {
            return None;
        }
        let write = self.writes.remove(&id)?;
        Some(Finished { id, offset: write.offset, len: write.len, local_failure: write.local_failure })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(ids: &[u8]) -> PeerSet {
        let mut set = PeerSet::default();
        ids.iter().for_each(|id| set.insert(*id));
        set
    }

    #[test]
    fn a_lost_peer_finishes_its_writes_in_submission_order() {
        let mut w = InflightWrites::new();
        let ids: Vec<u64> = (0..64).map(|i| w.start(i * 4096, 4096, AckLevel::Written, peers(&[1]))).collect();
        for id in &ids {
            assert_eq!(w.local_done(*id, Ok(())), None);
        }
        let finished: Vec<u64> = w.peer_lost(1).iter().map(|f| f.id).collect();
        assert_eq!(finished, ids, "answered in the order they were submitted, the same on every run");
        assert!(w.is_empty());
    }

    #[test]
    fn protocol_c_waits_for_local_and_peer_write() {
        let mut w = InflightWrites::new();
        let id = w.start(0, 4096, AckLevel::Written, peers(&[1]));
        assert_eq!(w.peer_reached(id, 1, AckLevel::Received), None, "B-level ack is not enough for C");
        assert_eq!(w.local_done(id, Ok(())), None);
        let done = w.peer_reached(id, 1, AckLevel::Written).expect("finished");
        assert_eq!(done.local_failure, None);
        assert!(w.is_empty());
    }

    #[test]
    fn protocol_a_completes_when_sent() {
        let mut w = InflightWrites::new();
        let id = w.start(0, 4096, AckLevel::Sent, peers(&[1, 2]));
        assert_eq!(w.peer_reached(id, 1, AckLevel::Sent), None);
        assert_eq!(w.peer_reached(id, 2, AckLevel::Written), None);
        assert!(w.local_done(id, Ok(())).is_some());
    }

    #[test]
    fn overlap_detection_is_exact_at_the_edges() {
        let mut w = InflightWrites::new();
        w.start(8192, 4096, AckLevel::Written, peers(&[]));
        assert!(!w.overlaps(4096, 4096));
        assert!(!w.overlaps(12288, 4096));
        assert!(w.overlaps(12287, 2));
        assert!(w.overlaps(0, 1 << 20));
    }

    #[test]
    fn losing_a_peer_finishes_writes_waiting_only_for_it() {
        let mut w = InflightWrites::new();
        let a = w.start(0, 4096, AckLevel::Written, peers(&[1]));
        let b = w.start(4096, 4096, AckLevel::Written, peers(&[1]));
        w.local_done(a, Ok(()));
        assert_eq!(w.pending_for(1).len(), 2);
        let finished = w.peer_lost(1);
        assert_eq!(finished.iter().map(|f| f.id).collect::<Vec<_>>(), vec![a]);
        assert_eq!(w.local_done(b, Err(LocalFailure::NoSpace)).map(|f| f.local_failure), Some(Some(LocalFailure::NoSpace)));
        assert_eq!(w.peer_reached(a, 1, AckLevel::Written), None, "late ack after loss is ignored");
    }
}
