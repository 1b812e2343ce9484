//! The secondary's side of the primary's stream: replicated writes go to the local disk in
//! stream order where they overlap (the local I/Os of two that do not may run at once), each is
//! acknowledged as the protocol asks, and a barrier's flush waits for every write received
//! before it, so its ack says all of them are durable here.

use super::{Action, IoTag, LocalIo, Replica};
use crate::config::Protocol;
use crate::core::inflight::LocalFailure;
use crate::wire::Message;
use std::collections::VecDeque;
use std::time::Instant;

/// One replicated write on its way to the local disk.
#[derive(Debug)]
struct Apply {
    /// Its place in the peer's stream (across connections).
    seq: u64,
    generation: u64,
    id: u64,
    offset: u64,
    len: u64,
    fua: bool,
    op: LocalIo,
}

/// A barrier received, waiting for the writes before it and then for its flush.
#[derive(Debug)]
struct BarrierIn {
    epoch: u64,
    /// Writes in its epoch, as counted here (the primary checks them against its own count).
    writes: u32,
    /// The stream position of the last write before it.
    after_seq: u64,
    flushing: bool,
}

/// The writes and barriers of one peer's stream that are not done locally yet.
#[derive(Debug, Default)]
pub struct Applying {
    received: u64,
    /// Submitted to the local disk.
    running: Vec<Apply>,
    /// Waiting for an earlier overlapping write, in stream order.
    waiting: VecDeque<Apply>,
    barriers: VecDeque<BarrierIn>,
}

impl Applying {
    /// Whether a write of the stream to `[offset, offset + len)` is not on the disk yet.
    pub fn overlaps(&self, offset: u64, len: u64) -> bool {
        self.running.iter().chain(&self.waiting).any(|a| offset < a.offset + a.len && a.offset < offset + len)
    }

    /// The link went: writes not yet submitted and barriers are dropped (the primary resyncs
    /// whatever it did not hear back about); writes submitted finish, unanswered.
    pub fn link_down(&mut self) {
        self.waiting.clear();
        self.barriers.clear();
    }
}

impl Replica {
    /// A write in the primary's stream (`check_frame` passed it): recorded for the peers that
    /// do not follow the primary, acknowledged as received under protocol B, and submitted
    /// once no earlier write of the stream to the same blocks is still running.
    #[allow(clippy::too_many_arguments)]
    pub fn peer_write_received(&mut self, now: Instant, peer_id: u8, id: u64, offset: u64, len: u64, fua: bool, op: LocalIo) {
        for slot in self.slots_not_following(peer_id) {
            self.mark_out_of_sync(slot, offset, len);
        }
        self.recent.record(offset, len, now);
        let peer = self.peer_mut(peer_id);
        peer.rx_epoch_writes += 1;
        peer.received_bytes += len;
        peer.applying.received += 1;
        let apply = Apply { seq: peer.applying.received, generation: peer.generation, id, offset, len, fua, op };
        if self.protocol == Protocol::B {
            self.send(peer_id, Message::RecvAck { id });
        }
        let peer = self.peer_mut(peer_id);
        if peer.applying.overlaps(offset, len) {
            peer.applying.waiting.push_back(apply);
        } else {
            self.submit_apply(peer_id, apply);
        }
    }

    fn submit_apply(&mut self, peer_id: u8, apply: Apply) {
        let tag = IoTag::PeerWrite { peer: peer_id, generation: apply.generation, id: apply.id };
        self.outbox.push(Action::Io { tag, op: apply.op.clone() });
        self.peer_mut(peer_id).applying.running.push(apply);
    }

    /// A barrier in the primary's stream: its flush follows every write received before it.
    pub fn peer_barrier_received(&mut self, peer_id: u8, epoch: u64) {
        let peer = self.peer_mut(peer_id);
        let writes = std::mem::take(&mut peer.rx_epoch_writes);
        let after_seq = peer.applying.received;
        peer.applying.barriers.push_back(BarrierIn { epoch, writes, after_seq, flushing: false });
        self.flush_next_barrier(peer_id);
    }

    /// Starts the oldest barrier's flush once the writes before it are done.
    fn flush_next_barrier(&mut self, peer_id: u8) {
        let peer = self.peer_mut(peer_id);
        let generation = peer.generation;
        let applying = &mut peer.applying;
        let Some(barrier) = applying.barriers.front_mut() else { return };
        let before_done = !applying.running.iter().chain(&applying.waiting).any(|a| a.seq <= barrier.after_seq);
        if barrier.flushing || !before_done {
            return;
        }
        barrier.flushing = true;
        let tag = IoTag::Barrier { peer: peer_id, generation, epoch: barrier.epoch };
        self.outbox.push(Action::Io { tag, op: LocalIo::Flush });
    }

    /// A replicated write reached the local disk (or failed): acknowledged on its connection if
    /// that is still the peer's, and the writes and barrier waiting for it go on.
    pub(super) fn peer_write_done(&mut self, peer_id: u8, generation: u64, id: u64, result: Result<(), LocalFailure>) {
        let protocol = self.protocol;
        let peer = self.peer_mut(peer_id);
        let Some(index) = peer.applying.running.iter().position(|a| a.generation == generation && a.id == id) else { return };
        let apply = peer.applying.running.swap_remove(index);
        let current = peer.connected && peer.generation == generation;
        match result {
            Ok(()) if current && (protocol == Protocol::C || apply.fua) => self.send(peer_id, Message::WriteAck { id }),
            Ok(()) => {}
            Err(failure) => {
                tracing::error!(resource = %self.resource, ?failure, offset = apply.offset, "replicated write failed");
                if current {
                    self.send(peer_id, Message::NegAck { id, errno: failure.errno() });
                }
            }
        }
        // The oldest waiting writes that no longer overlap anything earlier start now.
        let peer = self.peer_mut(peer_id);
        let mut started = Vec::new();
        let mut i = 0;
        while i < peer.applying.waiting.len() {
            let a = &peer.applying.waiting[i];
            let mut earlier = peer.applying.running.iter().chain(peer.applying.waiting.iter().take(i));
            if earlier.any(|e| a.offset < e.offset + e.len && e.offset < a.offset + a.len) {
                i += 1;
                continue;
            }
            let a = peer.applying.waiting.remove(i).expect("indexed");
            started.push((IoTag::PeerWrite { peer: peer_id, generation: a.generation, id: a.id }, a.op.clone()));
            peer.applying.running.push(a);
        }
        for (tag, op) in started {
            self.outbox.push(Action::Io { tag, op });
        }
        self.flush_next_barrier(peer_id);
    }

    /// A barrier's flush finished: acknowledged with the epoch's write count, or the link goes
    /// (the primary must not take writes this disk may have lost as durable).
    pub(super) fn barrier_flushed(&mut self, peer_id: u8, generation: u64, epoch: u64, result: Result<(), LocalFailure>) {
        let peer = self.peer_mut(peer_id);
        if !peer.connected || peer.generation != generation {
            return;
        }
        let Some(barrier) = peer.applying.barriers.pop_front() else { return };
        debug_assert_eq!(barrier.epoch, epoch);
        match result {
            Ok(()) => {
                self.send(peer_id, Message::BarrierAck { epoch, writes: barrier.writes });
                self.flush_next_barrier(peer_id);
            }
            Err(failure) => {
                let reason = format!("local flush for barrier {epoch} failed: {failure:?}");
                self.outbox.push(Action::DropLink { peer: peer_id, generation, reason });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::core::inflight::LocalFailure;
    use crate::replica::testing::secondary_of_primary;
    use crate::replica::{Action, IoTag, LocalIo};
    use crate::wire::Message;
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
        r.peer_write_received(t0, 1, 1, 0, 4096, false, data(0));
        r.peer_write_received(t0, 1, 2, 0, 4096, false, data(0));
        r.peer_write_received(t0, 1, 3, 8192, 4096, false, data(8192));
        r.peer_barrier_received(1, 7);
        let actions = r.take_actions();
        let write = |id| IoTag::PeerWrite { peer: 1, generation, id };
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

    #[test]
    fn a_failed_write_is_nacked_and_a_write_of_a_replaced_connection_is_not_acked() {
        let (mut r, t0) = secondary_of_primary();
        let generation = r.peer(1).generation;
        r.peer_write_received(t0, 1, 1, 0, 4096, false, data(0));
        r.peer_write_received(t0, 1, 2, 4096, 4096, false, data(4096));
        r.take_actions();
        r.io_done(t0, IoTag::PeerWrite { peer: 1, generation, id: 1 }, Err(LocalFailure::NoSpace));
        assert!(matches!(sent(&r.take_actions())[..], [Message::NegAck { id: 1, errno: 28 }]));
        r.link_down(1, "gone", 0);
        r.link_up(1, t0);
        r.take_actions();
        assert!(r.overlaps_busy(4096, 4096), "a write still on its way keeps later ones to its blocks waiting");
        r.io_done(t0, IoTag::PeerWrite { peer: 1, generation, id: 2 }, Ok(None));
        assert!(sent(&r.take_actions()).is_empty(), "no ack on the new connection for the old one's write");
        assert!(!r.overlaps_busy(4096, 4096));
    }
}
