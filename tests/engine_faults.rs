//! The engine on a fault-injecting disk: a full disk or a failing disk fails the request with
//! the right error and loses nothing that was acknowledged before.

use blkrepl::config::ResourceConfig;
use blkrepl::disk::{Disk, Fault, FaultyDisk, MemDisk};
use blkrepl::engine::Engine;
use blkrepl::frontend::{BlockDevice, BlockError, BlockRequest, BlockResult};
use blkrepl::meta::{MetaParams, MetaStore};
use bytes::Bytes;
use std::path::Path;
use std::sync::mpsc::channel;
use std::sync::Arc;

const DISK_BYTES: usize = 32 << 20;

/// Quorum off: these tests run one node whose peer never comes.
fn config() -> ResourceConfig {
    let text = r#"
name = "r0"
quorum = "off"
[[node]]
name = "alpha"
address = "127.0.0.1:1"
disk = "/unused"
[[node]]
name = "beta"
address = "127.0.0.1:2"
disk = "/unused"
"#;
    ResourceConfig::parse(Path::new("r0.toml"), text).unwrap()
}

fn submit(engine: &Engine, request: BlockRequest) -> BlockResult {
    let (tx, rx) = channel();
    engine.submit(request, Box::new(move |result| tx.send(result).unwrap()));
    rx.recv().unwrap()
}

/// A primary (forced, its peer absent) on a faulty in-memory disk.
fn primary_on_faulty_disk() -> (Engine, Arc<FaultyDisk<MemDisk>>) {
    let config = config();
    let me = config.node("alpha").unwrap().clone();
    let disk = Arc::new(FaultyDisk::new(MemDisk::new(DISK_BYTES)));
    let params = MetaParams { max_peers: 1, ..MetaParams::default() };
    MetaStore::create(disk.clone(), DISK_BYTES as u64, true, params, "r0", 0, &[1], false).unwrap();
    // No frontend is configured: nothing is kept in the run directory.
    let engine = Engine::open_on(config, me, disk.clone() as Arc<dyn Disk>, None, Path::new("/nonexistent")).unwrap();
    engine.promote(true).unwrap();
    (engine, disk)
}

fn write(offset: u64, byte: u8, len: usize) -> BlockRequest {
    BlockRequest::Write { offset, data: Bytes::from(vec![byte; len]), fua: false }
}

#[test]
fn full_disk_fails_the_write_with_enospc_and_keeps_earlier_data() {
    let (engine, disk) = primary_on_faulty_disk();
    submit(&engine, write(0, 0xAB, 65536)).unwrap();
    submit(&engine, BlockRequest::Flush).unwrap();
    disk.fail_writes_after(0, Fault::Enospc);
    assert_eq!(submit(&engine, write(1 << 20, 0xCD, 4096)), Err(BlockError::NoSpace));
    disk.heal();
    let read = submit(&engine, BlockRequest::Read { offset: 0, len: 65536 }).unwrap().unwrap();
    assert!(read.iter().all(|b| *b == 0xAB), "acknowledged data changed");
    // The disk has room again: writing works again.
    submit(&engine, write(1 << 20, 0xCD, 4096)).unwrap();
    let read = submit(&engine, BlockRequest::Read { offset: 1 << 20, len: 4096 }).unwrap().unwrap();
    assert!(read.iter().all(|b| *b == 0xCD));
}

#[test]
fn io_error_fails_the_write_then_every_request_until_the_primary_is_demoted() {
    let (engine, disk) = primary_on_faulty_disk();
    submit(&engine, write(8192, 0x11, 4096)).unwrap();
    disk.fail_writes_after(0, Fault::Eio);
    assert_eq!(submit(&engine, write(8192, 0x22, 4096)), Err(BlockError::Io));
    assert_eq!(submit(&engine, BlockRequest::Flush), Err(BlockError::Io));
    disk.heal();
    // The disk may be dying: what it holds is vouched for no more, even where it reads.
    assert_eq!(submit(&engine, BlockRequest::Read { offset: 0, len: 4096 }), Err(BlockError::Io));
    assert_eq!(submit(&engine, write(0, 0x33, 4096)), Err(BlockError::Io));
    let why = engine.status().local_write_failed.expect("status says why");
    assert!(why.contains("8192+4096"), "{why}");
    // The operator (or the cluster manager) demotes it; promoted again, it serves.
    engine.demote().unwrap();
    assert_eq!(engine.status().local_write_failed, None, "a secondary refuses nothing");
    engine.promote(true).unwrap();
    submit(&engine, write(0, 0x33, 4096)).unwrap();
    let read = submit(&engine, BlockRequest::Read { offset: 0, len: 4096 }).unwrap().unwrap();
    assert!(read.iter().all(|b| *b == 0x33));
}

#[test]
fn a_failed_flush_fails_every_later_flush_and_request_until_the_primary_is_demoted() {
    let (engine, disk) = primary_on_faulty_disk();
    submit(&engine, write(8192, 0x11, 4096)).unwrap();
    disk.fail_next_sync(Fault::Eio);
    assert_eq!(submit(&engine, BlockRequest::Flush), Err(BlockError::Io));
    // The disk syncs again, but what the failed flush held may be gone: no flush vouches for it.
    assert_eq!(submit(&engine, BlockRequest::Flush), Err(BlockError::Io));
    assert_eq!(submit(&engine, BlockRequest::Read { offset: 8192, len: 4096 }), Err(BlockError::Io));
    let why = engine.status().local_write_failed.expect("status says why");
    assert!(why.contains("flush"), "{why}");
    engine.demote().unwrap();
    assert_eq!(engine.status().local_write_failed, None);
    engine.promote(true).unwrap();
    submit(&engine, write(0, 0x22, 4096)).unwrap();
    submit(&engine, BlockRequest::Flush).unwrap();
}

#[test]
fn forced_promotion_of_fresh_metadata_owes_the_peer_the_whole_device() {
    let (engine, _disk) = primary_on_faulty_disk();
    let status = engine.status();
    assert_eq!(status.disk, "UpToDate");
    assert_eq!(status.peers[0].out_of_sync_bytes, engine.size_bytes());
    submit(&engine, write(4 << 20, 0x33, 8192)).unwrap();
    assert_eq!(engine.status().peers[0].out_of_sync_bytes, engine.size_bytes());
}

#[test]
fn requests_outside_the_device_are_invalid() {
    let (engine, _disk) = primary_on_faulty_disk();
    let size = engine.size_bytes();
    assert_eq!(submit(&engine, write(size, 0, 4096)), Err(BlockError::Invalid));
    assert_eq!(submit(&engine, BlockRequest::Read { offset: size - 512, len: 4096 }), Err(BlockError::Invalid));
}

/// A primary whose data and metadata live on two faulty in-memory disks, as `meta_disk` puts
/// them (opened again by `up` after `down`, see below).
fn open_with_meta(data: &Arc<FaultyDisk<MemDisk>>, meta: &Arc<FaultyDisk<MemDisk>>) -> Engine {
    let config = config();
    let me = config.node("alpha").unwrap().clone();
    Engine::open_on(config, me, data.clone() as Arc<dyn Disk>, Some(meta.clone() as Arc<dyn Disk>), Path::new("/nonexistent")).unwrap()
}

#[test]
fn a_failed_metadata_write_detaches_the_disk_and_the_next_up_recovers_it() {
    let data = Arc::new(FaultyDisk::new(MemDisk::new(DISK_BYTES)));
    let meta = Arc::new(FaultyDisk::new(MemDisk::new(4 << 20)));
    let params = MetaParams { max_peers: 1, ..MetaParams::default() };
    MetaStore::create(meta.clone(), DISK_BYTES as u64, false, params, "r0", 0, &[1], false).unwrap();
    let engine = open_with_meta(&data, &meta);
    engine.promote(true).unwrap();
    submit(&engine, write(0, 0xAB, 65536)).unwrap();
    submit(&engine, BlockRequest::Flush).unwrap();
    // A thin pool ran out under the metadata: the activity-log transaction of a write into a
    // cold extent fails, and the write never reaches the data disk.
    meta.fail_nth_write(1, Fault::Enospc);
    let data_writes = data.writes();
    assert_eq!(submit(&engine, write(16 << 20, 0xCD, 4096)), Err(BlockError::Io));
    assert_eq!(engine.status().disk, "Failed");
    // Detached: every request fails, and neither disk is written again, room or not.
    meta.heal();
    let meta_writes = meta.writes();
    assert_eq!(submit(&engine, write(0, 0x11, 4096)), Err(BlockError::Io));
    assert_eq!(submit(&engine, write(20 << 20, 0x11, 4096)), Err(BlockError::Io));
    assert_eq!(submit(&engine, BlockRequest::Read { offset: 0, len: 4096 }), Err(BlockError::Io));
    assert_eq!(submit(&engine, BlockRequest::Flush), Err(BlockError::Io));
    let why = engine.status().local_write_failed.expect("status says why");
    assert!(why.contains("activity-log transaction") && why.contains("No space left"), "{why}");
    // `down` demotes it and writes nothing either; it cannot be promoted meanwhile.
    engine.demote().unwrap();
    assert!(engine.promote(true).is_err(), "a Failed disk is promoted no more");
    engine.shutdown(|| {}).unwrap();
    drop(engine);
    assert_eq!((meta.writes(), data.writes()), (meta_writes, data_writes), "a detached disk is written no more");
    // `up`: the metadata is whole (no hole in the activity log's ring), recovered as after a
    // crash of a primary, and the acknowledged data is there.
    let engine = open_with_meta(&data, &meta);
    assert_eq!(engine.status().disk, "Consistent");
    engine.promote(true).unwrap();
    let read = submit(&engine, BlockRequest::Read { offset: 0, len: 65536 }).unwrap().unwrap();
    assert!(read.iter().all(|b| *b == 0xAB), "acknowledged data changed");
    let read = submit(&engine, BlockRequest::Read { offset: 16 << 20, len: 4096 }).unwrap().unwrap();
    assert!(read.iter().all(|b| *b == 0), "the failed write reached the disk");
    submit(&engine, write(16 << 20, 0xCD, 4096)).unwrap();
}

#[test]
fn a_failed_bitmap_page_of_an_evicting_transaction_detaches_the_disk_before_the_write() {
    let data = Arc::new(FaultyDisk::new(MemDisk::new(DISK_BYTES)));
    let meta = Arc::new(FaultyDisk::new(MemDisk::new(4 << 20)));
    // Seven slots for the device's eight extents: the eighth extent written evicts one.
    let params = MetaParams { max_peers: 1, al_extents: 7, ..MetaParams::default() };
    MetaStore::create(meta.clone(), DISK_BYTES as u64, false, params, "r0", 0, &[1], false).unwrap();
    let engine = open_with_meta(&data, &meta);
    engine.promote(true).unwrap();
    let extent = 4u64 << 20;
    for e in 0..7 {
        submit(&engine, write(e * extent, 0xAB, 4096)).unwrap();
    }
    // The eviction writes the bitmap pages of the extent leaving the log (after a superblock
    // that no longer vouches for the bitmap's checksum) before the transaction block, as it
    // carries out the action; the first of those writes fails. (The test above fails the
    // block itself, written later on the I/O pool.)
    meta.fail_nth_write(1, Fault::Eio);
    let data_writes = data.writes();
    assert_eq!(submit(&engine, write(7 * extent, 0xCD, 4096)), Err(BlockError::Io));
    assert_eq!(engine.status().disk, "Failed");
    assert_eq!(data.writes(), data_writes, "the write reached the data disk without its transaction");
    let why = engine.status().local_write_failed.expect("status says why");
    assert!(why.contains("activity-log transaction") && why.contains("Input/output error"), "{why}");
    meta.heal();
    engine.demote().unwrap();
    engine.shutdown(|| {}).unwrap();
    drop(engine);
    // `up` again: what was acknowledged is there, and the failed write is not.
    let engine = open_with_meta(&data, &meta);
    engine.promote(true).unwrap();
    for e in 0..7 {
        let read = submit(&engine, BlockRequest::Read { offset: e * extent, len: 4096 }).unwrap().unwrap();
        assert!(read.iter().all(|b| *b == 0xAB), "acknowledged data changed in extent {e}");
    }
    let read = submit(&engine, BlockRequest::Read { offset: 7 * extent, len: 4096 }).unwrap().unwrap();
    assert!(read.iter().all(|b| *b == 0), "the failed write reached the disk");
}
