//! Epochs and the resync source's schedule. An epoch is closed by a barrier on every peer that
//! receives this node's stream; a resync source walks its bitmap for the target in disk order,
//! sends each dirty run (or its digests first, with checksum resync), closes an epoch every
//! `CHUNKS_PER_EPOCH` frames so bits clear as barrier acks come back, and ends once a pass
//! finds every bit clear. The driver reads the ranges and paces the walk; what to send, and
//! when the resync is over, is decided here.

use super::peer::AwaitedDigests;
use super::{Action, MetaWrite, Replica, ResyncProgress};
use crate::core::states::{DiskState, ReplState, Role};
use crate::core::sync_decision::{same_uuid, SyncDecision};
use crate::core::sync_progress::SyncProgress;
use crate::core::zero_runs::zero_runs;
use crate::meta::MetaFlags;
use crate::wire::{DataPosition, DigestPurpose, Message, DIGEST_BYTES, MAX_BITMAP_RUNS};
use bytes::Bytes;
use std::time::{Duration, Instant};

/// Largest resync frame, unless one bitmap block is larger (then one block per frame; the
/// largest block, 1 MiB, fits a frame).
const MAX_CHUNK_BYTES: u64 = 256 << 10;
/// Resync frames (data or digests) per epoch before a barrier, which lets bits clear (and
/// progress advance) in steps of this many chunks.
const CHUNKS_PER_EPOCH: u32 = 32;
/// How long an epoch holding writes or resync frames stays open at most, FLUSH or not. Bits
/// clear, and activity-log extents free, only as barriers come back: an epoch left open is
/// what a cut link makes the peer resync. On a slow link `CHUNKS_PER_EPOCH` resync chunks take
/// long to send; a trickle of writes with no FLUSH (a database on the raw device, a VM whose
/// guest flushes rarely) would keep its last epoch open until the next 4096 writes, and every
/// disconnect after a quiet spell would resync them. One barrier a second costs the peer a
/// flush.
const EPOCH_SPAN: Duration = Duration::from_secs(1);
/// Digest requests of a checksum-based resync left unanswered at most: enough to keep the link
/// busy, and a bound on the answers still to come when the pass ends.
const MAX_DIGEST_REQUESTS_IN_FLIGHT: usize = 64;

/// Where a resync source is in its walk of the target's bitmap.
#[derive(Debug, Default, Clone, Copy)]
pub struct ResyncWalk {
    /// The next bitmap block to look at.
    cursor: u64,
    /// Frames sent in the open epoch (`Replica::close_epoch` zeroes it).
    frames_in_epoch: u32,
    /// A pass ended with bits still set: the epoch whose barrier must be acked before the
    /// bitmap is scanned again from the start.
    draining: Option<u64>,
    /// `ResyncDone` went out, naming this generation: only a State after it can end the
    /// resync (see `Replica::peer_state_received`).
    pub(super) done_sent: Option<u64>,
}

/// What a resync source does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncStep {
    /// Nothing until an answer or a barrier ack arrives.
    Wait,
    /// The rate controller holds the walk back this long (see `pacing.rs`).
    Pace(Duration),
    /// Read `[offset, offset + len)` and hand it to [`Replica::resync_chunk_read`]; `digests`:
    /// send its block digests first (checksum resync), not the data.
    Read { offset: u64, len: u64, digests: bool },
    /// Every bit is clear and acked: the resync's end went out to the target.
    Finished,
}

/// A range the source read, as it goes out.
pub enum ResyncChunk {
    Data(Bytes),
    Digests(Vec<[u8; DIGEST_BYTES]>),
}

/// What a resync target's disk is at the end, from its source's: a copy is no better than its
/// source (see `Replica::resync_done_received`), so only an UpToDate source makes it UpToDate.
fn resynced_disk(source: DiskState) -> DiskState {
    if source == DiskState::UpToDate {
        DiskState::UpToDate
    } else {
        DiskState::Outdated
    }
}

impl Replica {
    /// Whether `peer` receives this node's stream, so epochs close towards it: every peer a
    /// primary replicates to (never another primary), and for a secondary only the nodes it
    /// resyncs and those its writes as a primary still await a barrier on (a demotion's last
    /// flush). A secondary in sync takes barriers only from its primary (see `check_frame`).
    pub(super) fn receives_stream(&self, peer: &super::Peer) -> bool {
        peer.is_replicating()
            && peer.role != Role::Primary
            && (self.role == Role::Primary
                || peer.repl == ReplState::SyncSource
                || !peer.tl.is_empty()
                || self.demotion_stream.contains(&peer.node_id))
    }

    /// Closes the open epoch on every peer that receives this node's stream, with a barrier.
    /// Returns the closed epoch.
    pub fn close_epoch(&mut self) -> u64 {
        let epoch = self.epoch;
        self.epoch += 1;
        let receiving: Vec<u8> = self.peers.iter().filter(|p| self.receives_stream(p)).map(|p| p.node_id).collect();
        let mut closed = Vec::new();
        for peer in self.peers.iter_mut().filter(|p| receiving.contains(&p.node_id)) {
            let writes = peer.tl.close_epoch();
            peer.sync.walk.frames_in_epoch = 0;
            peer.barriers.push_back((epoch, writes));
            closed.push(peer.node_id);
        }
        for peer in closed {
            self.send_bulk(peer, Message::Barrier { epoch }, None);
        }
        epoch
    }

    /// Part of the peer's bitmap for this node (a sync decision waits for it, see
    /// `check_frame`): merged into ours, so both resync the union of what either side knows
    /// to differ (a crashed primary's activity-log extents are only in its own bitmap). With
    /// the last part the resync starts: as target this node is Inconsistent on disk before
    /// anything arrives; as source it starts walking. The error is why the link must go.
    pub fn bitmap_received(&mut self, peer_id: u8, last: bool, runs: &[(u64, u64)], now: Instant) -> Result<(), String> {
        let slot = self.peer(peer_id).slot;
        self.bitmaps[slot].or_runs(runs.iter().copied()).map_err(|e| format!("peer's bitmap: {e}"))?;
        if !last {
            return Ok(());
        }
        let decision = self.peer_mut(peer_id).pending_sync.take().expect("checked: a sync decision is pending");
        let full = matches!(decision, SyncDecision::FullSource | SyncDecision::FullTarget);
        if full {
            self.mark_out_of_sync(slot, 0, self.sb.data_size);
        }
        let total_bytes = self.bitmaps[slot].weight_bytes();
        let peer = self.peer_mut(peer_id);
        peer.resync = Some(ResyncProgress { started: now, progress: SyncProgress::start(total_bytes), full });
        if decision.is_target() {
            peer.repl = ReplState::SyncTarget;
            self.resynced_from = Some(peer_id);
            let first = same_uuid(self.sb.uuids.current, crate::core::sync_decision::UUID_JUST_CREATED);
            self.resyncs_taken[if !full { 0 } else if first { 2 } else { 1 }] += 1;
            self.disk = DiskState::Inconsistent;
            self.sb.flags.remove(MetaFlags::CONSISTENT);
            // A copy is no better than its source, from the start: what this node holds beyond
            // a nearer source's data position it gives up to that source, which rewrites it
            // where they differ. Should the resync be cut off, a position kept further would
            // make it refuse that source as nearer than its own copy (see
            // `sync_decision::decide_same_current`), and a pair with no third node would wait
            // for good (seed 3580).
            if let Some(source) = self.peer(peer_id).last_state.map(|s| s.data_position) {
                if source < self.data_position() {
                    self.set_data_position(source);
                }
            }
            self.persist(MetaWrite::Superblock);
            self.broadcast_state();
            tracing::info!(resource = %self.resource, peer = peer_id, bytes = total_bytes, full, "resync started as target");
        } else {
            peer.repl = ReplState::SyncSource;
            peer.sync.walk = ResyncWalk::default();
            let generation = peer.generation;
            // The pair agreed this node holds the newer data (e.g. it crashed as primary and
            // the peer did not move on): like "in sync" with a good peer, that confirms it
            // UpToDate, so a daemon restarted under a mounted device can become primary again.
            if self.disk == DiskState::Consistent {
                self.disk = DiskState::UpToDate;
                self.broadcast_state();
            }
            self.persist(MetaWrite::Bitmap(slot));
            // What this node sends must outlive a power loss here: the target keeps it and the
            // bits clear, so a copy still in this disk's volatile cache (a write applied but
            // not yet flushed by its barrier) would be lost here alone, unknown to anyone.
            self.persist(MetaWrite::DataFlush);
            tracing::info!(resource = %self.resource, peer = peer_id, bytes = total_bytes, full, "resync started as source");
            self.outbox.push(Action::StartResync { peer: peer_id, generation });
        }
        Ok(())
    }

    /// The resync rewrites the target's `blocks`: there the target holds this node's data,
    /// which differs from a third node's where this node's bits for it say. Two copies of one
    /// generation can differ in places no generation tells apart (a lost primary's last
    /// writes, a crashed primary's activity log, a lost cache), so the target takes those bits
    /// over (see `Replica::third_peer_bits_received`); without them a resync from one node and
    /// then another left the target "in sync" with a node it differed from (seeds 691, 1388).
    /// Sent before each chunk of the walk, while the target still holds the chunk's bits (it
    /// clears them as the chunk becomes durable there, see `Replica::barrier_flushed`), and
    /// once more for the whole disk before the end, for what the target has not cleared (the
    /// blocks a checksum resync found equal). A node this one holds no bits for holds its data
    /// there: nothing is sent, so bits never travel in a ring.
    fn send_third_peer_bits(&mut self, target: u8, blocks: std::ops::Range<u64>) {
        let thirds: Vec<(u8, usize)> = self
            .peers
            .iter()
            .filter(|p| p.node_id != target && !p.witness && self.bitmaps[p.slot].weight() > 0)
            .map(|p| (p.node_id, p.slot))
            .collect();
        for (node, slot) in thirds {
            let runs: Vec<(u64, u64)> = self.bitmaps[slot].runs_within(blocks.start, blocks.end).collect();
            for chunk in runs.chunks(MAX_BITMAP_RUNS) {
                self.send_bulk(target, Message::ThirdPeerBits { node, runs: chunk.to_vec() }, None);
            }
        }
    }

    /// The source's bits for a third node (see `Replica::send_third_peer_bits`): the blocks of
    /// them this resync covers (its bits stay in the source's slot until its end) are recorded
    /// for that node, durably before this node says it is UpToDate.
    pub fn third_peer_bits_received(&mut self, source: u8, node: u8, runs: &[(u64, u64)]) -> Result<(), String> {
        let Some(third) = self.peers.iter().find(|p| p.node_id == node && p.node_id != source) else {
            return Err(format!("bits for node {node}, which is no third node of this resource"));
        };
        if third.witness {
            return Ok(());
        }
        let (slot, covered) = (third.slot, self.peer(source).slot);
        let block = u64::from(self.bitmaps[covered].block_size());
        let blocks = self.bitmaps[covered].blocks();
        let mut overlap = Vec::new();
        for &(start, count) in runs {
            let end = start.checked_add(count).filter(|end| *end <= blocks).ok_or_else(|| format!("bits for node {node} past the device: {start}+{count}"))?;
            overlap.extend(self.bitmaps[covered].runs_within(start, end));
        }
        for (at, len) in overlap.iter().copied() {
            self.mark_out_of_sync(slot, at * block, len * block);
        }
        if !overlap.is_empty() {
            self.persist(MetaWrite::Bitmap(slot));
        }
        Ok(())
    }

    /// The source ended the resync into this node (or, for two fresh nodes, declared them in
    /// sync): its data, then its generation, made durable here, and this node as good as its
    /// source. The other peers' decisions waited for this (see `Replica::reconsider`).
    ///
    /// A copy is no better than its source: from an Outdated source (a node that left while
    /// its peers wrote on) this node holds data that may lack writes a primary acknowledged
    /// since, so it is Outdated too, and only a State from an UpToDate peer in sync confirms
    /// it later (see `Replica::confirmed_up_to_date_by`). Seed 333014 of the long run: a node
    /// resynced from an Outdated one came out UpToDate, confirmed its source UpToDate in turn,
    /// and the two elected it without the last primary's acknowledged FUA write.
    /// The source's disk is the one its States showed last, when the resync's writes before
    /// the `ResyncDone` are done: a source that stepped down meanwhile may have learnt its
    /// data is older than another primary's, and the copy is not vouched for by the earlier
    /// UpToDate. The source takes either answer as the end (see `Replica::peer_state_received`).
    pub fn resync_done_received(&mut self, peer_id: u8, current: u64, history: [u64; 4], position: DataPosition) {
        let declared = self.peer(peer_id).repl != ReplState::SyncTarget;
        let disk = if declared { DiskState::UpToDate } else { resynced_disk(self.peer(peer_id).disk) };
        if declared && same_uuid(self.sb.uuids.current, current) {
            // This node's own declaration, behind the one a declared peer passed on: the same
            // generation, already taken (see `replica/declaration.rs`).
            tracing::debug!(resource = %self.resource, peer = %self.peer(peer_id).name, "declared in sync again: this node holds that generation already");
            return;
        }
        if declared {
            // Declared in sync (`new-current-uuid --clear-bitmap`): the declaring node declared
            // every fresh node it was connected to, so the fresh peers here are about to take
            // the same generation; a full sync into them would copy the disk for nothing.
            self.declared_with = self.declared_peers_but(Some(peer_id));
        }
        self.persist(MetaWrite::DataFlush);
        let slot = self.peer(peer_id).slot;
        let mut generation = self.generation();
        // The generation this node crashed in as primary is history once it adopts another
        // through a resync: its activity log's extents were in that resync's bitmap and now
        // hold the source's data, so no peer is to take them from here any more (a stale
        // marker made an older copy the source of a node that held newer writes).
        let left_crashed_generation = !same_uuid(generation.current, current);
        generation.resync_finished_as_target(slot, current, history);
        self.set_generation(generation);
        self.set_data_position(position);
        self.sb.terms.highest = self.sb.terms.highest.max(position.term);
        self.bitmaps[slot].clear_all();
        self.sb.flags.insert(MetaFlags::CONSISTENT);
        self.sb.flags.set(MetaFlags::WAS_UP_TO_DATE, disk == DiskState::UpToDate);
        self.sb.flags.remove(MetaFlags::VERIFY_DIFFERS);
        // Its data holds the source's blocks now, not only its own stream.
        self.sb.flags.remove(MetaFlags::OWN_STREAM);
        self.clear_crash_marker(peer_id, left_crashed_generation);
        self.cache_repair_pending.retain(|id| *id != peer_id);
        self.resynced_from = None;
        if self.cache_repair_pending.is_empty() {
            self.sb.flags.remove(MetaFlags::CACHE_LOST);
        }
        self.persist(MetaWrite::Bitmap(slot));
        self.persist(MetaWrite::Superblock);
        self.disk = disk;
        let peer = self.peer_mut(peer_id);
        peer.repl = ReplState::Established;
        peer.resync = None;
        peer.resync_end_unconfirmed = peer.last_state.map(|s| s.bitmap_uuid).filter(|uuid| *uuid != 0);
        if disk == DiskState::UpToDate {
            tracing::info!(resource = %self.resource, peer = %self.peer(peer_id).name, "resync finished: UpToDate");
        } else {
            tracing::warn!(resource = %self.resource, peer = %self.peer(peer_id).name, "resync finished from an Outdated source: Outdated until an UpToDate peer in sync confirms it");
        }
        self.broadcast_state();
        for (id, reason) in self.reconsider_all_but(Some(peer_id)) {
            let generation = self.peer(id).generation;
            self.outbox.push(Action::DropLink { peer: id, generation, reason });
        }
    }

    /// This node starts resyncing `peer_id` as its source: the walk starts over, paced from
    /// `now`.
    pub fn resync_source_started(&mut self, now: Instant, peer_id: u8) {
        let sync = &mut self.peer_mut(peer_id).sync;
        sync.resync_digests.clear();
        sync.resync_wanted.clear();
        sync.walk = ResyncWalk::default();
        self.start_pacing(peer_id, now);
    }

    /// The next step of the resync of `peer_id` (this node its source). `csums`: checksum
    /// resync.
    pub fn resync_next(&mut self, now: Instant, peer_id: u8, csums: bool) -> ResyncStep {
        if self.io_failed.is_some() {
            // A primary whose disk failed reads nothing for its targets: its copy of the blocks
            // it failed to write is the one it refuses its own clients, while the stream
            // carried the new data to the peers. The failure marks those blocks for the target
            // too, and sending them from here left the target older than the other peers,
            // which then forgot their bits for it as followers of one primary (seed 86969 of
            // the long run). The target stays Inconsistent; the demotion drops the links and
            // the decision at the reconnect resyncs it.
            return ResyncStep::Wait;
        }
        let paced = self.pace_wait(peer_id, now);
        let data_size = self.sb.data_size;
        self.close_an_old_epoch(now);
        let peer = self.peer(peer_id);
        let slot = peer.slot;
        let mut walk = peer.sync.walk;
        if let Some(epoch) = walk.draining {
            if peer.barriers.iter().any(|(e, _)| *e <= epoch) {
                return ResyncStep::Wait;
            }
            walk = ResyncWalk::default();
        }
        let block_size = u64::from(self.bitmaps[slot].block_size());
        let awaiting = peer.sync.resync_digests.len();
        // At least one block: with blocks over 256 KiB nothing was read, and the walk, finding
        // no run, declared the resync done with every bit still set.
        let next_run = self.bitmaps[slot].next_run(walk.cursor, (MAX_CHUNK_BYTES / block_size).max(1));
        let step = if let Some(&(offset, len)) = peer.sync.resync_wanted.front() {
            if let Some(wait) = paced {
                return ResyncStep::Pace(wait);
            }
            if self.overlaps_busy(offset, len) {
                return ResyncStep::Wait;
            }
            self.peer_mut(peer_id).sync.resync_wanted.pop_front();
            ResyncStep::Read { offset, len, digests: false }
        } else if awaiting >= MAX_DIGEST_REQUESTS_IN_FLIGHT {
            ResyncStep::Wait
        } else if let (Some(wait), Some(_)) = (paced, next_run) {
            return ResyncStep::Pace(wait);
        } else if let Some((start, blocks)) = next_run {
            let offset = start * block_size;
            let len = (blocks * block_size).min(data_size - offset);
            if self.overlaps_busy(offset, len) {
                // A write in flight to the range: what is read must hold it, so the copy sent
                // is not older than the write the target may already have.
                return ResyncStep::Wait;
            }
            walk.cursor = start + blocks;
            self.send_third_peer_bits(peer_id, start..start + blocks);
            ResyncStep::Read { offset, len, digests: csums }
        } else if awaiting > 0 {
            // Answers still to come may ask for data.
            ResyncStep::Wait
        } else if walk.cursor == 0 {
            // Every bit is clear: each block was resent (or matched) and barrier-acked.
            let blocks = self.bitmaps[slot].blocks();
            self.send_third_peer_bits(peer_id, 0..blocks);
            let uuids = self.sb.uuids;
            let done = Message::ResyncDone { current_uuid: uuids.current, history: uuids.history, position: self.position_of_a_follower(peer_id) };
            self.send_bulk(peer_id, done, None);
            walk.done_sent = Some(uuids.current);
            ResyncStep::Finished
        } else {
            walk.draining = Some(self.close_epoch());
            walk.frames_in_epoch = 0;
            ResyncStep::Wait
        };
        self.peer_mut(peer_id).sync.walk = walk;
        if matches!(step, ResyncStep::Read { .. }) {
            self.epoch_seen_open(now);
        }
        step
    }

    /// The open epoch closes once it has been seen holding something for `EPOCH_SPAN`
    /// (called by `tick`, and by the resync walk before each step).
    pub(super) fn close_an_old_epoch(&mut self, now: Instant) {
        let holds = self.peers.iter().any(|p| self.receives_stream(p) && p.tl.open_epoch_writes() > 0);
        match self.epoch_open_since {
            Some((epoch, since)) if epoch == self.epoch && now.saturating_duration_since(since) >= EPOCH_SPAN => {
                // Cleared either way: a deadline left in the past would make `poll_timeout`
                // ask for ticks at once, forever.
                self.epoch_open_since = None;
                if holds {
                    self.close_epoch();
                }
            }
            _ if holds => self.epoch_seen_open(now),
            _ => {}
        }
    }

    /// The open epoch holds something, or is about to (a resync frame being read): its span
    /// starts now unless it started earlier.
    fn epoch_seen_open(&mut self, now: Instant) {
        if self.epoch_open_since.is_none_or(|(epoch, _)| epoch != self.epoch) {
            self.epoch_open_since = Some((self.epoch, now));
        }
    }

    /// When the open epoch's span ends, if something started it.
    pub(super) fn epoch_deadline(&self) -> Option<Instant> {
        self.epoch_open_since.filter(|(epoch, _)| *epoch == self.epoch).map(|(_, since)| since + EPOCH_SPAN)
    }

    /// The range of a [`ResyncStep::Read`] was read: it goes out, ahead of any later write to
    /// those blocks (the driver calls this before letting one through).
    pub fn resync_chunk_read(&mut self, peer_id: u8, offset: u64, len: u64, chunk: ResyncChunk) {
        if self.io_failed.is_some() {
            // Read before this primary's disk failed, handed over after (the daemon reads off
            // the lock): it may hold what a lost cache left behind, older than the stream gave
            // the target. It is not sent; the failure marked its blocks, and the walk reads
            // nothing more (see `Replica::resync_next`).
            return;
        }
        self.paced(peer_id, len);
        let epoch = self.epoch;
        let peer = self.peer_mut(peer_id);
        let msgs = match chunk {
            // Runs of zeroes go as their length alone (see `core::zero_runs`); each frame is a
            // write of the epoch on the target.
            ResyncChunk::Data(payload) => {
                let runs = zero_runs(&payload);
                peer.tl.record(epoch, offset, len, runs.len() as u32);
                runs.into_iter().map(|(start, run, zeroes)| {
                    let at = offset + start as u64;
                    if zeroes {
                        Message::ResyncZeroes { offset: at, len: run as u32 }
                    } else {
                        Message::ResyncData { offset: at, payload: payload.slice(start..start + run) }
                    }
                }).collect()
            }
            ResyncChunk::Digests(digests) => {
                peer.sync.resync_digests.push_back(AwaitedDigests { offset, blocks: digests.len() as u32, stale: false });
                vec![Message::DigestRequest { purpose: DigestPurpose::Resync, offset, digests }]
            }
        };
        peer.sync.walk.frames_in_epoch += 1;
        let close = peer.sync.walk.frames_in_epoch >= CHUNKS_PER_EPOCH;
        for msg in msgs {
            self.send_bulk(peer_id, msg, None);
        }
        if close {
            self.close_epoch();
        }
    }

    /// Whether this node still resyncs `peer_id` on connection `generation`.
    pub fn resyncing(&self, peer_id: u8, generation: u64) -> bool {
        let peer = self.peer(peer_id);
        !self.stopping && peer.generation == generation && peer.repl == ReplState::SyncSource
    }

    /// The walk for `peer_id` on connection `generation` cannot go on (a read of this node's
    /// disk failed, say): the resync ends with its link. Nothing is lost by that: every block
    /// not yet proven durable on the target keeps its bit, and the next connect decides the
    /// resync again from the bitmaps. A walk of a link already gone changes nothing.
    pub fn resync_walk_failed(&mut self, peer_id: u8, generation: u64, reason: String) {
        if self.resyncing(peer_id, generation) {
            tracing::warn!(resource = %self.resource, peer = %self.peer(peer_id).name, %reason, "resync interrupted");
            self.outbox.push(Action::DropLink { peer: peer_id, generation, reason });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{ResyncChunk, ResyncStep};
    use crate::core::states::ReplState;
    use crate::replica::testing::{three_node_replica, two_node_replica, Ticks};
    use crate::replica::{Action, MetaWrite};
    use crate::wire::Message;
    use bytes::Bytes;

    const BLOCK: u64 = 4096;

    #[test]
    fn the_source_walks_the_bitmap_closes_the_pass_and_ends_once_every_bit_cleared() {
        let (mut r, t0) = two_node_replica();
        // Steps well within an epoch's span.
        let mut at = t0;
        let mut ticks = || {
            at += std::time::Duration::from_millis(100);
            at
        };
        r.link_up(1, t0);
        r.peer_mut(1).repl = ReplState::SyncSource;
        r.bitmaps[0].set_range(0, 4 * BLOCK);
        r.bitmaps[0].set_range(100 * BLOCK, BLOCK);
        r.resync_source_started(t0, 1);
        r.take_actions();
        assert_eq!(r.resync_next(ticks(), 1, false), ResyncStep::Read { offset: 0, len: 4 * BLOCK, digests: false });
        r.resync_chunk_read(1, 0, 4 * BLOCK, ResyncChunk::Data(Bytes::from(vec![7; 4 * BLOCK as usize])));
        assert_eq!(r.resync_next(ticks(), 1, false), ResyncStep::Read { offset: 100 * BLOCK, len: BLOCK, digests: false });
        r.resync_chunk_read(1, 100 * BLOCK, BLOCK, ResyncChunk::Data(Bytes::from(vec![7; BLOCK as usize])));
        // The pass is over with bits still set: its epoch is closed, and the walk waits for the ack.
        assert_eq!(r.resync_next(ticks(), 1, false), ResyncStep::Wait);
        let (epoch, writes) = *r.peer(1).barriers.back().expect("a barrier closes the pass");
        assert_eq!(writes, 2, "both chunks are in the closed epoch");
        assert_eq!(r.resync_next(ticks(), 1, false), ResyncStep::Wait, "no new pass before the ack");
        // The ack: the target holds both ranges durably (the engine clears their bits then).
        r.peer_mut(1).barriers.pop_front();
        for crate::core::transfer_log::Settled { offset, len, .. } in r.peer_mut(1).tl.barrier_acked(epoch) {
            r.bitmaps[0].clear_range(offset, len);
        }
        assert_eq!(r.resync_next(ticks(), 1, false), ResyncStep::Finished);
        let sent: Vec<String> = r.take_actions().into_iter().filter_map(|a| match a {
            Action::Send { msg, .. } => Some(msg.name().to_string()),
            _ => None,
        }).collect();
        assert_eq!(sent, ["ResyncData", "ResyncData", "Barrier", "ResyncDone"]);
    }

    #[test]
    fn a_walk_that_cannot_read_ends_the_resync_with_its_link_and_keeps_every_bit() {
        let (mut r, t0) = two_node_replica();
        r.link_up(1, t0);
        let generation = r.peer(1).generation;
        r.peer_mut(1).repl = ReplState::SyncSource;
        r.bitmaps[0].set_range(0, 4 * BLOCK);
        r.resync_source_started(t0, 1);
        r.take_actions();
        assert_eq!(r.resync_next(t0, 1, false), ResyncStep::Read { offset: 0, len: 4 * BLOCK, digests: false });
        // A walk of an earlier link asks nothing of this one.
        r.resync_walk_failed(1, generation - 1, "read at 0+16384 failed: Io".into());
        assert!(r.take_actions().is_empty());
        r.resync_walk_failed(1, generation, "read at 0+16384 failed: Io".into());
        let actions = r.take_actions();
        assert!(
            matches!(&actions[..], [Action::DropLink { peer: 1, generation: g, reason }] if *g == generation && reason.contains("read at 0+16384")),
            "{actions:?}"
        );
        assert_eq!(r.bitmaps[0].weight(), 4, "the blocks not sent stay marked for the next resync");
    }

    #[test]
    fn a_source_closes_an_epoch_open_for_a_second_however_few_its_chunks() {
        let (mut r, t0) = two_node_replica();
        r.link_up(1, t0);
        r.peer_mut(1).repl = ReplState::SyncSource;
        // Three chunks of 64 blocks.
        r.bitmaps[0].set_range(0, 192 * BLOCK);
        r.resync_source_started(t0, 1);
        r.take_actions();
        let ms = |n| t0 + std::time::Duration::from_millis(n);
        let chunk = |n: u64| ResyncStep::Read { offset: n * 64 * BLOCK, len: 64 * BLOCK, digests: false };
        let data = || ResyncChunk::Data(Bytes::from(vec![7; 64 * BLOCK as usize]));
        assert_eq!(r.resync_next(ms(1), 1, false), chunk(0));
        r.resync_chunk_read(1, 0, 64 * BLOCK, data());
        assert_eq!(r.resync_next(ms(500), 1, false), chunk(1));
        r.resync_chunk_read(1, 64 * BLOCK, 64 * BLOCK, data());
        assert!(r.peer(1).barriers.is_empty(), "open for less than a second");
        assert_eq!(r.resync_next(ms(1001), 1, false), chunk(2));
        assert_eq!(r.peer(1).barriers.iter().map(|(_, writes)| *writes).collect::<Vec<_>>(), [2], "the first two chunks' epoch is closed");
        assert!(r.take_actions().iter().any(|a| matches!(a, Action::Send { msg: Message::Barrier { .. }, .. })));
    }

    #[test]
    fn a_source_sends_runs_of_zeroes_as_their_length_and_counts_each_frame_in_the_epoch() {
        let (mut r, t0) = crate::replica::testing::two_node_replica_with_blocks_of(1 << 20);
        r.link_up(1, t0);
        r.peer_mut(1).repl = ReplState::SyncSource;
        r.bitmaps[0].set_range(0, 1 << 20);
        r.resync_source_started(t0, 1);
        r.take_actions();
        assert_eq!(r.resync_next(t0, 1, false), ResyncStep::Read { offset: 0, len: 1 << 20, digests: false });
        // A 1 MiB block of which one page was ever written.
        let mut chunk = vec![0u8; 1 << 20];
        chunk[20 * BLOCK as usize..21 * BLOCK as usize].fill(0xC3);
        r.resync_chunk_read(1, 0, 1 << 20, ResyncChunk::Data(Bytes::from(chunk)));
        let sent: Vec<Message> = r.take_actions().into_iter().filter_map(|a| match a {
            Action::Send { msg, .. } => Some(msg),
            _ => None,
        }).collect();
        let names: Vec<&str> = sent.iter().map(Message::name).collect();
        assert!(matches!(&sent[..], [
            Message::ResyncZeroes { offset: 0, len: 81920 },
            Message::ResyncData { offset: 81920, payload },
            Message::ResyncZeroes { offset: 86016, len },
        ] if payload[..] == [0xC3; 4096][..] && *len == (1 << 20) - 86016), "{names:?}");
        let epoch = r.close_epoch();
        assert_eq!(r.peer(1).barriers.back(), Some(&(epoch, 3)), "three writes of the epoch on the target, as it counts them");
        // The ack covers the whole 1 MiB block, though no frame alone did.
        r.barrier_acked(t0, 1, epoch);
        assert_eq!(r.bitmaps[0].weight(), 0);
    }

    #[test]
    fn a_primary_ends_a_resync_at_its_last_closed_epoch_and_the_fua_writes_sent_since() {
        let (mut r, t0) = crate::replica::testing::primary_replicating();
        r.peer_mut(1).repl = ReplState::SyncSource;
        r.resync_source_started(t0, 1);
        let fua = crate::frontend::BlockRequest::Write { offset: 0, data: vec![1u8; 4096].into(), fua: true };
        r.submit(t0, 1, fua, |_| 0);
        let id = crate::replica::testing::settled(&mut r).iter().find_map(|a| match a {
            Action::Send { peer: 1, msg: Message::Data { id, fua: true, .. }, .. } => Some(*id),
            _ => None,
        }).expect("the FUA write goes to the target");
        let open = r.data_position();
        assert_eq!(r.resync_next(t0, 1, false), ResyncStep::Finished, "nothing to send");
        let handed = crate::replica::testing::resync_done_position(r.take_actions());
        assert_eq!(handed, crate::wire::DataPosition { epoch: open.epoch - 1, fua: id, ..open }, "not the open epoch: its writes to come are not the target's yet");
    }

    #[test]
    fn a_source_sends_every_block_however_large_the_bitmap_blocks() {
        for block in [4096u64, 256 << 10, 512 << 10, 1 << 20] {
            let (mut r, t0) = crate::replica::testing::two_node_replica_with_blocks_of(block as u32);
            let mut ticks = Ticks(t0);
            r.link_up(1, t0);
            r.peer_mut(1).repl = ReplState::SyncSource;
            r.bitmaps[0].set_range(3 * block, 2 * block);
            r.resync_source_started(t0, 1);
            let mut read = 0;
            while let ResyncStep::Read { offset, len, .. } = r.resync_next(ticks.advance(), 1, false) {
                assert_eq!(offset, 3 * block + read, "{block}-byte blocks");
                r.resync_chunk_read(1, offset, len, ResyncChunk::Data(Bytes::from(vec![0; len as usize])));
                read += len;
            }
            assert_eq!(read, 2 * block, "{block}-byte blocks: every marked block is sent before the end");
        }
    }

    #[test]
    fn a_source_hands_its_target_its_bits_for_third_nodes_before_the_end() {
        let (mut r, t0) = three_node_replica();
        r.link_up(1, t0);
        r.peer_mut(1).repl = ReplState::SyncSource;
        r.bitmaps[1].set_range(8 * BLOCK, 2 * BLOCK);
        r.resync_source_started(t0, 1);
        r.take_actions();
        assert_eq!(r.resync_next(t0, 1, false), ResyncStep::Finished);
        let sent: Vec<Message> = r.take_actions().into_iter().filter_map(|a| match a {
            Action::Send { msg, .. } => Some(msg),
            _ => None,
        }).collect();
        assert!(matches!(&sent[..], [Message::ThirdPeerBits { node: 2, runs }, Message::ResyncDone { .. }] if runs == &[(8, 2)]), "{sent:?}");
    }

    #[test]
    fn a_source_sends_its_bits_for_a_third_node_over_each_chunk_ahead_of_the_chunk() {
        let (mut r, t0) = three_node_replica();
        let mut ticks = Ticks(t0);
        r.link_up(1, t0);
        r.peer_mut(1).repl = ReplState::SyncSource;
        r.bitmaps[0].set_range(0, 4 * BLOCK);
        // Bits for gamma: block 1, within the chunk, and block 100, outside it.
        r.bitmaps[1].set_range(BLOCK, BLOCK);
        r.bitmaps[1].set_range(100 * BLOCK, BLOCK);
        r.resync_source_started(t0, 1);
        r.take_actions();
        assert_eq!(r.resync_next(ticks.advance(), 1, false), ResyncStep::Read { offset: 0, len: 4 * BLOCK, digests: false });
        r.resync_chunk_read(1, 0, 4 * BLOCK, ResyncChunk::Data(Bytes::from(vec![7; 4 * BLOCK as usize])));
        let sent: Vec<Message> = r.take_actions().into_iter().filter_map(|a| match a {
            Action::Send { msg, .. } => Some(msg),
            _ => None,
        }).collect();
        assert!(matches!(&sent[..], [Message::ThirdPeerBits { node: 2, runs }, Message::ResyncData { offset: 0, .. }] if runs == &[(1, 1)]), "{sent:?}");
    }

    #[test]
    fn a_target_records_for_a_third_node_where_its_source_differs_from_it_within_the_resync() {
        let (mut r, t0) = three_node_replica();
        r.link_up(1, t0);
        r.peer_mut(1).repl = ReplState::SyncTarget;
        // The resync from beta covers blocks 0..8; beta's bits for gamma are 4..12 and 100.
        r.bitmaps[0].set_range(0, 8 * BLOCK);
        r.third_peer_bits_received(1, 2, &[(4, 8), (100, 1)]).expect("a third node");
        assert_eq!(r.bitmaps[1].runs().collect::<Vec<_>>(), vec![(4, 4)], "only where the resync rewrote this node");
        assert!(r.take_actions().iter().any(|a| matches!(a, Action::Persist(MetaWrite::Bitmap(1)))), "durably");
        for (node, runs) in [(7, (0, 1)), (1, (0, 1)), (2, (u64::MAX, 2))] {
            assert!(r.third_peer_bits_received(1, node, &[runs]).is_err(), "node {node} runs {runs:?}");
        }
    }

    #[test]
    fn checksum_resync_sends_digests_first_and_the_differing_blocks_after() {
        let (mut r, t0) = two_node_replica();
        let mut ticks = Ticks(t0);
        r.link_up(1, t0);
        r.peer_mut(1).repl = ReplState::SyncSource;
        r.bitmaps[0].set_range(0, 2 * BLOCK);
        r.resync_source_started(t0, 1);
        assert_eq!(r.resync_next(ticks.advance(), 1, true), ResyncStep::Read { offset: 0, len: 2 * BLOCK, digests: true });
        r.resync_chunk_read(1, 0, 2 * BLOCK, ResyncChunk::Digests(vec![[0; 32]; 2]));
        assert_eq!(r.resync_next(ticks.advance(), 1, true), ResyncStep::Wait, "the answer may still ask for data");
        // The answer: block 1 differs (the engine queues it as wanted).
        r.peer_mut(1).sync.resync_digests.pop_front();
        r.peer_mut(1).sync.resync_wanted.push_back((BLOCK, BLOCK));
        assert_eq!(r.resync_next(ticks.advance(), 1, true), ResyncStep::Read { offset: BLOCK, len: BLOCK, digests: false });
        assert!(r.take_actions().iter().any(|a| matches!(a, Action::Send { msg: Message::DigestRequest { .. }, .. })));
    }
}

#[cfg(test)]
mod ends {
    use crate::core::states::{DiskState, ReplState};
    use crate::core::sync_decision::SyncDecision;
    use crate::replica::testing::{secondary_state, two_node_replica};
    use crate::replica::{Action, MetaWrite};
    use crate::wire::{DataPosition, Message};
    use bytes::Bytes;

    /// An Outdated node made the target of a bitmap resync of the first `blocks` blocks.
    fn resync_target(blocks: u64) -> (crate::replica::Replica, std::time::Instant) {
        let (mut r, t0) = two_node_replica();
        r.disk = DiskState::Outdated;
        r.link_up(1, t0);
        r.peer_mut(1).disk = DiskState::UpToDate;
        r.peer_mut(1).pending_sync = Some(SyncDecision::BitmapTarget);
        r.take_actions();
        r.bitmap_received(1, true, &[(0, blocks)], t0).unwrap();
        (r, t0)
    }

    #[test]
    fn a_target_is_inconsistent_on_disk_before_the_resync_and_its_data_durable_before_its_end() {
        let (mut r, _) = resync_target(4);
        assert_eq!((r.disk, r.peer(1).repl), (DiskState::Inconsistent, ReplState::SyncTarget));
        let started = r.take_actions();
        assert!(matches!(started[0], Action::Persist(MetaWrite::Superblock)), "{started:?}");
        r.resync_done_received(1, 0xC0, [0xB0, 0, 0, 0], DataPosition::default());
        assert_eq!((r.disk, r.sb.uuids.current), (DiskState::UpToDate, 0xC0));
        let order: Vec<String> = r.take_actions().iter().map(|a| match a {
            Action::Persist(what) => format!("{what:?}"),
            Action::Send { msg: Message::State(_), .. } => "State".into(),
            other => format!("{other:?}"),
        }).collect();
        assert_eq!(order[..4], ["DataFlush", "Bitmap(0)", "Superblock", "State"], "{order:?}");
    }

    #[test]
    fn a_target_of_a_nearer_source_gives_up_its_further_position_durably_at_the_start() {
        for (source_epoch, kept) in [(20, 20), (40, 30)] {
            let (mut r, t0) = two_node_replica();
            r.disk = DiskState::Outdated;
            r.set_data_position(DataPosition { term: 3, epoch: 30, fua: 7 });
            r.link_up(1, t0);
            let source = DataPosition { term: 3, epoch: source_epoch, fua: 0 };
            r.peer_mut(1).last_state = Some(crate::wire::PeerState { data_position: source, ..secondary_state(r.sb.uuids.current, [0; 4]) });
            r.peer_mut(1).pending_sync = Some(SyncDecision::BitmapTarget);
            r.take_actions();
            r.bitmap_received(1, true, &[(0, 4)], t0).unwrap();
            // Cut off now, it must not count itself further than the source it gave its copy up to.
            assert_eq!(r.data_position().epoch, kept, "from a source at epoch {source_epoch}");
            let started = r.take_actions();
            assert!(matches!(started[0], Action::Persist(MetaWrite::Superblock)), "with the Inconsistent disk: {started:?}");
        }
    }

    #[test]
    fn a_target_resynced_from_an_outdated_source_is_outdated_not_up_to_date() {
        let (mut r, _) = resync_target(4);
        r.peer_mut(1).disk = DiskState::Outdated;
        r.resync_done_received(1, 0xC0, [0xB0, 0, 0, 0], DataPosition::default());
        assert_eq!((r.disk, r.sb.uuids.current, r.peer(1).repl), (DiskState::Outdated, 0xC0, ReplState::Established));
        assert!(r.sb.flags.contains(crate::meta::MetaFlags::CONSISTENT));
        // Durably: a restart finds it Outdated, not Consistent (which a peer's State confirms).
        assert_eq!(crate::replica::Replica::disk_state_from_flags(r.sb.flags), DiskState::Outdated);
        assert!(r.take_actions().iter().any(|a| matches!(a, Action::Persist(MetaWrite::Superblock))));
    }

    /// Completes the local I/O the replica asks for, and what follows, but the barriers'
    /// flushes, which it returns.
    fn complete_writes(r: &mut crate::replica::Replica, t0: std::time::Instant) -> Vec<crate::replica::IoTag> {
        let mut flushes = Vec::new();
        for action in r.take_actions() {
            match action {
                Action::Io { tag: tag @ crate::replica::IoTag::Barrier { .. }, .. } => flushes.push(tag),
                Action::Io { tag, .. } => {
                    r.io_done(t0, tag, Ok(None));
                    flushes.extend(complete_writes(r, t0));
                }
                _ => {}
            }
        }
        flushes
    }

    #[test]
    fn a_target_clears_its_bits_for_the_source_once_the_resync_data_is_durable() {
        let (mut r, t0) = resync_target(16);
        r.take_actions();
        let generation = r.peer(1).generation;
        let data = |len: usize| Bytes::from(vec![7u8; len]);
        // Block 0 in two frames (data, then a run of zeroes) and block 1 whole, then the
        // source's barrier; block 2 in the next epoch.
        for msg in [
            Message::ResyncData { offset: 0, payload: data(1024) },
            Message::ResyncZeroes { offset: 1024, len: 3072 },
            Message::ResyncData { offset: 4096, payload: data(4096) },
            Message::Barrier { epoch: 3 },
            Message::ResyncData { offset: 8192, payload: data(4096) },
        ] {
            r.receive(t0, 1, generation, msg).expect("from the source");
        }
        let flushes = complete_writes(&mut r, t0);
        assert_eq!(r.bitmaps[0].weight(), 16, "written, not yet durable: every bit kept");
        assert_eq!(flushes.len(), 1, "{flushes:?}");
        r.io_done(t0, flushes[0], Ok(None));
        assert!(r.take_actions().iter().any(|a| matches!(a, Action::Send { msg: Message::BarrierAck { epoch: 3, .. }, .. })));
        assert_eq!(r.bitmaps[0].runs().collect::<Vec<_>>(), vec![(2, 14)], "blocks 0 and 1 are the source's now, durably");
        assert_eq!(r.disk, DiskState::Inconsistent, "until the end");
    }

    #[test]
    fn a_block_marked_for_the_source_after_its_resync_data_keeps_its_bit_at_the_barrier() {
        let (mut r, t0) = resync_target(16);
        r.take_actions();
        let generation = r.peer(1).generation;
        for msg in [
            Message::ResyncData { offset: 0, payload: Bytes::from(vec![7u8; 8192]) },
            Message::Barrier { epoch: 3 },
        ] {
            r.receive(t0, 1, generation, msg).expect("from the source");
        }
        let flushes = complete_writes(&mut r, t0);
        // Block 1 changed again here (say a failed local write marked it for every peer).
        r.mark_out_of_sync(0, 4096, 4096);
        r.io_done(t0, flushes[0], Ok(None));
        assert_eq!(r.bitmaps[0].runs().collect::<Vec<_>>(), vec![(1, 15)], "only block 0 clears");
    }

    #[test]
    fn a_target_writes_zeroes_where_the_source_sent_their_length() {
        let (mut r, t0) = resync_target(16);
        r.take_actions();
        let generation = r.peer(1).generation;
        r.receive(t0, 1, generation, Message::ResyncZeroes { offset: 8192, len: 40960 }).expect("from the source");
        let writes: Vec<_> = r.take_actions().into_iter().filter_map(|a| match a {
            Action::Io { op: crate::replica::LocalIo::Write { offset, data, fua: false }, .. } => Some((offset, data)),
            _ => None,
        }).collect();
        assert!(matches!(&writes[..], [(8192, data)] if data.len() == 40960 && data.iter().all(|b| *b == 0)), "{writes:?}");
        assert_eq!(r.peer(1).received_bytes, 12, "only the frame's fields crossed the wire");
        assert_eq!(r.peer(1).rx_epoch_writes, 1, "a write of the source's epoch");
    }

    #[test]
    fn a_source_starts_walking_once_the_bitmaps_are_merged() {
        let (mut r, t0) = two_node_replica();
        r.disk = DiskState::UpToDate;
        r.link_up(1, t0);
        r.peer_mut(1).pending_sync = Some(SyncDecision::BitmapSource);
        r.take_actions();
        r.bitmap_received(1, false, &[(0, 2)], t0).unwrap();
        assert!(r.take_actions().is_empty(), "nothing before the last part");
        r.bitmap_received(1, true, &[(10, 1)], t0).unwrap();
        assert_eq!(r.bitmaps[0].weight(), 3, "the peer's runs are merged into the bitmap");
        let actions = r.take_actions();
        assert!(matches!(actions.last(), Some(Action::StartResync { peer: 1, generation: 1 })), "{actions:?}");
    }
}
