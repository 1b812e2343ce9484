//! What the promoter knows of its resource: the last state the daemon's events showed, folded
//! from the stream's lines (pure: no I/O, no clock).

use crate::events::{Action, Event, Object, ResourceObject};
use std::collections::BTreeMap;

/// The part of a resource's state that the promoter decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// This node is Primary.
    pub primary: bool,
    pub quorum: bool,
    /// `primary` without `--force` would succeed (quorum, UpToDate, no other primary).
    pub may_promote: bool,
    /// The daemon's preference for this node (higher is better), none while it may not be
    /// promoted.
    pub promotion_score: Option<u32>,
    /// A connected peer reports itself Primary.
    pub peer_primary: bool,
    /// A local write failed on this primary: it fails every read and write until demoted.
    pub write_failed: bool,
}

/// Folds events into the current [`View`]; a consumer that joins late needs nothing else,
/// since every line carries its object's whole state.
#[derive(Debug, Default)]
pub struct Tracker {
    shown: Known,
    /// While a new subscription lists the state (up to its `exists -` marker): what it listed.
    listing: Option<Known>,
}

/// What the lines of one subscription said.
#[derive(Debug, Default)]
struct Known {
    resource: Option<ResourceObject>,
    /// Each peer's role by node id, as its `connection` line last said.
    peer_roles: BTreeMap<u8, String>,
    /// The `device` line's `write_failed`.
    write_failed: bool,
}

impl Tracker {
    /// A new subscription starts (after one failed): the state it lists up to its marker
    /// replaces what the old one showed, so a daemon that died meanwhile (and so listed
    /// nothing) is not taken for still running.
    pub fn resubscribe(&mut self) {
        self.listing = Some(Known::default());
    }

    pub fn apply(&mut self, event: &Event) {
        if event.object == Object::Marker {
            if let Some(listed) = self.listing.take() {
                self.shown = listed;
            }
            return;
        }
        let known = self.listing.as_mut().unwrap_or(&mut self.shown);
        let gone = event.action == Action::Destroy;
        match &event.object {
            Object::Resource(resource) => {
                known.resource = (!gone).then(|| resource.clone());
                if gone {
                    // The daemon stopped or died: what it said of its peers and disk goes with it.
                    known.peer_roles.clear();
                    known.write_failed = false;
                }
            }
            Object::Connection(connection) if gone => {
                known.peer_roles.remove(&connection.peer_node_id);
            }
            Object::Connection(connection) => {
                known.peer_roles.insert(connection.peer_node_id, connection.role.clone());
            }
            Object::Device(device) => known.write_failed = !gone && device.write_failed,
            Object::PeerDevice(_) | Object::Marker => {}
        }
    }

    /// The current view; none while the daemon is not running.
    pub fn view(&self) -> Option<View> {
        let resource = self.shown.resource.as_ref()?;
        Some(View {
            primary: resource.role == "Primary",
            quorum: resource.quorum,
            may_promote: resource.may_promote,
            promotion_score: resource.promotion_score,
            peer_primary: self.shown.peer_roles.values().any(|role| role == "Primary"),
            write_failed: self.shown.write_failed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{ConnectionObject, DeviceObject};

    fn resource(role: &str, quorum: bool) -> Object {
        Object::Resource(ResourceObject {
            name: "r0".into(),
            role: role.into(),
            suspended: "no".into(),
            quorum,
            may_promote: quorum && role == "Secondary",
            promotion_score: quorum.then_some(10_000),
        })
    }

    fn connection(peer_node_id: u8, role: &str) -> Object {
        Object::Connection(ConnectionObject {
            name: "r0".into(),
            peer_node_id,
            conn_name: format!("n{peer_node_id}"),
            connection: "Connected".into(),
            role: role.into(),
        })
    }

    fn event(action: Action, object: Object) -> Event {
        Event { time: String::new(), action, object }
    }

    #[test]
    fn the_view_follows_the_resource_and_the_peers_roles() {
        let mut tracker = Tracker::default();
        assert_eq!(tracker.view(), None, "nothing heard: the daemon is not known to run");
        tracker.apply(&event(Action::Exists, resource("Secondary", true)));
        tracker.apply(&event(Action::Exists, connection(1, "Secondary")));
        tracker.apply(&event(Action::Exists, Object::Marker));
        let view = tracker.view().unwrap();
        assert!(!view.primary && view.quorum && view.may_promote && !view.peer_primary);
        assert_eq!(view.promotion_score, Some(10_000));
        tracker.apply(&event(Action::Change, connection(1, "Primary")));
        assert!(tracker.view().unwrap().peer_primary);
        tracker.apply(&event(Action::Destroy, connection(1, "Primary")));
        assert!(!tracker.view().unwrap().peer_primary, "a peer that went away is not primary here");
    }

    #[test]
    fn a_failed_local_write_shows_until_the_device_line_clears_it() {
        let device = |write_failed| {
            Object::Device(DeviceObject { name: "r0".into(), disk: "UpToDate".into(), export: None, io: None, write_failed })
        };
        let mut tracker = Tracker::default();
        tracker.apply(&event(Action::Exists, resource("Primary", true)));
        tracker.apply(&event(Action::Exists, device(false)));
        assert!(!tracker.view().unwrap().write_failed);
        tracker.apply(&event(Action::Change, device(true)));
        assert!(tracker.view().unwrap().write_failed);
        tracker.apply(&event(Action::Change, device(false)));
        assert!(!tracker.view().unwrap().write_failed);
    }

    #[test]
    fn a_daemon_that_goes_away_takes_its_state_with_it() {
        let mut tracker = Tracker::default();
        tracker.apply(&event(Action::Exists, resource("Primary", true)));
        tracker.apply(&event(Action::Exists, connection(1, "Primary")));
        tracker.apply(&event(Action::Destroy, resource("Primary", true)));
        assert_eq!(tracker.view(), None);
        tracker.apply(&event(Action::Create, resource("Secondary", false)));
        let view = tracker.view().unwrap();
        assert!(!view.primary && !view.quorum && !view.peer_primary, "{view:?}");
    }

    #[test]
    fn a_new_subscription_replaces_the_old_state_at_its_marker() {
        let mut tracker = Tracker::default();
        tracker.apply(&event(Action::Exists, resource("Primary", true)));
        tracker.resubscribe();
        assert!(tracker.view().unwrap().primary, "kept while the new subscription lists");
        tracker.apply(&event(Action::Exists, Object::Marker));
        assert_eq!(tracker.view(), None, "the new subscription listed nothing: the daemon is gone");
        tracker.resubscribe();
        tracker.apply(&event(Action::Exists, resource("Secondary", true)));
        tracker.apply(&event(Action::Exists, Object::Marker));
        assert!(!tracker.view().unwrap().primary);
    }
}
