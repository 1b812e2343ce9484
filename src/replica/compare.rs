//! Digest comparisons: online verify and checksum-based resync. The requesting node sends the
//! digests of a run of blocks; the peer compares them with its own blocks (see
//! `replica/apply.rs`, which reads them in stream order) and answers which differ.

use super::{MetaWrite, Replica};
use crate::core::block_digest::matching_runs;
use crate::core::states::{DiskState, ReplState};
use crate::meta::MetaFlags;
use crate::wire::{DigestPurpose, Message};

impl Replica {
    /// The bytes of `count` bitmap blocks starting `first` blocks after `offset` (the device's
    /// last block may be short).
    pub fn block_range(&self, offset: u64, (first, count): (u32, u32)) -> (u64, u64) {
        let block_size = u64::from(self.sb.params.bitmap_block_size);
        let start = offset + u64::from(first) * block_size;
        (start, (u64::from(count) * block_size).min(self.sb.data_size.saturating_sub(start)))
    }

    /// This node compared `blocks` blocks at `offset` with the peer's digests: `differing` runs
    /// differ. Answered after what it implies here is recorded.
    pub(super) fn compared(&mut self, peer_id: u8, purpose: DigestPurpose, offset: u64, blocks: u32, differing: Vec<(u32, u32)>) {
        match purpose {
            DigestPurpose::Verify if !differing.is_empty() => self.verify_found_here(peer_id, offset, &differing),
            DigestPurpose::Verify => {}
            DigestPurpose::Resync => {
                // Only for progress on this side, as for resync data.
                let slot = self.peer(peer_id).slot;
                for run in matching_runs(blocks, &differing) {
                    let (start, len) = self.block_range(offset, run);
                    self.bitmaps[slot].clear_range(start, len);
                }
            }
        }
        self.send(peer_id, Message::DigestReply { purpose, offset, blocks, differing });
    }

    /// This node answered a verify and found blocks that differ from the peer's: its copy is
    /// not UpToDate any more, and it says so, durably, before its answer goes out (so the
    /// verifying node never shows it UpToDate next to blocks out of sync).
    fn verify_found_here(&mut self, peer_id: u8, offset: u64, differing: &[(u32, u32)]) {
        let name = self.peer(peer_id).name.clone();
        for run in differing {
            let (start, len) = self.block_range(offset, *run);
            tracing::warn!(resource = %self.resource, peer = %name, offset = start, len, "online verify: this node's blocks differ from the peer's");
        }
        if self.sb.flags.contains(MetaFlags::VERIFY_DIFFERS) {
            return;
        }
        self.sb.flags.remove(MetaFlags::WAS_UP_TO_DATE);
        self.sb.flags.insert(MetaFlags::VERIFY_DIFFERS);
        self.persist(MetaWrite::Superblock);
        self.disk = DiskState::Outdated;
        tracing::warn!(resource = %self.resource, peer = %name, "online verify found blocks that differ: this node is Outdated until resynced");
        self.broadcast_state();
    }

    /// The peer's answer to this node's verify request (`check_frame` matched it with the
    /// oldest request of this connection's verify): blocks that differ are marked out of sync
    /// for it, durably before anything reports them (outside the activity log's hot extents
    /// nothing else would bring them back after a crash, and the peer already counts itself
    /// Outdated). An aborted run still takes its answers: what they report is as true as before.
    pub fn verify_reply_received(&mut self, peer_id: u8, offset: u64, blocks: u32, differing: &[(u32, u32)]) {
        let checked = self.block_range(offset, (0, blocks)).1;
        let found: Vec<(u64, u64)> = differing.iter().map(|run| self.block_range(offset, *run)).collect();
        let peer = self.peer_mut(peer_id);
        let (slot, name) = (peer.slot, peer.name.clone());
        let run = peer.sync.verify.as_mut().expect("checked: a verify awaits this answer");
        run.awaiting.pop_front();
        let remaining = run.progress.remaining_bytes().saturating_sub(checked);
        run.progress.observe(remaining);
        for &(start, len) in &found {
            run.record_found(start, len);
        }
        let mut pages = Vec::new();
        for (start, len) in found {
            tracing::warn!(resource = %self.resource, peer = %name, offset = start, len, "online verify: blocks differ");
            self.mark_out_of_sync(slot, start, len);
            pages.extend(self.bitmaps[slot].pages_for_range(start, len));
        }
        if !pages.is_empty() {
            self.persist(MetaWrite::BitmapPages { slot, pages });
        }
    }

    /// The answer to a digest request of a checksum-based resync (this node is the source,
    /// `check_frame` matched it with the oldest request): blocks that matched clear with the
    /// next barrier ack; the others are queued to be sent as data.
    pub fn resync_digest_reply_received(&mut self, peer_id: u8, offset: u64, blocks: u32, differing: &[(u32, u32)]) {
        let epoch = self.epoch;
        let matching: Vec<(u64, u64)> = matching_runs(blocks, differing).into_iter().map(|run| self.block_range(offset, run)).collect();
        let wanted: Vec<(u64, u64)> = differing.iter().map(|run| self.block_range(offset, *run)).collect();
        let peer = self.peer_mut(peer_id);
        // The resync stopped when this node went Ahead; the blocks stay marked.
        if peer.repl == ReplState::Ahead {
            return;
        }
        let awaited = peer.sync.resync_digests.pop_front().expect("checked: a digest request awaits this answer");
        if !awaited.stale {
            for (start, len) in matching {
                peer.tl.record_held(epoch, start, len);
            }
        }
        peer.sync.resync_wanted.extend(wanted);
    }
}
