//! What the operator's link and policy commands change, and what a superseded primary does by
//! policy: `connect` (with `--discard-my-data`), `disconnect`, `adjust`, leaving at a clean
//! stop (`down`), and `on_suspended_primary_outdated`. The driver only calls these and carries
//! out their actions: whether a node that leaves is Outdated, or who may be a split brain's
//! victim, are replication rules, and the simulator runs them here.

use super::{MetaWrite, Replica};
use crate::config::OnSuperseded;
use crate::core::quorum::{OnNoQuorum, QuorumPolicy};
use crate::core::split_brain::SplitBrainPolicies;
use crate::core::states::{ConnState, DiskState, ReplState, Role};
use crate::meta::MetaFlags;
use crate::wire::Message;
use std::time::Instant;

impl Replica {
    /// `connect [--discard-my-data]`: every peer is wanted again. With `discard_my_data` this
    /// node offers itself as a split brain's victim (its changes since the split are
    /// overwritten), refused on a primary, whose data is live. The error is why it is refused.
    pub fn connect_wanted(&mut self, discard_my_data: bool) -> Result<(), String> {
        if discard_my_data {
            if self.role == Role::Primary {
                return Err("--discard-my-data on a primary: demote it first (its data is live)".into());
            }
            tracing::warn!(resource = %self.resource, "connect --discard-my-data: this node's changes since a split brain will be overwritten");
            self.discard_my_data = true;
        }
        for peer in self.peers.iter_mut() {
            peer.want_connect = true;
            if !peer.connected {
                peer.conn = ConnState::Connecting;
                peer.last_error = None;
            }
        }
        self.broadcast_state();
        Ok(())
    }

    /// Every link goes (`reason`) and none is made again until `connect`: `disconnect`, and a
    /// superseded primary that stays primary (see [`Replica::superseded_action`]).
    pub fn stand_alone(&mut self, reason: &str) {
        let ids: Vec<u8> = self.peers.iter().map(|p| p.node_id).collect();
        for id in ids {
            let peer = self.peer_mut(id);
            peer.want_connect = false;
            if peer.connected {
                // `peer_lost` then leaves it StandAlone, as nothing wants it.
                self.drop_link(id, reason.to_owned());
            } else {
                peer.conn = ConnState::StandAlone;
            }
        }
    }

    /// `adjust`: the quorum, on-no-quorum and split-brain policies change at once, and what
    /// the old quorum policy held is judged again under the new one.
    pub fn adjust_policies(&mut self, now: Instant, quorum: QuorumPolicy, on_no_quorum: OnNoQuorum, split_brain: SplitBrainPolicies) {
        tracing::warn!(
            resource = %self.resource,
            "adjust: quorum {} -> {quorum}, on_no_quorum {:?} -> {on_no_quorum:?}, split-brain policies {:?} -> {split_brain:?}",
            self.quorum_policy, self.on_no_quorum, self.split_brain
        );
        self.quorum_policy = quorum;
        self.on_no_quorum = on_no_quorum;
        self.split_brain = split_brain;
        self.release_suspended(now, false);
    }

    /// A clean stop (`down`, after the demotion): the peers are told and the links are not
    /// made again. A node that leaves while a data peer stays up is Outdated from now on (the
    /// peers write on without it), durably before the peers hear it leave (the leaving flag in
    /// its State), so they stop counting it for quorum; their next connect resyncs it. A node
    /// whose peers are all gone or stopping too stays UpToDate: nothing can be written without
    /// it, and the next `up` of the whole cluster needs no resync.
    pub fn leave(&mut self) {
        self.stopping = true;
        let data_peer_stays = self.peers.iter().any(|p| !p.witness && p.connected && p.repl == ReplState::Established);
        if data_peer_stays && !self.witness && self.disk == DiskState::UpToDate {
            self.disk = DiskState::Outdated;
            self.sb.flags.remove(MetaFlags::WAS_UP_TO_DATE);
            self.persist(MetaWrite::Superblock);
            tracing::info!(resource = %self.resource, "leaving while peers stay up: this node is Outdated until it reconnects");
        }
        self.broadcast_state();
        let ids: Vec<u8> = self.peers.iter().map(|p| p.node_id).collect();
        for id in ids {
            self.send(id, Message::Disconnect { reason: "peer is going down".into() });
            self.peer_mut(id).want_connect = false;
        }
    }

    /// This primary was superseded (see [`Replica::superseded`]): under
    /// `on_suspended_primary_outdated = "disconnect"` it fails what it holds, and every later
    /// write and flush, stays primary and goes StandAlone until an operator demotes it (nobody
    /// sees it as a primary any more, so the primary with quorum does not wait for it); under
    /// `"force-secondary"` the answer is `true`: the driver steps it down
    /// ([`Replica::step_down`], then the demotion), once.
    pub fn superseded_action(&mut self, now: Instant) -> bool {
        if !self.superseded(now) {
            return false;
        }
        match self.on_superseded {
            OnSuperseded::ForceSecondary => true,
            OnSuperseded::Disconnect => {
                tracing::error!(resource = %self.resource,
                    "another node was promoted while this node had no quorum: failing what it holds and disconnecting (on_suspended_primary_outdated is disconnect); demote it, then `connect`");
                self.superseded_latched = true;
                self.release_suspended(now, true);
                self.stand_alone("superseded by a newer primary (on_suspended_primary_outdated is disconnect)");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::core::states::{ConnState, DiskState, ReplState, Role};
    use crate::meta::MetaFlags;
    use crate::replica::testing::{primary_replicating, secondary_of_primary, two_node_replica};
    use crate::replica::{Action, MetaWrite, STATE_FLAG_LEAVING};
    use crate::wire::Message;

    #[test]
    fn a_node_leaving_while_a_data_peer_stays_is_outdated_durably_before_the_peer_hears_it() {
        let (mut r, _) = secondary_of_primary();
        r.leave();
        assert_eq!(r.disk, DiskState::Outdated);
        assert!(!r.sb.flags.contains(MetaFlags::WAS_UP_TO_DATE));
        let actions = r.take_actions();
        let persisted = actions.iter().position(|a| matches!(a, Action::Persist(MetaWrite::Superblock)));
        let told = actions.iter().position(|a| matches!(a, Action::Send { msg: Message::State(s), .. } if s.flags & STATE_FLAG_LEAVING != 0));
        assert!(persisted.is_some() && persisted < told, "{actions:?}");
        assert!(actions.iter().any(|a| matches!(a, Action::Send { msg: Message::Disconnect { .. }, .. })));
        assert!(!r.peer(1).want_connect);
    }

    #[test]
    fn a_node_leaving_without_a_data_peer_up_stays_up_to_date() {
        let (mut r, _) = two_node_replica();
        r.disk = DiskState::UpToDate;
        r.leave();
        assert_eq!(r.disk, DiskState::UpToDate, "nothing is written without it");
        assert!(!r.take_actions().iter().any(|a| matches!(a, Action::Persist(_))));
    }

    #[test]
    fn discard_my_data_is_refused_on_a_primary_and_connect_wants_every_peer_again() {
        let (mut r, _) = primary_replicating();
        assert!(r.connect_wanted(true).unwrap_err().contains("demote it first"));
        assert!(!r.discard_my_data);
        let (mut r, _) = two_node_replica();
        r.stand_alone("disconnected by the operator");
        assert_eq!((r.peer(1).want_connect, r.peer(1).conn), (false, ConnState::StandAlone));
        r.connect_wanted(true).unwrap();
        assert!(r.discard_my_data);
        assert_eq!((r.peer(1).want_connect, r.peer(1).conn), (true, ConnState::Connecting));
    }

    #[test]
    fn stand_alone_asks_the_driver_to_drop_a_connected_link() {
        let (mut r, _) = primary_replicating();
        assert_eq!(r.role, Role::Primary);
        assert_eq!(r.peer(1).repl, ReplState::Established);
        r.stand_alone("disconnected by the operator");
        assert!(!r.peer(1).want_connect);
        assert!(r.take_actions().iter().any(|a| matches!(a, Action::DropLink { peer: 1, .. })));
    }
}
