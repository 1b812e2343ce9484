//! On-disk metadata: where it lives ([`layout`](mod@layout)), what it holds ([`superblock`],
//! [`uuids`], [`bitmap`], [`activity_log`]) and how it is read and written safely ([`store`]).
//!
//! Every structure is a whole number of 4 KiB blocks at 4 KiB-aligned offsets, checksummed with
//! crc32c where a torn write could otherwise go unnoticed. Why each write sequence is crash-safe
//! is argued in `docs/meta-crash-safety.md` and checked by the crash tests in this module.

pub mod activity_log;
pub mod bitmap;
pub mod layout;
pub mod store;
pub mod superblock;
pub mod uuids;

#[cfg(test)]
mod crash_tests;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;

pub use activity_log::{
    extent_offset, extents_for, ActivityLog, AlError, AlJoined, AlPrepared, AlTransaction, AlUpdate,
    AL_EXTENT_SIZE,
};
pub use bitmap::DirtyBitmap;
pub use layout::{layout, MetaLayout, MetaParams, AL_RING_BLOCKS};
pub use store::{AlWrite, Loaded, MetaStore};
pub use superblock::{MetaFlags, PeerSlot, Superblock, Terms};
pub use uuids::GenerationUuids;

/// The unit of every metadata structure and of every metadata write.
pub const BLOCK_SIZE: usize = 4096;

/// One metadata block.
pub type Block = [u8; BLOCK_SIZE];

/// Sequence numbers of superblock updates and activity-log transactions stay below this: 2^63
/// writes are more than any device makes (millennia at a million a second). One at or beyond
/// it was not written by a counter that started at 0; it would overflow as the counter goes
/// on (and a wrapped superblock sequence number would make the older slot win, undoing an
/// update), so loading refuses it as corruption.
pub(crate) const SEQ_LIMIT: u64 = 1 << 63;

/// What can go wrong with metadata. Every message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error(
        "the {disk} is too small: it needs at least {needed_bytes} bytes, but has {have_bytes}"
    )]
    DiskTooSmall { disk: &'static str, needed_bytes: u64, have_bytes: u64 },
    #[error("invalid metadata parameters: {0}")]
    InvalidParams(String),
    #[error("no blkrepl metadata found on this disk; run `blkrepl create-md` first")]
    NoMetadata,
    #[error("metadata is corrupt: {detail}")]
    Corrupt { detail: String },
    #[error(
        "metadata format version {found} is not supported by this blkrepl (it supports version \
         {supported}); use the blkrepl release that wrote it or a newer one"
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error(
        "the disk already holds metadata of resource {resource:?}; creating new metadata \
         discards its resync state, pass --force if that is intended"
    )]
    AlreadyHasMetadata { resource: String },
    #[error(
        "the metadata belongs to resource {found:?}, not {expected:?}: is the right disk \
         configured?"
    )]
    OtherResource { found: String, expected: String },
    #[error(
        "the metadata was created for node id {found}, but this node has id {expected}: is the \
         right disk configured?"
    )]
    WrongNode { found: u8, expected: u8 },
    #[error("the metadata does not match the configuration: {0}")]
    ConfigMismatch(String),
    #[error("activity log: {0}")]
    ActivityLog(#[from] AlError),
    /// The loaded superblock's sequence number is the last below `SEQ_LIMIT`: only metadata
    /// not written by blkrepl gets here, and the next update would not load.
    #[error("the superblock's sequence number {seq} leaves no room for another update (2^63 updates: the metadata was not written by blkrepl's counter); recreate it (`blkrepl create-md --force`, then a full resync)")]
    SuperblockExhausted { seq: u64 },
    #[error("metadata I/O failed while {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl MetaError {
    pub(crate) fn corrupt(detail: impl Into<String>) -> MetaError {
        MetaError::Corrupt { detail: detail.into() }
    }

    /// An adapter for `map_err` that names the operation that failed.
    pub(crate) fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> MetaError {
        move |source| MetaError::Io { what, source }
    }
}

/// Little-endian field access within a block. Offsets are compile-time layout constants, so
/// these index in bounds whatever the block holds.
pub(crate) mod le {
    pub fn u16_at(b: &[u8], off: usize) -> u16 {
        let mut a = [0; 2];
        a.copy_from_slice(&b[off..off + 2]);
        u16::from_le_bytes(a)
    }
    pub fn u32_at(b: &[u8], off: usize) -> u32 {
        let mut a = [0; 4];
        a.copy_from_slice(&b[off..off + 4]);
        u32::from_le_bytes(a)
    }
    pub fn u64_at(b: &[u8], off: usize) -> u64 {
        let mut a = [0; 8];
        a.copy_from_slice(&b[off..off + 8]);
        u64::from_le_bytes(a)
    }
    pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
        b[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
}

/// crc32c of a block whose checksum field (4 bytes at `crc_offset`) is taken as zero, so the
/// checksum can live inside the block it protects.
pub(crate) fn block_crc(block: &Block, crc_offset: usize) -> u32 {
    let crc = crc32c::crc32c(&block[..crc_offset]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &block[crc_offset + 4..])
}
