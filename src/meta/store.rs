//! Reading and writing the metadata area of a disk, in the orders that keep it crash-safe (see
//! docs/DESIGN.md, "Crash safety").

use super::activity_log::{ActivityLog, AlTransaction, AL_RING_BLOCKS};
use super::bitmap::DirtyBitmap;
use super::layout::{layout, superblock_offsets, MetaLayout, MetaParams};
use super::superblock::{pick, MetaFlags, PeerSlot, Superblock};
use super::uuids::GenerationUuids;
use super::{Block, MetaError, BLOCK_SIZE};
use crate::disk::Disk;
use std::ops::Range;
use std::sync::Arc;

/// The metadata of one node, open for updates.
#[derive(Debug)]
pub struct MetaStore {
    disk: Arc<dyn Disk>,
    layout: MetaLayout,
    /// Sequence number of the newest superblock written.
    seq: u64,
    /// The slot the next superblock goes to (never the one holding the newest).
    next_slot: usize,
}

/// What `open` found on disk.
#[derive(Debug)]
pub struct Loaded {
    pub superblock: Superblock,
    /// One per peer slot, in slot order.
    pub bitmaps: Vec<DirtyBitmap>,
    pub al: ActivityLog,
    /// The node was primary when it stopped without a clean demotion.
    pub crashed_primary: bool,
}

fn read_block(disk: &dyn Disk, offset: u64, what: &'static str) -> Result<Block, MetaError> {
    let mut block = [0u8; BLOCK_SIZE];
    disk.read_at(&mut block, offset).map_err(MetaError::io(what))?;
    Ok(block)
}

fn read_superblock(disk: &dyn Disk) -> Result<(Superblock, u64, usize), MetaError> {
    let len = disk.len().map_err(MetaError::io("reading the metadata disk size"))?;
    let Some([a, b]) = superblock_offsets(len) else { return Err(MetaError::NoMetadata) };
    let first = read_block(disk, a, "reading superblock slot 0")?;
    let second = read_block(disk, b, "reading superblock slot 1")?;
    pick([&first, &second])
}

impl MetaStore {
    /// Writes fresh metadata: no generation (just created), empty bitmaps, an empty activity
    /// log, Inconsistent. Refuses to overwrite existing metadata unless `force`.
    ///
    /// Order: both superblock slots are invalidated first, then the bitmaps and the ring are
    /// zeroed, then the new superblock is written. A crash anywhere before the last write leaves
    /// no superblock ("run create-md"), never one describing half-initialised areas.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        disk: Arc<dyn Disk>,
        data_disk_len: u64,
        internal: bool,
        params: MetaParams,
        resource: &str,
        node_id: u8,
        peer_node_ids: &[u8],
        force: bool,
    ) -> Result<MetaStore, MetaError> {
        let meta_len = disk.len().map_err(MetaError::io("reading the metadata disk size"))?;
        let layout = layout(meta_len, data_disk_len, internal, params)?;
        if !force {
            match read_superblock(&*disk) {
                Err(MetaError::NoMetadata) => {}
                Ok((existing, _, _)) => return Err(MetaError::AlreadyHasMetadata { resource: existing.resource }),
                Err(e) => {
                    return Err(MetaError::corrupt(format!(
                        "the disk holds damaged metadata ({e}); pass --force to overwrite it"
                    )))
                }
            }
        }
        let zero = [0u8; BLOCK_SIZE];
        for offset in layout.superblock_offsets() {
            disk.write_at(&zero, offset).map_err(MetaError::io("invalidating the old superblock"))?;
        }
        disk.sync().map_err(MetaError::io("invalidating the old superblock"))?;
        let zero_area = |start: u64, len: u64, what: &'static str| -> Result<(), MetaError> {
            let chunk = vec![0u8; (256 << 10).min(len as usize).max(BLOCK_SIZE)];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(chunk.len() as u64) as usize;
                disk.write_at(&chunk[..n], start + done).map_err(MetaError::io(what))?;
                done += n as u64;
            }
            Ok(())
        };
        zero_area(layout.bitmap_area_offset(0), layout.bitmap_area_size * u64::from(params.max_peers), "clearing the bitmaps")?;
        zero_area(layout.al_offset(), (AL_RING_BLOCKS * BLOCK_SIZE) as u64, "clearing the activity log")?;
        disk.sync().map_err(MetaError::io("clearing the metadata areas"))?;

        let empty_crc = DirtyBitmap::new(layout.data_size, params.bitmap_block_size).crc32c();
        let superblock = Superblock {
            resource: resource.to_owned(),
            node_id,
            internal,
            data_size: layout.data_size,
            params,
            peers: peer_node_ids
                .iter()
                .map(|&id| PeerSlot { node_id: id, bitmap_uuid: 0, bitmap_crc: Some(empty_crc) })
                .collect(),
            uuids: GenerationUuids::just_created(),
            flags: MetaFlags::AL_CLEAN,
        };
        let mut store = MetaStore { disk, layout, seq: 0, next_slot: 0 };
        store.write_superblock(&superblock)?;
        Ok(store)
    }

    /// Opens existing metadata, checking that it belongs to this resource and node, and loads
    /// the bitmaps and the activity log.
    pub fn open(
        disk: Arc<dyn Disk>,
        data_disk_len: u64,
        internal: bool,
        expected_resource: &str,
        expected_node_id: u8,
    ) -> Result<(MetaStore, Loaded), MetaError> {
        let (superblock, seq, slot) = read_superblock(&*disk)?;
        if superblock.resource != expected_resource {
            return Err(MetaError::OtherResource { found: superblock.resource, expected: expected_resource.to_owned() });
        }
        if superblock.node_id != expected_node_id {
            return Err(MetaError::WrongNode { found: superblock.node_id, expected: expected_node_id });
        }
        if superblock.internal != internal {
            return Err(MetaError::ConfigMismatch(format!(
                "the metadata is {}, the configuration says {} (`meta_disk`)",
                if superblock.internal { "internal" } else { "external" },
                if internal { "internal" } else { "external" }
            )));
        }
        let meta_len = disk.len().map_err(MetaError::io("reading the metadata disk size"))?;
        let layout = layout(meta_len, data_disk_len, internal, superblock.params)?;
        if layout.data_size != superblock.data_size {
            return Err(MetaError::ConfigMismatch(format!(
                "the metadata describes {} data bytes, the disk now leaves {}: was the disk resized? \
                 recreate the metadata (`create-md --force`, full resync)",
                superblock.data_size, layout.data_size
            )));
        }
        let store = MetaStore { disk, layout, seq, next_slot: 1 - slot };

        let mut bitmaps = Vec::with_capacity(superblock.peers.len());
        for (index, peer) in superblock.peers.iter().enumerate() {
            let mut bitmap = store.read_bitmap(index)?;
            if peer.bitmap_crc.is_some_and(|crc| crc != bitmap.crc32c()) {
                // A damaged bitmap could under-report: resync everything with that peer.
                tracing::warn!(peer = peer.node_id, "bitmap checksum mismatch: marking every block out of sync");
                bitmap.set_all();
            }
            bitmaps.push(bitmap);
        }
        let mut ring = Vec::with_capacity(AL_RING_BLOCKS);
        for index in 0..AL_RING_BLOCKS {
            ring.push(read_block(&*store.disk, layout.al_block_offset(index), "reading the activity log")?);
        }
        let al = ActivityLog::recover(superblock.params.al_extents, &ring)?;
        let crashed_primary = superblock.flags.contains(MetaFlags::PRIMARY_IND);
        Ok((store, Loaded { superblock, bitmaps, al, crashed_primary }))
    }

    pub fn data_size_bytes(&self) -> u64 {
        self.layout.data_size
    }

    fn read_bitmap(&self, slot: usize) -> Result<DirtyBitmap, MetaError> {
        let mut bitmap = DirtyBitmap::new(self.layout.data_size, self.layout.params.bitmap_block_size);
        let base = self.layout.bitmap_area_offset(slot);
        for page in 0..bitmap.page_count() {
            let block = read_block(&*self.disk, base + (page * BLOCK_SIZE) as u64, "reading a bitmap")?;
            bitmap.load_page(page, &block)?;
        }
        Ok(bitmap)
    }

    /// Writes the superblock to the slot not holding the newest one, then syncs: a torn write
    /// leaves the previous superblock in the other slot.
    pub fn write_superblock(&mut self, superblock: &Superblock) -> Result<(), MetaError> {
        let seq = self.seq + 1;
        let block = superblock.encode(seq)?;
        let offset = self.layout.superblock_offsets()[self.next_slot];
        self.disk.write_at(&block, offset).map_err(MetaError::io("writing the superblock"))?;
        self.disk.sync().map_err(MetaError::io("syncing the superblock"))?;
        self.seq = seq;
        self.next_slot = 1 - self.next_slot;
        Ok(())
    }

    /// Writes some pages of a peer's bitmap and syncs them (an activity-log transaction that
    /// relies on them may follow).
    pub fn write_bitmap_pages(&self, slot: usize, bitmap: &DirtyBitmap, pages: Range<usize>) -> Result<(), MetaError> {
        if pages.is_empty() {
            return Ok(());
        }
        let base = self.layout.bitmap_area_offset(slot);
        for page in pages {
            let block = bitmap.encode_page(page);
            self.disk.write_at(&block, base + (page * BLOCK_SIZE) as u64).map_err(MetaError::io("writing a bitmap page"))?;
        }
        self.disk.sync().map_err(MetaError::io("syncing bitmap pages"))
    }

    pub fn write_bitmap(&self, slot: usize, bitmap: &DirtyBitmap) -> Result<(), MetaError> {
        self.write_bitmap_pages(slot, bitmap, 0..bitmap.page_count())
    }

    /// Writes an activity-log transaction durably.
    pub fn write_al_transaction(&self, transaction: &AlTransaction) -> Result<(), MetaError> {
        let offset = self.layout.al_block_offset(transaction.ring_index());
        self.disk.write_at(transaction.bytes(), offset).map_err(MetaError::io("writing an activity-log transaction"))?;
        self.disk.sync().map_err(MetaError::io("syncing the activity log"))
    }
}
