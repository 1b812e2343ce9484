//! Metadata areas, whatever they hold, through `MetaStore::open`: the superblock slots, the
//! activity-log ring and the bitmap pages (see `blkrepl_fuzz::meta_input` for the input and why
//! it patches real metadata). Loading must end in an error or in metadata that keeps its own
//! invariants: the activity log within the device, bitmaps of the device's geometry whose
//! runs add up to their weight, and a clean stop that reopens to the same bitmaps and UUIDs
//! with an empty log.
#![no_main]

use std::sync::Arc;

use blkrepl::disk::{Disk, MemDisk};
use blkrepl::meta::fuzzing::seal_block;
use blkrepl::meta::{AlError, Block, Loaded, MetaError, MetaFlags, MetaStore, BLOCK_SIZE};
use blkrepl_fuzz::meta_input::{MetaInput, Patch, NODE_ID, RESOURCE};
use libfuzzer_sys::fuzz_target;

/// The largest disk an input describes (64 Ki blocks of data, and its metadata), with room.
/// Its pages are never touched beyond the metadata area, so a large one costs little.
const ALLOCATION_CAP: usize = 384 << 20;

/// Writes `patch` over the metadata disk, within one block, sealing that block unless asked
/// not to.
fn apply(disk: &MemDisk, patch: &Patch) {
    let blocks = disk.len().expect("a MemDisk has a length") / BLOCK_SIZE as u64;
    let Some(index) = blocks.checked_sub(1 + u64::from(patch.block_from_end)) else { return };
    let offset = index * BLOCK_SIZE as u64;
    let mut block: Block = [0; BLOCK_SIZE];
    disk.read_at(&mut block, offset).expect("in bounds");
    let start = usize::from(patch.offset);
    let len = patch.bytes.len().min(BLOCK_SIZE - start);
    block[start..start + len].copy_from_slice(&patch.bytes[..len]);
    if patch.seal {
        seal_block(&mut block);
    }
    disk.write_at(&block, offset).expect("in bounds");
}

fn open(
    disk: &Arc<MemDisk>,
    data_disk_len: u64,
    internal: bool,
) -> Result<(MetaStore, Loaded), MetaError> {
    MetaStore::open(disk.clone(), data_disk_len, internal, RESOURCE, NODE_ID)
}

fuzz_target!(
    init: {
        blkrepl_fuzz::cap_allocations(ALLOCATION_CAP);
    },
    |data: &[u8]| {
        let Some(input) = MetaInput::parse(data) else { return };
        let Some((disk, _, data_disk_len)) = input.create() else { return };
        for patch in &input.patches {
            apply(&disk, patch);
        }
        let Ok((mut store, loaded)) = open(&disk, data_disk_len, input.internal) else { return };

        let data_size = store.layout().data_size;
        let superblock = loaded.superblock;
        superblock.validate().expect("a loaded superblock is valid");
        loaded.activity_log.check_within(data_size).expect("the loaded log is within the device");
        assert_eq!(loaded.bitmaps.len(), superblock.peers.len());
        for bitmap in &loaded.bitmaps {
            assert_eq!(bitmap.data_size(), data_size);
            let mut set = 0;
            for (start, len) in bitmap.runs() {
                assert!(len > 0 && start + len <= bitmap.blocks(), "run {start}+{len} of {bitmap:?}");
                set += len;
            }
            assert_eq!(set, bitmap.weight());
        }

        let (mut bitmaps, mut log) = (loaded.bitmaps, loaded.activity_log);
        match store.clean_shutdown(&superblock, &mut bitmaps, &mut log) {
            Ok(()) => {}
            // Sequence numbers at the end of their range load, but nothing more may be written
            // (it would not load): only crafted metadata has them.
            Err(MetaError::SuperblockExhausted { .. } | MetaError::ActivityLog(AlError::Exhausted { .. })) => return,
            Err(e) => panic!("loaded metadata takes a clean stop: {e}"),
        }
        let (_, again) = open(&disk, data_disk_len, input.internal).expect("reopens after a clean stop");
        assert_eq!(again.bitmaps, bitmaps);
        assert!(again.activity_log.hot_extents().is_empty());
        // The crash marker is the caller's to keep (a repair still owed) or drop: as it said.
        assert_eq!(again.crashed_as_primary, superblock.flags.contains(MetaFlags::PRIMARY_IND));
        assert_eq!(again.superblock.uuids, superblock.uuids);
        assert_eq!(again.superblock.terms, superblock.terms);
    }
);
