//! Resync: the source walks its bitmap for the target in disk order and sends each dirty run;
//! a bit is cleared only when a barrier ack proves the target holds the block durably.
//!
//! Application writes keep flowing during a resync. A block being read for resync is locked
//! against writes ([`read_range_then`]), so its resync copy enters the stream before any newer
//! write to it: the target, applying the stream in order, can never end with stale data.
//!
//! With `csums_resync` the source sends the digests of each dirty run first (`DigestRequest`);
//! the target compares them with its own blocks and answers which differ. Only those are sent as
//! data; a block that matched is recorded in the transfer log like a write without data, so its
//! bit clears with the next barrier ack (after which the target's copy is durable too).

use super::state::State;
use crate::replica::{ResyncChunk, ResyncStep};
use super::shared::Shared;
use super::{congestion, connection};
use crate::core::block_digest::block_digests;
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a resync or verify thread waits for an answer before it looks at the state again.
pub(super) const WAIT_SLICE: Duration = Duration::from_millis(100);

/// Reads `[offset, offset + len)` with application writes to it held off, turns the bytes into
/// a frame's contents outside the engine lock (`prepare`), and calls `send` under the lock
/// before any write to the range may proceed: what `send` queues enters the peer's stream ahead
/// of every later write to those blocks, so the peer, applying its stream in order, writes or
/// compares exactly the data this node held at that point. `None` when `still` says the job
/// ended meanwhile.
pub(super) fn read_range_then<P, T>(
    shared: &Shared,
    offset: u64,
    len: u64,
    still: impl Fn(&State) -> bool,
    prepare: impl FnOnce(Vec<u8>) -> P,
    send: impl FnOnce(&mut State, P) -> T,
) -> Result<Option<T>, String> {
    let range = (offset, len);
    let mut st = shared.lock();
    while st.replica.overlaps_busy(offset, len) {
        st = st.wait();
    }
    if !still(&st) {
        return Ok(None);
    }
    st.replica.read_lock(range);
    drop(st);

    let mut buf = vec![0u8; len as usize];
    let prepared = shared.data.read_at(&mut buf, offset).map(|()| prepare(buf));

    let mut st = shared.lock();
    // What `send` queues goes first: unlocking starts the writes that waited for the range,
    // and their frames must follow it.
    let sent = prepared.map(|prepared| still(&st).then(|| send(&mut st, prepared)));
    st.replica.read_unlock(range);
    shared.changed.notify_all();
    sent.map_err(|e| format!("read at {offset}+{len} failed: {e}"))
}

/// Starts the resync source's walk on a thread of its own (after the engine lock is released).
/// A walk that cannot go on (a failed read) is reported to the replica, which decides what
/// becomes of the resync; a thread that cannot be started drops the link, and the resync
/// starts again at the next connect.
pub fn spawn_source(shared: Arc<Shared>, peer_id: u8, generation: u64) {
    let walker = shared.clone();
    let spawned = std::thread::Builder::new().name(format!("resync-{peer_id}")).spawn(move || {
        if let Err(reason) = run_source(&walker, peer_id, generation) {
            walker.lock().replica.resync_walk_failed(peer_id, generation, reason);
        }
    });
    if let Err(e) = spawned {
        connection::lost(&shared, peer_id, generation, &format!("cannot start the resync thread: {e}"));
    }
}

fn run_source(shared: &Arc<Shared>, peer_id: u8, generation: u64) -> Result<(), String> {
    let csums = shared.config.csums_resync;
    let block_size = shared.config.bitmap_block_size as usize;
    shared.lock().replica.resync_source_started(Instant::now(), peer_id);
    loop {
        let mut st = shared.lock();
        if !st.replica.resyncing(peer_id, generation) {
            return Ok(());
        }
        let (offset, len, digests) = match st.replica.resync_next(Instant::now(), peer_id, csums) {
            ResyncStep::Finished => return Ok(()),
            ResyncStep::Wait => {
                drop(st.wait_timeout(WAIT_SLICE));
                continue;
            }
            ResyncStep::Pace(wait) => {
                drop(st);
                std::thread::sleep(wait.min(WAIT_SLICE));
                continue;
            }
            ResyncStep::Read { offset, len, digests } => (offset, len, digests),
        };
        let link = st.link(peer_id).cloned().ok_or("link closed")?;
        drop(st);

        link.wait_for_room(congestion::resync_room_bytes(&shared.config));
        let prepare = |data: Vec<u8>| match digests {
            true => ResyncChunk::Digests(block_digests(&data, block_size)),
            false => ResyncChunk::Data(Bytes::from(data)),
        };
        let send = |st: &mut State, chunk| st.replica.resync_chunk_read(peer_id, offset, len, chunk);
        let still = |st: &State| st.replica.resyncing(peer_id, generation);
        if read_range_then(shared, offset, len, still, prepare, send)?.is_none() {
            return Ok(());
        }
    }
}

