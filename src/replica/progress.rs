//! A peer that stops making progress: its link stays up (it answers pings) but it acknowledges
//! no write and no barrier, say because its disk hangs. A protocol-C primary would wait on it
//! forever, its writes held; after `LinkTiming::stall_timeout` the peer is dropped instead, like
//! a lost link: what it lacks goes to its bitmap and is resynced once it is back.

use super::{Action, Replica};
use std::time::Instant;

impl Replica {
    /// `peer_id` acknowledged a write or a barrier at `now`.
    pub fn peer_progressed(&mut self, peer_id: u8, now: Instant) {
        self.peer_mut(peer_id).progress_at = Some(now);
    }

    /// When each connected data peer that owes acks would count as stalled.
    pub(super) fn stall_deadlines(&self) -> impl Iterator<Item = Instant> + '_ {
        let stall = self.timing.stall_timeout;
        self.peers
            .iter()
            .filter(|p| p.connected && !p.witness)
            .filter(|p| !p.barriers.is_empty() || self.inflight.waits_for(p.node_id))
            .filter_map(move |p| p.progress_at.map(|since| since + stall))
    }

    /// Drops the connected data peers that owe acks and sent none for a stall timeout. A peer
    /// that owes nothing counts as progressing.
    pub(super) fn drop_stalled_peers(&mut self, now: Instant) {
        let stall = self.timing.stall_timeout;
        let mut stalled = Vec::new();
        for peer in self.peers.iter_mut().filter(|p| p.connected && !p.witness) {
            let owes = !peer.barriers.is_empty() || self.inflight.waits_for(peer.node_id);
            let since = match peer.progress_at {
                Some(since) if owes => since,
                _ => {
                    peer.progress_at = Some(now);
                    continue;
                }
            };
            if now.saturating_duration_since(since) < stall {
                continue;
            }
            // Once: the link goes with this action.
            peer.progress_at = None;
            stalled.push(Action::DropLink {
                peer: peer.node_id,
                generation: peer.generation,
                reason: format!(
                    "{} acknowledged no write or barrier for {:?} though it answers pings (a hung disk?): dropped, what it lacks is resynced when it is back",
                    peer.name, stall
                ),
            });
        }
        self.requeue_after(stalled);
    }
}

#[cfg(test)]
mod tests {
    use crate::core::inflight::{AckLevel, PeerSet};
    use crate::replica::testing::two_node_replica;
    use crate::replica::Action;
    use std::time::Duration;

    #[test]
    fn a_peer_that_owes_acks_and_sends_none_is_dropped_once_after_the_stall_timeout() {
        let (mut replica, t0) = two_node_replica();
        let stall = replica.timing.stall_timeout;
        replica.link_up(1, t0);
        replica.take_actions();
        // Idle for a long time: owing nothing is progress.
        replica.tick(t0 + 3 * stall, |_| 0);
        let mut peers = PeerSet::default();
        peers.insert(1);
        replica.inflight.start(0, 4096, AckLevel::Written, peers);
        let t1 = t0 + 3 * stall + Duration::from_millis(1);
        let drops = |r: &mut crate::replica::Replica| {
            r.take_actions().into_iter().filter(|a| matches!(a, Action::DropLink { .. })).count()
        };
        replica.tick(t1, |_| 0);
        assert_eq!(drops(&mut replica), 0, "the write was just sent");
        assert!(replica.poll_timeout().is_some_and(|at| at <= t1 + stall), "the stall bound is a deadline");
        replica.tick(t1 + stall / 2, |_| 0);
        replica.peer_progressed(1, t1 + stall / 2);
        replica.tick(t1 + stall, |_| 0);
        assert_eq!(drops(&mut replica), 0, "an ack restarts the clock");
        replica.tick(t1 + stall / 2 + stall, |_| 0);
        assert_eq!(drops(&mut replica), 1);
        replica.tick(t1 + 3 * stall, |_| 0);
        assert_eq!(drops(&mut replica), 0, "dropped once, not at every tick");
    }

    #[test]
    fn a_barrier_owed_counts_like_a_write() {
        let (mut replica, t0) = two_node_replica();
        let stall = replica.timing.stall_timeout;
        replica.link_up(1, t0);
        replica.tick(t0, |_| 0);
        replica.peer_mut(1).barriers.push_back((1, 0));
        replica.take_actions();
        replica.tick(t0 + stall, |_| 0);
        let dropped = replica.take_actions().into_iter().any(|a| matches!(a, Action::DropLink { peer: 1, .. }));
        assert!(dropped);
    }
}
