//! The receiving side of a `DigestRequest` (online verify or checksum-based resync): this node
//! compares the peer's block digests with its own blocks and answers which differ.

use super::state::State;
use super::{verify, Shared};
use crate::core::block_digest::{block_digests, differing_runs, matching_runs};
use super::locked::Locked;
use crate::wire::{DigestPurpose, Message, DIGEST_BYTES};
use std::sync::Arc;

/// The bytes of `count` bitmap blocks starting `first` blocks after `offset` (the device's last
/// block may be short).
pub(super) fn block_range(shared: &Shared, offset: u64, (first, count): (u32, u32)) -> (u64, u64) {
    let block_size = u64::from(shared.config.bitmap_block_size);
    let start = offset + u64::from(first) * block_size;
    (start, (u64::from(count) * block_size).min(shared.data_size_bytes.saturating_sub(start)))
}

/// A `DigestRequest` from the peer. Checked whole before anything is read or written; an error
/// drops the connection.
/// A `DigestRequest` from the peer, which `Replica::check_frame` found fitting the link's state
/// and the device's blocks.
pub fn answer(shared: &Arc<Shared>, mut st: Locked<'_>, peer_id: u8, purpose: DigestPurpose, offset: u64, digests: &[[u8; DIGEST_BYTES]]) -> Result<(), String> {
    // The codec guarantees 1..=MAX_DIGESTS digests.
    let blocks = digests.len() as u32;
    let len = block_range(shared, offset, (0, blocks)).1;
    // This node is secondary: the peer's stream is its only writer. Once the writes received
    // before this request are on the disk (and the next frame is read only after this one is
    // answered), the blocks read are those at this point of the stream.
    while st.replica.overlaps_busy(offset, len) {
        st = st.wait();
    }
    drop(st);
    let mut data = vec![0u8; len as usize];
    shared.data.read_at(&mut data, offset).map_err(|e| format!("read at {offset}+{len} to compare digests failed: {e}"))?;
    let block_size = shared.config.bitmap_block_size as usize;
    let differing = differing_runs(&block_digests(&data, block_size), digests);

    let mut st = shared.lock();
    let peer = st.replica.peer_mut(peer_id);
    peer.received_bytes += (digests.len() * DIGEST_BYTES) as u64;
    let slot = peer.slot;
    match purpose {
        DigestPurpose::Verify if !differing.is_empty() => verify::found_here(shared, &mut st, peer_id, offset, &differing)?,
        DigestPurpose::Verify => {}
        // Only for progress on this side, as for resync data.
        DigestPurpose::Resync => clear_matching(shared, &mut st, slot, offset, blocks, &differing),
    }
    st.replica.send(peer_id, Message::DigestReply { purpose, offset, blocks, differing });
    Ok(())
}

fn clear_matching(shared: &Shared, st: &mut State, slot: usize, offset: u64, blocks: u32, differing: &[(u32, u32)]) {
    for run in matching_runs(blocks, differing) {
        let (start, len) = block_range(shared, offset, run);
        st.replica.bitmaps[slot].clear_range(start, len);
    }
}
