//! What the engine knows, guarded by one mutex: roles, metadata, bitmaps, in-flight writes and
//! the peers. Methods here change state and say what to do; they never block on the network.

use super::link::PeerLink;
use crate::core::generation::Generation;
use crate::core::inflight::InflightWrites;
use crate::core::states::{ConnState, DiskState, ReplState, Role};
use crate::core::sync_decision::{SyncDecision, UuidView};
use crate::core::sync_progress::SyncProgress;
use crate::core::transfer_log::TransferLog;
use crate::frontend::nbd::NbdHandle;
use crate::frontend::{BlockResult, Completion};
use crate::meta::activity_log::{extent_offset, AlUpdate, AL_EXTENT_SIZE};
use crate::meta::{ActivityLog, DirtyBitmap, MetaError, MetaFlags, MetaStore, Superblock};
use crate::wire::PeerState;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

/// The byte range of an activity-log extent, clipped to the device.
pub fn extent_range(extent: u64, data_size_bytes: u64) -> (u64, u64) {
    let offset = extent_offset(extent);
    (offset, AL_EXTENT_SIZE.min(data_size_bytes.saturating_sub(offset)))
}

/// State flag bits carried in `PeerState::flags`.
pub const STATE_FLAG_CRASHED_PRIMARY: u32 = 1;
/// The sender is Ahead of the receiver (pull-ahead): the receiver is Behind until it clears.
pub const STATE_FLAG_AHEAD: u32 = 2;

/// Requests completed under the lock, answered after it is released (a completion may write to
/// a socket).
#[derive(Default)]
pub struct Deferred(Vec<(Completion, BlockResult)>);

impl Deferred {
    pub fn push(&mut self, done: Completion, result: BlockResult) {
        self.0.push((done, result));
    }
    pub fn run(self) {
        for (done, result) in self.0 {
            done(result);
        }
    }
}

/// A FLUSH waiting for the local disk and for barrier acks.
pub struct PendingFlush {
    pub id: u64,
    /// The epoch its barrier closed.
    pub epoch: u64,
    pub local_pending: bool,
    pub local_failed: bool,
    pub peers_pending: Vec<u8>,
    pub done: Option<Completion>,
}

/// A resync in progress with one peer, as this node sees it.
#[derive(Debug, Clone)]
pub struct ResyncProgress {
    pub started: Instant,
    /// Observed against the bitmap's weight for the peer whenever status is read.
    pub progress: SyncProgress,
    pub full: bool,
}

pub struct Peer {
    pub node_id: u8,
    pub name: String,
    pub slot: usize,
    pub want_connect: bool,
    pub conn: ConnState,
    pub repl: ReplState,
    pub role: Role,
    pub disk: DiskState,
    /// Bumped per connection, so events from a dead connection's threads are ignored.
    pub generation: u64,
    pub link: Option<Arc<PeerLink>>,
    pub last_state: Option<PeerState>,
    pub tl: TransferLog,
    /// Barriers sent and not yet acked: (epoch, writes in it).
    pub barriers: VecDeque<(u64, u32)>,
    /// Writes received in the peer's open epoch (this node as the receiving side).
    pub rx_epoch_writes: u32,
    /// A sync decided at connect, waiting for the peer's bitmap.
    pub pending_sync: Option<SyncDecision>,
    pub resync: Option<ResyncProgress>,
    /// Online verify and checksum-based resync with this peer.
    pub sync: super::resync::PeerSync,
    pub sent_bytes_before: u64,
    pub received_bytes: u64,
    pub last_error: Option<String>,
}

impl Peer {
    pub fn is_replicating(&self) -> bool {
        self.link.is_some() && matches!(self.repl, ReplState::Established | ReplState::SyncSource)
    }
}

pub struct State {
    pub role: Role,
    pub disk: DiskState,
    pub meta: MetaStore,
    pub sb: Superblock,
    /// One per peer slot of the superblock.
    pub bitmaps: Vec<DirtyBitmap>,
    pub al: ActivityLog,
    /// Crashed while primary; cleared once a peer has been brought in sync with this node.
    pub crashed_primary: bool,
    pub inflight: InflightWrites,
    pub completions: HashMap<u64, Completion>,
    pub flushes: Vec<PendingFlush>,
    pub next_flush_id: u64,
    pub epoch: u64,
    pub peers: Vec<Peer>,
    pub nbd: Option<NbdHandle>,
    /// Block ranges being read for resync or verify: writes into them wait (see
    /// `engine::resync::read_range_then`).
    pub read_locks: Vec<(u64, u64)>,
    /// Bytes of application writes started on this node: the resync rate controller measures the
    /// application's write rate from it.
    pub app_write_bytes: u64,
    pub stopping: bool,
}

impl State {
    pub fn peer(&self, node_id: u8) -> &Peer {
        self.peers.iter().find(|p| p.node_id == node_id).expect("configured peer")
    }

    pub fn peer_mut(&mut self, node_id: u8) -> &mut Peer {
        self.peers.iter_mut().find(|p| p.node_id == node_id).expect("configured peer")
    }

    pub fn persist(&mut self) -> Result<(), MetaError> {
        self.meta.write_superblock(&self.sb)
    }

    pub fn generation(&self) -> Generation {
        Generation {
            current: self.sb.uuids.current,
            history: self.sb.uuids.history,
            bitmap: self.sb.peers.iter().map(|p| p.bitmap_uuid).collect(),
        }
    }

    pub fn set_generation(&mut self, g: Generation) {
        self.sb.uuids.current = g.current;
        self.sb.uuids.history = g.history;
        for (slot, uuid) in self.sb.peers.iter_mut().zip(g.bitmap) {
            slot.bitmap_uuid = uuid;
        }
    }

    /// Marks a range out of sync for a peer (in memory: the activity log covers it on disk).
    pub fn mark_out_of_sync(&mut self, slot: usize, offset: u64, len: u64) {
        self.bitmaps[slot].set_range(offset, len);
    }

    /// Makes an activity-log change durable, in the order crash recovery relies on: the bitmap
    /// pages of every evicted extent (they leave the log's protection), then the transaction.
    pub fn apply_al_update(&mut self, update: AlUpdate) -> Result<(), MetaError> {
        self.meta.write_al_update(&update, &self.bitmaps)?;
        self.al.commit(update);
        Ok(())
    }

    /// Writes one peer's whole bitmap.
    pub fn persist_bitmap(&mut self, slot: usize) -> Result<(), MetaError> {
        self.meta.write_bitmap(slot, &self.bitmaps[slot])
    }

    pub fn overlaps_busy(&self, offset: u64, len: u64) -> bool {
        self.inflight.overlaps(offset, len)
            || self.read_locks.iter().any(|&(o, l)| offset < o + l && o < offset + len)
    }

    /// This node's side of the connect-time decision with `peer`.
    pub fn uuid_view(&self, peer: &Peer) -> UuidView {
        UuidView {
            node_id: self.sb.node_id,
            current: self.sb.uuids.current,
            bitmap_for_peer: self.sb.peers[peer.slot].bitmap_uuid,
            history: self.sb.uuids.history,
            crashed_primary: self.crashed_primary,
            is_primary: self.role == Role::Primary,
            inconsistent: self.disk == DiskState::Inconsistent,
        }
    }

    /// What this node tells `peer` about itself.
    pub fn peer_state_for(&self, peer: &Peer) -> PeerState {
        PeerState {
            role: self.role.to_wire(),
            disk: self.disk.to_wire(),
            flags: if self.crashed_primary { STATE_FLAG_CRASHED_PRIMARY } else { 0 }
                | if peer.repl == ReplState::Ahead { STATE_FLAG_AHEAD } else { 0 },
            current_uuid: self.sb.uuids.current,
            bitmap_uuid: self.sb.peers[peer.slot].bitmap_uuid,
            history: self.sb.uuids.history,
            bitmap_weight: self.bitmaps[peer.slot].weight(),
        }
    }

    /// Sends the current state to every connected peer.
    pub fn broadcast_state(&self) {
        for peer in &self.peers {
            if let Some(link) = &peer.link {
                link.send_control(crate::wire::Message::State(self.peer_state_for(peer)));
            }
        }
    }

    /// Disk state at attach, from the metadata flags. "UpToDate" needs a peer's confirmation (or
    /// a promotion), so a node that restarts alone reports Consistent.
    pub fn disk_state_from_flags(flags: MetaFlags) -> DiskState {
        if flags.contains(MetaFlags::CONSISTENT) && flags.contains(MetaFlags::WAS_UP_TO_DATE) {
            DiskState::Consistent
        } else if flags.contains(MetaFlags::CONSISTENT) {
            DiskState::Outdated
        } else {
            DiskState::Inconsistent
        }
    }
}
