//! Replicas for unit tests: real metadata, created and loaded as a node attaching would.

use super::{Action, Attached, Peer, Replica};
use crate::config::Protocol;
use crate::core::states::{DiskState, ReplState, Role};
use crate::core::quorum::{LinkTiming, OnNoQuorum, QuorumPolicy};
use crate::core::resync_rate::RateLimits;
use crate::disk::{Disk, MemDisk};
use crate::meta::{MetaParams, MetaStore};
use crate::wire::DataPosition;
use std::sync::Arc;
use std::time::Instant;

const DISK_BYTES: u64 = 32 << 20;

/// Node 0 of two data nodes (its peer is node 1, "beta"), Secondary, quorum off; and the
/// instant it attached.
pub fn two_node_replica() -> (Replica, Instant) {
    replica_with_peers(&[1], MetaParams::default())
}

/// [`two_node_replica`] whose bitmap bit stands for `bitmap_block_size` bytes.
pub fn two_node_replica_with_blocks_of(bitmap_block_size: u32) -> (Replica, Instant) {
    replica_with_peers(&[1], MetaParams { bitmap_block_size, ..MetaParams::default() })
}

/// Node 0 of three data nodes (node 1 "beta" in slot 0, node 2 "gamma" in slot 1), otherwise
/// as [`two_node_replica`].
pub fn three_node_replica() -> (Replica, Instant) {
    replica_with_peers(&[1, 2], MetaParams::default())
}

/// The replica's actions, with every activity-log transaction among them written as a driver
/// writes it (reported by `Replica::log_written`), followed by what that let go.
pub fn settled(r: &mut Replica) -> Vec<Action> {
    let mut all = Vec::new();
    loop {
        let actions = r.take_actions();
        if actions.is_empty() {
            return all;
        }
        let written: Vec<u64> = actions
            .iter()
            .filter_map(|a| match a {
                Action::WriteLog { update, .. } => Some(update.transaction.seq()),
                _ => None,
            })
            .collect();
        all.extend(actions);
        for seq in written {
            r.log_written(seq, Ok(()));
        }
    }
}

/// The data frames to peers among `actions`, by offset.
pub fn data_sent(actions: &[Action]) -> Vec<u64> {
    let offset = |a: &Action| match a {
        Action::Send { msg: crate::wire::Message::Data { offset, .. }, .. } => Some(*offset),
        _ => None,
    };
    actions.iter().filter_map(offset).collect()
}

/// The position the `ResyncDone` among `actions` hands its target.
pub fn resync_done_position(actions: Vec<Action>) -> DataPosition {
    let position = |a: Action| match a {
        Action::Send { msg: crate::wire::Message::ResyncDone { position, .. }, .. } => Some(position),
        _ => None,
    };
    actions.into_iter().find_map(position).expect("a ResyncDone among the actions")
}

/// The activity-log transactions among `actions`: each one's sequence number and the extents
/// it makes hot, sorted.
pub fn log_writes(actions: &[Action]) -> Vec<(u64, Vec<u64>)> {
    let log_write = |a: &Action| match a {
        Action::WriteLog { update, .. } => {
            let mut added = update.added().to_vec();
            added.sort_unstable();
            Some((update.transaction.seq(), added))
        }
        _ => None,
    };
    actions.iter().filter_map(log_write).collect()
}

/// A clock for tests of what a paced walk (a resync, a verify) does rather than how fast: each
/// reading is a second after the last, so the rate controller never holds the walk back.
pub struct Ticks(pub Instant);

impl Ticks {
    pub fn advance(&mut self) -> Instant {
        self.0 += std::time::Duration::from_secs(1);
        self.0
    }
}

/// The default bounds (`resync_rate_max_kib`, `resync_rate_min_kib`).
pub const RESYNC_RATE: RateLimits = RateLimits {
    max_bytes_per_s: crate::config::DEFAULT_RESYNC_RATE_MAX_KIB * 1024,
    min_bytes_per_s: crate::config::DEFAULT_RESYNC_RATE_MIN_KIB * 1024,
};

fn replica_with_peers(ids: &[u8], params: MetaParams) -> (Replica, Instant) {
    let disk = created_disk(ids, params);
    attach_disk(disk, ids, [0; 16])
}

/// Node 0 of [`three_node_replica`] restarted after its process died as a secondary: the
/// extent of `hot_offset` was hot in its activity log, and the machine's boot id was
/// `stopped_in` then and is `boot_id` now.
pub fn three_node_secondary_restarted(hot_offset: u64, stopped_in: [u8; 16], boot_id: [u8; 16]) -> (Replica, Instant) {
    let ids = [1, 2];
    let disk = created_disk(&ids, MetaParams::default());
    let (mut store, loaded) = MetaStore::open(disk.clone(), DISK_BYTES, true, "r0", 0).expect("open metadata");
    let mut al = loaded.activity_log;
    let extents = crate::meta::extents_for(hot_offset, 4096).expect("one extent");
    let Ok(crate::meta::AlPrepared::Transaction(update)) = al.prepare(extents) else { panic!("a cold extent needs a transaction") };
    store.write_al_update(&update, &loaded.bitmaps).expect("write the activity log");
    let mut sb = loaded.superblock;
    sb.boot_id = stopped_in;
    store.write_superblock(&sb).expect("write the superblock");
    attach_disk(disk, &ids, boot_id)
}

/// Node 0 of [`three_node_replica`] restarted after its process died as the primary of term 3
/// (`own_stream`: its metadata says the data's term is its own election's, see
/// `MetaFlags::OWN_STREAM`); the machine's boot id was `stopped_in` then and is `boot_id` now.
pub fn three_node_primary_restarted(own_stream: bool, stopped_in: [u8; 16], boot_id: [u8; 16]) -> (Replica, Instant) {
    let ids = [1, 2];
    let disk = created_disk(&ids, MetaParams::default());
    let (mut store, loaded) = MetaStore::open(disk.clone(), DISK_BYTES, true, "r0", 0).expect("open metadata");
    let mut sb = loaded.superblock;
    sb.boot_id = stopped_in;
    sb.flags.insert(crate::meta::MetaFlags::PRIMARY_IND);
    sb.flags.set(crate::meta::MetaFlags::OWN_STREAM, own_stream);
    (sb.terms.highest, sb.terms.of_data, sb.terms.epoch_of_data) = (3, 3, 0);
    store.write_superblock(&sb).expect("write the superblock");
    attach_disk(disk, &ids, boot_id)
}

fn created_disk(ids: &[u8], params: MetaParams) -> Arc<dyn Disk> {
    let disk: Arc<dyn Disk> = Arc::new(MemDisk::new(DISK_BYTES as usize));
    let params = MetaParams { max_peers: ids.len() as u8, ..params };
    MetaStore::create(disk.clone(), DISK_BYTES, true, params, "r0", 0, ids, false).expect("create metadata");
    disk
}

fn attach_disk(disk: Arc<dyn Disk>, ids: &[u8], boot_id: [u8; 16]) -> (Replica, Instant) {
    let (_, loaded) = MetaStore::open(disk, DISK_BYTES, true, "r0", 0).expect("open metadata");
    let now = Instant::now();
    let names = ["alpha", "beta", "gamma"];
    let replica = Replica::attach(Attached {
        resource: "r0".into(),
        witness: false,
        timing: LinkTiming::DEFAULT,
        protocol: Protocol::C,
        congestion_fill: None,
        send_queue_bytes: crate::config::SEND_QUEUE_KIB as usize * 1024,
        resync_rate: RESYNC_RATE,
        sb: loaded.superblock,
        bitmaps: loaded.bitmaps,
        al: loaded.activity_log,
        crashed_primary: loaded.crashed_as_primary,
        left_behind_device: false,
        peers: ids.iter().enumerate().map(|(slot, id)| Peer::new(*id, names[usize::from(*id)].into(), slot, false)).collect(),
        quorum_policy: QuorumPolicy::Off,
        on_no_quorum: OnNoQuorum::SuspendIo,
        split_brain: Default::default(),
        fencing: crate::config::Fencing::DontCare,
        on_superseded: crate::config::OnSuperseded::ForceSecondary,
        now,
        uuid_seed: 1,
        boot_id,
    });
    (replica, now)
}

/// [`two_node_replica`] connected to its peer, Established, with this node and the peer in the
/// given roles, both UpToDate; the actions of getting there are taken.
fn established(role: Role, peer_role: Role) -> (Replica, Instant) {
    established_on(two_node_replica(), role, peer_role)
}

/// `r` connected to every peer, Established, in the given roles, all UpToDate; the actions of
/// getting there are taken.
fn established_on((mut r, t0): (Replica, Instant), role: Role, peer_role: Role) -> (Replica, Instant) {
    r.role = role;
    r.disk = DiskState::UpToDate;
    let ids: Vec<u8> = r.peers.iter().map(|p| p.node_id).collect();
    for id in ids {
        r.link_up(id, t0);
        let peer = r.peer_mut(id);
        peer.repl = ReplState::Established;
        peer.role = peer_role;
        peer.disk = DiskState::UpToDate;
    }
    r.take_actions();
    (r, t0)
}

/// A primary replicating to both peers of [`three_node_replica`].
pub fn primary_replicating_to_two() -> (Replica, Instant) {
    established_on(three_node_replica(), Role::Primary, Role::Secondary)
}

/// A write of `len` bytes at `offset`.
/// The ballot and term of the vote request `r` queued for `peer` (its actions are taken): what
/// an election's test answers.
pub fn vote_request(r: &mut Replica, peer: u8) -> (u64, u64) {
    let actions = r.take_actions();
    let request = actions.iter().find_map(|a| match a {
        Action::Send { peer: to, msg: crate::wire::Message::VoteRequest { ballot, term, .. }, .. } if *to == peer => Some((*ballot, *term)),
        _ => None,
    });
    request.unwrap_or_else(|| panic!("no vote request to node {peer} in {actions:?}"))
}

pub fn write(offset: u64, len: usize) -> crate::frontend::BlockRequest {
    crate::frontend::BlockRequest::Write { offset, data: bytes::Bytes::from(vec![7u8; len]), fua: false }
}

/// The answers among `actions`: (request, result).
pub fn answers(actions: &[super::Action]) -> Vec<(u64, crate::frontend::BlockResult)> {
    let answer = |a: &super::Action| match a {
        super::Action::Complete { request, result } => Some((*request, result.clone())),
        _ => None,
    };
    actions.iter().filter_map(answer).collect()
}

/// A primary replicating to its peer.
pub fn primary_replicating() -> (Replica, Instant) {
    established(Role::Primary, Role::Secondary)
}

/// A secondary whose peer is its primary.
pub fn secondary_of_primary() -> (Replica, Instant) {
    established(Role::Secondary, Role::Primary)
}

/// [`secondary_of_primary`] whose activity log has `al_extents` slots (its disk holds 8
/// extents).
pub fn secondary_of_primary_with_al_extents(al_extents: u32) -> (Replica, Instant) {
    let two_nodes = replica_with_peers(&[1], MetaParams { al_extents, ..MetaParams::default() });
    established_on(two_nodes, Role::Secondary, Role::Primary)
}

/// Node 0 in `role` under quorum "majority" with node 1, its data peer (Secondary, UpToDate,
/// Established), and node 2 a witness; both peers report this node's generation and answered a
/// ping at the instant returned, so their leases hold from it.
pub fn with_data_peer_and_witness(role: Role) -> (Replica, Instant) {
    let (mut r, t0) = three_node_replica();
    r.quorum_policy = QuorumPolicy::Majority;
    r.role = role;
    r.disk = DiskState::UpToDate;
    r.peer_mut(2).witness = true;
    let timing = r.timing;
    for id in [1, 2] {
        r.link_up(id, t0);
        r.peer_mut(id).last_state = Some(secondary_state(r.sb.uuids.current, [0; 4]));
        assert!(r.peer_mut(id).lease.ping_due(t0, &timing));
        r.peer_mut(id).lease.answered();
    }
    let data_peer = r.peer_mut(1);
    (data_peer.repl, data_peer.role, data_peer.disk) = (ReplState::Established, Role::Secondary, DiskState::UpToDate);
    r.take_actions();
    (r, t0)
}

/// A peer's State: Secondary, UpToDate, at `current_uuid` with `history`, seeing no primary.
pub fn secondary_state(current_uuid: u64, history: [u64; 4]) -> crate::wire::PeerState {
    crate::wire::PeerState {
        role: Role::Secondary.to_wire(),
        disk: DiskState::UpToDate.to_wire(),
        flags: 0,
        current_uuid,
        bitmap_uuid: 0,
        history,
        bitmap_weight: 0,
        primaries: 0,
        term: 0,
        data_position: DataPosition::default(),
        resynced_by: None,
        lagging: 0,
    }
}
