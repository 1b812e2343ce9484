//! The receiving side of a `DigestRequest` (online verify or checksum-based resync): this node
//! compares the peer's block digests with its own blocks and answers which differ.

use super::state::State;
use super::{verify, Shared};
use crate::core::block_digest::{block_digests, differing_runs, matching_runs};
use crate::core::states::{ReplState, Role};
use crate::wire::{DigestPurpose, Message, DIGEST_BYTES};
use std::sync::Arc;

/// The bytes of `count` bitmap blocks starting `first` blocks after `offset` (the device's last
/// block may be short).
pub(super) fn block_range(shared: &Shared, offset: u64, (first, count): (u32, u32)) -> (u64, u64) {
    let block_size = u64::from(shared.config.bitmap_block_size);
    let start = offset + u64::from(first) * block_size;
    (start, (u64::from(count) * block_size).min(shared.data_size_bytes.saturating_sub(start)))
}

/// Checks that `blocks` blocks from `offset` are blocks of the device: aligned to the bitmap
/// block size, none past the end. Returns their length in bytes.
fn checked_len(shared: &Shared, offset: u64, blocks: u32) -> Result<u64, String> {
    let block_size = u64::from(shared.config.bitmap_block_size);
    let size = shared.data_size_bytes;
    let last_start = u64::from(blocks - 1).checked_mul(block_size).and_then(|b| b.checked_add(offset));
    if offset % block_size != 0 || last_start.is_none_or(|start| start >= size) {
        return Err(format!("digests for {blocks} blocks at {offset} do not match the device's {block_size}-byte blocks"));
    }
    Ok(block_range(shared, offset, (0, blocks)).1)
}

/// A `DigestRequest` from the peer. Checked whole before anything is read or written; an error
/// drops the connection.
pub fn answer(shared: &Arc<Shared>, peer_id: u8, purpose: DigestPurpose, offset: u64, digests: &[[u8; DIGEST_BYTES]]) -> Result<(), String> {
    // The codec guarantees 1..=MAX_DIGESTS digests.
    let blocks = digests.len() as u32;
    let len = checked_len(shared, offset, blocks)?;
    {
        let st = shared.lock();
        let repl = st.replica.peer(peer_id).repl;
        let expected = match purpose {
            // Behind: the peer went Ahead during the verify or resync; what it queued before
            // still arrives, and is answered (an answer changes nothing on this node's data).
            DigestPurpose::Verify => matches!(repl, ReplState::Established | ReplState::Behind),
            DigestPurpose::Resync => matches!(repl, ReplState::SyncTarget | ReplState::Behind),
        };
        if !expected || st.replica.role == Role::Primary {
            return Err(format!("{purpose:?} digests while {repl} and {}", st.replica.role));
        }
    }
    // This node is secondary: the peer's stream, applied by this very thread, is its only
    // writer, so the blocks read now are those at this point of the stream.
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
