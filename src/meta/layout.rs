//! Where each metadata structure lives, and how much room the data keeps.
//!
//! The metadata area ends at the end of the metadata disk (rounded down to 4 KiB) and holds,
//! from its end backwards:
//!
//! ```text
//! | bitmap peer 0 | ... | bitmap peer max_peers-1 | AL ring (32 x 4 KiB) | SB slot 0 | SB slot 1 |
//!                                                                        ^ end - 8 KiB   end ^
//! ```
//!
//! The superblock slots sit at a fixed distance from the end so they can be found knowing only
//! the disk's length; every other position follows from the parameters the superblock records.
//!
//! **Size formula.** With `D` the data disk length rounded down to 4 KiB (for internal metadata,
//! the whole disk: the bitmap then also covers the metadata area itself, a negligible overshoot
//! that keeps the computation free of circularity):
//!
//! ```text
//! bitmap_area = ceil(ceil(D / bitmap_block_size) / 32704) * 4 KiB      (one bit per block,
//!                                          whole 4 KiB pages of 32,704 bits and a checksum)
//! meta_size   = max_peers * bitmap_area + 32 * 4 KiB + 8 KiB
//! data_size   = D - meta_size  (internal)        D  (external)
//! ```
//!
//! For example 1 TiB, 4 KiB blocks, one peer: 32.07 MiB of bitmap + 136 KiB. The usable data size
//! is a multiple of 4 KiB and must not be 0.

use super::bitmap::pages_for_blocks;
use super::{MetaError, BLOCK_SIZE};

const BLOCK: u64 = BLOCK_SIZE as u64;

/// The most peers one node can keep a bitmap for (up to 32 nodes per resource).
pub const MAX_PEERS: u8 = 31;
pub const MIN_BITMAP_BLOCK_SIZE: u32 = 4096;
pub const MAX_BITMAP_BLOCK_SIZE: u32 = 1 << 20;
pub const MIN_AL_EXTENTS: u32 = 7;
/// Bounded so that the ring's rotating context always rebuilds the whole table (see
/// `activity_log`).
pub const MAX_AL_EXTENTS: u32 = 6433;

/// Activity-log transactions kept on disk: the ring's blocks (see `activity_log`).
pub const AL_RING_BLOCKS: usize = 32;

/// The choices fixed at `create-md` time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaParams {
    /// Peer slots reserved (1..=31); each costs one bitmap area.
    pub max_peers: u8,
    /// Bytes of data per bitmap bit: a power of two in 4 KiB..=1 MiB. Larger blocks mean a
    /// smaller bitmap but coarser resync.
    pub bitmap_block_size: u32,
    /// Activity-log slots (7..=6433): how many 4 MiB extents may be hot, i.e. how much data a
    /// crash as primary forces to resync.
    pub al_extents: u32,
}

impl Default for MetaParams {
    fn default() -> MetaParams {
        MetaParams { max_peers: 1, bitmap_block_size: 4096, al_extents: 1237 }
    }
}

impl MetaParams {
    pub fn validate(&self) -> Result<(), MetaError> {
        if !(1..=MAX_PEERS).contains(&self.max_peers) {
            return Err(MetaError::InvalidParams(format!(
                "max peers must be 1..={MAX_PEERS}, not {}",
                self.max_peers
            )));
        }
        let bs = self.bitmap_block_size;
        if !bs.is_power_of_two() || !(MIN_BITMAP_BLOCK_SIZE..=MAX_BITMAP_BLOCK_SIZE).contains(&bs) {
            return Err(MetaError::InvalidParams(format!(
                "bitmap block size must be a power of two from 4 KiB to 1 MiB, not {bs}"
            )));
        }
        if !(MIN_AL_EXTENTS..=MAX_AL_EXTENTS).contains(&self.al_extents) {
            return Err(MetaError::InvalidParams(format!(
                "activity-log extents must be {MIN_AL_EXTENTS}..={MAX_AL_EXTENTS}, not {}",
                self.al_extents
            )));
        }
        Ok(())
    }
}

/// Where everything is, in bytes on the metadata disk (and the data size on the data disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaLayout {
    pub internal: bool,
    pub params: MetaParams,
    /// Usable data bytes, starting at offset 0 of the data disk.
    pub data_size: u64,
    /// Start of the metadata area on the metadata disk.
    pub meta_offset: u64,
    pub meta_size: u64,
    /// Bytes reserved per peer bitmap (whole 4 KiB pages).
    pub bitmap_area_size: u64,
}

impl MetaLayout {
    /// Bits in each peer's bitmap.
    pub fn bitmap_blocks(&self) -> u64 {
        self.data_size.div_ceil(u64::from(self.params.bitmap_block_size))
    }

    pub fn bitmap_area_offset(&self, peer_slot: usize) -> u64 {
        self.meta_offset + peer_slot as u64 * self.bitmap_area_size
    }

    pub fn al_offset(&self) -> u64 {
        self.bitmap_area_offset(usize::from(self.params.max_peers))
    }

    pub fn al_block_offset(&self, index: usize) -> u64 {
        self.al_offset() + index as u64 * BLOCK
    }

    pub fn superblock_offsets(&self) -> [u64; 2] {
        let end = self.meta_offset + self.meta_size;
        [end - 2 * BLOCK, end - BLOCK]
    }
}

/// Where the two superblock slots of a metadata disk of `meta_disk_len` bytes are, if it is large
/// enough to hold them. Needs no parameter: that is what lets `open` find them.
pub fn superblock_offsets(meta_disk_len: u64) -> Option<[u64; 2]> {
    let end = meta_disk_len / BLOCK * BLOCK;
    (end >= 2 * BLOCK).then(|| [end - 2 * BLOCK, end - BLOCK])
}

/// Size of the metadata area for a data disk of `data_len` bytes (a multiple of 4 KiB).
fn meta_size(data_len: u64, params: &MetaParams) -> u64 {
    let bitmap_blocks = data_len.div_ceil(u64::from(params.bitmap_block_size));
    let area = pages_for_blocks(bitmap_blocks) * BLOCK;
    u64::from(params.max_peers) * area + AL_RING_BLOCKS as u64 * BLOCK + 2 * BLOCK
}

/// The smallest disk that holds internal metadata plus 4 KiB of data. `meta_size` grows with the
/// disk, so iterate up to the least fixed point of `len = 4 KiB + meta_size(len)`.
fn min_internal_len(params: &MetaParams) -> u64 {
    let mut len = BLOCK + meta_size(BLOCK, params);
    loop {
        let needed = BLOCK + meta_size(len, params);
        if needed <= len {
            return len;
        }
        len = needed;
    }
}

/// Computes the layout. For internal metadata the data and metadata disk are the same disk, so
/// both lengths must be equal.
pub fn layout(
    meta_disk_len: u64,
    data_disk_len: u64,
    internal: bool,
    params: MetaParams,
) -> Result<MetaLayout, MetaError> {
    params.validate()?;
    if internal && meta_disk_len != data_disk_len {
        return Err(MetaError::InvalidParams(format!(
            "internal metadata lives on the data disk, yet the metadata disk has {meta_disk_len} \
             bytes and the data disk {data_disk_len}"
        )));
    }
    let meta_end = meta_disk_len / BLOCK * BLOCK;
    let data_disk = data_disk_len / BLOCK * BLOCK;
    let meta_size = meta_size(data_disk, &params);
    let (data_size, meta_offset) = if internal {
        if meta_end < meta_size + BLOCK {
            return Err(MetaError::DiskTooSmall {
                disk: "data disk (with internal metadata)",
                needed_bytes: min_internal_len(&params),
                have_bytes: data_disk_len,
            });
        }
        (meta_end - meta_size, meta_end - meta_size)
    } else {
        if data_disk == 0 {
            return Err(MetaError::DiskTooSmall {
                disk: "data disk",
                needed_bytes: BLOCK,
                have_bytes: data_disk_len,
            });
        }
        if meta_end < meta_size {
            return Err(MetaError::DiskTooSmall {
                disk: "metadata disk",
                needed_bytes: meta_size,
                have_bytes: meta_disk_len,
            });
        }
        (data_disk, meta_end - meta_size)
    };
    let bitmap_area_size =
        pages_for_blocks(data_disk.div_ceil(u64::from(params.bitmap_block_size))) * BLOCK;
    Ok(MetaLayout { internal, params, data_size, meta_offset, meta_size, bitmap_area_size })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn one_tebibyte_matches_the_documented_formula() {
        let params = MetaParams::default();
        let l = layout(1 << 40, 1 << 40, true, params).unwrap();
        // 2^28 bits in pages of 32,704: 8,209 pages, 32.07 MiB.
        assert_eq!(l.bitmap_area_size, 8209 * 4096);
        assert_eq!(l.meta_size, 8209 * 4096 + 34 * 4096);
        assert_eq!(l.data_size, (1 << 40) - l.meta_size);
        assert_eq!(l.meta_offset, l.data_size);
        assert_eq!(l.superblock_offsets(), [(1 << 40) - 8192, (1 << 40) - 4096]);
        assert_eq!(l.al_offset(), l.meta_offset + 8209 * 4096);
        assert_eq!(l.bitmap_blocks(), l.data_size / 4096);
    }

    #[test]
    fn structures_are_aligned_and_ordered() {
        for (meta, data, internal) in
            [(GIB + 12345, GIB + 12345, true), (64 * MIB + 999, 10 * GIB + 7, false)]
        {
            let params = MetaParams { max_peers: 3, bitmap_block_size: 65536, al_extents: 7 };
            let l = layout(meta, data, internal, params).unwrap();
            assert_eq!(l.data_size % 4096, 0);
            assert_eq!(l.meta_offset % 4096, 0);
            assert_eq!(l.bitmap_area_offset(1) - l.bitmap_area_offset(0), l.bitmap_area_size);
            assert_eq!(l.al_offset(), l.bitmap_area_offset(3));
            assert_eq!(l.al_block_offset(AL_RING_BLOCKS), l.superblock_offsets()[0]);
            assert_eq!(Some(l.superblock_offsets()), superblock_offsets(meta));
            assert!(l.bitmap_area_size * 8 * 65536 >= l.data_size);
            if internal {
                assert!(l.data_size + l.meta_size <= meta);
            } else {
                assert_eq!(l.data_size, data / 4096 * 4096);
                assert_eq!(l.meta_offset + l.meta_size, meta / 4096 * 4096);
            }
        }
    }

    #[test]
    fn too_small_disks_report_what_they_need() {
        let params = MetaParams::default();
        let needed = min_internal_len(&params);
        assert_eq!(needed, 4096 + 4096 + 34 * 4096);
        assert!(layout(needed, needed, true, params).is_ok());
        match layout(needed - 1, needed - 1, true, params) {
            Err(MetaError::DiskTooSmall { needed_bytes, have_bytes, .. }) => {
                assert_eq!((needed_bytes, have_bytes), (needed, needed - 1));
            }
            other => panic!("expected DiskTooSmall, got {other:?}"),
        }
        assert!(matches!(
            layout(GIB, 4095, false, params),
            Err(MetaError::DiskTooSmall { needed_bytes: 4096, have_bytes: 4095, .. })
        ));
        let meta_needed = meta_size(GIB, &params);
        assert!(layout(meta_needed, GIB, false, params).is_ok());
        assert!(matches!(
            layout(meta_needed - 1, GIB, false, params),
            Err(MetaError::DiskTooSmall { disk: "metadata disk", .. })
        ));
    }

    #[test]
    fn min_internal_len_crosses_page_boundaries() {
        // The least fixed point is feasible, and one block less is not.
        for params in [
            MetaParams { max_peers: 31, bitmap_block_size: 4096, al_extents: 7 },
            MetaParams { max_peers: 1, bitmap_block_size: 1 << 20, al_extents: 6433 },
        ] {
            let n = min_internal_len(&params);
            assert!(layout(n, n, true, params).is_ok());
            assert!(layout(n - 4096, n - 4096, true, params).is_err());
        }
    }

    #[test]
    fn invalid_params_are_refused() {
        for params in [
            MetaParams { max_peers: 0, ..Default::default() },
            MetaParams { max_peers: 32, ..Default::default() },
            MetaParams { bitmap_block_size: 2048, ..Default::default() },
            MetaParams { bitmap_block_size: 12288, ..Default::default() },
            MetaParams { bitmap_block_size: 2 << 20, ..Default::default() },
            MetaParams { al_extents: 6, ..Default::default() },
            MetaParams { al_extents: 6434, ..Default::default() },
        ] {
            assert!(matches!(layout(GIB, GIB, true, params), Err(MetaError::InvalidParams(_))));
        }
        assert!(matches!(
            layout(GIB, 2 * GIB, true, MetaParams::default()),
            Err(MetaError::InvalidParams(_))
        ));
    }
}
