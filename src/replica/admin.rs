//! Admin commands that change what this node's data is: `new-current-uuid` (a new generation;
//! with `--clear-bitmap`, two fresh nodes declared in sync without copying) and `invalidate`
//! (this node's data declared bad and resynced in full). Their metadata is durable before any
//! peer hears of them (a failed write fails the disk instead, see `persist_failed`).

use super::{MetaWrite, Replica};
use crate::core::states::{DiskState, ReplState, Role};
use crate::core::sync_decision::{same_uuid, UUID_JUST_CREATED};
use crate::meta::MetaFlags;
use crate::wire::Message;

impl Replica {
    /// Starts a new data generation on this node; with `clear_bitmap`, on freshly created
    /// metadata with every peer fresh, connected and Secondary too, declares all of them in sync
    /// (both disks hold nothing of value yet). The error is why it is refused.
    pub fn new_current_uuid(&mut self, clear_bitmap: bool) -> Result<(), String> {
        if clear_bitmap {
            let fresh = same_uuid(self.sb.uuids.current, UUID_JUST_CREATED);
            let all_fresh_and_connected = self
                .peers
                .iter()
                .all(|p| p.connected && p.last_state.is_some_and(|s| same_uuid(s.current_uuid, UUID_JUST_CREATED)));
            if !fresh || !all_fresh_and_connected || self.role == Role::Primary {
                return Err("--clear-bitmap needs freshly created metadata on every node, all connected, all Secondary".into());
            }
        }
        let mut generation = self.generation();
        let primary = self.role == Role::Primary;
        generation.new_current(self.uuids.next(), primary, primary, &[]);
        self.set_generation(generation);
        if clear_bitmap {
            for bitmap in self.bitmaps.iter_mut() {
                bitmap.clear_all();
            }
            self.disk = DiskState::UpToDate;
            self.sb.flags.insert(MetaFlags::CONSISTENT | MetaFlags::WAS_UP_TO_DATE);
        }
        for slot in 0..self.bitmaps.len() {
            self.persist(MetaWrite::Bitmap(slot));
        }
        self.persist(MetaWrite::Superblock);
        if clear_bitmap {
            let (current_uuid, history, position) = (self.sb.uuids.current, self.sb.uuids.history, self.data_position());
            // A witness holds no data to declare in sync (it would report itself UpToDate).
            let data_peers: Vec<u8> = self.peers.iter().filter(|p| !p.witness).map(|p| p.node_id).collect();
            for peer in data_peers {
                self.send(peer, Message::ResyncDone { current_uuid, history, position });
            }
            // A State a peer sent before its declaration landed shows it fresh still: no
            // decision on it (see `replica/declaration.rs`).
            self.declared_with = self.declared_peers_but(None);
        }
        self.broadcast_state();
        Ok(())
    }

    /// `invalidate`: this node's data is declared bad and fully resynced from a connected
    /// UpToDate peer. The whole bitmap for that peer, then the Inconsistent disk, are on disk
    /// before anything else happens (a crash between the two leaves a consistent disk with
    /// extra bits, harmless, never an Inconsistent disk with too few), so a crash or a lost
    /// connection midway still ends in a resync, never in this node trusting data it gave up.
    /// The peer hears of it first, so it decides on its side before this node's bitmap reaches
    /// it, then this node decides. Returns the peer's name, or why it is refused.
    pub fn invalidate(&mut self) -> Result<String, String> {
        if self.role == Role::Primary {
            return Err("this node is Primary: invalidating it would discard the data it serves; make another node primary first (`blkrepl secondary` here)".into());
        }
        let source = self
            .peers
            .iter()
            .find(|p| p.connected && p.repl == ReplState::Established && p.disk == DiskState::UpToDate)
            .map(|p| (p.node_id, p.slot, p.name.clone()));
        let Some((peer_id, slot, name)) = source else {
            return Err("no connected UpToDate peer to resync from (one must be Established, not syncing): connect one first (`blkrepl connect`)".into());
        };
        self.bitmaps[slot].set_all();
        self.persist(MetaWrite::Bitmap(slot));
        self.sb.flags.remove(MetaFlags::CONSISTENT);
        self.persist(MetaWrite::Superblock);
        self.disk = DiskState::Inconsistent;
        tracing::warn!(resource = %self.resource, peer = %name, "invalidated by the operator: this node's data is resynced in full from {name}");
        self.broadcast_state();
        self.reconsider_or_drop(peer_id);
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use crate::core::states::{DiskState, ReplState, Role};
    use crate::meta::MetaFlags;
    use crate::replica::testing::secondary_of_primary;
    use crate::replica::{Action, MetaWrite};
    use crate::wire::Message;

    #[test]
    fn invalidate_marks_everything_durably_before_the_peer_hears_of_it() {
        let (mut r, _) = secondary_of_primary();
        r.peer_mut(1).role = Role::Secondary;
        assert_eq!(r.invalidate().unwrap(), "beta");
        assert_eq!(r.disk, DiskState::Inconsistent);
        assert!(!r.sb.flags.contains(MetaFlags::CONSISTENT));
        assert_eq!(r.bitmaps[0].weight(), r.bitmaps[0].blocks());
        let actions = r.take_actions();
        assert!(matches!(&actions[..2], [Action::Persist(MetaWrite::Bitmap(0)), Action::Persist(MetaWrite::Superblock)]), "{actions:?}");
        assert!(actions.iter().any(|a| matches!(a, Action::Send { msg: Message::State(_), .. })));
    }

    #[test]
    fn invalidate_needs_an_up_to_date_peer_in_sync() {
        let (mut r, _) = secondary_of_primary();
        r.peer_mut(1).repl = ReplState::SyncSource;
        assert!(r.invalidate().unwrap_err().contains("no connected UpToDate peer"));
        assert_eq!(r.disk, DiskState::UpToDate);
        assert!(r.take_actions().is_empty());
    }
}
