//! One run: a cluster drawn from the seed, a client writing on every primary, a random
//! schedule of faults, then a heal phase (network healed, nodes restarted, split brains
//! resolved by the operator, a primary elected) until the cluster settles, with the checkers
//! after every step.

use super::checkers::{self, Checkers, History, Violation};
use super::disk::Crashed;
use super::network::Network;
use super::node::{AppWrite, Node};
use super::rng::Rng;
use super::world::{Amendments, Ctx, Event, Ids, NodeEvent, Queue, Rules, Stats, Trace};
use super::{Time, BLOCKS, MS, SEC};
use blkrepl::core::quorum::{OnNoQuorum, QuorumPolicy};
use blkrepl::core::split_brain::{AfterSb0Pri, AfterSb1Pri, SplitBrainPolicies};
use blkrepl::core::states::{DiskState, Role};
use blkrepl::meta::MetaFlags;
use std::collections::BTreeMap;

/// The cluster and the rules of one run.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_nodes: usize,
    pub witnesses: usize,
    pub rules: Rules,
    /// Start from fresh metadata with node 0 forced primary (its peers then get every block),
    /// instead of from in-sync replicas.
    pub forced_start: bool,
    /// How long faults are injected before the heal phase.
    pub fault_phase: Time,
    /// Faults that may be drawn, with their weights.
    pub faults: &'static [(Fault, u64)],
}

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Split the nodes in two groups.
    Partition,
    /// Break one link only (in a triangle: A and B both still reach the witness).
    CutLink,
    HealLink,
    HealAll,
    /// Power loss, at once or in the middle of one of the next metadata writes.
    Crash,
    /// `blkrepl down` (a primary is demoted first), back up a little later.
    Down,
    /// The cluster manager promotes a random data node where `may_promote` allows.
    Promote,
    /// Switchover: the primary is demoted.
    Demote,
    /// A data disk fails some writes from its peers' streams for a while.
    FailingDisk,
    /// A data disk fails some of the primary's own writes for a while.
    FailingLocalDisk,
}

/// Faults of the default run.
pub const DEFAULT_FAULTS: [(Fault, u64); 9] = [
    (Fault::Partition, 12),
    (Fault::CutLink, 12),
    (Fault::HealLink, 10),
    (Fault::HealAll, 6),
    (Fault::Crash, 10),
    (Fault::Down, 5),
    (Fault::Promote, 30),
    (Fault::Demote, 5),
    (Fault::FailingDisk, 4),
];

impl Config {
    /// The cluster and rules of a default run, drawn from the seed.
    pub fn random(rng: &mut Rng) -> Config {
        let data_nodes = 2;
        let witnesses = rng.below(4);
        let zero_primaries = rng.pick(&[AfterSb0Pri::Disconnect, AfterSb0Pri::DiscardZeroChanges]);
        let one_primary = rng.pick(&[AfterSb1Pri::Disconnect, AfterSb1Pri::Consensus]);
        Config {
            data_nodes,
            witnesses,
            rules: Rules {
                quorum: QuorumPolicy::Majority,
                on_no_quorum: rng.pick(&[OnNoQuorum::SuspendIo, OnNoQuorum::IoError]),
                split_brain: SplitBrainPolicies { zero_primaries, one_primary, ..Default::default() },
                amend: Amendments::ALL,
            },
            forced_start: rng.percent(25),
            fault_phase: rng.range(10, 40) * SEC,
            faults: &DEFAULT_FAULTS,
        }
    }

    fn nodes(&self) -> usize {
        self.data_nodes + self.witnesses
    }
}

/// The scenario's timers.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    Client,
    Fault,
    /// An armed crash that no metadata write triggered yet happens now.
    CrashDeadline {
        node: u8,
        incarnation: u64,
    },
    Restart {
        node: u8,
    },
    /// Retry a `down` once the node is demoted.
    Down {
        node: u8,
    },
    EndFaults,
    HealCheck,
}

/// How a run ended.
pub struct Outcome {
    pub violation: Option<Violation>,
    pub trace: Vec<String>,
    pub config: Config,
    pub stats: Stats,
}

/// Longest heal phase before "did not settle" is reported.
const HEAL_LIMIT: Time = 120 * SEC;
const MAX_OUTSTANDING: usize = 4;

pub struct Sim {
    now: Time,
    nodes: Vec<Node>,
    net: Network,
    queue: Queue,
    rng: Rng,
    trace: Trace,
    history: History,
    ids: Ids,
    stats: Stats,
    config: Config,
    checkers: Checkers,
    /// Client writes not answered yet: version -> (node, block).
    outstanding: BTreeMap<u64, (u8, usize)>,
    next_version: u64,
    healing_since: Option<Time>,
    /// Primaries that had no quorum at the last heal check.
    quorumless: Vec<u8>,
    settled: bool,
}

impl Sim {
    /// A run of `seed`: the config is drawn from it, then `adjust`ed; the last `trace` lines
    /// of the trace are kept.
    pub fn new(seed: u64, adjust: impl FnOnce(&mut Config), trace: usize) -> Sim {
        let mut rng = Rng::new(seed);
        let mut config = Config::random(&mut rng);
        adjust(&mut config);
        let ids: Vec<(u8, bool)> =
            (0..config.nodes() as u8).map(|id| (id, usize::from(id) >= config.data_nodes)).collect();
        let nodes = ids.iter().map(|&(id, witness)| Node::new(id, witness, &ids)).collect();
        Sim {
            now: 0,
            nodes,
            net: Network::new(config.nodes(), &mut rng),
            queue: Queue::default(),
            rng,
            trace: Trace::new(trace),
            history: History::new(),
            ids: Ids::default(),
            stats: Stats { runs: 1, ..Stats::default() },
            checkers: Checkers::default(),
            config,
            outstanding: BTreeMap::new(),
            next_version: 0,
            healing_since: None,
            quorumless: Vec::new(),
            settled: false,
        }
    }

    /// Splits the world into the nodes and the context a node handler gets.
    fn split(&mut self) -> (&mut Vec<Node>, Ctx<'_>) {
        let cx = Ctx {
            now: self.now,
            rng: &mut self.rng,
            net: &mut self.net,
            queue: &mut self.queue,
            trace: &mut self.trace,
            history: &mut self.history,
            ids: &mut self.ids,
            rules: &self.config.rules,
            stats: &mut self.stats,
        };
        (&mut self.nodes, cx)
    }

    fn log(&mut self, text: impl FnOnce() -> String) {
        self.trace.add(self.now, None, text);
    }

    /// Runs `f` on node `id`; a crash in the middle of a metadata write kills the node there.
    /// Afterwards the node publishes state changes, releases writes held for quorum, and
    /// finishes a demotion that was waiting for its writes.
    fn with_node(&mut self, id: u8, f: impl FnOnce(&mut Node, &mut Ctx) -> Result<(), Crashed>) {
        let (nodes, mut cx) = self.split();
        let node = &mut nodes[usize::from(id)];
        let result = f(node, &mut cx).and_then(|()| {
            if node.draining && node.inflight.is_empty() && node.waiting.is_empty() {
                node.demote(&mut cx)?;
            }
            node.release_suspended(&mut cx);
            node.publish_state(&mut cx);
            Ok(())
        });
        if result.is_err() {
            node.power_loss(&mut cx);
            self.client_lost(id);
            let delay = self.rng.range(SEC, 10 * SEC);
            self.queue.at(self.now + delay, Event::Scenario(Step::Restart { node: id }));
        }
    }

    /// The client's writes on a node that went away will never be answered.
    fn client_lost(&mut self, id: u8) {
        self.outstanding.retain(|_, (node, _)| *node != id);
    }

    pub fn run(mut self) -> Outcome {
        self.start();
        let violation = self.event_loop().err();
        self.stats.acked_writes = self.history.acked_writes;
        self.stats.virtual_us = self.now;
        Outcome { violation, trace: self.trace.lines().cloned().collect(), config: self.config, stats: self.stats }
    }

    fn event_loop(&mut self) -> Result<(), Violation> {
        while let Some((at, event)) = self.queue.pop() {
            self.now = at;
            self.handle(event)?;
            if let Some(v) = self.history.violations.pop() {
                return Err(v);
            }
            self.checkers.after_step(&self.nodes)?;
            self.client_answers();
            if self.settled {
                return checkers::at_end(&self.nodes, &self.history.acked);
            }
        }
        unreachable!("node ticks never stop")
    }

    /// Boots the cluster: in-sync replicas (as after `new-current-uuid --clear-bitmap`), or
    /// fresh ones with node 0 forced primary.
    fn start(&mut self) {
        let initial = self.rng.next_u64() & !1;
        let forced = self.config.forced_start;
        for id in 0..self.nodes.len() as u8 {
            let (nodes, mut cx) = self.split();
            let node = &mut nodes[usize::from(id)];
            node.boot(&mut cx).expect("fresh metadata attaches");
            if !node.witness && !forced {
                let meta = node.meta();
                meta.sb.uuids.current = initial;
                meta.sb.flags.insert(MetaFlags::CONSISTENT | MetaFlags::WAS_UP_TO_DATE);
                meta.persist().expect("no crash is armed");
                node.disk = DiskState::Consistent;
            }
        }
        if forced {
            self.with_node(0, |n, cx| n.promote(cx, true));
        }
        self.queue.at(10 * MS, Event::Scenario(Step::Client));
        self.queue.at(self.rng.range(SEC, 3 * SEC), Event::Scenario(Step::Fault));
        self.queue.at(self.config.fault_phase, Event::Scenario(Step::EndFaults));
    }

    fn handle(&mut self, event: Event) -> Result<(), Violation> {
        match event {
            Event::Lane { from, to } => {
                let (delivered, next) = self.net.pump(self.now, from, to);
                if let Some(at) = next {
                    self.queue.at(at, Event::Lane { from, to });
                }
                if let Some(env) = delivered.filter(|_| self.nodes[usize::from(to)].up) {
                    self.with_node(to, |n, cx| n.receive(cx, env));
                }
            }
            Event::Node { node, incarnation, what } => {
                let n = &self.nodes[usize::from(node)];
                if n.up && n.incarnation == incarnation {
                    self.with_node(node, |n, cx| match what {
                        NodeEvent::Tick => n.tick(cx),
                        NodeEvent::LocalWriteDone { id } => n.local_write_done(cx, id),
                        NodeEvent::StreamWriteDone { peer, conn, io, applied } => {
                            n.stream_write_done(cx, peer, conn, io, applied)
                        }
                        NodeEvent::ResyncStep { peer, conn } => {
                            n.resync_step(cx, peer, conn);
                            Ok(())
                        }
                        NodeEvent::ResyncRead { peer, conn, block } => n.resync_read(cx, peer, conn, block),
                    });
                }
            }
            Event::Scenario(step) => self.step(step)?,
        }
        Ok(())
    }

    fn step(&mut self, step: Step) -> Result<(), Violation> {
        match step {
            Step::Client => self.client(),
            Step::Fault if self.healing_since.is_some() => {}
            Step::Fault => {
                let fault = self.draw_fault();
                self.fault(fault);
                let next = self.rng.range(200 * MS, 2500 * MS);
                self.queue.at(self.now + next, Event::Scenario(Step::Fault));
            }
            Step::CrashDeadline { node, incarnation } => {
                let n = &self.nodes[usize::from(node)];
                if n.up && n.incarnation == incarnation {
                    self.with_node(node, |_, _| Err(Crashed));
                }
            }
            Step::Restart { node } => self.restart(node)?,
            Step::Down { node } => self.down(node),
            Step::EndFaults => self.begin_heal(),
            Step::HealCheck => return self.heal_check(),
        }
        Ok(())
    }

    fn restart(&mut self, id: u8) -> Result<(), Violation> {
        let (nodes, mut cx) = self.split();
        let node = &mut nodes[usize::from(id)];
        if node.up {
            return Ok(());
        }
        node.boot(&mut cx).map_err(|what| Violation { checker: 0, what })
    }

    /// The client writes on every primary (the application runs where the device is exported;
    /// an isolated old primary's application goes on submitting), and now and then flushes.
    fn client(&mut self) {
        if self.healing_since.is_some() {
            return;
        }
        for id in 0..self.nodes.len() as u8 {
            if !self.nodes[usize::from(id)].writable() {
                continue;
            }
            let busy: Vec<usize> = self.outstanding.values().filter(|(n, _)| *n == id).map(|(_, b)| *b).collect();
            if busy.len() >= MAX_OUTSTANDING {
                continue;
            }
            let free: Vec<usize> = (0..BLOCKS).filter(|b| !busy.contains(b)).collect();
            let block = self.rng.pick(&free);
            self.next_version += 1;
            let version = self.next_version;
            self.outstanding.insert(version, (id, block));
            self.log(|| format!("client: write v{version} to block {block} on n{id}"));
            self.with_node(id, |n, cx| n.submit(cx, AppWrite { block, version }));
            if self.rng.percent(10) {
                self.with_node(id, |n, cx| {
                    n.send_barriers(cx);
                    Ok(())
                });
            }
        }
        let next = self.rng.range(MS, 15 * MS);
        self.queue.at(self.now + next, Event::Scenario(Step::Client));
    }

    fn client_answers(&mut self) {
        for version in std::mem::take(&mut self.history.finished) {
            self.outstanding.remove(&version);
        }
    }

    /// A fault drawn by weight.
    fn draw_fault(&mut self) -> Fault {
        let total: u64 = self.config.faults.iter().map(|(_, w)| w).sum();
        let mut draw = self.rng.range(0, total);
        for &(fault, weight) in self.config.faults {
            if draw < weight {
                return fault;
            }
            draw -= weight;
        }
        unreachable!("the draw is below the total weight")
    }

    fn fault(&mut self, fault: Fault) {
        let n = self.nodes.len() as u8;
        let data = self.config.data_nodes as u8;
        match fault {
            Fault::Partition => {
                let side: Vec<bool> = (0..n).map(|_| self.rng.percent(50)).collect();
                self.log(|| format!("fault: partition {side:?}"));
                for a in 0..n {
                    for b in a + 1..n {
                        if side[usize::from(a)] != side[usize::from(b)] {
                            self.net.cut(a, b);
                        }
                    }
                }
            }
            Fault::CutLink => {
                let a = self.rng.below(n as usize) as u8;
                let b = (a + 1 + self.rng.below(n as usize - 1) as u8) % n;
                self.log(|| format!("fault: cut n{a}-n{b}"));
                self.net.cut(a, b);
            }
            Fault::HealLink => {
                let cut = self.net.cut_pairs();
                if !cut.is_empty() {
                    let (a, b) = self.rng.pick(&cut);
                    self.heal(a, b);
                }
            }
            Fault::HealAll => {
                for (a, b) in self.net.cut_pairs() {
                    self.heal(a, b);
                }
            }
            Fault::Crash => {
                let id = self.rng.below(n as usize) as u8;
                let incarnation = self.nodes[usize::from(id)].incarnation;
                if !self.nodes[usize::from(id)].up {
                    return;
                }
                // Half the time in the middle of one of the next metadata writes (torn after
                // 0..8 sectors), else at once.
                let k = self.rng.range(0, 4) * u64::from(self.rng.percent(50));
                let tear = self.rng.pick(&[0, 1, 4, 8]);
                self.log(|| format!("fault: crash n{id} (metadata write {k}, tear {tear})"));
                if k > 0 && self.nodes[usize::from(id)].arm_crash(k, tear) {
                    let deadline = self.rng.range(100 * MS, 3 * SEC);
                    self.queue.at(self.now + deadline, Event::Scenario(Step::CrashDeadline { node: id, incarnation }));
                } else {
                    self.with_node(id, |_, _| Err(Crashed));
                }
            }
            Fault::Down => {
                let id = self.rng.below(n as usize) as u8;
                self.log(|| format!("fault: down n{id}"));
                self.down(id);
            }
            Fault::Promote => {
                let id = self.rng.below(data as usize) as u8;
                let node = &self.nodes[usize::from(id)];
                if node.may_promote(self.now, &self.config.rules) {
                    self.log(|| format!("manager: promote n{id}"));
                    self.with_node(id, |n, cx| n.promote(cx, false));
                }
            }
            Fault::Demote => {
                let primaries: Vec<u8> =
                    self.nodes.iter().filter(|n| n.up && n.role == Role::Primary).map(|n| n.id).collect();
                if !primaries.is_empty() {
                    let id = self.rng.pick(&primaries);
                    self.log(|| format!("manager: demote n{id}"));
                    self.demote(id);
                }
            }
            Fault::FailingDisk | Fault::FailingLocalDisk => {
                let id = self.rng.below(data as usize);
                let errors = &mut self.nodes[id].io_errors;
                if fault == Fault::FailingDisk {
                    errors.stream = 20;
                } else {
                    errors.local = 20;
                }
                self.log(|| format!("fault: failing disk on n{id} ({fault:?})"));
            }
        }
    }

    fn heal(&mut self, a: u8, b: u8) {
        self.log(|| format!("heal n{a}-n{b}"));
        for (from, to, at) in self.net.heal(self.now, a, b) {
            self.queue.at(at, Event::Lane { from, to });
        }
    }

    fn demote(&mut self, id: u8) {
        self.nodes[usize::from(id)].draining = true;
        self.client_lost(id);
        self.with_node(id, |_, _| Ok(()));
    }

    /// `down` on a primary demotes it first and retries once that is done.
    fn down(&mut self, id: u8) {
        let node = &self.nodes[usize::from(id)];
        if !node.up {
            return;
        }
        if node.role == Role::Primary {
            self.demote(id);
            self.queue.at(self.now + 200 * MS, Event::Scenario(Step::Down { node: id }));
            return;
        }
        self.with_node(id, |n, cx| n.shut_down(cx));
        self.client_lost(id);
        if self.healing_since.is_none() {
            let delay = self.rng.range(SEC, 15 * SEC);
            self.queue.at(self.now + delay, Event::Scenario(Step::Restart { node: id }));
        }
    }

    fn begin_heal(&mut self) {
        self.log(|| "heal phase".into());
        self.healing_since = Some(self.now);
        for (a, b) in self.net.cut_pairs() {
            self.heal(a, b);
        }
        for node in self.nodes.iter_mut() {
            node.io_errors = Default::default();
        }
        self.queue.at(self.now + 500 * MS, Event::Scenario(Step::HealCheck));
    }

    /// What the operator and the cluster manager do until the cluster settles: restart what is
    /// down, demote a primary that stays without quorum, resolve split brains with `--discard-my-data` on
    /// the side that lacks acknowledged writes, elect a primary if there is none.
    fn heal_check(&mut self) -> Result<(), Violation> {
        let since = self.healing_since.expect("healing");
        for id in 0..self.nodes.len() as u8 {
            self.restart(id)?;
        }
        let quorumless: Vec<u8> = self
            .nodes
            .iter()
            .filter(|n| n.role == Role::Primary && !n.draining && !n.can_complete(self.now, &self.config.rules))
            .map(|n| n.id)
            .collect();
        let before = std::mem::replace(&mut self.quorumless, quorumless.clone());
        let demoted: Vec<u8> = quorumless.into_iter().filter(|id| before.contains(id)).collect();
        for &id in &demoted {
            self.log(|| format!("manager: demote n{id}, it has no quorum"));
            self.demote(id);
        }
        self.resolve_stand_alone();
        let data = self.config.data_nodes as u8;
        if demoted.is_empty() && !self.nodes.iter().any(|n| n.role == Role::Primary) {
            if let Some(id) =
                (0..data).find(|id| self.nodes[usize::from(*id)].may_promote(self.now, &self.config.rules))
            {
                self.log(|| format!("manager: promote n{id}"));
                self.with_node(id, |n, cx| n.promote(cx, false));
            }
        }
        if self.outstanding.is_empty() && checkers::settled(&self.nodes) {
            self.settled = true;
            return Ok(());
        }
        if self.now - since > HEAL_LIMIT {
            return Err(Violation {
                checker: 3,
                what: format!(
                    "the cluster did not settle within {} s of healing:\n{}",
                    HEAL_LIMIT / SEC,
                    self.describe()
                ),
            });
        }
        self.queue.at(self.now + 500 * MS, Event::Scenario(Step::HealCheck));
        Ok(())
    }

    /// Reconnects StandAlone pairs, naming as victim the side that lacks acknowledged writes
    /// (as an operator who knows where the application ran would); a primary victim is
    /// demoted first.
    fn resolve_stand_alone(&mut self) {
        let n = self.nodes.len() as u8;
        for a in 0..n {
            for b in a + 1..n {
                let stand_alone = |x: u8, y: u8| !self.nodes[usize::from(x)].peer(y).want_connect;
                if !stand_alone(a, b) && !stand_alone(b, a) {
                    continue;
                }
                let lacking = |x: u8| checkers::missing_acked(&self.nodes[usize::from(x)], &self.history.acked).len();
                let primary = |x: u8| self.nodes[usize::from(x)].role == Role::Primary;
                let victim = match lacking(a).cmp(&lacking(b)) {
                    std::cmp::Ordering::Greater => a,
                    std::cmp::Ordering::Less => b,
                    std::cmp::Ordering::Equal if primary(b) && !primary(a) => a,
                    std::cmp::Ordering::Equal => b,
                };
                if self.nodes[usize::from(victim)].role == Role::Primary {
                    if !self.nodes[usize::from(victim)].draining {
                        self.demote(victim);
                    }
                    continue;
                }
                self.log(|| format!("operator: connect --discard-my-data on n{victim} (pair n{a}-n{b})"));
                let survivor = if victim == a { b } else { a };
                self.nodes[usize::from(victim)].discard_my_data = true;
                self.nodes[usize::from(survivor)].discard_my_data = false;
                for (x, y) in [(a, b), (b, a)] {
                    self.nodes[usize::from(x)].peer_mut(y).want_connect = true;
                }
                self.with_node(victim, |_, _| Ok(()));
            }
        }
    }

    /// The cluster's state, for a report.
    fn describe(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let uuid = n.meta.as_ref().map_or(0, |m| m.sb.uuids.current);
            out += &format!("  n{} up={} {} {} uuid={uuid:X} data={:?}\n", n.id, n.up, n.role, n.disk, n.data.blocks());
            for p in &n.peers {
                let link =
                    p.link.as_ref().map_or("-".to_string(), |l| format!("{} pending={:?}", l.repl, l.pending_sync));
                out += &format!("     n{}: want={} {link}\n", p.id, p.want_connect);
            }
        }
        out
    }
}
