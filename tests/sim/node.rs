//! One model node: its state, its lifecycle (boot, power loss, clean stop), quorum, and the
//! role changes. The write path and the replicated stream are in `replication`, connections and
//! resync in `sync`; all three follow `src/engine` (cited per rule) and call the same pure
//! modules it does.
//!
//! Where the engine has no rule yet (quorum, witnesses, split-brain policies, `down` marking the
//! node Outdated), the model follows issue #4 and the doc comments of `core::quorum` and
//! `core::split_brain`; docs/DESIGN.md ("Simulator") lists these.

use super::disk::{Crashed, DataDisk, Meta};
use super::network::{Ancestors, Msg, StateMsg};
use super::world::{Ctx, Event, NodeEvent, Rules};
use super::{Time, BLOCKS, BLOCK_BYTES, MS};
use blkrepl::core::inflight::InflightWrites;
use blkrepl::core::quorum::{evaluate, LinkTiming, PromotionInputs, QuorumState, VoterView};
use blkrepl::core::states::{DiskState, ReplState, Role};
use blkrepl::core::sync_decision::{same_uuid, SyncDecision, UUID_JUST_CREATED};
use blkrepl::core::transfer_log::TransferLog;
use blkrepl::disk::MemDisk;
use blkrepl::meta::{extent_offset, MetaFlags, AL_EXTENT_SIZE};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// How often a node looks after its links: pings, the read timeout, and dialing (the engine's
/// dialers retry every 300 ms).
pub const TICK: Time = 250 * MS;
/// The engine's default `ping_interval_ms`.
pub const PING_INTERVAL: Time = LinkTiming::DEFAULT.ping_interval.as_micros() as Time;
/// The engine's default `ping_timeout_ms`: a link silent this long is dropped.
pub const READ_TIMEOUT: Time = LinkTiming::DEFAULT.ping_timeout.as_micros() as Time;

/// `LinkTiming::lease` of the defaults, in virtual time.
pub fn lease() -> Time {
    LinkTiming::DEFAULT.lease().as_micros() as Time
}

/// A client write: which block, and the version it writes (unique, increasing).
#[derive(Debug, Clone, Copy)]
pub struct AppWrite {
    pub block: usize,
    pub version: u64,
}

/// A resync with one peer, from this node's side.
#[derive(Debug)]
pub struct ResyncRun {
    /// Unique per run, for the progress checker.
    pub id: u64,
    pub total_blocks: u64,
    /// Source only: the next block to look at, and the epoch whose barrier ends a pass.
    pub cursor: u64,
    pub draining: Option<u64>,
    /// Source only: the target reported Inconsistent during this resync.
    pub target_started: bool,
}

/// One connection to a peer, as this node sees it. Dropped whole when the link dies.
pub struct Link {
    pub conn: u64,
    pub last_received: Time,
    pub next_ping: Time,
    /// As a primary, this peer's vote counts until then (a lease after the send time of the last
    /// ping it answered).
    pub lease_until: Time,
    pub repl: ReplState,
    pub role: Role,
    pub disk: DiskState,
    /// The last State received, and the last one sent (without `changed_blocks`).
    pub state: Option<StateMsg>,
    pub sent_state: Option<StateMsg>,
    pub tl: TransferLog,
    pub barriers: VecDeque<(u64, u32)>,
    pub rx_epoch_writes: u32,
    pub pending_sync: Option<SyncDecision>,
    pub resync: Option<ResyncRun>,
    /// The reader: frames in arrival order, handled one at a time; `busy` while the head's disk
    /// write runs (the engine's reader thread writes synchronously).
    pub inbox: VecDeque<Msg>,
    pub busy: bool,
}

impl Link {
    pub fn new(conn: u64, now: Time) -> Link {
        Link {
            conn,
            last_received: now,
            next_ping: now,
            lease_until: 0,
            repl: ReplState::Off,
            role: Role::Unknown,
            disk: DiskState::DUnknown,
            state: None,
            sent_state: None,
            tl: TransferLog::default(),
            barriers: VecDeque::new(),
            rx_epoch_writes: 0,
            pending_sync: None,
            resync: None,
            inbox: VecDeque::new(),
            busy: false,
        }
    }

    /// The engine's `Peer::is_replicating`: application writes flow to this peer.
    pub fn is_replicating(&self) -> bool {
        matches!(self.repl, ReplState::Established | ReplState::SyncSource)
    }
}

pub struct Peer {
    pub id: u8,
    pub witness: bool,
    /// Bitmap slot (data peers of a data node only).
    pub slot: Option<usize>,
    pub want_connect: bool,
    /// Left cleanly: not a voter until it connects again.
    pub departed: bool,
    /// A dial in progress: connection id and when it started.
    pub dialing: Option<(u64, Time)>,
    pub link: Option<Link>,
}

/// Write errors injected on this node's data disk, in percent.
#[derive(Debug, Clone, Copy, Default)]
pub struct IoErrors {
    /// Writes applied from a peer's stream (replication and resync).
    pub stream: u64,
    /// The primary's own writes.
    pub local: u64,
}

pub struct Node {
    pub id: u8,
    pub witness: bool,
    pub up: bool,
    /// Bumped whenever the node goes down; events of an older incarnation are dropped.
    pub incarnation: u64,
    pub role: Role,
    pub disk: DiskState,
    /// The data and metadata disks outlive crashes; everything below `meta` is memory.
    pub data: DataDisk,
    meta_disk: Option<Arc<MemDisk>>,
    pub meta: Option<Meta>,
    pub crashed_primary: bool,
    pub peers: Vec<Peer>,
    pub inflight: InflightWrites,
    /// What each in-flight write is: its client write and local disk I/O.
    pub writes: BTreeMap<u64, (AppWrite, u64)>,
    /// Writes waiting for an overlapping write, the resync lock or the activity log.
    pub waiting: Vec<AppWrite>,
    /// Finished writes held while a primary has no quorum (`on_no_quorum = suspend-io`).
    pub suspended: Vec<AppWrite>,
    pub epoch: u64,
    /// The block the resync source is reading (writes to it wait).
    pub resync_lock: Option<usize>,
    /// Demotion asked: no new writes; demote once in-flight writes are done.
    pub draining: bool,
    pub discard_my_data: bool,
    pub io_errors: IoErrors,
    /// The newest data generation this node acknowledged from a primary, or created as one
    /// (`Amendments::generation_votes`). Durable: it survives crashes.
    pub acknowledged: u64,
    /// The checkers' number for this node's current (or last) time as primary.
    pub tenure: usize,
}

/// The blocks of an activity-log extent.
pub fn extent_blocks(extent: u64) -> std::ops::Range<usize> {
    let first = (extent_offset(extent) / BLOCK_BYTES) as usize;
    first.min(BLOCKS)..(first + (AL_EXTENT_SIZE / BLOCK_BYTES) as usize).min(BLOCKS)
}

impl Node {
    /// A configured node, not yet started. Data nodes get fresh metadata (`create-md`).
    /// `nodes` lists every node of the resource as (id, is_witness).
    pub fn new(id: u8, witness: bool, nodes: &[(u8, bool)]) -> Node {
        let data_peers: Vec<u8> = nodes.iter().filter(|(n, w)| *n != id && !w).map(|(n, _)| *n).collect();
        assert!(data_peers.len() <= 4, "State carries the bitmap UUIDs of at most 4 data peers");
        let meta_disk = (!witness).then(|| {
            let disk = super::disk::new_meta_disk(data_peers.len());
            Meta::create(&disk, id, &data_peers);
            disk
        });
        let peers = nodes
            .iter()
            .filter(|(n, _)| *n != id)
            .map(|&(n, peer_witness)| Peer {
                id: n,
                witness: peer_witness,
                slot: if witness || peer_witness { None } else { data_peers.iter().position(|p| *p == n) },
                want_connect: true,
                departed: false,
                dialing: None,
                link: None,
            })
            .collect();
        Node {
            id,
            witness,
            up: false,
            incarnation: 0,
            role: Role::Secondary,
            disk: if witness { DiskState::Diskless } else { DiskState::Inconsistent },
            data: DataDisk::new(),
            meta_disk,
            meta: None,
            crashed_primary: false,
            peers,
            inflight: InflightWrites::new(),
            writes: BTreeMap::new(),
            waiting: Vec::new(),
            suspended: Vec::new(),
            epoch: 1,
            resync_lock: None,
            draining: false,
            discard_my_data: false,
            io_errors: IoErrors::default(),
            acknowledged: 0,
            tenure: 0,
        }
    }

    pub fn meta(&mut self) -> &mut Meta {
        self.meta.as_mut().expect("a running data node has metadata")
    }

    pub fn peer(&self, id: u8) -> &Peer {
        self.peers.iter().find(|p| p.id == id).expect("configured peer")
    }

    pub fn peer_mut(&mut self, id: u8) -> &mut Peer {
        self.peers.iter_mut().find(|p| p.id == id).expect("configured peer")
    }

    pub fn link(&self, id: u8) -> Option<&Link> {
        self.peer(id).link.as_ref()
    }

    pub fn link_mut(&mut self, id: u8) -> Option<&mut Link> {
        self.peer_mut(id).link.as_mut()
    }

    /// The link to `id` if it is connection `conn`.
    pub fn link_on(&mut self, id: u8, conn: u64) -> Option<&mut Link> {
        self.link_mut(id).filter(|l| l.conn == conn)
    }

    pub fn schedule(&self, cx: &mut Ctx, delay: Time, what: NodeEvent) {
        cx.queue.at(cx.now + delay, Event::Node { node: self.id, incarnation: self.incarnation, what });
    }

    /// Starts the daemon: attach the metadata (the engine's `Engine::open_on`), Secondary.
    /// An error means the metadata did not survive a crash.
    pub fn boot(&mut self, cx: &mut Ctx) -> Result<(), String> {
        self.role = Role::Secondary;
        self.crashed_primary = false;
        self.inflight = InflightWrites::new();
        self.writes.clear();
        self.waiting.clear();
        self.suspended.clear();
        self.epoch = 1;
        self.resync_lock = None;
        self.draining = false;
        self.discard_my_data = false;
        for peer in self.peers.iter_mut() {
            peer.want_connect = true;
            peer.departed = false;
            peer.dialing = None;
            peer.link = None;
        }
        if let Some(disk) = &self.meta_disk {
            let (mut meta, crashed_primary) =
                Meta::open(disk, self.id).map_err(|e| format!("n{} cannot attach its metadata: {e}", self.id))?;
            if crashed_primary {
                // Writes in the hot extents may have reached only this disk or only the peers.
                for extent in meta.al.hot_extents() {
                    for block in extent_blocks(extent) {
                        for slot in 0..meta.bitmaps.len() {
                            meta.mark(slot, block);
                        }
                    }
                }
                let clean = meta.al.mark_clean().expect("nothing in flight at attach");
                meta.apply_al_update(clean).expect("no crash is armed at attach");
            }
            self.disk = blkrepl::replica::Replica::disk_state_from_flags(meta.sb.flags);
            self.crashed_primary = crashed_primary;
            self.meta = Some(meta);
        }
        self.up = true;
        cx.log(self.id, || {
            format!("up: {} {}{}", self.role, self.disk, if self.crashed_primary { ", crashed as primary" } else { "" })
        });
        let phase = cx.rng.range(0, TICK);
        self.schedule(cx, phase, NodeEvent::Tick);
        Ok(())
    }

    /// Power loss: memory is gone, data writes in progress landed or not, the metadata disk
    /// holds what reached it.
    pub fn power_loss(&mut self, cx: &mut Ctx) {
        cx.stats.power_losses += 1;
        cx.stats.torn_metadata += u64::from(self.meta.as_ref().is_some_and(|m| m.crashed()));
        self.data.power_loss(cx.rng);
        self.meta = None;
        self.up = false;
        self.incarnation += 1;
        for peer in self.peers.iter_mut() {
            peer.link = None;
            peer.dialing = None;
        }
        cx.log(self.id, || "power loss".into());
    }

    /// Arms a crash in the middle of a metadata write (see `disk`). Witnesses have none.
    pub fn arm_crash(&mut self, k: u64, tear_sectors: u64) -> bool {
        match &self.meta {
            Some(meta) => {
                meta.arm_crash(k, tear_sectors);
                true
            }
            None => false,
        }
    }

    /// `blkrepl down` on a Secondary, then the engine's clean shutdown. When an UpToDate data
    /// peer stays to carry on, this node first marks its data Outdated and tells the peers it
    /// departs, so they stop counting it as a voter; otherwise it still holds the newest data
    /// and keeps its vote.
    pub fn shut_down(&mut self, cx: &mut Ctx) -> Result<(), Crashed> {
        assert_eq!(self.role, Role::Secondary, "demote before down");
        let successor =
            self.peers.iter().any(|p| !p.witness && p.link.as_ref().is_some_and(|l| l.disk == DiskState::UpToDate));
        let departing = successor || self.witness;
        if successor && matches!(self.disk, DiskState::UpToDate | DiskState::Consistent) {
            self.disk = DiskState::Outdated;
            let meta = self.meta();
            meta.sb.flags.remove(MetaFlags::WAS_UP_TO_DATE);
            meta.persist()?;
        }
        let linked: Vec<u8> = self.peers.iter().filter(|p| p.link.is_some()).map(|p| p.id).collect();
        for id in linked {
            let conn = self.link(id).map(|l| l.conn).expect("linked");
            cx.send(self.id, id, conn, Msg::Disconnect { departing });
            self.drop_peer(cx, id, "going down", false)?;
        }
        self.data.settle();
        if let Some(meta) = self.meta.as_mut() {
            meta.clean_shutdown()?;
            if self.crashed_primary {
                // The activity log's extents are in the bitmaps but not yet repaired.
                meta.sb.flags.insert(MetaFlags::PRIMARY_IND);
                meta.persist()?;
            }
        }
        self.meta = None;
        self.up = false;
        self.incarnation += 1;
        cx.stats.clean_downs += 1;
        cx.log(self.id, || "down".into());
        Ok(())
    }

    /// The nodes this node sees as primary, itself included.
    pub fn sees_primary(&self) -> u32 {
        let me = if self.role == Role::Primary { 1 << self.id } else { 0 };
        self.peers
            .iter()
            .filter(|p| p.link.as_ref().is_some_and(|l| l.role == Role::Primary))
            .fold(me, |m, p| m | 1 << p.id)
    }

    /// `core::quorum::evaluate` over this node's view. A peer counts once its State arrived
    /// (before that its `sees_primary` is unknown); as a primary (and, amended, as a candidate)
    /// only within its lease; amended, only for the generation it acknowledged.
    pub fn quorum(&self, now: Time, rules: &Rules, as_primary: bool) -> QuorumState {
        let leased = as_primary || rules.amend.leased_votes_for_promotion;
        let (current, ancestors) = self.lineage();
        let counts_for_me = |state: &StateMsg| {
            !rules.amend.generation_votes
                || if as_primary {
                    same_uuid(state.acknowledged, current)
                } else {
                    holds(current, &ancestors, state.acknowledged)
                }
        };
        let views: Vec<VoterView> = self
            .peers
            .iter()
            .map(|p| {
                let state = p.link.as_ref().and_then(|l| l.state.as_ref().map(|s| (l, s)));
                VoterView {
                    node_id: p.id,
                    reachable: state.is_some_and(|(l, s)| (!leased || now < l.lease_until) && counts_for_me(s)),
                    departed: p.departed && !rules.amend.departed_still_vote,
                    sees_primary: state.map_or(0, |(_, s)| s.sees_primary),
                }
            })
            .collect();
        evaluate(rules.quorum, self.id, &views)
    }

    /// This node's current generation and those its data descends from (none for a witness).
    pub fn lineage(&self) -> (u64, Ancestors) {
        let mut ancestors = [0; 8];
        if let Some(m) = &self.meta {
            let uuids = m.sb.uuids.history.iter().copied().chain(m.sb.peers.iter().map(|p| p.bitmap_uuid));
            for (slot, uuid) in ancestors.iter_mut().zip(uuids) {
                *slot = uuid;
            }
        }
        (self.meta.as_ref().map_or(0, |m| m.sb.uuids.current), ancestors)
    }

    /// Takes `current` as the generation this node acknowledges.
    pub fn acknowledge(&mut self, current: u64) {
        self.acknowledged = current & !1;
    }

    /// Whether a write finishing now would be completed upward.
    pub fn can_complete(&self, now: Time, rules: &Rules) -> bool {
        self.up && self.role == Role::Primary && self.quorum(now, rules, true).has_quorum
    }

    /// Whether `primary` (no `--force`) succeeds now: `PromotionInputs::may_promote`, plus the
    /// engine's own refusals.
    pub fn may_promote(&self, now: Time, rules: &Rules) -> bool {
        if !self.up || self.witness || self.role == Role::Primary {
            return false;
        }
        let inputs = PromotionInputs {
            role: self.role,
            disk: self.disk,
            quorum: self.quorum(now, rules, false),
            all_data_peers_known: self.peers.iter().filter(|p| !p.witness).all(|p| p.link.is_some()),
            peer_up_to_date: self.peers.iter().any(|p| p.link.as_ref().is_some_and(|l| l.disk == DiskState::UpToDate)),
        };
        let peer_primary = self.peers.iter().any(|p| p.link.as_ref().is_some_and(|l| l.role == Role::Primary));
        let target =
            self.peers.iter().any(|p| p.link.as_ref().is_some_and(|l| l.pending_sync.is_some_and(|d| d.is_target())));
        inputs.may_promote() && !peer_primary && !(target && rules.amend.no_promotion_while_target)
    }

    /// The engine's `Engine::promote`: peers that will not see this node's writes from the start
    /// make it begin a new generation; metadata says Primary before any write.
    pub fn promote(&mut self, cx: &mut Ctx, force: bool) -> Result<(), Crashed> {
        let resyncing_counts = cx.rules.amend.resync_target_is_present;
        let present = |l: &Link| {
            l.repl == ReplState::Established && l.disk == DiskState::UpToDate
                || resyncing_counts && l.repl == ReplState::SyncSource
        };
        let absent: Vec<usize> = self
            .peers
            .iter()
            .filter(|p| force || !p.link.as_ref().is_some_and(present))
            .filter_map(|p| p.slot)
            .collect();
        let fresh = fresh_uuid(cx);
        let meta = self.meta();
        if force || !absent.is_empty() {
            let was_fresh = same_uuid(meta.sb.uuids.current, UUID_JUST_CREATED);
            let mut generation = meta.generation();
            let started = generation.new_current(fresh, true, false, &absent);
            meta.set_generation(generation);
            if was_fresh {
                for slot in started {
                    meta.bitmaps[slot].set_all();
                }
            }
        }
        meta.sb.flags.insert(MetaFlags::CONSISTENT | MetaFlags::WAS_UP_TO_DATE | MetaFlags::PRIMARY_IND);
        meta.sb.flags.remove(MetaFlags::AL_CLEAN);
        meta.persist()?;
        self.disk = DiskState::UpToDate;
        self.role = Role::Primary;
        self.tenure = cx.history.new_tenure(self.id);
        cx.stats.promotions += 1;
        let current = self.meta().sb.uuids.current;
        self.acknowledge(current);
        cx.log(self.id, || format!("promoted{}, generation {current:X}", if force { " (forced)" } else { "" }));
        super::checkers::on_promotion(self, cx);
        self.reconsider_peers(cx)
    }

    /// The engine's `Engine::demote` once in-flight writes are done: writes still held for
    /// quorum fail, a final barrier goes out, and the metadata says Secondary with a clean log.
    pub fn demote(&mut self, cx: &mut Ctx) -> Result<(), Crashed> {
        for w in std::mem::take(&mut self.suspended) {
            cx.history.fail(w.version);
        }
        self.role = Role::Secondary;
        self.draining = false;
        self.send_barriers(cx);
        let meta = self.meta();
        meta.sb.flags.remove(MetaFlags::PRIMARY_IND);
        let clean = meta.al.mark_clean().expect("no write in flight at demotion");
        meta.apply_al_update(clean)?;
        meta.sb.flags.insert(MetaFlags::AL_CLEAN);
        meta.persist()?;
        cx.log(self.id, || "demoted".into());
        Ok(())
    }

    /// What this node tells `peer` about itself (the engine's `State::peer_state_for`).
    pub fn state_for(&self, peer: &Peer) -> StateMsg {
        let (current, history, bitmap_uuid, changed_blocks) = match &self.meta {
            Some(m) => {
                let slot = peer.slot;
                (
                    m.sb.uuids.current,
                    m.sb.uuids.history,
                    slot.map_or(0, |s| m.sb.peers[s].bitmap_uuid),
                    slot.map_or(0, |s| m.bitmaps[s].weight()),
                )
            }
            None => (0, [0; 4], 0, 0),
        };
        StateMsg {
            role: self.role,
            disk: self.disk,
            current,
            bitmap_uuid,
            history,
            crashed_primary: self.crashed_primary,
            sees_primary: self.sees_primary(),
            changed_blocks,
            discard_my_data: self.discard_my_data,
            ancestors: self.lineage().1,
            acknowledged: self.acknowledged,
        }
    }

    /// Sends State to every peer whose last copy is out of date. The engine broadcasts at each
    /// change of role, disk or generation; quorum also needs `sees_primary` to spread, so the
    /// model sends whenever anything but the bitmap weight changed.
    pub fn publish_state(&mut self, cx: &mut Ctx) {
        if !self.up {
            return;
        }
        for i in 0..self.peers.len() {
            let Some(link) = &self.peers[i].link else { continue };
            let state = self.state_for(&self.peers[i]);
            let key = StateMsg { changed_blocks: 0, ..state };
            if link.sent_state.as_ref() == Some(&key) {
                continue;
            }
            let (to, conn) = (self.peers[i].id, link.conn);
            cx.send(self.id, to, conn, Msg::State(state));
            self.peers[i].link.as_mut().expect("linked").sent_state = Some(key);
        }
    }

    /// Clears the crash marker once a resync repaired the activity log's extents.
    pub fn clear_crash_marker(&mut self) {
        if std::mem::take(&mut self.crashed_primary) && self.role != Role::Primary {
            self.meta().sb.flags.remove(MetaFlags::PRIMARY_IND);
        }
    }
}

/// Whether data with `current` and `ancestors` holds generation `uuid` (0: nothing to hold).
pub fn holds(current: u64, ancestors: &[u64], uuid: u64) -> bool {
    uuid == 0 || same_uuid(current, uuid) || ancestors.iter().any(|a| same_uuid(*a, uuid))
}

/// A new generation UUID (from the run's RNG, so runs replay).
pub fn fresh_uuid(cx: &mut Ctx) -> u64 {
    loop {
        let uuid = cx.rng.next_u64() & !1;
        if uuid != 0 && !same_uuid(uuid, UUID_JUST_CREATED) {
            return uuid;
        }
    }
}
