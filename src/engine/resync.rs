//! Resync: the source walks its bitmap for the target in disk order and sends each dirty run;
//! a bit is cleared only when a barrier ack proves the target holds the block durably.
//!
//! Application writes keep flowing during a resync. A block being read for resync is locked
//! against writes (`State::resync_lock`), so its resync copy enters the stream before any newer
//! write to it: the target, applying the stream in order, can never end with stale data.

use super::state::{Deferred, State};
use super::{connection, write_path, Shared};
use crate::core::states::{DiskState, ReplState, Role};
use crate::meta::MetaFlags;
use crate::wire::Message;
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest resync frame.
const MAX_CHUNK_BYTES: u64 = 256 << 10;
/// Resync frames per epoch before a barrier, which lets bits clear (and progress advance) in
/// steps of this many chunks.
const CHUNKS_PER_EPOCH: u32 = 32;

pub fn spawn_source(shared: Arc<Shared>, peer_id: u8, generation: u64) {
    std::thread::Builder::new()
        .name(format!("resync-{peer_id}"))
        .spawn(move || {
            if let Err(reason) = run_source(&shared, peer_id, generation) {
                let mut st = shared.lock();
                if st.peer(peer_id).generation == generation {
                    let mut deferred = Deferred::default();
                    connection::drop_peer(&shared, &mut st, peer_id, &reason, &mut deferred);
                    drop(st);
                    deferred.run();
                }
            }
        })
        .expect("spawn resync thread");
}

fn still_syncing(st: &State, peer_id: u8, generation: u64) -> bool {
    let peer = st.peer(peer_id);
    !st.stopping && peer.generation == generation && peer.repl == ReplState::SyncSource
}

fn run_source(shared: &Arc<Shared>, peer_id: u8, generation: u64) -> Result<(), String> {
    let rate_bytes_per_s = shared.config.resync_rate_max_kib * 1024;
    let started = Instant::now();
    let mut sent_bytes = 0u64;
    let mut cursor = 0u64;
    // Epoch whose barrier must be acked before the bitmap is scanned again from the start.
    let mut draining: Option<u64> = None;
    loop {
        // Rate limit: never ahead of the configured maximum.
        let allowed = rate_bytes_per_s.saturating_mul(started.elapsed().as_millis() as u64) / 1000;
        if sent_bytes > allowed {
            std::thread::sleep(Duration::from_millis(((sent_bytes - allowed) * 1000 / rate_bytes_per_s).clamp(1, 100)));
            continue;
        }
        let mut st = shared.lock();
        if !still_syncing(&st, peer_id, generation) {
            return Ok(());
        }
        let slot = st.peer(peer_id).slot;
        if let Some(epoch) = draining {
            if st.peer(peer_id).barriers.iter().any(|(e, _)| *e <= epoch) {
                let _ = shared.changed.wait_timeout(st, Duration::from_millis(100));
                continue;
            }
            draining = None;
            cursor = 0;
        }
        let block_size = u64::from(st.bitmaps[slot].block_size());
        let Some((start, blocks)) = st.bitmaps[slot].next_run(cursor, MAX_CHUNK_BYTES / block_size) else {
            if cursor == 0 {
                // Every bit is clear: each block was resent and barrier-acked.
                let uuids = st.sb.uuids;
                let link = st.peer(peer_id).link.clone().ok_or("link closed")?;
                link.send_bulk(Message::ResyncDone { current_uuid: uuids.current, history: uuids.history }, None);
                return Ok(());
            }
            draining = Some(write_path::send_barriers(&mut st));
            continue;
        };
        let offset = start * block_size;
        let len = (blocks * block_size).min(shared.data_size_bytes - offset);
        while st.overlaps_busy(offset, len) {
            st = shared.changed.wait(st).expect("engine state lock poisoned");
        }
        if !still_syncing(&st, peer_id, generation) {
            return Ok(());
        }
        st.resync_lock = Some((offset, len));
        let link = st.peer(peer_id).link.clone().ok_or("link closed")?;
        drop(st);

        link.wait_for_room();
        let mut buf = vec![0u8; len as usize];
        let read = shared.data.read_at(&mut buf, offset);

        let mut st = shared.lock();
        st.resync_lock = None;
        shared.changed.notify_all();
        read.map_err(|e| format!("resync read at {offset} failed: {e}"))?;
        if !still_syncing(&st, peer_id, generation) {
            return Ok(());
        }
        let epoch = st.epoch;
        let peer = st.peer_mut(peer_id);
        peer.tl.record(epoch, offset, len);
        link.send_bulk(Message::ResyncData { offset, payload: Bytes::from(buf) }, None);
        let close = peer.tl.open_epoch_writes() >= CHUNKS_PER_EPOCH;
        if close {
            write_path::send_barriers(&mut st);
        }
        cursor = start + blocks;
        sent_bytes += len;
    }
}

/// A resync block from the source (this node is the target).
pub fn apply_resync_data(shared: &Arc<Shared>, peer_id: u8, offset: u64, payload: &[u8]) -> Result<(), String> {
    let len = payload.len() as u64;
    {
        let st = shared.lock();
        if st.peer(peer_id).repl != ReplState::SyncTarget {
            return Err("resync data while not SyncTarget".into());
        }
        if offset.checked_add(len).is_none_or(|end| end > shared.data_size_bytes) {
            return Err(format!("resync data at {offset}+{len} is outside the device"));
        }
    }
    shared.data.write_at(payload, offset).map_err(|e| format!("resync write at {offset} failed: {e}"))?;
    let mut st = shared.lock();
    let peer = st.peer_mut(peer_id);
    peer.rx_epoch_writes += 1;
    peer.received_bytes += len;
    let slot = peer.slot;
    // Only for progress on this side; the source's bitmap is the authority.
    st.bitmaps[slot].clear_range(offset, len);
    Ok(())
}

/// The source finished (or, for two fresh nodes, declared them in sync): adopt its generation.
pub fn finish_as_target(shared: &Arc<Shared>, peer_id: u8, current: u64, history: [u64; 4]) -> Result<(), String> {
    let mut st = shared.lock();
    let fresh = crate::core::sync_decision::same_uuid(st.sb.uuids.current, crate::core::sync_decision::UUID_JUST_CREATED);
    let peer = st.peer(peer_id);
    if peer.repl != ReplState::SyncTarget && !(fresh && peer.repl == ReplState::Established) {
        return Err("ResyncDone while not SyncTarget".into());
    }
    if st.role == Role::Primary {
        return Err("ResyncDone on a Primary".into());
    }
    shared.data.sync().map_err(|e| format!("flush at the end of resync failed: {e}"))?;
    let slot = peer.slot;
    let mut generation = st.generation();
    generation.resync_finished_as_target(slot, current, history);
    st.set_generation(generation);
    st.bitmaps[slot].clear_all();
    st.sb.flags.insert(MetaFlags::CONSISTENT | MetaFlags::WAS_UP_TO_DATE);
    clear_crash_marker(&mut st, peer_id);
    st.persist_bitmap(slot).map_err(|e| format!("cannot persist the bitmap: {e}"))?;
    st.persist().map_err(|e| format!("cannot persist the end of resync: {e}"))?;
    st.disk = DiskState::UpToDate;
    let peer = st.peer_mut(peer_id);
    peer.repl = ReplState::Established;
    peer.resync = None;
    tracing::info!(resource = %shared.config.name, peer = %peer.name, "resync finished: UpToDate");
    st.broadcast_state();
    shared.changed.notify_all();
    Ok(())
}

/// The target confirmed it is UpToDate: the resync is over.
pub fn finish_as_source(shared: &Arc<Shared>, st: &mut State, peer_id: u8) -> Result<(), String> {
    let slot = st.peer(peer_id).slot;
    let mut generation = st.generation();
    generation.resync_finished_as_source(slot);
    st.set_generation(generation);
    clear_crash_marker(st, peer_id);
    st.persist_bitmap(slot).map_err(|e| format!("cannot persist the bitmap: {e}"))?;
    st.persist().map_err(|e| format!("cannot persist the end of resync: {e}"))?;
    let peer = st.peer_mut(peer_id);
    peer.repl = ReplState::Established;
    peer.resync = None;
    tracing::info!(resource = %shared.config.name, peer = %peer.name, "resync finished: peer UpToDate");
    st.broadcast_state();
    Ok(())
}

/// After a crash as primary, the activity log's extents are repaired once a resync with every
/// data peer has completed; until then the marker stays (in memory and in the metadata), so the
/// peers not yet met still resync those extents and a second crash does not forget them.
fn clear_crash_marker(st: &mut State, peer_id: u8) {
    if !st.crashed_primary {
        return;
    }
    st.crash_repair_pending.retain(|id| *id != peer_id);
    if st.crash_repair_pending.is_empty() {
        st.crashed_primary = false;
        if st.role != Role::Primary {
            st.sb.flags.remove(MetaFlags::PRIMARY_IND);
        }
    }
}
