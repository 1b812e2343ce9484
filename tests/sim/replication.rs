//! The write path on the primary (the engine's `write_path.rs`) and the replicated stream on
//! the receiving side (`connection.rs`: `dispatch`, `apply_peer_write`, `barrier_acked`).
//!
//! Protocol C only: a write completes when the local write and the write ack of every peer it
//! was sent to are in (a peer lost meanwhile no longer counts, and gets the block in its
//! bitmap), and then only while the primary holds quorum.

use super::disk::Crashed;
use super::network::Msg;
use super::node::{AppWrite, Node};
use super::world::{Applied, Ctx, NodeEvent};
use super::{Time, BLOCK_BYTES, MS};
use blkrepl::core::inflight::{AckLevel, Finished, PeerSet};
use blkrepl::core::quorum::OnNoQuorum;
use blkrepl::core::states::{DiskState, ReplState, Role};
use blkrepl::meta::{extents_for, AlError, AlPrepared};

/// The resync source closes an epoch after this many blocks (the engine's `CHUNKS_PER_EPOCH`,
/// scaled to the model's small device so passes take several epochs).
pub const RESYNC_BLOCKS_PER_EPOCH: u32 = 4;

fn byte_range(block: usize) -> (u64, u64) {
    (block as u64 * BLOCK_BYTES, BLOCK_BYTES)
}

/// How long a data write takes on a simulated disk.
pub fn disk_latency(cx: &mut Ctx) -> Time {
    if cx.rng.percent(3) {
        cx.rng.range(5 * MS, 50 * MS)
    } else {
        cx.rng.range(50, 2 * MS)
    }
}

impl Node {
    pub fn writable(&self) -> bool {
        self.up && self.role == Role::Primary && self.disk == DiskState::UpToDate && !self.draining
    }

    /// A write from the client on this node.
    pub fn submit(&mut self, cx: &mut Ctx, w: AppWrite) -> Result<(), Crashed> {
        if !self.writable() {
            cx.history.fail(w.version);
            return Ok(());
        }
        self.waiting.push(w);
        self.start_waiting(cx)
    }

    fn block_busy(&self, block: usize) -> bool {
        let (offset, len) = byte_range(block);
        self.inflight.overlaps(offset, len) || self.resync_lock == Some(block)
    }

    /// Starts every waiting write that may start: no overlapping write in flight, not being
    /// read for resync, and its activity-log extent durably hot (a cold extent costs one
    /// transaction first; a log full of busy extents makes it wait).
    pub fn start_waiting(&mut self, cx: &mut Ctx) -> Result<(), Crashed> {
        let mut i = 0;
        while i < self.waiting.len() {
            if !self.up || self.role != Role::Primary || self.disk != DiskState::UpToDate {
                for w in std::mem::take(&mut self.waiting) {
                    cx.history.fail(w.version);
                }
                return Ok(());
            }
            let w = self.waiting[i];
            if self.block_busy(w.block) {
                i += 1;
                continue;
            }
            let (offset, len) = byte_range(w.block);
            let extents = extents_for(offset, len).expect("in bounds");
            match self.meta().al.prepare(extents) {
                Err(AlError::Busy) => {
                    i += 1;
                    continue;
                }
                Err(e) => panic!("activity log refused a one-block write: {e}"),
                Ok(AlPrepared::AllHot) => {}
                Ok(AlPrepared::Transaction(update)) => self.meta().apply_al_update(update)?,
            }
            self.waiting.remove(i);
            self.start_write(cx, w);
        }
        Ok(())
    }

    /// Sends the write to every replicating peer, marks it for every other data peer, and
    /// writes it locally.
    fn start_write(&mut self, cx: &mut Ctx, w: AppWrite) {
        let (offset, len) = byte_range(w.block);
        let mut targets = PeerSet::default();
        let mut lagging = Vec::new();
        for peer in &self.peers {
            match (&peer.link, peer.slot) {
                (Some(link), Some(_)) if link.is_replicating() => targets.insert(peer.id),
                (_, Some(slot)) => lagging.push(slot),
                (_, None) => {}
            }
        }
        for slot in lagging {
            self.meta().mark(slot, w.block);
        }
        let id = self.inflight.start(offset, len, AckLevel::Written, targets);
        let epoch = self.epoch;
        for i in 0..self.peers.len() {
            if !targets.contains(self.peers[i].id) {
                continue;
            }
            let to = self.peers[i].id;
            let link = self.peers[i].link.as_mut().expect("target is linked");
            link.tl.record(epoch, offset, len);
            let conn = link.conn;
            cx.send(self.id, to, conn, Msg::Data { id, block: w.block, version: w.version });
        }
        let fails = cx.rng.percent(self.io_errors.local);
        let io = self.data.start_write(w.block, w.version, fails);
        self.writes.insert(id, (w, io));
        let latency = disk_latency(cx);
        self.schedule(cx, latency, NodeEvent::LocalWriteDone { id });
    }

    pub fn local_write_done(&mut self, cx: &mut Ctx, id: u64) -> Result<(), Crashed> {
        let io = self.writes[&id].1;
        let ok = self.data.finish_write(io);
        let result = if ok { Ok(()) } else { Err(blkrepl::core::inflight::LocalFailure::Io) };
        if let Some(finished) = self.inflight.local_done(id, result) {
            self.finish(cx, finished)?;
        }
        Ok(())
    }

    /// A write is done everywhere it will be: release its extent, then answer the client if
    /// the primary holds quorum (else hold or fail it, per `on_no_quorum`).
    pub fn finish(&mut self, cx: &mut Ctx, finished: Finished) -> Result<(), Crashed> {
        let (w, _) = self.writes.remove(&finished.id).expect("known write");
        let extents = extents_for(finished.offset, finished.len).expect("in bounds");
        self.meta().al.release(extents);
        if finished.local_failure.is_some() {
            cx.log(self.id, || format!("write v{} failed locally", w.version));
            cx.history.fail(w.version);
        } else if self.can_complete(cx.now, cx.rules) {
            cx.log(self.id, || format!("ack v{} (block {})", w.version, w.block));
            cx.history.ack(cx.now, self.tenure, w.block, w.version);
        } else if cx.rules.on_no_quorum == OnNoQuorum::SuspendIo && self.role == Role::Primary {
            cx.log(self.id, || format!("hold v{}: no quorum", w.version));
            self.suspended.push(w);
        } else {
            cx.log(self.id, || format!("fail v{}: no quorum", w.version));
            cx.history.fail(w.version);
        }
        self.start_waiting(cx)
    }

    /// Completes the writes held for quorum once it is back.
    pub fn release_suspended(&mut self, cx: &mut Ctx) {
        if self.suspended.is_empty() || !self.can_complete(cx.now, cx.rules) {
            return;
        }
        let q = self.quorum(cx.now, cx.rules, true);
        cx.log(self.id, || format!("quorum returned: {} of {} votes", q.votes, q.voters));
        for w in std::mem::take(&mut self.suspended) {
            cx.log(self.id, || format!("ack v{} (block {}) after quorum returned", w.version, w.block));
            cx.history.ack(cx.now, self.tenure, w.block, w.version);
        }
    }

    /// Closes the open epoch with a barrier to every replicating peer. Returns the epoch.
    pub fn send_barriers(&mut self, cx: &mut Ctx) -> u64 {
        let epoch = self.epoch;
        self.epoch += 1;
        for i in 0..self.peers.len() {
            let to = self.peers[i].id;
            let Some(link) = self.peers[i].link.as_mut().filter(|l| l.is_replicating()) else { continue };
            let writes = link.tl.close_epoch();
            link.barriers.push_back((epoch, writes));
            let conn = link.conn;
            cx.send(self.id, to, conn, Msg::Barrier { epoch });
        }
        epoch
    }

    /// Handles the frames from `peer` in order until one needs the disk.
    pub fn pump_stream(&mut self, cx: &mut Ctx, peer: u8) -> Result<(), Crashed> {
        loop {
            let Some(link) = self.link_mut(peer).filter(|l| !l.busy) else { return Ok(()) };
            let Some(msg) = link.inbox.pop_front() else { return Ok(()) };
            cx.log(self.id, || format!("<- n{peer} {msg:?}"));
            self.dispatch(cx, peer, msg)?;
        }
    }

    /// One frame from `peer` (the engine's `connection::dispatch`). Protocol errors drop the
    /// connection.
    fn dispatch(&mut self, cx: &mut Ctx, peer: u8, msg: Msg) -> Result<(), Crashed> {
        match msg {
            Msg::Data { id, block, version } => {
                if self.role == Role::Primary {
                    return self.drop_peer(cx, peer, "peer sent a write but this node is Primary", true);
                }
                self.link_mut(peer).expect("linked").rx_epoch_writes += 1;
                self.start_stream_write(cx, peer, block, version, Applied::Data { id });
                Ok(())
            }
            Msg::ResyncData { block, version } => {
                if self.link(peer).expect("linked").repl != ReplState::SyncTarget {
                    return self.drop_peer(cx, peer, "resync data while not SyncTarget", true);
                }
                self.start_stream_write(cx, peer, block, version, Applied::Resync { block });
                Ok(())
            }
            Msg::WriteAck { id } => match self.inflight.peer_reached(id, peer, AckLevel::Written) {
                Some(finished) => self.finish(cx, finished),
                None => Ok(()),
            },
            Msg::NegAck => self.drop_peer(cx, peer, "peer failed to write; its disk is out of sync", true),
            Msg::Barrier { epoch } => {
                let link = self.link_mut(peer).expect("linked");
                let (conn, writes) = (link.conn, std::mem::take(&mut link.rx_epoch_writes));
                cx.send(self.id, peer, conn, Msg::BarrierAck { epoch, writes });
                Ok(())
            }
            Msg::BarrierAck { epoch, writes } => self.barrier_acked(cx, peer, epoch, writes),
            Msg::BitmapBlocks(blocks) => self.on_bitmap(cx, peer, &blocks),
            Msg::ResyncDone { current, history } => self.finish_as_target(cx, peer, current, history),
            Msg::State(state) => self.on_state(cx, peer, state),
            Msg::Ping { sent_at } => {
                let conn = self.link(peer).expect("linked").conn;
                cx.send(self.id, peer, conn, Msg::PingAck { sent_at });
                Ok(())
            }
            Msg::PingAck { sent_at } => {
                let link = self.link_mut(peer).expect("linked");
                link.lease_until = link.lease_until.max(sent_at + super::node::lease());
                Ok(())
            }
            Msg::Disconnect { departing } => {
                self.peer_mut(peer).departed = departing;
                self.drop_peer(cx, peer, "peer disconnected", false)
            }
            Msg::Close => self.drop_peer(cx, peer, "peer closed the connection", false),
            Msg::Hello | Msg::HelloReply | Msg::Refuse => unreachable!("handshake frames never reach the stream"),
        }
    }

    /// The reader writes the head of the stream and waits for the disk (as the engine's reader
    /// thread does), so the stream applies in order.
    fn start_stream_write(&mut self, cx: &mut Ctx, peer: u8, block: usize, version: u64, applied: Applied) {
        let fails = cx.rng.percent(self.io_errors.stream);
        let io = self.data.start_write(block, version, fails);
        let link = self.link_mut(peer).expect("linked");
        link.busy = true;
        let conn = link.conn;
        let latency = disk_latency(cx);
        self.schedule(cx, latency, NodeEvent::StreamWriteDone { peer, conn, io, applied });
    }

    /// The disk finished a stream write: it is on the medium whatever became of the link; the
    /// ack goes out only on the same connection.
    pub fn stream_write_done(
        &mut self,
        cx: &mut Ctx,
        peer: u8,
        conn: u64,
        io: u64,
        applied: Applied,
    ) -> Result<(), Crashed> {
        let ok = self.data.finish_write(io);
        let Some(link) = self.link_on(peer, conn) else { return Ok(()) };
        link.busy = false;
        match applied {
            Applied::Data { id } => {
                cx.send(self.id, peer, conn, if ok { Msg::WriteAck { id } } else { Msg::NegAck });
            }
            Applied::Resync { block } => {
                if !ok {
                    return self.drop_peer(cx, peer, "resync write failed", true);
                }
                link.rx_epoch_writes += 1;
                let slot = self.peer(peer).slot.expect("resync only between data nodes");
                // Progress only; the source's bitmap is the authority.
                self.meta().bitmaps[slot].clear_blocks(block as u64, 1);
            }
        }
        self.pump_stream(cx, peer)
    }

    /// The peer holds everything up to `epoch` durably: those blocks are in sync with it.
    fn barrier_acked(&mut self, cx: &mut Ctx, peer: u8, epoch: u64, writes: u32) -> Result<(), Crashed> {
        let link = self.link_mut(peer).expect("linked");
        let Some((sent_epoch, sent_writes)) = link.barriers.pop_front() else {
            return self.drop_peer(cx, peer, "barrier ack for a barrier never sent", true);
        };
        if (sent_epoch, sent_writes) != (epoch, writes) {
            return self.drop_peer(cx, peer, "barrier ack counts differ", true);
        }
        let durable = link.tl.barrier_acked(epoch);
        if let Some(slot) = self.peer(peer).slot {
            for settled in durable.into_iter().filter(|s| s.durable) {
                self.meta().bitmaps[slot].clear_range(settled.offset, settled.len);
            }
        }
        Ok(())
    }
}
