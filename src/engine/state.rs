//! What the engine guards with one mutex: the replica (the rules and what they decide on) and
//! beside it what only the drivers hold: the metadata store, the peers' links, the frontends'
//! completions and the export. Methods here persist what the replica decided and answer
//! requests; they never block on the network.

use super::link::PeerLink;
use super::write_path::HeldWrite;
use super::Shared;
use crate::core::quorum::Admission;
use crate::core::states::{DiskState, Role};
use crate::frontend::Export;
use crate::frontend::{BlockResult, Completion};
use crate::meta::activity_log::AlUpdate;
use crate::meta::{MetaError, MetaStore};
use crate::replica::Replica;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// Requests completed under the lock, answered after it is released (a completion may write to
/// a socket), and held writes to submit again (submission takes the lock).
#[derive(Default)]
pub struct Deferred {
    completions: Vec<(Completion, BlockResult)>,
    resubmit: Vec<HeldWrite>,
}

impl Deferred {
    pub fn push(&mut self, done: Completion, result: BlockResult) {
        self.completions.push((done, result));
    }
    pub fn run(self, shared: &Arc<Shared>) {
        for (done, result) in self.completions {
            done(result);
        }
        if self.resubmit.is_empty() {
            return;
        }
        // On a thread of their own: a submission may wait (overlaps, the activity log, a full
        // send queue) for acks that the thread running this, a peer's reader, would deliver.
        let (shared, writes) = (shared.clone(), std::sync::Arc::new(std::sync::Mutex::new(Some(self.resubmit))));
        let mine = writes.clone();
        let spawned = std::thread::Builder::new().name("held-writes".into()).spawn(move || {
            for held in mine.lock().expect("held writes").take().unwrap_or_default() {
                super::write_path::resubmit(&shared, held);
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the thread that submits held writes: failing them");
            for held in writes.lock().expect("held writes").take().unwrap_or_default() {
                (held.done)(Err(crate::frontend::BlockError::Io));
            }
        }
    }
}

/// What the engine guards with one mutex: the replica and what the drivers need beside it (the
/// metadata store, the peers' links, the frontends' completions, the export).
pub struct State {
    pub replica: Replica,
    pub meta: MetaStore,
    /// One per peer, in the replica's order: the link while connected.
    pub links: Vec<Option<Arc<PeerLink>>>,
    pub completions: HashMap<u64, Completion>,
    /// The completions of pending flushes, by flush id (see `replica::PendingFlush`).
    pub flush_done: HashMap<u64, Completion>,
    /// The device as hosts see it (NBD server or /dev/ublkbN): while primary, or while failing
    /// every request after this node gave up a device left behind (see `left_behind`).
    pub export: Option<Export>,
    /// Set while the exported device fails every request: why.
    pub export_failing: Option<String>,
    /// A ublk device a daemon of this node left behind when it died as primary, with its I/O
    /// held by the kernel until this node may be primary again (device id, why not yet).
    pub left_behind: Option<(u32, String)>,
    /// Write and flush completions held while this primary has no quorum (suspend-io): writes
    /// that were in flight when quorum went.
    pub suspended: Vec<(Completion, BlockResult)>,
    /// Writes that arrived while this primary had no quorum (suspend-io), not yet written
    /// anywhere, in arrival order.
    pub held_writes: Vec<HeldWrite>,
}

impl State {
    /// The link to `node_id`, while connected.
    pub fn link(&self, node_id: u8) -> Option<&Arc<PeerLink>> {
        let index = self.replica.peers.iter().position(|p| p.node_id == node_id).expect("configured peer");
        self.links[index].as_ref()
    }

    /// Sets or clears the link to `node_id`; returns the one it replaces.
    pub fn set_link(&mut self, node_id: u8, link: Option<Arc<PeerLink>>) -> Option<Arc<PeerLink>> {
        let index = self.replica.peers.iter().position(|p| p.node_id == node_id).expect("configured peer");
        std::mem::replace(&mut self.links[index], link)
    }

    pub fn persist(&mut self) -> Result<(), MetaError> {
        self.meta.write_superblock(&self.replica.sb)
    }

    /// Completes a write or flush, unless this primary may not (see `Replica::admission`):
    /// then the completion is held or fails. An acknowledged write must be on the side that
    /// keeps quorum, the only side that may promote, and under a generation the lost peers lack.
    pub fn finish_write(&mut self, done: Completion, result: BlockResult, deferred: &mut Deferred) {
        let now = Instant::now();
        match self.replica.admission(now) {
            Admission::Proceed => {
                let result = result.and_then(|r| self.start_pending_generation().map(|()| r));
                deferred.push(done, result);
            }
            Admission::Hold => {
                if self.suspended.is_empty() {
                    tracing::warn!(quorum = ?self.replica.quorum(now), "no quorum, or an old primary still seen: holding write completions");
                }
                self.suspended.push((done, result));
            }
            Admission::Refuse => deferred.push(done, Err(crate::frontend::BlockError::Io)),
        }
    }

    /// Starts the new generation owed to the data peers lost since the last one (see
    /// `Replica::generation_pending`), persisted before any write under it completes.
    fn start_pending_generation(&mut self) -> Result<(), crate::frontend::BlockError> {
        let r = &mut self.replica;
        if r.generation_pending.is_empty() || r.role != Role::Primary {
            return Ok(());
        }
        let slots = std::mem::take(&mut r.generation_pending);
        r.left_generation = r.sb.uuids.current;
        let mut generation = r.generation();
        generation.new_current(super::random_u64(), true, true, &slots);
        r.set_generation(generation);
        if let Err(e) = self.persist() {
            tracing::error!(error = %e, "cannot persist the new generation; failing writes");
            self.replica.disk = DiskState::Failed;
            return Err(crate::frontend::BlockError::Io);
        }
        tracing::info!(uuid = format_args!("{:016X}", self.replica.sb.uuids.current), "new generation: writing without a lost peer");
        // The secondaries still connected follow the new generation.
        self.replica.broadcast_state();
        Ok(())
    }

    /// Whether this primary was superseded (see `Replica::superseded`), now.
    pub fn superseded(&self) -> bool {
        self.replica.superseded(Instant::now())
    }

    /// Releases held completions and writes once this primary may complete writes again, or
    /// fails them when `fail` (demotion) or when another primary took over.
    pub fn release_suspended(&mut self, fail: bool, deferred: &mut Deferred) {
        if self.suspended.is_empty() && self.held_writes.is_empty() {
            return;
        }
        let fail = fail || self.replica.role != Role::Primary || self.superseded();
        if !fail && self.replica.admission(Instant::now()) != Admission::Proceed {
            return;
        }
        let completions = std::mem::take(&mut self.suspended);
        let writes = std::mem::take(&mut self.held_writes);
        if fail {
            tracing::error!(completions = completions.len(), writes = writes.len(),
                "failing writes held without quorum: they were never acknowledged (another node may be primary now)");
        } else {
            tracing::info!(completions = completions.len(), writes = writes.len(), "quorum is back: completing held writes");
        }
        let generation = if fail { Ok(()) } else { self.start_pending_generation() };
        for (done, result) in completions {
            let result = if fail { Err(crate::frontend::BlockError::Io) } else { generation.clone().and(result) };
            deferred.push(done, result);
        }
        for held in writes {
            if fail {
                deferred.push(held.done, Err(crate::frontend::BlockError::Io));
            } else {
                deferred.resubmit.push(held);
            }
        }
    }

    /// Makes an activity-log change durable, in the order crash recovery relies on: the bitmap
    /// pages of every evicted extent (they leave the log's protection), then the transaction.
    pub fn apply_al_update(&mut self, update: AlUpdate) -> Result<(), MetaError> {
        self.meta.write_al_update(&update, &self.replica.bitmaps)?;
        self.replica.al.commit(update);
        Ok(())
    }

    /// Writes one peer's whole bitmap.
    pub fn persist_bitmap(&mut self, slot: usize) -> Result<(), MetaError> {
        self.meta.write_bitmap(slot, &self.replica.bitmaps[slot])
    }
}
