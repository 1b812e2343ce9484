//! The receiving side of a peer's stream. Replicated writes, resync data and digest
//! comparisons go to the local disk in stream order where they touch the same blocks (the local
//! I/Os of those that do not may run at once), writes are acknowledged as the protocol asks, a
//! barrier's flush waits for every write received before it (so its ack says all of them are
//! durable here), and the end of a resync waits for the resync data before it.

use super::weakened::{is_weakened, Rule};
use super::{Action, IoTag, LocalIo, MetaWrite, Replica};
use super::writes::LogStep;
use crate::core::states::{DiskState, ReplState, Role};
use crate::meta::activity_log::{extents_for, ActivityLog, AlError, AlJoined};
use crate::config::Protocol;
use crate::core::block_digest::{block_digests, differing_runs};
use crate::core::inflight::LocalFailure;
use crate::wire::{DataPosition, DigestPurpose, Message, DIGEST_BYTES};
use bytes::Bytes;
use std::collections::VecDeque;
use std::time::Instant;

/// What one step of a peer's stream does on the local disk.
#[derive(Debug)]
enum Work {
    /// A replicated write, `id` in the primary's stream.
    Write { id: u64, fua: bool, op: LocalIo },
    /// A block from this node's resync source; read first while `compare` (see
    /// `Replica::resync_block_read`), then written.
    Resync { data: Bytes, compare: bool },
    /// Blocks to compare with the peer's digests (verify or checksum resync): read, then
    /// answered. Answers go out in request order, so one comparison runs at a time.
    Compare { purpose: DigestPurpose, digests: Vec<[u8; DIGEST_BYTES]> },
}

#[derive(Debug)]
struct Step {
    /// Its place in the peer's stream (across connections).
    seq: u64,
    generation: u64,
    offset: u64,
    len: u64,
    work: Work,
    /// A write waits for the activity-log transaction that makes its extents hot.
    log: LogStep,
}

impl Step {
    /// Whether this step must wait for `earlier` (a step before it in the stream).
    fn waits_for(&self, earlier: &Step) -> bool {
        let both_compare = matches!(self.work, Work::Compare { .. }) && matches!(earlier.work, Work::Compare { .. });
        both_compare || (self.offset < earlier.offset + earlier.len && earlier.offset < self.offset + self.len)
    }

    /// The data it carries from the peer, not yet written.
    fn held_bytes(&self) -> usize {
        match &self.work {
            Work::Write { op: LocalIo::Write { data, .. }, .. } | Work::Resync { data, .. } => data.len(),
            Work::Write { .. } | Work::Compare { .. } => 0,
        }
    }

    /// What starting it issues: its I/O, tagged, and the id of the write it applies, if any.
    fn started(&self, peer: u8) -> (IoTag, LocalIo, Option<u64>) {
        let write = match self.work {
            Work::Write { id, .. } => Some(id),
            Work::Resync { .. } | Work::Compare { .. } => None,
        };
        (IoTag::Stream { peer, generation: self.generation, seq: self.seq }, self.io(), write)
    }

    fn io(&self) -> LocalIo {
        match &self.work {
            Work::Write { op, .. } => op.clone(),
            Work::Resync { compare: true, .. } => LocalIo::Read { offset: self.offset, len: self.len as usize },
            Work::Resync { data, compare: false } => LocalIo::Write { offset: self.offset, data: data.clone(), fua: false },
            Work::Compare { .. } => LocalIo::Read { offset: self.offset, len: self.len as usize },
        }
    }
}

/// A point of the stream that waits for every step before it.
#[derive(Debug)]
enum Mark {
    /// A barrier: flushed, then acknowledged with the writes of its epoch (as counted here; the
    /// primary checks them against its own count). `term`: see `Replica::stream_term`.
    /// `resynced`: the ranges the sync source's resync data of the epoch rewrote.
    Barrier { epoch: u64, writes: u32, flushing: bool, term: Option<u64>, resynced: Vec<(u64, u64)> },
    /// The sync source's end of a resync.
    ResyncDone { current: u64, history: [u64; 4], position: DataPosition },
    /// A FUA write of epoch `epoch`, acknowledged in stream order once it is `durable`: this
    /// node's data position then names it (see `Replica::fua_write_reached`). `term`: see
    /// `Replica::stream_term`.
    FuaWrite { id: u64, epoch: u64, durable: bool, term: Option<u64> },
}

/// How much of a peer's stream's data a node holds, received and not yet written, before its
/// driver stops reading that peer's frames ([`Replica::takes_more_of`]). The steps waiting for
/// an activity-log transaction, or behind a slow disk, no longer hold the reader up (the
/// transaction is written elsewhere), so without a bound a primary under protocol A, whose
/// writes complete once sent, could fill this node's memory for as long as its disk lags;
/// with it the peer's send queue fills and paces (or pulls ahead of) this node. A protocol C
/// primary never has more in flight than its clients' queue depths.
pub const STREAM_BACKLOG_BYTES: usize = 32 << 20;

/// The steps and marks of one peer's stream that are not done yet.
#[derive(Debug, Default)]
pub struct Applying {
    received: u64,
    /// Submitted to the local disk.
    running: Vec<Step>,
    /// Waiting for an earlier step, in stream order.
    waiting: VecDeque<Step>,
    /// With the stream position of the last step before each.
    marks: VecDeque<(u64, Mark)>,
    /// The ranges resync data rewrote in the source's open epoch, for its barrier.
    resynced: Vec<(u64, u64)>,
}

impl Applying {
    /// Whether a step of the stream that touches `[offset, offset + len)` is not done yet.
    pub fn overlaps(&self, offset: u64, len: u64) -> bool {
        self.running.iter().chain(&self.waiting).any(|a| offset < a.offset + a.len && a.offset < offset + len)
    }

    /// Transaction `seq` is durable: the steps that waited for it may start (`durable` makes
    /// their `log` say so).
    pub(super) fn log_durable(&mut self, durable: impl Fn(&mut LogStep)) {
        self.waiting.iter_mut().for_each(|step| durable(&mut step.log));
    }

    /// A step taken out of `running` waits again, in its place in the stream.
    fn wait_again(&mut self, step: Step) {
        let at = self.waiting.iter().position(|w| w.seq > step.seq).unwrap_or(self.waiting.len());
        self.waiting.insert(at, step);
    }

    /// The link went: steps not yet submitted and marks are dropped (the source resyncs
    /// whatever it did not hear back about); steps submitted finish, unanswered.
    pub fn link_down(&mut self) {
        self.waiting.clear();
        self.marks.clear();
        self.resynced.clear();
    }

    /// `[offset, offset + len)` was marked out of sync with the peer after resync data rewrote
    /// it: the barriers to come must not clear it.
    pub fn void_resynced(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let cut = |ranges: &mut Vec<(u64, u64)>| {
            *ranges = ranges
                .iter()
                .flat_map(|&(at, n)| [(at, offset.min(at + n)), (end.max(at), at + n)])
                .filter(|(from, to)| from < to)
                .map(|(from, to)| (from, to - from))
                .collect();
        };
        cut(&mut self.resynced);
        for (_, mark) in self.marks.iter_mut() {
            if let Mark::Barrier { resynced, .. } = mark {
                cut(resynced);
            }
        }
    }

    /// The stream's data received and not yet written.
    pub fn held_bytes(&self) -> usize {
        self.running.iter().chain(&self.waiting).map(Step::held_bytes).sum()
    }

    fn done_through(&self, seq: u64) -> bool {
        !self.running.iter().chain(&self.waiting).any(|a| a.seq <= seq)
    }
}

/// Makes `[offset, offset + len)` hot in the activity log for a step of a peer's stream. No
/// reference is kept (see `Replica::note_in_activity_log`).
fn join_log(al: &mut ActivityLog, offset: u64, len: u64) -> Result<LogStep, AlError> {
    let Some(extents) = extents_for(offset, len) else { return Ok(LogStep::Hot) };
    let joined = al.join(extents.clone())?;
    al.release(extents);
    Ok(match joined {
        AlJoined::AllHot => LogStep::Hot,
        AlJoined::Batched { seq } => LogStep::Awaiting(seq),
    })
}

impl Replica {
    /// Whether the driver may read more of `peer_id`'s frames: this node holds less than
    /// [`STREAM_BACKLOG_BYTES`] of its stream's data not yet written. Once it holds more, the
    /// driver reads again when steps finish. (The simulator's world delivers regardless: its
    /// devices are a few MiB.)
    pub fn takes_more_of(&self, peer_id: u8) -> bool {
        self.peer(peer_id).applying.held_bytes() < STREAM_BACKLOG_BYTES
    }

    /// A write in the primary's stream (`check_frame` passed it): recorded for the peers that
    /// do not follow the primary, and applied in stream order (acknowledged as received under
    /// protocol B as it goes to the disk, see `Replica::issue_step`).
    #[allow(clippy::too_many_arguments)]
    pub fn peer_write_received(&mut self, now: Instant, peer_id: u8, (id, epoch): (u64, u64), offset: u64, len: u64, fua: bool, op: LocalIo) {
        let absent = self.slots_not_following(peer_id);
        for &slot in &absent {
            self.mark_out_of_sync(slot, offset, len);
        }
        self.recent.record(offset, len, now, peer_id);
        let log = self.note_in_activity_log(offset, len, &absent);
        let peer = self.peer_mut(peer_id);
        peer.rx_epoch_writes += 1;
        peer.received_bytes += len;
        if self.protocol == Protocol::B && is_weakened(Rule::RecvAckOnArrival) {
            self.send(peer_id, Message::RecvAck { id });
        }
        self.stream_step(peer_id, offset, len, Work::Write { id, fua, op }, log);
        if fua {
            let term = self.stream_term(peer_id);
            let applying = &mut self.peer_mut(peer_id).applying;
            applying.marks.push_back((applying.received, Mark::FuaWrite { id, epoch, durable: false, term }));
        }
    }

    /// A write applied here as a secondary makes its extents hot in this node's activity log,
    /// durably before it reaches the disk, as the primary's own writes do: the bits this node
    /// records for peers that miss the primary's writes (and the recent writes it marks when
    /// one goes) live in memory until a bitmap page is written, and after a crash the hot
    /// extents stand for them (see `Replica::attach`). No reference is kept: a secondary's
    /// extent may be evicted at any time, its bitmap pages written first (a pending one is
    /// not). Writes arriving together share one transaction, which the write waits for (see
    /// [`Action::WriteLog`]). A write the log has no room for now waits until it has
    /// ([`Replica::rejoin_stream_steps`]); one it can never take writes the bitmaps of the
    /// peers it is recorded for instead.
    fn note_in_activity_log(&mut self, offset: u64, len: u64, absent: &[usize]) -> LogStep {
        match join_log(&mut self.al, offset, len) {
            Ok(log) => log,
            Err(AlError::Busy) => LogStep::NotJoined,
            Err(_) => {
                for &slot in absent {
                    self.persist(MetaWrite::Bitmap(slot));
                }
                LogStep::Hot
            }
        }
    }

    /// The stream steps the activity log could not take when they arrived (the next
    /// transaction was full, or every slot was pending) join it in stream order, as far as it
    /// has room now: a transaction was committed or extents were released. One that can never
    /// join writes the bitmaps instead, of every data peer, as it would have on arrival.
    pub(super) fn rejoin_stream_steps(&mut self) {
        let mut write_bitmaps = false;
        let mut started = Vec::new();
        'peers: for peer in self.peers.iter_mut() {
            for step in peer.applying.waiting.iter_mut().filter(|step| step.log == LogStep::NotJoined) {
                step.log = match join_log(&mut self.al, step.offset, step.len) {
                    Ok(log) => log,
                    Err(AlError::Busy) => break 'peers,
                    Err(_) => {
                        write_bitmaps = true;
                        LogStep::Hot
                    }
                };
                if step.log == LogStep::Hot && !started.contains(&peer.node_id) {
                    started.push(peer.node_id);
                }
            }
        }
        if write_bitmaps {
            let slots: Vec<usize> = self.peers.iter().filter(|p| !p.witness).map(|p| p.slot).collect();
            for slot in slots {
                self.persist(MetaWrite::Bitmap(slot));
            }
        }
        for peer_id in started {
            self.stream_step_finished(peer_id);
        }
    }

    /// A block from this node's sync source (`check_frame` saw it as one).
    pub fn resync_data_received(&mut self, peer_id: u8, offset: u64, data: Bytes) {
        self.resync_step(peer_id, offset, data.len() as u64, data);
    }

    /// A `ResyncZeroes` (`check_frame` found it fitting): written as resync data of zeroes, of
    /// which only the frame's fields crossed the wire.
    pub fn resync_zeroes_received(&mut self, peer_id: u8, offset: u64, len: u32) {
        let received = crate::wire::RESYNC_ZEROES_BYTES as u64;
        self.resync_step(peer_id, offset, received, crate::wire::zero_bytes(len as usize));
    }

    /// Resync data for `offset` (`received` bytes of it came over the wire).
    fn resync_step(&mut self, peer_id: u8, offset: u64, received: u64, data: Bytes) {
        let peer = self.peer_mut(peer_id);
        let len = data.len() as u64;
        peer.rx_epoch_writes += 1;
        peer.received_bytes += received;
        peer.applying.resynced.push((offset, len));
        // With another data peer, what the block held is compared first (see
        // `Replica::resync_block_read`).
        let compare = self.peers.iter().any(|p| p.node_id != peer_id && !p.witness);
        self.stream_step(peer_id, offset, len, Work::Resync { data, compare }, LogStep::Hot);
    }

    /// A `DigestRequest` (`check_frame` found it fitting): this node reads the blocks at this
    /// point of the stream and answers which differ.
    pub fn digest_request_received(&mut self, peer_id: u8, purpose: DigestPurpose, offset: u64, digests: Vec<[u8; DIGEST_BYTES]>) {
        self.peer_mut(peer_id).received_bytes += (digests.len() * DIGEST_BYTES) as u64;
        let (offset, len) = self.block_range(offset, (0, digests.len() as u32));
        self.stream_step(peer_id, offset, len, Work::Compare { purpose, digests }, LogStep::Hot);
    }

    /// A barrier in the primary's stream: its flush follows every write received before it.
    pub fn peer_barrier_received(&mut self, peer_id: u8, epoch: u64) {
        let term = self.stream_term(peer_id);
        let peer = self.peer_mut(peer_id);
        let writes = std::mem::take(&mut peer.rx_epoch_writes);
        let resynced = std::mem::take(&mut peer.applying.resynced);
        peer.applying.marks.push_back((peer.applying.received, Mark::Barrier { epoch, writes, flushing: false, term, resynced }));
        self.advance_marks(peer_id);
    }

    /// The sync source ended the resync: taken once the resync data before it is written.
    pub fn resync_done_in_stream(&mut self, peer_id: u8, current: u64, history: [u64; 4], position: DataPosition) {
        let applying = &mut self.peer_mut(peer_id).applying;
        applying.marks.push_back((applying.received, Mark::ResyncDone { current, history, position }));
        self.advance_marks(peer_id);
    }

    fn stream_step(&mut self, peer_id: u8, offset: u64, len: u64, work: Work, log: LogStep) {
        let peer = self.peer_mut(peer_id);
        peer.applying.received += 1;
        let step = Step { seq: peer.applying.received, generation: peer.generation, offset, len, work, log };
        let applying = &mut peer.applying;
        if step.log != LogStep::Hot || applying.running.iter().chain(&applying.waiting).any(|earlier| step.waits_for(earlier)) {
            applying.waiting.push_back(step);
        } else {
            self.submit_step(peer_id, step);
        }
    }

    fn submit_step(&mut self, peer_id: u8, step: Step) {
        let started = step.started(peer_id);
        self.peer_mut(peer_id).applying.running.push(step);
        self.issue_step(peer_id, started);
    }

    /// A step of `peer_id`'s stream goes to the disk. Protocol B acknowledges a write as
    /// received here, not as it arrives: the primary completes the write on that ack, so the
    /// write must then reach this disk whatever becomes of the link, and a step still waiting
    /// (for an earlier write to its blocks, or for the activity log) is dropped when the link
    /// goes (`Applying::link_down`), while one submitted finishes. Acknowledged on arrival, a
    /// write waiting here when its primary's daemon was killed was on neither secondary of
    /// three, and the one promoted had never had it (`tests/chaos.rs` under protocol B).
    fn issue_step(&mut self, peer_id: u8, (tag, op, write): (IoTag, LocalIo, Option<u64>)) {
        self.outbox.push(Action::Io { tag, op });
        if let (Protocol::B, Some(id), false) = (self.protocol, write, is_weakened(Rule::RecvAckOnArrival)) {
            self.send(peer_id, Message::RecvAck { id });
        }
    }

    /// A step's local I/O finished: it is answered on its connection if that is still the
    /// peer's, and the steps and marks waiting for it go on.
    pub(super) fn stream_step_done(&mut self, peer_id: u8, generation: u64, seq: u64, result: Result<Option<Bytes>, LocalFailure>) {
        let detached = self.detached();
        let peer = self.peer_mut(peer_id);
        let Some(index) = peer.applying.running.iter().position(|a| a.generation == generation && a.seq == seq) else { return };
        let step = peer.applying.running.swap_remove(index);
        // A detached node's links are going even while the driver has not yet taken them down.
        let current = peer.connected && peer.generation == generation && !detached;
        if let (true, Work::Resync { data, compare: true }, Ok(Some(old))) = (current, &step.work, &result) {
            match self.resync_block_read(peer_id, step.offset, data.clone(), old) {
                // Still the same step: the steps and marks after it keep waiting.
                Some((write, LogStep::Hot)) => return self.submit_step(peer_id, Step { work: write, ..step }),
                Some((write, log)) => return self.peer_mut(peer_id).applying.wait_again(Step { work: write, log, ..step }),
                None => return self.stream_step_finished(peer_id),
            }
        }
        if current {
            self.answer_step(peer_id, step, result);
        }
        self.stream_step_finished(peer_id);
    }

    /// A resync block is about to replace what this node holds, which the peers this node
    /// was in sync with hold too (and do not learn of by themselves within one generation:
    /// the third node of seed 7579 kept a block two others had since had rewritten). Where it
    /// changes, it is recorded for every other data peer, durably before the write, as a
    /// primary's write is for a peer that misses it; where it does not, nothing is written or
    /// recorded, so a block resent around three nodes stops after one round. Returns the
    /// write (and whether it waits for the activity log), or nothing when the block already
    /// holds the data.
    fn resync_block_read(&mut self, source: u8, offset: u64, data: Bytes, old: &Bytes) -> Option<(Work, LogStep)> {
        if *old == data {
            return None;
        }
        let len = data.len() as u64;
        let others: Vec<usize> = if is_weakened(Rule::ResyncRecordsForNobody) {
            Vec::new()
        } else {
            self.peers.iter().filter(|p| p.node_id != source && !p.witness).map(|p| p.slot).collect()
        };
        for &slot in &others {
            self.mark_out_of_sync(slot, offset, len);
        }
        let log = self.note_in_activity_log(offset, len, &others);
        Some((Work::Resync { data, compare: false }, log))
    }

    /// The steps waiting for a step that finished start if nothing earlier holds them, and
    /// the marks go on.
    pub(super) fn stream_step_finished(&mut self, peer_id: u8) {
        // The waiting steps that no longer wait for anything earlier start now; each joins the
        // running ones at once, so a later step to the same blocks still waits for it.
        let applying = &mut self.peer_mut(peer_id).applying;
        let mut started = Vec::new();
        let mut i = 0;
        while i < applying.waiting.len() {
            let step = &applying.waiting[i];
            let mut earlier = applying.running.iter().chain(applying.waiting.iter().take(i));
            if step.log != LogStep::Hot || earlier.any(|e| step.waits_for(e)) {
                i += 1;
                continue;
            }
            let step = applying.waiting.remove(i).expect("indexed");
            started.push(step.started(peer_id));
            applying.running.push(step);
        }
        for step in started {
            self.issue_step(peer_id, step);
        }
        self.advance_marks(peer_id);
    }

    fn answer_step(&mut self, peer_id: u8, step: Step, result: Result<Option<Bytes>, LocalFailure>) {
        let generation = step.generation;
        match (step.work, result) {
            (Work::Write { id, fua: true, .. }, Ok(_)) => {
                let marks = &mut self.peer_mut(peer_id).applying.marks;
                if let Some((_, Mark::FuaWrite { durable, .. })) = marks.iter_mut().find(|(_, m)| matches!(m, Mark::FuaWrite { id: i, .. } if *i == id)) {
                    *durable = true;
                }
            }
            (Work::Write { id, fua: false, .. }, Ok(_)) => {
                if self.protocol == Protocol::C {
                    self.send(peer_id, Message::WriteAck { id });
                }
            }
            (Work::Write { id, .. }, Err(failure)) => {
                self.send(peer_id, Message::NegAck { id, errno: failure.errno() });
                self.local_write_failed(step.offset, step.len, failure);
            }
            // The block's bit clears once the barrier after it made it durable (see
            // `Replica::barrier_flushed`).
            (Work::Resync { .. }, Ok(_)) => {}
            (Work::Compare { purpose, digests }, Ok(Some(data))) => {
                let block_size = self.sb.params.bitmap_block_size as usize;
                let differing = differing_runs(&block_digests(&data, block_size), &digests);
                self.compared(peer_id, purpose, step.offset, digests.len() as u32, differing);
            }
            (work, result) => {
                let what = if matches!(work, Work::Resync { .. }) { "resync write" } else { "read to compare digests" };
                let reason = format!("{what} at {}+{} failed: {:?}", step.offset, step.len, result.err());
                self.outbox.push(Action::DropLink { peer: peer_id, generation, reason });
            }
        }
    }

    /// Carries out the marks whose steps before them are all done, in order.
    fn advance_marks(&mut self, peer_id: u8) {
        loop {
            let peer = self.peer_mut(peer_id);
            let generation = peer.generation;
            let applying = &mut peer.applying;
            let Some(&(after, _)) = applying.marks.front() else { return };
            if !applying.done_through(after) {
                return;
            }
            let (_, mark) = applying.marks.front_mut().expect("present");
            match mark {
                Mark::Barrier { flushing: true, .. } => return,
                Mark::Barrier { epoch, flushing, .. } => {
                    *flushing = true;
                    let epoch = *epoch;
                    if is_weakened(Rule::SecondaryWithoutFlush) {
                        self.barrier_flushed(peer_id, generation, epoch, Ok(()));
                        return;
                    }
                    let tag = IoTag::Barrier { peer: peer_id, generation, epoch };
                    self.outbox.push(Action::Io { tag, op: LocalIo::Flush });
                    return;
                }
                Mark::ResyncDone { current, history, position } => {
                    let (current, history, position) = (*current, *history, *position);
                    applying.marks.pop_front();
                    self.resync_done_received(peer_id, current, history, position);
                }
                Mark::FuaWrite { id, epoch, durable, term } => {
                    let (id, epoch, durable, term) = (*id, *epoch, *durable, *term);
                    applying.marks.pop_front();
                    // A failed one was answered with its NegAck.
                    if durable {
                        self.fua_write_reached(peer_id, id, epoch, term);
                    }
                }
            }
        }
    }

    /// The term of the primary stream a mark arriving from `peer_id` belongs to, when this
    /// node's data is that stream: the peer is primary (or was, on this link: the last barrier
    /// of its demotion may arrive after the State saying so, the control lane overtaking the
    /// bulk one) and this node is UpToDate in its term. A node being resynced holds part of
    /// the stream over older data, and its position (of another term) says nothing of it.
    ///
    /// Taken as the mark arrives, not once its flush or write is done: the primary may have
    /// demoted meanwhile, and the epoch it closes is still one of its writes, acknowledged to
    /// its clients. Seed 48329: a barrier's flush done after the demoting primary's State
    /// left this node's position an epoch short, and it gave its vote to a candidate that
    /// lacked the epoch's acknowledged writes.
    ///
    /// A `ResyncDone` of the peer's not done yet comes first in the stream: by the time this
    /// mark is done this node holds the stream of that end's term (unless the end leaves it
    /// short of UpToDate, see `Replica::still_holds_stream`). The end names the last epoch
    /// closed before it, so the barrier closing the next, arriving while the resync's last
    /// blocks were still being written, is this node's to record; left unrecorded, its ack
    /// counted towards a FLUSH this node then did not claim, and a candidate without that
    /// epoch could win its vote.
    fn stream_term(&self, peer_id: u8) -> Option<u64> {
        let peer = self.peer(peer_id);
        let ending = peer.applying.marks.iter().rev().find_map(|(_, mark)| match mark {
            Mark::ResyncDone { position, .. } => Some(position.term),
            _ => None,
        });
        let term = ending.unwrap_or(self.sb.terms.of_data);
        let held = (peer.role == Role::Primary || peer.was_primary)
            && (self.disk == DiskState::UpToDate || ending.is_some())
            && peer.last_state.is_some_and(|s| s.data_position.term == term);
        held.then_some(term)
    }

    /// Whether this node's data is still the stream of `term` (see `Replica::stream_term`) as
    /// a mark of it is done: not if it has since followed another generation or is being
    /// resynced.
    fn still_holds_stream(&self, term: Option<u64>) -> bool {
        term.is_some_and(|term| self.disk == DiskState::UpToDate && self.sb.terms.of_data == term)
    }

    /// A FUA write is durable here, and so is every write and barrier before it in the
    /// stream: from its primary, this node's data position moves to it, durably, before the
    /// `WriteAck` that lets the primary acknowledge it (two copies that differed by an
    /// acknowledged FUA write would otherwise tie, and the one without it could be chosen).
    fn fua_write_reached(&mut self, peer_id: u8, id: u64, epoch: u64, term: Option<u64>) {
        if self.still_holds_stream(term) {
            let position = DataPosition { epoch: epoch.saturating_sub(1), fua: id, ..self.data_position() };
            if position > self.data_position() {
                self.set_data_position(position);
                self.persist(MetaWrite::Superblock);
            }
        }
        self.send(peer_id, Message::WriteAck { id });
    }

    /// A barrier's flush finished: acknowledged with the epoch's write count, or the link goes
    /// (the primary must not take writes this disk may have lost as durable).
    pub(super) fn barrier_flushed(&mut self, peer_id: u8, generation: u64, epoch: u64, result: Result<(), LocalFailure>) {
        let peer = self.peer_mut(peer_id);
        if !peer.connected || peer.generation != generation {
            return;
        }
        let Some((_, Mark::Barrier { epoch: flushed, writes, term, resynced, .. })) = peer.applying.marks.pop_front() else { return };
        debug_assert_eq!(flushed, epoch);
        match result {
            Ok(()) => {
                if peer.repl == ReplState::SyncTarget {
                    self.resync_durable(peer_id, resynced);
                }
                if self.still_holds_stream(term) {
                    // Its primary's stream is durable here up to this epoch, and says so only
                    // once that is durable too (see `Terms::epoch_of_data`).
                    self.set_data_position(DataPosition { epoch, fua: 0, ..self.data_position() });
                    self.persist(MetaWrite::Superblock);
                }
                self.send(peer_id, Message::BarrierAck { epoch, writes });
                self.advance_marks(peer_id);
            }
            Err(failure) => {
                let reason = format!("local flush for barrier {epoch} failed: {failure:?}");
                self.outbox.push(Action::DropLink { peer: peer_id, generation, reason });
            }
        }
    }

    /// The resync data of one of the source's epochs is durable here: those blocks hold the
    /// source's data, and their bits for the source clear, so a resync interrupted from now on
    /// resumes where it stood instead of resending them (the source clears its own bits as
    /// the barrier's ack reaches it; until both have, the union both resync keeps them). What
    /// those bits said for the other peers was recorded before: the source's bits for each
    /// third node over a chunk come ahead of it (see `Replica::send_third_peer_bits`), and a
    /// block the resync changed was marked for every other data peer before it was written
    /// (see `Replica::resync_block_read`). The bits clear in memory only: after a crash the
    /// last bitmap written stands, which over-reports. Ranges are joined first, since runs of
    /// zeroes cut a block into frames that cover it only together.
    fn resync_durable(&mut self, source: u8, mut resynced: Vec<(u64, u64)>) {
        resynced.sort_unstable();
        let mut joined: Vec<(u64, u64)> = Vec::new();
        for (offset, len) in resynced {
            match joined.last_mut() {
                Some((at, n)) if offset <= *at + *n => *n = (*n).max(offset + len - *at),
                _ => joined.push((offset, len)),
            }
        }
        let slot = self.peer(source).slot;
        for (offset, len) in joined {
            self.bitmaps[slot].clear_range(offset, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::core::block_digest::block_digests;
    use crate::core::inflight::LocalFailure;
    use crate::core::states::Role;
    use crate::replica::testing::{log_writes, secondary_of_primary, secondary_of_primary_with_al_extents, secondary_state, settled};
    use crate::replica::{Action, IoTag, LocalIo, Replica, STREAM_BACKLOG_BYTES};
    use crate::wire::{DataPosition, DigestPurpose, Message, PeerState};
    use bytes::Bytes;

    fn data(offset: u64) -> LocalIo {
        LocalIo::Write { offset, data: Bytes::from(vec![1u8; 4096]), fua: false }
    }

    fn io_tags(actions: &[Action]) -> Vec<IoTag> {
        actions.iter().filter_map(|a| match a {
            Action::Io { tag, .. } => Some(*tag),
            _ => None,
        }).collect()
    }

    fn sent(actions: &[Action]) -> Vec<&Message> {
        actions.iter().filter_map(|a| match a {
            Action::Send { msg, .. } => Some(msg),
            _ => None,
        }).collect()
    }

    #[test]
    fn overlapping_writes_apply_in_stream_order_and_a_barrier_waits_for_the_writes_before_it() {
        let (mut r, t0) = secondary_of_primary();
        let generation = r.peer(1).generation;
        r.peer_write_received(t0, 1, (1, 1), 0, 4096, false, data(0));
        r.peer_write_received(t0, 1, (2, 1), 0, 4096, false, data(0));
        r.peer_write_received(t0, 1, (3, 1), 8192, 4096, false, data(8192));
        r.peer_barrier_received(1, 7);
        let actions = settled(&mut r);
        let write = |seq| IoTag::Stream { peer: 1, generation, seq };
        assert_eq!(io_tags(&actions), vec![write(1), write(3)], "write 2 waits for write 1");
        r.io_done(t0, write(3), Ok(None));
        r.io_done(t0, write(1), Ok(None));
        let actions = r.take_actions();
        assert_eq!(io_tags(&actions), vec![write(2)]);
        assert!(matches!(sent(&actions)[..], [Message::WriteAck { id: 3 }, Message::WriteAck { id: 1 }]), "{actions:?}");
        r.io_done(t0, write(2), Ok(None));
        let actions = r.take_actions();
        let barrier = IoTag::Barrier { peer: 1, generation, epoch: 7 };
        assert_eq!(io_tags(&actions), vec![barrier], "the flush follows the last write before the barrier");
        r.io_done(t0, barrier, Ok(None));
        let actions = r.take_actions();
        assert!(matches!(sent(&actions)[..], [Message::BarrierAck { epoch: 7, writes: 3 }]), "{actions:?}");
    }

    /// Protocol B acknowledges a write as received, and the primary completes it on that: the
    /// write must then reach this disk whatever becomes of the link. A step still waiting (for
    /// an earlier write to its blocks, or for the activity log) is dropped when the link goes,
    /// so it is acknowledged only as it goes to the disk. Before, both acks left at once, and
    /// `tests/chaos.rs` under protocol B (three data nodes, the primary's daemon killed) found
    /// an acknowledged write on neither secondary.
    #[test]
    fn under_protocol_b_a_write_is_acknowledged_as_received_only_as_it_goes_to_the_disk() {
        let (mut r, t0) = secondary_of_primary();
        r.protocol = crate::config::Protocol::B;
        let generation = r.peer(1).generation;
        let write = |seq| IoTag::Stream { peer: 1, generation, seq };
        let recv_acks = |actions: &[Action]| -> Vec<u64> {
            sent(actions).into_iter().filter_map(|m| match m { Message::RecvAck { id } => Some(*id), _ => None }).collect()
        };
        r.peer_write_received(t0, 1, (1, 1), 0, 4096, false, data(0));
        r.peer_write_received(t0, 1, (2, 1), 0, 4096, false, data(0));
        let actions = settled(&mut r);
        assert_eq!((io_tags(&actions), recv_acks(&actions)), (vec![write(1)], vec![1]), "write 2 waits for write 1, unacknowledged");
        r.io_done(t0, write(1), Ok(None));
        let actions = r.take_actions();
        assert_eq!((io_tags(&actions), recv_acks(&actions)), (vec![write(2)], vec![2]));

        // The link goes while a write waits: it is dropped, and was never acknowledged.
        r.peer_write_received(t0, 1, (3, 1), 0, 4096, false, data(0));
        assert!(recv_acks(&r.take_actions()).is_empty());
        r.peer_lost(t0, 1, "peer closed the connection", 0);
        r.io_done(t0, write(2), Ok(None));
        let actions = r.take_actions();
        assert_eq!((io_tags(&actions), recv_acks(&actions)), (vec![], vec![]));
    }

    #[test]
    fn a_barrier_flushed_after_its_primary_demoted_still_moves_the_position_this_node_votes_by() {
        let (mut r, t0) = secondary_of_primary();
        let current = r.sb.uuids.current;
        let primary = PeerState { role: Role::Primary.to_wire(), ..secondary_state(current, [0; 4]) };
        r.peer_state_received(1, primary).expect("the primary's State");
        let generation = r.peer(1).generation;
        r.peer_write_received(t0, 1, (1, 5), 0, 4096, false, data(0));
        r.peer_barrier_received(1, 5);
        r.io_done(t0, IoTag::Stream { peer: 1, generation, seq: 1 }, Ok(None));
        r.take_actions();
        // The primary demotes: its State arrives while this node still flushes the barrier it
        // sent before, which closes an epoch of its acknowledged writes.
        r.peer_state_received(1, secondary_state(current, [0; 4])).expect("the demoted primary's State");
        r.io_done(t0, IoTag::Barrier { peer: 1, generation, epoch: 5 }, Ok(None));
        let actions = r.take_actions();
        assert!(sent(&actions).iter().any(|m| matches!(m, Message::BarrierAck { epoch: 5, writes: 1 })), "{:?}", sent(&actions));
        assert_eq!(r.data_position().epoch, 5);
        assert!(actions.iter().any(|a| matches!(a, Action::Persist(crate::replica::MetaWrite::Superblock))), "durably");
        // A candidate a barrier short gets no vote from this node.
        let behind = DataPosition { epoch: 4, ..r.data_position() };
        r.vote_requested(t0, 1, 77, r.sb.terms.highest + 1, behind);
        let actions = r.take_actions();
        let answer = sent(&actions);
        assert!(
            matches!(answer[..], [Message::State(PeerState { data_position, .. }), Message::Vote { ballot: 77, granted: false }] if data_position.epoch == 5),
            "the position it refuses by, then the refusal: {answer:?}"
        );
    }

    #[test]
    fn a_node_whose_metadata_write_failed_starts_no_more_of_its_stream_and_flushes_no_barrier() {
        let (mut r, t0) = secondary_of_primary();
        r.peer_write_received(t0, 1, (1, 1), 0, 4096, false, data(0));
        r.peer_write_received(t0, 1, (2, 1), 4096, 4096, false, data(4096));
        r.peer_write_received(t0, 1, (3, 1), 0, 4096, false, data(0));
        r.peer_barrier_received(1, 7);
        let actions = r.take_actions();
        assert_eq!(io_tags(&actions), vec![], "the writes wait for their activity-log transaction");
        // It fails: no write reaches the failed disk, nor what waited for them.
        let seq = actions.iter().find_map(|a| match a {
            Action::WriteLog { update, .. } => Some(update.transaction.seq()),
            _ => None,
        }).expect("an activity-log transaction");
        r.log_written(seq, Err("Input/output error".into()));
        assert!(r.detached());
        let actions = r.take_actions();
        assert_eq!(io_tags(&actions), vec![], "no write, nor the barrier's flush");
        assert!(sent(&actions).is_empty(), "{:?}", sent(&actions));
        assert!(actions.iter().any(|a| matches!(a, Action::DropLink { peer: 1, .. })), "{actions:?}");
    }

    #[test]
    fn writes_arriving_while_a_transaction_is_written_share_the_next_and_the_barrier_waits_for_them() {
        let (mut r, t0) = secondary_of_primary();
        let generation = r.peer(1).generation;
        let write = |seq| IoTag::Stream { peer: 1, generation, seq };
        let extent = crate::meta::activity_log::AL_EXTENT_SIZE;
        r.peer_write_received(t0, 1, (1, 1), 0, 4096, false, data(0));
        let actions = r.take_actions();
        let logs = log_writes(&actions);
        let [(first, _)] = &logs[..] else { panic!("one transaction: {actions:?}") };
        assert_eq!(io_tags(&actions), vec![], "the write waits for it");
        r.peer_write_received(t0, 1, (2, 1), extent, 4096, false, data(extent));
        r.peer_write_received(t0, 1, (3, 1), 2 * extent, 4096, false, data(2 * extent));
        r.peer_write_received(t0, 1, (4, 1), 8192, 4096, false, data(8192));
        r.peer_barrier_received(1, 7);
        let actions = r.take_actions();
        assert!(log_writes(&actions).is_empty() && io_tags(&actions).is_empty(), "one transaction at a time: {actions:?}");
        r.log_written(*first, Ok(()));
        let actions = r.take_actions();
        assert_eq!(io_tags(&actions), vec![write(1), write(4)], "the writes into extent 0");
        let logs = log_writes(&actions);
        let [(second, _)] = &logs[..] else { panic!("one transaction for the others: {actions:?}") };
        r.io_done(t0, write(1), Ok(None));
        r.io_done(t0, write(4), Ok(None));
        assert_eq!(io_tags(&r.take_actions()), vec![], "the barrier waits for writes 2 and 3");
        r.log_written(*second, Ok(()));
        assert_eq!(io_tags(&r.take_actions()), vec![write(2), write(3)]);
        r.io_done(t0, write(2), Ok(None));
        r.io_done(t0, write(3), Ok(None));
        assert_eq!(io_tags(&r.take_actions()), vec![IoTag::Barrier { peer: 1, generation, epoch: 7 }]);
    }

    #[test]
    fn a_write_the_log_has_no_room_for_waits_for_a_slot_and_evicts_what_became_durable() {
        let (mut r, t0) = secondary_of_primary_with_al_extents(7);
        let generation = r.peer(1).generation;
        let write = |seq| IoTag::Stream { peer: 1, generation, seq };
        let extent = crate::meta::activity_log::AL_EXTENT_SIZE;
        r.peer_write_received(t0, 1, (1, 1), 0, 4096, false, data(0));
        let logs = log_writes(&r.take_actions());
        let [(first, _)] = &logs[..] else { panic!("one transaction: {logs:?}") };
        // Six more extents fill the other slots in the next batch; the eighth finds every slot
        // pending, so it waits, and nothing is written for it yet.
        for id in 2..=8 {
            let offset = (id - 1) * extent;
            r.peer_write_received(t0, 1, (id, 1), offset, 4096, false, data(offset));
        }
        r.peer_barrier_received(1, 7);
        let actions = r.take_actions();
        assert!(io_tags(&actions).is_empty() && log_writes(&actions).is_empty(), "{actions:?}");
        assert!(!actions.iter().any(|a| matches!(a, Action::Persist(_))), "no bitmap written in its place: {actions:?}");
        // The first transaction is durable: extent 0 may be evicted now, and the eighth write
        // takes its slot in the batch the others wait in.
        r.log_written(*first, Ok(()));
        let actions = r.take_actions();
        assert_eq!(io_tags(&actions), vec![write(1)]);
        let update = actions.iter().find_map(|a| match a {
            Action::WriteLog { update, flush_data } => Some((update.clone(), *flush_data)),
            _ => None,
        });
        let Some((update, flush_data)) = update else { panic!("the second transaction: {actions:?}") };
        let mut added = update.added().to_vec();
        added.sort_unstable();
        assert_eq!(added, (1..=7).collect::<Vec<u64>>());
        assert!(flush_data, "it evicts extent 0, whose write must be on disk first");
        r.io_done(t0, write(1), Ok(None));
        assert!(io_tags(&r.take_actions()).is_empty(), "the barrier waits for the seven others");
        r.log_written(update.transaction.seq(), Ok(()));
        assert_eq!(io_tags(&r.take_actions()), (2..=8).map(write).collect::<Vec<_>>());
        for seq in 2..=8 {
            r.io_done(t0, write(seq), Ok(None));
        }
        assert_eq!(io_tags(&r.take_actions()), vec![IoTag::Barrier { peer: 1, generation, epoch: 7 }]);
    }

    #[test]
    fn a_node_holding_a_full_backlog_of_a_stream_takes_no_more_of_it_until_a_step_is_written() {
        let (mut r, t0) = secondary_of_primary();
        let generation = r.peer(1).generation;
        let len = 1 << 20;
        let writes = (STREAM_BACKLOG_BYTES / len) as u64;
        // Writes to the same MiB: the first runs, the others wait for it.
        for id in 1..=writes {
            assert!(r.takes_more_of(1), "{} MiB held", id - 1);
            let op = LocalIo::Write { offset: 0, data: Bytes::from(vec![id as u8; len]), fua: false };
            r.peer_write_received(t0, 1, (id, 1), 0, len as u64, false, op);
        }
        assert!(!r.takes_more_of(1), "{writes} MiB held, none written");
        let first = IoTag::Stream { peer: 1, generation, seq: 1 };
        assert_eq!(io_tags(&settled(&mut r)), vec![first]);
        assert!(!r.takes_more_of(1), "a write on its way to the disk is held too");
        r.io_done(t0, first, Ok(None));
        assert!(r.takes_more_of(1));
    }

    #[test]
    fn of_three_writes_to_one_block_only_the_next_starts_when_one_is_done() {
        let (mut r, t0) = secondary_of_primary();
        let generation = r.peer(1).generation;
        for id in 1..=3 {
            r.peer_write_received(t0, 1, (id, 1), 0, 4096, false, data(0));
        }
        let write = |seq| IoTag::Stream { peer: 1, generation, seq };
        assert_eq!(io_tags(&settled(&mut r)), vec![write(1)]);
        r.io_done(t0, write(1), Ok(None));
        assert_eq!(io_tags(&r.take_actions()), vec![write(2)], "write 3 still waits for write 2");
        r.io_done(t0, write(2), Ok(None));
        assert_eq!(io_tags(&r.take_actions()), vec![write(3)]);
    }

    #[test]
    fn a_failed_write_is_nacked_and_a_write_of_a_replaced_connection_is_not_acked() {
        let (mut r, t0) = secondary_of_primary();
        let generation = r.peer(1).generation;
        r.peer_write_received(t0, 1, (1, 1), 0, 4096, false, data(0));
        r.peer_write_received(t0, 1, (2, 1), 4096, 4096, false, data(4096));
        settled(&mut r);
        r.io_done(t0, IoTag::Stream { peer: 1, generation, seq: 1 }, Err(LocalFailure::NoSpace));
        assert!(matches!(sent(&r.take_actions())[..], [Message::NegAck { id: 1, errno: 28 }]));
        r.link_down(1, "gone", 0);
        r.link_up(1, t0);
        r.take_actions();
        assert!(r.overlaps_busy(4096, 4096), "a write still on its way keeps later ones to its blocks waiting");
        r.io_done(t0, IoTag::Stream { peer: 1, generation, seq: 2 }, Ok(None));
        assert!(sent(&r.take_actions()).is_empty(), "no ack on the new connection for the old one's write");
        assert!(!r.overlaps_busy(4096, 4096));
    }

    #[test]
    fn a_fua_write_is_acked_in_stream_order_once_the_data_position_names_it_durably() {
        let (mut r, t0) = secondary_of_primary();
        r.peer_mut(1).last_state = Some(PeerState { role: Role::Primary.to_wire(), ..secondary_state(r.sb.uuids.current, [0; 4]) });
        let generation = r.peer(1).generation;
        let step = |seq| IoTag::Stream { peer: 1, generation, seq };
        let fua = |offset| LocalIo::Write { offset, data: Bytes::from(vec![2u8; 4096]), fua: true };
        // Epoch 4: one FUA write, then the barrier; epoch 5: two FUA writes.
        r.peer_write_received(t0, 1, (10, 4), 0, 4096, true, fua(0));
        r.peer_barrier_received(1, 4);
        r.peer_write_received(t0, 1, (11, 5), 4096, 4096, true, fua(4096));
        r.peer_write_received(t0, 1, (12, 5), 8192, 4096, true, fua(8192));
        assert_eq!(io_tags(&settled(&mut r)), vec![step(1), step(2), step(3)]);
        r.io_done(t0, step(3), Ok(None));
        r.io_done(t0, step(2), Ok(None));
        assert!(sent(&r.take_actions()).is_empty(), "not before the FUA write and the barrier before them");
        r.io_done(t0, step(1), Ok(None));
        let actions = r.take_actions();
        assert!(matches!(sent(&actions)[..], [Message::WriteAck { id: 10 }]), "{actions:?}");
        assert_eq!(r.data_position().epoch, 3, "the FUA write of epoch 4: past barrier 3");
        assert_eq!(r.data_position().fua, 10);
        r.io_done(t0, IoTag::Barrier { peer: 1, generation, epoch: 4 }, Ok(None));
        let actions = r.take_actions();
        let acks: Vec<&Message> = sent(&actions);
        assert!(matches!(acks[..], [Message::BarrierAck { epoch: 4, writes: 1 }, Message::WriteAck { id: 11 }, Message::WriteAck { id: 12 }]), "{actions:?}");
        assert_eq!((r.data_position().epoch, r.data_position().fua), (4, 12));
        let persisted = actions.iter().rposition(|a| matches!(a, Action::Persist(crate::replica::MetaWrite::Superblock))).expect("persisted");
        let acked = actions.iter().rposition(|a| matches!(a, Action::Send { msg: Message::WriteAck { id: 12 }, .. })).expect("acked");
        assert!(persisted < acked, "durable before the ack: {actions:?}");
    }

    #[test]
    fn a_failed_fua_write_is_nacked_and_moves_no_position() {
        let (mut r, t0) = secondary_of_primary();
        let generation = r.peer(1).generation;
        r.peer_write_received(t0, 1, (7, 2), 0, 4096, true, LocalIo::Write { offset: 0, data: Bytes::from(vec![2u8; 4096]), fua: true });
        settled(&mut r);
        r.io_done(t0, IoTag::Stream { peer: 1, generation, seq: 1 }, Err(LocalFailure::NoSpace));
        assert!(matches!(sent(&r.take_actions())[..], [Message::NegAck { id: 7, errno: 28 }]));
        assert_eq!(r.data_position().fua, 0);
    }

    #[test]
    fn a_resync_block_that_changes_this_node_is_recorded_for_the_other_peers_before_it_is_written() {
        let (mut r, t0) = crate::replica::testing::three_node_replica();
        r.link_up(1, t0);
        sync_target(&mut r);
        settled(&mut r);
        let generation = r.peer(1).generation;
        let step = IoTag::Stream { peer: 1, generation, seq: 1 };
        let new = Bytes::from(vec![5u8; 4096]);
        r.resync_data_received(1, 8192, new.clone());
        assert!(matches!(r.take_actions()[..], [Action::Io { op: LocalIo::Read { offset: 8192, len: 4096 }, .. }]), "read first");
        r.io_done(t0, step, Ok(Some(Bytes::from(vec![1u8; 4096]))));
        let actions = settled(&mut r);
        assert!(r.bitmaps[1].test_block(2), "gamma held this node's old copy");
        let logged = actions.iter().position(|a| matches!(a, Action::WriteLog { .. }));
        let written = actions.iter().position(|a| matches!(a, Action::Io { op: LocalIo::Write { offset: 8192, .. }, .. }));
        assert!(logged.is_some() && logged < written, "durable before the write: {actions:?}");
        r.io_done(t0, step, Ok(None));
        // The same data again: neither written nor recorded.
        r.bitmaps[1].clear_all();
        r.resync_data_received(1, 8192, new.clone());
        r.take_actions();
        r.io_done(t0, IoTag::Stream { peer: 1, generation, seq: 2 }, Ok(Some(new)));
        assert!(io_tags(&r.take_actions()).is_empty(), "nothing to write");
        assert_eq!(r.bitmaps[1].weight(), 0);
        assert!(!r.overlaps_busy(8192, 4096), "the step is done");
    }

    /// Makes this node the peer's sync target.
    fn sync_target(r: &mut Replica) {
        r.peer_mut(1).repl = crate::core::states::ReplState::SyncTarget;
        r.disk = crate::core::states::DiskState::Inconsistent;
    }

    #[test]
    fn resync_data_follows_the_write_before_it_and_the_end_of_the_resync_follows_the_data() {
        let (mut r, t0) = secondary_of_primary();
        sync_target(&mut r);
        let generation = r.peer(1).generation;
        let step = |seq| IoTag::Stream { peer: 1, generation, seq };
        let block = Bytes::from(vec![3u8; 4096]);
        r.peer_write_received(t0, 1, (9, 1), 0, 4096, false, LocalIo::Write { offset: 0, data: block.clone(), fua: false });
        r.resync_data_received(1, 0, block.clone());
        r.resync_data_received(1, 4096, block);
        r.resync_done_in_stream(1, 0x1234, [0; 4], DataPosition::default());
        let mut started = io_tags(&settled(&mut r));
        started.sort_by_key(|tag| match tag {
            IoTag::Stream { seq, .. } => *seq,
            _ => u64::MAX,
        });
        assert_eq!(started, vec![step(1), step(3)], "the resync block of block 0 waits for the write to it");
        r.io_done(t0, step(1), Ok(None));
        r.io_done(t0, step(3), Ok(None));
        assert_eq!(io_tags(&r.take_actions()), vec![step(2)]);
        assert_ne!(r.generation().current, 0x1234, "the end waits for the last resync block");
        assert_eq!(r.disk, crate::core::states::DiskState::Inconsistent);
        r.io_done(t0, step(2), Ok(None));
        let actions = r.take_actions();
        assert!(actions.iter().any(|a| matches!(a, Action::Persist(crate::replica::MetaWrite::DataFlush))), "{actions:?}");
        assert_eq!(r.generation().current, 0x1234);
        assert_eq!(r.disk, crate::core::states::DiskState::UpToDate);
    }

    #[test]
    fn a_barrier_behind_the_end_of_a_resync_moves_on_from_the_position_the_end_gave() {
        // The end names the primary's last closed epoch (6); the barrier closing the next one
        // arrives while the resync's last block is still being written.
        let (mut r, t0) = secondary_of_primary();
        let at = |epoch| DataPosition { term: 3, epoch, fua: 0 };
        r.peer_mut(1).last_state = Some(PeerState { role: Role::Primary.to_wire(), data_position: at(7), ..secondary_state(r.sb.uuids.current, [0; 4]) });
        sync_target(&mut r);
        let generation = r.peer(1).generation;
        r.resync_data_received(1, 0, Bytes::from(vec![3u8; 4096]));
        r.resync_done_in_stream(1, r.sb.uuids.current, [0; 4], at(6));
        r.peer_barrier_received(1, 7);
        settled(&mut r);
        r.io_done(t0, IoTag::Stream { peer: 1, generation, seq: 1 }, Ok(None));
        settled(&mut r);
        assert_eq!((r.disk, r.data_position()), (crate::core::states::DiskState::UpToDate, at(6)), "the end is taken");
        r.io_done(t0, IoTag::Barrier { peer: 1, generation, epoch: 7 }, Ok(None));
        let actions = r.take_actions();
        assert!(matches!(sent(&actions)[..], [Message::BarrierAck { epoch: 7, .. }]), "{actions:?}");
        assert_eq!(r.data_position(), at(7), "its ack counts towards a FLUSH: this node holds the epoch");
    }

    #[test]
    fn digest_comparisons_read_in_stream_order_and_answer_in_request_order() {
        let (mut r, t0) = secondary_of_primary();
        let generation = r.peer(1).generation;
        let step = |seq| IoTag::Stream { peer: 1, generation, seq };
        let ones = vec![1u8; 8192];
        let digests = block_digests(&ones, 4096);
        r.digest_request_received(1, DigestPurpose::Verify, 0, digests.clone());
        r.digest_request_received(1, DigestPurpose::Verify, 1 << 20, digests);
        assert_eq!(io_tags(&r.take_actions()), vec![step(1)], "one comparison at a time");
        let mut mine = ones.clone();
        mine[4096] = 9;
        r.io_done(t0, step(1), Ok(Some(Bytes::from(mine))));
        let actions = r.take_actions();
        let reply = actions.iter().find_map(|a| match a {
            Action::Send { msg: Message::DigestReply { offset, differing, .. }, .. } => Some((*offset, differing.clone())),
            _ => None,
        });
        assert_eq!(reply, Some((0, vec![(1, 1)])), "{actions:?}");
        assert_eq!(r.disk, crate::core::states::DiskState::Outdated, "it knows its copy differs");
        assert_eq!(io_tags(&actions), vec![step(2)], "the second comparison starts after the first is answered");
    }
}
