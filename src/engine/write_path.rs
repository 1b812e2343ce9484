//! Requests from the frontends on the primary: reads are served locally; writes go to the local
//! disk and to every replicating peer, and complete when the protocol says so; flushes close an
//! epoch and wait for the barrier acks.

use super::io_pool::IoOp;
use super::state::{Deferred, State};
use crate::core::quorum::Admission;
use crate::replica::PendingFlush;
use std::time::Instant;
use super::link::BULK_QUEUE_LIMIT_BYTES;
use super::{congestion, Shared};
use crate::config::Protocol;
use crate::core::inflight::{AckLevel, Finished, LocalFailure, PeerSet};
use crate::core::states::{DiskState, Role};
use crate::frontend::{BlockError, BlockRequest, BlockResult, Completion};
use crate::meta::activity_log::{extents_for, AlError, AlPrepared};
use crate::meta::MetaError;
use crate::wire::{Message, MAX_DATA_BYTES};
use bytes::Bytes;
use std::io;
use std::sync::{Arc, Mutex};

/// An epoch is closed with a barrier after this many writes even without a FLUSH, which bounds
/// the transfer log (and so the resync after a lost connection).
const MAX_EPOCH_WRITES: u32 = 4096;

pub fn submit(shared: &Arc<Shared>, request: BlockRequest, done: Completion) {
    match request {
        BlockRequest::Read { offset, len } => submit_read(shared, offset, len, done),
        BlockRequest::Write { offset, data, fua } if data.len() > MAX_DATA_BYTES => {
            submit_in_pieces(shared, offset, data, fua, done)
        }
        BlockRequest::Write { offset, data, fua } => {
            let len = data.len() as u64;
            submit_write(shared, offset, len, WriteKind::Data { data, fua }, done)
        }
        BlockRequest::WriteZeroes { offset, len, fua } => {
            submit_write(shared, offset, u64::from(len), WriteKind::Zeroes { discard: false, fua }, done)
        }
        BlockRequest::Discard { offset, len } => {
            submit_write(shared, offset, u64::from(len), WriteKind::Zeroes { discard: true, fua: false }, done)
        }
        BlockRequest::Flush => submit_flush(shared, done),
    }
}

/// A write larger than one Data frame (qemu-img sends 2 MiB writes, NBD allows 32 MiB) goes out
/// as several pieces; the request completes when all have, with the first error if any failed.
fn submit_in_pieces(shared: &Arc<Shared>, offset: u64, data: Bytes, fua: bool, done: Completion) {
    struct Pending {
        remaining: usize,
        result: BlockResult,
        done: Option<Completion>,
    }
    let pieces = data.len().div_ceil(MAX_DATA_BYTES);
    let pending = Arc::new(Mutex::new(Pending { remaining: pieces, result: Ok(None), done: Some(done) }));
    for start in (0..data.len()).step_by(MAX_DATA_BYTES) {
        let piece = data.slice(start..(start + MAX_DATA_BYTES).min(data.len()));
        let pending = pending.clone();
        let piece_done: Completion = Box::new(move |result| {
            let mut p = pending.lock().expect("piece completion lock");
            if p.result.is_ok() {
                p.result = result;
            }
            p.remaining -= 1;
            if p.remaining == 0 {
                let (done, result) = (p.done.take(), std::mem::replace(&mut p.result, Ok(None)));
                drop(p);
                if let Some(done) = done {
                    done(result);
                }
            }
        });
        let len = piece.len() as u64;
        submit_write(shared, offset + start as u64, len, WriteKind::Data { data: piece, fua }, piece_done);
    }
}

/// A write this primary holds before it touches any disk: it has no quorum (suspend-io), so the
/// write may never be acknowledged, and written here it would make this replica differ from the
/// side that may be promoted (a split brain at the heal). Submitted again, in arrival order, once
/// quorum returns; failed if this node steps down or is demoted.
pub struct HeldWrite {
    offset: u64,
    len: u64,
    kind: WriteKind,
    pub done: Completion,
}

/// Submits a held write again (see [`HeldWrite`]).
pub fn resubmit(shared: &Arc<Shared>, held: HeldWrite) {
    submit_write(shared, held.offset, held.len, held.kind, held.done);
}

enum WriteKind {
    Data { data: Bytes, fua: bool },
    /// Zeroes, or a discard (which must also read back as zeroes on every replica, so replicas
    /// stay identical).
    Zeroes { discard: bool, fua: bool },
}

impl WriteKind {
    fn fua(&self) -> bool {
        match self {
            WriteKind::Data { fua, .. } | WriteKind::Zeroes { fua, .. } => *fua,
        }
    }
}

/// Whether a write may start now, must wait for quorum (before it touches any disk), or fails.
fn writable(shared: &Shared, st: &State, offset: u64, len: u64) -> Result<Admission, BlockError> {
    if st.replica.stopping {
        return Err(BlockError::Shutdown);
    }
    if st.replica.role != Role::Primary {
        return Err(BlockError::ReadOnly);
    }
    if st.replica.disk != DiskState::UpToDate {
        return Err(BlockError::Io);
    }
    in_bounds(shared, offset, len)?;
    // Writes already held keep their place: a later one waits behind them.
    if !st.held_writes.is_empty() {
        return Ok(Admission::Hold);
    }
    match st.replica.admission(Instant::now()) {
        Admission::Refuse => Err(BlockError::Io),
        admission => Ok(admission),
    }
}

fn in_bounds(shared: &Shared, offset: u64, len: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= shared.data_size_bytes => Ok(()),
        _ => Err(BlockError::Invalid),
    }
}

fn submit_read(shared: &Arc<Shared>, offset: u64, len: u32, done: Completion) {
    {
        let st = shared.lock();
        if st.replica.role != Role::Primary {
            return done(Err(BlockError::ReadOnly));
        }
        if let Err(e) = in_bounds(shared, offset, u64::from(len)) {
            return done(Err(e));
        }
    }
    shared.io.submit(
        IoOp::Read { offset, len: len as usize },
        Box::new(move |result| done(result.map_err(|e| io_error(&e)))),
    );
}

fn submit_write(shared: &Arc<Shared>, offset: u64, len: u64, kind: WriteKind, done: Completion) {
    // Back-pressure: a full send queue slows writers down (under pull-ahead the peer is left
    // behind first). The wait happens outside the engine lock, so it never blocks the acks that
    // drain the queue.
    let mut st = loop {
        let mut st = shared.lock();
        let mut deferred = Deferred::default();
        if congestion::pull_ahead_if_congested(shared, &mut st, &mut deferred) {
            drop(st);
            deferred.run(shared);
            continue;
        }
        let replicating = st.replica.peers.iter().filter(|p| p.is_replicating());
        let full = replicating.filter_map(|p| st.link(p.node_id)).find(|l| l.is_full()).cloned();
        match full {
            None => break st,
            Some(link) => {
                drop(st);
                link.wait_for_room(BULK_QUEUE_LIMIT_BYTES);
            }
        }
    };
    match writable(shared, &st, offset, len) {
        Ok(Admission::Proceed) => {}
        Ok(_) => {
            if st.held_writes.is_empty() {
                tracing::warn!(resource = %shared.config.name, quorum = ?st.replica.quorum(Instant::now()),
                    "no quorum, or an old primary still seen: holding new writes before they reach any disk");
            }
            st.held_writes.push(HeldWrite { offset, len, kind, done });
            return;
        }
        Err(e) => {
            drop(st);
            return done(Err(e));
        }
    }
    // Overlapping writes land in the same order everywhere: wait for the earlier one.
    while st.replica.overlaps_busy(offset, len) {
        st = st.wait();
    }
    let Some(extents) = extents_for(offset, len) else {
        drop(st);
        return done(Err(BlockError::Invalid));
    };
    let prepared = loop {
        match st.replica.al.prepare(extents.clone()) {
            Ok(prepared) => break prepared,
            Err(AlError::Busy) => st = st.wait(),
            Err(e) => {
                drop(st);
                tracing::warn!(resource = %shared.config.name, error = %e, offset, len, "write refused");
                return done(Err(BlockError::Invalid));
            }
        }
    };
    if let Err(e) = make_extents_hot(&mut st, prepared) {
        tracing::error!(resource = %shared.config.name, error = %e, "activity log write failed");
        st.replica.disk = DiskState::Failed;
        st.replica.al.release(extents);
        drop(st);
        return done(Err(BlockError::Io));
    }

    let fua = kind.fua();
    let level = if fua { AckLevel::Written } else { ack_level(shared.config.protocol) };
    let mut targets = PeerSet::default();
    let mut lagging = Vec::new();
    for peer in st.replica.peers.iter() {
        if peer.is_replicating() {
            targets.insert(peer.node_id);
        } else {
            lagging.push(peer.slot);
        }
    }
    for slot in lagging {
        st.replica.mark_out_of_sync(slot, offset, len);
    }
    st.replica.app_write_bytes += len;
    let id = st.replica.inflight.start(offset, len, level, targets);
    st.completions.insert(id, done);
    let epoch = st.replica.epoch;
    let message = match &kind {
        WriteKind::Data { data, fua } => Message::Data { id, epoch, offset, fua: *fua, payload: data.clone() },
        WriteKind::Zeroes { discard, fua } => {
            Message::Zeroes { id, epoch, offset, len: len as u32, fua: *fua, discard: *discard }
        }
    };
    let mut close_epoch = false;
    let sent_write = (level == AckLevel::Sent).then_some(id);
    let mut sent_to = Vec::new();
    for peer in st.replica.peers.iter_mut().filter(|p| targets.contains(p.node_id)) {
        peer.tl.record(epoch, offset, len);
        close_epoch |= peer.tl.open_epoch_writes() >= MAX_EPOCH_WRITES;
        sent_to.push(peer.node_id);
    }
    for peer in sent_to {
        st.replica.send_bulk(peer, message.clone(), sent_write);
    }
    if close_epoch {
        st.replica.close_epoch();
    }
    drop(st);

    let op = match kind {
        WriteKind::Data { data, fua } => IoOp::Write { offset, data, fua },
        WriteKind::Zeroes { discard, fua } => IoOp::Zeroes { offset, len, discard, fua },
    };
    let shared2 = shared.clone();
    shared.io.submit(op, Box::new(move |result| local_done(&shared2, id, local_ok(&shared2, result))));
}

fn local_ok(shared: &Shared, result: io::Result<Option<Bytes>>) -> Result<(), LocalFailure> {
    match result {
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::error!(resource = %shared.config.name, error = %e, "local write failed");
            Err(if e.kind() == io::ErrorKind::StorageFull { LocalFailure::NoSpace } else { LocalFailure::Io })
        }
    }
}

/// Persists what the activity log needs before data may be written into newly hot extents:
/// the bitmap pages of evicted extents first, then the durable transaction.
fn make_extents_hot(st: &mut State, prepared: AlPrepared) -> Result<(), MetaError> {
    match prepared {
        AlPrepared::AllHot => Ok(()),
        AlPrepared::Transaction(update) => st.apply_al_update(update),
    }
}

fn ack_level(protocol: Protocol) -> AckLevel {
    match protocol {
        Protocol::A => AckLevel::Sent,
        Protocol::B => AckLevel::Received,
        Protocol::C => AckLevel::Written,
    }
}

fn io_error(e: &io::Error) -> BlockError {
    if e.kind() == io::ErrorKind::StorageFull {
        BlockError::NoSpace
    } else {
        BlockError::Io
    }
}

fn local_done(shared: &Arc<Shared>, id: u64, result: Result<(), LocalFailure>) {
    let mut st = shared.lock();
    let finished = st.replica.inflight.local_done(id, result);
    let mut deferred = Deferred::default();
    if let Some(f) = finished {
        complete(&mut st, f, &mut deferred);
    }
    shared.changed.notify_all();
    drop(st);
    deferred.run(shared);
}

/// A peer reached `level` for write `id`.
pub fn peer_reached(shared: &Arc<Shared>, id: u64, node_id: u8, level: AckLevel) {
    let mut st = shared.lock();
    if level != AckLevel::Sent {
        st.replica.peer_progressed(node_id, Instant::now());
    }
    let mut deferred = Deferred::default();
    if let Some(f) = st.replica.inflight.peer_reached(id, node_id, level) {
        complete(&mut st, f, &mut deferred);
        shared.changed.notify_all();
    }
    drop(st);
    deferred.run(shared);
}

/// A write is done everywhere it will be: release its extents and answer the frontend.
pub fn complete(st: &mut State, finished: Finished, deferred: &mut Deferred) {
    if let Some(extents) = extents_for(finished.offset, finished.len) {
        st.replica.al.release(extents);
    }
    if let Some(done) = st.completions.remove(&finished.id) {
        let result = match finished.local_failure {
            None => Ok(None),
            Some(LocalFailure::Io) => Err(BlockError::Io),
            Some(LocalFailure::NoSpace) => Err(BlockError::NoSpace),
        };
        st.finish_write(done, result, deferred);
    }
}

/// FLUSH: durable locally (every completed write is in the page cache, so one sync covers them)
/// and on every replicating peer (a barrier after everything sent so far, acked after its flush).
pub fn submit_flush(shared: &Arc<Shared>, done: Completion) {
    let mut st = shared.lock();
    let epoch = st.replica.close_epoch();
    let peers_pending: Vec<u8> = st.replica.peers.iter().filter(|p| p.is_replicating()).map(|p| p.node_id).collect();
    st.replica.next_flush_id += 1;
    let id = st.replica.next_flush_id;
    st.replica.flushes.push(PendingFlush { id, epoch, local_pending: true, local_failed: false, peers_pending });
    st.flush_done.insert(id, done);
    drop(st);
    let shared2 = shared.clone();
    shared.io.submit(
        IoOp::Sync,
        Box::new(move |result| {
            let mut st = shared2.lock();
            let mut deferred = Deferred::default();
            if let Some(flush) = st.replica.flushes.iter_mut().find(|f| f.id == id) {
                flush.local_pending = false;
                flush.local_failed = result.is_err();
            }
            finish_flushes(&mut st, &mut deferred);
            drop(st);
            deferred.run(&shared2);
        }),
    );
}

/// Answers every flush that waits for nothing more.
pub fn finish_flushes(st: &mut State, deferred: &mut Deferred) {
    let mut i = 0;
    while i < st.replica.flushes.len() {
        let flush = &mut st.replica.flushes[i];
        if flush.local_pending || !flush.peers_pending.is_empty() {
            i += 1;
            continue;
        }
        let flush = st.replica.flushes.remove(i);
        if let Some(done) = st.flush_done.remove(&flush.id) {
            st.finish_write(done, if flush.local_failed { Err(BlockError::Io) } else { Ok(None) }, deferred);
        }
    }
}
