//! What the peers' send queues decide: how much of a write's data waits for each link, as the
//! driver reports it, and the two rules that act on it.
//!
//! - Back-pressure: while a replicating peer's queue holds more than `send_queue_bytes`
//!   (protocol A's send buffer), a new write waits here, behind the writes already waiting, and
//!   before it touches any disk. It waits in the replica and not in the thread that submitted
//!   it: that thread (the NBD ring, a ublk queue) serves other requests and clients meanwhile,
//!   reads and flushes included. The waiting writes go on, in order, when the driver reports a
//!   drained queue ([`Replica::send_queues`]), when the peer stops being replicated to (link
//!   lost, left behind), or are refused when no write may start any more (demotion, a failed
//!   disk); the timer looks once a tick too.
//! - Pull-ahead (`on_congestion = "pull-ahead"`, protocol A on a slow link): a peer whose queue
//!   passed the fill mark is left behind instead, so application writes never wait for it.

use super::peer::Peer;
use super::weakened::{is_weakened, Rule};
use super::writes::QueuedWrite;
use super::{Action, Lane, Replica};
use crate::core::states::ReplState;
use std::time::Instant;

impl Replica {
    /// The driver's report of the bulk bytes waiting in each peer's link queue (`queued_bytes`
    /// of a peer's node id), when one drained below the limit: waiting writes go on while
    /// there is room.
    pub fn send_queues(&mut self, now: Instant, queued_bytes: impl Fn(u8) -> usize) {
        self.note_send_queues(queued_bytes);
        self.pull_ahead(now);
        self.release_for_room(now);
    }

    /// Records the driver's figures (taken as a write arrives, see `Replica::submit`).
    pub(super) fn note_send_queues(&mut self, queued_bytes: impl Fn(u8) -> usize) {
        for peer in self.peers.iter_mut() {
            peer.queued_bytes = if peer.connected { queued_bytes(peer.node_id) } else { 0 };
        }
    }

    /// Writes waiting for room in a send queue.
    pub fn awaiting_room(&self) -> usize {
        self.awaiting_room.len()
    }

    /// Bulk bytes waiting for `peer`: in its link's queue (as last reported, with the frames
    /// handed over since), and here, queued for the driver and not yet handed to the link, or
    /// the data of writes admitted and not started yet (waiting for an activity-log
    /// transaction, say), which every replicating peer is sent when they start.
    fn queued_for(&self, peer: &Peer) -> usize {
        let outbox: usize = self
            .outbox
            .iter()
            .map(|a| match a {
                Action::Send { peer: p, msg, lane: Lane::Bulk, .. } if *p == peer.node_id => msg.payload_len(),
                _ => 0,
            })
            .sum();
        peer.queued_bytes + outbox + self.waiting_data_bytes()
    }

    fn send_queue_full(&self) -> bool {
        self.peers.iter().filter(|p| p.is_replicating()).any(|p| self.queued_for(p) > self.send_queue_bytes)
    }

    /// Whether `write` must wait for room, behind those already waiting; if so it is kept. A
    /// write this node refuses anyway is refused at once, not kept.
    pub(super) fn waits_for_room(&mut self, write: QueuedWrite) -> Option<QueuedWrite> {
        if self.write_refusal().is_some() || (self.awaiting_room.is_empty() && !self.send_queue_full()) {
            return Some(write);
        }
        self.awaiting_room.push_back(write);
        None
    }

    /// The waiting writes go on, in arrival order, while there is room (each one started adds
    /// to the queues), or all of them when no write may start any more (they are refused).
    pub(super) fn release_for_room(&mut self, now: Instant) {
        if is_weakened(Rule::RoomNeverMade) {
            return;
        }
        while !self.awaiting_room.is_empty() && (self.write_refusal().is_some() || !self.send_queue_full()) {
            let write = self.awaiting_room.pop_front().expect("not empty");
            self.admit_write(now, write);
        }
    }

    /// Pull-ahead: every replicating peer whose send queue passed the fill mark is left behind
    /// (an Established one: see below). This primary goes Ahead of it: it stops sending it data
    /// and records the writes in its bitmap (a new generation starts, as for a lost peer, so
    /// the peer can never be promoted as if it were current), and the peer goes Behind and
    /// Outdated. Application writes never wait for the slow peer.
    pub(super) fn pull_ahead(&mut self, now: Instant) {
        let Some(fill_bytes) = self.congestion_fill else { return };
        let congested: Vec<(u8, usize)> = self
            .peers
            .iter()
            // A peer whose bitmap exchange is under way is left alone: its resync decision
            // stands. So is one this node resyncs: its queue holds the resync's own (paced)
            // traffic, and going Ahead would start that resync over, full, every time.
            .filter(|p| p.repl == ReplState::Established && p.pending_sync.is_none())
            .map(|p| (p.node_id, self.queued_for(p)))
            .filter(|(_, queued)| *queued as u64 > fill_bytes)
            .collect();
        for (peer_id, queued) in congested {
            // Close the epoch while the peer still counts as replicating: the writes already
            // queued to it end with a barrier whose ack says it has taken in all of them.
            let last_epoch = self.close_epoch();
            let peer = self.peer_mut(peer_id);
            let was = std::mem::replace(&mut peer.repl, ReplState::Ahead);
            // A resync in progress stops and starts over once caught up.
            peer.resync = None;
            peer.ahead_until = Some(last_epoch);
            let name = peer.name.clone();
            tracing::warn!(resource = %self.resource, peer = %name, was = %was, queued_bytes = queued,
                "send queue passed congestion_fill_kib: Ahead of {name}; its writes are recorded in the bitmap until it catches up");
            self.stops_following(now, peer_id, None, true);
            self.broadcast_state();
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::core::states::ReplState;
    use crate::frontend::{BlockError, BlockRequest};
    use crate::replica::testing::{answers, data_sent, primary_replicating, settled, write};
    use crate::replica::{Action, IoTag, Replica};
    use crate::wire::Message;

    /// The local writes among `actions`.
    fn local_writes(actions: &[Action]) -> usize {
        actions.iter().filter(|a| matches!(a, Action::Io { tag: IoTag::Write(_), .. })).count()
    }

    /// A primary replicating to its peer, whose send queue holds 64 KiB at most.
    fn primary_with_queue() -> (Replica, std::time::Instant) {
        let (mut r, t0) = primary_replicating();
        r.send_queue_bytes = 64 << 10;
        (r, t0)
    }

    #[test]
    fn writes_wait_for_room_in_order_while_reads_and_flushes_go_on() {
        let (mut r, t0) = primary_with_queue();
        let full = |_: u8| 65 << 10;
        r.submit(t0, 1, write(0, 4096), full);
        r.submit(t0, 2, write(8192, 4096), full);
        // A write that would not wait queues behind those that do.
        r.submit(t0, 3, write(16384, 4096), |_| 0);
        assert_eq!(r.awaiting_room(), 3);
        r.submit(t0, 4, BlockRequest::Read { offset: 0, len: 4096 }, full);
        r.submit(t0, 5, BlockRequest::Flush, full);
        let actions = r.take_actions();
        assert_eq!(local_writes(&actions), 0, "no waiting write touches a disk: {actions:?}");
        assert!(data_sent(&actions).is_empty());
        assert!(actions.iter().any(|a| matches!(a, Action::Io { tag: IoTag::Read(4), .. })), "the read goes on: {actions:?}");
        assert!(actions.iter().any(|a| matches!(a, Action::Io { tag: IoTag::Flush(_), .. })), "the flush goes on: {actions:?}");
        assert!(!r.writes_idle(), "a demotion waits for them");
        // A write starts while the queue holds no more than the limit: at 4 KiB below it, the
        // first two go, in order; the third waits for the next report.
        r.send_queues(t0, |_| (64 << 10) - 4096);
        assert_eq!(data_sent(&settled(&mut r)), vec![0, 8192]);
        assert_eq!(r.awaiting_room(), 1);
        r.send_queues(t0, |_| 0);
        assert_eq!(data_sent(&r.take_actions()), vec![16384]);
        assert_eq!(r.awaiting_room(), 0);
    }

    #[test]
    fn a_tick_lets_waiting_writes_go_only_on_the_queues_as_they_are_now() {
        // tests/stalled_peer.rs, 1 run in 10 to 20: a peer whose disk hangs takes in nothing,
        // and the writes that waited for their activity-log transaction start at once when it
        // is written, past the limit; judged on the figure the last write had found, each tick
        // let another limit's worth go, until the whole backlog sat in the peer's queue.
        let (mut r, t0) = primary_with_queue();
        for i in 0..24 {
            r.submit(t0, i, write(i * 4096, 4096), |_| 0);
        }
        let waiting = r.awaiting_room();
        assert!(waiting > 0, "the writes waiting for the activity log count as queued");
        let sent = data_sent(&settled(&mut r));
        let queued = sent.len() * 4096;
        assert!(queued > 64 << 10, "the transaction started them all: {sent:?}");
        // The peer takes in nothing: its queue holds what was sent.
        let tick = t0 + std::time::Duration::from_millis(100);
        r.tick(tick, |_| queued);
        assert!(data_sent(&settled(&mut r)).is_empty(), "no room: nothing more goes to the queue");
        assert_eq!(r.awaiting_room(), waiting);
        // Once it drains, a tick lets them go even if no report came.
        r.tick(tick + std::time::Duration::from_millis(100), |_| 0);
        assert_eq!(data_sent(&settled(&mut r)).len(), waiting);
        assert_eq!(r.awaiting_room(), 0);
    }

    #[test]
    fn a_lost_link_lets_writes_waiting_for_room_go_only_where_the_other_queues_have_it() {
        // Every frame handed over since the driver's last figures counts: the other peer's
        // queue holds them, and a link lost frees no room there.
        let (mut r, t0) = crate::replica::testing::primary_replicating_to_two();
        r.send_queue_bytes = 64 << 10;
        for i in 0..24 {
            r.submit(t0, i, write(i * 4096, 4096), |_| 0);
        }
        let waiting = r.awaiting_room();
        let sent = data_sent(&settled(&mut r));
        assert!(waiting > 0 && sent.len() * 4096 > 2 * (64 << 10), "both peers were sent what the transaction started: {sent:?}");
        r.peer_lost(t0, 2, "test", 0);
        assert!(data_sent(&settled(&mut r)).is_empty(), "node 1's queue still holds more than the limit");
        assert_eq!(r.awaiting_room(), waiting);
        r.tick(t0, |_| 0);
        assert_eq!(data_sent(&settled(&mut r)).len(), waiting, "drained: the tick finds room");
    }

    #[test]
    fn writes_waiting_for_a_lost_peer_go_on_without_it() {
        let (mut r, t0) = primary_with_queue();
        r.submit(t0, 1, write(0, 4096), |_| 1 << 20);
        assert_eq!(r.awaiting_room(), 1);
        r.peer_lost(t0, 1, "test", 0);
        let actions = settled(&mut r);
        assert_eq!(local_writes(&actions), 1, "written here, marked for the peer: {actions:?}");
        assert!(data_sent(&actions).is_empty());
        assert!(r.bitmaps[0].weight() > 0);
    }

    #[test]
    fn writes_waiting_for_room_are_refused_by_a_demotion() {
        let (mut r, t0) = primary_with_queue();
        r.submit(t0, 1, write(0, 4096), |_| 1 << 20);
        r.take_actions();
        r.begin_demotion(t0);
        let actions = r.take_actions();
        assert_eq!(answers(&actions), vec![(1, Err(BlockError::ReadOnly))]);
        assert_eq!(local_writes(&actions), 0);
        assert!(r.writes_idle());
    }

    #[test]
    fn pull_ahead_leaves_a_congested_peer_behind_and_takes_it_back_once_it_drained() {
        let (mut r, t0) = primary_replicating();
        r.protocol = crate::config::Protocol::A;
        r.congestion_fill = Some(1 << 20);
        r.submit(t0, 1, write(0, 4096), |_| 2 << 20);
        let actions = settled(&mut r);
        assert_eq!(r.peer(1).repl, ReplState::Ahead);
        let last = actions.iter().find_map(|a| match a {
            Action::Send { msg: Message::Barrier { epoch }, .. } => Some(*epoch),
            _ => None,
        }).expect("the queue is closed with a barrier");
        assert!(data_sent(&actions).is_empty(), "no data for it: {actions:?}");
        assert_eq!(local_writes(&actions), 1, "the write does not wait: {actions:?}");
        assert!(r.bitmaps[0].weight() > 0, "the write is in its bitmap");
        r.barrier_acked(t0, 1, last);
        assert_eq!(r.peer(1).repl, ReplState::Off, "caught up: decided again");
    }

    #[test]
    fn a_peer_being_resynced_is_never_left_behind() {
        let (mut r, t0) = primary_replicating();
        r.protocol = crate::config::Protocol::A;
        r.congestion_fill = Some(1 << 20);
        // Its queue holds the resync's own traffic: going Ahead would start the resync over.
        r.peer_mut(1).repl = ReplState::SyncSource;
        r.submit(t0, 1, write(0, 4096), |_| 2 << 20);
        let actions = settled(&mut r);
        assert_eq!(r.peer(1).repl, ReplState::SyncSource);
        assert_eq!(data_sent(&actions), vec![0], "it gets the write: {actions:?}");
    }
}
