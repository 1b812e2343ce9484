//! The simulated network: one ordered lane per direction between every two nodes, like a TCP
//! stream. A message arrives after its lane's delay, never before an earlier one. A cut link
//! holds what is queued (TCP retransmits) until it heals; whether the connection survived is
//! the nodes' business (their read timeout, as in the engine), so a message may arrive on a
//! connection its receiver has already given up: the receiver drops it by connection id.

use super::rng::Rng;
use super::{Time, MS};
use blkrepl::core::states::{DiskState, Role};
use std::collections::VecDeque;

/// History (4) and bitmap UUIDs (up to 4 data peers).
pub type Ancestors = [u64; 8];

/// What a node tells a peer about itself (the engine's `State` frame, plus what quorum needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateMsg {
    pub role: Role,
    pub disk: DiskState,
    pub current: u64,
    /// The sender's bitmap UUID for the receiver.
    pub bitmap_uuid: u64,
    pub history: [u64; 4],
    pub crashed_primary: bool,
    /// The nodes the sender sees as primary, itself included (quorum's `sees_primary`).
    pub sees_primary: u32,
    /// Blocks set in the sender's bitmap for the receiver (split-brain "changes").
    pub changed_blocks: u64,
    /// The operator told the sender to drop its changes (`connect --discard-my-data`).
    pub discard_my_data: bool,
    /// The generations the sender's data descends from (history and bitmap UUIDs; 0: none).
    pub ancestors: Ancestors,
    /// The newest data generation the sender acknowledged from a primary (see
    /// `Amendments::generation_votes`; 0: none).
    pub acknowledged: u64,
}

#[derive(Debug, Clone)]
pub enum Msg {
    /// Handshake: the dialer's hello, the acceptor's answer, or its refusal.
    Hello,
    HelloReply,
    Refuse,
    State(StateMsg),
    Data {
        id: u64,
        block: usize,
        version: u64,
    },
    WriteAck {
        id: u64,
    },
    NegAck,
    Barrier {
        epoch: u64,
    },
    BarrierAck {
        epoch: u64,
        writes: u32,
    },
    /// The sender's whole bitmap for the receiver, as set blocks.
    BitmapBlocks(Vec<usize>),
    ResyncData {
        block: usize,
        version: u64,
    },
    ResyncDone {
        current: u64,
        history: [u64; 4],
    },
    Ping {
        sent_at: Time,
    },
    PingAck {
        sent_at: Time,
    },
    /// An orderly goodbye; `departing` = the sender is going down (it stops counting as a voter).
    Disconnect {
        departing: bool,
    },
    /// The sender closed the connection (the peer reads end-of-stream).
    Close,
}

#[derive(Debug, Clone)]
pub struct Envelope {
    pub from: u8,
    pub to: u8,
    pub conn: u64,
    pub msg: Msg,
}

struct Lane {
    /// Fixed part of this lane's delay; each message adds jitter.
    base: Time,
    queue: VecDeque<(Time, Envelope)>,
    /// The one pump event that will deliver the front, if any.
    pump_at: Option<Time>,
}

pub struct Network {
    nodes: usize,
    cut: Vec<bool>,
    lanes: Vec<Lane>,
}

impl Network {
    pub fn new(nodes: usize, rng: &mut Rng) -> Network {
        let lanes = (0..nodes * nodes)
            .map(|_| Lane { base: rng.range(50, 2 * MS), queue: VecDeque::new(), pump_at: None })
            .collect();
        Network { nodes, cut: vec![false; nodes * nodes], lanes }
    }

    fn pair(&self, a: u8, b: u8) -> usize {
        usize::from(a.min(b)) * self.nodes + usize::from(a.max(b))
    }

    fn lane(&mut self, from: u8, to: u8) -> &mut Lane {
        &mut self.lanes[usize::from(from) * self.nodes + usize::from(to)]
    }

    pub fn is_cut(&self, a: u8, b: u8) -> bool {
        self.cut[self.pair(a, b)]
    }

    /// Queues a message. Returns when its lane must be pumped, if no pump is due earlier.
    pub fn send(&mut self, now: Time, rng: &mut Rng, env: Envelope) -> Option<Time> {
        let cut = self.is_cut(env.from, env.to);
        let jitter = if rng.percent(2) { rng.range(0, 200 * MS) } else { rng.range(0, MS) };
        let lane = self.lane(env.from, env.to);
        let after = lane.queue.back().map_or(0, |(t, _)| *t);
        let due = (now + lane.base + jitter).max(after);
        lane.queue.push_back((due, env));
        if cut || lane.pump_at.is_some() {
            return None;
        }
        lane.pump_at = Some(due);
        Some(due)
    }

    /// The lane's pump ran at `now`: the message due, if the link is up and this pump is the
    /// live one, and when to pump next.
    pub fn pump(&mut self, now: Time, from: u8, to: u8) -> (Option<Envelope>, Option<Time>) {
        let cut = self.is_cut(from, to);
        let lane = self.lane(from, to);
        if lane.pump_at != Some(now) {
            return (None, None);
        }
        lane.pump_at = None;
        if cut {
            return (None, None);
        }
        let delivered = match lane.queue.front() {
            Some((due, _)) if *due <= now => lane.queue.pop_front().map(|(_, env)| env),
            _ => None,
        };
        lane.pump_at = lane.queue.front().map(|(due, _)| (*due).max(now));
        (delivered, lane.pump_at)
    }

    pub fn cut(&mut self, a: u8, b: u8) {
        let pair = self.pair(a, b);
        self.cut[pair] = true;
    }

    /// Heals the link; returns the lanes to pump and when (what was held goes out now).
    pub fn heal(&mut self, now: Time, a: u8, b: u8) -> Vec<(u8, u8, Time)> {
        let pair = self.pair(a, b);
        if !std::mem::replace(&mut self.cut[pair], false) {
            return Vec::new();
        }
        let mut pumps = Vec::new();
        for (from, to) in [(a, b), (b, a)] {
            let lane = self.lane(from, to);
            let mut after = now + lane.base;
            for (due, _) in lane.queue.iter_mut() {
                *due = (*due).max(after);
                after = *due;
            }
            if let Some((due, _)) = lane.queue.front() {
                lane.pump_at = Some(*due);
                pumps.push((from, to, *due));
            }
        }
        pumps
    }

    /// Every link that is cut, as pairs.
    pub fn cut_pairs(&self) -> Vec<(u8, u8)> {
        let n = self.nodes as u8;
        (0..n).flat_map(|a| (a + 1..n).map(move |b| (a, b))).filter(|(a, b)| self.is_cut(*a, *b)).collect()
    }
}
