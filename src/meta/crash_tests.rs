//! Crash tests: run a sequence of metadata operations over a [`FaultyDisk`], crash at every write
//! (whole, torn after a few sectors, or not at all), reopen what reached the disk, and check the
//! invariants argued in `docs/meta-crash-safety.md`.
//!
//! A scenario runs identically whatever the crash point (writes after the crash "succeed" and are
//! dropped), so it records a timeline of events stamped with the number of writes issued and
//! synced so far. An event stamped `w` happened before a crash at write `k` iff `w < k`.

use std::collections::{BTreeSet, VecDeque};
use std::ops::RangeInclusive;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::disk::{Disk, FaultyDisk, MemDisk};
use super::superblock::FORMAT_VERSION;

type Faulty = FaultyDisk<Arc<MemDisk>>;

/// Tear variants: nothing, one sector, half a block, a whole 4 KiB block (multi-block writes are
/// still torn by that).
const TEARS: [u64; 4] = [0, 1, 4, 8];

const BLOCKS_PER_PAGE: u64 = bitmap::BITS_PER_PAGE;
/// Three bitmap pages of 4 KiB blocks: 384 MiB, 96 extents.
const DATA_LEN: u64 = 3 * BLOCKS_PER_PAGE * 4096;
const EXTENTS: u64 = DATA_LEN / AL_EXTENT_SIZE;

fn params() -> MetaParams {
    MetaParams { max_peers: 2, bitmap_block_size: 4096, al_extents: 7 }
}

/// External metadata: the metadata disk holds only metadata, so images stay small.
fn meta_disk() -> Arc<MemDisk> {
    let l = layout(1 << 30, DATA_LEN, false, params()).unwrap();
    Arc::new(MemDisk::new(l.meta_size as usize))
}

fn create(disk: Arc<dyn Disk>, resource: &str, force: bool) -> Result<MetaStore, MetaError> {
    MetaStore::create(disk, DATA_LEN, false, params(), resource, 1, &[2, 3], force)
}

fn open(disk: Arc<dyn Disk>, resource: &str) -> Result<(MetaStore, Loaded), MetaError> {
    MetaStore::open(disk, DATA_LEN, false, resource, 1)
}

/// A fresh faulty disk over a copy of `image`; returns it and the disk beneath it.
fn rig(image: &[u8]) -> (Arc<Faulty>, Arc<MemDisk>) {
    let inner = Arc::new(MemDisk::from_vec(image.to_vec()));
    (Arc::new(FaultyDisk::new(inner.clone())), inner)
}

/// Runs `scenario` once without a crash to count its writes, then once per crash point and tear
/// variant, calling `check(k, image_after_crash)` each time; finally checks the uncrashed result
/// as `k = writes + 1`.
fn for_every_crash(
    image: &[u8],
    scenario: impl Fn(Arc<Faulty>),
    check: impl Fn(u64, Arc<MemDisk>),
) {
    let (faulty, inner) = rig(image);
    scenario(faulty.clone());
    let writes = faulty.writes();
    assert!(writes > 0, "scenario wrote nothing");
    check(writes + 1, inner);
    for k in 1..=writes {
        for tear in TEARS {
            let (faulty, inner) = rig(image);
            faulty.crash_after(k, tear);
            scenario(faulty.clone());
            assert!(faulty.has_crashed());
            check(k, inner);
        }
    }
}

fn sb_version(store: &MetaStore, i: u64) -> Superblock {
    let mut sb = store.superblock().clone();
    sb.uuids.current = 0x1000 + (i << 1);
    sb.uuids.history[0] = i;
    sb.flags.set(MetaFlags::CONSISTENT, i % 2 == 0);
    sb.peers[i as usize % 2].bitmap_uuid = i;
    sb
}

#[test]
fn superblock_update_is_old_or_new_never_garbage() {
    let disk = meta_disk();
    let store = create(disk.clone(), "r0", false).unwrap();
    let image = disk.snapshot();
    let versions: Vec<Superblock> = (0..6).map(|i| sb_version(&store, i)).collect();
    let initial = store.superblock().clone();
    // Each superblock update is exactly one write: update i is write i + 1.
    let scenario = |faulty: Arc<Faulty>| {
        let (mut store, _) = open(faulty, "r0").unwrap();
        for sb in &versions {
            store.write_superblock(sb).unwrap();
        }
    };
    for_every_crash(&image, scenario, |k, inner| {
        let (store, _) = open(inner, "r0").unwrap_or_else(|e| panic!("crash at {k}: {e}"));
        let done = (k - 1) as usize; // updates complete before the crash
        let old = if done == 0 { &initial } else { &versions[done - 1] };
        let got = store.superblock();
        assert!(got == old || versions.get(done) == Some(got), "crash at {k}: {got:?}");
    });
}

fn assert_fresh(loaded: &Loaded, k: u64) {
    let sb = &loaded.superblock;
    assert_eq!(sb.resource, "new", "crash at {k}");
    assert!(sb.uuids.is_just_created() && sb.flags == MetaFlags::empty(), "crash at {k}");
    assert!(loaded.bitmaps.iter().all(|bm| bm.weight() == 0), "crash at {k}");
    assert!(loaded.activity_log.hot_extents().is_empty(), "crash at {k}");
}

#[test]
fn create_md_on_a_blank_disk_is_fresh_or_clearly_absent() {
    let image = meta_disk().snapshot();
    let scenario = |faulty: Arc<Faulty>| {
        create(faulty, "new", false).unwrap();
    };
    for_every_crash(&image, scenario, |k, inner| match open(inner, "new") {
        Ok((_, loaded)) => assert_fresh(&loaded, k),
        Err(MetaError::NoMetadata) => {}
        Err(e @ MetaError::Corrupt { .. }) => {
            assert!(e.to_string().contains("create-md"), "crash at {k}: unclear: {e}");
        }
        Err(e) => panic!("crash at {k}: {e}"),
    });
}

/// Metadata that has been used: bits set, hot extents, moved UUIDs.
fn used_metadata(resource: &str) -> (Vec<u8>, Loaded) {
    let disk = meta_disk();
    let mut store = create(disk.clone(), resource, false).unwrap();
    let mut sb = store.superblock().clone();
    sb.uuids.current = 0xdead_beef_0000;
    sb.flags = MetaFlags::CONSISTENT | MetaFlags::WAS_UP_TO_DATE | MetaFlags::PRIMARY_IND;
    store.write_superblock(&sb).unwrap();
    let mut al = ActivityLog::new(params().al_extents);
    let mut bitmaps = vec![DirtyBitmap::new(DATA_LEN, 4096); 2];
    for e in [1, 40, 90] {
        let AlPrepared::Transaction(update) = al.prepare(e..=e).unwrap() else { unreachable!() };
        store.write_al_update(&update, &bitmaps).unwrap();
        al.commit(update);
        bitmaps[0].set_range(extent_offset(e), 3 * 4096);
    }
    store.write_bitmap(0, &bitmaps[0]).unwrap();
    let (_, loaded) = open(disk.clone(), resource).unwrap();
    assert_eq!(loaded.activity_log.hot_extents(), vec![1, 40, 90]);
    assert_eq!(loaded.bitmaps[0].weight(), 9);
    (disk.snapshot(), loaded)
}

#[test]
fn create_md_over_old_metadata_never_mixes_old_and_new() {
    let (image, old) = used_metadata("old");
    let (faulty, inner) = rig(&image);
    match create(faulty, "new", false) {
        Err(MetaError::AlreadyHasMetadata { resource }) => assert_eq!(resource, "old"),
        other => panic!("expected AlreadyHasMetadata, got {other:?}"),
    }
    assert!(inner.snapshot() == image, "a refused create-md must not write");

    let scenario = |faulty: Arc<Faulty>| {
        create(faulty, "new", true).unwrap();
    };
    for_every_crash(&image, scenario, |k, inner| {
        match open(inner.clone(), "new") {
            Ok((_, loaded)) => assert_fresh(&loaded, k),
            Err(MetaError::NoMetadata) => {}
            Err(MetaError::OtherResource { found, .. }) => {
                // Only acceptable if nothing but part of the superblock invalidation landed:
                // then the old metadata must be intact in every part.
                assert_eq!(found, "old");
                let (_, loaded) = open(inner, "old").unwrap();
                assert_eq!(loaded.superblock, old.superblock, "crash at {k}");
                assert_eq!(loaded.bitmaps, old.bitmaps, "crash at {k}");
                assert_eq!(
                    loaded.activity_log.hot_extents(),
                    old.activity_log.hot_extents(),
                    "crash at {k}"
                );
            }
            Err(e @ MetaError::Corrupt { .. }) => {
                assert!(e.to_string().contains("create-md"), "crash at {k}: unclear: {e}");
            }
            Err(e) => panic!("crash at {k}: {e}"),
        }
    });
}

#[test]
fn create_md_over_a_newer_format_needs_force_and_never_resurrects_the_older_slot() {
    let (mut image, _) = used_metadata("old");
    // Rewrite the current superblock slot as an intact block of an unknown format version.
    let l = layout(image.len() as u64, DATA_LEN, false, params()).unwrap();
    let offsets = l.superblock_offsets().map(|o| o as usize);
    let seq_of = |image: &[u8], at: usize| le::u64_at(&image[at..at + BLOCK_SIZE], 16);
    let newest = if seq_of(&image, offsets[0]) > seq_of(&image, offsets[1]) { 0 } else { 1 };
    let block = &mut image[offsets[newest]..offsets[newest] + BLOCK_SIZE];
    le::put_u32(block, 8, FORMAT_VERSION + 1);
    let mut copy: Block = [0; BLOCK_SIZE];
    copy.copy_from_slice(block);
    le::put_u32(block, 12, block_crc(&copy, 12));
    let (faulty, _) = rig(&image);
    assert!(matches!(
        create(faulty, "new", false),
        Err(MetaError::UnsupportedVersion { found, supported: FORMAT_VERSION }) if found == FORMAT_VERSION + 1
    ));
    let scenario = |faulty: Arc<Faulty>| {
        create(faulty, "new", true).unwrap();
    };
    for_every_crash(&image, scenario, |k, inner| match open(inner, "new") {
        Ok((_, loaded)) => assert_fresh(&loaded, k),
        Err(MetaError::NoMetadata | MetaError::UnsupportedVersion { .. }) => {}
        Err(e @ MetaError::Corrupt { .. }) => {
            assert!(e.to_string().contains("create-md"), "crash at {k}: unclear: {e}");
        }
        Err(e) => panic!("crash at {k}: {e}"),
    });
}

/// One step of the simulated engine.
#[derive(Debug, Clone)]
enum Op {
    /// A write of `blocks` 4 KiB blocks at block `start`, while peer slot 0 is disconnected
    /// (its bits get set) and peer slot 1 connected.
    Write { start: u64, blocks: u64 },
    /// The oldest in-flight write completes everywhere.
    Complete,
    /// Lazy write-back of dirty bitmap pages.
    Flush,
    /// A resync to peer 0 finished for one extent: its bits are cleared (in memory only).
    Resynced { extent: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    let block = prop_oneof![
        3 => 0..10 * AL_EXTENT_SIZE / 4096,
        1 => 0..DATA_LEN / 4096 - 2048,
    ];
    prop_oneof![
        6 => (block, 1..2048u64).prop_map(|(start, blocks)| Op::Write { start, blocks }),
        3 => Just(Op::Complete),
        1 => Just(Op::Flush),
        1 => (0..EXTENTS).prop_map(|extent| Op::Resynced { extent }),
    ]
}

/// What the engine did, stamped with the metadata writes issued (and synced) before it.
#[derive(Debug)]
enum Event {
    /// Data write submitted (peer 0's bits set in memory).
    Submitted(u64, u64),
    /// Peer 0's bits cleared in memory.
    Cleared(u64, u64),
    /// An activity-log transaction became durable; the hot set it left.
    Committed(Vec<u64>),
}

struct Engine {
    store: MetaStore,
    sb: Superblock,
    al: ActivityLog,
    bitmaps: Vec<DirtyBitmap>,
    in_flight: VecDeque<RangeInclusive<u64>>,
    timeline: Vec<(u64, Event)>,
    faulty: Arc<Faulty>,
}

impl Engine {
    fn open(faulty: Arc<Faulty>) -> Engine {
        let (store, loaded) = open(faulty.clone(), "r0").unwrap();
        Engine {
            store,
            sb: loaded.superblock,
            al: loaded.activity_log,
            bitmaps: loaded.bitmaps,
            in_flight: VecDeque::new(),
            timeline: Vec::new(),
            faulty,
        }
    }

    fn record(&mut self, event: Event) {
        self.timeline.push((self.faulty.writes(), event));
    }

    fn complete_oldest(&mut self) {
        if let Some(range) = self.in_flight.pop_front() {
            self.al.release(range);
        }
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Write { start, blocks } => {
                let (offset, len) = (start * 4096, blocks * 4096);
                let extents = extents_for(offset, len).unwrap();
                loop {
                    match self.al.prepare(extents.clone()) {
                        Ok(AlPrepared::AllHot) => break,
                        Ok(AlPrepared::Transaction(update)) => {
                            self.store.write_al_update(&update, &self.bitmaps).unwrap();
                            self.al.commit(update);
                            let hot = self.al.hot_extents();
                            self.record(Event::Committed(hot));
                            break;
                        }
                        Err(AlError::Busy) => {
                            assert!(!self.in_flight.is_empty(), "busy with nothing in flight");
                            self.complete_oldest();
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                self.bitmaps[0].set_range(offset, len);
                self.record(Event::Submitted(offset, len));
                self.in_flight.push_back(extents);
            }
            Op::Complete => self.complete_oldest(),
            Op::Flush => {
                for slot in 0..self.bitmaps.len() {
                    let pages = self.bitmaps[slot].take_dirty_pages();
                    self.store.write_bitmap_pages(slot, &self.bitmaps[slot], pages).unwrap();
                }
            }
            Op::Resynced { extent } => {
                if self.in_flight.iter().all(|r| !r.contains(&extent)) {
                    self.bitmaps[0].clear_range(extent_offset(extent), AL_EXTENT_SIZE);
                    self.record(Event::Cleared(extent_offset(extent), AL_EXTENT_SIZE));
                }
            }
        }
    }

    /// Promote (PRIMARY_IND durable before the first write), run, shut down cleanly.
    fn run(&mut self, ops: &[Op]) {
        // `sb` still says AL_CLEAN from the last shutdown: the store drops it durably before the
        // first transaction makes an extent hot.
        self.sb.flags.insert(MetaFlags::PRIMARY_IND);
        self.store.write_superblock(&self.sb).unwrap();
        for op in ops {
            self.step(op);
        }
        while !self.in_flight.is_empty() {
            self.complete_oldest();
        }
        self.sb.flags.remove(MetaFlags::PRIMARY_IND);
        self.store.clean_shutdown(&self.sb, &mut self.bitmaps, &mut self.al).unwrap();
        // The emptying transaction is the write before the final superblock.
        self.timeline.push((self.faulty.writes() - 1, Event::Committed(Vec::new())));
    }
}

/// A disk that went through one clean session, so it starts with bits set and bitmap checksums
/// recorded.
fn session_image(first_session: &[Op]) -> (Vec<u8>, DirtyBitmap) {
    let disk = meta_disk();
    create(disk.clone(), "r0", false).unwrap();
    let mut engine = Engine::open(Arc::new(FaultyDisk::new(disk.clone())));
    engine.run(first_session);
    let bits = engine.bitmaps[0].clone();
    assert!(engine.store.superblock().peers.iter().all(|p| p.bitmap_crc.is_some()));
    (disk.snapshot(), bits)
}

/// The invariants after a crash at write `k` of a session (of `total` writes) that started with
/// `initial` bits: the metadata opens; every block written while peer 0 was away, and not
/// resynced since, is set in the on-disk bitmap or lies in a recovered hot extent; every extent
/// hot as of the last durable transaction is still hot, unless the transaction being written at
/// the crash (which may have landed whole) evicted it.
fn check_session(
    k: u64,
    total: u64,
    inner: Arc<MemDisk>,
    initial: &DirtyBitmap,
    timeline: &[(u64, Event)],
) {
    let (_, loaded) = open(inner, "r0").unwrap_or_else(|e| panic!("crash at {k}: {e}"));
    let mut must_cover = initial.clone();
    let mut hot_required = Vec::new();
    for (w, event) in timeline {
        match event {
            Event::Submitted(offset, len) if *w < k => {
                must_cover.set_range(*offset, *len);
            }
            Event::Cleared(offset, len) if *w < k => {
                must_cover.clear_range(*offset, *len);
            }
            Event::Committed(hot) if *w < k => hot_required.clone_from(hot),
            Event::Committed(hot) if *w == k => hot_required.retain(|e| hot.contains(e)),
            _ => {}
        }
    }
    let hot: BTreeSet<u64> = loaded.activity_log.hot_extents().into_iter().collect();
    if loaded.superblock.flags.contains(MetaFlags::AL_CLEAN) {
        assert!(hot.is_empty(), "crash at {k}: AL_CLEAN over hot extents {hot:?}");
    }
    for e in &hot_required {
        assert!(hot.contains(e), "crash at {k}: committed hot extent {e} lost; hot = {hot:?}");
    }
    for (start, len) in must_cover.runs() {
        for block in start..start + len {
            let extent = block * 4096 / AL_EXTENT_SIZE;
            assert!(
                loaded.bitmaps[0].test_block(block) || hot.contains(&extent),
                "crash at {k}: block {block} written while peer 0 was away is neither set nor hot"
            );
        }
    }
    let clean_done = k > total;
    if !hot.is_empty() && !clean_done {
        assert!(loaded.crashed_as_primary, "crash at {k}: hot extents without PRIMARY_IND");
    }
    if clean_done {
        assert!(hot.is_empty() && !loaded.crashed_as_primary);
        assert!(loaded.superblock.flags.contains(MetaFlags::AL_CLEAN));
        assert_eq!(loaded.bitmaps[0], must_cover, "a clean shutdown persists the exact bits");
    }
}

fn crash_every_write_of_a_session(first: &[Op], second: &[Op]) {
    let (image, initial) = session_image(first);
    // The timeline does not depend on the crash point; take it from a run without one.
    let (faulty, _) = rig(&image);
    let mut engine = Engine::open(faulty);
    engine.run(second);
    let total = engine.faulty.writes();
    let timeline = engine.timeline;
    let scenario = |faulty: Arc<Faulty>| Engine::open(faulty).run(second);
    for_every_crash(&image, scenario, |k, inner| {
        check_session(k, total, inner, &initial, &timeline);
    });
}

#[test]
fn engine_session_with_evictions_and_lazy_clears_survives_every_crash() {
    let ops: Vec<Op> = (0..40u64)
        .map(|i| match i % 5 {
            0 | 1 | 3 => Op::Write {
                start: (i * 7919) % (DATA_LEN / 4096 - 1100),
                blocks: 1 + i * 37 % 1100,
            },
            2 => Op::Complete,
            _ if i % 10 == 4 => Op::Flush,
            _ => Op::Resynced { extent: i * 13 % EXTENTS },
        })
        .collect();
    crash_every_write_of_a_session(&ops[..10], &ops);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    #[test]
    fn random_engine_sessions_survive_every_crash(
        first in prop::collection::vec(op(), 0..15),
        second in prop::collection::vec(op(), 1..40),
    ) {
        crash_every_write_of_a_session(&first, &second);
    }
}

/// After a crash as primary: mark the hot extents out of sync for every peer, persist the
/// bitmaps, empty the log, clear PRIMARY_IND. A crash anywhere in that must not lose coverage.
#[test]
fn recovery_after_a_crash_as_primary_is_itself_crash_safe() {
    let (image, before) = used_metadata("r0");
    let covered = |loaded: &Loaded, block: u64| {
        loaded.bitmaps[0].test_block(block)
            || loaded.activity_log.hot_extents().contains(&(block * 4096 / AL_EXTENT_SIZE))
    };
    let scenario = |faulty: Arc<Faulty>| {
        let (mut store, mut loaded) = open(faulty, "r0").unwrap();
        assert!(loaded.crashed_as_primary);
        for e in loaded.activity_log.hot_extents() {
            for bm in &mut loaded.bitmaps {
                bm.set_range(extent_offset(e), AL_EXTENT_SIZE);
            }
        }
        for (slot, bm) in loaded.bitmaps.iter_mut().enumerate() {
            let pages = bm.take_dirty_pages();
            store.write_bitmap_pages(slot, bm, pages).unwrap();
        }
        let update = loaded.activity_log.mark_clean().unwrap();
        store.write_al_update(&update, &loaded.bitmaps).unwrap();
        loaded.activity_log.commit(update);
        let mut sb = loaded.superblock.clone();
        sb.flags.remove(MetaFlags::PRIMARY_IND);
        sb.flags.insert(MetaFlags::AL_CLEAN);
        store.write_superblock(&sb).unwrap();
    };
    for_every_crash(&image, scenario, |k, inner| {
        let (_, after) = open(inner, "r0").unwrap_or_else(|e| panic!("crash at {k}: {e}"));
        if after.superblock.flags.contains(MetaFlags::AL_CLEAN) {
            assert!(after.activity_log.hot_extents().is_empty(), "crash at {k}");
        }
        for e in before.activity_log.hot_extents() {
            let first = extent_offset(e) / 4096;
            for block in first..first + AL_EXTENT_SIZE / 4096 {
                assert!(covered(&after, block), "crash at {k}: block {block} lost");
            }
        }
        for (start, len) in before.bitmaps[0].runs() {
            assert!((start..start + len).all(|b| covered(&after, b)), "crash at {k}");
        }
        if after.activity_log.hot_extents().is_empty() {
            let peer1 = &after.bitmaps[1];
            assert_eq!(peer1.weight(), 3 * AL_EXTENT_SIZE / 4096, "crash at {k}: peer 1 bits");
        }
    });
}

#[test]
fn al_clean_is_only_ever_written_over_an_empty_log() {
    let disk = meta_disk();
    create(disk.clone(), "r0", false).unwrap();
    let (mut store, mut loaded) = open(disk.clone(), "r0").unwrap();
    let mut stale = loaded.superblock.clone();
    stale.flags.insert(MetaFlags::AL_CLEAN);
    store.write_superblock(&stale).unwrap();
    assert!(store.superblock().flags.contains(MetaFlags::AL_CLEAN), "empty log: allowed");

    let al = &mut loaded.activity_log;
    let AlPrepared::Transaction(update) = al.prepare(3..=3).unwrap() else { unreachable!() };
    store.write_al_update(&update, &loaded.bitmaps).unwrap();
    al.commit(update);
    assert!(!store.superblock().flags.contains(MetaFlags::AL_CLEAN), "dropped before hot");
    store.write_superblock(&stale).unwrap();
    assert!(!store.superblock().flags.contains(MetaFlags::AL_CLEAN), "stale copy refused");
    let (_, reloaded) = open(disk.clone(), "r0").unwrap();
    assert!(!reloaded.superblock.flags.contains(MetaFlags::AL_CLEAN));
    assert_eq!(reloaded.activity_log.hot_extents(), vec![3]);

    al.release(3..=3);
    let update = al.mark_clean().unwrap();
    store.write_al_update(&update, &loaded.bitmaps).unwrap();
    al.commit(update);
    store.write_superblock(&stale).unwrap();
    assert!(store.superblock().flags.contains(MetaFlags::AL_CLEAN));
    let mut other_peers = stale.clone();
    other_peers.peers.pop();
    assert!(matches!(
        store.clean_shutdown(&other_peers, &mut loaded.bitmaps, al),
        Err(MetaError::InvalidParams(_))
    ));
}

#[test]
fn a_damaged_bitmap_page_loads_as_all_set_and_a_stale_intact_one_fails_the_clean_checksum() {
    let (image, _) = session_image(&[Op::Write { start: 5, blocks: 3 }]);
    let l = layout(image.len() as u64, DATA_LEN, false, params()).unwrap();
    // A byte of page 0 damaged: its blocks are all out of sync, the other pages as they were.
    let disk = Arc::new(MemDisk::from_vec(image.clone()));
    disk.write_at(&[0xff], l.bitmap_area_offset(0) + 100).unwrap();
    let (_, loaded) = open(disk, "r0").expect("a damaged page is over-reported, not refused");
    let bitmap = &loaded.bitmaps[0];
    assert_eq!(bitmap.weight(), BLOCKS_PER_PAGE.min(bitmap.blocks()), "page 0 all set");
    assert_eq!(loaded.bitmaps[1].weight(), 0, "the other peer's bitmap as it was");
    // An intact page of older content (a write that never landed) passes its own check; the
    // checksum of the clean shutdown catches it.
    let disk = Arc::new(MemDisk::from_vec(image));
    let stale = DirtyBitmap::new(l.data_size, params().bitmap_block_size).encode_page(0);
    disk.write_at(&stale, l.bitmap_area_offset(0)).unwrap();
    match open(disk, "r0") {
        Err(e @ MetaError::Corrupt { .. }) => assert!(e.to_string().contains("peer node 2"), "{e}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn open_reports_identity_and_geometry_mismatches() {
    let disk = meta_disk();
    create(disk.clone(), "r0", false).unwrap();
    let d: Arc<dyn Disk> = disk.clone();
    assert!(matches!(
        MetaStore::open(d.clone(), DATA_LEN, false, "r1", 1),
        Err(MetaError::OtherResource { found, expected }) if found == "r0" && expected == "r1"
    ));
    assert!(matches!(
        MetaStore::open(d.clone(), DATA_LEN, false, "r0", 2),
        Err(MetaError::WrongNode { found: 1, expected: 2 })
    ));
    assert!(matches!(
        MetaStore::open(d.clone(), DATA_LEN, true, "r0", 1),
        Err(MetaError::ConfigMismatch(_))
    ));
    match MetaStore::open(d.clone(), DATA_LEN - 4096, false, "r0", 1) {
        Err(e @ MetaError::Corrupt { .. }) => assert!(e.to_string().contains("resized"), "{e}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let blank: Arc<dyn Disk> = meta_disk();
    assert!(matches!(MetaStore::open(blank, DATA_LEN, false, "r0", 1), Err(MetaError::NoMetadata)));
    let (mut store, _) = MetaStore::open(d, DATA_LEN, false, "r0", 1).unwrap();
    let mut sb = store.superblock().clone();
    sb.resource = "other".into();
    assert!(matches!(store.write_superblock(&sb), Err(MetaError::ConfigMismatch(_))));
}

#[test]
fn internal_metadata_round_trips_and_io_errors_name_the_operation() {
    let disk = Arc::new(MemDisk::new(64 << 20));
    let len = disk.len().unwrap();
    let store =
        MetaStore::create(disk.clone(), len, true, MetaParams::default(), "r", 0, &[1], false)
            .unwrap();
    assert_eq!(store.layout().data_size + store.layout().meta_size, len);
    let (_, loaded) = MetaStore::open(disk.clone(), len, true, "r", 0).unwrap();
    assert_eq!(loaded.superblock.data_size, store.layout().data_size);
    assert!(!loaded.crashed_as_primary);
    assert_eq!(loaded.bitmaps.len(), 1);

    let faulty = Arc::new(FaultyDisk::new(disk));
    let (mut store, loaded) = MetaStore::open(faulty.clone(), len, true, "r", 0).unwrap();
    faulty.fail_nth_write(1, crate::disk::Fault::Enospc);
    let err = store.write_superblock(&loaded.superblock).unwrap_err();
    assert!(
        matches!(&err, MetaError::Io { what: "writing the superblock", source }
            if source.kind() == std::io::ErrorKind::StorageFull),
        "{err:?}"
    );
    assert!(err.to_string().contains("writing the superblock"));
    // A failed write left the current slot alone: the store retries into the other slot.
    store.write_superblock(&loaded.superblock).unwrap();
    let (_, reloaded) = MetaStore::open(faulty, len, true, "r", 0).unwrap();
    assert_eq!(reloaded.superblock, loaded.superblock);
}

/// The fuzzer's find: a superblock whose sequence number is the last below 2^63 loads (it may
/// be the newest slot), but the update after it would not load, so it is refused with a clear
/// error instead of written, and what is on disk still loads.
#[test]
fn a_superblock_at_the_end_of_its_sequence_loads_but_takes_no_update() {
    let disk = meta_disk();
    let store = create(disk.clone(), "r0", false).unwrap();
    let offset = store.layout().superblock_offsets()[0];
    let mut block: Block = [0; BLOCK_SIZE];
    disk.read_at(&mut block, offset).unwrap();
    block[16..24].copy_from_slice(&(SEQ_LIMIT - 1).to_le_bytes());
    let crc = block_crc(&block, superblock::CRC_OFFSET);
    block[superblock::CRC_OFFSET..superblock::CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    disk.write_at(&block, offset).unwrap();

    let (mut store, loaded) = open(disk.clone(), "r0").expect("the last sequence number loads");
    let err = store.write_superblock(&loaded.superblock).unwrap_err();
    assert!(matches!(err, MetaError::SuperblockExhausted { seq } if seq == SEQ_LIMIT - 1), "{err}");
    assert!(err.to_string().contains("create-md --force"), "says what to do: {err}");
    open(disk, "r0").expect("the refused update left the metadata loadable");
}
