//! What a replica knows about one peer: its connection and replication state, what it last
//! reported, the writes and barriers in flight to it, and the pings that renew its lease.

use super::apply::Applying;
use crate::core::quorum::LinkTiming;
use crate::core::states::{ConnState, DiskState, ReplState, Role};
use crate::core::sync_decision::SyncDecision;
use crate::core::sync_progress::SyncProgress;
use crate::core::transfer_log::TransferLog;
use crate::wire::PeerState;
use std::collections::VecDeque;
use std::time::Instant;

pub struct Peer {
    pub node_id: u8,
    pub name: String,
    pub slot: usize,
    /// A diskless witness: it votes, never receives data, and its bitmap slot stays empty.
    pub witness: bool,
    pub want_connect: bool,
    pub conn: ConnState,
    /// Whether a link to the peer is up (handshake done, not yet lost).
    pub connected: bool,
    pub repl: ReplState,
    pub role: Role,
    /// The peer said it was Primary at some point of this connection: its last epoch's barrier
    /// may follow the State in which it demoted.
    pub was_primary: bool,
    /// Primaries (node-id bits) this node still sees that the peer said it no longer sees while
    /// a demotion went on beside it: this node's recent writes are not marked for it unless
    /// that turns out to be a loss (see `Replica::peer_stopped_seeing`).
    pub demotion_excused: u32,
    pub disk: DiskState,
    /// Bumped per connection, so events from a dead connection's threads are ignored.
    pub generation: u64,
    pub lease: Lease,
    /// While connected: when the peer last acknowledged a write or a barrier, or last owed
    /// nothing (see `Replica::peer_progressed`).
    pub progress_at: Option<Instant>,
    pub last_state: Option<PeerState>,
    pub tl: TransferLog,
    /// Barriers sent and not yet acked: (epoch, writes in it).
    pub barriers: VecDeque<(u64, u32)>,
    /// Writes received in the peer's open epoch (this node as the receiving side).
    pub rx_epoch_writes: u32,
    /// A sync decided at connect, waiting for the peer's bitmap.
    pub pending_sync: Option<SyncDecision>,
    /// This node finished a resync from the peer, whose bitmap UUID for this node was this:
    /// until the peer's State shows it ended the resync too (its bitmap UUID moves on), its
    /// States predate the end and decide nothing (see `Replica::reconsider`).
    pub resync_end_unconfirmed: Option<u64>,
    pub resync: Option<ResyncProgress>,
    /// Online verify and checksum-based resync with this peer.
    pub sync: PeerSync,
    /// Bulk bytes waiting in the link's send queue, as the driver last reported them, and the
    /// bulk frames handed to it since (`Replica::take_actions`): never less than the queue
    /// holds, as it only drains between reports (see `replica/send_queue.rs`).
    pub queued_bytes: usize,
    /// Bytes sent on earlier connections (the current link counts its own).
    pub sent_bytes_before: u64,
    pub received_bytes: u64,
    pub last_error: Option<String>,
    /// Pull-ahead: this node is Ahead of the peer until it acks the barrier of this epoch, the
    /// last one queued to it before it was left behind.
    pub ahead_until: Option<u64>,
    /// The peer's stream as this node applies it (this node as the receiving side).
    pub applying: Applying,
    /// What the fence-peer handler said of the peer's disk (Outdated or Inconsistent) since
    /// its link went, until it is back (see `replica/fencing.rs`). Shown, never counted: no
    /// vote and no promotion depends on it.
    pub fenced_disk: Option<DiskState>,
}

impl Peer {
    /// A configured peer as it starts: not connected, wanted.
    pub fn new(node_id: u8, name: String, slot: usize, witness: bool) -> Peer {
        Peer {
            node_id,
            name,
            slot,
            witness,
            want_connect: true,
            conn: ConnState::Connecting,
            connected: false,
            repl: ReplState::Off,
            role: Role::Unknown,
            was_primary: false,
            demotion_excused: 0,
            disk: DiskState::DUnknown,
            generation: 0,
            lease: Lease::default(),
            progress_at: None,
            last_state: None,
            tl: TransferLog::default(),
            barriers: VecDeque::new(),
            rx_epoch_writes: 0,
            pending_sync: None,
            resync_end_unconfirmed: None,
            resync: None,
            sync: PeerSync::default(),
            queued_bytes: 0,
            sent_bytes_before: 0,
            received_bytes: 0,
            last_error: None,
            ahead_until: None,
            applying: Applying::default(),
            fenced_disk: None,
        }
    }

    /// Whether this peer's last `State` says that, as a primary, it does not keep `node` in step
    /// (see [`super::Replica::lagging_peers`]).
    pub fn says_lagging(&self, node: u8) -> bool {
        self.last_state.is_some_and(|s| s.lagging & (1 << node) != 0)
    }

    pub fn is_replicating(&self) -> bool {
        !self.witness && self.connected && matches!(self.repl, ReplState::Established | ReplState::SyncSource)
    }

    /// This node resyncs the peer, or has decided to.
    pub fn is_resynced_from_here(&self) -> bool {
        self.repl == ReplState::SyncSource || self.pending_sync.is_some_and(|d| d.is_source())
    }
}

/// Pings in flight to a peer and the send time of the newest one it answered: the peer's vote
/// counts for a primary only while that answer is younger than a lease (see
/// [`LinkTiming::lease`]).
#[derive(Debug, Default)]
pub struct Lease {
    unanswered: VecDeque<Instant>,
    answered_sent_at: Option<Instant>,
    next_ping: Option<Instant>,
}

impl Lease {
    /// A new link: the first ping is due at once, so the lease starts within a round trip.
    pub fn restart(&mut self, now: Instant) {
        *self = Lease { next_ping: Some(now), ..Lease::default() };
    }

    /// Whether a ping is due at `now`; if so it counts as sent at `now` (queued ahead of bulk
    /// data, it leaves no earlier, so the lease never counts from before the real send).
    pub fn ping_due(&mut self, now: Instant, timing: &LinkTiming) -> bool {
        match self.next_ping {
            Some(due) if now >= due => {
                self.next_ping = Some(now + timing.ping_interval);
                self.unanswered.push_back(now);
                true
            }
            _ => false,
        }
    }

    /// When the next ping is due (none while the link is down).
    pub fn next_ping(&self) -> Option<Instant> {
        self.next_ping
    }

    /// Whether a ping is waiting for its answer.
    pub fn awaits_answer(&self) -> bool {
        !self.unanswered.is_empty()
    }

    /// The peer answered the oldest unanswered ping (pings are answered in order).
    pub fn answered(&mut self) {
        if let Some(sent_at) = self.unanswered.pop_front() {
            self.answered_sent_at = Some(sent_at);
        }
    }

    /// Whether the peer answered a ping sent less than a lease before `now`.
    pub fn holds(&self, now: Instant, timing: &LinkTiming) -> bool {
        self.answered_sent_at.is_some_and(|sent| now.saturating_duration_since(sent) < timing.lease())
    }

    /// The link is gone: no more pings, no lease.
    pub fn end(&mut self) {
        *self = Lease::default();
    }
}

/// A resync in progress with one peer, as this node sees it.
#[derive(Debug, Clone)]
pub struct ResyncProgress {
    pub started: Instant,
    /// Observed against the bitmap's weight for the peer whenever status is read.
    pub progress: SyncProgress,
    pub full: bool,
}

/// Per-peer state of the checksum exchanges: online verify and checksum-based resync.
#[derive(Debug, Default)]
pub struct PeerSync {
    /// The last online verify with this peer (running, finished or aborted).
    pub verify: Option<VerifyRun>,
    /// Digest requests of a checksum-based resync awaiting their answer, in stream order.
    pub resync_digests: VecDeque<AwaitedDigests>,
    /// Ranges whose digests differed: their data goes out next.
    pub resync_wanted: VecDeque<(u64, u64)>,
    /// Where this node, as the peer's resync source, is in its walk.
    pub walk: super::ResyncWalk,
    /// The rate controller of the resync or verify walk with this peer (see `pacing.rs`).
    pub pace: Option<crate::core::resync_rate::ResyncRate>,
}

/// A digest request of a checksum-based resync that awaits the peer's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AwaitedDigests {
    pub offset: u64,
    pub blocks: u32,
    /// Part of its range was marked out of sync for the peer after its blocks were read (a
    /// local write failed there, say): a match in the answer compares the peer with data this
    /// node no longer vouches for, so none clears a bit, and the walk's next pass compares
    /// the range again. (Simulator seed 145416: a primary's write failed on a block whose
    /// digest was on its way; the peer's "equal", recorded after the failure's mark, cleared it
    /// with the next barrier ack, and the block was never resynced into that peer.)
    pub stale: bool,
}

impl PeerSync {
    /// `[offset, offset + len)` was marked out of sync for the peer: the answers still to come
    /// for digests read before then must not clear it (see [`AwaitedDigests::stale`]).
    pub fn digests_overtaken(&mut self, offset: u64, len: u64, block_size: u64) {
        for awaited in &mut self.resync_digests {
            if super::writes::overlap((awaited.offset, u64::from(awaited.blocks) * block_size), (offset, len)) {
                awaited.stale = true;
            }
        }
    }
}

/// Differing ranges a verify keeps for `status` (the log has every one).
pub const MAX_REPORTED_RANGES: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyState {
    Running,
    Finished,
    /// Stopped before the end (the reason says why); what was found so far stays marked.
    Aborted(String),
}

/// One verify with one peer, as the node that runs it sees it.
#[derive(Debug)]
pub struct VerifyRun {
    /// The connection it runs on: answers arrive on that one only.
    pub generation: u64,
    pub started: Instant,
    pub state: VerifyState,
    /// Bytes compared (answered) out of the device's size.
    pub progress: SyncProgress,
    /// Requests awaiting their answer, in stream order: `(offset, blocks)`.
    pub awaiting: VecDeque<(u64, u32)>,
    /// Where the walk goes on: everything before it was requested.
    pub cursor: u64,
    /// Bytes found to differ, and the first ranges of them (adjacent ones merged).
    pub found_bytes: u64,
    pub found_ranges: Vec<(u64, u64)>,
}

impl VerifyRun {
    pub fn new(generation: u64, started: Instant, device_bytes: u64) -> VerifyRun {
        VerifyRun {
            generation,
            started,
            state: VerifyState::Running,
            progress: SyncProgress::start(device_bytes),
            awaiting: VecDeque::new(),
            cursor: 0,
            found_bytes: 0,
            found_ranges: Vec::new(),
        }
    }

    pub fn record_found(&mut self, offset: u64, len: u64) {
        self.found_bytes += len;
        let kept = self.found_ranges.len();
        match self.found_ranges.last_mut() {
            Some((start, l)) if *start + *l == offset => *l += len,
            _ if kept < MAX_REPORTED_RANGES => self.found_ranges.push((offset, len)),
            _ => {}
        }
    }
}
