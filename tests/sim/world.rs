//! Virtual time, the event queue, and what a node may touch while it handles an event.

use super::network::{Envelope, Msg, Network};
use super::rng::Rng;
use super::{Time, SEC};
use blkrepl::core::quorum::{OnNoQuorum, QuorumPolicy};
use blkrepl::core::split_brain::SplitBrainPolicies;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

/// The resource settings a run uses, and which amendments to the engine's rules it follows.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub quorum: QuorumPolicy,
    pub on_no_quorum: OnNoQuorum,
    pub split_brain: SplitBrainPolicies,
    pub amend: Amendments,
}

/// Rules the model follows where the engine (as read at the branch point) does not: each one
/// closes a failure the simulator found with the engine's rule, and a test in
/// tests/simulator.rs shows that failure with the amendment switched off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amendments {
    /// The resync source ends a resync on the target's "UpToDate" only after it saw the target
    /// Inconsistent in this resync. The engine ends it on any State saying UpToDate, and a
    /// State the target sent before it took the bitmap (its quorum view changed, say) ends the
    /// resync on the source alone.
    pub resync_end_after_target_started: bool,
    /// A full sync's source records the target's current UUID as its bitmap UUID for it, so an
    /// interrupted full sync resumes from the bitmap (decision rule 2, as an initial sync
    /// does). In the engine it starts over, found again only through the source's history,
    /// which a primary losing the link four times overflows: the pair ends "Unrelated".
    pub full_sync_resumes_by_bitmap: bool,
    /// A vote is tied to the data generation the voter acknowledged last: every node remembers
    /// (durably) the current UUID of the primary it last heard from, taking a new one only
    /// from a primary whose data descends from the one it knows; a candidate counts a voter
    /// only if its own data holds that generation, and a primary counts a voter only once the
    /// voter acknowledged its current generation. With votes that are mere reachability, a
    /// secondary cut off while the primary keeps quorum through a witness is never told it is
    /// outdated: once the primary is gone it forms a majority with the witness and promotes
    /// without the writes acknowledged meanwhile (and a primary that lost quorum regains it
    /// through that witness after others moved on).
    pub generation_votes: bool,
    /// A node that left cleanly still counts as a voter. Off, `core::quorum`'s rule applies: it
    /// stops counting only while every other voter is reachable. (Discounting it
    /// unconditionally let nodes that saw it leave and those it came back to count majorities
    /// of different voter sets: two primaries acknowledged writes at the same time.)
    pub departed_still_vote: bool,
    /// `primary` refuses while a connection has decided this node is a resync target and
    /// waits for the bitmaps. The engine checks only that the disk is UpToDate, which it still
    /// is until the bitmaps arrive; the new primary then turns Inconsistent under its users,
    /// and every later connect is refused.
    pub no_promotion_while_target: bool,
    /// At promotion, a peer this node is resyncing counts as present (it receives every write,
    /// and its bitmap covers the rest), so no new generation starts for it. The engine counts
    /// it absent: the promotion rotates the generation while the resync's end, naming the old
    /// one, may be on its way; the target adopts a generation the source has left, and a full
    /// sync follows.
    pub resync_target_is_present: bool,
    /// A candidate for promotion, too, counts a peer's vote only within the lease of a ping the
    /// peer answered. `core::quorum` counts any connected peer, and a link is given up only
    /// after a ping timeout of silence: a candidate can count the vote of the primary on the other side
    /// of a fresh partition, whose State announcing its promotion is stuck in the cut link.
    pub leased_votes_for_promotion: bool,
}

impl Amendments {
    pub const ALL: Amendments = Amendments {
        resync_end_after_target_started: true,
        full_sync_resumes_by_bitmap: true,
        generation_votes: true,
        departed_still_vote: false,
        no_promotion_while_target: true,
        resync_target_is_present: true,
        leased_votes_for_promotion: true,
    };
}

/// Something a node does later: a timer or a disk completion.
#[derive(Debug, Clone, Copy)]
pub enum NodeEvent {
    /// Every 250 ms: pings, read timeouts, dialing.
    Tick,
    /// The primary's local write of in-flight write `id` completed.
    LocalWriteDone { id: u64 },
    /// The disk write for the head of the stream from `peer` completed.
    StreamWriteDone { peer: u8, conn: u64, io: u64, applied: Applied },
    /// The resync source's next step towards `peer`.
    ResyncStep { peer: u8, conn: u64 },
    /// The resync source finished reading `block` for `peer`.
    ResyncRead { peer: u8, conn: u64, block: usize },
}

/// What a stream write was, to finish it.
#[derive(Debug, Clone, Copy)]
pub enum Applied {
    Data { id: u64 },
    Resync { block: usize },
}

#[derive(Debug, Clone, Copy)]
pub enum Event {
    /// A network lane may deliver its front message.
    Lane { from: u8, to: u8 },
    /// For node `node` in its `incarnation` (events of a crashed incarnation are dropped).
    Node { node: u8, incarnation: u64, what: NodeEvent },
    /// The scenario's own timers (client, faults, restarts).
    Scenario(super::scenario::Step),
}

struct Queued {
    at: Time,
    seq: u64,
    event: Event,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Events in time order; equal times in the order they were scheduled.
#[derive(Default)]
pub struct Queue {
    heap: BinaryHeap<Reverse<Queued>>,
    seq: u64,
}

impl Queue {
    pub fn at(&mut self, at: Time, event: Event) {
        self.seq += 1;
        self.heap.push(Reverse(Queued { at, seq: self.seq, event }));
    }

    pub fn pop(&mut self) -> Option<(Time, Event)> {
        self.heap.pop().map(|Reverse(q)| (q.at, q.event))
    }
}

/// What happened, kept only when a seed is replayed for a report: the last `keep` lines.
pub struct Trace {
    keep: usize,
    lines: VecDeque<String>,
}

impl Trace {
    /// `keep == 0`: no trace (the fast path of a sweep).
    pub fn new(keep: usize) -> Trace {
        Trace { keep, lines: VecDeque::new() }
    }

    /// Records a line for node `who` (`None`: the scenario). `text` runs only when enabled.
    pub fn add(&mut self, now: Time, who: Option<u8>, text: impl FnOnce() -> String) {
        if self.keep == 0 {
            return;
        }
        if self.lines.len() == self.keep {
            self.lines.pop_front();
        }
        let who = who.map_or_else(|| "--".to_string(), |n| format!("n{n}"));
        self.lines.push_back(format!("{:>3}.{:06} {who:<3} {}", now / SEC, now % SEC, text()));
    }

    pub fn lines(&self) -> impl Iterator<Item = &String> {
        self.lines.iter()
    }
}

/// What a run exercised, for the report (summed over a sweep).
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub runs: u64,
    pub acked_writes: u64,
    pub promotions: u64,
    pub power_losses: u64,
    /// Power losses in the middle of a metadata write.
    pub torn_metadata: u64,
    pub clean_downs: u64,
    pub bitmap_resyncs: u64,
    pub full_syncs: u64,
    /// Full syncs after a resync end the source missed (see checker 6).
    pub full_syncs_missed_end: u64,
    /// Split brains the policies resolved, and those left to the operator.
    pub split_brains_resolved: u64,
    pub split_brains_stand_alone: u64,
    /// Connects that found no common history.
    pub unrelated: u64,
    pub virtual_us: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.runs += o.runs;
        self.acked_writes += o.acked_writes;
        self.promotions += o.promotions;
        self.power_losses += o.power_losses;
        self.torn_metadata += o.torn_metadata;
        self.clean_downs += o.clean_downs;
        self.bitmap_resyncs += o.bitmap_resyncs;
        self.full_syncs += o.full_syncs;
        self.full_syncs_missed_end += o.full_syncs_missed_end;
        self.split_brains_resolved += o.split_brains_resolved;
        self.split_brains_stand_alone += o.split_brains_stand_alone;
        self.unrelated += o.unrelated;
        self.virtual_us += o.virtual_us;
    }
}

/// Fresh identifiers for connections and resyncs.
#[derive(Default)]
pub struct Ids {
    conn: u64,
    resync: u64,
}

impl Ids {
    pub fn conn(&mut self) -> u64 {
        self.conn += 1;
        self.conn
    }
    pub fn resync(&mut self) -> u64 {
        self.resync += 1;
        self.resync
    }
}

/// Everything a node may use while handling an event, besides itself.
pub struct Ctx<'a> {
    pub now: Time,
    pub rng: &'a mut Rng,
    pub net: &'a mut Network,
    pub queue: &'a mut Queue,
    pub trace: &'a mut Trace,
    pub history: &'a mut super::checkers::History,
    pub ids: &'a mut Ids,
    pub rules: &'a Rules,
    pub stats: &'a mut Stats,
}

impl Ctx<'_> {
    pub fn send(&mut self, from: u8, to: u8, conn: u64, msg: Msg) {
        self.trace.add(self.now, Some(from), || format!("-> n{to} #{conn} {msg:?}"));
        if let Some(due) = self.net.send(self.now, self.rng, Envelope { from, to, conn, msg }) {
            self.queue.at(due, Event::Lane { from, to });
        }
    }

    pub fn log(&mut self, node: u8, text: impl FnOnce() -> String) {
        self.trace.add(self.now, Some(node), text);
    }
}
