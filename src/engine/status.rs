//! A snapshot of one resource for `blkrepl status` (human and `--json`).

use super::state::State;
use super::Shared;
use crate::core::quorum::{OnNoQuorum, PromotionInputs};
use crate::core::states::{DiskState, Role};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResourceStatus {
    pub name: String,
    pub node: String,
    pub role: String,
    pub disk: String,
    /// Whether this node has quorum (always, while the policy is "off").
    pub quorum: bool,
    pub quorum_policy: String,
    /// Voters reached (itself included), voters counted, votes needed.
    pub quorum_votes: u8,
    pub quorum_voters: u8,
    pub quorum_needed: u8,
    pub on_no_quorum: OnNoQuorum,
    /// Writes completed locally but held because this primary has no quorum (suspend-io).
    pub suspended_writes: usize,
    /// Whether `primary` (without --force) would succeed now.
    pub may_promote: bool,
    /// How good a primary this node would be (Pacemaker's scale): none without quorum.
    pub promotion_score: Option<u32>,
    /// Where the device is exported while primary (`nbd://ADDR/NAME` or `/dev/ublkbN`).
    pub device: Option<String>,
    /// "serving"; "suspended: WHY" for a ublk device left behind by a daemon that died as
    /// primary, its I/O held until this node is primary again; "failing: WHY" when this node
    /// gave that up and fails every request rather than serve stale data.
    pub device_io: Option<String>,
    /// The ublk features the device runs with (user copy, recovery, ...); absent for NBD.
    pub ublk_features: Option<Vec<String>>,
    /// NBD clients connected to the export (demotion is refused while any is).
    pub nbd_clients: usize,
    pub protocol: String,
    pub size_bytes: u64,
    pub generation_uuid: String,
    pub peers: Vec<PeerStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub name: String,
    pub node_id: u8,
    /// A diskless witness (votes only).
    pub witness: bool,
    /// Left cleanly and no longer counted for quorum until it returns.
    pub departed: bool,
    pub connection: String,
    pub replication: String,
    pub peer_role: String,
    pub peer_disk: String,
    pub out_of_sync_bytes: u64,
    pub sent_bytes: u64,
    pub received_bytes: u64,
    pub resync: Option<ResyncStatus>,
    /// Why the last connection attempt or connection ended, if it did.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResyncStatus {
    pub full: bool,
    pub total_bytes: u64,
    pub done_percent: f64,
    pub rate_kib_per_s: u64,
    pub eta_s: Option<u64>,
}

pub fn build(shared: &Shared, st: &State) -> ResourceStatus {
    let peers = st
        .peers
        .iter()
        .map(|p| {
            let out_of_sync_bytes = st.bitmaps[p.slot].weight_bytes().min(shared.data_size_bytes);
            let resync = p.resync.as_ref().map(|r| {
                let done = r.total_bytes.saturating_sub(out_of_sync_bytes);
                let elapsed_ms = r.started.elapsed().as_millis().max(1) as u64;
                let rate = done * 1000 / elapsed_ms;
                ResyncStatus {
                    full: r.full,
                    total_bytes: r.total_bytes,
                    done_percent: if r.total_bytes == 0 { 100.0 } else { done as f64 * 100.0 / r.total_bytes as f64 },
                    rate_kib_per_s: rate / 1024,
                    eta_s: (rate > 0).then(|| out_of_sync_bytes / rate),
                }
            });
            PeerStatus {
                name: p.name.clone(),
                node_id: p.node_id,
                witness: p.witness,
                departed: p.departed,
                connection: p.conn.to_string(),
                replication: p.repl.to_string(),
                peer_role: p.role.to_string(),
                peer_disk: p.disk.to_string(),
                out_of_sync_bytes,
                sent_bytes: p.sent_bytes_before + p.link.as_ref().map_or(0, |l| l.sent_bytes()),
                received_bytes: p.received_bytes,
                resync,
                last_error: p.last_error.clone(),
            }
        })
        .collect();
    let quorum = st.quorum();
    let promotion = PromotionInputs {
        role: st.role,
        disk: st.disk,
        quorum,
        all_data_peers_known: st.peers.iter().filter(|p| !p.witness).all(|p| p.last_state.is_some()),
        peer_up_to_date: st.peers.iter().any(|p| p.last_state.is_some() && p.disk == DiskState::UpToDate),
    };
    ResourceStatus {
        name: shared.config.name.clone(),
        node: shared.me.name.clone(),
        role: st.role.to_string(),
        disk: st.disk.to_string(),
        quorum: quorum.has_quorum,
        quorum_policy: st.quorum_policy.to_string(),
        quorum_votes: quorum.votes,
        quorum_voters: quorum.voters,
        quorum_needed: quorum.needed,
        on_no_quorum: st.on_no_quorum,
        suspended_writes: st.suspended.len(),
        may_promote: st.role != Role::Primary && shared.me.disk.is_some() && promotion.may_promote(),
        promotion_score: promotion.promotion_score().filter(|_| shared.me.disk.is_some()),
        device: match (&st.export, &st.left_behind) {
            (Some(export), _) => Some(export.device()),
            (None, Some((id, _))) => Some(blkrepl_ublk::block_device_path(*id).display().to_string()),
            (None, None) => None,
        },
        device_io: match (&st.export, &st.export_failing, &st.left_behind) {
            (Some(_), Some(why), _) => Some(format!("failing: {why}")),
            (Some(_), None, _) => Some("serving".into()),
            (None, _, Some((_, why))) => Some(format!("suspended: {why}")),
            (None, _, None) => None,
        },
        ublk_features: st.export.as_ref().and_then(|e| e.ublk_features()),
        nbd_clients: st.export.as_ref().map_or(0, |e| e.nbd_clients()),
        protocol: shared.config.protocol.to_string(),
        size_bytes: shared.data_size_bytes,
        generation_uuid: format!("{:016X}", st.sb.uuids.current),
        peers,
    }
}
