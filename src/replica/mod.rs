//! The replica: what one node knows about one resource, and the replication rules that change
//! it. No I/O, no threads, no clock and no randomness in here: time comes in as a value, what
//! must be sent goes out as [`Action`]s that the driver (`crate::engine`) carries out once the
//! replica is no longer borrowed. The pure decisions of [`crate::core`] are called from here.
//!
//! The rules move here from the engine step by step (see docs/DESIGN.md, "The replica"); what is
//! here is the single home of those rules: quorum and leases, the generations a vote is judged
//! by, which frames a peer may send in which state, and when a peer that stops making progress
//! is dropped.

mod action;
mod admin;
mod apply;
mod compare;
mod connect;
mod declaration;
mod disk_failure;
mod election;
mod fencing;
pub mod frames;
mod left_behind;
mod loss;
mod operator;
mod pacing;
mod progress;
pub mod peer;
mod receive;
mod recent;
mod resync;
mod roles;
mod send_queue;
/// Replicas built as a node attaching would, for the unit tests, the dispatch fuzz target and
/// the replica's benchmark.
pub mod testing;
mod uuids;
mod verify;
mod votes;
pub mod weakened;
mod writes;

pub use action::{Action, IoTag, Lane, LocalIo, MetaWrite, RequestId};
pub use apply::{Applying, STREAM_BACKLOG_BYTES};
pub use peer::{Lease, Peer, PeerSync, ResyncProgress, VerifyRun, VerifyState, MAX_REPORTED_RANGES};
pub use recent::RecentWrites;
pub use resync::{ResyncChunk, ResyncStep, ResyncWalk};
pub use election::PromoteStep;
pub use disk_failure::DETACHED;
pub use fencing::FenceOutcome;
pub use roles::{PromoteRefusal, Promotion};
pub use verify::VerifyStep;
pub use writes::{PendingFlush, Pieces, QueuedWrite, WriteKind};

use crate::config::{Fencing, OnSuperseded, Protocol};
use crate::core::generation::Generation;
use crate::core::inflight::InflightWrites;
use crate::core::quorum::{LinkTiming, OnNoQuorum, QuorumPolicy};
use crate::core::resync_rate::RateLimits;
use crate::core::split_brain::SplitBrainPolicies;
use crate::core::states::{ConnState, DiskState, ReplState, Role};
use crate::core::sync_decision::{same_uuid, UuidView, UUID_JUST_CREATED};
use crate::meta::activity_log::{extent_offset, AlUpdate, AL_EXTENT_SIZE};
use crate::meta::{ActivityLog, DirtyBitmap, MetaFlags, Superblock};
use crate::core::inflight::LocalFailure;
use crate::frontend::{BlockError, BlockResult};
use crate::wire::{DataPosition, Message, PeerState};
use std::collections::{HashMap, VecDeque};
use std::time::Instant;
use uuids::UuidSource;
use weakened::{is_weakened, Rule};

/// Why a node that is going down takes no link.
pub const GOING_DOWN: &str = "node is going down";
/// Why a StandAlone node takes no link (expected, so logged quietly by the refusing side).
pub const STAND_ALONE: &str = "node is StandAlone (disconnected; `blkrepl connect` reconnects it)";

/// State flag bits carried in `PeerState::flags`.
pub const STATE_FLAG_CRASHED_PRIMARY: u32 = 1;
/// The sender is going down cleanly and marked itself Outdated: stop counting it for quorum.
pub const STATE_FLAG_LEAVING: u32 = 2;
/// The operator chose the sender as the victim of a split brain (`connect --discard-my-data`).
pub const STATE_FLAG_DISCARD_MY_DATA: u32 = 4;
/// The sender is Ahead of the receiver (pull-ahead): the receiver is Behind until it clears.
pub const STATE_FLAG_AHEAD: u32 = 8;
/// The sender resyncs a node other than the receiver, or is about to: it takes no resync
/// into itself meanwhile (what it reads for its target must not change under the walk).
pub const STATE_FLAG_RESYNCS_OTHER: u32 = 16;
/// The sender is a secondary, UpToDate and in sync with every primary it sees (at least one):
/// it holds that primary's data or receives it in order (see `Replica::only_primary_resyncs`).
pub const STATE_FLAG_FOLLOWING: u32 = 32;
/// The sender may have lost writes in its activity log's extents with its disk's cache (see
/// `MetaFlags::CACHE_LOST`): it is the target of a resync of them.
pub const STATE_FLAG_CACHE_LOST: u32 = 64;
/// The sender is stepping down from primary: its last writes and flush are under way, and it
/// takes no resync into itself until they are done (see `Replica::demoting`).
pub const STATE_FLAG_DEMOTING: u32 = 128;
/// A node connected to the sender is being demoted (its State carries `STATE_FLAG_DEMOTING`):
/// that primary's last writes may still reach the sender, so no third node resyncs it until
/// the demotion is over (see `Replica::reconsider`).
pub const STATE_FLAG_BESIDE_DEMOTION: u32 = 256;
/// The sender lost its disk's cache and a data peer is still to resync it (its
/// `cache_repair_pending` is not empty, whichever the peer): no better source for an
/// Inconsistent node than the receiver, which must not wait for it (see `Replica::reconsider`;
/// seed 26872: two such nodes each waited for the other to resync the third).
pub const STATE_FLAG_REPAIR_PENDING: u32 = 512;
/// The sender was declared in sync with fresh peers (`new-current-uuid --clear-bitmap`, on it
/// or on another node) that have not taken the declared generation yet: a fresh peer in sync
/// with it takes that generation from its State (see `replica/declaration.rs`).
pub const STATE_FLAG_DECLARED: u32 = 1024;

/// The byte range of an activity-log extent, clipped to the device.
pub fn extent_range(extent: u64, data_size_bytes: u64) -> (u64, u64) {
    let offset = extent_offset(extent);
    (offset, AL_EXTENT_SIZE.min(data_size_bytes.saturating_sub(offset)))
}

pub struct Replica {
    /// The resource's name, for the log.
    pub resource: String,
    /// Whether this node is a diskless witness (it votes, holds no data).
    pub witness: bool,
    pub timing: LinkTiming,
    pub protocol: Protocol,
    /// Pull-ahead's fill mark (`on_congestion = "pull-ahead"`): a peer whose send queue holds
    /// more is left behind.
    pub congestion_fill: Option<u64>,
    pub role: Role,
    pub disk: DiskState,
    pub sb: Superblock,
    /// One per peer slot of the superblock.
    pub bitmaps: Vec<DirtyBitmap>,
    pub al: ActivityLog,
    /// Blocks applied lately as a secondary (see [`RecentWrites`]).
    pub recent: RecentWrites,
    /// Crashed while primary; cleared once every data peer has been brought in sync with it.
    pub crashed_primary: bool,
    /// Data peers not yet resynced since the crash as primary.
    pub crash_repair_pending: Vec<u8>,
    /// The generation and the data's term a device left behind by the previous daemon served,
    /// while it waits to serve again (see `replica/left_behind.rs`).
    left_behind: Option<(u64, u64)>,
    pub inflight: InflightWrites,
    /// The frontend request of each write in flight (by its id in `inflight`).
    write_requests: HashMap<u64, RequestId>,
    /// Requests split into several writes (see [`Pieces`]).
    pieces: HashMap<RequestId, Pieces>,
    /// New writes waiting for room in a peer's send queue, in arrival order (see
    /// `replica/send_queue.rs`).
    awaiting_room: VecDeque<QueuedWrite>,
    /// A replicating peer's send queue holds at most this many bytes of data before new
    /// writes wait (protocol A's send buffer).
    pub send_queue_bytes: usize,
    /// Admitted writes not started yet, in arrival order (see `Replica::start_waiting`).
    waiting: VecDeque<QueuedWrite>,
    /// The activity-log transaction being written (see [`Action::WriteLog`]).
    log_in_flight: Option<AlUpdate>,
    /// Writes that arrived while this primary had no quorum (suspend-io), not yet written
    /// anywhere, in arrival order.
    held: VecDeque<QueuedWrite>,
    /// Reads held without quorum (`offset`, `len`): the data here may be older than what a
    /// primary promoted meanwhile acknowledged.
    held_reads: Vec<(RequestId, u64, u32)>,
    /// Write and flush completions held while this primary has no quorum (suspend-io).
    suspended: Vec<(RequestId, BlockResult)>,
    pub flushes: Vec<PendingFlush>,
    pub next_flush_id: u64,
    pub epoch: u64,
    /// The open epoch, and when it was first seen holding writes or resync frames (see
    /// `Replica::close_an_old_epoch`).
    epoch_open_since: Option<(u64, Instant)>,
    pub peers: Vec<Peer>,
    /// Block ranges being read for resync or verify: writes into them wait (see
    /// `engine::resync::read_range_then`).
    pub read_locks: Vec<(u64, u64)>,
    /// Bytes of application writes started on this node: the resync rate controller measures the
    /// application's write rate from it.
    app_write_bytes: u64,
    /// The bounds of a resync's or verify's rate (see `pacing.rs`).
    resync_rate: RateLimits,
    /// When this replica attached: the origin of the rate controller's clock.
    attached_at: Instant,
    pub stopping: bool,
    /// Quorum settings: here rather than in the immutable config because `adjust` changes them.
    pub quorum_policy: QuorumPolicy,
    pub on_no_quorum: OnNoQuorum,
    pub split_brain: SplitBrainPolicies,
    /// Set by `connect --discard-my-data` until a split brain has been resolved with this node
    /// as the victim.
    pub discard_my_data: bool,
    /// Bitmap slots of data peers this primary lost: a new generation starts for them before
    /// the next write completes with quorum. Not before: a primary that lost quorum and is
    /// superseded must still hold the generation the new primary has in its history, so that it
    /// comes back as a plain sync target instead of a split brain. Kept while a demotion is
    /// under way (a demoting node starts no generation: what it still completes fails instead,
    /// see `Replica::finish_request`), dropped when it ends.
    pub generation_pending: Vec<usize>,
    /// Why this node last stepped down by itself, until it is promoted again.
    pub stepped_down: Option<String>,
    /// Why this primary fails every request: a local write or flush failed, or a metadata write
    /// detached the disk (see `disk_failure.rs`). Until its demotion ends.
    pub io_failed: Option<String>,
    /// A flush of the data disk failed while this node was primary: no later flush vouches for
    /// what the failed one lost (Linux reports a writeback error to one fsync; the next one
    /// succeeds with the pages gone), so every FLUSH fails until the demotion ends.
    cache_lost: bool,
    /// A demotion is under way: the peers that received this node's stream as primary, whose
    /// ack of the final flush's barrier says they know it is no longer primary (see
    /// `Replica::begin_demotion`).
    demotion_stream: Vec<u8>,
    /// Between `begin_demotion` and `finish_demotion`: writes of its time as primary may still
    /// land on the disk, so no resync writes into it yet (a resync begun then, and a power
    /// loss before the demotion ended, left the node's crash marker on the generation the
    /// resync gave it: it became the source of blocks it lacked; seed 3969).
    demoting: bool,
    /// This node's request for votes to be promoted (see `replica/election.rs`).
    pub candidacy: Option<election::Candidacy>,
    /// The vote this node gave last (see `replica/election.rs`).
    pub vote_given: Option<election::VoteGiven>,
    /// When this node, elected primary, asked for the votes it won, and who gave them: they
    /// count like ping answers for a lease from the request (see `Replica::quorum`).
    pub elected: Option<(Instant, u32)>,
    /// The data peers this node declared in sync, or that were connected when another node
    /// declared this one in sync with them (see `replica/declaration.rs`): while one of them
    /// still reports a fresh disk, no decision is taken with it; it leaves the set when its
    /// link goes or its State moves on.
    pub declared_with: u32,
    /// The source of the resync into this node that started last, until one ends: should it
    /// be cut off, its slot holds the bits it had left (see
    /// `Replica::take_over_interrupted_resyncs`). Unknown after a restart.
    pub resynced_from: Option<u8>,
    /// Data peers not yet resynced into this node since it lost its disk's cache (see
    /// `MetaFlags::CACHE_LOST`).
    pub cache_repair_pending: Vec<u8>,
    /// This primary learned it was superseded and stays primary, disconnected
    /// (`on_suspended_primary_outdated = "disconnect"`): every write and flush fails until it
    /// is demoted, though it no longer sees the newer primary.
    pub superseded_latched: bool,
    /// Diverged copies (a split brain, or under quorum the copy of an earlier election)
    /// this node reconciled as the side whose changes were discarded, since it started (each
    /// counts once, on its victim).
    pub divergences_resolved: u64,
    /// Resyncs this node started as target since it started: by bitmap, full, and full into a
    /// disk that never held data (its first sync, which no bitmap could replace).
    pub resyncs_taken: [u64; 3],
    /// The generation this primary left when it started a new one with quorum after losing a
    /// data peer (0: none). Voters still report it until they hear of the new one; they are
    /// counted meanwhile, or the rotation itself would cost quorum for a round trip (and fail
    /// writes under io-error). No other primary can hold it: it was this one's, with quorum.
    pub left_generation: u64,
    /// What this primary does when it loses a data peer (see `replica/fencing.rs`).
    pub fencing: Fencing,
    /// What this primary does once superseded (see [`Replica::superseded_action`]).
    on_superseded: OnSuperseded,
    /// Fence-peer runs asked for and not answered yet, and handlers that failed (see
    /// `replica/fencing.rs`).
    fences: Vec<fencing::Fence>,
    uuids: UuidSource,
    /// What the driver is to do next, in order (see [`Replica::take_actions`]).
    outbox: Vec<Action>,
    /// The lagging peers (see [`Replica::lagging_peers`]) the last State this node sent said.
    lagging_reported: u32,
}

/// What a replica starts from: the node's metadata as loaded (and repaired after a crash).
pub struct Attached {
    pub resource: String,
    pub witness: bool,
    pub timing: LinkTiming,
    pub protocol: Protocol,
    pub congestion_fill: Option<u64>,
    pub send_queue_bytes: usize,
    pub resync_rate: RateLimits,
    pub sb: Superblock,
    pub bitmaps: Vec<DirtyBitmap>,
    pub al: ActivityLog,
    /// The metadata says this node crashed as primary: every data peer is resynced before the
    /// crash marker clears.
    pub crashed_primary: bool,
    /// The kernel still holds a device the previous daemon served, not failing (found before
    /// any link is up). If that daemon died as primary, the device may serve again, only on the
    /// data it served (see `replica/left_behind.rs`); otherwise it is given up at once.
    pub left_behind_device: bool,
    pub peers: Vec<Peer>,
    pub quorum_policy: QuorumPolicy,
    pub on_no_quorum: OnNoQuorum,
    pub split_brain: SplitBrainPolicies,
    pub fencing: Fencing,
    pub on_superseded: OnSuperseded,
    pub now: Instant,
    /// Where generation UUIDs come from (see [`UuidSource`]).
    pub uuid_seed: u64,
    /// The machine's boot id now (zero: unknown). The same as the metadata's after an unclean
    /// stop means only the process died: what the disk completed is still in its cache.
    pub boot_id: [u8; 16],
}

impl Replica {
    /// A replica as the node attaches: Secondary, its disk state from the metadata flags. After
    /// a crash as primary, writes in the activity log's hot extents may have reached only this
    /// disk, or only the peers: every hot extent is out of sync with every data peer until a
    /// resync says otherwise, and the log is emptied (its transaction queued behind the bitmap
    /// pages of the extents it evicts). PRIMARY_IND stays set until the resync, so a second
    /// crash does not forget it.
    ///
    /// After a crash as secondary, the hot extents hold the writes whose marks may have been
    /// lost with its memory (see `Replica::note_in_activity_log`): those for the peers it
    /// tracked, and the recent writes it would have marked for every other data peer had it
    /// lived to see the primary go (see `Replica::primary_lost`). They are marked again for
    /// every data peer: a secondary killed between applying the primary's last write and
    /// noticing the primary's end held a write the promoted peer never got, and nothing
    /// resynced it (seed 12660). If the machine restarted too, the disk's cache may have
    /// dropped writes there: this node is resynced in them from every data peer.
    pub fn attach(a: Attached) -> Replica {
        let boot_id = a.boot_id;
        let cache_survived = boot_id != [0; 16] && boot_id == a.sb.boot_id;
        let mut replica = Replica::attached(a);
        if replica.sb.boot_id != boot_id {
            replica.sb.boot_id = boot_id;
            replica.persist(MetaWrite::Superblock);
        }
        let hot = replica.al.hot_extents();
        if replica.crashed_primary {
            tracing::warn!(resource = %replica.resource, extents = hot.len(), "crashed while primary: marking the activity log's extents out of sync");
            let slots: Vec<usize> = replica.peers.iter().map(|p| p.slot).collect();
            replica.mark_extents_and_empty_log(&hot, &slots);
            replica.position_after_crash(cache_survived);
        } else if !hot.is_empty() && cache_survived {
            let data: Vec<usize> = replica.peers.iter().filter(|p| !p.witness).map(|p| p.slot).collect();
            tracing::info!(resource = %replica.resource, extents = hot.len(), peers = data.len(),
                "stopped without a clean shutdown (the machine did not restart): marking the activity log's extents for every data peer");
            replica.mark_extents_and_empty_log(&hot, &data);
        } else if !hot.is_empty() {
            // Writes in these extents may have been lost with the disk's cache: this node is
            // resynced there from every data peer (and remembers it, so a second crash before
            // that does not turn its stale copy into a source).
            let data: Vec<usize> = replica.peers.iter().filter(|p| !p.witness).map(|p| p.slot).collect();
            tracing::info!(resource = %replica.resource, extents = hot.len(), "stopped without a clean shutdown and the machine restarted: this node's activity-log extents are resynced from its peers");
            replica.mark_extents_and_empty_log(&hot, &data);
            replica.sb.flags.insert(MetaFlags::CACHE_LOST);
            replica.persist(MetaWrite::Superblock);
        }
        if replica.sb.flags.contains(MetaFlags::CACHE_LOST) {
            replica.cache_repair_pending = replica.peers.iter().filter(|p| !p.witness).map(|p| p.node_id).collect();
        }
        replica
    }

    /// A primary records its data position at its promotion only (where its term's stream
    /// begins), its followers theirs at every barrier. Its process killed with the machine up,
    /// it holds every write of its own stream (the page cache kept them: `MetaFlags::OWN_STREAM`
    /// says nothing took part of it since), so its position is the end of that stream: further
    /// than any follower's, it is the source of the crash repair and wins their votes. Recorded
    /// at its term's beginning, followers further on became its source and took back writes
    /// only it held, and the repair's end set a follower's position back to that beginning, so a
    /// node that had missed the last writes became the source of one that held them (seeds
    /// 99790, 215705). After a power loss the writes it had not flushed may be gone: the
    /// position goes back to where the term began.
    fn position_after_crash(&mut self, cache_survived: bool) {
        let whole = cache_survived && self.sb.flags.contains(MetaFlags::OWN_STREAM);
        let term = self.sb.terms.of_data;
        if whole {
            self.set_data_position(DataPosition { term, epoch: u64::MAX, fua: u64::MAX });
        } else {
            self.sb.flags.remove(MetaFlags::OWN_STREAM);
            if self.sb.terms.epoch_of_data == u64::MAX {
                self.set_data_position(DataPosition { term, ..DataPosition::default() });
            }
        }
        self.persist(MetaWrite::Superblock);
    }

    /// Marks `extents` out of sync in the bitmaps of `slots`, then empties the activity log (its
    /// transaction queued behind the bitmap pages of the extents it evicts).
    fn mark_extents_and_empty_log(&mut self, extents: &[u64], slots: &[usize]) {
        for &extent in extents {
            let (offset, len) = extent_range(extent, self.sb.data_size);
            for &slot in slots {
                self.mark_out_of_sync(slot, offset, len);
            }
        }
        match self.al.mark_clean() {
            Ok(clean) => self.commit_al(clean),
            // Nothing is in flight at attach: only metadata this software did not write (its
            // log's sequence numbers exhausted) gets here, and it cannot be written again.
            Err(e) => self.detach(format!("the activity log cannot be written: {e}")),
        }
    }

    fn attached(a: Attached) -> Replica {
        let window = RecentWrites::window_for(&a.timing);
        let recent = RecentWrites::new(a.sb.data_size, a.sb.params.bitmap_block_size, window, a.now);
        let crash_repair_pending = if a.crashed_primary { a.peers.iter().filter(|p| !p.witness).map(|p| p.node_id).collect() } else { Vec::new() };
        // A daemon that was not primary any more served nothing through it: its users' view
        // is already gone (it failed, or was stopped with the role).
        let left_behind = (a.left_behind_device && a.crashed_primary).then_some((a.sb.uuids.current, a.sb.terms.of_data));
        Replica {
            resource: a.resource,
            witness: a.witness,
            timing: a.timing,
            protocol: a.protocol,
            congestion_fill: a.congestion_fill,
            role: Role::Secondary,
            disk: if a.witness { DiskState::Diskless } else { Replica::disk_state_from_flags(a.sb.flags) },
            recent,
            sb: a.sb,
            bitmaps: a.bitmaps,
            al: a.al,
            crashed_primary: a.crashed_primary,
            crash_repair_pending,
            left_behind,
            inflight: InflightWrites::new(),
            write_requests: HashMap::new(),
            pieces: HashMap::new(),
            awaiting_room: VecDeque::new(),
            send_queue_bytes: a.send_queue_bytes,
            waiting: VecDeque::new(),
            log_in_flight: None,
            held: VecDeque::new(),
            held_reads: Vec::new(),
            suspended: Vec::new(),
            flushes: Vec::new(),
            next_flush_id: 0,
            epoch: 1,
            epoch_open_since: None,
            peers: a.peers,
            read_locks: Vec::new(),
            app_write_bytes: 0,
            resync_rate: a.resync_rate,
            attached_at: a.now,
            stopping: false,
            quorum_policy: a.quorum_policy,
            on_no_quorum: a.on_no_quorum,
            split_brain: a.split_brain,
            discard_my_data: false,
            generation_pending: Vec::new(),
            stepped_down: None,
            io_failed: None,
            cache_lost: false,
            demotion_stream: Vec::new(),
            demoting: false,
            candidacy: None,
            vote_given: None,
            elected: None,
            declared_with: 0,
            resynced_from: None,
            cache_repair_pending: Vec::new(),
            superseded_latched: false,
            divergences_resolved: 0,
            resyncs_taken: [0; 3],
            left_generation: 0,
            fencing: a.fencing,
            on_superseded: a.on_superseded,
            fences: Vec::new(),
            uuids: UuidSource::new(a.uuid_seed),
            outbox: Vec::new(),
            lagging_reported: 0,
        }
    }

    /// The actions pushed since the last call, in order. A primary whose set of lagging peers
    /// changed while it handled the events says so first (see [`Replica::lagging_peers`]):
    /// every path that changes the set is covered, whatever event it took.
    pub fn take_actions(&mut self) -> Vec<Action> {
        let lagging = self.lagging_peers();
        if lagging != self.lagging_reported {
            self.lagging_reported = lagging;
            self.broadcast_state();
        }
        self.seal_log();
        let actions = std::mem::take(&mut self.outbox);
        // What goes to a link's queue counts there until the driver's next figures: a write
        // waiting for room, judged on the figures from before these frames (a link lost, say),
        // would find room they take (see `Replica::tick`).
        for action in &actions {
            if let Action::Send { peer, msg, lane: Lane::Bulk, .. } = action {
                let peer = self.peer_mut(*peer);
                if peer.connected {
                    peer.queued_bytes += msg.payload_len();
                }
            }
        }
        actions
    }

    /// Puts actions back at the front of the queue (a driver that could not carry them out yet).
    pub fn requeue(&mut self, mut actions: Vec<Action>) {
        actions.append(&mut self.outbox);
        self.outbox = actions;
    }

    /// Queues actions behind those already queued.
    fn requeue_after(&mut self, mut actions: Vec<Action>) {
        self.outbox.append(&mut actions);
    }

    /// Queues a metadata write: durable before anything queued after it is carried out. A
    /// Failed disk is written no more (see `Replica::detach`): its metadata stays as the last
    /// write that succeeded left it, which the next attach recovers as after a crash.
    pub fn persist(&mut self, what: MetaWrite) {
        if self.detached() {
            tracing::debug!(resource = %self.resource, ?what, "not written: the disk is Failed");
            return;
        }
        self.outbox.push(Action::Persist(what));
    }

    /// Commits an activity-log transaction in memory and queues it. One that evicts extents
    /// flushes the data disk first: after a crash only the logged extents are repaired, so what
    /// this node wrote into an extent must be durable before the log stops naming it (a write
    /// completed into the disk's cache, its extent evicted, then a power loss: the copies
    /// differed there and no resync knew it).
    fn commit_al(&mut self, update: AlUpdate) {
        self.al.commit(update.clone());
        if !update.evicted.is_empty() && !self.secondary_skips_flushes() {
            self.persist(MetaWrite::DataFlush);
        }
        self.persist(MetaWrite::ActivityLog(update));
    }

    /// The weakened rule [`Rule::SecondaryWithoutFlush`], on a secondary.
    fn secondary_skips_flushes(&self) -> bool {
        self.role != Role::Primary && is_weakened(Rule::SecondaryWithoutFlush)
    }

    /// A metadata write failed: this node detaches from its disk (see `Replica::detach`). Of
    /// `rest`, the actions queued behind the write, and of those queued since it was taken
    /// (carrying out earlier ones fed the replica): metadata writes, frames and resyncs are
    /// dropped (they may announce what never became durable, and the links go), local I/O
    /// fails without being submitted (a write into an extent whose activity-log transaction
    /// failed must not reach the disk), and requests completed behind it fail (a write's new
    /// generation may not be durable).
    pub fn persist_failed(&mut self, now: Instant, what: MetaWrite, error: &str, rest: Vec<Action>) {
        let mut kept = Vec::new();
        let mut failed_io = Vec::new();
        let since = std::mem::take(&mut self.outbox);
        for action in rest.into_iter().chain(since) {
            match action {
                Action::Send { .. } | Action::Persist(_) | Action::StartResync { .. } => {}
                // Never written: the writes waiting for it fail with the disk.
                Action::WriteLog { .. } => self.log_in_flight = None,
                Action::Io { tag, .. } => failed_io.push(tag),
                Action::Complete { request, result: Ok(_) } => kept.push(Action::Complete { request, result: Err(BlockError::Io) }),
                other => kept.push(other),
            }
        }
        self.requeue(kept);
        self.detach(format!("a metadata write ({}) failed: {error}", what.name()));
        for tag in failed_io {
            self.io_done(now, tag, Err(LocalFailure::Io));
        }
    }

    /// Queues a control frame (acks, state, pings) for `peer`, dropped if it is not connected.
    pub fn send(&mut self, peer: u8, msg: Message) {
        self.push_send(peer, msg, Lane::Control, None);
    }

    /// Queues a bulk frame for `peer` behind the bulk frames queued before it.
    pub fn send_bulk(&mut self, peer: u8, msg: Message, sent_write: Option<u64>) {
        self.push_send(peer, msg, Lane::Bulk, sent_write);
    }

    /// A node whose disk is Failed sends nothing (its links are going, see `Replica::detach`):
    /// what it would announce was never made durable, and a peer that learned it would act on
    /// it (a witness that heard of a generation no disk holds counts no data node again:
    /// simulator seed 228 with metadata write failures).
    fn push_send(&mut self, peer: u8, msg: Message, lane: Lane, sent_write: Option<u64>) {
        if self.detached() {
            return;
        }
        self.outbox.push(Action::Send { peer, msg, lane, sent_write });
    }

    pub fn peer(&self, node_id: u8) -> &Peer {
        self.peers.iter().find(|p| p.node_id == node_id).expect("configured peer")
    }

    pub fn peer_mut(&mut self, node_id: u8) -> &mut Peer {
        self.peers.iter_mut().find(|p| p.node_id == node_id).expect("configured peer")
    }

    pub fn node_id(&self) -> u8 {
        self.sb.node_id
    }

    pub fn generation(&self) -> Generation {
        Generation::of(&self.sb)
    }

    pub fn set_generation(&mut self, g: Generation) {
        g.store_in(&mut self.sb);
    }

    /// Marks a range out of sync for a peer (in memory: the activity log covers it on disk).
    /// A witness's slot stays empty: it holds no data to be out of sync.
    /// What is in flight to that peer for the range no longer clears it when acked (see
    /// `TransferLog::void_overlapping`), nor does resync data from it not yet durable here
    /// (see `Applying::void_resynced`), nor does a digest found equal in an answer still to
    /// come (see `AwaitedDigests::stale`).
    pub fn mark_out_of_sync(&mut self, slot: usize, offset: u64, len: u64) {
        let block_size = u64::from(self.sb.params.bitmap_block_size);
        let Some(peer) = self.peers.iter_mut().find(|p| p.slot == slot) else { return };
        if !peer.witness {
            peer.tl.void_overlapping(offset, len);
            peer.applying.void_resynced(offset, len);
            peer.sync.digests_overtaken(offset, len, block_size);
            self.bitmaps[slot].set_range(offset, len);
        }
    }

    /// Bitmap slots of the data peers that do not receive `sender`'s writes as far as this node
    /// can tell (not connected here, not reporting `sender` as a primary they see, or not in
    /// sync with it: being resynced, say, when the primary sends them nothing; or lagging by
    /// `sender`'s own word, see [`Replica::lagging_peers`]): a secondary records the writes it
    /// applies for them, so it can resync them itself if the primary dies. Over-reporting
    /// only costs resync.
    pub fn slots_not_following(&self, sender: u8) -> Vec<usize> {
        let follows = |s: &PeerState| s.primaries & (1 << sender) != 0 && s.flags & STATE_FLAG_FOLLOWING != 0;
        let lags = |node: u8| self.peers.iter().any(|p| p.node_id == sender && p.says_lagging(node));
        self.peers
            .iter()
            .filter(|p| p.node_id != sender && !p.witness)
            .filter(|p| !p.connected || lags(p.node_id) || p.last_state.is_none_or(|s| !follows(&s)))
            .map(|p| p.slot)
            .collect()
    }

    /// Whether connecting in sync with `peer_id` proves this node's data is the newest: the
    /// peer is UpToDate, or every data peer is connected in sync with the same generation (so
    /// no node anywhere can hold newer data). Two fresh nodes prove nothing, and neither does a
    /// peer "in sync" while either side holds bits for the other: their blocks there may differ
    /// (seed 143529: a node resynced from an Outdated third node took that node's older blocks
    /// and its bits for the peer, and the two confirmed each other UpToDate over them; two
    /// Outdated copies with bits now resync, see `core::leftover_bits`).
    pub fn confirmed_up_to_date_by(&self, peer_id: u8) -> bool {
        let good = |d: DiskState| matches!(d, DiskState::Consistent | DiskState::Outdated);
        // Known to differ (online verify): equal generations prove nothing; a resync must run.
        if !good(self.disk) || self.sb.flags.contains(MetaFlags::VERIFY_DIFFERS) {
            return false;
        }
        let no_bits = |p: &Peer| self.bitmaps[p.slot].weight() == 0 && p.last_state.is_some_and(|s| s.bitmap_weight == 0);
        if self.peer(peer_id).disk == DiskState::UpToDate {
            return no_bits(self.peer(peer_id));
        }
        let fresh = same_uuid(self.sb.uuids.current, UUID_JUST_CREATED);
        !fresh
            && self.peers.iter().filter(|p| !p.witness).all(|p| {
                p.repl == ReplState::Established
                    && no_bits(p)
                    && good(p.disk)
                    && p.last_state.is_some_and(|s| same_uuid(s.current_uuid, self.sb.uuids.current))
            })
    }

    /// Whether `peer` left cleanly and has not been connected since (see `PeerSlot::departed`).
    pub fn departed(&self, peer: &Peer) -> bool {
        self.sb.peers[peer.slot].departed
    }

    /// Records that `peer_id` left cleanly (or came back), durably: a restart must not count it
    /// as a voter it no longer is (that would be stricter than needed, never looser).
    pub fn set_departed(&mut self, peer_id: u8, departed: bool) {
        let slot = self.peer(peer_id).slot;
        if self.sb.peers[slot].departed != departed {
            self.sb.peers[slot].departed = departed;
            self.persist(MetaWrite::Superblock);
        }
    }

    /// Whether this node resyncs a peer other than `except`, or is about to.
    pub fn resyncs_other_than(&self, except: Option<u8>) -> bool {
        self.peers.iter().any(|p| p.connected && Some(p.node_id) != except && p.is_resynced_from_here())
    }

    /// The peer resyncing this node, or about to (a target decision waits for its bitmap).
    pub fn sync_target_of(&self) -> Option<u8> {
        let target = |p: &Peer| p.repl == ReplState::SyncTarget || p.pending_sync.is_some_and(|d| d.is_target());
        self.peers.iter().find(|p| p.connected && target(p)).map(|p| p.node_id)
    }

    /// The nodes this node sees as primary, itself included (see `PeerState::primaries`).
    pub fn primaries(&self) -> u32 {
        let me = u32::from(self.role == Role::Primary) << self.sb.node_id;
        self.peers.iter().filter(|p| p.connected && p.role == Role::Primary).fold(me, |mask, p| mask | 1 << p.node_id)
    }

    /// Whether a write to `[offset, offset + len)` is in flight here (the primary's own, or a
    /// peer's being applied) or a resync read holds it.
    pub fn overlaps_busy(&self, offset: u64, len: u64) -> bool {
        self.inflight.overlaps(offset, len)
            || self.read_locks.iter().any(|&(o, l)| offset < o + l && o < offset + len)
            || self.peers.iter().any(|p| p.applying.overlaps(offset, len))
    }

    /// Whether this node crashed as primary and has not been resynced with `peer` since: the
    /// activity log's extents may differ between them. A peer already resynced since is not
    /// told again (a resync of nothing, over and over, until the last peer is done).
    fn crash_unrepaired_with(&self, peer: &Peer) -> bool {
        self.crashed_primary && self.crash_repair_pending.contains(&peer.node_id)
    }

    /// This node's side of the connect-time decision with `peer`.
    pub fn uuid_view(&self, peer: &Peer) -> UuidView {
        UuidView {
            node_id: self.sb.node_id,
            current: self.sb.uuids.current,
            bitmap_for_peer: self.sb.peers[peer.slot].bitmap_uuid,
            history: self.sb.uuids.history,
            crashed_primary: self.crash_unrepaired_with(peer),
            is_primary: self.role == Role::Primary,
            inconsistent: self.disk == DiskState::Inconsistent,
            data_position: self.data_position(),
            cache_lost: self.cache_repair_pending.contains(&peer.node_id),
        }
    }

    /// What this node tells `peer` about itself.
    pub fn peer_state_for(&self, peer: &Peer) -> PeerState {
        PeerState {
            role: self.role.to_wire(),
            disk: self.disk.to_wire(),
            flags: self.state_flags()
                | if peer.repl == ReplState::Ahead { STATE_FLAG_AHEAD } else { 0 }
                | if self.resyncs_other_than(Some(peer.node_id)) { STATE_FLAG_RESYNCS_OTHER } else { 0 }
                | if self.crash_unrepaired_with(peer) { STATE_FLAG_CRASHED_PRIMARY } else { 0 }
                | if self.cache_repair_pending.contains(&peer.node_id) { STATE_FLAG_CACHE_LOST } else { 0 },
            lagging: self.lagging_peers(),
            current_uuid: self.sb.uuids.current,
            bitmap_uuid: self.sb.peers[peer.slot].bitmap_uuid,
            history: self.sb.uuids.history,
            bitmap_weight: self.bitmaps[peer.slot].weight(),
            primaries: self.primaries(),
            term: self.sb.terms.highest,
            data_position: self.data_position(),
            resynced_by: self.sync_target_of(),
        }
    }

    fn state_flags(&self) -> u32 {
        let mut flags = 0;
        if self.stopping {
            flags |= STATE_FLAG_LEAVING;
        }
        if self.discard_my_data {
            flags |= STATE_FLAG_DISCARD_MY_DATA;
        }
        if self.follows_primary() {
            flags |= STATE_FLAG_FOLLOWING;
        }
        if self.demoting {
            flags |= STATE_FLAG_DEMOTING;
        }
        if self.demoting_peers() != 0 {
            flags |= STATE_FLAG_BESIDE_DEMOTION;
        }
        if !self.cache_repair_pending.is_empty() {
            flags |= STATE_FLAG_REPAIR_PENDING;
        }
        if self.declared_with != 0 {
            flags |= STATE_FLAG_DECLARED;
        }
        flags
    }

    /// The connected peers whose demotion is under way, as a mask of node ids.
    pub fn demoting_peers(&self) -> u32 {
        let demoting = |p: &&Peer| p.connected && p.last_state.is_some_and(|s| s.flags & STATE_FLAG_DEMOTING != 0);
        self.peers.iter().filter(demoting).fold(0, |mask, p| mask | 1 << p.node_id)
    }

    /// How far this node's data goes into its primary's stream (see `DataPosition`): a
    /// primary's is its own stream's open epoch, past every barrier and FUA write it sent.
    /// Further data holds every write the nearer holds durably (see `replica/election.rs`).
    /// A node being demoted still holds its whole stream: until `finish_demotion` records
    /// where it ends, the recorded position is the one of its promotion (its term, epoch 0),
    /// and its States told peers it was nearer than any copy of its stream.
    pub fn data_position(&self) -> DataPosition {
        let terms = &self.sb.terms;
        if self.answers_as_primary() {
            DataPosition { term: terms.of_data, epoch: self.epoch, fua: 0 }
        } else {
            DataPosition { term: terms.of_data, epoch: terms.epoch_of_data, fua: terms.fua_of_data }
        }
    }

    /// How far `peer`, which followed this node's stream until now, holds it for certain: for
    /// a primary (or one being demoted), the epochs its barriers closed and the FUA writes sent
    /// to the peer in the open one, not the open epoch's writes still to come, which the peer
    /// lacks until the barrier that closes it; otherwise this node's own position. A resync's
    /// `ResyncDone` hands it to the target, which may lose the link before that barrier. Handed
    /// the open epoch, such a target tied with the primary demoted after more writes in that
    /// epoch, and the demoted primary's bits for those writes were resynced by no rule (seed
    /// 35913).
    pub(super) fn position_of_a_follower(&self, peer: u8) -> DataPosition {
        let own = self.data_position();
        if self.answers_as_primary() {
            DataPosition { epoch: own.epoch.saturating_sub(1), fua: self.peer(peer).tl.last_fua_of(own.epoch), ..own }
        } else {
            own
        }
    }

    /// Records how far this node's data goes (made durable with the next superblock write).
    /// Data of another term is not this node's own stream (see `MetaFlags::OWN_STREAM`).
    fn set_data_position(&mut self, position: DataPosition) {
        if position.term != self.sb.terms.of_data {
            self.sb.flags.remove(MetaFlags::OWN_STREAM);
        }
        let terms = &mut self.sb.terms;
        (terms.of_data, terms.epoch_of_data, terms.fua_of_data) = (position.term, position.epoch, position.fua);
    }

    /// The data peers this primary does not keep in step with its writes, as a mask of node
    /// ids: it records writes for them in its bitmap (pull-ahead, a lost link, a resync not
    /// done), or has no established stream to them. A follower cannot tell from a peer's own
    /// State, which may be older than the primary's loss of that peer (seed 421356: a node
    /// cut off while the primary was Ahead of it still said it followed; its neighbour forgot
    /// the blocks it lacked). A secondary has none.
    pub fn lagging_peers(&self) -> u32 {
        if self.role != Role::Primary {
            return 0;
        }
        let lags = |p: &&Peer| !p.witness && (p.repl != ReplState::Established || self.bitmaps[p.slot].weight() > 0);
        self.peers.iter().filter(lags).fold(0, |mask, p| mask | 1 << p.node_id)
    }

    /// Whether this node is a secondary, UpToDate, in sync with every primary it sees, and
    /// sees one (see `STATE_FLAG_FOLLOWING`).
    pub fn follows_primary(&self) -> bool {
        let mut primaries = self.peers.iter().filter(|p| p.connected && p.role == Role::Primary).peekable();
        self.role == Role::Secondary
            && self.disk == DiskState::UpToDate
            && primaries.peek().is_some()
            && primaries.all(|p| p.repl == ReplState::Established && p.pending_sync.is_none())
    }

    /// Sends the current state to every connected peer.
    pub fn broadcast_state(&mut self) {
        self.broadcast_state_on(Lane::Control);
    }

    /// Sends the current state to every connected peer behind the bulk frames queued to it: a
    /// primary that demotes says so after the writes it sent and before its last barrier, so a
    /// peer that acked that barrier knows it may promote, and no write arrives after it.
    pub fn broadcast_state_in_stream(&mut self) {
        self.broadcast_state_on(Lane::Bulk);
    }

    /// Sends the current state to `peer_id` alone (dropped if it is not connected).
    pub(super) fn send_state_to(&mut self, peer_id: u8) {
        let state = self.peer_state_for(self.peer(peer_id));
        self.send(peer_id, Message::State(state));
    }

    fn broadcast_state_on(&mut self, lane: Lane) {
        let states: Vec<(u8, PeerState)> =
            self.peers.iter().filter(|p| p.connected).map(|p| (p.node_id, self.peer_state_for(p))).collect();
        for (peer, state) in states {
            self.push_send(peer, Message::State(state), lane, None);
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

    /// Whether this node detached from its disk (see `Replica::detach`): nothing is written to
    /// it any more, neither by the replica nor by its driver (no clean shutdown either).
    pub fn detached(&self) -> bool {
        self.disk == DiskState::Failed
    }

    /// This node learned its data is not the newest: Outdated, without WAS_UP_TO_DATE in the
    /// flags (the caller persists them). Returns whether it changed anything: a detached node
    /// stays Failed, or it would connect again over a disk whose metadata writes fail (seed
    /// 1849: a fence-peer answer after a failed activity-log write made the node a resync
    /// source, and its next restart found the ring with transactions lost).
    pub(super) fn outdate(&mut self) -> bool {
        if self.detached() {
            return false;
        }
        self.disk = DiskState::Outdated;
        self.sb.flags.remove(MetaFlags::WAS_UP_TO_DATE);
        true
    }

    /// Why this node takes no link to `peer_id` now, if it takes none: what both its dialer and
    /// its acceptor ask before a link comes up.
    pub fn link_refusal(&self, peer_id: u8) -> Option<&'static str> {
        let peer = self.peer(peer_id);
        if self.stopping {
            Some(GOING_DOWN)
        } else if self.detached() {
            Some(DETACHED)
        } else if !peer.want_connect {
            Some(STAND_ALONE)
        } else if peer.connected {
            Some("already connected")
        } else {
            None
        }
    }

    /// A link to `peer_id` is up (handshake done): a new connection generation, its lease
    /// starting, and this node's state as its first frame. Returns the connection generation.
    pub fn link_up(&mut self, peer_id: u8, now: Instant) -> u64 {
        let state = self.peer_state_for(self.peer(peer_id));
        let peer = self.peer_mut(peer_id);
        peer.generation += 1;
        peer.connected = true;
        peer.conn = ConnState::Connected;
        peer.repl = ReplState::Off;
        peer.was_primary = false;
        peer.demotion_excused = 0;
        peer.last_error = None;
        peer.rx_epoch_writes = 0;
        peer.lease.restart(now);
        peer.progress_at = Some(now);
        // Its State will say what its disk is now.
        peer.fenced_disk = None;
        let generation = peer.generation;
        self.set_departed(peer_id, false);
        self.send(peer_id, Message::State(state));
        generation
    }

    /// The link to `peer_id` is gone (`sent_bytes` on it): what this node knew of the peer
    /// through it is forgotten. Returns the replication state it had and, if it was in sync,
    /// the generation it last reported.
    pub fn link_down(&mut self, peer_id: u8, reason: &str, sent_bytes: u64) -> (ReplState, Option<u64>) {
        self.declared_with &= !(1 << peer_id);
        let peer = self.peer_mut(peer_id);
        peer.connected = false;
        peer.lease.end();
        peer.progress_at = None;
        peer.sent_bytes_before += sent_bytes;
        peer.conn = if peer.want_connect { ConnState::Connecting } else { ConnState::StandAlone };
        let was = std::mem::replace(&mut peer.repl, ReplState::Off);
        let last_generation = peer.last_state.filter(|_| was == ReplState::Established).map(|s| s.current_uuid);

        peer.role = Role::Unknown;
        peer.disk = DiskState::DUnknown;
        peer.last_state = None;
        peer.pending_sync = None;
        peer.resync_end_unconfirmed = None;
        peer.resync = None;
        peer.barriers.clear();
        peer.ahead_until = None;
        peer.applying.link_down();
        peer.queued_bytes = 0;
        peer.last_error = Some(reason.to_owned());
        (was, last_generation)
    }

    /// Timers: pings that are due go out, peers that stopped making progress are dropped (see
    /// [`Replica::peer_progressed`]), an epoch open too long is closed, writes waiting for room
    /// are judged again on the send queues as they are now (`queued_bytes`, as for
    /// [`Replica::submit`]), and what was held is judged again under the leases that still
    /// hold.
    pub fn tick(&mut self, now: Instant, queued_bytes: impl Fn(u8) -> usize) {
        let timing = self.timing;
        let due: Vec<u8> =
            self.peers.iter_mut().filter(|p| p.connected).filter_map(|p| p.lease.ping_due(now, &timing).then_some(p.node_id)).collect();
        for peer in due {
            self.send(peer, Message::Ping);
        }
        self.drop_stalled_peers(now);
        self.close_an_old_epoch(now);
        // A wake-up for the writes waiting for room that no report brought, on the queues'
        // figures of now: those of the last report leave out every frame handed over since.
        // Judged on them, a tick after the writes that waited for an activity-log transaction
        // had all started at once found room that was not there, and each tick let another
        // limit's worth go, until a hung peer's whole backlog sat in its queue (96 MiB in
        // `tests/stalled_peer.rs`, 1 run in 10 to 20).
        self.note_send_queues(queued_bytes);
        self.release_for_room(now);
        // Leases lapse with no frame to say so: under `io-error`, completions that waited for
        // voters to confirm a new generation fail once those voters' leases end, not a ping
        // timeout later, when their links go (which releases nothing by itself).
        self.release_suspended(now, false);
    }

    /// When [`Replica::tick`] has something to do next (none: nothing is connected).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let pings = self.peers.iter().filter(|p| p.connected).filter_map(|p| p.lease.next_ping());
        pings.chain(self.stall_deadlines()).chain(self.epoch_deadline()).min()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::three_node_secondary_restarted;
    use crate::meta::{MetaFlags, AL_EXTENT_SIZE};

    const HOT: u64 = 3 * AL_EXTENT_SIZE + 8192;

    /// The bytes marked out of sync, per peer slot.
    fn marked(r: &super::Replica) -> Vec<u64> {
        r.bitmaps.iter().map(|b| b.weight_bytes()).collect()
    }

    #[test]
    fn a_primary_killed_with_the_machine_up_holds_its_whole_stream_and_after_a_power_loss_where_its_term_began() {
        use super::testing::three_node_primary_restarted;
        use crate::wire::DataPosition;
        let boot = [7; 16];
        let (r, _) = three_node_primary_restarted(true, boot, boot);
        assert!(r.crashed_primary);
        assert_eq!(r.data_position(), DataPosition { term: 3, epoch: u64::MAX, fua: u64::MAX }, "further than any follower of term 3");
        assert!(r.sb.flags.contains(MetaFlags::OWN_STREAM));

        let (r, _) = three_node_primary_restarted(true, boot, [8; 16]);
        assert_eq!(r.data_position(), DataPosition { term: 3, epoch: 0, fua: 0 }, "the writes it had not flushed may be gone");
        assert!(!r.sb.flags.contains(MetaFlags::OWN_STREAM), "and a later restart must not claim them either");

        let (r, _) = three_node_primary_restarted(false, boot, boot);
        assert_eq!(r.data_position(), DataPosition { term: 3, epoch: 0, fua: 0 }, "a failed flush or a resync took part of its stream");
    }

    #[test]
    fn a_primary_tells_its_peers_which_data_peers_it_lags_whenever_that_changes() {
        let (mut r, _) = super::testing::with_data_peer_and_witness(crate::core::states::Role::Primary);
        let lagging_sent = |actions: Vec<super::Action>| -> Vec<(u8, u32)> {
            let state = |a: super::Action| match a {
                super::Action::Send { peer, msg: crate::wire::Message::State(s), .. } => Some((peer, s.lagging)),
                _ => None,
            };
            actions.into_iter().filter_map(state).collect()
        };
        assert!(lagging_sent(r.take_actions()).is_empty(), "nothing changed");
        let slot = r.peer(1).slot;
        r.mark_out_of_sync(slot, 0, 4096);
        assert_eq!(lagging_sent(r.take_actions()), vec![(1, 1 << 1), (2, 1 << 1)], "it records writes for node 1");
        r.bitmaps[slot].clear_all();
        assert_eq!(lagging_sent(r.take_actions()), vec![(1, 0), (2, 0)]);
        r.link_down(1, "test", 0);
        assert_eq!(lagging_sent(r.take_actions()), vec![(2, 1 << 1)], "no stream to node 1");
        r.role = crate::core::states::Role::Secondary;
        assert_eq!(lagging_sent(r.take_actions()), vec![(2, 0)], "a secondary lags nobody");
    }

    #[test]
    fn a_secondary_whose_process_died_marks_its_hot_extents_for_every_data_peer() {
        // Neither peer was tracked: both were in sync. The primary may be gone by the time this
        // node is back, and the peer promoted in its place may lack what this node applied last.
        let (r, _) = three_node_secondary_restarted(HOT, [7; 16], [7; 16]);
        assert_eq!(marked(&r), vec![AL_EXTENT_SIZE, AL_EXTENT_SIZE]);
        assert!(r.al.hot_extents().is_empty(), "the log is emptied once its extents are marked");
        assert!(!r.sb.flags.contains(MetaFlags::CACHE_LOST), "the disk kept what it completed");
    }

    #[test]
    fn a_secondary_whose_machine_restarted_is_resynced_in_its_hot_extents() {
        let (r, _) = three_node_secondary_restarted(HOT, [7; 16], [8; 16]);
        assert_eq!(marked(&r), vec![AL_EXTENT_SIZE, AL_EXTENT_SIZE]);
        assert!(r.sb.flags.contains(MetaFlags::CACHE_LOST));
        assert_eq!(r.cache_repair_pending, vec![1, 2], "resynced from every data peer");
    }
}
