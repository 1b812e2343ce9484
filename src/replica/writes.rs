//! The primary's requests. A read is served by the local disk. A write goes to the local disk
//! and to every replicating peer (the others get it in their bitmap) and completes when the
//! protocol says so. A FLUSH closes an epoch and waits for the local flush and the barrier
//! acks. Overlapping writes start in arrival order, one after the other, so they land in the
//! same order everywhere; a write into a cold activity-log extent starts behind the log's
//! transaction. Under suspend-io a write that arrives without quorum is held before it touches
//! any disk, and a completion without quorum is held too (see `Replica::admission`).

use super::{Action, IoTag, LocalIo, MetaWrite, Replica, RequestId};
use crate::config::Protocol;
use crate::core::inflight::{AckLevel, Finished, LocalFailure, PeerSet};
use crate::core::quorum::Admission;
use crate::core::states::{DiskState, ReplState, Role};
use crate::frontend::{BlockError, BlockRequest, BlockResult};
use crate::meta::activity_log::{extents_for, AlError, AlJoined};
use super::weakened::{is_weakened, Rule};
use crate::wire::{Message, MAX_DATA_BYTES};
use bytes::Bytes;
use std::time::Instant;

/// An epoch is closed with a barrier after this many writes even without a FLUSH, which bounds
/// the transfer log (and so the resync after a lost connection).
const MAX_EPOCH_WRITES: u32 = 4096;
/// ... or once its writes carry this many bytes: large writes with no FLUSH (a sequential copy
/// through the page cache of the device, `dd` without `conv=fsync`) would otherwise leave the
/// peer up to 4096 of them, up to 4 GiB at 1 MiB each, to resync after a lost link. A trial
/// wrote 2 GiB at 1 MiB and saw the whole device marked at the disconnect. The cost is the
/// peer's writeback, which a durable stream owes anyway (DESIGN, "Epochs without a FLUSH").
const MAX_EPOCH_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone)]
pub enum WriteKind {
    Data { data: Bytes, fua: bool },
    /// Zeroes, or a discard (which must also read back as zeroes on every replica, so replicas
    /// stay identical).
    Zeroes { len: u64, discard: bool, fua: bool },
}

/// A write not started yet: held without quorum, or waiting for an overlapping write, a resync
/// read of its blocks, or room in the activity log.
#[derive(Debug)]
pub struct QueuedWrite {
    pub request: RequestId,
    pub offset: u64,
    pub kind: WriteKind,
    log: LogStep,
}

/// Where a write waiting to start, or a step of a peer's stream, stands with the activity log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LogStep {
    /// Not in the activity log yet: a primary's write takes its references when it may
    /// start; a stream step the log had no room for joins once it has
    /// (`Replica::rejoin_stream_steps`).
    NotJoined,
    /// Some of its extents are hot only once transaction `seq` is committed.
    Awaiting(u64),
    /// Its extents are durably hot: it starts as soon as nothing earlier holds it.
    Hot,
}

impl QueuedWrite {
    fn len(&self) -> u64 {
        match &self.kind {
            WriteKind::Data { data, .. } => data.len() as u64,
            WriteKind::Zeroes { len, .. } => *len,
        }
    }

    /// The bytes its Data frame carries (none for zeroes).
    fn payload_len(&self) -> usize {
        match &self.kind {
            WriteKind::Data { data, .. } => data.len(),
            WriteKind::Zeroes { .. } => 0,
        }
    }

    fn fua(&self) -> bool {
        match &self.kind {
            WriteKind::Data { fua, .. } | WriteKind::Zeroes { fua, .. } => *fua,
        }
    }
}

/// A write larger than one Data frame (qemu-img sends 2 MiB writes, NBD allows 32 MiB) goes out
/// as several pieces; the request completes when all have, with the first error if any failed.
#[derive(Debug)]
pub struct Pieces {
    remaining: usize,
    result: BlockResult,
}

/// A FLUSH waiting for the local disk and for barrier acks.
pub struct PendingFlush {
    pub id: u64,
    pub request: RequestId,
    /// The epoch its barrier closed.
    pub epoch: u64,
    pub local_pending: bool,
    pub local_failed: bool,
    pub peers_pending: Vec<u8>,
}

fn ack_level(protocol: Protocol) -> AckLevel {
    match protocol {
        Protocol::A => AckLevel::Sent,
        Protocol::B => AckLevel::Received,
        Protocol::C => AckLevel::Written,
    }
}

/// Whether two `(offset, len)` ranges share a byte.
pub(super) fn overlap((a, alen): (u64, u64), (b, blen): (u64, u64)) -> bool {
    a < b + blen && b < a + alen
}

impl Replica {
    /// A request from the frontend. `queued_bytes`: how much waits in each peer's send queue,
    /// by its node id (see `replica/send_queue.rs`).
    pub fn submit(&mut self, now: Instant, request: RequestId, req: BlockRequest, queued_bytes: impl Fn(u8) -> usize) {
        let write = |offset, kind| QueuedWrite { request, offset, kind, log: LogStep::NotJoined };
        if !matches!(req, BlockRequest::Read { .. } | BlockRequest::Flush) {
            self.note_send_queues(queued_bytes);
        }
        match req {
            BlockRequest::Read { offset, len } => self.submit_read(now, request, offset, len),
            BlockRequest::Flush => self.submit_flush(request),
            BlockRequest::Write { offset, data, fua } => {
                // Each piece may find a queue past the fill mark, counting the pieces before it.
                self.pull_ahead(now);
                if data.len() <= MAX_DATA_BYTES {
                    return self.submit_write(now, write(offset, WriteKind::Data { data, fua }));
                }
                let pieces = data.len().div_ceil(MAX_DATA_BYTES);
                self.pieces.insert(request, Pieces { remaining: pieces, result: Ok(None) });
                for start in (0..data.len()).step_by(MAX_DATA_BYTES) {
                    if start > 0 {
                        self.pull_ahead(now);
                    }
                    let piece = data.slice(start..(start + MAX_DATA_BYTES).min(data.len()));
                    self.submit_write(now, write(offset + start as u64, WriteKind::Data { data: piece, fua }));
                }
            }
            BlockRequest::WriteZeroes { offset, len, fua } => {
                self.submit_write(now, write(offset, WriteKind::Zeroes { len: u64::from(len), discard: false, fua }));
            }
            BlockRequest::Discard { offset, len } => {
                self.submit_write(now, write(offset, WriteKind::Zeroes { len: u64::from(len), discard: true, fua: false }));
            }
        }
    }

    fn in_bounds(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.sb.data_size => Ok(()),
            _ => Err(BlockError::Invalid),
        }
    }

    /// A read is served only under the same quorum as a write: a primary that lost it may
    /// have been superseded, and its data would then be older than writes acknowledged since.
    fn submit_read(&mut self, now: Instant, request: RequestId, offset: u64, len: u32) {
        let refused = if self.role != Role::Primary {
            Err(BlockError::ReadOnly)
        } else if self.io_failed.is_some() || self.disk == DiskState::Outdated {
            // A local write failed (see `Replica::local_write_failed`), or this node outdated
            // itself for a primary peer (see `replica/fencing.rs`): its data may be stale.
            Err(BlockError::Io)
        } else {
            self.in_bounds(offset, len.into())
        };
        let admission = refused.map(|()| self.admission(now));
        match admission {
            Err(e) => self.answer(request, Err(e)),
            Ok(Admission::Refuse) => self.answer(request, Err(BlockError::Io)),
            Ok(Admission::Hold) => self.held_reads.push((request, offset, len)),
            Ok(Admission::Proceed) => self.outbox.push(Action::Io { tag: IoTag::Read(request), op: LocalIo::Read { offset, len: len as usize } }),
        }
    }

    /// Why no write may start on this node now, if none may.
    pub(super) fn write_refusal(&self) -> Option<BlockError> {
        if self.stopping {
            Some(BlockError::Shutdown)
        } else if self.role != Role::Primary {
            Some(BlockError::ReadOnly)
        } else if self.disk != DiskState::UpToDate || self.io_failed.is_some() {
            Some(BlockError::Io)
        } else {
            None
        }
    }

    /// A new write: it may first wait for room in a send queue (see `replica/send_queue.rs`).
    fn submit_write(&mut self, now: Instant, write: QueuedWrite) {
        if let Some(write) = self.waits_for_room(write) {
            self.admit_write(now, write);
        }
    }

    /// A write that goes on: refused, held without quorum, or waiting to start.
    pub(super) fn admit_write(&mut self, now: Instant, write: QueuedWrite) {
        let admission = match self.write_refusal() {
            Some(e) => Err(e),
            None => self.in_bounds(write.offset, write.len()).and_then(|()| {
                // Writes already held keep their place: a later one waits behind them.
                if !self.held.is_empty() {
                    return Ok(Admission::Hold);
                }
                match self.admission(now) {
                    Admission::Refuse => Err(BlockError::Io),
                    admission => Ok(admission),
                }
            }),
        };
        match admission {
            Err(e) => self.answer(write.request, Err(e)),
            Ok(Admission::Proceed) => {
                self.waiting.push_back(write);
                self.start_waiting();
            }
            Ok(_) => {
                if self.held.is_empty() && self.fence_admission().is_none() {
                    tracing::warn!(resource = %self.resource, quorum = ?self.quorum(now),
                        "no quorum, or an old primary still seen: holding new writes before they reach any disk");
                }
                self.held.push_back(write);
            }
        }
    }

    /// Starts every waiting write that may start: none overlapping an earlier waiting one (so
    /// overlapping writes start in arrival order), a write in flight or a resync read, and
    /// each with its activity-log extents durably hot. The writes that need cold extents join
    /// one batch, made durable by one transaction for all of them ([`Action::WriteLog`]),
    /// while the writes into hot extents go on; the writes that need a cold extent while that
    /// transaction is written gather in the next one.
    pub(super) fn start_waiting(&mut self) {
        // What makes room for a waiting write makes room for a waiting stream step too.
        self.rejoin_stream_steps();
        let mut blocked: Vec<(u64, u64)> = Vec::new();
        let mut i = 0;
        while i < self.waiting.len() {
            let range = (self.waiting[i].offset, self.waiting[i].len());
            if let Some(e) = self.write_refusal() {
                let write = self.waiting.remove(i).expect("indexed");
                self.leave_log(&write);
                self.answer(write.request, Err(e));
                continue;
            }
            let awaiting = matches!(self.waiting[i].log, LogStep::Awaiting(_));
            if awaiting || blocked.iter().any(|&b| overlap(b, range)) || self.overlaps_busy(range.0, range.1) {
                blocked.push(range);
                i += 1;
                continue;
            }
            if self.waiting[i].log == LogStep::Hot {
                let write = self.waiting.remove(i).expect("indexed");
                self.start_write(write);
                continue;
            }
            let Some(extents) = extents_for(range.0, range.1) else {
                let write = self.waiting.remove(i).expect("indexed");
                self.answer(write.request, Err(BlockError::Invalid));
                continue;
            };
            match self.al.join(extents) {
                Ok(AlJoined::Batched { seq }) if !is_weakened(Rule::WritesBeforeTheirLog) => {
                    self.waiting[i].log = LogStep::Awaiting(seq);
                    blocked.push(range);
                    i += 1;
                }
                Ok(_) => {
                    let write = self.waiting.remove(i).expect("indexed");
                    self.start_write(write);
                }
                Err(AlError::Busy) => {
                    // Every extent is held, some by writes whose epoch no barrier closed yet:
                    // close it, so their acks free extents (nothing else might). Or the next
                    // transaction is full: the write waits for the one after.
                    if self.peers.iter().any(|p| p.is_replicating() && p.tl.open_epoch_writes() > 0) {
                        self.close_epoch();
                    }
                    blocked.push(range);
                    i += 1;
                }
                Err(e) => {
                    tracing::warn!(resource = %self.resource, error = %e, offset = range.0, len = range.1, "write refused");
                    let write = self.waiting.remove(i).expect("indexed");
                    self.answer(write.request, Err(BlockError::Invalid));
                }
            }
        }
    }

    /// The activity-log transaction `seq` was written ([`Action::WriteLog`]): the writes and
    /// stream steps that waited for it start, or, if it failed, this node detaches from its
    /// disk and they fail with it. The batch gathered meanwhile is sealed next.
    pub fn log_written(&mut self, seq: u64, result: Result<(), String>) {
        let Some(update) = self.log_in_flight.take_if(|update| update.transaction.seq() == seq) else { return };
        match result {
            Ok(()) => {
                self.al.commit(update);
                let durable = |log: &mut LogStep| {
                    if matches!(*log, LogStep::Awaiting(s) if s <= seq) {
                        *log = LogStep::Hot;
                    }
                };
                self.waiting.iter_mut().for_each(|w| durable(&mut w.log));
                let streams: Vec<u8> = self.peers.iter().map(|p| p.node_id).collect();
                for peer_id in streams {
                    self.peer_mut(peer_id).applying.log_durable(durable);
                    self.stream_step_finished(peer_id);
                }
            }
            Err(e) => self.detach(format!("a metadata write (activity-log transaction) failed: {e}")),
        }
        self.start_waiting();
    }

    /// The batch of activity-log updates gathered during this step, as one transaction written
    /// next (see [`Action::WriteLog`]), unless one is still being written. A detached node
    /// writes none: the writes that gathered fail with its disk.
    pub(super) fn seal_log(&mut self) {
        if self.detached() {
            return;
        }
        if let Some(update) = self.al.seal() {
            let flush_data = !update.evicted.is_empty() && !self.secondary_skips_flushes();
            self.outbox.push(Action::WriteLog { update: update.clone(), flush_data });
            self.log_in_flight = Some(update);
        }
    }

    /// Drops the activity-log references a waiting write took, if it took any.
    fn leave_log(&mut self, write: &QueuedWrite) {
        if write.log != LogStep::NotJoined {
            if let Some(extents) = extents_for(write.offset, write.len()) {
                self.al.release(extents);
            }
        }
    }

    /// Sends a write to the replicating peers (the others get it in their bitmap) and to the
    /// local disk; its activity-log extents are durably hot and referenced for it.
    fn start_write(&mut self, write: QueuedWrite) {
        let (offset, len, fua) = (write.offset, write.len(), write.fua());
        let level = if fua { AckLevel::Written } else { ack_level(self.protocol) };
        let mut targets = PeerSet::default();
        let mut lagging = Vec::new();
        for peer in self.peers.iter() {
            if peer.is_replicating() {
                targets.insert(peer.node_id);
            } else {
                lagging.push(peer.slot);
            }
        }
        for slot in lagging {
            self.mark_out_of_sync(slot, offset, len);
        }
        self.app_write_bytes += len;
        let id = self.inflight.start(offset, len, level, targets);
        self.write_requests.insert(id, write.request);
        let epoch = self.epoch;
        let message = match &write.kind {
            WriteKind::Data { data, fua } => Message::Data { id, epoch, offset, fua: *fua, payload: data.clone() },
            WriteKind::Zeroes { len, discard, fua } => {
                Message::Zeroes { id, epoch, offset, len: *len as u32, fua: *fua, discard: *discard }
            }
        };
        let sent_write = (level == AckLevel::Sent).then_some(id);
        let fua_id = fua.then_some(id);
        let mut close_epoch = false;
        let mut sent_to = Vec::new();
        // Each peer's copy holds the extents too, until its barrier ack says it is durable
        // there (or the link goes and the bitmap has it): an extent evicted earlier could take
        // the only durable trace of a write the peer may still lose with a crash here.
        if let Some(extents) = extents_for(offset, len) {
            for _ in 0..targets.len() {
                self.al.retain(extents.clone());
            }
        }
        for peer in self.peers.iter_mut().filter(|p| targets.contains(p.node_id)) {
            peer.tl.record_write(epoch, offset, len, fua_id);
            close_epoch |= peer.tl.open_epoch_writes() >= MAX_EPOCH_WRITES || peer.tl.open_epoch_bytes() >= MAX_EPOCH_BYTES;
            sent_to.push(peer.node_id);
        }
        for peer in sent_to {
            self.send_bulk(peer, message.clone(), sent_write);
        }
        if close_epoch {
            self.close_epoch();
        }
        let op = match write.kind {
            WriteKind::Data { data, fua } => LocalIo::Write { offset, data, fua },
            WriteKind::Zeroes { len, discard, fua } => LocalIo::Zeroes { offset, len, discard, fua },
        };
        self.outbox.push(Action::Io { tag: IoTag::Write(id), op });
    }

    /// FLUSH: durable locally (every completed write is in the disk's cache, so one flush covers
    /// them) and on every replicating peer (a barrier after everything sent so far, acked after
    /// the peer's flush).
    fn submit_flush(&mut self, request: RequestId) {
        if self.detached() {
            // No I/O reaches a detached disk (see `Replica::detach`).
            return self.answer(request, Err(BlockError::Io));
        }
        let peers_pending = self.peers.iter().filter(|p| self.receives_stream(p)).map(|p| p.node_id).collect();
        let epoch = self.close_epoch();
        self.next_flush_id += 1;
        let id = self.next_flush_id;
        self.flushes.push(PendingFlush { id, request, epoch, local_pending: true, local_failed: false, peers_pending });
        self.outbox.push(Action::Io { tag: IoTag::Flush(id), op: LocalIo::Flush });
    }

    /// A local I/O the replica asked for finished.
    pub fn io_done(&mut self, now: Instant, tag: IoTag, result: Result<Option<Bytes>, LocalFailure>) {
        match tag {
            IoTag::Read(request) => {
                let result = match result {
                    Err(failure) => {
                        tracing::error!(resource = %self.resource, ?failure, "local read failed");
                        Err(BlockError::from(failure))
                    }
                    // Submitted before this primary's disk failed, done after: it may have
                    // read what the failure left (a flush that lost the disk's cache takes a
                    // write acknowledged before this read began; simulator seed 252578).
                    Ok(_) if self.io_failed.is_some() => Err(BlockError::Io),
                    Ok(data) => Ok(data),
                };
                self.answer(request, result);
            }
            IoTag::Write(id) => {
                if let (Err(failure), Some((offset, len))) = (result.as_ref(), self.inflight.range(id)) {
                    self.local_write_failed(offset, len, *failure);
                }
                if let Some(finished) = self.inflight.local_done(id, result.map(drop)) {
                    self.write_finished(now, finished);
                }
            }
            IoTag::Flush(id) => {
                if let Err(failure) = result {
                    self.local_flush_failed(failure);
                }
                if let Some(flush) = self.flushes.iter_mut().find(|f| f.id == id) {
                    flush.local_pending = false;
                    flush.local_failed = result.is_err();
                }
                self.finish_flushes(now);
            }
            IoTag::Stream { peer, generation, seq } => self.stream_step_done(peer, generation, seq, result),
            IoTag::Barrier { peer, generation, epoch } => self.barrier_flushed(peer, generation, epoch, result.map(drop)),
        }
    }

    /// `peer` reached `level` for write `id` (an ack, or protocol A's frame handed to the kernel).
    pub fn peer_reached(&mut self, now: Instant, id: u64, peer: u8, level: AckLevel) {
        if level != AckLevel::Sent {
            self.peer_progressed(peer, now);
        }
        if let Some(finished) = self.inflight.peer_reached(id, peer, level) {
            self.write_finished(now, finished);
        }
    }

    /// A peer's copy of a write is settled (durable there, or in the bitmap): one reference on
    /// its extents goes (the caller then lets the writes waiting for a free extent start).
    pub(super) fn release_extents(&mut self, offset: u64, len: u64) {
        if let Some(extents) = extents_for(offset, len) {
            self.al.release(extents);
        }
    }

    /// A write is done everywhere it will be: its extents are released, its request answered,
    /// and the writes that waited for it may start.
    pub(super) fn write_finished(&mut self, now: Instant, finished: Finished) {
        if let Some(extents) = extents_for(finished.offset, finished.len) {
            self.al.release(extents);
        }
        if let Some(request) = self.write_requests.remove(&finished.id) {
            let result = finished.local_failure.map_or(Ok(None), |failure| Err(BlockError::from(failure)));
            self.finish_request(now, request, result);
        }
        self.start_waiting();
    }

    /// Answers every flush that waits for nothing more.
    pub(super) fn finish_flushes(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.flushes.len() {
            let flush = &self.flushes[i];
            if flush.local_pending || !flush.peers_pending.is_empty() {
                i += 1;
                continue;
            }
            let flush = self.flushes.remove(i);
            let failed = flush.local_failed || self.cache_lost;
            self.finish_request(now, flush.request, if failed { Err(BlockError::Io) } else { Ok(None) });
        }
    }

    /// Completes a write or flush, unless this primary may not (see `Replica::admission`):
    /// then the completion is held or fails. An acknowledged write must be on the side that
    /// keeps quorum, the only side that may promote, and under a generation the lost peers lack.
    fn finish_request(&mut self, now: Instant, request: RequestId, result: BlockResult) {
        if self.stepped_down.is_some() {
            // Superseded: a write still in flight when this node stepped down finishes here
            // unacknowledged, like the ones it held (the new primary may not have it).
            self.answer(request, Err(BlockError::Io));
            return;
        }
        if (self.demoting && !self.generation_pending.is_empty()) || self.disk != DiskState::UpToDate {
            // A data peer lacking this tenure's writes was lost, and a node being demoted starts
            // no generation to keep it from being elected: nothing completes as acknowledged
            // any more (seed 27534: a flush completed after the loss, the lost peer was
            // elected without the write it covered). Nor on a disk whose data is no longer
            // the one to keep: a Failed one, whose links are all going (seed 56289: a flush
            // the links' loss released completed on the detached primary, and the peer elected
            // next lacked the protocol A write it covered), or one Outdated because the
            // fence-peer handler said the peer is primary (seed 194070: a flush in flight
            // then completed, and the node elected next lacked the write it covered).
            self.answer(request, Err(BlockError::Io));
            return;
        }
        match self.admission_in_owed_generation(now) {
            Admission::Proceed if self.election_unconfirmed(now) => self.suspended.push((request, result)),
            Admission::Proceed => self.answer(request, result),
            // Under `io-error` too: the voters are there, they have yet to hear of the
            // generation just started (released by their State, see `release_suspended`).
            Admission::Refuse if self.confirming_generation(now) => self.suspended.push((request, result)),
            Admission::Hold => {
                if self.suspended.is_empty() && self.fence_admission().is_none() {
                    tracing::warn!(resource = %self.resource, quorum = ?self.quorum(now),
                        "no quorum, or an old primary still seen: holding write completions");
                }
                self.suspended.push((request, result));
            }
            Admission::Refuse => self.answer(request, Err(BlockError::Io)),
        }
    }

    /// [`Replica::admission`] under the generation owed to lost peers: when quorum lets writes
    /// complete, that generation starts first and quorum is judged again under it (the voters
    /// that count are then those that know it, see `Replica::votes_for_me`).
    fn admission_in_owed_generation(&mut self, now: Instant) -> Admission {
        if self.admission(now) == Admission::Proceed {
            self.start_pending_generation();
        }
        self.admission(now)
    }

    /// Queues the answer to `request` (or counts a piece of it, see [`Pieces`]).
    fn answer(&mut self, request: RequestId, result: BlockResult) {
        let result = match self.pieces.get_mut(&request) {
            None => result,
            Some(pieces) => {
                if pieces.result.is_ok() {
                    pieces.result = result;
                }
                pieces.remaining -= 1;
                if pieces.remaining > 0 {
                    return;
                }
                self.pieces.remove(&request).expect("present").result
            }
        };
        self.outbox.push(Action::Complete { request, result });
    }

    /// Starts the new generation owed to the data peers lost since the last one (see
    /// `Replica::generation_pending`), durable before any write under it completes (a failed
    /// superblock write fails the completions queued behind it, see `persist_failed`). A
    /// Failed disk starts none: it could not be made durable, and no write completes there.
    fn start_pending_generation(&mut self) {
        if self.generation_pending.is_empty() || self.role != Role::Primary || self.detached() {
            return;
        }
        let slots = std::mem::take(&mut self.generation_pending);
        self.left_generation = self.sb.uuids.current;
        // The votes won for the promotion count for the promotion's generation only: a voter
        // counts under this one once it knows it (a witness counted for writes under a
        // generation it never heard of later elected a node without them; seed 7247).
        self.elected = None;
        let mut generation = self.generation();
        generation.new_current(self.uuids.next(), true, true, &slots);
        self.set_generation(generation);
        self.persist(MetaWrite::Superblock);
        tracing::info!(resource = %self.resource, uuid = format_args!("{:016X}", self.sb.uuids.current),
            "new generation: writing without a lost peer");
        // The secondaries still connected follow the new generation.
        self.broadcast_state();
    }

    /// Releases held completions and writes once this primary may complete writes again, or
    /// fails them when `fail` (demotion) or when another primary took over.
    pub fn release_suspended(&mut self, now: Instant, fail: bool) {
        if self.suspended.is_empty() && self.held.is_empty() && self.held_reads.is_empty() {
            return;
        }
        // Judged under the generation owed to lost peers, as a completion is (seed 177658: a
        // fence-peer answer released a FUA write judged under the generation left, which the
        // witnesses, cut off a moment before, never learned of; they elected the lost peer
        // without it).
        let admission = if fail { self.admission(now) } else { self.admission_in_owed_generation(now) };
        // What waited for voters to confirm a new generation fails once quorum is gone instead
        // (`io-error` holds nothing else).
        let refused = admission == Admission::Refuse && !self.confirming_generation(now);
        let fail = fail || refused || self.role != Role::Primary || self.io_failed.is_some() || self.superseded(now);
        if !fail && (admission != Admission::Proceed || self.election_unconfirmed(now)) {
            return;
        }
        let completions = std::mem::take(&mut self.suspended);
        let writes = std::mem::take(&mut self.held);
        for (request, offset, len) in std::mem::take(&mut self.held_reads) {
            if fail {
                self.answer(request, Err(BlockError::Io));
            } else {
                self.outbox.push(Action::Io { tag: IoTag::Read(request), op: LocalIo::Read { offset, len: len as usize } });
            }
        }
        if fail {
            tracing::error!(resource = %self.resource, completions = completions.len(), writes = writes.len(),
                "failing writes held without quorum or while fencing: they were never acknowledged (another node may be primary now)");
        } else {
            tracing::info!(resource = %self.resource, completions = completions.len(), writes = writes.len(),
                "quorum is back, or fencing answered: completing held writes");
        }
        for (request, result) in completions {
            self.answer(request, if fail { Err(BlockError::Io) } else { result });
        }
        for write in writes {
            if fail {
                self.answer(write.request, Err(BlockError::Io));
            } else {
                self.waiting.push_back(write);
            }
        }
        self.start_waiting();
    }

    /// Writes and completions held without quorum.
    pub fn held_count(&self) -> usize {
        self.suspended.len() + self.held.len() + self.held_reads.len()
    }

    /// The data of the admitted writes not started yet.
    pub(super) fn waiting_data_bytes(&self) -> usize {
        self.waiting.iter().map(QueuedWrite::payload_len).sum()
    }

    /// Whether no write is in flight or waiting to start (a demotion's final flush waits for it).
    pub fn writes_idle(&self) -> bool {
        self.inflight.is_empty() && self.waiting.is_empty() && self.awaiting_room.is_empty() && self.log_in_flight.is_none()
    }

    /// A resync or verify reads `range`: writes into it wait until [`Replica::read_unlock`].
    pub fn read_lock(&mut self, range: (u64, u64)) {
        self.read_locks.push(range);
    }

    pub fn read_unlock(&mut self, range: (u64, u64)) {
        if let Some(i) = self.read_locks.iter().position(|r| *r == range) {
            self.read_locks.swap_remove(i);
        }
        self.start_waiting();
    }

    /// The peer acknowledged the barrier of `epoch` (`check_frame` matched it with the oldest
    /// one sent): the blocks of that epoch are durable there exactly as here, and flushes and a
    /// pull-ahead waiting for it go on.
    pub fn barrier_acked(&mut self, now: Instant, peer_id: u8, epoch: u64) {
        self.peer_progressed(peer_id, now);
        let peer = self.peer_mut(peer_id);
        peer.barriers.pop_front();
        let settled = peer.tl.barrier_acked(epoch);
        let slot = peer.slot;
        for s in settled {
            if s.durable {
                self.bitmaps[slot].clear_range(s.offset, s.len);
            }
            if s.write {
                self.release_extents(s.offset, s.len);
            }
        }
        self.start_waiting();
        for flush in self.flushes.iter_mut().filter(|f| f.epoch <= epoch) {
            flush.peers_pending.retain(|id| *id != peer_id);
        }
        self.finish_flushes(now);
        self.catch_up_if_drained(peer_id);
    }

    /// The end of pull-ahead: once the peer acknowledged the barrier that closed what was
    /// queued to it (the ack, not an empty queue, is the signal: kernel socket buffers take
    /// megabytes from a peer that reads nothing), this node resyncs what it missed through the
    /// usual connect-time decision (the bitmap UUID it just set makes it the source of a
    /// bitmap resync). The peer hears first, so it decides on its side before the bitmap
    /// reaches it.
    fn catch_up_if_drained(&mut self, peer_id: u8) {
        let peer = self.peer_mut(peer_id);
        let Some(last_epoch) = peer.ahead_until.filter(|_| peer.repl == ReplState::Ahead) else { return };
        if peer.barriers.iter().any(|(epoch, _)| *epoch <= last_epoch) {
            return;
        }
        peer.ahead_until = None;
        peer.repl = ReplState::Off;
        tracing::info!(peer = %peer.name, "the peer caught up with the send queue: resyncing what it missed");
        // The state without the Ahead flag makes the peer leave Behind.
        self.broadcast_state();
        self.reconsider_or_drop(peer_id);
    }
}

impl From<LocalFailure> for BlockError {
    fn from(failure: LocalFailure) -> BlockError {
        match failure {
            LocalFailure::Io => BlockError::Io,
            LocalFailure::NoSpace => BlockError::NoSpace,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::core::inflight::{AckLevel, LocalFailure};
    use crate::frontend::{BlockError, BlockRequest};
    use crate::replica::testing::{answers, data_sent, log_writes, primary_replicating, settled, write};
    use crate::replica::{Action, IoTag, Replica};
    use crate::wire::{Message, MAX_DATA_BYTES};

    fn no_queue(_: u8) -> usize {
        0
    }

    #[test]
    fn under_io_error_a_completion_waiting_for_voters_to_confirm_a_new_generation_fails_once_their_lease_lapses() {
        use crate::core::quorum::OnNoQuorum;
        use crate::frontend::BlockResult;
        use crate::core::states::Role;
        use crate::replica::testing::with_data_peer_and_witness;
        let (mut r, t0) = with_data_peer_and_witness(Role::Primary);
        r.on_no_quorum = OnNoQuorum::IoError;
        let timing = r.timing;
        r.submit(t0, 1, write(0, 4096), no_queue);
        let id = local_writes(&settled(&mut r))[0];
        r.io_done(t0, IoTag::Write(id), Ok(None));
        // The data peer's link goes; the witness, silent from now on, still reports the
        // generation this node leaves for it.
        r.peer_lost(t0, 1, "gone", 0);
        assert!(answers(&r.take_actions()).is_empty(), "waits for the witness to confirm the new generation");
        r.tick(t0 + timing.lease() / 2, |_| 0);
        assert!(answers(&r.take_actions()).is_empty(), "the witness may still answer within its lease");
        r.tick(t0 + timing.lease(), |_| 0);
        let failed: Vec<(u64, BlockResult)> = answers(&r.take_actions());
        assert_eq!(failed, vec![(1, Err(BlockError::Io))], "io-error: no quorum, so the write fails at once, before any link times out");
    }

    /// The local writes asked for, by write id.
    fn local_writes(actions: &[Action]) -> Vec<u64> {
        actions.iter().filter_map(write_id).collect()
    }

    fn write_id(a: &Action) -> Option<u64> {
        match a {
            Action::Io { tag: IoTag::Write(id), .. } => Some(*id),
            _ => None,
        }
    }

    fn completions(actions: &[Action]) -> Vec<(u64, bool)> {
        answers(actions).into_iter().map(|(request, result)| (request, result.is_ok())).collect()
    }

    /// Finishes write `id` everywhere (local disk, then the peer's WriteAck).
    fn finish(r: &mut Replica, now: std::time::Instant, id: u64) {
        r.io_done(now, IoTag::Write(id), Ok(None));
        r.peer_reached(now, id, 1, AckLevel::Written);
    }

    #[test]
    fn overlapping_writes_start_in_arrival_order_and_complete_once_everywhere() {
        let (mut r, t0) = primary_replicating();
        r.submit(t0, 10, write(0, 4096), no_queue);
        r.submit(t0, 11, write(0, 4096), no_queue);
        r.submit(t0, 12, write(8192, 4096), no_queue);
        let actions = settled(&mut r);
        let first = actions.iter().position(|a| matches!(a, Action::WriteLog { .. })).expect("a cold extent");
        let io = actions.iter().position(|a| matches!(a, Action::Io { .. })).expect("a local write");
        assert!(first < io, "the activity log's transaction goes before the write into its extent: {actions:?}");
        let started = local_writes(&actions);
        assert_eq!(started.len(), 2, "the second write to block 0 waits for the first: {actions:?}");
        let data_frames = actions.iter().filter(|a| matches!(a, Action::Send { msg: Message::Data { .. }, .. })).count();
        assert_eq!(data_frames, 2);
        r.io_done(t0, IoTag::Write(started[0]), Ok(None));
        assert!(local_writes(&r.take_actions()).is_empty(), "still waiting for the peer's ack (protocol C)");
        r.peer_reached(t0, started[0], 1, AckLevel::Written);
        let actions = r.take_actions();
        assert_eq!(completions(&actions), vec![(10, true)]);
        let second = local_writes(&actions);
        assert_eq!(second.len(), 1, "the waiting write starts now: {actions:?}");
        finish(&mut r, t0, second[0]);
        finish(&mut r, t0, started[1]);
        let mut done = completions(&r.take_actions());
        done.sort_unstable();
        assert_eq!(done, vec![(11, true), (12, true)]);
        assert!(r.writes_idle());
    }

    #[test]
    fn a_write_larger_than_a_frame_goes_in_pieces_and_completes_once_with_the_first_error() {
        let (mut r, t0) = primary_replicating();
        r.submit(t0, 5, write(0, 2 * MAX_DATA_BYTES + 4096), no_queue);
        let actions = settled(&mut r);
        let ids = local_writes(&actions);
        assert_eq!(ids.len(), 3);
        r.io_done(t0, IoTag::Write(ids[1]), Err(LocalFailure::NoSpace));
        r.peer_reached(t0, ids[1], 1, AckLevel::Written);
        finish(&mut r, t0, ids[0]);
        assert!(completions(&r.take_actions()).is_empty(), "one piece is still out");
        finish(&mut r, t0, ids[2]);
        assert_eq!(answers(&r.take_actions()), vec![(5, Err(BlockError::NoSpace))]);
    }

    #[test]
    fn writes_are_refused_outside_the_device_and_on_a_secondary() {
        let (mut r, t0) = primary_replicating();
        let end = r.sb.data_size;
        r.submit(t0, 1, write(end - 4096, 8192), no_queue);
        r.role = crate::core::states::Role::Secondary;
        r.submit(t0, 2, write(0, 4096), no_queue);
        r.submit(t0, 3, BlockRequest::Read { offset: 0, len: 4096 }, no_queue);
        let actions = r.take_actions();
        assert_eq!(answers(&actions), vec![(1, Err(BlockError::Invalid)), (2, Err(BlockError::ReadOnly)), (3, Err(BlockError::ReadOnly))]);
        assert!(!actions.iter().any(|a| matches!(a, Action::Io { .. } | Action::Send { .. })), "{actions:?}");
    }

    #[test]
    fn a_flush_waits_for_the_local_flush_and_the_barrier_ack() {
        let (mut r, t0) = primary_replicating();
        r.submit(t0, 1, write(0, 4096), no_queue);
        let id = local_writes(&settled(&mut r))[0];
        finish(&mut r, t0, id);
        r.take_actions();
        r.submit(t0, 2, BlockRequest::Flush, no_queue);
        let actions = r.take_actions();
        let epoch = actions.iter().find_map(|a| match a {
            Action::Send { msg: Message::Barrier { epoch }, .. } => Some(*epoch),
            _ => None,
        }).expect("a barrier closes the epoch");
        let flush = actions.iter().find_map(|a| match a {
            Action::Io { tag: tag @ IoTag::Flush(_), .. } => Some(*tag),
            _ => None,
        }).expect("a local flush");
        r.io_done(t0, flush, Ok(None));
        assert!(completions(&r.take_actions()).is_empty(), "the peer has not flushed yet");
        r.barrier_acked(t0, 1, epoch);
        assert_eq!(completions(&r.take_actions()), vec![(2, true)]);
    }

    #[test]
    fn large_writes_without_a_flush_close_their_epoch_every_64_mib() {
        let (mut r, t0) = primary_replicating();
        let mib = 1u64 << 20;
        let mut barriers_after = Vec::new();
        for n in 1..=130u64 {
            r.submit(t0, n, write((n % 16) * mib, mib as usize), no_queue);
            let actions = settled(&mut r);
            let id = local_writes(&actions)[0];
            finish(&mut r, t0, id);
            let barrier = actions.iter().find_map(|a| match a {
                Action::Send { msg: Message::Barrier { epoch }, .. } => Some(*epoch),
                _ => None,
            });
            if let Some(epoch) = barrier {
                barriers_after.push(n);
                r.barrier_acked(t0, 1, epoch);
            }
            assert_eq!(completions(&r.take_actions()), vec![(n, true)]);
        }
        assert_eq!(barriers_after, vec![64, 128], "a barrier after each 64 MiB of writes");
        assert_eq!(r.peer(1).tl.len(), 2, "the transfer log holds only the open epoch's writes once the barriers are acked");
    }

    #[test]
    fn an_epoch_holding_writes_closes_a_second_after_a_tick_saw_it_so_a_later_disconnect_resyncs_nothing() {
        use std::time::Duration;
        let barrier = |actions: &[Action]| {
            actions.iter().find_map(|a| match a {
                Action::Send { msg: Message::Barrier { epoch }, .. } => Some(*epoch),
                _ => None,
            })
        };
        let (mut r, t0) = primary_replicating();
        r.tick(t0, |_| 0);
        assert!(barrier(&r.take_actions()).is_none());
        assert_eq!(r.epoch_deadline(), None, "an empty epoch has no span");
        r.submit(t0, 1, write(0, 4096), no_queue);
        let id = local_writes(&settled(&mut r))[0];
        finish(&mut r, t0, id);
        r.take_actions();
        let seen = t0 + Duration::from_millis(300);
        r.tick(seen, |_| 0);
        assert!(barrier(&r.take_actions()).is_none(), "no FLUSH came, and the epoch is young");
        assert_eq!(r.epoch_deadline(), Some(seen + Duration::from_secs(1)));
        assert!(r.poll_timeout() <= r.epoch_deadline(), "a tick is due when its span ends");
        r.tick(seen + Duration::from_millis(999), |_| 0);
        assert!(barrier(&r.take_actions()).is_none());
        r.tick(seen + Duration::from_secs(1), |_| 0);
        let epoch = barrier(&r.take_actions()).expect("the epoch closes a second after a tick saw it hold a write");
        r.barrier_acked(seen, 1, epoch);
        assert!(r.peer(1).tl.is_empty(), "the peer flushed the write");
        assert_eq!(r.epoch_deadline(), None, "no deadline is left behind");
        r.peer_lost(seen, 1, "gone", 0);
        let slot = r.peer(1).slot;
        assert_eq!(r.bitmaps[slot].weight_bytes(), 0, "nothing for the peer to resync");
    }

    #[test]
    fn writes_arriving_while_a_transaction_is_written_share_the_next_and_hot_ones_go_on() {
        let (mut r, t0) = primary_replicating();
        let extent = crate::meta::activity_log::AL_EXTENT_SIZE;
        r.submit(t0, 1, write(0, 4096), no_queue);
        let actions = r.take_actions();
        let logs = log_writes(&actions);
        let [(first, added)] = &logs[..] else { panic!("one transaction: {actions:?}") };
        assert_eq!(added, &[0]);
        assert!(local_writes(&actions).is_empty() && data_sent(&actions).is_empty(), "the write waits for it: {actions:?}");
        // Meanwhile: two writes into other cold extents, one more into the extent being made hot.
        r.submit(t0, 2, write(extent, 4096), no_queue);
        r.submit(t0, 3, write(2 * extent, 4096), no_queue);
        r.submit(t0, 4, write(8192, 4096), no_queue);
        let actions = r.take_actions();
        assert!(log_writes(&actions).is_empty(), "one transaction at a time: {actions:?}");
        assert!(local_writes(&actions).is_empty() && data_sent(&actions).is_empty(), "{actions:?}");
        r.log_written(*first, Ok(()));
        let actions = r.take_actions();
        assert_eq!(data_sent(&actions), vec![0, 8192], "the writes into extent 0 start");
        assert_eq!(local_writes(&actions).len(), 2);
        let logs = log_writes(&actions);
        let [(second, added)] = &logs[..] else { panic!("one transaction for both: {actions:?}") };
        assert_eq!(added, &[1, 2]);
        // A write into a durably hot extent does not wait for the transaction being written.
        r.submit(t0, 5, write(16384, 4096), no_queue);
        let actions = r.take_actions();
        assert_eq!(data_sent(&actions), vec![16384], "{actions:?}");
        r.log_written(*second, Ok(()));
        let actions = r.take_actions();
        assert_eq!(data_sent(&actions), vec![extent, 2 * extent]);
        assert!(log_writes(&actions).is_empty());
    }

    #[test]
    fn a_node_detached_while_a_transaction_is_written_seals_none_of_what_gathered() {
        let (mut r, t0) = primary_replicating();
        let extent = crate::meta::activity_log::AL_EXTENT_SIZE;
        r.submit(t0, 1, write(0, 4096), no_queue);
        let logs = log_writes(&r.take_actions());
        let [(first, _)] = &logs[..] else { panic!("a transaction") };
        r.submit(t0, 2, write(extent, 4096), no_queue);
        assert!(log_writes(&r.take_actions()).is_empty(), "gathered for the next one");
        r.persist_failed(t0, crate::replica::MetaWrite::Superblock, "EIO", Vec::new());
        assert!(r.detached());
        assert!(log_writes(&r.take_actions()).is_empty(), "a failed disk is written no more");
        r.log_written(*first, Ok(()));
        let actions = r.take_actions();
        assert!(log_writes(&actions).is_empty() && local_writes(&actions).is_empty() && data_sent(&actions).is_empty(), "{actions:?}");
        let mut failed = answers(&actions);
        failed.sort_by_key(|(request, _)| *request);
        assert_eq!(failed, vec![(1, Err(BlockError::Io)), (2, Err(BlockError::Io))]);
        assert!(r.writes_idle());
    }

    #[test]
    fn a_demotion_waits_for_the_transaction_being_written_and_empties_the_log() {
        let (mut r, t0) = primary_replicating();
        r.submit(t0, 1, write(0, 4096), no_queue);
        let logs = log_writes(&r.take_actions());
        let [(seq, _)] = logs[..] else { panic!("a transaction") };
        r.begin_demotion(t0);
        r.take_actions();
        assert!(!r.writes_idle(), "the transaction is still being written");
        r.log_written(seq, Ok(()));
        let actions = r.take_actions();
        assert_eq!(answers(&actions), vec![(1, Err(BlockError::ReadOnly))], "the write that waited is refused");
        assert!(local_writes(&actions).is_empty() && data_sent(&actions).is_empty(), "and never started: {actions:?}");
        assert!(r.writes_idle());
        r.finish_demotion();
        assert!(r.al.hot_extents().is_empty(), "the refused write held no extent");
        assert!(r.sb.flags.contains(crate::meta::MetaFlags::AL_CLEAN));
    }

    #[test]
    fn an_extent_leaves_the_activity_log_only_after_the_data_disk_was_flushed() {
        let (mut r, t0) = primary_replicating();
        r.al = crate::meta::ActivityLog::new(1);
        r.submit(t0, 1, write(0, 4096), no_queue);
        let id = local_writes(&settled(&mut r))[0];
        finish(&mut r, t0, id);
        // A flush frees the extent (the peer's barrier ack covers the write); the local
        // flush is left pending, as a driver that has not carried it out yet.
        r.submit(t0, 2, BlockRequest::Flush, no_queue);
        let epoch = r.peer(1).barriers.back().expect("a barrier").0;
        r.barrier_acked(t0, 1, epoch);
        r.take_actions();
        let extent = crate::meta::activity_log::AL_EXTENT_SIZE;
        r.submit(t0, 3, write(extent, 4096), no_queue);
        let actions = settled(&mut r);
        let logged = actions
            .iter()
            .position(|a| matches!(a, Action::WriteLog { update, flush_data: true } if update.evicted == [0]))
            .expect("extent 0 evicted behind a flush of the data disk");
        let written = actions.iter().position(|a| matches!(a, Action::Io { op: crate::replica::LocalIo::Write { .. }, .. })).expect("the write");
        assert!(logged < written, "{actions:?}");
        // A transaction that evicts nothing flushes nothing.
        let (mut r, t0) = primary_replicating();
        r.submit(t0, 1, write(0, 4096), no_queue);
        let actions = settled(&mut r);
        assert!(actions.iter().any(|a| matches!(a, Action::WriteLog { flush_data: false, .. })), "{actions:?}");
    }

    #[test]
    fn a_failed_activity_log_write_detaches_the_disk_and_fails_the_write_behind_it() {
        let (mut r, t0) = primary_replicating();
        r.submit(t0, 1, write(0, 4096), no_queue);
        let actions = r.take_actions();
        let seq = actions.iter().find_map(|a| match a {
            Action::WriteLog { update, .. } => Some(update.transaction.seq()),
            _ => None,
        }).expect("a transaction");
        assert!(!actions.iter().any(|a| matches!(a, Action::Io { .. } | Action::Send { .. })), "the write waits for it: {actions:?}");
        r.log_written(seq, Err("EIO".into()));
        assert_eq!(r.disk, crate::core::states::DiskState::Failed);
        let actions = r.take_actions();
        assert!(!actions.iter().any(|a| matches!(a, Action::Io { .. } | Action::Send { .. } | Action::Persist(_) | Action::WriteLog { .. })), "nothing reaches a disk or a peer: {actions:?}");
        assert!(actions.iter().any(|a| matches!(a, Action::DropLink { peer: 1, .. })), "the node detaches: {actions:?}");
        assert_eq!(answers(&actions), vec![(1, Err(BlockError::Io))], "the write that waited fails");
        assert_eq!(r.link_refusal(1), Some(crate::replica::DETACHED));
        r.peer_lost(t0, 1, crate::replica::DETACHED, 0);
        assert!(r.writes_idle());
        // Until `down` and `up`, every request fails and nothing is written.
        r.submit(t0, 2, BlockRequest::Flush, no_queue);
        r.submit(t0, 3, BlockRequest::Read { offset: 0, len: 4096 }, no_queue);
        r.submit(t0, 4, write(8192, 4096), no_queue);
        let actions = settled(&mut r);
        assert!(!actions.iter().any(|a| matches!(a, Action::Io { .. } | Action::Send { .. } | Action::Persist(_))), "{actions:?}");
        assert_eq!(answers(&actions), vec![(2, Err(BlockError::Io)), (3, Err(BlockError::Io)), (4, Err(BlockError::Io))]);
    }
}
