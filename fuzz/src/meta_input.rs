//! The input of the `meta_load` target: a geometry, then patches over the metadata area that
//! `MetaStore::create` writes for it.
//!
//! Starting from real metadata puts every mutation one step from a loadable area, where a flat
//! image of random bytes would almost never hold a superblock whose geometry matches the disk.
//! A patch may write anything anywhere in the area, so every byte of the superblock slots, the
//! activity-log ring and the bitmap pages is the fuzzer's; the blocks a patch touches get their
//! checksum recomputed afterwards (unless the patch says not to), so that the content behind
//! the checksum is what gets tested.
//!
//! ```text
//! 0  flags u8: bit 0 external metadata, bits 1-2 peer slots in use (0..=3)
//! 1  bitmap block size: 4 KiB << (byte % 9)
//! 2  activity-log extents u16 LE: 7 + value % 6427
//! 4  data disk length u16 LE: (1 + value) x 4 KiB
//! 6  patches, each: block u16 LE (counted back from the last block of the metadata disk; bit 15
//!    set: keep the checksum as patched), offset u16 LE (within the block, mod 4096),
//!    length u16 LE, then that many bytes (fewer if the input ends)
//! ```

use std::sync::Arc;

use blkrepl::disk::MemDisk;
use blkrepl::meta::layout::{MAX_AL_EXTENTS, MIN_AL_EXTENTS, MIN_BITMAP_BLOCK_SIZE};
use blkrepl::meta::{MetaError, MetaParams, MetaStore, BLOCK_SIZE};

const HEADER_LEN: usize = 6;
const PATCH_HEADER_LEN: usize = 6;
const KEEP_CHECKSUM: u16 = 1 << 15;

/// The node that creates the metadata, and the ids of its peers (one per slot in use).
pub const NODE_ID: u8 = 0;
pub const PEER_IDS: [u8; 3] = [1, 2, 3];
pub const RESOURCE: &str = "r0";

/// One decoded input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaInput {
    pub internal: bool,
    pub peers: usize,
    pub params: MetaParams,
    pub data_disk_len: u64,
    pub patches: Vec<Patch>,
}

/// Bytes written over the created metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    /// Counted back from the last block of the metadata disk (0: the last block).
    pub block_from_end: u16,
    pub offset: u16,
    pub seal: bool,
    pub bytes: Vec<u8>,
}

impl MetaInput {
    /// Reads an input; `None` when it is too short for the geometry.
    pub fn parse(data: &[u8]) -> Option<MetaInput> {
        let (header, mut rest) = data.split_first_chunk::<HEADER_LEN>()?;
        let peers = usize::from(header[0] >> 1 & 3);
        let span = u16::try_from(MAX_AL_EXTENTS - MIN_AL_EXTENTS + 1).expect("fits u16");
        let params = MetaParams {
            max_peers: u8::try_from(peers.max(1)).expect("at most 3"),
            bitmap_block_size: MIN_BITMAP_BLOCK_SIZE << (header[1] % 9),
            al_extents: MIN_AL_EXTENTS + u32::from(u16_at(header, 2) % span),
        };
        let data_disk_len = (1 + u64::from(u16_at(header, 4))) * BLOCK_SIZE as u64;
        let mut patches = Vec::new();
        while let Some((patch, tail)) = rest.split_first_chunk::<PATCH_HEADER_LEN>() {
            let block = u16_at(patch, 0);
            let len = usize::from(u16_at(patch, 4)).min(tail.len());
            patches.push(Patch {
                block_from_end: block & !KEEP_CHECKSUM,
                offset: u16_at(patch, 2) % BLOCK_SIZE as u16,
                seal: block & KEEP_CHECKSUM == 0,
                bytes: tail[..len].to_vec(),
            });
            rest = &tail[len..];
        }
        Some(MetaInput { internal: header[0] & 1 == 0, peers, params, data_disk_len, patches })
    }

    /// The metadata disk holding what `MetaStore::create` writes for this geometry, the store
    /// and the length of the data disk; `None` if create refuses the geometry. A disk too small
    /// for the metadata is grown to the size create asks for.
    pub fn create(&self) -> Option<(Arc<MemDisk>, MetaStore, u64)> {
        let mut meta_len = if self.internal { self.data_disk_len } else { 2 * BLOCK_SIZE as u64 };
        loop {
            let disk = Arc::new(MemDisk::new(usize::try_from(meta_len).ok()?));
            let data_disk_len = if self.internal { meta_len } else { self.data_disk_len };
            let created = MetaStore::create(
                disk.clone(),
                data_disk_len,
                self.internal,
                self.params,
                RESOURCE,
                NODE_ID,
                &PEER_IDS[..self.peers],
                false,
            );
            match created {
                Ok(store) => return Some((disk, store, data_disk_len)),
                Err(MetaError::DiskTooSmall { needed_bytes, .. }) if needed_bytes > meta_len => {
                    meta_len = needed_bytes;
                }
                Err(_) => return None,
            }
        }
    }

    /// The bytes [`MetaInput::parse`] reads back as `self` (for the seeds of the corpus).
    ///
    /// # Panics
    /// If `self` holds what the format cannot express (a geometry outside its ranges, a patch
    /// over 64 KiB): seeds are written by hand, so that is a bug in the seed.
    pub fn encode(&self) -> Vec<u8> {
        let shift = (self.params.bitmap_block_size / MIN_BITMAP_BLOCK_SIZE).trailing_zeros();
        let blocks = self.data_disk_len / BLOCK_SIZE as u64 - 1;
        let mut out = vec![
            u8::from(!self.internal) | u8::try_from(self.peers << 1).expect("at most 3 peers"),
            u8::try_from(shift).expect("block size shift"),
        ];
        let al = u16::try_from(self.params.al_extents - MIN_AL_EXTENTS).expect("al extents");
        out.extend_from_slice(&al.to_le_bytes());
        out.extend_from_slice(&u16::try_from(blocks).expect("data disk length").to_le_bytes());
        for patch in &self.patches {
            let keep = if patch.seal { 0 } else { KEEP_CHECKSUM };
            out.extend_from_slice(&(patch.block_from_end | keep).to_le_bytes());
            out.extend_from_slice(&patch.offset.to_le_bytes());
            let len = u16::try_from(patch.bytes.len()).expect("patch length");
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&patch.bytes);
        }
        out
    }
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}
