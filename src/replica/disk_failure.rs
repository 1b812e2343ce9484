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
//! blocks as if they were good; the disk may be dying), a read already submitted included
//! (it may read what a lost cache left behind), and reads nothing more for a resync it
//! sources (`Replica::resync_next`), until it is demoted: `status` says why
//! (`local_write_failed`, until the demotion), the cluster manager moves the service as after a
//! crash, and the demoted node reconnects to its peers so the decision at connect resyncs the
//! blocks. DRBD's
//! `pass_on` keeps serving by reading such blocks from a peer, which this protocol has no frame
//! for. A write that found no space (ENOSPC: a full sparse file or thin pool) is no failing
//! disk: the primary keeps serving, and drops its links to the data peers, which may hold the
//! write, so that the decision at the reconnect resyncs the blocks (bits left between two
//! Established nodes are resynced only at a connect; without it the copies stayed different
//! for as long as the link held: simulator seed 1587 with ENOSPC injected).
//!
//! A metadata write that fails (EIO, or ENOSPC from a thin pool) detaches the disk, as DRBD's
//! `on-io-error detach` does: see [`Replica::detach`].

use super::{extent_range, Replica};
use crate::meta::MetaFlags;
use crate::core::inflight::LocalFailure;
use crate::core::states::DiskState;

/// Why a detached node drops its links and refuses new ones.
pub const DETACHED: &str = "this node's disk failed (a metadata write): it takes no part until `blkrepl down` and `up`";

impl Replica {
    /// The local write of `len` bytes at `offset` failed with `failure`.
    pub(super) fn local_write_failed(&mut self, offset: u64, len: u64, failure: LocalFailure) {
        // In memory only: the write's extents are hot in the activity log until it is done,
        // and an extent's bitmap pages are written before it leaves the log (no metadata write
        // here, which a full disk would fail too).
        self.mark_for_every_data_peer(offset, len);
        if !self.answers_as_primary() {
            tracing::error!(resource = %self.resource, ?failure, offset, len,
                "a replicated write failed here: the primary is told (NegAck) and resyncs these blocks");
            return;
        }
        if failure == LocalFailure::NoSpace {
            // A full backing store (a sparse file, a thin pool) is no failing disk: this
            // primary keeps serving, the write fails with ENOSPC, and the blocks wait for the
            // next resync decision (the peers may hold the write, this node not).
            tracing::warn!(resource = %self.resource, offset, len, "a local write found no space: reconnecting to the data peers to resync the blocks");
            self.reconnect_data_peers("a local write on the primary found no space: reconnecting to resync the blocks the peers may hold");
            return;
        }
        self.disk_failing(format!("a local write at {offset}+{len} failed ({failure:?})"));
    }

    /// A flush of the data disk (a FLUSH request on this primary) failed with `failure`: what
    /// the disk's cache held, the writes completed since its last flush, may never reach the
    /// medium or may already be gone, while the peers hold them. Every such write lies in an
    /// extent hot in the activity log (an extent leaves it only after a flush, see
    /// `Replica::commit_al`): the hot extents are marked for every data peer, and the disk is
    /// failing as after a failed write, whatever the errno (a cache that could not be written
    /// for want of space is lost all the same). A secondary's failed flush is a barrier's:
    /// it drops the link (`barrier_flushed`), and its primary keeps the epoch's writes marked.
    /// Every later FLUSH on this primary fails too (`cache_lost`): it cannot make durable what
    /// the failed one lost.
    pub(super) fn local_flush_failed(&mut self, failure: LocalFailure) {
        let data_size = self.sb.data_size;
        for extent in self.al.hot_extents() {
            let (offset, len) = extent_range(extent, data_size);
            self.mark_for_every_data_peer(offset, len);
        }
        // The page cache may have dropped writes of this node's stream: after a crash it is not
        // to count as holding all of it (see `Replica::position_after_crash`). Made durable by
        // the next superblock write (the demotion's at the latest), not one of its own: on a
        // disk that fails its writes too, that write would fail and detach the node, which
        // then could not serve again after its demotion.
        self.sb.flags.remove(MetaFlags::OWN_STREAM);
        if self.answers_as_primary() {
            // Demoting too: the flushes still to complete are its own (seed 25368).
            self.cache_lost = true;
            self.disk_failing(format!("a flush of the data disk failed ({failure:?})"));
        }
    }

    /// The data of `[offset, offset + len)` here is unknown: whichever side is the source of
    /// the next resync with any data peer repairs it.
    fn mark_for_every_data_peer(&mut self, offset: u64, len: u64) {
        let slots: Vec<usize> = self.peers.iter().filter(|p| !p.witness).map(|p| p.slot).collect();
        for slot in slots {
            self.mark_out_of_sync(slot, offset, len);
        }
    }

    /// A metadata write failed (`why`), or the activity log cannot be written at attach: the
    /// metadata no longer follows what this node knows, and another write would make it
    /// inconsistent (a later activity-log transaction behind a lost one is a hole in the ring,
    /// which the next attach refuses as corrupt). So the disk is Failed and written no more,
    /// neither metadata (`Replica::persist`) nor data: what is on it stays as the last
    /// successful write left it, which the next attach recovers exactly as after a crash.
    /// The node drops every link and takes none until `down` and `up` (`Replica::link_refusal`):
    /// it can neither receive a stream nor be resynced, and its peers, witnesses included,
    /// must see it gone so that they elect a primary without it. A primary fails every request
    /// until it is demoted (no read from a peer: the protocol has no frame for it), as after a
    /// failed data write. It fences nobody (`Replica::fence_lost_peer` needs an UpToDate disk):
    /// the peers hold the good copies.
    pub(super) fn detach(&mut self, why: String) {
        tracing::error!(resource = %self.resource, "{why}: the disk is Failed; this node drops its links and takes no part until `down` and `up`");
        self.disk = DiskState::Failed;
        if self.answers_as_primary() {
            self.io_failed.get_or_insert(why);
        }
        let connected: Vec<u8> = self.peers.iter().filter(|p| p.connected).map(|p| p.node_id).collect();
        for peer_id in connected {
            self.drop_link(peer_id, DETACHED.into());
        }
        // The streams stop here, not when the driver has taken the links down: what waits in
        // them (a step behind one still running, a barrier's flush) would reach the failed disk
        // (simulator seeds 42077 and 64601: a barrier's flush asked for by the I/O failed
        // behind the metadata write).
        for peer in &mut self.peers {
            peer.applying.link_down();
        }
    }

    /// This primary's disk failed (`why`): every request fails until it is demoted.
    fn disk_failing(&mut self, why: String) {
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
        self.reconnect_data_peers("this node's disk failed while it was primary: reconnecting to resync the blocks it may lack");
    }

    /// Drops the links to the connected data peers with `reason`: they are dialed again, and
    /// the decision at that connect resyncs the blocks marked meanwhile.
    fn reconnect_data_peers(&mut self, reason: &str) {
        let connected: Vec<u8> = self.peers.iter().filter(|p| p.connected && !p.witness).map(|p| p.node_id).collect();
        for peer_id in connected {
            self.drop_link(peer_id, reason.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::core::inflight::{AckLevel, LocalFailure};
    use crate::core::states::DiskState;
    use crate::frontend::{BlockError, BlockRequest};
    use crate::replica::testing::{primary_replicating, secondary_of_primary, settled};
    use crate::meta::MetaFlags;
    use crate::replica::{Action, IoTag, Replica, ResyncChunk, ResyncStep};
    use crate::wire::{DigestPurpose, Message, DIGEST_BYTES};
    use bytes::Bytes;
    use std::time::Instant;

    fn answers(actions: &[Action]) -> Vec<(u64, Option<BlockError>)> {
        actions.iter().filter_map(|a| match a {
            Action::Complete { request, result } => Some((*request, result.clone().err())),
            _ => None,
        }).collect()
    }

    /// A primary that started resyncing its peer, the source of the block at `offset` only.
    fn primary_resyncing(offset: u64) -> (Replica, Instant) {
        let (mut r, t0) = primary_replicating();
        r.peer_mut(1).repl = crate::core::states::ReplState::SyncSource;
        r.bitmaps[0].set_range(offset, 4096);
        r.resync_source_started(t0, 1);
        r.take_actions();
        (r, t0)
    }

    /// Submits FLUSH request `request` on `r`: the tag of its local flush.
    fn submit_flush(r: &mut Replica, t0: Instant, request: u64) -> IoTag {
        r.submit(t0, request, BlockRequest::Flush, |_| 0);
        r.take_actions().iter().find_map(|a| match a {
            Action::Io { tag: tag @ IoTag::Flush(_), .. } => Some(*tag),
            _ => None,
        }).expect("the local flush")
    }

    /// Writes block 2 on primary `r`, which replicates it to its peer, and fails the local
    /// write with `failure` once the peer has it: what the primary does then.
    fn write_failing_here(r: &mut Replica, t0: Instant, failure: LocalFailure) -> Vec<Action> {
        r.submit(t0, 1, BlockRequest::Write { offset: 8192, data: Bytes::from(vec![9u8; 4096]), fua: false }, |_| 0);
        let actions = settled(r);
        assert!(actions.iter().any(|a| matches!(a, Action::Send { msg: Message::Data { .. }, .. })), "the peer gets it");
        let id = actions.iter().find_map(|a| match a {
            Action::Io { tag: IoTag::Write(id), .. } => Some(*id),
            _ => None,
        }).expect("the local write");
        r.io_done(t0, IoTag::Write(id), Err(failure));
        r.peer_reached(t0, id, 1, AckLevel::Written);
        r.take_actions()
    }

    #[test]
    fn a_primary_whose_write_failed_marks_it_for_every_peer_and_serves_nothing_until_demoted() {
        let (mut r, t0) = primary_replicating();
        let actions = write_failing_here(&mut r, t0, LocalFailure::Io);
        assert_eq!(answers(&actions), vec![(1, Some(BlockError::Io))]);
        assert!(r.bitmaps[0].test_block(2), "the peer holds what this node may not");
        assert_eq!(r.disk, DiskState::UpToDate, "its other blocks are good");
        assert!(r.io_failed.is_some());
        r.submit(t0, 2, BlockRequest::Read { offset: 0, len: 4096 }, |_| 0);
        r.submit(t0, 3, BlockRequest::Write { offset: 0, data: Bytes::from(vec![1u8; 4096]), fua: false }, |_| 0);
        let actions = settled(&mut r);
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
    fn a_primary_whose_write_failed_reads_nothing_more_for_the_peer_it_resyncs() {
        let (mut r, t0) = primary_resyncing(64 * 4096);
        let actions = write_failing_here(&mut r, t0, LocalFailure::Io);
        assert_eq!(answers(&actions), vec![(1, Some(BlockError::Io))], "the write is over");
        assert!(r.bitmaps[0].test_block(2), "marked for the target too");
        // Neither the failed block (the target holds the newer copy from the stream) nor any
        // other is read from the failing disk, and the resync does not end.
        assert_eq!(r.resync_next(t0, 1, false), crate::replica::ResyncStep::Wait);
        assert!(!r.take_actions().iter().any(|a| matches!(a, Action::Send { msg: Message::ResyncDone { .. }, .. })));
        assert!(r.bitmaps[0].test_block(2) && r.bitmaps[0].test_block(64), "both wait for the decision at the reconnect");
    }

    #[test]
    fn a_resync_chunk_read_before_a_flush_failed_is_not_sent() {
        let (mut r, t0) = primary_resyncing(64 * 4096);
        assert_eq!(r.resync_next(t0, 1, false), ResyncStep::Read { offset: 64 * 4096, len: 4096, digests: false });
        let flush = submit_flush(&mut r, t0, 1);
        r.io_done(t0, flush, Err(LocalFailure::Io));
        r.take_actions();
        // The daemon read the chunk off the lock, after the flush lost the disk's cache.
        r.resync_chunk_read(1, 64 * 4096, 4096, ResyncChunk::Data(Bytes::from(vec![0u8; 4096])));
        let actions = r.take_actions();
        assert!(!actions.iter().any(|a| matches!(a, Action::Send { msg: Message::ResyncData { .. } | Message::ResyncZeroes { .. }, .. })), "{actions:?}");
        assert!(r.bitmaps[0].test_block(64), "the block waits for the decision at the reconnect");
    }

    #[test]
    fn a_digest_found_equal_after_the_write_there_failed_clears_no_bit() {
        let (mut r, t0) = primary_resyncing(8192);
        let read = ResyncStep::Read { offset: 8192, len: 4096, digests: true };
        assert_eq!(r.resync_next(t0, 1, true), read);
        r.resync_chunk_read(1, 8192, 4096, ResyncChunk::Digests(vec![[0; DIGEST_BYTES]]));
        // The block's digest is on its way when a write to it fails here: the peer holds the
        // write (it got it in the stream after the digest request), this node may not.
        write_failing_here(&mut r, t0, LocalFailure::Io);
        assert!(r.bitmaps[0].test_block(2));
        // The peer found its copy equal to what this node had read, before the write.
        let generation = r.peer(1).generation;
        let reply = Message::DigestReply { purpose: DigestPurpose::Resync, offset: 8192, blocks: 1, differing: vec![] };
        r.receive(t0, 1, generation, reply).expect("the answer awaited");
        let epoch = r.close_epoch();
        r.barrier_acked(t0, 1, epoch);
        assert!(r.bitmaps[0].test_block(2), "the block stays marked for the decision at the reconnect");
    }

    #[test]
    fn a_flush_released_by_the_links_a_metadata_failure_drops_fails() {
        let (mut r, t0) = primary_replicating();
        let flush = submit_flush(&mut r, t0, 1);
        r.io_done(t0, flush, Ok(None));
        assert_eq!(answers(&r.take_actions()), vec![], "the peer's barrier is still to be acknowledged");
        r.persist_failed(t0, crate::replica::MetaWrite::Superblock, "No space left on device", Vec::new());
        assert!(r.detached());
        assert!(r.take_actions().iter().any(|a| matches!(a, Action::DropLink { peer: 1, .. })));
        // The driver takes the link down: the flush waits for nothing more, and the peer,
        // which may lack what it covers, could be elected next.
        r.peer_lost(t0, 1, "this node's disk failed", 0);
        assert_eq!(answers(&r.take_actions()), vec![(1, Some(BlockError::Io))]);
    }

    #[test]
    fn a_primary_whose_write_found_no_space_keeps_serving_and_reconnects_to_resync_the_blocks() {
        let (mut r, t0) = primary_replicating();
        let actions = write_failing_here(&mut r, t0, LocalFailure::NoSpace);
        assert_eq!(answers(&actions), vec![(1, Some(BlockError::NoSpace))]);
        assert!(r.bitmaps[0].test_block(2), "the peer may hold what this node does not");
        assert!(
            actions.iter().any(|a| matches!(a, Action::DropLink { peer: 1, reason, .. } if reason.contains("no space"))),
            "the link is dropped, so the decision at the reconnect resyncs the block: {actions:?}"
        );
        assert_eq!(r.io_failed, None, "no failing disk: the primary keeps serving");
        r.submit(t0, 2, BlockRequest::Read { offset: 0, len: 4096 }, |_| 0);
        assert!(r.take_actions().iter().any(|a| matches!(a, Action::Io { .. })), "reads go on");
    }

    #[test]
    fn a_failed_flush_marks_every_hot_extent_for_every_peer_and_the_primary_serves_nothing() {
        let (mut r, t0) = primary_replicating();
        r.sb.flags.insert(MetaFlags::OWN_STREAM);
        let data = Bytes::from(vec![9u8; 4096]);
        r.submit(t0, 1, BlockRequest::Write { offset: 8192, data, fua: false }, |_| 0);
        let id = settled(&mut r).iter().find_map(|a| match a {
            Action::Io { tag: IoTag::Write(id), .. } => Some(*id),
            _ => None,
        }).expect("the local write");
        r.io_done(t0, IoTag::Write(id), Ok(None));
        r.peer_reached(t0, id, 1, AckLevel::Written);
        assert_eq!(answers(&r.take_actions()), vec![(1, None)], "acknowledged, in the disk's cache");
        assert!(!r.bitmaps[0].test_block(2));
        let flush = submit_flush(&mut r, t0, 2);
        r.io_done(t0, flush, Err(LocalFailure::Io));
        assert!(!r.sb.flags.contains(MetaFlags::OWN_STREAM), "after a crash it must not count as holding its whole stream");
        let extent_blocks = crate::meta::activity_log::AL_EXTENT_SIZE / 4096;
        assert!(r.bitmaps[0].test_block(2) && r.bitmaps[0].test_block(extent_blocks - 1), "the write's whole extent");
        assert!(!r.bitmaps[0].test_block(extent_blocks), "not a cold one");
        assert!(r.io_failed.as_deref().is_some_and(|why| why.contains("flush")), "{:?}", r.io_failed);
        r.submit(t0, 3, BlockRequest::Read { offset: 8192, len: 4096 }, |_| 0);
        assert_eq!(answers(&r.take_actions()), vec![(3, Some(BlockError::Io))], "its cache may have lost the write");
        // A later flush succeeds on the disk, but cannot bring back what the failed one lost.
        r.submit(t0, 4, BlockRequest::Flush, |_| 0);
        let actions = r.take_actions();
        let (flush, epoch) = actions.iter().find_map(|a| match a {
            Action::Io { tag: tag @ IoTag::Flush(_), .. } => Some(*tag),
            _ => None,
        }).zip(actions.iter().find_map(|a| match a {
            Action::Send { msg: Message::Barrier { epoch, .. }, .. } => Some(*epoch),
            _ => None,
        })).expect("the local flush and the peer's barrier");
        r.io_done(t0, flush, Ok(None));
        r.barrier_acked(t0, 1, epoch);
        let actions = r.take_actions();
        assert!(answers(&actions).contains(&(4, Some(BlockError::Io))), "{actions:?}");
    }

    #[test]
    fn a_read_under_way_when_a_flush_fails_fails_too() {
        let (mut r, t0) = primary_replicating();
        let flush = submit_flush(&mut r, t0, 1);
        r.submit(t0, 2, BlockRequest::Read { offset: 8192, len: 4096 }, |_| 0);
        let read = r.take_actions().iter().find_map(|a| match a {
            Action::Io { tag: tag @ IoTag::Read(_), .. } => Some(*tag),
            _ => None,
        }).expect("the read goes to the disk");
        r.io_done(t0, flush, Err(LocalFailure::Io));
        r.take_actions();
        // The read reached the disk after the flush lost its cache: it found the old data.
        r.io_done(t0, read, Ok(Some(Bytes::from(vec![0u8; 4096]))));
        assert_eq!(answers(&r.take_actions()), vec![(2, Some(BlockError::Io))]);
    }

    #[test]
    fn a_secondary_whose_write_failed_refuses_it_and_marks_it_for_every_peer() {
        let (mut r, t0) = secondary_of_primary();
        let generation = r.peer(1).generation;
        let data = Bytes::from(vec![9u8; 4096]);
        r.receive(t0, 1, generation, Message::Data { id: 7, epoch: 1, offset: 4096, fua: false, payload: data }).expect("in order");
        settled(&mut r);
        r.io_done(t0, IoTag::Stream { peer: 1, generation, seq: 1 }, Err(LocalFailure::Io));
        let actions = r.take_actions();
        assert!(actions.iter().any(|a| matches!(a, Action::Send { msg: Message::NegAck { id: 7, .. }, .. })), "{actions:?}");
        assert!(r.bitmaps[0].test_block(1), "whichever side is the next source resyncs it");
    }
}
