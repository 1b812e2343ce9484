//! What the engine guards with one mutex: the replica (the rules and what they decide on) and
//! beside it what only the drivers hold: the metadata store, the peers' links, the frontends'
//! completions and the export. Methods here persist what the replica decided and answer
//! requests; they never block on the network.

use super::counters::Timed;
use super::link::PeerLink;
use crate::frontend::{Completion, Export};
use crate::meta::{MetaError, MetaStore};
use crate::replica::{Replica, RequestId};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// What the engine guards with one mutex: the replica and what the drivers need beside it (the
/// metadata store, the peers' links, the frontends' completions, the export).
pub struct State {
    pub replica: Replica,
    pub meta: MetaStore,
    /// One per peer, by node id, in the replica's order: the link while connected.
    pub links: Vec<(u8, Option<Arc<PeerLink>>)>,
    /// The frontends' requests the replica has not answered yet.
    pub requests: HashMap<RequestId, Pending>,
    pub next_request: RequestId,
    /// The device as hosts see it (NBD server or /dev/ublkbN): while primary, or while failing
    /// every request after this node gave up a device left behind (see `left_behind`).
    pub export: Option<Export>,
    /// Set while the exported device fails every request: why.
    pub export_failing: Option<String>,
    /// A ublk device a daemon of this node left behind when it died as primary, with its I/O
    /// held by the kernel until this node may be primary again (device id, why not yet).
    pub left_behind: Option<(u32, String)>,
    /// A step-down's thread is on its way (see `engine::step_down_if_superseded`).
    pub stepping_down: bool,
}

/// A frontend request the replica has not answered yet, with what its latency is measured from.
pub struct Pending {
    pub done: Completion,
    pub arrived: Instant,
    pub timed: Timed,
}

/// The link to `node_id` in `links` (see [`State::links`]), while connected: apart from the
/// state, so the replica can be borrowed beside it.
pub fn link_of(links: &[(u8, Option<Arc<PeerLink>>)], node_id: u8) -> Option<&Arc<PeerLink>> {
    links.iter().find(|(id, _)| *id == node_id).expect("configured peer").1.as_ref()
}

/// Bulk bytes waiting in the send queue of `node_id`'s link (none without a link).
pub fn queued_bytes(links: &[(u8, Option<Arc<PeerLink>>)], node_id: u8) -> usize {
    link_of(links, node_id).map_or(0, |l| l.queued_bytes())
}

impl State {
    /// The link to `node_id`, while connected.
    pub fn link(&self, node_id: u8) -> Option<&Arc<PeerLink>> {
        link_of(&self.links, node_id)
    }

    /// Sets or clears the link to `node_id`; returns the one it replaces.
    pub fn set_link(&mut self, node_id: u8, link: Option<Arc<PeerLink>>) -> Option<Arc<PeerLink>> {
        let (_, slot) = self.links.iter_mut().find(|(id, _)| *id == node_id).expect("configured peer");
        std::mem::replace(slot, link)
    }

    pub fn persist(&mut self) -> Result<(), MetaError> {
        self.meta.write_superblock(&self.replica.sb)
    }

    /// Writes one peer's whole bitmap.
    pub fn persist_bitmap(&mut self, slot: usize) -> Result<(), MetaError> {
        self.meta.write_bitmap(slot, &self.replica.bitmaps[slot])
    }
}
