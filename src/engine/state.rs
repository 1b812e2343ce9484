//! What the engine knows, guarded by one mutex: roles, metadata, bitmaps, in-flight writes and
//! the peers. Methods here change state and say what to do; they never block on the network.

use super::link::PeerLink;
use super::write_path::HeldWrite;
use super::Shared;
use crate::core::generation::Generation;
use crate::core::inflight::InflightWrites;
use crate::core::quorum::{evaluate, AdmissionInputs, OnNoQuorum, QuorumPolicy, QuorumState, VoterView};
use crate::core::split_brain::SplitBrainPolicies;
use crate::core::states::{ConnState, DiskState, ReplState, Role};
use crate::core::sync_decision::{SyncDecision, UuidView};
use crate::core::sync_progress::SyncProgress;
use crate::core::transfer_log::TransferLog;
use crate::frontend::Export;
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
/// The sender is going down cleanly and marked itself Outdated: stop counting it for quorum.
pub const STATE_FLAG_LEAVING: u32 = 2;
/// The operator chose the sender as the victim of a split brain (`connect --discard-my-data`).
pub const STATE_FLAG_DISCARD_MY_DATA: u32 = 4;
/// The sender is Ahead of the receiver (pull-ahead): the receiver is Behind until it clears.
pub const STATE_FLAG_AHEAD: u32 = 8;

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

pub use crate::core::quorum::Admission;

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
    /// A diskless witness: it votes, never receives data, and its bitmap slot stays empty.
    pub witness: bool,
    /// Left cleanly (told us so before going down): not a quorum voter until it returns.
    pub departed: bool,
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
        !self.witness && self.link.is_some() && matches!(self.repl, ReplState::Established | ReplState::SyncSource)
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
    /// Blocks applied lately as a secondary (see `engine::recent`).
    pub recent: super::recent::RecentWrites,
    /// Crashed while primary; cleared once every data peer has been brought in sync with it.
    pub crashed_primary: bool,
    /// Data peers not yet resynced since the crash as primary.
    pub crash_repair_pending: Vec<u8>,
    pub inflight: InflightWrites,
    pub completions: HashMap<u64, Completion>,
    pub flushes: Vec<PendingFlush>,
    pub next_flush_id: u64,
    pub epoch: u64,
    pub peers: Vec<Peer>,
    /// The device as hosts see it (NBD server or /dev/ublkbN): while primary, or while failing
    /// every request after this node gave up a device left behind (see `left_behind`).
    pub export: Option<Export>,
    /// Set while the exported device fails every request: why.
    pub export_failing: Option<String>,
    /// A ublk device a daemon of this node left behind when it died as primary, with its I/O
    /// held by the kernel until this node may be primary again (device id, why not yet).
    pub left_behind: Option<(u32, String)>,
    /// Block ranges being read for resync or verify: writes into them wait (see
    /// `engine::resync::read_range_then`).
    pub read_locks: Vec<(u64, u64)>,
    /// Bytes of application writes started on this node: the resync rate controller measures the
    /// application's write rate from it.
    pub app_write_bytes: u64,
    pub stopping: bool,
    /// Quorum settings: here rather than in the immutable config because `adjust` changes them.
    pub quorum_policy: QuorumPolicy,
    pub on_no_quorum: OnNoQuorum,
    pub split_brain: SplitBrainPolicies,
    /// Set by `connect --discard-my-data` until a split brain has been resolved with this node
    /// as the victim.
    pub discard_my_data: bool,
    /// Write and flush completions held while this primary has no quorum (suspend-io): writes
    /// that were in flight when quorum went.
    pub suspended: Vec<(Completion, BlockResult)>,
    /// Writes that arrived while this primary had no quorum (suspend-io), not yet written
    /// anywhere, in arrival order.
    pub held_writes: Vec<HeldWrite>,
    /// Bitmap slots of data peers this primary lost: a new generation starts for them before
    /// the next write completes with quorum. Not before: a primary that lost quorum and is
    /// superseded must still hold the generation the new primary has in its history, so that it
    /// comes back as a plain sync target instead of a split brain.
    pub generation_pending: Vec<usize>,
    /// A step-down (see `Engine::step_down`) is on its way.
    pub stepping_down: bool,
    /// Why this node last stepped down by itself, until it is promoted again.
    pub stepped_down: Option<String>,
    /// This primary learned it was superseded and stays primary, disconnected
    /// (`on_suspended_primary_outdated = "disconnect"`): every write and flush fails until it
    /// is demoted, though it no longer sees the newer primary.
    pub superseded_latched: bool,
    /// The generation this primary left when it started a new one with quorum after losing a
    /// data peer (0: none). Voters still report it until they hear of the new one; they are
    /// counted meanwhile, or the rotation itself would cost quorum for a round trip (and fail
    /// writes under io-error). No other primary can hold it: it was this one's, with quorum.
    pub left_generation: u64,
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
    /// A witness's slot stays empty: it holds no data to be out of sync.
    pub fn mark_out_of_sync(&mut self, slot: usize, offset: u64, len: u64) {
        if !self.peers.iter().any(|p| p.slot == slot && p.witness) {
            self.bitmaps[slot].set_range(offset, len);
        }
    }

    /// Bitmap slots of the data peers that do not receive `sender`'s writes as far as this node
    /// can tell (not connected here, or not reporting `sender` as a primary they see): a
    /// secondary records the writes it applies for them, so it can resync them itself if the
    /// primary dies. Over-reporting only costs resync.
    pub fn slots_not_following(&self, sender: u8) -> Vec<usize> {
        self.peers
            .iter()
            .filter(|p| p.node_id != sender && !p.witness)
            .filter(|p| p.link.is_none() || p.last_state.is_none_or(|s| s.primaries & (1 << sender) == 0))
            .map(|p| p.slot)
            .collect()
    }

    /// Whether connecting in sync with `peer_id` proves this node's data is the newest: the
    /// peer is UpToDate, or every data peer is connected in sync with the same generation (so
    /// no node anywhere can hold newer data). Two fresh nodes prove nothing.
    pub fn confirmed_up_to_date_by(&self, peer_id: u8) -> bool {
        let good = |d: DiskState| matches!(d, DiskState::Consistent | DiskState::Outdated);
        // Known to differ (online verify): equal generations prove nothing; a resync must run.
        if !good(self.disk) || self.sb.flags.contains(MetaFlags::VERIFY_DIFFERS) {
            return false;
        }
        let peer = self.peer(peer_id);
        if peer.disk == DiskState::UpToDate {
            return true;
        }
        let fresh = crate::core::sync_decision::same_uuid(self.sb.uuids.current, crate::core::sync_decision::UUID_JUST_CREATED);
        !fresh
            && self.peers.iter().filter(|p| !p.witness).all(|p| {
                p.repl == ReplState::Established
                    && good(p.disk)
                    && p.last_state.is_some_and(|s| crate::core::sync_decision::same_uuid(s.current_uuid, self.sb.uuids.current))
            })
    }

    /// A data peer stopped following the primary (its link here or to the primary is gone):
    /// what this node applied lately may have missed it too. If this node tracked nothing for
    /// it yet, it starts tracking from the generation the peer last reported, so their next
    /// connect finds a bitmap resync (not a full sync) even if this node followed the
    /// primary's new generation before it noticed the peer was gone.
    pub fn mark_recent_for(&mut self, peer_id: u8, peer_generation: Option<u64>) -> Result<(), MetaError> {
        let peer = self.peer(peer_id);
        if self.role == Role::Primary || peer.witness {
            return Ok(());
        }
        let slot = peer.slot;
        self.recent.mark_into(&mut self.bitmaps[slot]);
        match peer_generation {
            Some(uuid) if self.sb.peers[slot].bitmap_uuid == 0 => {
                self.sb.peers[slot].bitmap_uuid = uuid & !1;
                self.persist()
            }
            _ => Ok(()),
        }
    }

    /// The nodes this node sees as primary, itself included (see `PeerState::primaries`).
    pub fn primaries(&self) -> u32 {
        let me = u32::from(self.role == Role::Primary) << self.sb.node_id;
        self.peers.iter().filter(|p| p.link.is_some() && p.role == Role::Primary).fold(me, |mask, p| mask | 1 << p.node_id)
    }

    /// Counts the votes now. A peer counts once its state is known; for a primary, only while
    /// the peer's lease holds (see `LinkTiming::lease`).
    pub fn quorum(&self) -> QuorumState {
        self.quorum_with_leases(true)
    }

    /// [`State::quorum`], choosing whether leases count (they always do, but a promotion waits
    /// for the first ping of a peer that connected a moment ago: see `Engine::promote`).
    pub fn quorum_with_leases(&self, leases: bool) -> QuorumState {
        let now = Instant::now();
        let views: Vec<VoterView> = self
            .peers
            .iter()
            .map(|p| VoterView {
                node_id: p.node_id,
                reachable: p.link.as_ref().is_some_and(|l| !leases || l.lease_holds(now)) && self.votes_for_me(p),
                departed: p.departed,
                sees_primary: p.last_state.filter(|_| p.link.is_some()).map_or(0, |s| s.primaries),
            })
            .collect();
        evaluate(self.quorum_policy, self.sb.node_id, &views)
    }

    /// Whether `peer`'s vote counts for this node, judged by the generation it holds (a
    /// witness: the newest primary generation it has seen). A primary needs voters that know its
    /// current generation (or receive its writes as resync targets); a candidate needs voters
    /// that know no generation newer than its own. Otherwise a secondary left behind could form
    /// a majority with a witness once the primary is gone, and promote without the writes
    /// acknowledged meanwhile.
    fn votes_for_me(&self, peer: &Peer) -> bool {
        let Some(state) = peer.last_state else { return false };
        let same = |uuid: u64| crate::core::sync_decision::same_uuid(state.current_uuid, uuid);
        if self.role == Role::Primary {
            return same(self.sb.uuids.current)
                || (self.left_generation != 0 && same(self.left_generation))
                || peer.repl == ReplState::SyncSource;
        }
        let knows_nothing = peer.witness && same(crate::core::sync_decision::UUID_JUST_CREATED);
        knows_nothing || self.knows_generation(state.current_uuid)
    }

    /// Whether `uuid` is this node's generation or one it has moved past (its history, or where
    /// one of its bitmaps starts): not newer than its data.
    pub fn knows_generation(&self, uuid: u64) -> bool {
        let same = |u: u64| u != 0 && crate::core::sync_decision::same_uuid(u, uuid);
        same(self.sb.uuids.current) || self.sb.uuids.history.iter().chain(self.sb.peers.iter().map(|p| &p.bitmap_uuid)).any(|u| same(*u))
    }

    /// Whether a connected node reports another primary and holds a generation this node does
    /// not know, i.e. one started after this node's: evidence that another node was promoted
    /// past this one. A stale primary seen next to this one (directly, with a generation this
    /// node left behind, or through a node that follows this node's generation) is no such
    /// evidence: a primary whose lease lapsed for a moment must not give up for it.
    fn newer_primary_seen(&self) -> bool {
        let me = 1u32 << self.sb.node_id;
        self.peers.iter().filter(|p| p.link.is_some()).filter_map(|p| p.last_state).any(|s| s.primaries & !me != 0 && !self.knows_generation(s.current_uuid))
    }

    /// The inputs of `core::quorum::admission` as this node sees them now. The peers'
    /// generations are only looked at when they matter (no quorum, another primary seen): not
    /// on every write.
    fn admission_inputs(&self) -> AdmissionInputs {
        let quorum = self.quorum();
        AdmissionInputs {
            policy: self.quorum_policy,
            on_no_quorum: self.on_no_quorum,
            quorum,
            newer_primary_seen: !quorum.has_quorum && quorum.other_primary.is_some() && self.newer_primary_seen(),
            superseded_latched: self.superseded_latched,
        }
    }

    /// What quorum lets this node do with writes now (see `core::quorum::admission`); a
    /// secondary's writes are refused earlier, by role.
    pub fn admission(&self) -> Admission {
        if self.role != Role::Primary || self.quorum_policy == QuorumPolicy::Off {
            return Admission::Proceed;
        }
        crate::core::quorum::admission(&self.admission_inputs())
    }

    /// Completes a write or flush, unless this primary may not (see [`State::admission`]): then
    /// the completion is held or fails. An acknowledged write must be on the side that keeps
    /// quorum, the only side that may promote, and under a generation the lost peers lack.
    pub fn finish_write(&mut self, done: Completion, result: BlockResult, deferred: &mut Deferred) {
        match self.admission() {
            Admission::Proceed => {
                let result = result.and_then(|r| self.start_pending_generation().map(|()| r));
                deferred.push(done, result);
            }
            Admission::Hold => {
                if self.suspended.is_empty() {
                    tracing::warn!(quorum = ?self.quorum(), "no quorum, or an old primary still seen: holding write completions");
                }
                self.suspended.push((done, result));
            }
            Admission::Refuse => deferred.push(done, Err(crate::frontend::BlockError::Io)),
        }
    }

    /// Starts the new generation owed to the data peers lost since the last one (see
    /// `generation_pending`), persisted before any write under it completes.
    fn start_pending_generation(&mut self) -> Result<(), crate::frontend::BlockError> {
        if self.generation_pending.is_empty() || self.role != Role::Primary {
            return Ok(());
        }
        let slots = std::mem::take(&mut self.generation_pending);
        self.left_generation = self.sb.uuids.current;
        let mut generation = self.generation();
        generation.new_current(super::random_u64(), true, true, &slots);
        self.set_generation(generation);
        if let Err(e) = self.persist() {
            tracing::error!(error = %e, "cannot persist the new generation; failing writes");
            self.disk = DiskState::Failed;
            return Err(crate::frontend::BlockError::Io);
        }
        tracing::info!(uuid = format_args!("{:016X}", self.sb.uuids.current), "new generation: writing without a lost peer");
        // The secondaries still connected follow the new generation.
        self.broadcast_state();
        Ok(())
    }

    /// Another node was promoted while this primary had no quorum (a connected node reports
    /// it, with a generation newer than this node's): the writes it holds can never be
    /// acknowledged (the new primary does not have them), and it steps down.
    pub fn superseded(&self) -> bool {
        self.role == Role::Primary
            && self.quorum_policy != QuorumPolicy::Off
            && crate::core::quorum::superseded(&self.admission_inputs())
    }

    /// Releases held completions and writes once this primary may complete writes again, or
    /// fails them when `fail` (demotion) or when another primary took over.
    pub fn release_suspended(&mut self, fail: bool, deferred: &mut Deferred) {
        if self.suspended.is_empty() && self.held_writes.is_empty() {
            return;
        }
        let fail = fail || self.role != Role::Primary || self.superseded();
        if !fail && self.admission() != Admission::Proceed {
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
            flags: self.state_flags() | if peer.repl == ReplState::Ahead { STATE_FLAG_AHEAD } else { 0 },
            current_uuid: self.sb.uuids.current,
            bitmap_uuid: self.sb.peers[peer.slot].bitmap_uuid,
            history: self.sb.uuids.history,
            bitmap_weight: self.bitmaps[peer.slot].weight(),
            primaries: self.primaries(),
        }
    }

    fn state_flags(&self) -> u32 {
        let mut flags = 0;
        if self.crashed_primary {
            flags |= STATE_FLAG_CRASHED_PRIMARY;
        }
        if self.stopping {
            flags |= STATE_FLAG_LEAVING;
        }
        if self.discard_my_data {
            flags |= STATE_FLAG_DISCARD_MY_DATA;
        }
        flags
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
