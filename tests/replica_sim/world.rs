//! The simulated world around real replicas: virtual time, a network of ordered lanes carrying
//! encoded frames, data disks with a volatile cache (and failing I/O when a scenario says so),
//! metadata on memory disks that survive a node's crash, and the drivers that carry out each
//! replica's actions (resync and verify walks included). Nothing here decides a
//! replication rule: every decision is `blkrepl::replica::Replica`'s.
//!
//! A world has a shape: data nodes first (ids from 0), then diskless witnesses, set up as the
//! daemon sets them up (`blkrepl create-md` and `Engine::open_on`).

use super::rng::Rng;
use blkrepl::config::{Fencing, OnSuperseded, Protocol};
use blkrepl::core::block_digest::block_digests;
use blkrepl::core::inflight::{AckLevel, LocalFailure};
use blkrepl::core::quorum::{LinkTiming, OnNoQuorum, QuorumPolicy};
use blkrepl::core::resync_rate::RateLimits;
use blkrepl::core::states::{ReplState, Role};
use blkrepl::disk::{Fault, FaultyDisk, MemDisk};
use blkrepl::frontend::{BlockRequest, BlockResult};
use blkrepl::meta::layout::MIN_AL_EXTENTS;
use blkrepl::meta::{AlWrite, MetaParams, MetaStore};
use blkrepl::replica::{Action, Attached, FenceOutcome, IoTag, LocalIo, MetaWrite, Peer, Replica, ResyncChunk, ResyncStep, VerifyState, VerifyStep};
use blkrepl::wire::{read_message, write_message, Message};
use bytes::Bytes;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Virtual time in microseconds.
pub type Time = u64;
pub const MS: Time = 1_000;
pub const SEC: Time = 1_000_000;

pub const RESOURCE: &str = "sim";
/// The data disk: 32 MiB (eight activity-log extents, one more than the log holds).
pub const DISK_BYTES: u64 = 32 << 20;
pub const PAGE: u64 = 4096;
/// A data node's external metadata disk, and a witness's metadata store (the daemon's
/// `WITNESS_STORE_BYTES`).
const META_BYTES: u64 = 4 << 20;
const TICK: Time = 100 * MS;

/// The resource options a seed draws (beside its shape and protocol).
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Checksum-based resync.
    pub csums: bool,
    /// Pull-ahead's fill mark, protocol A only.
    pub congestion_fill: Option<u64>,
    /// Bytes a lane holds before new writes wait for room (the daemon's send queue).
    pub send_queue_bytes: usize,
    /// The bounds of the rate controller that paces resyncs and verifies.
    pub resync_rate: RateLimits,
    /// Bytes of data per bitmap bit (`bitmap_block_size`).
    pub bitmap_block_size: u32,
    /// What a primary does when it loses a data peer (the `fence-peer` handler's answers are
    /// drawn at random: see `World::fence_peer`).
    pub fencing: Fencing,
    /// What a primary without quorum does with writes.
    pub on_no_quorum: OnNoQuorum,
}

/// Which nodes a world has: data nodes `0..data`, then witnesses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub data: u8,
    pub witnesses: u8,
}

impl Shape {
    /// Every node, data nodes and witnesses: they all vote.
    pub fn nodes(self) -> Range<u8> {
        0..self.data + self.witnesses
    }

    pub fn data_nodes(self) -> Range<u8> {
        0..self.data
    }

    pub fn witness_nodes(self) -> Range<u8> {
        self.data..self.data + self.witnesses
    }

    pub fn is_witness(self, id: u8) -> bool {
        self.witness_nodes().contains(&id)
    }
}

/// Data nodes + witnesses, as the sweep's summary counts them: "3+1".
impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{}", self.data, self.witnesses)
    }
}

/// A data disk: pages written and flushed, and pages written but still in the volatile cache
/// (a power loss keeps each of those or not). Pages never written read as zeroes.
#[derive(Default)]
pub struct DataDisk {
    durable: BTreeMap<u64, Bytes>,
    cache: BTreeMap<u64, Bytes>,
    /// Flushes that failed so far (each may have dropped part of the cache).
    pub failed_flushes: u64,
}

/// What a page of zeroes holds: shared by every zeroed page, so that zeroing megabytes
/// allocates and copies nothing.
static ZERO_PAGE: [u8; PAGE as usize] = [0; PAGE as usize];

impl DataDisk {
    fn write(&mut self, offset: u64, data: &[u8], fua: bool) {
        for (i, page) in data.chunks(PAGE as usize).enumerate() {
            self.put(offset / PAGE + i as u64, Bytes::copy_from_slice(page), fua);
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, fua: bool) {
        for i in 0..len.div_ceil(PAGE) {
            let n = (len - i * PAGE).min(PAGE) as usize;
            self.put(offset / PAGE + i, Bytes::from_static(&ZERO_PAGE[..n]), fua);
        }
    }

    fn put(&mut self, index: u64, page: Bytes, fua: bool) {
        if fua {
            self.cache.remove(&index);
            self.durable.insert(index, page);
        } else {
            self.cache.insert(index, page);
        }
    }

    fn flush(&mut self) {
        // Page by page, not `BTreeMap::append`, which rebuilds the whole durable map (megabytes
        // of zeroed pages) at every flush.
        for (index, page) in std::mem::take(&mut self.cache) {
            self.durable.insert(index, page);
        }
    }

    pub fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        for i in 0..len.div_ceil(PAGE) {
            let index = offset / PAGE + i;
            if let Some(page) = self.cache.get(&index).or_else(|| self.durable.get(&index)) {
                let at = (i * PAGE) as usize;
                let n = page.len().min(out.len() - at);
                out[at..at + n].copy_from_slice(&page[..n]);
            }
        }
        out
    }

    /// A flush that failed: each page the cache held reached the medium, or is gone (a
    /// writeback error, a controller that lost its cache). Returns the ranges of the pages gone.
    fn failed_flush(&mut self, rng: &mut Rng) -> Vec<(u64, u64)> {
        self.failed_flushes += 1;
        let mut gone = Vec::new();
        for (index, page) in std::mem::take(&mut self.cache) {
            if rng.percent(50) {
                self.durable.insert(index, page);
            } else {
                gone.push((index * PAGE, PAGE));
            }
        }
        gone
    }

    fn power_loss(&mut self, rng: &mut Rng) {
        for (index, page) in std::mem::take(&mut self.cache) {
            if rng.percent(50) {
                self.durable.insert(index, page);
            }
        }
    }
}

/// One node: its disks survive its crashes; its replica does not.
pub struct Node {
    pub replica: Option<Replica>,
    /// None on a witness: it has no data disk.
    pub data: Option<DataDisk>,
    /// Its metadata disk; it fails one write of a failing window (see [`World::fail_disk`]).
    meta_disk: Arc<FaultyDisk<MemDisk>>,
    meta: Option<MetaStore>,
    /// Bumped per start, so the events of a crashed incarnation are dropped.
    pub incarnation: u64,
    /// Bumped per power loss: the machine's boot id is made of it.
    boots: u64,
    /// Per peer: the connection this node holds with it, and when it last heard on it.
    links: BTreeMap<u8, (u64, Time)>,
    /// Local I/O submitted and not completed.
    io: BTreeMap<u64, (IoTag, LocalIo)>,
    /// The activity-log transaction being written (see `Action::WriteLog`): its sequence
    /// number, the rest of its write, and whether the data disk is flushed first.
    log_write: Option<(u64, AlWrite, bool)>,
    next_io: u64,
    /// Until when its data disk fails some reads and writes.
    failing_until: Time,
    /// While it is down: the kernel holds the device it served, its process killed while
    /// primary, or before a device left behind that way came back (a power loss takes the
    /// device with the machine; see `replica/left_behind.rs`).
    device_left_behind: bool,
}

/// Something that happens at a time.
#[derive(Debug, Clone)]
pub enum Event {
    Deliver { from: u8, to: u8 },
    IoDone { node: u8, incarnation: u64, io: u64 },
    /// Node `node`'s activity-log transaction `seq` is durable, unless its disk fails it.
    LogWritten { node: u8, incarnation: u64, seq: u64 },
    ResyncStep { node: u8, incarnation: u64, peer: u8, generation: u64 },
    VerifyStep { node: u8, incarnation: u64, peer: u8, generation: u64 },
    /// A resync or verify walk's read of `offset`+`len` on node `node`, for `peer`, is done.
    WalkRead { node: u8, incarnation: u64, peer: u8, generation: u64, walk: Walk, offset: u64, len: u64 },
    /// The fence-peer handler node `node` ran for `peer`'s lost connection `generation` ended.
    FenceDone { node: u8, incarnation: u64, peer: u8, generation: u64, outcome: FenceOutcome },
    Tick,
    /// The scenario's own timers.
    Scenario(u64),
}

/// Which walk a read is for.
#[derive(Debug, Clone, Copy)]
pub enum Walk {
    /// A resync's; `digests`: a checksum resync's digests rather than the data.
    Resync { digests: bool },
    Verify,
}

struct Queued(Time, u64, Event);
impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.0, self.1) == (o.0, o.1)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.0, self.1).cmp(&(o.0, o.1))
    }
}

/// A directed lane: frames in order, each after its delay; a cut lane holds them.
#[derive(Default)]
struct Lane {
    queue: VecDeque<Frame>,
}

/// A frame on its way.
struct Frame {
    due: Time,
    /// The connection it was sent on: a frame of an earlier one is dropped on arrival.
    conn: u64,
    bytes: Bytes,
    /// Sent on the bulk lane (data), which is what a send queue's limit counts.
    bulk: bool,
}

/// What the client was told, per request id: (node, request, result, whether every data node
/// had the request's write, see [`every_data_peer_follows`]).
pub type Answers = Vec<(u8, u64, BlockResult, bool)>;

/// Whether a write `r` completes now was on every data node: under protocol B or C a write
/// completes once each connected peer has it (received and on its way to the disk, or written),
/// and here every data peer is connected and in sync, none to be resynced. Such a write
/// survives the loss of its primary while no node loses power (checker 9). Stated here rather
/// than taken from `Replica::lagging_peers`: the checker must not trust the rules it checks.
fn every_data_peer_follows(r: &Replica) -> bool {
    r.protocol != Protocol::A
        && r.peers.iter().filter(|p| !p.witness).all(|p| p.connected && p.repl == ReplState::Established && p.pending_sync.is_none())
}

/// An online verify that ran to its end between `node` (which ran it) and `peer`.
#[derive(Debug)]
pub struct VerifyDone {
    pub node: u8,
    pub peer: u8,
    /// Blocks the verifying node held marked for the peer when it started: where the copies
    /// may differ by the rules.
    pub marked_at_start: u64,
    /// Bytes the verify found to differ, and the first ranges.
    pub found_bytes: u64,
    pub found_ranges: Vec<(u64, u64)>,
    /// Local writes that failed on either node while the verify ran, and the pages a failed
    /// flush dropped from either node's cache then: either leaves its blocks unknown on that
    /// node (marked for its peers then, after the verify started: a failed flush marks every
    /// hot extent), so the copies may differ there by the rules too (seed 78085 of the long
    /// run: a primary's failed flush dropped a page of a write its peer held).
    pub failed_writes: Vec<(u64, u64)>,
}

impl VerifyDone {
    /// Whether the rules explain every difference the verify found: bits held when it started,
    /// or writes that failed on either node while it ran (every range reported, each within
    /// one of those writes' blocks).
    pub fn explained(&self) -> bool {
        let reported: u64 = self.found_ranges.iter().map(|(_, len)| len).sum();
        let failed = |(offset, len): &(u64, u64)| {
            self.failed_writes.iter().any(|(f_offset, f_len)| *f_offset < offset + len && *offset < f_offset + f_len)
        };
        self.found_bytes == 0
            || self.marked_at_start > 0
            || (reported == self.found_bytes && self.found_ranges.iter().all(failed))
    }
}

pub struct World {
    pub now: Time,
    base: Instant,
    pub rng: Rng,
    events: BinaryHeap<Reverse<Queued>>,
    seq: u64,
    pub nodes: Vec<Node>,
    lanes: BTreeMap<(u8, u8), Lane>,
    /// Pairs whose link is cut.
    cut: Vec<(u8, u8)>,
    next_conn: u64,
    pub protocol: Protocol,
    pub quorum: QuorumPolicy,
    /// Answers to client requests since the scenario last took them.
    pub answers: Answers,
    /// Whether what happens is printed (a seed replayed for a report; the replicas' own log
    /// goes to the same output).
    pub tracing: bool,
    /// The device offset whose writes are printed when tracing (`BLKREPL_SIM_TRACE_BLOCK`).
    pub trace_offset: u64,
    /// A checksum over every frame sent, with its time, sender and receiver, in the order sent:
    /// two runs of a seed that send the same frames at the same times give the same value
    /// (what `tests/replica_sim_replay.rs` compares; see `World::fingerprint`).
    fingerprint: u32,
    /// The resync data sent so far (runs of zeroes by their length): whether the resyncs under
    /// way still move (see `Scenario::run`).
    pub resync_bytes_sent: u64,
    /// Divergences resolved by nodes that have since crashed (see `World::divergences`).
    divergences: u64,
    /// Resyncs (by bitmap, full, first syncs of fresh disks) taken by nodes that have since crashed.
    resyncs: [u64; 3],
    pub shape: Shape,
    /// The first thing a replica asked that the world must not do (data I/O on a witness, a
    /// disk write or frame from a detached node): the scenario fails the seed on it.
    pub violation: Option<String>,
    /// The last frame a replica refused (its link dropped as a protocol violation), with its
    /// time, nodes and reason, until a scenario takes it.
    pub refused: Option<String>,
    /// Resyncs send block checksums first (`csums_resync`).
    pub csums: bool,
    /// Pull-ahead (`on_congestion = "pull-ahead"`): a primary goes Ahead of a peer whose lane
    /// holds more than this many bytes.
    pub congestion_fill: Option<u64>,
    pub send_queue_bytes: usize,
    pub resync_rate: RateLimits,
    /// Per (node, peer), the blocks marked when its verify started.
    verify_marked: BTreeMap<(u8, u8), u64>,
    /// Per verify under way (node, peer): local writes that failed on either node since it
    /// started, and pages failed flushes dropped (see `VerifyDone::failed_writes`).
    verify_failed: BTreeMap<(u8, u8), Vec<(u64, u64)>>,
    /// Verifies that ran to their end, for the scenario's checker.
    pub verifies: Vec<VerifyDone>,
    /// Decides which I/O of a failing disk fails: a generator of its own, so a seed whose
    /// disks never fail keeps its course.
    disk_rng: Rng,
    /// Local writes, reads and flushes that failed, and metadata writes.
    pub failed_writes: u64,
    pub failed_reads: u64,
    pub failed_flushes: u64,
    pub failed_meta_writes: u64,
    /// When the last of those failures struck: the cluster settles from then (see
    /// `Scenario::run`).
    pub last_fault: Time,
    /// Writes that waited in a replica for room in a send queue.
    pub writes_waited_for_room: u64,
    pub fencing: Fencing,
    pub on_no_quorum: OnNoQuorum,
    /// Draws the fence-peer handler's answers and delays: a generator of its own, so a seed
    /// that never fences keeps its course.
    fence_rng: Rng,
    /// Fence-peer runs asked for, and those that answered that the peer is primary (the
    /// primary then outdates itself).
    pub fence_runs: u64,
    pub fence_self_outdated: u64,
}

impl World {
    pub fn new(seed: u64, shape: Shape, protocol: Protocol, options: Options, tracing: bool) -> World {
        let mut world = World {
            now: 0,
            base: Instant::now(),
            rng: Rng::new(seed),
            events: BinaryHeap::new(),
            seq: 0,
            nodes: Vec::new(),
            lanes: BTreeMap::new(),
            cut: Vec::new(),
            next_conn: 0,
            protocol,
            quorum: QuorumPolicy::Majority,
            answers: Vec::new(),
            tracing,
            trace_offset: 0,
            fingerprint: 0,
            resync_bytes_sent: 0,
            divergences: 0,
            resyncs: [0; 3],
            shape,
            violation: None,
            refused: None,
            csums: options.csums,
            congestion_fill: options.congestion_fill,
            send_queue_bytes: options.send_queue_bytes,
            resync_rate: options.resync_rate,
            verify_marked: BTreeMap::new(),
            verify_failed: BTreeMap::new(),
            verifies: Vec::new(),
            disk_rng: Rng::new(seed.rotate_left(32)),
            failed_writes: 0,
            failed_reads: 0,
            failed_flushes: 0,
            failed_meta_writes: 0,
            last_fault: 0,
            writes_waited_for_room: 0,
            fencing: options.fencing,
            on_no_quorum: options.on_no_quorum,
            fence_rng: Rng::new(seed.rotate_left(16)),
            fence_runs: 0,
            fence_self_outdated: 0,
        };
        for id in shape.nodes() {
            world.nodes.push(Node {
                replica: None,
                data: (!shape.is_witness(id)).then(DataDisk::default),
                meta_disk: create_metadata(shape, id, options.bitmap_block_size),
                meta: None,
                incarnation: 0,
                boots: 0,
                links: BTreeMap::new(),
                io: BTreeMap::new(),
                log_write: None,
                next_io: 0,
                failing_until: 0,
                device_left_behind: false,
            });
        }
        for id in shape.nodes() {
            world.start(id);
        }
        world.at(TICK, Event::Tick);
        world
    }

    pub fn at(&mut self, at: Time, event: Event) {
        self.seq += 1;
        self.events.push(Reverse(Queued(at, self.seq, event)));
    }

    pub fn instant(&self) -> Instant {
        self.base + Duration::from_micros(self.now)
    }

    pub fn log(&mut self, who: u8, text: impl FnOnce() -> String) {
        if self.tracing {
            println!("{:>4}.{:06} n{who} {}", self.now / SEC, self.now % SEC, text());
        }
    }

    /// Starts (or restarts after a crash) node `id` from its metadata.
    pub fn start(&mut self, id: u8) {
        let now = self.instant();
        let seed = self.rng.next_u64();
        let shape = self.shape;
        let protocol = self.protocol;
        let quorum = self.quorum;
        let (congestion_fill, send_queue_bytes, resync_rate, fencing) = (self.congestion_fill, self.send_queue_bytes, self.resync_rate, self.fencing);
        let on_no_quorum = self.on_no_quorum;
        let node = &mut self.nodes[usize::from(id)];
        let (data_bytes, internal) = meta_geometry(shape.is_witness(id));
        // An injected metadata failure belongs to the failing window that armed it, not to the
        // next incarnation.
        node.meta_disk.heal();
        let (meta, loaded) = MetaStore::open(node.meta_disk.clone(), data_bytes, internal, RESOURCE, id).expect("open metadata");
        let peers = loaded
            .superblock
            .peers
            .iter()
            .enumerate()
            .map(|(slot, p)| Peer::new(p.node_id, format!("n{}", p.node_id), slot, shape.is_witness(p.node_id)))
            .collect();
        let crashed_primary = loaded.crashed_as_primary;
        let replica = Replica::attach(Attached {
            // The replica's name in the log: the node's.
            resource: format!("n{id}"),
            witness: shape.is_witness(id),
            timing: LinkTiming::DEFAULT,
            protocol,
            congestion_fill,
            send_queue_bytes,
            resync_rate,
            sb: loaded.superblock,
            bitmaps: loaded.bitmaps,
            al: loaded.activity_log,
            crashed_primary,
            left_behind_device: node.device_left_behind,
            peers,
            quorum_policy: quorum,
            on_no_quorum,
            split_brain: Default::default(),
            fencing,
            on_superseded: OnSuperseded::ForceSecondary,
            now,
            uuid_seed: seed,
            boot_id: boot_id(id, node.boots),
        });
        // The daemon attaches a device it may not resume failing (its users unmount it).
        node.device_left_behind = replica.has_left_behind();
        node.meta = Some(meta);
        node.replica = Some(replica);
        node.incarnation += 1;
        node.links.clear();
        node.io.clear();
        node.log_write = None;
        self.carry_out(id);
    }

    /// Node `id`'s data disk fails some of its reads and writes until `until` (with EIO, or
    /// writes with ENOSPC as a thin pool that ran out does), and one time in two one of its
    /// next metadata writes fails too (which detaches the disk: see `Replica::detach`).
    pub fn fail_disk(&mut self, id: u8, until: Time) {
        let meta = self.disk_rng.percent(50).then(|| {
            let fault = if self.disk_rng.percent(50) { Fault::Eio } else { Fault::Enospc };
            (self.disk_rng.range(1, 9), fault)
        });
        let node = &mut self.nodes[usize::from(id)];
        node.failing_until = until;
        if let Some((nth, fault)) = meta {
            node.meta_disk.fail_nth_write(nth, fault);
        }
    }

    /// Whether a walk's read on node `id` fails now (its disk is failing).
    fn walk_read_fails(&mut self, id: u8) -> bool {
        let failed = self.now < self.nodes[usize::from(id)].failing_until && self.disk_rng.percent(10);
        self.failed_reads += u64::from(failed);
        if failed {
            self.last_fault = self.now;
        }
        failed
    }

    /// Node `id` goes down: its replica and its links are gone. A power loss (`power`) drops
    /// what the disk's cache may and restarts the machine (a new boot id); a killed process
    /// leaves the machine up, and the writes it had submitted land in the cache.
    pub fn crash(&mut self, id: u8, power: bool) {
        let node = &mut self.nodes[usize::from(id)];
        let serving = node.replica.as_ref().is_some_and(|r| r.role == Role::Primary || r.has_left_behind());
        node.device_left_behind = !power && serving;
        if let Some(replica) = &node.replica {
            self.divergences += replica.divergences_resolved;
            for (total, taken) in self.resyncs.iter_mut().zip(replica.resyncs_taken) {
                *total += taken;
            }
        }
        node.replica = None;
        node.meta = None;
        // A witness has no data disk, and so no I/O in flight.
        if let Some(disk) = node.data.as_mut() {
            if power {
                disk.power_loss(&mut self.rng);
            } else {
                for (_, op) in std::mem::take(&mut node.io).into_values() {
                    match op {
                        LocalIo::Write { offset, data, fua } => disk.write(offset, &data, fua),
                        LocalIo::Zeroes { offset, len, fua, .. } => disk.write_zeroes(offset, len, fua),
                        LocalIo::Read { .. } | LocalIo::Flush => {}
                    }
                }
            }
        }
        if power {
            node.boots += 1;
        }
        let peers: Vec<(u8, u64)> = std::mem::take(&mut node.links).into_iter().map(|(p, (conn, _))| (p, conn)).collect();
        for (peer, conn) in peers {
            // The peer's TCP sees the reset soon (a cut link: at its read timeout).
            if !self.is_cut(id, peer) {
                self.close_at(peer, id, conn, "peer closed the connection");
            }
        }
    }

    /// A clean stop's first half, as `blkrepl down` of a Secondary runs it: the replica says
    /// goodbye ([`Replica::leave`]) and its frames go out.
    pub fn leave(&mut self, id: u8) {
        let Some(replica) = self.replica_mut(id) else { return };
        replica.leave();
        self.log(id, || "down".into());
        self.carry_out(id);
    }

    /// A clean stop's second half, once the goodbye had time to arrive (the daemon waits 50
    /// ms): the links close, the metadata is written clean (`MetaStore::clean_shutdown`, not
    /// on a detached disk), and the process ends; what the kernel still had to write lands.
    pub fn stop(&mut self, id: u8) {
        if !self.is_up(id) {
            return;
        }
        let links: Vec<(u8, u64)> = self.nodes[usize::from(id)].links.iter().map(|(p, (conn, _))| (*p, *conn)).collect();
        for (peer, conn) in links {
            self.link_lost(id, peer, conn, "going down");
        }
        // The daemon waits for an activity-log transaction still being written.
        while let Some(&(seq, _, _)) = self.nodes[usize::from(id)].log_write.as_ref() {
            let incarnation = self.nodes[usize::from(id)].incarnation;
            self.log_written(id, incarnation, seq);
        }
        let node = &mut self.nodes[usize::from(id)];
        if let (Some(replica), Some(meta)) = (node.replica.as_mut(), node.meta.as_mut()) {
            // `down` demotes first, which attaches a device left behind failing (its users
            // unmount it before `down` can go on).
            replica.give_up_left_behind();
            if !replica.detached() {
                // A failing disk may refuse it: the metadata is then as a crash leaves it.
                if let Err(e) = meta.clean_shutdown(&replica.sb, &mut replica.bitmaps, &mut replica.al) {
                    self.log(id, || format!("clean metadata not written: {e}"));
                }
            }
        }
        self.crash(id, false);
    }

    /// The operator's `disconnect` ([`Replica::stand_alone`]).
    pub fn disconnect(&mut self, id: u8) {
        let Some(replica) = self.replica_mut(id) else { return };
        replica.stand_alone("disconnected by the operator");
        self.log(id, || "disconnect".into());
        self.carry_out(id);
    }

    /// The operator's `connect` ([`Replica::connect_wanted`]).
    pub fn connect(&mut self, id: u8) {
        let Some(replica) = self.replica_mut(id) else { return };
        replica.connect_wanted(false).expect("connect without --discard-my-data is never refused");
        self.log(id, || "connect".into());
        self.carry_out(id);
    }

    pub fn is_up(&self, id: u8) -> bool {
        self.nodes[usize::from(id)].replica.is_some()
    }

    pub fn replica(&self, id: u8) -> Option<&Replica> {
        self.nodes[usize::from(id)].replica.as_ref()
    }

    /// What each link of node `id` holds: the bytes of bulk frames to each peer that it has
    /// not taken in yet, on the link's current connection (the daemon's send queue of a link,
    /// which the replica measures: a new link starts with an empty one).
    fn send_queues_of(&self, id: u8) -> BTreeMap<u8, usize> {
        let links = &self.nodes[usize::from(id)].links;
        let queued = |peer: u8, conn: u64| {
            let frames = self.lanes.get(&(id, peer)).map(|lane| lane.queue.iter()).into_iter().flatten();
            frames.filter(|f| f.bulk && f.conn == conn).map(|f| f.bytes.len()).sum()
        };
        links.iter().map(|(peer, (conn, _))| (*peer, queued(*peer, *conn))).collect()
    }

    pub fn replica_mut(&mut self, id: u8) -> Option<&mut Replica> {
        self.nodes[usize::from(id)].replica.as_mut()
    }

    fn pair(a: u8, b: u8) -> (u8, u8) {
        (a.min(b), a.max(b))
    }

    pub fn is_cut(&self, a: u8, b: u8) -> bool {
        self.cut.contains(&World::pair(a, b))
    }

    pub fn cut(&mut self, a: u8, b: u8) {
        if !self.is_cut(a, b) {
            self.cut.push(World::pair(a, b));
        }
    }

    pub fn heal(&mut self, a: u8, b: u8) {
        self.cut.retain(|p| *p != World::pair(a, b));
        for (from, to) in [(a, b), (b, a)] {
            if self.lanes.get(&(from, to)).is_some_and(|l| !l.queue.is_empty()) {
                self.at(self.now, Event::Deliver { from, to });
            }
        }
    }

    pub fn heal_all(&mut self) {
        for (a, b) in std::mem::take(&mut self.cut) {
            self.heal(a, b);
        }
    }

    /// A frontend request to node `id` (it must be up).
    pub fn submit(&mut self, id: u8, request: u64, req: BlockRequest) {
        let now = self.instant();
        let queued = self.send_queues_of(id);
        let replica = self.replica_mut(id).expect("up");
        let waiting = replica.awaiting_room();
        replica.submit(now, request, req, |peer| queued.get(&peer).copied().unwrap_or(0));
        self.writes_waited_for_room += (replica.awaiting_room() > waiting) as u64;
        self.carry_out(id);
    }

    /// A frame left node `id`'s lane: writes waiting there for room may go on (the daemon's
    /// link writer reports as it takes frames from a queue).
    fn report_send_queues(&mut self, id: u8) {
        let now = self.instant();
        let queued = self.send_queues_of(id);
        let Some(replica) = self.replica_mut(id).filter(|r| r.awaiting_room() > 0) else { return };
        replica.send_queues(now, |peer| queued.get(&peer).copied().unwrap_or(0));
        self.carry_out(id);
    }

    /// Starts an online verify on node `id` with every peer it can run against (the error is
    /// the replica's refusal).
    pub fn start_verify(&mut self, id: u8) -> Result<(), String> {
        let now = self.instant();
        let targets = self.replica_mut(id).ok_or("down")?.verify_start(now)?;
        let incarnation = self.nodes[usize::from(id)].incarnation;
        for (peer, generation, _) in targets {
            let replica = self.replica(id).expect("up");
            let marked = replica.bitmaps[replica.peer(peer).slot].weight();
            self.verify_marked.insert((id, peer), marked);
            self.verify_failed.insert((id, peer), Vec::new());
            self.at(self.now, Event::VerifyStep { node: id, incarnation, peer, generation });
        }
        Ok(())
    }

    /// Runs events until `until`; the scenario's own events are handed back.
    pub fn run_until(&mut self, until: Time) -> Option<u64> {
        while let Some(Reverse(Queued(at, _, _))) = self.events.peek() {
            if *at > until {
                break;
            }
            let Reverse(Queued(at, _, event)) = self.events.pop().expect("peeked");
            self.now = at;
            match event {
                Event::Scenario(step) => return Some(step),
                Event::Tick => {
                    self.tick();
                    self.at(self.now + TICK, Event::Tick);
                }
                Event::Deliver { from, to } => self.deliver(from, to),
                Event::IoDone { node, incarnation, io } => self.io_done(node, incarnation, io),
                Event::LogWritten { node, incarnation, seq } => self.log_written(node, incarnation, seq),
                Event::ResyncStep { node, incarnation, peer, generation } => self.resync_step(node, incarnation, peer, generation),
                Event::VerifyStep { node, incarnation, peer, generation } => self.verify_step(node, incarnation, peer, generation),
                Event::WalkRead { node, incarnation, peer, generation, walk, offset, len } => {
                    self.walk_read(node, incarnation, peer, generation, walk, (offset, len))
                }
                Event::FenceDone { node, incarnation, peer, generation, outcome } => {
                    if self.nodes[usize::from(node)].incarnation == incarnation && self.is_up(node) {
                        let now = self.instant();
                        self.log(node, || format!("fence-peer for n{peer} #{generation}: {outcome:?}"));
                        self.replica_mut(node).expect("up").fence_done(now, peer, generation, outcome);
                        self.carry_out(node);
                    }
                }
            }
        }
        self.now = self.now.max(until);
        None
    }

    /// Timers of every node, read timeouts of silent links, and the dialing of links that
    /// are down between two nodes that are up and can reach each other.
    fn tick(&mut self) {
        let now = self.instant();
        let timeout = LinkTiming::DEFAULT.ping_timeout.as_micros() as Time;
        for id in 0..self.nodes.len() as u8 {
            let queued = self.send_queues_of(id);
            let Some(replica) = self.replica_mut(id) else { continue };
            replica.tick(now, |peer| queued.get(&peer).copied().unwrap_or(0));
            let silent: Vec<(u8, u64)> = self.nodes[usize::from(id)]
                .links
                .iter()
                .filter(|(_, (_, heard))| self.now.saturating_sub(*heard) > timeout)
                .map(|(p, (conn, _))| (*p, *conn))
                .collect();
            for (peer, conn) in silent {
                self.link_lost(id, peer, conn, "nothing heard from the peer (dead link or network partition)");
            }
            self.carry_out(id);
        }
        let n = self.nodes.len() as u8;
        for a in 0..n {
            for b in a + 1..n {
                self.dial(a, b);
            }
        }
    }

    fn dial(&mut self, a: u8, b: u8) {
        if !self.is_up(a) || !self.is_up(b) || self.is_cut(a, b) {
            return;
        }
        let linked = |w: &World, x: u8, y: u8| w.nodes[usize::from(x)].links.contains_key(&y);
        if linked(self, a, b) || linked(self, b, a) {
            return;
        }
        let wants = |w: &World, x: u8, y: u8| w.replica(x).is_some_and(|r| r.link_refusal(y).is_none());
        if !wants(self, a, b) || !wants(self, b, a) {
            return;
        }
        self.next_conn += 1;
        let conn = self.next_conn;
        let now = self.instant();
        for (x, y) in [(a, b), (b, a)] {
            self.nodes[usize::from(x)].links.insert(y, (conn, self.now));
            self.replica_mut(x).expect("up").link_up(y, now);
            self.log(x, || format!("connected to n{y} #{conn}"));
        }
        self.carry_out(a);
        self.carry_out(b);
    }

    /// Node `id` lost its link `conn` to `peer` for `reason` (nothing if that link is gone).
    fn link_lost(&mut self, id: u8, peer: u8, conn: u64, reason: &str) {
        let node = &mut self.nodes[usize::from(id)];
        if node.links.get(&peer).map(|(c, _)| *c) != Some(conn) {
            return;
        }
        node.links.remove(&peer);
        let now = self.instant();
        self.log(id, || format!("lost n{peer} #{conn}: {reason}"));
        if let Some(replica) = self.replica_mut(id) {
            replica.peer_lost(now, peer, reason, 0);
        }
        self.carry_out(id);
        // The other side sees the connection close, unless the link is cut (its read timeout).
        if !self.is_cut(id, peer) {
            self.close_at(peer, id, conn, "peer closed the connection");
        }
    }

    fn close_at(&mut self, id: u8, peer: u8, conn: u64, reason: &str) {
        let node = &self.nodes[usize::from(id)];
        if node.links.get(&peer).map(|(c, _)| *c) == Some(conn) {
            // Immediately: a close reaches the other side within a lane's delay anyway.
            self.link_lost(id, peer, conn, reason);
        }
    }

    /// Queues a frame on the link from `from` to `to` (on the bulk lane: `bulk`); false if
    /// there is none.
    fn send(&mut self, from: u8, to: u8, msg: &Message, bulk: bool) -> bool {
        let Some(&(conn, _)) = self.nodes[usize::from(from)].links.get(&to) else { return false };
        let mut bytes = Vec::new();
        write_message(&mut bytes, msg).expect("encode a frame");
        let fingerprint = crc32c::crc32c_append(self.fingerprint, &self.now.to_le_bytes());
        self.fingerprint = crc32c::crc32c_append(crc32c::crc32c_append(fingerprint, &[from, to]), &bytes);
        match msg {
            Message::ResyncData { payload, .. } => self.resync_bytes_sent += payload.len() as u64,
            Message::ResyncZeroes { len, .. } => self.resync_bytes_sent += u64::from(*len),
            _ => {}
        }
        let delay = self.rng.range(50, 2 * MS);
        let lane = self.lanes.entry((from, to)).or_default();
        let due = lane.queue.back().map_or(0, |f| f.due).max(self.now + delay);
        let first = lane.queue.is_empty();
        lane.queue.push_back(Frame { due, conn, bytes: Bytes::from(bytes), bulk });
        if first && !self.is_cut(from, to) {
            self.at(due, Event::Deliver { from, to });
        }
        true
    }

    fn deliver(&mut self, from: u8, to: u8) {
        if self.is_cut(from, to) {
            return;
        }
        let Some(lane) = self.lanes.get_mut(&(from, to)) else { return };
        let Some(due) = lane.queue.front().map(|f| f.due) else { return };
        if due > self.now {
            self.at(due, Event::Deliver { from, to });
            return;
        }
        let Frame { conn, bytes, bulk, .. } = lane.queue.pop_front().expect("front");
        if let Some(next) = lane.queue.front().map(|f| f.due) {
            self.at(next.max(self.now), Event::Deliver { from, to });
        }
        if bulk {
            self.report_send_queues(from);
        }
        let node = &mut self.nodes[usize::from(to)];
        let Some(link) = node.links.get_mut(&from).filter(|(c, _)| *c == conn) else { return };
        link.1 = self.now;
        let msg = read_message(&mut &bytes[..]).expect("decode a frame the codec encoded");
        let generation = self.replica(to).expect("linked nodes are up").peer(from).generation;
        let now = self.instant();
        let name = msg.name();
        if !matches!(msg, Message::Data { .. } | Message::Ping | Message::PingAck | Message::WriteAck { .. } | Message::RecvAck { .. } | Message::ResyncData { .. } | Message::ResyncZeroes { .. }) {
            self.log(to, || format!("<- n{from} #{conn} {}", describe(&msg)));
        }
        let result = self.replica_mut(to).expect("up").receive(now, from, generation, msg);
        if let Err(reason) = result {
            self.log(to, || format!("dropping n{from} on {name}: {reason}"));
            self.refused = Some(format!("at {} µs n{to} refused n{from}'s {name}: {reason}", self.now));
            self.link_lost(to, from, conn, &reason);
        }
        self.carry_out(to);
    }

    /// The rest of node `id`'s activity-log transaction `seq`: the data disk flushed first if it
    /// evicts extents, then its bitmap pages and its block made durable.
    fn log_written(&mut self, id: u8, incarnation: u64, seq: u64) {
        let node = &mut self.nodes[usize::from(id)];
        if node.incarnation != incarnation || node.replica.is_none() {
            return;
        }
        let Some((written, write, flush_data)) = node.log_write.take_if(|(s, _, _)| *s == seq) else { return };
        if flush_data {
            node.data.as_mut().expect("a witness keeps no activity log").flush();
        }
        let result = write.finish(None).map_err(|e| e.to_string());
        if result.is_err() {
            self.failed_meta_writes += 1;
            self.last_fault = self.now;
        }
        self.replica_mut(id).expect("up").log_written(written, result);
        self.carry_out(id);
    }

    fn io_done(&mut self, id: u8, incarnation: u64, io: u64) {
        let node = &mut self.nodes[usize::from(id)];
        if node.incarnation != incarnation || node.replica.is_none() {
            return;
        }
        let Some((tag, op)) = node.io.remove(&io) else { return };
        // A failing disk fails one write in four (which may still have reached the medium),
        // one read in ten and one flush in ten (which loses part of the cache).
        let failing = self.now < node.failing_until;
        let failed = match &op {
            LocalIo::Write { .. } | LocalIo::Zeroes { .. } if failing && self.disk_rng.percent(25) => Some(self.disk_rng.percent(50)),
            LocalIo::Read { .. } | LocalIo::Flush if failing && self.disk_rng.percent(10) => Some(false),
            _ => None,
        };
        let disk = node.data.as_mut().expect("I/O is queued on data nodes only");
        if let Some(landed) = failed {
            let unknown = match &op {
                LocalIo::Write { offset, data, fua } => {
                    if landed {
                        disk.write(*offset, data, *fua);
                    }
                    vec![(*offset, data.len() as u64)]
                }
                LocalIo::Zeroes { offset, len, fua, .. } => {
                    if landed {
                        disk.write_zeroes(*offset, *len, *fua);
                    }
                    vec![(*offset, *len)]
                }
                LocalIo::Flush => disk.failed_flush(&mut self.disk_rng),
                LocalIo::Read { .. } => Vec::new(),
            };
            for ((node, peer), failed) in self.verify_failed.iter_mut() {
                if *node == id || *peer == id {
                    failed.extend(&unknown);
                }
            }
            self.last_fault = self.now;
            match op {
                LocalIo::Read { .. } => self.failed_reads += 1,
                LocalIo::Flush => self.failed_flushes += 1,
                _ => self.failed_writes += 1,
            }
            if self.tracing {
                let what = match &op {
                    LocalIo::Read { offset, len } => format!("read {offset}+{len}"),
                    LocalIo::Write { offset, data, .. } => format!("write {offset}+{}", data.len()),
                    LocalIo::Zeroes { offset, len, .. } => format!("zeroes {offset}+{len}"),
                    LocalIo::Flush => "flush".into(),
                };
                println!("{:>4}.{:06} n{id} disk: {what} failed ({tag:?})", self.now / SEC, self.now % SEC);
            }
            let now = self.instant();
            let failure = match op {
                LocalIo::Write { .. } | LocalIo::Zeroes { .. } if self.disk_rng.percent(30) => LocalFailure::NoSpace,
                _ => LocalFailure::Io,
            };
            self.replica_mut(id).expect("up").io_done(now, tag, Err(failure));
            self.carry_out(id);
            return;
        }
        let result: Result<Option<Bytes>, LocalFailure> = match op {
            LocalIo::Read { offset, len } => Ok(Some(Bytes::from(disk.read(offset, len as u64)))),
            LocalIo::Write { offset, data, fua } => {
                disk.write(offset, &data, fua);
                let traced = self.trace_offset.wrapping_sub(offset);
                if self.tracing && traced < data.len() as u64 {
                    let at = traced as usize;
                    let version = u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes"));
                    println!("{:>4}.{:06} n{id} disk: {:#x} <- v{version} ({tag:?})", self.now / SEC, self.now % SEC, self.trace_offset);
                }
                Ok(None)
            }
            LocalIo::Zeroes { offset, len, fua, .. } => {
                disk.write_zeroes(offset, len, fua);
                if self.tracing && self.trace_offset.wrapping_sub(offset) < len {
                    println!("{:>4}.{:06} n{id} disk: {:#x} <- zeroes ({tag:?})", self.now / SEC, self.now % SEC, self.trace_offset);
                }
                Ok(None)
            }
            LocalIo::Flush => {
                disk.flush();
                Ok(None)
            }
        };
        let now = self.instant();
        self.replica_mut(id).expect("up").io_done(now, tag, result);
        self.carry_out(id);
    }

    /// The resync source's driver: asks the replica what next, reads, hands the chunk back.
    fn resync_step(&mut self, id: u8, incarnation: u64, peer: u8, generation: u64) {
        if self.nodes[usize::from(id)].incarnation != incarnation {
            return;
        }
        let Some(replica) = self.replica_mut(id) else { return };
        if !replica.resyncing(peer, generation) {
            return;
        }
        let next = self.now + self.rng.range(100, 2 * MS);
        let (csums, now) = (self.csums, self.instant());
        let step = self.replica_mut(id).expect("up").resync_next(now, peer, csums);
        // What deciding the step queued (a barrier closing the resync's epoch, say) goes out
        // now, as the daemon's guard carries it out: left queued, it went out with the node's
        // next event, after a failure of its disk in between (seed 974 of the change that
        // gathered activity-log transactions).
        self.carry_out(id);
        match step {
            ResyncStep::Finished => {}
            ResyncStep::Wait => self.at(next + 20 * MS, Event::ResyncStep { node: id, incarnation, peer, generation }),
            ResyncStep::Pace(wait) => self.at(self.now + wait.as_micros() as Time, Event::ResyncStep { node: id, incarnation, peer, generation }),
            ResyncStep::Read { offset, len, digests } => self.walk_read_starts(id, incarnation, peer, generation, Walk::Resync { digests }, (offset, len)),
        }
    }

    /// A walk reads `range` as the daemon's does (`read_range_then`): under the replica's range
    /// lock, which holds back writes to it, and off the engine's lock, so whatever else comes
    /// meanwhile (a flush that fails, a link lost) comes before the chunk is handed over.
    fn walk_read_starts(&mut self, id: u8, incarnation: u64, peer: u8, generation: u64, walk: Walk, range: (u64, u64)) {
        self.replica_mut(id).expect("up").read_lock(range);
        let due = self.now + self.rng.range(20, 3 * MS);
        let (offset, len) = range;
        self.at(due, Event::WalkRead { node: id, incarnation, peer, generation, walk, offset, len });
    }

    /// A walk's read is done: the chunk goes to the replica if its walk still runs (the
    /// daemon's `still`), then the range lock goes, so the writes it held follow the chunk.
    fn walk_read(&mut self, id: u8, incarnation: u64, peer: u8, generation: u64, walk: Walk, range: (u64, u64)) {
        if self.nodes[usize::from(id)].incarnation != incarnation || !self.is_up(id) {
            return;
        }
        let (offset, len) = range;
        let next = self.now + self.rng.range(100, 2 * MS);
        let failed = self.walk_read_fails(id);
        let data = self.nodes[usize::from(id)].data.as_ref().expect("walks run on data nodes only").read(offset, len);
        let replica = self.replica_mut(id).expect("up");
        let block_size = replica.sb.params.bitmap_block_size as usize;
        match walk {
            Walk::Resync { .. } if failed => {
                replica.read_unlock(range);
                replica.resync_walk_failed(peer, generation, format!("read at {offset}+{len} failed: Io"));
                self.carry_out(id);
                return;
            }
            Walk::Resync { digests } => {
                if replica.resyncing(peer, generation) {
                    let chunk = match digests {
                        true => ResyncChunk::Digests(block_digests(&data, block_size)),
                        false => ResyncChunk::Data(Bytes::from(data)),
                    };
                    replica.resync_chunk_read(peer, offset, len, chunk);
                }
                replica.read_unlock(range);
                self.at(next, Event::ResyncStep { node: id, incarnation, peer, generation });
            }
            // The daemon's verify ends on a failed read.
            Walk::Verify if failed => {
                replica.read_unlock(range);
                replica.verify_ended(peer, Err(format!("read at {offset}+{len} failed: Io")));
            }
            Walk::Verify => {
                if replica.verify_interrupted(peer, generation).is_none() {
                    replica.verify_chunk_read(peer, offset, len, block_digests(&data, block_size));
                }
                replica.read_unlock(range);
                self.at(next, Event::VerifyStep { node: id, incarnation, peer, generation });
            }
        }
        self.carry_out(id);
    }

    /// The verify driver, as the resync's: asks the replica what next, reads, hands the
    /// digests back; at the end the replica records the outcome and the world keeps it.
    fn verify_step(&mut self, id: u8, incarnation: u64, peer: u8, generation: u64) {
        if self.nodes[usize::from(id)].incarnation != incarnation || !self.is_up(id) {
            return;
        }
        let next = self.now + self.rng.range(100, 2 * MS);
        let now = self.instant();
        let step = self.replica_mut(id).expect("up").verify_next(now, peer, generation);
        self.carry_out(id);
        match step {
            VerifyStep::Wait => self.at(next + 20 * MS, Event::VerifyStep { node: id, incarnation, peer, generation }),
            VerifyStep::Pace(wait) => self.at(self.now + wait.as_micros() as Time, Event::VerifyStep { node: id, incarnation, peer, generation }),
            VerifyStep::Read { offset, len } => self.walk_read_starts(id, incarnation, peer, generation, Walk::Verify, (offset, len)),
            VerifyStep::Finished | VerifyStep::Stop(_) => {
                let outcome = match step {
                    VerifyStep::Stop(reason) => Err(reason),
                    _ => Ok(()),
                };
                let replica = self.replica_mut(id).expect("up");
                replica.verify_ended(peer, outcome);
                let run = replica.peer(peer).sync.verify.as_ref().expect("the verify that ended");
                if run.state == VerifyState::Finished {
                    let (found_bytes, found_ranges) = (run.found_bytes, run.found_ranges.clone());
                    let marked_at_start = self.verify_marked.remove(&(id, peer)).unwrap_or(0);
                    let failed_writes = self.verify_failed.remove(&(id, peer)).unwrap_or_default();
                    self.verifies.push(VerifyDone { node: id, peer, marked_at_start, found_bytes, found_ranges, failed_writes });
                }
                self.carry_out(id);
            }
        }
    }

    /// Carries out what node `id`'s replica asked for, in order.
    pub fn carry_out(&mut self, id: u8) {
        loop {
            let Some(replica) = self.replica_mut(id) else { return };
            // Queued by a detached replica (not before its disk failed: those are carried out,
            // in order, as a driver carries out what was queued before a failure).
            let detached = replica.detached();
            let actions = replica.take_actions();
            if actions.is_empty() {
                return;
            }
            let mut queue = actions.into_iter();
            while let Some(action) = queue.next() {
                if self.shape.is_witness(id) {
                    if let Some(what) = data_action(&action) {
                        self.violation.get_or_insert_with(|| format!("witnesses hold no data: witness n{id} was asked for {what}"));
                        continue;
                    }
                }
                if detached && matches!(action, Action::Io { .. } | Action::Persist(_) | Action::WriteLog { .. } | Action::Send { .. }) {
                    let what = match &action {
                        Action::Persist(write) => format!("a metadata write ({})", write.name()),
                        Action::WriteLog { .. } => "an activity-log transaction".into(),
                        Action::Send { peer, msg, .. } => format!("a frame to n{peer} ({})", msg.name()),
                        other => data_action(other).unwrap_or_default(),
                    };
                    self.violation.get_or_insert_with(|| format!("a detached node writes and sends nothing: n{id} asked for {what}"));
                    continue;
                }
                match action {
                    Action::Persist(what) => {
                        let node = &mut self.nodes[usize::from(id)];
                        let (replica, meta) = (node.replica.as_ref().expect("up"), node.meta.as_mut().expect("up"));
                        let written = match &what {
                            MetaWrite::Superblock => meta.write_superblock(&replica.sb),
                            MetaWrite::Bitmap(slot) => meta.write_bitmap(*slot, &replica.bitmaps[*slot]),
                            MetaWrite::BitmapPages { slot, pages } => {
                                meta.write_bitmap_pages(*slot, &replica.bitmaps[*slot], pages.iter().copied())
                            }
                            MetaWrite::ActivityLog(update) => meta.write_al_update(update, &replica.bitmaps),
                            MetaWrite::DataFlush => {
                                node.data.as_mut().expect("a witness's data actions are refused above").flush();
                                Ok(())
                            }
                        };
                        if let Err(e) = written {
                            self.failed_meta_writes += 1;
                            self.last_fault = self.now;
                            let now = self.instant();
                            let rest: Vec<Action> = queue.collect();
                            self.replica_mut(id).expect("up").persist_failed(now, what, &e.to_string(), rest);
                            break;
                        }
                    }
                    Action::WriteLog { update, flush_data } => {
                        let seq = update.transaction.seq();
                        let node = &mut self.nodes[usize::from(id)];
                        let (replica, meta) = (node.replica.as_ref().expect("up"), node.meta.as_mut().expect("up"));
                        match meta.begin_al_update(&update, &replica.bitmaps) {
                            Ok(write) => {
                                node.log_write = Some((seq, write, flush_data));
                                let incarnation = node.incarnation;
                                let due = self.now + self.rng.range(20, 3 * MS);
                                self.at(due, Event::LogWritten { node: id, incarnation, seq });
                            }
                            Err(e) => {
                                self.failed_meta_writes += 1;
                                self.last_fault = self.now;
                                self.replica_mut(id).expect("up").log_written(seq, Err(e.to_string()));
                            }
                        }
                    }
                    Action::Send { peer, msg, sent_write, lane } => {
                        // Handed to the network at once: protocol A's completion for the write.
                        if self.send(id, peer, &msg, lane == blkrepl::replica::Lane::Bulk) {
                            if let Some(write) = sent_write {
                                let now = self.instant();
                                self.replica_mut(id).expect("up").peer_reached(now, write, peer, AckLevel::Sent);
                            }
                        }
                    }
                    Action::Io { tag, op } => {
                        let node = &mut self.nodes[usize::from(id)];
                        node.next_io += 1;
                        let io = node.next_io;
                        node.io.insert(io, (tag, op));
                        let incarnation = node.incarnation;
                        let due = self.now + self.rng.range(20, 3 * MS);
                        self.at(due, Event::IoDone { node: id, incarnation, io });
                    }
                    Action::Complete { request, result } => {
                        let everywhere = self.replica(id).is_some_and(every_data_peer_follows);
                        self.answers.push((id, request, result, everywhere));
                    }
                    Action::DropLink { peer, generation, reason } => {
                        let current = self.replica(id).is_some_and(|r| r.peer(peer).generation == generation);
                        if let Some(&(conn, _)) = self.nodes[usize::from(id)].links.get(&peer).filter(|_| current) {
                            self.link_lost(id, peer, conn, &reason);
                        }
                    }
                    Action::FencePeer { peer, generation } => self.fence_peer(id, peer, generation),
                    Action::StartResync { peer, generation } => {
                        let incarnation = self.nodes[usize::from(id)].incarnation;
                        let now = self.instant();
                        self.replica_mut(id).expect("up").resync_source_started(now, peer);
                        self.at(self.now, Event::ResyncStep { node: id, incarnation, peer, generation });
                    }
                }
            }
        }
    }

    /// Runs node `id`'s fence-peer handler for `peer`: its answer is any of DRBD's exit codes
    /// (true or not: the rule must stay safe whatever a handler says), another code, or a
    /// timeout, after a random delay.
    fn fence_peer(&mut self, id: u8, peer: u8, generation: u64) {
        const TIMEOUT: Time = 3 * SEC;
        self.fence_runs += 1;
        let rng = &mut self.fence_rng;
        let (outcome, after) = match rng.below(10) {
            0 => (FenceOutcome::Exited(3), rng.range(MS, TIMEOUT)),
            1 => (FenceOutcome::Exited(5), rng.range(MS, TIMEOUT)),
            2 => (FenceOutcome::Exited(6), rng.range(MS, TIMEOUT)),
            3 => (FenceOutcome::Exited(7), rng.range(MS, TIMEOUT)),
            4 => (FenceOutcome::Exited(1), rng.range(MS, TIMEOUT)),
            5 => (FenceOutcome::Failed("still running after 3 s: killed with its process group".into()), TIMEOUT),
            _ => (FenceOutcome::Exited(4), rng.range(MS, TIMEOUT)),
        };
        self.fence_self_outdated += u64::from(outcome == FenceOutcome::Exited(6));
        let incarnation = self.nodes[usize::from(id)].incarnation;
        self.log(id, || format!("fence-peer for n{peer} #{generation} runs"));
        self.at(self.now + after, Event::FenceDone { node: id, incarnation, peer, generation, outcome });
    }

    /// The nodes that are up and Primary.
    /// Diverged copies reconciled so far (counted by the nodes whose changes were discarded), in
    /// this run.
    /// What the run has sent so far, as one checksum: a seed replays exactly when every run of
    /// it ends with the same value (a replica whose choices depend on anything but its inputs,
    /// such as a hash map's iteration order, sends other frames or at other times).
    pub fn fingerprint(&self) -> u32 {
        self.fingerprint
    }

    /// Whether a data node is resyncing a peer, being resynced, or about to be.
    pub fn resyncing(&self) -> bool {
        let syncing = |p: &Peer| p.pending_sync.is_some() || matches!(p.repl, ReplState::SyncSource | ReplState::SyncTarget);
        self.nodes.iter().filter_map(|n| n.replica.as_ref()).any(|r| r.peers.iter().any(syncing))
    }

    pub fn divergences(&self) -> u64 {
        self.divergences + self.nodes.iter().filter_map(|n| n.replica.as_ref()).map(|r| r.divergences_resolved).sum::<u64>()
    }

    /// Resyncs taken so far, by bitmap and full, in this run.
    pub fn resyncs(&self) -> [u64; 3] {
        let live = self.nodes.iter().filter_map(|n| n.replica.as_ref()).map(|r| r.resyncs_taken);
        live.fold(self.resyncs, |[bitmap, full, first], [b, f, i]| [bitmap + b, full + f, first + i])
    }

    pub fn primaries(&self) -> Vec<u8> {
        (0..self.nodes.len() as u8).filter(|id| self.replica(*id).is_some_and(|r| r.role == Role::Primary)).collect()
    }
}

/// What `action` would do to the data disk, if anything.
fn data_action(action: &Action) -> Option<String> {
    match action {
        Action::Io { tag, .. } => Some(format!("data I/O ({tag:?})")),
        Action::Persist(MetaWrite::DataFlush) => Some("a data flush".into()),
        Action::WriteLog { .. } => Some("an activity-log transaction".into()),
        Action::StartResync { peer, .. } => Some(format!("a resync of n{peer}")),
        _ => None,
    }
}

/// The metadata of node `id`, as `blkrepl create-md` makes it: a peer slot for every other node,
/// witnesses too, and the smallest activity log (whose eviction the client's blocks exercise).
fn create_metadata(shape: Shape, id: u8, bitmap_block_size: u32) -> Arc<FaultyDisk<MemDisk>> {
    let disk = Arc::new(FaultyDisk::new(MemDisk::new(META_BYTES as usize)));
    let peers: Vec<u8> = shape.nodes().filter(|p| *p != id).collect();
    let params = MetaParams { al_extents: MIN_AL_EXTENTS, max_peers: peers.len() as u8, bitmap_block_size };
    let (data_bytes, internal) = meta_geometry(shape.is_witness(id));
    MetaStore::create(disk.clone(), data_bytes, internal, params, RESOURCE, id, &peers, false).expect("create metadata");
    disk
}

/// The data size and placement (internal or not) node metadata is created and opened with: a
/// data node's is external to its data disk; a witness's store holds internal metadata over
/// "data" never used (the daemon's `create_witness_store`).
fn meta_geometry(witness: bool) -> (u64, bool) {
    if witness {
        (META_BYTES, true)
    } else {
        (DISK_BYTES, false)
    }
}

/// A frame as the trace shows it.
fn describe(msg: &Message) -> String {
    match msg {
        Message::State(s) => format!(
            "State role {} disk {} current {:016X} bitmap {:016X} ({} bits) flags {:#x} position {}/{}/{}",
            s.role, s.disk, s.current_uuid, s.bitmap_uuid, s.bitmap_weight, s.flags, s.data_position.term, s.data_position.epoch, s.data_position.fua
        ),
        Message::ResyncDone { current_uuid, .. } => format!("ResyncDone {current_uuid:016X}"),
        Message::BitmapRuns { last, runs } => format!("BitmapRuns last {last} runs {}", runs.len()),
        other => other.name().to_string(),
    }
}

/// A simulated machine's boot id: node and boot count.
fn boot_id(node: u8, boots: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[0] = node + 1;
    id[8..].copy_from_slice(&boots.to_le_bytes());
    id
}
