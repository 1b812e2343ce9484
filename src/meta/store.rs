//! Reading and writing the metadata area, in an order that survives a crash at any point.
//!
//! The store owns the metadata disk and the superblock's slot rotation; the bitmaps and the
//! activity log stay with the caller (the engine), which hands them in when something must be
//! persisted. Every write method returns only after a sync, so "returned Ok" means durable.
//! The orderings, and why each is safe, are in `docs/meta-crash-safety.md`.

use std::sync::Arc;

use crate::disk::Disk;

use super::activity_log::{extent_offset, ActivityLog, AlTransaction, AlUpdate, AL_EXTENT_SIZE};
use super::bitmap::{DirtyBitmap, PageLoad};
use super::layout::{layout, superblock_offsets, MetaLayout, MetaParams};
use super::superblock::{newest_intact, pick, MetaFlags, PeerSlot, Superblock};
use super::uuids::GenerationUuids;
use super::{Block, MetaError, AL_RING_BLOCKS, BLOCK_SIZE, SEQ_LIMIT};

const BLOCK: u64 = BLOCK_SIZE as u64;
/// Most pages read or written with one call (1 MiB).
const MAX_PAGES_PER_IO: usize = 256;

/// What `open` found on disk.
#[derive(Debug)]
pub struct Loaded {
    pub superblock: Superblock,
    /// One per peer slot, in slot order.
    pub bitmaps: Vec<DirtyBitmap>,
    /// The hot set as recovered from the ring.
    pub activity_log: ActivityLog,
    /// PRIMARY_IND was set: the node died as primary, so its hot extents may differ from peers.
    pub crashed_as_primary: bool,
}

/// The metadata area of one local disk.
#[derive(Debug)]
pub struct MetaStore {
    disk: Arc<dyn Disk>,
    layout: MetaLayout,
    /// The superblock as last written, its sequence number and slot.
    superblock: Superblock,
    seq: u64,
    slot: usize,
    /// The activity log on disk is known to be empty: the only state in which AL_CLEAN may be
    /// written.
    al_empty: bool,
    /// Bitmap pages written durably since this store was opened: the metrics endpoint shows
    /// the metadata traffic the write path causes (see `engine::counters`).
    bitmap_pages_written: u64,
}

/// An activity-log transaction whose bitmap pages are written but not yet durable (see
/// [`MetaStore::begin_al_update`]).
pub struct AlWrite {
    disk: Arc<dyn Disk>,
    offset: u64,
    block: Vec<u8>,
    /// Bitmap pages were written for it, not yet durably.
    pages: bool,
}

impl AlWrite {
    /// Makes the transaction durable: `data`, the data disk, flushed first when given (the
    /// transaction evicts extents, whose writes must be durable before the log stops naming
    /// them), then the bitmap pages, then the transaction block, each durable before the next.
    pub fn finish(self, data: Option<&dyn Disk>) -> Result<(), MetaError> {
        if let Some(data) = data {
            data.sync().map_err(MetaError::io("flushing the data disk before an activity-log transaction"))?;
        }
        if self.pages {
            self.disk.sync().map_err(MetaError::io("writing bitmap pages"))?;
        }
        let what = "writing an activity-log transaction";
        self.disk.write_at(&self.block, self.offset).map_err(MetaError::io(what))?;
        self.disk.sync().map_err(MetaError::io(what))
    }
}

/// Reads both superblock slots and picks the current one.
fn read_superblock(disk: &dyn Disk, meta_len: u64) -> Result<(Superblock, u64, usize), MetaError> {
    let slots = read_slots(disk, meta_len)?;
    pick([&slots[0], &slots[1]])
}

/// The raw superblock slots.
fn read_slots(disk: &dyn Disk, meta_len: u64) -> Result<[Block; 2], MetaError> {
    let offsets = superblock_offsets(meta_len).ok_or(MetaError::NoMetadata)?;
    let mut slots = [[0u8; BLOCK_SIZE]; 2];
    for (slot, offset) in slots.iter_mut().zip(offsets) {
        disk.read_at(slot, offset).map_err(MetaError::io("reading the superblock"))?;
    }
    Ok(slots)
}

fn disk_len(disk: &dyn Disk) -> Result<u64, MetaError> {
    disk.len().map_err(MetaError::io("reading the metadata disk size"))
}

impl MetaStore {
    /// Writes fresh metadata: UUID "just created", no flags (Inconsistent), clear bitmaps (one
    /// slot per entry of `peer_node_ids`), empty activity log.
    ///
    /// Refuses to overwrite valid metadata (or metadata of an unknown newer format) unless
    /// `force`. Damaged metadata is overwritten without asking: nothing in it can be used.
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
        let meta_len = disk_len(&*disk)?;
        let layout = layout(meta_len, data_disk_len, internal, params)?;
        let clean_bitmap_crc =
            DirtyBitmap::new(layout.data_size, params.bitmap_block_size).crc32c();
        let superblock = Superblock {
            resource: resource.to_string(),
            node_id,
            internal,
            data_size: layout.data_size,
            params,
            peers: peer_node_ids
                .iter()
                .map(|&node_id| PeerSlot {
                    node_id,
                    bitmap_uuid: 0,
                    bitmap_crc: Some(clean_bitmap_crc),
                    departed: false,
                })
                .collect(),
            uuids: GenerationUuids::just_created(),
            terms: Default::default(),
            boot_id: [0; 16],
            flags: MetaFlags::empty(),
        };
        superblock.validate()?;
        let slots = read_slots(&*disk, meta_len)?;
        match pick([&slots[0], &slots[1]]) {
            Ok((existing, ..)) if !force => {
                return Err(MetaError::AlreadyHasMetadata { resource: existing.resource });
            }
            Err(e @ MetaError::UnsupportedVersion { .. }) if !force => return Err(e),
            _ => {}
        }
        // Invalidate the old superblocks first, so that until the new one is complete a crash
        // leaves "no metadata" (or the old metadata untouched), never old metadata over a
        // half-reset bitmap and log. The newest intact slot goes last: were it first, a crash
        // in between would resurrect the superblock version before it.
        let current_slot = newest_intact([&slots[0], &slots[1]]).unwrap_or(0);
        let what = "invalidating the old superblocks";
        let offsets = layout.superblock_offsets();
        for slot in [1 - current_slot, current_slot] {
            disk.write_at(&[0; BLOCK_SIZE], offsets[slot]).map_err(MetaError::io(what))?;
            disk.sync().map_err(MetaError::io(what))?;
        }
        let what = "clearing the bitmaps and the activity log";
        disk.discard(layout.meta_offset, layout.meta_size - 2 * BLOCK)
            .map_err(MetaError::io(what))?;
        disk.sync().map_err(MetaError::io(what))?;
        // Every page of a bitmap carries its checksum: a zeroed one would load as all set.
        let clear = DirtyBitmap::new(layout.data_size, params.bitmap_block_size);
        let pages: Vec<usize> = (0..clear.page_count()).collect();
        for slot in 0..superblock.peers.len() {
            write_pages(&*disk, layout.bitmap_area_offset(slot), &clear, &pages)?;
        }
        disk.sync().map_err(MetaError::io("writing bitmap pages"))?;
        let mut store = MetaStore {
            disk,
            layout,
            superblock: superblock.clone(),
            seq: 0,
            slot: 1,
            al_empty: true,
            bitmap_pages_written: 0,
        };
        store.write_superblock_as_is(superblock)?;
        Ok(store)
    }

    /// Reads and checks the metadata: identity, geometry, bitmap checksums, activity log.
    pub fn open(
        disk: Arc<dyn Disk>,
        data_disk_len: u64,
        internal: bool,
        expected_resource: &str,
        expected_node_id: u8,
    ) -> Result<(MetaStore, Loaded), MetaError> {
        let meta_len = disk_len(&*disk)?;
        let (superblock, seq, slot) = read_superblock(&*disk, meta_len)?;
        if superblock.resource != expected_resource {
            return Err(MetaError::OtherResource {
                found: superblock.resource,
                expected: expected_resource.to_string(),
            });
        }
        if superblock.node_id != expected_node_id {
            return Err(MetaError::WrongNode {
                found: superblock.node_id,
                expected: expected_node_id,
            });
        }
        if superblock.internal != internal {
            let kind = |internal| if internal { "internal" } else { "external" };
            return Err(MetaError::ConfigMismatch(format!(
                "the metadata was created as {}, but is configured as {}",
                kind(superblock.internal),
                kind(internal)
            )));
        }
        let layout = layout(meta_len, data_disk_len, internal, superblock.params)?;
        if layout.data_size != superblock.data_size {
            return Err(MetaError::corrupt(format!(
                "the metadata describes {} bytes of data, but the disk sizes give {} (was a disk \
                 resized or replaced?)",
                superblock.data_size, layout.data_size
            )));
        }
        let mut store =
            MetaStore { disk, layout, superblock: superblock.clone(), seq, slot, al_empty: false, bitmap_pages_written: 0 };
        let bitmaps = (0..superblock.peers.len())
            .map(|i| store.read_bitmap(i))
            .collect::<Result<Vec<_>, _>>()?;
        let activity_log = store.read_activity_log()?;
        store.al_empty = activity_log.hot_extents().is_empty();
        let crashed_as_primary = superblock.flags.contains(MetaFlags::PRIMARY_IND);
        Ok((store, Loaded { superblock, bitmaps, activity_log, crashed_as_primary }))
    }

    pub fn layout(&self) -> &MetaLayout {
        &self.layout
    }

    /// The superblock as last written.
    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    /// Writes `sb` durably into the older slot. Identity and geometry cannot change in place.
    ///
    /// Two things in it vouch for other structures, so the store has the last word on them and a
    /// stale copy of the superblock cannot make them lie:
    /// - the bitmap checksums (set by `create` and `clean_shutdown`, cleared before a bitmap page
    ///   changes) are replaced by the store's current values; a new or reassigned peer slot gets
    ///   none;
    /// - AL_CLEAN is written only if requested **and** the log on disk is empty.
    pub fn write_superblock(&mut self, sb: &Superblock) -> Result<(), MetaError> {
        let mut sb = sb.clone();
        let clean = sb.flags.contains(MetaFlags::AL_CLEAN) && self.al_empty;
        sb.flags.set(MetaFlags::AL_CLEAN, clean);
        for (i, peer) in sb.peers.iter_mut().enumerate() {
            peer.bitmap_crc = self
                .superblock
                .peers
                .get(i)
                .filter(|current| current.node_id == peer.node_id)
                .and_then(|current| current.bitmap_crc);
        }
        self.write_superblock_as_is(sb)
    }

    /// Writes `sb` durably into the older slot, bitmap checksums included.
    fn write_superblock_as_is(&mut self, sb: Superblock) -> Result<(), MetaError> {
        let current = &self.superblock;
        if (&sb.resource, sb.node_id, sb.internal, sb.data_size, sb.params)
            != (
                &current.resource,
                current.node_id,
                current.internal,
                current.data_size,
                current.params,
            )
        {
            return Err(MetaError::ConfigMismatch(
                "resource name, node id and geometry are fixed at create-md time".into(),
            ));
        }
        if self.seq + 1 >= SEQ_LIMIT {
            // Loading refuses what this would write (see `SEQ_LIMIT`).
            return Err(MetaError::SuperblockExhausted { seq: self.seq });
        }
        let slot = 1 - self.slot;
        let block = sb.encode(self.seq + 1)?;
        let what = "writing the superblock";
        self.disk
            .write_at(&block, self.layout.superblock_offsets()[slot])
            .map_err(MetaError::io(what))?;
        self.disk.sync().map_err(MetaError::io(what))?;
        self.superblock = sb;
        self.seq += 1;
        self.slot = slot;
        Ok(())
    }

    /// Writes the given pages of peer slot `slot`'s bitmap durably.
    ///
    /// If the superblock still holds a checksum for this bitmap, it is cleared durably first:
    /// from the first changed page on, the on-disk bitmap no longer matches it.
    pub fn write_bitmap_pages(
        &mut self,
        slot: usize,
        bitmap: &DirtyBitmap,
        pages: impl IntoIterator<Item = usize>,
    ) -> Result<(), MetaError> {
        if self.put_bitmap_pages(slot, bitmap, pages)? {
            self.disk.sync().map_err(MetaError::io("writing bitmap pages"))?;
        }
        Ok(())
    }

    /// [`MetaStore::write_bitmap_pages`] without the final sync: whether any page was written.
    fn put_bitmap_pages(
        &mut self,
        slot: usize,
        bitmap: &DirtyBitmap,
        pages: impl IntoIterator<Item = usize>,
    ) -> Result<bool, MetaError> {
        self.check_bitmap(slot, bitmap)?;
        let mut pages: Vec<usize> = pages.into_iter().collect();
        pages.sort_unstable();
        pages.dedup();
        if let Some(&last) = pages.last() {
            if last >= bitmap.page_count() {
                return Err(MetaError::InvalidParams(format!(
                    "bitmap page {last} of a {}-page bitmap",
                    bitmap.page_count()
                )));
            }
        } else {
            return Ok(false);
        }
        if self.superblock.peers[slot].bitmap_crc.is_some() {
            let mut sb = self.superblock.clone();
            sb.peers[slot].bitmap_crc = None;
            self.write_superblock_as_is(sb)?;
        }
        write_pages(&*self.disk, self.layout.bitmap_area_offset(slot), bitmap, &pages)?;
        self.bitmap_pages_written += pages.len() as u64;
        Ok(true)
    }

    /// Bitmap pages written durably since the store was opened (evictions of activity-log
    /// transactions and a clean stop included).
    pub fn bitmap_pages_written(&self) -> u64 {
        self.bitmap_pages_written
    }

    /// Writes the whole bitmap of peer slot `slot` durably.
    pub fn write_bitmap(&mut self, slot: usize, bitmap: &DirtyBitmap) -> Result<(), MetaError> {
        self.write_bitmap_pages(slot, bitmap, 0..bitmap.page_count())
    }

    /// Writes an activity-log transaction durably at its ring position. A transaction that makes
    /// extents hot first durably removes AL_CLEAN from the superblock, if set.
    pub fn write_al_transaction(&mut self, transaction: &AlTransaction) -> Result<(), MetaError> {
        let write = self.before_al_transaction(transaction)?;
        self.finish_al_write(write, transaction)
    }

    /// Finishes `write` here (see [`AlWrite::finish`]); once a transaction that empties the log
    /// is durable, AL_CLEAN may be written.
    fn finish_al_write(&mut self, write: AlWrite, transaction: &AlTransaction) -> Result<(), MetaError> {
        write.finish(None)?;
        if transaction.empties_log() {
            self.al_empty = true;
        }
        Ok(())
    }

    /// What must be on disk before `transaction` is written: a transaction that makes extents
    /// hot removes AL_CLEAN from the superblock first, durably. Returns the transaction's write.
    fn before_al_transaction(&mut self, transaction: &AlTransaction) -> Result<AlWrite, MetaError> {
        if !transaction.empties_log() {
            self.al_empty = false;
            if self.superblock.flags.contains(MetaFlags::AL_CLEAN) {
                let mut sb = self.superblock.clone();
                sb.flags.remove(MetaFlags::AL_CLEAN);
                self.write_superblock_as_is(sb)?;
            }
        }
        Ok(AlWrite {
            disk: self.disk.clone(),
            offset: self.layout.al_block_offset(transaction.ring_index()),
            block: transaction.bytes().to_vec(),
            pages: false,
        })
    }

    /// Makes an activity-log update durable in the required order: first the bitmap pages
    /// covering each evicted extent, for every peer, then the transaction. Afterwards, call
    /// [`ActivityLog::commit`].
    pub fn write_al_update(
        &mut self,
        update: &AlUpdate,
        bitmaps: &[DirtyBitmap],
    ) -> Result<(), MetaError> {
        let write = self.begin_al_update(update, bitmaps)?;
        self.finish_al_write(write, &update.transaction)
    }

    /// The part of [`MetaStore::write_al_update`] that reads `bitmaps`: the bitmap pages of the
    /// evicted extents are written (not yet durably) as they stand now, so whoever holds the
    /// bitmaps may change them again at once, and any later write of those pages is newer.
    /// [`AlWrite::finish`] does the rest, and may run on another thread meanwhile. A
    /// transaction that empties the log goes through [`MetaStore::write_al_update`], which
    /// records that the log is empty once it is durable.
    pub fn begin_al_update(&mut self, update: &AlUpdate, bitmaps: &[DirtyBitmap]) -> Result<AlWrite, MetaError> {
        self.check_bitmap_count(bitmaps)?;
        let mut written = false;
        if !update.evicted.is_empty() {
            for (slot, bitmap) in bitmaps.iter().enumerate() {
                let pages: Vec<usize> = update
                    .evicted
                    .iter()
                    .flat_map(|&e| bitmap.pages_for_range(extent_offset(e), AL_EXTENT_SIZE))
                    .collect();
                written |= self.put_bitmap_pages(slot, bitmap, pages)?;
            }
        }
        let write = self.before_al_transaction(&update.transaction)?;
        Ok(AlWrite { pages: written, ..write })
    }

    /// Persists everything for a clean stop: the dirty bitmap pages, an empty activity log, then
    /// a superblock (based on `sb`) with AL_CLEAN and with each bitmap's checksum. Its other
    /// flags are `sb`'s: PRIMARY_IND stays when the caller keeps a crash as primary to repair,
    /// in one write with the rest (a second write to put it back would leave a window in which
    /// a crash forgets it). Fails with `AlError::Busy` if I/O still holds activity-log extents.
    pub fn clean_shutdown(
        &mut self,
        sb: &Superblock,
        bitmaps: &mut [DirtyBitmap],
        activity_log: &mut ActivityLog,
    ) -> Result<(), MetaError> {
        self.check_bitmap_count(bitmaps)?;
        let node_ids = |sb: &Superblock| sb.peers.iter().map(|p| p.node_id).collect::<Vec<_>>();
        if node_ids(sb) != node_ids(&self.superblock) {
            return Err(MetaError::InvalidParams(
                "clean shutdown with a peer list that differs from the one on disk; write the \
                 superblock with the new peer list first"
                    .into(),
            ));
        }
        for (slot, bitmap) in bitmaps.iter_mut().enumerate() {
            let pages = bitmap.take_dirty_pages();
            if let Err(e) = self.write_bitmap_pages(slot, bitmap, pages.iter().copied()) {
                bitmap.mark_pages_dirty(pages);
                return Err(e);
            }
        }
        let update = activity_log.mark_clean()?;
        // The log is empty in memory now; if this write fails the metadata disk is failing and
        // the caller detaches, so the log is not used again either way.
        self.write_al_transaction(&update.transaction)?;
        activity_log.commit(update);
        let mut sb = sb.clone();
        sb.flags.insert(MetaFlags::AL_CLEAN);
        for (peer, bitmap) in sb.peers.iter_mut().zip(bitmaps.iter()) {
            peer.bitmap_crc = Some(bitmap.crc32c());
        }
        self.write_superblock_as_is(sb)
    }

    fn check_bitmap_count(&self, bitmaps: &[DirtyBitmap]) -> Result<(), MetaError> {
        if bitmaps.len() != self.superblock.peers.len() {
            return Err(MetaError::InvalidParams(format!(
                "{} bitmaps for {} peer slots",
                bitmaps.len(),
                self.superblock.peers.len()
            )));
        }
        Ok(())
    }

    fn check_bitmap(&self, slot: usize, bitmap: &DirtyBitmap) -> Result<(), MetaError> {
        if slot >= self.superblock.peers.len() {
            return Err(MetaError::InvalidParams(format!("no peer slot {slot}")));
        }
        let geometry = (self.layout.data_size, self.layout.params.bitmap_block_size);
        if (bitmap.data_size(), bitmap.block_size()) != geometry {
            return Err(MetaError::InvalidParams(format!(
                "bitmap for {} bytes in {}-byte blocks, but the device has {} bytes in \
                 {}-byte blocks",
                bitmap.data_size(),
                bitmap.block_size(),
                geometry.0,
                geometry.1
            )));
        }
        Ok(())
    }

    fn read_bitmap(&self, slot: usize) -> Result<DirtyBitmap, MetaError> {
        // (A page that fails its checksum loads as all set: see `DirtyBitmap::load_page`.)
        let mut bitmap =
            DirtyBitmap::new(self.layout.data_size, self.layout.params.bitmap_block_size);
        let area = self.layout.bitmap_area_offset(slot);
        let mut buf = vec![0u8; MAX_PAGES_PER_IO * BLOCK_SIZE];
        let mut page = 0;
        let mut damaged = Vec::new();
        while page < bitmap.page_count() {
            let n = (bitmap.page_count() - page).min(MAX_PAGES_PER_IO);
            let buf = &mut buf[..n * BLOCK_SIZE];
            self.disk
                .read_at(buf, area + page as u64 * BLOCK)
                .map_err(MetaError::io("reading a bitmap"))?;
            for (i, chunk) in buf.chunks_exact(BLOCK_SIZE).enumerate() {
                let mut block: Block = [0; BLOCK_SIZE];
                block.copy_from_slice(chunk);
                if bitmap.load_page(page + i, &block)? == PageLoad::Damaged {
                    damaged.push(page + i);
                }
            }
            page += n;
        }
        let peer = &self.superblock.peers[slot];
        if !damaged.is_empty() {
            // Torn by a crash, or damaged since: their blocks are resynced whole. The
            // whole-bitmap checksum cannot match any more, and every other page checked out.
            tracing::warn!(peer = peer.node_id, pages = ?damaged,
                "bitmap pages failed their checksum: every block they cover counts as out of sync");
            return Ok(bitmap);
        }
        if let Some(expected) = peer.bitmap_crc {
            if bitmap.crc32c() != expected {
                return Err(MetaError::corrupt(format!(
                    "the bitmap for peer node {} does not match the checksum written at clean \
                     shutdown; which blocks differ from that peer is unknown, so it needs a full \
                     sync (`blkrepl invalidate` on the side to overwrite)",
                    peer.node_id
                )));
            }
        }
        Ok(bitmap)
    }

    fn read_activity_log(&self) -> Result<ActivityLog, MetaError> {
        let mut buf = vec![0u8; AL_RING_BLOCKS * BLOCK_SIZE];
        self.disk
            .read_at(&mut buf, self.layout.al_offset())
            .map_err(MetaError::io("reading the activity log"))?;
        let ring: Vec<Block> = buf
            .chunks_exact(BLOCK_SIZE)
            .map(|chunk| {
                let mut block = [0; BLOCK_SIZE];
                block.copy_from_slice(chunk);
                block
            })
            .collect();
        let log = ActivityLog::recover(self.layout.params.al_extents, &ring)?;
        log.check_within(self.layout.data_size)?;
        Ok(log)
    }
}
/// Writes `pages` (sorted, distinct) of `bitmap` into the bitmap area at `area`, consecutive
/// pages coalesced into one write; the caller makes them durable.
fn write_pages(disk: &dyn Disk, area: u64, bitmap: &DirtyBitmap, pages: &[usize]) -> Result<(), MetaError> {
    let what = "writing bitmap pages";
    let mut i = 0;
    while i < pages.len() {
        let mut run = 1;
        while i + run < pages.len() && run < MAX_PAGES_PER_IO && pages[i + run] == pages[i] + run {
            run += 1;
        }
        let mut buf = Vec::with_capacity(run * BLOCK_SIZE);
        for &page in &pages[i..i + run] {
            buf.extend_from_slice(&bitmap.encode_page(page));
        }
        disk.write_at(&buf, area + pages[i] as u64 * BLOCK).map_err(MetaError::io(what))?;
        i += run;
    }
    Ok(())
}

