//! A local write that failed. This node's copy of those blocks is then unknown (the old data,
//! the new, or a mix) while its peers may hold the new one, and an acknowledged write may live
//! on them only: a secondary's failure is answered with a `NegAck`, on which the primary drops
//! the link and completes the write without it, as after any link loss (the new generation the
//! primary then starts keeps this node from being elected without it).
//!
//! The blocks are marked out of sync for every data peer, so the next resync decision
//! with any of them repairs them, whichever side is the source. The disk stays UpToDate
//! elsewhere: making it Inconsistent would leave a primary that failed one write, holding the
//! only copy of its generation, with nobody to resync from.
//!
//! On an I/O error a primary fails every read and write from then on (it would serve those
//! blocks as if they were good; the disk may be dying) until it is demoted: `status` says why
//! (`local_write_failed`, until the demotion), the cluster manager moves the service as after a
//! crash, and the demoted node reconnects to its peers so the decision at connect resyncs the
//! blocks. DRBD's
//! `pass_on` keeps serving by reading such blocks from a peer, which this protocol has no frame
//! for. A write that found no space (ENOSPC: a full sparse file or thin pool) is no failing
//! disk: the primary keeps serving and the blocks wait for the next connect.

use super::Replica;
use crate::core::inflight::LocalFailure;
use crate::core::states::Role;

impl Replica {
    /// The local write of `len` bytes at `offset` failed with `failure`.
    pub(super) fn local_write_failed(&mut self, offset: u64, len: u64, failure: LocalFailure) {
        // In memory only: the write's extents are hot in the activity log until it is done,
        // and an extent's bitmap pages are written before it leaves the log (no metadata write
        // here, which a full disk would fail too).
        let slots: Vec<usize> = self.peers.iter().filter(|p| !p.witness).map(|p| p.slot).collect();
        for slot in slots {
            self.mark_out_of_sync(slot, offset, len);
        }
        if self.role != Role::Primary {
            tracing::error!(resource = %self.resource, ?failure, offset, len,
                "a replicated write failed here: the primary is told (NegAck) and resyncs these blocks");
            return;
        }
        if failure == LocalFailure::NoSpace {
            // A full backing store (a sparse file, a thin pool) is no failing disk: this
            // primary keeps serving, the write fails with ENOSPC, and the blocks wait for the
            // next resync decision (the peers may hold the write, this node not).
            tracing::warn!(resource = %self.resource, offset, len, "a local write found no space: the blocks are resynced at the next connect");
            return;
        }
        let why = format!("a local write at {offset}+{len} failed ({failure:?})");
        tracing::error!(resource = %self.resource, "{why}: this primary fails every request until it is demoted; the blocks are resynced from a peer then");
        self.io_failed.get_or_insert(why);
    }

    /// Demoted after a local write failed (`why`): the blocks it marked are resynced by
    /// deciding again at connect (bits left between two Established nodes are resynced only
    /// then, as after a verify), so its links to the data peers are dropped and dialed again.
    /// A secondary serves no request, so nothing is refused any more: `status` no longer
    /// reports the failure, the log keeps it.
    pub(super) fn resync_failed_writes(&mut self, why: &str) {
        tracing::warn!(resource = %self.resource, "demoted after {why}: reconnecting to the data peers, which resync those blocks into this node");
        let connected: Vec<u8> = self.peers.iter().filter(|p| p.connected && !p.witness).map(|p| p.node_id).collect();
        for peer_id in connected {
            self.drop_link(peer_id, "a local write failed while this node was primary: reconnecting to resync those blocks".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::core::inflight::{AckLevel, LocalFailure};
    use crate::core::states::DiskState;
    use crate::frontend::{BlockError, BlockRequest};
    use crate::replica::testing::{primary_replicating, secondary_of_primary};
    use crate::replica::{Action, IoTag};
    use crate::wire::Message;
    use bytes::Bytes;

    fn answers(actions: &[Action]) -> Vec<(u64, Option<BlockError>)> {
        actions.iter().filter_map(|a| match a {
            Action::Complete { request, result } => Some((*request, result.clone().err())),
            _ => None,
        }).collect()
    }

    #[test]
    fn a_primary_whose_write_failed_marks_it_for_every_peer_and_serves_nothing_until_demoted() {
        let (mut r, t0) = primary_replicating();
        let data = Bytes::from(vec![9u8; 4096]);
        r.submit(t0, 1, BlockRequest::Write { offset: 8192, data, fua: false }, |_| 0);
        let actions = r.take_actions();
        assert!(actions.iter().any(|a| matches!(a, Action::Send { msg: Message::Data { .. }, .. })), "the peer gets it");
        let id = actions.iter().find_map(|a| match a {
            Action::Io { tag: IoTag::Write(id), .. } => Some(*id),
            _ => None,
        }).expect("the local write");
        r.io_done(t0, IoTag::Write(id), Err(LocalFailure::Io));
        r.peer_reached(t0, id, 1, AckLevel::Written);
        let actions = r.take_actions();
        assert_eq!(answers(&actions), vec![(1, Some(BlockError::Io))]);
        assert!(r.bitmaps[0].test_block(2), "the peer holds what this node may not");
        assert_eq!(r.disk, DiskState::UpToDate, "its other blocks are good");
        assert!(r.io_failed.is_some());
        r.submit(t0, 2, BlockRequest::Read { offset: 0, len: 4096 }, |_| 0);
        r.submit(t0, 3, BlockRequest::Write { offset: 0, data: Bytes::from(vec![1u8; 4096]), fua: false }, |_| 0);
        let actions = r.take_actions();
        assert!(!actions.iter().any(|a| matches!(a, Action::Io { .. } | Action::Send { .. })), "{actions:?}");
        assert_eq!(answers(&actions), vec![(2, Some(BlockError::Io)), (3, Some(BlockError::Io))]);
        // Demoted, it reconnects: the decision at connect resyncs the marked blocks.
        r.begin_demotion(t0);
        r.take_actions();
        r.finish_demotion();
        assert!(r.take_actions().iter().any(|a| matches!(a, Action::DropLink { peer: 1, .. })));
        assert_eq!(r.io_failed, None, "a secondary refuses nothing: status no longer reports it");
        // A flush still runs: it makes the writes acknowledged before durable, and the
        // demotion's last flush tells the peers this node is no longer primary.
        r.submit(t0, 4, BlockRequest::Flush, |_| 0);
        assert!(r.take_actions().iter().any(|a| matches!(a, Action::Send { msg: Message::Barrier { .. }, .. })));
    }

    #[test]
    fn a_secondary_whose_write_failed_refuses_it_and_marks_it_for_every_peer() {
        let (mut r, t0) = secondary_of_primary();
        let generation = r.peer(1).generation;
        let data = Bytes::from(vec![9u8; 4096]);
        r.receive(t0, 1, generation, Message::Data { id: 7, epoch: 1, offset: 4096, fua: false, payload: data }).expect("in order");
        r.take_actions();
        r.io_done(t0, IoTag::Stream { peer: 1, generation, seq: 1 }, Err(LocalFailure::Io));
        let actions = r.take_actions();
        assert!(actions.iter().any(|a| matches!(a, Action::Send { msg: Message::NegAck { id: 7, .. }, .. })), "{actions:?}");
        assert!(r.bitmaps[0].test_block(1), "whichever side is the next source resyncs it");
    }
}
