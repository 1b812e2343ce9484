//! Simulated disks.
//!
//! The data disk holds, per block, the version of the client write it last received (0: never
//! written), which is all the checkers need to compare replicas byte for byte. A write is
//! durable once it completes; at a power loss each write still in progress has landed or not.
//!
//! The metadata is the real thing: a `MetaStore` over a `FaultyDisk` over a `MemDisk` that
//! survives the node's crashes. Arming a crash makes the k-th next metadata write tear (only
//! some of its sectors land) and every later one vanish; the node dies at that write, so what
//! a restart reads back is exactly what a power cut in the middle of that write leaves.

use super::rng::Rng;
use super::{AL_EXTENTS, BLOCKS, BLOCK_BYTES, DATA_BYTES};
use blkrepl::core::generation::Generation;
use blkrepl::disk::{FaultyDisk, MemDisk};
use blkrepl::meta::{layout, ActivityLog, AlUpdate, DirtyBitmap, MetaError, MetaParams, MetaStore, Superblock};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const RESOURCE: &str = "sim";

pub struct DataDisk {
    blocks: [u64; BLOCKS],
    /// Writes in progress: id -> (block, version, fails with an I/O error).
    writing: BTreeMap<u64, (usize, u64, bool)>,
    next_io: u64,
}

impl DataDisk {
    pub fn new() -> DataDisk {
        DataDisk { blocks: [0; BLOCKS], writing: BTreeMap::new(), next_io: 0 }
    }

    pub fn blocks(&self) -> &[u64; BLOCKS] {
        &self.blocks
    }

    /// A write to `block` is in progress.
    pub fn writing(&self, block: usize) -> bool {
        self.writing.values().any(|(b, _, _)| *b == block)
    }

    pub fn start_write(&mut self, block: usize, version: u64, fails: bool) -> u64 {
        self.next_io += 1;
        self.writing.insert(self.next_io, (block, version, fails));
        self.next_io
    }

    /// Completes a write; false if it failed (nothing written).
    pub fn finish_write(&mut self, io: u64) -> bool {
        let (block, version, fails) = self.writing.remove(&io).expect("write in progress");
        if !fails {
            self.blocks[block] = version;
        }
        !fails
    }

    /// A clean stop waits for the writes in progress.
    pub fn settle(&mut self) {
        for io in self.writing.keys().copied().collect::<Vec<_>>() {
            self.finish_write(io);
        }
    }

    /// Power loss: each write in progress reached the medium or not.
    pub fn power_loss(&mut self, rng: &mut Rng) {
        for (_, (block, version, fails)) in std::mem::take(&mut self.writing) {
            if !fails && rng.percent(50) {
                self.blocks[block] = version;
            }
        }
    }
}

/// The node crashed in the middle of a metadata write: stop here, as the process would.
#[derive(Debug)]
pub struct Crashed;

/// A node's metadata while it runs: the store and what the engine keeps beside it.
pub struct Meta {
    store: MetaStore,
    disk: Arc<FaultyDisk<Arc<MemDisk>>>,
    pub sb: Superblock,
    /// One per data peer, in slot order.
    pub bitmaps: Vec<DirtyBitmap>,
    pub al: ActivityLog,
}

fn params(data_peers: usize) -> MetaParams {
    MetaParams { max_peers: data_peers as u8, bitmap_block_size: BLOCK_BYTES as u32, al_extents: AL_EXTENTS }
}

/// The metadata disk of a node with `data_peers` peer slots (external metadata).
pub fn new_meta_disk(data_peers: usize) -> Arc<MemDisk> {
    let l = layout(1 << 30, DATA_BYTES, false, params(data_peers)).expect("metadata layout");
    Arc::new(MemDisk::new(l.meta_size as usize))
}

/// Surfaces a metadata error that the model never expects (the disks are in memory and in
/// bounds; only crashes are injected, and those do not fail a write).
fn unexpected(what: &str) -> impl FnOnce(MetaError) -> Crashed + '_ {
    move |e| panic!("metadata {what} failed unexpectedly: {e}")
}

impl Meta {
    /// `create-md` for node `id` with the given data peers.
    pub fn create(disk: &Arc<MemDisk>, id: u8, data_peers: &[u8]) -> Meta {
        let faulty = Arc::new(FaultyDisk::new(disk.clone()));
        let store = MetaStore::create(
            faulty.clone(),
            DATA_BYTES,
            false,
            params(data_peers.len()),
            RESOURCE,
            id,
            data_peers,
            false,
        )
        .expect("create-md on a blank in-memory disk");
        let sb = store.superblock().clone();
        let blank = || DirtyBitmap::new(DATA_BYTES, BLOCK_BYTES as u32);
        Meta {
            store,
            disk: faulty,
            sb,
            bitmaps: (0..data_peers.len()).map(|_| blank()).collect(),
            al: ActivityLog::new(AL_EXTENTS),
        }
    }

    /// Attach after a restart; also returns whether the node crashed as primary. An error means
    /// the metadata did not survive the crash: a finding in itself.
    pub fn open(disk: &Arc<MemDisk>, id: u8) -> Result<(Meta, bool), MetaError> {
        let faulty = Arc::new(FaultyDisk::new(disk.clone()));
        let (store, loaded) = MetaStore::open(faulty.clone(), DATA_BYTES, false, RESOURCE, id)?;
        let meta =
            Meta { store, disk: faulty, sb: loaded.superblock, bitmaps: loaded.bitmaps, al: loaded.activity_log };
        Ok((meta, loaded.crashed_as_primary))
    }

    /// The `k`-th metadata write from now tears after `tear_sectors` sectors (k = 0: every
    /// write from now on is lost).
    pub fn arm_crash(&self, k: u64, tear_sectors: u64) {
        self.disk.crash_after(k, tear_sectors);
    }

    /// An armed crash went off in a metadata write.
    pub fn crashed(&self) -> bool {
        self.disk.has_crashed()
    }

    fn survived(&self) -> Result<(), Crashed> {
        if self.crashed() {
            Err(Crashed)
        } else {
            Ok(())
        }
    }

    pub fn persist(&mut self) -> Result<(), Crashed> {
        self.store.write_superblock(&self.sb).map_err(unexpected("superblock write"))?;
        self.survived()
    }

    pub fn persist_bitmap(&mut self, slot: usize) -> Result<(), Crashed> {
        self.store.write_bitmap(slot, &self.bitmaps[slot]).map_err(unexpected("bitmap write"))?;
        self.survived()
    }

    /// Bitmap pages of evicted extents, then the transaction (the engine's `apply_al_update`).
    pub fn apply_al_update(&mut self, update: AlUpdate) -> Result<(), Crashed> {
        self.store.write_al_update(&update, &self.bitmaps).map_err(unexpected("activity-log update"))?;
        self.survived()?;
        self.al.commit(update);
        Ok(())
    }

    pub fn clean_shutdown(&mut self) -> Result<(), Crashed> {
        let Meta { store, sb, bitmaps, al, .. } = self;
        store.clean_shutdown(sb, bitmaps, al).map_err(unexpected("clean shutdown"))?;
        self.sb = self.store.superblock().clone();
        self.survived()
    }

    pub fn generation(&self) -> Generation {
        Generation::of(&self.sb)
    }

    pub fn set_generation(&mut self, g: Generation) {
        g.store_in(&mut self.sb);
    }

    /// Marks a block out of sync for a peer slot (memory only, as in the engine: the activity
    /// log covers it on disk).
    pub fn mark(&mut self, slot: usize, block: usize) {
        self.bitmaps[slot].set_blocks(block as u64, 1);
    }
}
