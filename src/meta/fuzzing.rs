//! What the fuzz targets (`fuzz/`) need from inside this module; built only with the
//! `fuzzing` feature.
//!
//! A fuzzer that writes random bytes into a metadata block almost never gets the block's
//! crc32c right, so without help every mutation would stop at the checksum and the checks
//! behind it (superblock fields, activity-log counts, bitmap bits past the end) would never
//! see fuzzed content. [`seal_block`] recomputes the checksum the way the writers do, wherever
//! the block's kind puts it.

use super::{activity_log, bitmap, block_crc, le, superblock, Block};

/// Gives `block` a valid checksum for what it looks like: a superblock or an activity-log
/// transaction by its magic, otherwise a bitmap page. The page index of a bitmap page is left
/// as it is (the fuzzer chooses it like any other field).
pub fn seal_block(block: &mut Block) {
    let crc_offset = if &block[..8] == superblock::MAGIC {
        superblock::CRC_OFFSET
    } else if &block[..8] == activity_log::MAGIC {
        activity_log::CRC_OFFSET
    } else {
        bitmap::PAGE_CRC_OFFSET
    };
    let crc = block_crc(block, crc_offset);
    le::put_u32(block, crc_offset, crc);
}
