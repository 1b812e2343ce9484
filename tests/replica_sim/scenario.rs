//! One seed: a cluster of two or three data nodes and up to three diskless witnesses, all voting
//! under quorum, a client writing and reading through whichever data node is primary, a cluster
//! manager that promotes a data node when none is primary (and demotes one that was
//! superseded or whose disk failed a write), and random faults (partitions, power losses,
//! killed processes) on any node. The seed also draws, from a generator of its own, the
//! resource's options (checksum resync, pull-ahead), an online verify and a failing disk. Then
//! everything heals and the checkers look at what the client was told, what the verifies found
//! and what the data disks hold.

use super::rng::Rng;
use super::world::{DataDisk, Event, Options, Shape, Time, World, MS, PAGE, SEC};
use blkrepl::config::{Fencing, Protocol};
use blkrepl::core::quorum::OnNoQuorum;
use blkrepl::core::resync_rate::RateLimits;
use blkrepl::core::states::{DiskState, ReplState, Role};
use blkrepl::frontend::BlockRequest;
use blkrepl::replica::{PromoteRefusal, PromoteStep};
use std::collections::BTreeMap;

/// Blocks the client writes: one 4 KiB page at the start of each MiB (eight activity-log
/// extents, one more than the log holds).
pub const BLOCKS: u64 = 32;
const BLOCK_STRIDE: u64 = 1 << 20;
const FAULTY: Time = 20 * SEC;
/// Pull-ahead's fill mark: sixteen 4 KiB writes queued to a peer (a cut link holds its frames).
const PULL_AHEAD_FILL: u64 = 64 << 10;
/// The daemon's send queue, and one that fills with three writes of a page.
const SEND_QUEUE: usize = blkrepl::config::SEND_QUEUE_KIB as usize * 1024;
const SMALL_SEND_QUEUE: usize = 3 * 4096;
/// How long the cluster has to converge after the heal, or after a fault that struck later.
const SETTLE: Time = 30 * SEC;
/// Windows of `SETTLE` more, at most, for resyncs still moving at the end of one: a chain of
/// whole-device resyncs at the slow rate (each waiting for the last, one target at a time) can
/// outlast a window (seed 205246: four, the last 8 s long, begun 22 s after the heal). A resync
/// that stalls gets none and fails the convergence checker as before.
const MORE_WINDOWS_FOR_RESYNCS: u32 = 3;
/// The configuration's default resync rate bounds, and slow ones for a quarter of the seeds: a
/// full sync of the simulated device then takes 8 s or more, so faults strike mid-resync.
const DEFAULT_RESYNC: RateLimits = RateLimits {
    max_bytes_per_s: blkrepl::config::DEFAULT_RESYNC_RATE_MAX_KIB * 1024,
    min_bytes_per_s: blkrepl::config::DEFAULT_RESYNC_RATE_MIN_KIB * 1024,
};
/// Bitmap blocks a quarter of the seeds use instead of 4 KiB: a bit then covers several of the
/// client's blocks, or the whole 1 MiB stride between them.
const LARGE_BITMAP_BLOCKS: [u32; 3] = [64 << 10, 512 << 10, 1 << 20];
const SLOW_RESYNC: RateLimits = RateLimits { max_bytes_per_s: 4 << 20, min_bytes_per_s: 1 << 20 };

/// Scenario timers.
const CLIENT: u64 = 1;
const MANAGER: u64 = 2;
const FAULT: u64 = 3;
const RESTART: u64 = 4;
const HEAL: u64 = 5;
/// Asks the candidates again whether their election is over.
const CAMPAIGN: u64 = 6;
/// Starts an online verify on the primary (tried again until one starts).
const VERIFY: u64 = 7;
/// A data node's disk starts failing some reads and writes for a while.
const DISK_FAULT: u64 = 8;
/// A clean stop's second half: the goodbye had time to arrive (see `World::stop`).
const STOP: u64 = 9;

/// The cluster shapes a seed chooses from.
pub const SHAPES: [Shape; 8] = [
    Shape { data: 2, witnesses: 0 },
    Shape { data: 2, witnesses: 1 },
    Shape { data: 2, witnesses: 2 },
    Shape { data: 2, witnesses: 3 },
    Shape { data: 3, witnesses: 0 },
    Shape { data: 3, witnesses: 1 },
    Shape { data: 3, witnesses: 2 },
    Shape { data: 3, witnesses: 3 },
];

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub acked_writes: u64,
    pub reads_checked: u64,
    pub promotions: u64,
    pub power_losses: u64,
    pub kills: u64,
    /// `down` of a secondary or witness (`Replica::leave`, metadata written clean) and `up`.
    pub clean_stops: u64,
    /// `disconnect` of a node, and its `connect` at the next heal.
    pub disconnects: u64,
    /// Devices left behind by a primary's killed process that served again (their filesystem
    /// carried on), and those given up (another node may have written).
    pub resumed_devices: u64,
    pub given_up_devices: u64,
    pub partitions: u64,
    pub divergences: u64,
    pub bitmap_resyncs: u64,
    pub full_resyncs: u64,
    /// Full syncs into a disk that never held data (no bitmap could replace them).
    pub first_syncs: u64,
    /// Resync data sent, runs of zeroes by their length: what the resyncs cost, resent blocks
    /// included.
    pub resync_bytes: u64,
    /// Seeds whose resyncs send checksums first, and whose primaries pull ahead of a congested
    /// peer (protocol A).
    pub csums_seeds: u64,
    pub pull_ahead_seeds: u64,
    /// Seeds whose send queues hold three pages, and the writes that waited for room in one.
    pub small_queue_seeds: u64,
    pub writes_waited_for_room: u64,
    /// Seeds whose resyncs and verifies are paced at `SLOW_RESYNC`, and with bitmap blocks
    /// from `LARGE_BITMAP_BLOCKS`.
    pub slow_resync_seeds: u64,
    pub large_block_seeds: u64,
    /// Online verifies that ran to their end, and the bytes they found differing.
    pub verifies: u64,
    pub verify_found_bytes: u64,
    /// Seeds with a failing disk, those where it failed something after the heal, and the
    /// local writes, reads, flushes and metadata writes that failed.
    pub disk_fault_seeds: u64,
    pub late_fault_seeds: u64,
    /// Seeds whose resyncs still moved at the end of the window (see `MORE_WINDOWS_FOR_RESYNCS`).
    pub long_resync_seeds: u64,
    pub failed_writes: u64,
    pub failed_reads: u64,
    pub failed_flushes: u64,
    pub failed_meta_writes: u64,
    /// Seeds under `fencing = "resource-only"` and `"resource-and-stonith"`, the fence-peer
    /// runs, those whose primary outdated itself (exit code 6), and `resume-io`s.
    pub fencing_seeds: [u64; 2],
    pub fence_runs: u64,
    pub fence_self_outdated: u64,
    pub resume_ios: u64,
    /// Seeds under `on_no_quorum = "io-error"` (the others suspend I/O).
    pub io_error_seeds: u64,
    /// Seeds whose client also writes zeroes and discards, and how many of those it had
    /// acknowledged.
    pub zeroes_seeds: u64,
    pub acked_zeroes: u64,
    pub virtual_us: u64,
    /// Seeds run per shape, in the order of [`SHAPES`].
    pub seeds_by_shape: [u64; SHAPES.len()],
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.acked_writes += o.acked_writes;
        self.reads_checked += o.reads_checked;
        self.promotions += o.promotions;
        self.power_losses += o.power_losses;
        self.kills += o.kills;
        self.clean_stops += o.clean_stops;
        self.disconnects += o.disconnects;
        self.resumed_devices += o.resumed_devices;
        self.given_up_devices += o.given_up_devices;
        self.partitions += o.partitions;
        self.divergences += o.divergences;
        self.bitmap_resyncs += o.bitmap_resyncs;
        self.full_resyncs += o.full_resyncs;
        self.first_syncs += o.first_syncs;
        self.resync_bytes += o.resync_bytes;
        self.csums_seeds += o.csums_seeds;
        self.pull_ahead_seeds += o.pull_ahead_seeds;
        self.small_queue_seeds += o.small_queue_seeds;
        self.writes_waited_for_room += o.writes_waited_for_room;
        self.slow_resync_seeds += o.slow_resync_seeds;
        self.large_block_seeds += o.large_block_seeds;
        self.verifies += o.verifies;
        self.verify_found_bytes += o.verify_found_bytes;
        self.disk_fault_seeds += o.disk_fault_seeds;
        self.late_fault_seeds += o.late_fault_seeds;
        self.long_resync_seeds += o.long_resync_seeds;
        self.failed_writes += o.failed_writes;
        self.failed_reads += o.failed_reads;
        self.failed_flushes += o.failed_flushes;
        self.failed_meta_writes += o.failed_meta_writes;
        for (mine, theirs) in self.fencing_seeds.iter_mut().zip(o.fencing_seeds) {
            *mine += theirs;
        }
        self.fence_runs += o.fence_runs;
        self.fence_self_outdated += o.fence_self_outdated;
        self.resume_ios += o.resume_ios;
        self.io_error_seeds += o.io_error_seeds;
        self.zeroes_seeds += o.zeroes_seeds;
        self.acked_zeroes += o.acked_zeroes;
        self.virtual_us += o.virtual_us;
        for (mine, theirs) in self.seeds_by_shape.iter_mut().zip(o.seeds_by_shape) {
            *mine += theirs;
        }
    }
}

#[derive(Debug)]
enum Pending {
    /// A write of `version` to `span` blocks from `block` on: one block's page of data, or
    /// zeroes (a write-zeroes or a discard) over whole blocks and the gaps between them.
    Write { block: u64, span: u64, version: u64, fua: bool, zeroes: bool },
    /// A read, with the version it must return at least, and the newest version every data
    /// node had (see `Scenario::everywhere`).
    Read { block: u64, at_least: u64, everywhere: u64 },
    /// A FLUSH, with the acknowledged versions it makes durable.
    Flush { covers: Vec<u64> },
}

fn page(block: u64, version: u64) -> Vec<u8> {
    let mut data = vec![0u8; PAGE as usize];
    data[..8].copy_from_slice(&version.to_le_bytes());
    data[8..16].copy_from_slice(&block.to_le_bytes());
    data
}

/// The version a page of data holds: 0 for zeroes (never written, or zeroed; see
/// [`Scenario::version_of`]).
fn version_in(data: &[u8]) -> u64 {
    u64::from_le_bytes(data[..8].try_into().expect("8 bytes"))
}

pub struct Scenario {
    pub world: World,
    pub stats: Stats,
    next_request: u64,
    next_version: u64,
    /// Where the client sends its requests.
    target: Option<u8>,
    pending: BTreeMap<u64, (u8, Pending)>,
    /// Per block, the newest acknowledged version and the primary tenure that acknowledged it:
    /// that tenure reads it back whatever the protocol.
    acked: Vec<(u64, u8, u64)>,
    /// Per block, the newest version made durable by a FUA write or a completed FLUSH after it:
    /// every later primary holds it, whatever the protocol and power losses (volatile caches
    /// and protocol A may lose the others at a failover, as DRBD's do).
    durable: Vec<u64>,
    /// Per block, the newest version acknowledged under protocol B or C while every data node
    /// followed its primary (`world::every_data_peer_follows`), in a seed with no failing disk,
    /// since the last power loss: every node had it, and kept it through a lost primary, a
    /// killed process (what was handed to the kernel lands), a partition. Only a power loss
    /// (volatile caches) or a failing disk may take it from a node, as they may from DRBD's.
    everywhere: Vec<u64>,
    /// Per node, its primary tenures so far.
    tenure: Vec<u64>,
    /// Nodes killed as primary whose device the kernel still holds, with the versions of the
    /// client's blocks on their disk then: what the filesystem on the device last saw.
    /// Each block's versions that may be found: the one on disk then, and those of the writes
    /// still unanswered, which the kernel re-issues to the device once it serves again.
    left_behind: Vec<(u8, Vec<Vec<u64>>)>,
    /// Per data node, its disk's failed flushes when its last tenure began: a tenure whose
    /// disk failed a flush told its filesystem (EIO) that unflushed writes may be gone.
    flushes_failed_before: Vec<u64>,
    /// A checker that failed inside a step whose own result is a refusal's reason (a promotion).
    broken: Option<String>,
    /// Down nodes, restarted by a RESTART timer.
    down: Vec<u8>,
    /// Nodes the operator disconnected (`connect` at the next heal).
    disconnected: Vec<u8>,
    /// A node between the two halves of a clean stop.
    stopping: Option<u8>,
    /// Primaries stepping down: once their writes are done, a last flush (its request id once
    /// sent), then the end of the demotion, as the daemon does.
    demoting: Vec<(u8, Option<u64>)>,
    /// The demotion flushes answered.
    flushed: Vec<u64>,
    /// Nodes waiting for the votes that would promote them.
    campaigns: Vec<u8>,
    faults_on: bool,
    /// When the seed's online verify is due, if it has one.
    verify_at: Option<Time>,
    /// When a data node's disk starts failing, which one, and for how long, if one does.
    disk_fault: Option<(Time, u8, Time)>,
    /// Whether the client writes zeroes and discards too.
    zeroes: bool,
    /// Per block, the versions of the zeroes written to it so far (acknowledged or not).
    zeroed: Vec<Vec<u64>>,
}

impl Scenario {
    /// Seed `seed` in `shape`.
    pub fn new(seed: u64, shape: Shape, tracing: bool) -> Scenario {
        let protocol = [Protocol::A, Protocol::B, Protocol::C][(seed % 3) as usize];
        // The options come from their own generator: a seed's course without them stays as it
        // was before they existed.
        let mut draw = Rng::new(!seed);
        let csums = draw.percent(25);
        let congestion_fill = (protocol == Protocol::A && draw.percent(50)).then_some(PULL_AHEAD_FILL);
        let verify_at = draw.percent(25).then(|| draw.range(SEC, FAULTY + SETTLE / 2));
        let disk_fault = draw.percent(25).then(|| (draw.range(SEC, FAULTY), draw.below(usize::from(shape.data)) as u8, draw.range(200 * MS, 2 * SEC)));
        let resync_rate = if draw.percent(25) { SLOW_RESYNC } else { DEFAULT_RESYNC };
        let bitmap_block_size = if draw.percent(25) { draw.pick(&LARGE_BITMAP_BLOCKS) } else { 4096 };
        let fencing = draw.pick(&[Fencing::DontCare, Fencing::ResourceOnly, Fencing::ResourceAndStonith]);
        // Above pull-ahead's fill mark, as the daemon's configuration requires; else writes
        // wait for room behind three pages in half of the seeds.
        let send_queue_bytes = match congestion_fill {
            Some(fill) => 2 * fill as usize,
            None if draw.percent(50) => SMALL_SEND_QUEUE,
            None => SEND_QUEUE,
        };
        let on_no_quorum = if draw.percent(25) { OnNoQuorum::IoError } else { OnNoQuorum::SuspendIo };
        let zeroes = draw.percent(33);
        let options = Options { csums, congestion_fill, send_queue_bytes, resync_rate, bitmap_block_size, fencing, on_no_quorum };
        if tracing {
            let (data, witnesses): (Vec<u8>, Vec<u8>) = (shape.data_nodes().collect(), shape.witness_nodes().collect());
            println!("seed {seed}: shape {shape}: data nodes {data:?}, witnesses {witnesses:?}, protocol {protocol:?}, {options:?}, zeroes {zeroes}, verify at {verify_at:?}, failing disk (at, node, for) {disk_fault:?}, µs after the first promotion");
        }
        let mut world = World::new(seed, shape, protocol, options, tracing);
        world.trace_offset = std::env::var("BLKREPL_SIM_TRACE_BLOCK").ok().and_then(|b| b.parse::<u64>().ok()).unwrap_or(0) * BLOCK_STRIDE;
        let mut stats = Stats {
            csums_seeds: options.csums.into(),
            pull_ahead_seeds: options.congestion_fill.is_some().into(),
            small_queue_seeds: (options.send_queue_bytes == SMALL_SEND_QUEUE).into(),
            slow_resync_seeds: (options.resync_rate == SLOW_RESYNC).into(),
            large_block_seeds: (options.bitmap_block_size != 4096).into(),
            disk_fault_seeds: disk_fault.is_some().into(),
            fencing_seeds: [(options.fencing == Fencing::ResourceOnly).into(), (options.fencing == Fencing::ResourceAndStonith).into()],
            io_error_seeds: (options.on_no_quorum == OnNoQuorum::IoError).into(),
            zeroes_seeds: zeroes.into(),
            ..Stats::default()
        };
        stats.seeds_by_shape[SHAPES.iter().position(|s| *s == shape).expect("one of the shapes")] = 1;
        Scenario {
            world,
            stats,
            next_request: 0,
            next_version: 0,
            target: None,
            pending: BTreeMap::new(),
            acked: vec![(0, 0, 0); BLOCKS as usize],
            durable: vec![0; BLOCKS as usize],
            everywhere: vec![0; BLOCKS as usize],
            tenure: vec![0; usize::from(shape.data)],
            left_behind: Vec::new(),
            flushes_failed_before: vec![0; usize::from(shape.data)],
            broken: None,
            down: Vec::new(),
            disconnected: Vec::new(),
            stopping: None,
            demoting: Vec::new(),
            flushed: Vec::new(),
            campaigns: Vec::new(),
            faults_on: true,
            verify_at,
            disk_fault,
            zeroes,
            zeroed: vec![Vec::new(); BLOCKS as usize],
        }
    }

    /// Runs the seed; the error says which checker failed and why.
    pub fn run(&mut self) -> Result<(), String> {
        self.initial_sync()?;
        let w = &mut self.world;
        w.at(w.now + 10 * MS, Event::Scenario(CLIENT));
        w.at(w.now + 50 * MS, Event::Scenario(MANAGER));
        let first_fault = w.now + w.rng.range(300 * MS, 2 * SEC);
        w.at(first_fault, Event::Scenario(FAULT));
        if let Some(after) = self.verify_at {
            w.at(w.now + after, Event::Scenario(VERIFY));
        }
        if let Some((after, _, _)) = self.disk_fault {
            w.at(w.now + after, Event::Scenario(DISK_FAULT));
        }
        let end_of_faults = self.world.now + FAULTY;
        self.run_until(end_of_faults)?;
        // Everything heals: links, nodes; the client stops writing. A clean stop under way
        // ends first (its second half is due within 50 ms).
        self.faults_on = false;
        if self.stopping.is_some() {
            self.run_until(self.world.now + 50 * MS)?;
        }
        self.heal();
        for id in std::mem::take(&mut self.down) {
            self.world.start(id);
        }
        // The cluster settles from the last fault, which may strike after the heal: a failing
        // disk's I/O fails until its time is up, and the metadata write it dooms (the nth
        // after it began to fail, see `World::fail_disk`) fails whenever it comes. Seed
        // 292079: that write detached a disk 8 s after the heal; the whole-disk resyncs that
        // followed, at 1-4 MiB/s, ended 23 s after it, past a window timed from the heal.
        let healed = self.world.now;
        let mut settled = healed + SETTLE;
        let (mut more_windows, mut resynced) = (MORE_WINDOWS_FOR_RESYNCS, self.world.resync_bytes_sent);
        loop {
            self.run_until(settled)?;
            let after_last_fault = self.world.last_fault + SETTLE;
            if after_last_fault > settled {
                settled = after_last_fault;
                continue;
            }
            let moving = self.world.resyncing() && self.world.resync_bytes_sent > resynced;
            if !moving || more_windows == 0 {
                break;
            }
            (more_windows, resynced) = (more_windows - 1, self.world.resync_bytes_sent);
            self.stats.long_resync_seeds = 1;
            settled += SETTLE;
        }
        self.stats.virtual_us = self.world.now;
        self.stats.late_fault_seeds = (self.world.last_fault > healed).into();
        self.stats.divergences = self.world.divergences();
        [self.stats.bitmap_resyncs, self.stats.full_resyncs, self.stats.first_syncs] = self.world.resyncs();
        self.stats.resync_bytes = self.world.resync_bytes_sent;
        (self.stats.failed_writes, self.stats.failed_reads, self.stats.failed_flushes, self.stats.failed_meta_writes) =
            (self.world.failed_writes, self.world.failed_reads, self.world.failed_flushes, self.world.failed_meta_writes);
        self.stats.writes_waited_for_room = self.world.writes_waited_for_room;
        (self.stats.fence_runs, self.stats.fence_self_outdated) = (self.world.fence_runs, self.world.fence_self_outdated);
        self.check_converged()?;
        self.check_answered()?;
        self.check_verifies()
    }

    /// After the faults healed: every request the client sent to a node that is still up was
    /// answered (none waits for ever: for quorum, room in a send queue, a peer or a flush).
    /// The message names what holds the node's requests: quorum (with each peer's view), fencing,
    /// a send queue.
    fn check_answered(&self) -> Result<(), String> {
        let Some((request, (node, pending))) = self.pending.iter().next() else { return Ok(()) };
        let now = self.world.instant();
        let state = self.world.replica(*node).map(|r| {
            let view = |p: &blkrepl::replica::Peer| {
                let state = p.last_state.map(|s| format!("term {}, current {:016X}", s.term, s.current_uuid));
                format!("n{} {} ({}), queued {}", p.node_id, p.repl, state.unwrap_or_default(), p.queued_bytes)
            };
            let peers: Vec<String> = r.peers.iter().map(view).collect();
            format!(
                "{} {}, terms (highest, of data) {:?}, admission {:?} ({:?}, fencing: {:?}), {} writes waiting for room, {} held, writes idle: {}, peers: {}",
                r.role,
                r.disk,
                (r.sb.terms.highest, r.sb.terms.of_data),
                r.admission(now),
                r.quorum(now),
                r.io_suspended(),
                r.awaiting_room(),
                r.held_count(),
                r.writes_idle(),
                peers.join(", ")
            )
        });
        Err(format!(
            "checker 7 (every request answered): n{node} never answered request {request} ({pending:?}) nor the {} others after healing; n{node}: {}",
            self.pending.len() - 1,
            state.unwrap_or_else(|| "down".into())
        ))
    }

    /// Fresh data nodes are declared in sync without copying, and node 0 is promoted (the
    /// witnesses only learn its generation).
    fn initial_sync(&mut self) -> Result<(), String> {
        let until = self.world.now + 2 * SEC;
        self.world.run_until(until);
        let connected = self.world.shape.nodes().skip(1).all(|p| self.world.replica(0).is_some_and(|r| r.peer(p).connected && r.peer(p).last_state.is_some()));
        if !connected {
            return Err("the nodes did not connect".into());
        }
        self.world.refused = None;
        self.world.replica_mut(0).expect("up").new_current_uuid(true).map_err(|e| format!("new-current-uuid: {e}"))?;
        self.world.carry_out(0);
        let until = self.world.now + SEC;
        self.world.run_until(until);
        // Every node takes the declared generation as it is; the declarations race the States
        // of the nodes already declared, and no decision taken on them may refuse a link.
        if let Some(refused) = self.world.refused.take() {
            return Err(format!("checker 10 (the declaration in sync drops no link): {refused}"));
        }
        self.campaigns.push(0);
        let until = self.world.now + SEC;
        while !self.campaigns.is_empty() && self.world.now < until {
            self.campaign();
            let next = self.world.now + MS;
            self.world.run_until(next);
        }
        self.world_kept_its_rules()?;
        match self.world.primaries()[..] {
            [0] => Ok(()),
            ref other => Err(format!("first promotion: primaries {other:?}")),
        }
    }

    /// Fails the seed on what a replica asked that the world refused (see `World::violation`).
    fn world_kept_its_rules(&mut self) -> Result<(), String> {
        match self.world.violation.take() {
            Some(violation) => Err(format!("the world refused what a replica asked: {violation}")),
            None => Ok(()),
        }
    }

    fn run_until(&mut self, until: Time) -> Result<(), String> {
        loop {
            let step = self.world.run_until(until);
            self.take_answers()?;
            if let Some(failed) = self.broken.take() {
                return Err(failed);
            }
            match step {
                None => return Ok(()),
                Some(CLIENT) => self.client(),
                Some(MANAGER) => self.manager(),
                Some(FAULT) => self.fault(),
                Some(RESTART) => {
                    if let Some(id) = self.down.first().copied() {
                        self.down.remove(0);
                        self.world.start(id);
                    }
                }
                Some(HEAL) => self.heal(),
                Some(STOP) => {
                    if let Some(id) = self.stopping.take() {
                        self.world.stop(id);
                    }
                }
                Some(CAMPAIGN) => self.campaign(),
                Some(VERIFY) => self.verify(),
                Some(DISK_FAULT) => {
                    let (_, node, lasting) = self.disk_fault.expect("scheduled with it");
                    let until = self.world.now + lasting;
                    self.world.fail_disk(node, until);
                    self.world.log(node, || format!("disk failing for {lasting} µs"));
                }
                Some(other) => unreachable!("scenario step {other}"),
            }
            self.take_answers()?;
            self.world_kept_its_rules()?;
        }
    }

    /// Asks every candidate's replica whether it may be promoted yet: promoted, refused, or
    /// asked again in a millisecond.
    fn campaign(&mut self) {
        let mut waiting = Vec::new();
        for id in std::mem::take(&mut self.campaigns) {
            match self.promote(id) {
                Ok(true) => {}
                Ok(false) => waiting.push(id),
                Err(why) => self.world.log(id, || format!("not promoted: {why}")),
            }
        }
        if !waiting.is_empty() {
            let w = &mut self.world;
            w.at(w.now + MS, Event::Scenario(CAMPAIGN));
        }
        self.campaigns = waiting;
    }

    /// Starts the seed's online verify on the primary, or tries again in half a second (no
    /// primary, or it has no peer to verify against yet).
    fn verify(&mut self) {
        let started = match self.world.primaries().first() {
            Some(&primary) => self.world.start_verify(primary).map_err(|why| self.world.log(primary, || format!("verify refused: {why}"))).is_ok(),
            None => false,
        };
        if !started {
            let w = &mut self.world;
            w.at(w.now + 500 * MS, Event::Scenario(VERIFY));
        }
    }

    /// One step of `id`'s promotion: whether it is primary now (`false`: still waiting for votes).
    /// A node whose device was left behind resumes it with this promotion, or gives it up.
    fn promote(&mut self, id: u8) -> Result<bool, String> {
        let now = self.world.instant();
        let replica = self.world.replica_mut(id).ok_or("down")?;
        let resuming = replica.has_left_behind();
        let step = replica.promote(now, false);
        self.world.carry_out(id);
        let step = match step {
            Err(PromoteRefusal::LeftBehindStale { why }) => {
                self.stats.given_up_devices += 1;
                self.left_behind.retain(|(n, _)| *n != id);
                return Err(why);
            }
            step => step.map_err(|e| e.to_string())?,
        };
        if !matches!(step, PromoteStep::Promoted(_)) {
            return Ok(false);
        }
        let replica = self.world.replica_mut(id).expect("up");
        replica.promoted();
        self.world.carry_out(id);
        self.stats.promotions += 1;
        let failed_flushes = self.world.nodes[usize::from(id)].data.as_ref().expect("a data node").failed_flushes;
        let cache_dropped = failed_flushes > self.flushes_failed_before[usize::from(id)];
        if resuming && !cache_dropped {
            self.world.log(id, || "promoted: the device left behind serves again".into());
            if let Err(failed) = self.check_resumed(id) {
                self.broken.get_or_insert(failed);
            }
        } else {
            // A device that failed a flush serves again as a new tenure would: its filesystem
            // knows unflushed writes may be gone (checkers 1 and 5 still hold what was durable).
            self.stats.resumed_devices += u64::from(resuming);
            self.left_behind.retain(|(n, _)| *n != id);
            self.world.log(id, || if resuming { "promoted: the device left behind serves again (its disk failed a flush)" } else { "promoted" }.into());
            self.tenure[usize::from(id)] += 1;
            self.flushes_failed_before[usize::from(id)] = failed_flushes;
        }
        self.target = Some(id);
        Ok(true)
    }

    /// Checker 8: a device left behind serves again only over the data its filesystem last
    /// saw (nobody wrote meanwhile, no resync took a block back); its tenure goes on, so
    /// checker 1 then holds its reads to what it acknowledged before its process died.
    fn check_resumed(&mut self, id: u8) -> Result<(), String> {
        self.stats.resumed_devices += 1;
        let Some(at) = self.left_behind.iter().position(|(n, _)| *n == id) else {
            return Err(format!("n{id} resumed a device left behind that no killed primary left"));
        };
        let (_, then) = self.left_behind.remove(at);
        let now = self.versions_on(id);
        let found = |b: usize| then[b].iter().any(|v| self.same_bytes_as(b as u64, *v) == self.same_bytes_as(b as u64, now[b]));
        match (0..BLOCKS as usize).find(|b| !found(*b)) {
            Some(block) => Err(format!(
                "checker 8 (a device left behind serves again only on its own data): n{id} resumed its device with version {} of block {block}, its filesystem last saw {:?} (on disk, or unanswered)",
                now[block], then[block]
            )),
            None => Ok(()),
        }
    }

    /// The version of each of the client's blocks on data node `id`'s disk.
    fn versions_on(&self, id: u8) -> Vec<u64> {
        let disk = self.world.nodes[usize::from(id)].data.as_ref().expect("a data node");
        (0..BLOCKS).map(|block| self.version_of(block, &disk.read(block * BLOCK_STRIDE, 16))).collect()
    }

    /// The cluster manager: a primary that was superseded steps down; with no primary, a node
    /// the replica lets promote is promoted.
    fn manager(&mut self) {
        let now = self.world.instant();
        for id in self.world.primaries() {
            // A primary failing requests after its fence-peer handler failed: sometimes the
            // operator runs `resume-io` (quorum still guards what completes).
            let fence_failed = self.world.replica(id).is_some_and(|r| r.io_suspended() == Some("fence-failed"));
            if fence_failed && self.world.rng.percent(10) {
                self.world.replica_mut(id).expect("up").resume_io(now).expect("fencing failed requests");
                self.stats.resume_ios += 1;
                self.world.carry_out(id);
            }
            let replica = self.world.replica_mut(id).expect("up");
            // A primary whose disk failed a write serves nothing, nor one that outdated itself
            // for a primary peer (fence-peer's exit code 6): the manager's monitor sees it
            // (`status`) and demotes it, as Pacemaker would.
            let failed = replica.io_failed.is_some() || replica.disk == DiskState::Outdated;
            // A superseded primary steps down as the daemon's `on_suspended_primary_outdated =
            // "force-secondary"` has it (`superseded_action`, then `step_down`).
            let mut superseded = || replica.superseded_action(now) && replica.step_down(now).is_some();
            if !self.demoting.iter().any(|(d, _)| *d == id) && (failed || superseded()) {
                replica.begin_demotion(now);
                self.world.carry_out(id);
                self.demoting.push((id, None));
            }
        }
        for (id, flush) in std::mem::take(&mut self.demoting) {
            let Some(r) = self.world.replica_mut(id) else { continue };
            match flush {
                None if r.writes_idle() => {
                    self.next_request += 1;
                    self.world.submit(id, self.next_request, BlockRequest::Flush);
                    self.demoting.push((id, Some(self.next_request)));
                }
                Some(request) if self.flushed.contains(&request) => {
                    r.finish_demotion();
                    self.world.carry_out(id);
                }
                _ => self.demoting.push((id, flush)),
            }
        }
        // A detached node (a metadata write failed, see `Replica::detach`) takes no part until
        // `down` and `up`: the operator, told by `status` and the log, runs them once it is
        // Secondary. Its `down` writes nothing, as a killed process does not.
        let detached: Vec<u8> = self
            .world
            .shape
            .data_nodes()
            .filter(|id| self.world.replica(*id).is_some_and(|r| r.detached() && r.role == Role::Secondary))
            .filter(|id| !self.demoting.iter().any(|(d, _)| d == id))
            .collect();
        for id in detached {
            self.world.log(id, || "detached: down and up".into());
            // `down` demotes first, which gives up a device left behind (see `World::stop`).
            self.world.replica_mut(id).expect("up").give_up_left_behind();
            self.world.crash(id, false);
            self.pending.retain(|_, (node, _)| *node != id);
            self.down.push(id);
            let w = &mut self.world;
            let restart = w.now + w.rng.range(300 * MS, 3 * SEC);
            w.at(restart, Event::Scenario(RESTART));
        }
        // The daemon's own retries (`Engine::resume`): a node whose device was left behind tries
        // the promotion that re-attaches it, whoever else is primary (the replica gives the
        // device up once another node may have written).
        let resuming: Vec<u8> = self
            .world
            .shape
            .data_nodes()
            .filter(|id| self.world.replica(*id).is_some_and(|r| r.has_left_behind()) && !self.campaigns.contains(id))
            .collect();
        for id in resuming {
            match self.promote(id) {
                Ok(true) => {}
                Ok(false) => {
                    if self.campaigns.is_empty() {
                        let w = &mut self.world;
                        w.at(w.now + MS, Event::Scenario(CAMPAIGN));
                    }
                    self.campaigns.push(id);
                }
                Err(why) => self.world.log(id, || format!("device left behind not resumed: {why}")),
            }
        }
        // As a cluster manager on the majority's side would: a primary cut off from it does not
        // count (the replica refuses a promotion that would make two primaries).
        // Sometimes every node's own promoter runs at once (the built-in promoter, or managers
        // on both sides of a partition): the replicas' election must keep it to one primary.
        let serving = self
            .world
            .primaries()
            .into_iter()
            .any(|p| self.world.replica(p).is_some_and(|r| r.quorum(now).has_quorum && r.io_failed.is_none()));
        if !serving && self.campaigns.is_empty() {
            let mut candidates: Vec<u8> =
                self.world.shape.data_nodes().filter(|id| self.world.is_up(*id) && !self.world.primaries().contains(id)).collect();
            let all_at_once = self.world.rng.below(4) == 0;
            while !candidates.is_empty() {
                let id = candidates.remove(self.world.rng.below(candidates.len()));
                match self.promote(id) {
                    Ok(true) => break,
                    Ok(false) => {
                        self.campaigns.push(id);
                        if !all_at_once {
                            break;
                        }
                    }
                    Err(why) => self.world.log(id, || format!("not promoted: {why}")),
                }
            }
            if !self.campaigns.is_empty() {
                let w = &mut self.world;
                w.at(w.now + MS, Event::Scenario(CAMPAIGN));
            }
        }
        let w = &mut self.world;
        w.at(w.now + 200 * MS, Event::Scenario(MANAGER));
    }

    fn client(&mut self) {
        let w = &mut self.world;
        let next = w.now + w.rng.range(2 * MS, 20 * MS);
        w.at(next, Event::Scenario(CLIENT));
        if !self.faults_on {
            return;
        }
        let primaries = self.world.primaries();
        if !self.target.is_some_and(|t| primaries.contains(&t)) {
            self.target = primaries.first().copied();
        }
        let Some(node) = self.target else { return };
        if self.pending.len() >= 8 {
            return;
        }
        let block = self.world.rng.range(0, BLOCKS);
        let busy = self.busy(block);
        self.next_request += 1;
        let request = self.next_request;
        let offset = block * BLOCK_STRIDE;
        if self.world.rng.percent(25) {
            let (version, by, tenure) = self.acked[block as usize];
            let same_tenure = by == node && tenure == self.tenure[usize::from(node)];
            let at_least = if same_tenure { version } else { self.durable[block as usize] };
            let everywhere = self.everywhere[block as usize];
            self.pending.insert(request, (node, Pending::Read { block, at_least, everywhere }));
            self.world.submit(node, request, BlockRequest::Read { offset, len: PAGE as u32 });
        } else if busy || self.world.rng.percent(10) {
            // A flush covers what this tenure acknowledged (another primary's writes may never
            // have reached this one).
            let tenure = self.tenure[usize::from(node)];
            let covers = self.acked.iter().map(|&(version, by, t)| if by == node && t == tenure { version } else { 0 }).collect();
            self.pending.insert(request, (node, Pending::Flush { covers }));
            self.world.submit(node, request, BlockRequest::Flush);
        } else {
            self.next_version += 1;
            let version = self.next_version;
            let fua = self.world.rng.percent(10);
            if self.zeroes && self.world.rng.percent(20) {
                // Zeroes over one to three blocks (a request of up to 2 MiB, in pieces), the
                // blocks after the first only while no write to them is pending.
                let most = self.world.rng.range(1, 4).min(BLOCKS - block);
                let span = (1..most).take_while(|i| !self.busy(block + i)).count() as u64 + 1;
                let len = ((span - 1) * BLOCK_STRIDE + PAGE) as u32;
                for zeroed in &mut self.zeroed[block as usize..(block + span) as usize] {
                    zeroed.push(version);
                }
                let discard = self.world.rng.percent(50);
                self.pending.insert(request, (node, Pending::Write { block, span, version, fua: fua && !discard, zeroes: true }));
                let zeroes = match discard {
                    true => BlockRequest::Discard { offset, len },
                    false => BlockRequest::WriteZeroes { offset, len, fua },
                };
                self.world.submit(node, request, zeroes);
            } else {
                self.pending.insert(request, (node, Pending::Write { block, span: 1, version, fua, zeroes: false }));
                self.world.submit(node, request, BlockRequest::Write { offset, data: page(block, version).into(), fua });
            }
        }
    }

    /// Whether a write to `block` is pending (the client never has two at once).
    fn busy(&self, block: u64) -> bool {
        self.pending.values().any(|(_, p)| matches!(p, Pending::Write { block: b, span, .. } if (*b..*b + *span).contains(&block)))
    }

    /// The version block `block`'s page `data` holds. Zeroes are the newest zeroes written to
    /// the block so far, acknowledged or not (a checker asks whether the page may be what the
    /// client wrote last, and zeroes cannot tell which of them it is); a block never zeroed
    /// and never written is version 0.
    fn version_of(&self, block: u64, data: &[u8]) -> u64 {
        match version_in(data) {
            0 => self.zeroed[block as usize].last().copied().unwrap_or(0),
            version => version,
        }
    }

    /// `version` of `block`, with every version of zeroes (and 0, never written) taken as one:
    /// the same bytes.
    fn same_bytes_as(&self, block: u64, version: u64) -> u64 {
        if self.zeroed[block as usize].contains(&version) { 0 } else { version }
    }

    /// Checks every answer the client got: an acknowledged write raises its block's floor, a
    /// read on the primary never returns a version below the floor at its submission.
    fn take_answers(&mut self) -> Result<(), String> {
        for (node, request, result, everywhere) in std::mem::take(&mut self.world.answers) {
            let Some((sent_to, pending)) = self.pending.remove(&request) else {
                // A demotion's flush: its outcome does not matter, only that it is over.
                self.flushed.push(request);
                continue;
            };
            if self.world.tracing {
                let what = match &pending {
                    Pending::Write { block, span, version, fua, zeroes: false } => format!("write block {block} ({span}) v{version} fua {fua}"),
                    Pending::Write { block, span, version, fua, zeroes: true } => format!("zeroes blocks {block}+{span} v{version} fua {fua}"),
                    Pending::Read { block, at_least, .. } => format!("read block {block} (at least v{at_least})"),
                    Pending::Flush { .. } => "flush".into(),
                };
                let ok = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
                self.world.log(node, || format!("client: {what}: {ok:?}"));
            }
            debug_assert_eq!(sent_to, node);
            match (pending, result) {
                (Pending::Write { block, span, version, fua, zeroes }, Ok(_)) => {
                    self.stats.acked_writes += 1;
                    self.stats.acked_zeroes += u64::from(zeroes);
                    for block in (block..block + span).map(|b| b as usize) {
                        let acked = &mut self.acked[block];
                        if version > acked.0 {
                            *acked = (version, node, self.tenure[usize::from(node)]);
                        }
                        if fua {
                            let durable = &mut self.durable[block];
                            *durable = (*durable).max(version);
                        }
                        if everywhere && self.disk_fault.is_none() {
                            let held = &mut self.everywhere[block];
                            *held = (*held).max(version);
                        }
                    }
                }
                (Pending::Flush { covers }, Ok(_)) => {
                    for (durable, covered) in self.durable.iter_mut().zip(covers) {
                        *durable = (*durable).max(covered);
                    }
                }
                (Pending::Read { block, at_least, everywhere }, Ok(Some(data))) => {
                    self.stats.reads_checked += 1;
                    let found = self.version_of(block, &data);
                    if found < at_least {
                        return Err(format!(
                            "checker 1 (reads never stale): n{node} returned version {found} of block {block}, {at_least} was acknowledged (by this primary, or durably) before the read"
                        ));
                    }
                    if found < everywhere {
                        return Err(format!(
                            "checker 9 (a write every data node had stays): n{node} returned version {found} of block {block}, {everywhere} was on every data node before the read"
                        ));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The cut links heal, and the operator runs `connect` where it ran `disconnect` (on a node
    /// restarted since, which wants every peer again anyway, there is nothing to do).
    fn heal(&mut self) {
        self.world.heal_all();
        for id in std::mem::take(&mut self.disconnected) {
            self.world.connect(id);
        }
    }

    fn fault(&mut self) {
        if !self.faults_on {
            return;
        }
        let w = &mut self.world;
        let next = w.now + w.rng.range(500 * MS, 3 * SEC);
        w.at(next, Event::Scenario(FAULT));
        let nodes: Vec<u8> = self.world.shape.nodes().collect();
        let up: Vec<u8> = nodes.iter().copied().filter(|id| self.world.is_up(*id)).collect();
        match self.world.rng.below(3) {
            // A node, data node or witness, cut off from the others (the primary more often
            // than not).
            // Sometimes the operator's `disconnect` there instead (StandAlone until `connect`,
            // which the heal runs).
            0 | 1 => {
                let id = match self.target.filter(|_| self.world.rng.percent(60)) {
                    Some(primary) => primary,
                    None => self.world.rng.pick(&nodes),
                };
                if self.world.is_up(id) && self.world.rng.percent(15) {
                    self.world.disconnect(id);
                    self.stats.disconnects += 1;
                    self.disconnected.push(id);
                } else {
                    for other in nodes.iter().copied().filter(|o| *o != id) {
                        self.world.cut(id, other);
                    }
                    self.stats.partitions += 1;
                    self.world.log(id, || "partitioned".into());
                }
                let w = &mut self.world;
                let heal = w.now + w.rng.range(SEC, 6 * SEC);
                w.at(heal, Event::Scenario(HEAL));
            }
            // Sometimes an operator's `down` of a secondary or a witness, a restart a little
            // later. Not of a primary: its `down` is refused while the device is in use, and a
            // manager demotes it first (as here for one that steps down).
            _ if up.len() == nodes.len() && self.world.rng.percent(20) => {
                let primaries = self.world.primaries();
                let candidates: Vec<u8> = up.iter().copied().filter(|id| !primaries.contains(id) && !self.demoting.iter().any(|(d, _)| d == id)).collect();
                if candidates.is_empty() {
                    return;
                }
                let id = self.world.rng.pick(&candidates);
                self.world.leave(id);
                self.stats.clean_stops += 1;
                self.stopping = Some(id);
                self.pending.retain(|_, (node, _)| *node != id);
                self.down.push(id);
                let w = &mut self.world;
                w.at(w.now + 50 * MS, Event::Scenario(STOP));
                let restart = w.now + w.rng.range(300 * MS, 3 * SEC);
                w.at(restart, Event::Scenario(RESTART));
            }
            // A power loss or a killed process (one time in three), and a restart a little
            // later (at most one node down at a time).
            _ if up.len() == nodes.len() => {
                let id = self.world.rng.pick(&up);
                let power = !self.world.rng.percent(33);
                let primary = self.world.replica(id).is_some_and(|r| r.role == Role::Primary);
                self.world.crash(id, power);
                if power {
                    self.left_behind.retain(|(n, _)| *n != id);
                    self.everywhere.fill(0);
                } else if primary {
                    // What the kernel had been given landed (`World::crash`): the filesystem
                    // saw it written.
                    let mut versions: Vec<Vec<u64>> = self.versions_on(id).into_iter().map(|v| vec![v]).collect();
                    for (_, pending) in self.pending.values().filter(|(node, _)| *node == id) {
                        if let Pending::Write { block, span, version, .. } = pending {
                            for versions in &mut versions[*block as usize..(*block + *span) as usize] {
                                versions.push(*version);
                            }
                        }
                    }
                    self.left_behind.retain(|(n, _)| *n != id);
                    self.left_behind.push((id, versions));
                }
                if power {
                    self.stats.power_losses += 1;
                    self.world.log(id, || "power loss".into());
                } else {
                    self.stats.kills += 1;
                    self.world.log(id, || "process killed".into());
                }
                self.pending.retain(|_, (node, _)| *node != id);
                self.demoting.retain(|(d, _)| *d != id);
                self.down.push(id);
                let w = &mut self.world;
                let restart = w.now + w.rng.range(300 * MS, 3 * SEC);
                w.at(restart, Event::Scenario(RESTART));
            }
            _ => {}
        }
    }

    /// Checker 6: an online verify that ran to its end found blocks differing only where its
    /// node held bits for the peer when it started, or where a local write failed on either
    /// node while it ran, or a failed flush dropped a page from its cache (the rules say the
    /// copies are identical everywhere else, and a verify compares both at the same point of
    /// the write stream; seed 5708: a primary's write failed in the middle of its verify).
    fn check_verifies(&mut self) -> Result<(), String> {
        for done in &self.world.verifies {
            self.stats.verifies += 1;
            self.stats.verify_found_bytes += done.found_bytes;
            if !done.explained() {
                return Err(format!(
                    "checker 6 (verify finds only marked differences): n{}'s verify with n{} found {} bytes differing (first ranges {:?}) where it held no bit and no write failed nor a flush dropped a page ({:?})",
                    done.node, done.peer, done.found_bytes, done.found_ranges, done.failed_writes
                ));
            }
        }
        Ok(())
    }

    /// After the faults healed: one primary, every data node in sync with it and UpToDate,
    /// every witness Diskless and linked to every node (its links carry votes only, and are
    /// Established like the others), every data node's replica identical on the client's
    /// blocks, and no acknowledged write missing.
    fn check_converged(&mut self) -> Result<(), String> {
        let primaries = self.world.primaries();
        let [primary] = primaries[..] else {
            return Err(format!("checker 2 (one primary after healing): primaries {primaries:?}"));
        };
        let shape = self.world.shape;
        for id in shape.nodes() {
            let r = self.world.replica(id).ok_or_else(|| format!("n{id} is down after healing"))?;
            let healthy = if shape.is_witness(id) { DiskState::Diskless } else { DiskState::UpToDate };
            if r.disk != healthy {
                return Err(format!("checker 3 (convergence): n{id} is {} after healing", r.disk));
            }
            for peer in r.peers.iter() {
                if !peer.connected || peer.repl != ReplState::Established {
                    return Err(format!("checker 3 (convergence): n{id} sees n{} as {} after healing", peer.node_id, peer.repl));
                }
            }
            if id != primary && r.role != Role::Secondary {
                return Err(format!("n{id} is {} next to primary n{primary}", r.role));
            }
        }
        let disks: Vec<&DataDisk> = shape.data_nodes().map(|id| self.world.nodes[usize::from(id)].data.as_ref().expect("a data node")).collect();
        for block in 0..BLOCKS {
            let offset = block * BLOCK_STRIDE;
            let versions: Vec<u64> = disks.iter().map(|disk| self.version_of(block, &disk.read(offset, 16))).collect();
            if versions.iter().any(|v| *v != versions[0]) {
                return Err(format!("checker 4 (replicas identical): block {block} holds versions {versions:?} on n0..n{}", shape.data - 1));
            }
            if versions[0] < self.durable[block as usize] {
                return Err(format!(
                    "checker 5 (no durable write lost): block {block} holds version {} everywhere, {} was made durable",
                    versions[0], self.durable[block as usize]
                ));
            }
            if versions[0] < self.everywhere[block as usize] {
                return Err(format!(
                    "checker 9 (a write every data node had stays): block {block} holds version {} everywhere, {} was on every data node",
                    versions[0], self.everywhere[block as usize]
                ));
            }
        }
        Ok(())
    }
}
