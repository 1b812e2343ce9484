//! A snapshot of one resource for `blkrepl status` (human and `--json`).

use super::state::State;
use crate::replica::{Replica, VerifyState};
use super::shared::Shared;
use crate::core::quorum::{OnNoQuorum, PromotionInputs};
use crate::core::states::{ConnState, DiskState, ReplState};
use crate::core::sync_decision::SyncDecision;
use crate::core::sync_progress::SyncProgress;
use std::time::Instant;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResourceStatus {
    pub name: String,
    pub node: String,
    /// This node's id (`[[node]] id`).
    #[serde(default)]
    pub node_id: u8,
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
    /// Writes held because this primary has no quorum (suspend-io): those in flight when quorum
    /// went (completed locally, not acknowledged) and new ones, not written anywhere yet.
    pub suspended_writes: usize,
    /// New writes waiting for room in a peer's send queue (back-pressure from a slow peer or
    /// link), not written anywhere yet.
    #[serde(default)]
    pub writes_waiting_for_room: usize,
    /// Why this primary's I/O is frozen by fencing: `fencing` while it waits for the
    /// fence-peer handler (writes held), `fence-failed` while it fails requests because the
    /// handler failed (until the peer is back or `resume-io`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_suspended: Option<String>,
    /// Why this node last stepped down from primary by itself (another node was promoted while
    /// it had no quorum), until it is promoted again.
    #[serde(default)]
    pub stepped_down: Option<String>,
    /// Why this primary fails every read and write: a local write failed; demote it (its
    /// blocks are resynced from a peer then).
    #[serde(default)]
    pub local_write_failed: Option<String>,
    /// Whether `primary` (without --force) would succeed now.
    pub may_promote: bool,
    /// How good a primary this node would be (Pacemaker's scale): none without quorum.
    pub promotion_score: Option<u32>,
    /// Where the device is exported while primary (an NBD URI or `/dev/ublkbN`).
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
    /// Resyncs this node started as target since its daemon started: one that begins and ends
    /// between two samples of the status still shows here (handlers count on it).
    #[serde(default)]
    pub resyncs_as_target: u64,
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
    /// [`ReplState`], or one of [`WAITING_FOR_BITMAPS`] (see `shown_replication`).
    pub replication: String,
    pub peer_role: String,
    /// The peer's disk as this node knows it: never UpToDate while this UpToDate node holds
    /// blocks out of sync for it (see `shown_peer_disk`).
    pub peer_disk: String,
    /// Bytes that differ (or may) between this node and the peer.
    pub out_of_sync_bytes: u64,
    pub sent_bytes: u64,
    pub received_bytes: u64,
    /// Data of the peer's stream received and not yet written here (at most
    /// `STREAM_BACKLOG_BYTES`, then this node reads no more of it).
    #[serde(default)]
    pub unwritten_bytes: u64,
    pub resync: Option<ResyncStatus>,
    /// The last online verify with this peer run from this node.
    pub verify: Option<VerifyStatus>,
    /// Why the last connection attempt or connection ended, if it did.
    pub last_error: Option<String>,
    /// The last connect found a split brain no policy resolved: the peer stays StandAlone until
    /// the operator chooses a victim (`connect --discard-my-data`).
    #[serde(default)]
    pub split_brain: bool,
}

/// How the replica words the refusal of a split brain it could not resolve (its reason becomes
/// the link's `last_error`); `tests/handlers.rs` checks it against a real one.
const SPLIT_BRAIN_REFUSED: &str = "split brain detected";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResyncStatus {
    pub full: bool,
    /// Bytes this pass moves: what was out of sync at its start plus what became so since.
    pub total_bytes: u64,
    pub done_bytes: u64,
    /// Never lower than any value shown before (`core::sync_progress`).
    pub done_percent: f64,
    pub rate_kib_per_s: u64,
    pub eta_s: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VerifyStatus {
    /// `running`, `finished` or `aborted: <reason>`.
    pub state: String,
    pub total_bytes: u64,
    pub checked_bytes: u64,
    pub done_percent: f64,
    pub rate_kib_per_s: u64,
    pub eta_s: Option<u64>,
    /// Bytes found to differ (marked out of sync for the peer).
    pub out_of_sync_found_bytes: u64,
    /// The first ranges found to differ (the log has every one).
    pub first_out_of_sync: Vec<ByteRange>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

/// Progress figures of a pass that started at `started`.
fn progress_figures(progress: &SyncProgress, started: Instant) -> (f64, u64, Option<u64>) {
    let elapsed_ms = started.elapsed().as_millis() as u64;
    (progress.done_percent(), progress.rate_bytes_per_s(elapsed_ms) / 1024, progress.eta_s(elapsed_ms))
}

/// The replication states shown beside [`ReplState`]'s, in DRBD's words: a resync with the peer
/// is decided and waits for the exchange of bitmaps, with this node as its source (`WFBitMapS`)
/// or its target (`WFBitMapT`).
pub const WAITING_FOR_BITMAPS: [&str; 2] = ["WFBitMapS", "WFBitMapT"];

/// The replication shown with a peer. Between the connect decision and the arrival of the
/// bitmaps (`Peer::pending_sync`) the link runs but the resync has not begun: shown as its
/// state of before (Established, or Off), a resync of nothing yet would pass for "in sync", and
/// a script or a test that waits for Established would go on while the resync, and its
/// metadata writes, are still to come.
fn shown_replication(repl: ReplState, pending: Option<SyncDecision>) -> &'static str {
    match pending {
        Some(decision) if decision.is_source() => WAITING_FOR_BITMAPS[0],
        Some(_) => WAITING_FOR_BITMAPS[1],
        None => repl.as_str(),
    }
}

/// Two copies shown UpToDate must be equal: a peer that lacks blocks this UpToDate node holds is
/// shown Outdated, whatever it last reported, until the resync brings them (it reports
/// Inconsistent itself as soon as the resync starts). Without this a reconnect would show
/// "UpToDate" next to a non-zero out-of-sync count for the length of the handshake.
fn shown_peer_disk(my_disk: DiskState, peer_disk: DiskState, out_of_sync_bytes: u64) -> DiskState {
    match (my_disk, peer_disk) {
        (DiskState::UpToDate, DiskState::UpToDate) if out_of_sync_bytes > 0 => DiskState::Outdated,
        _ => peer_disk,
    }
}

/// Takes the state mutably: reading resync progress records the bitmap's weight in it.
pub fn build(shared: &Shared, st: &mut State) -> ResourceStatus {
    let link_sent: Vec<u64> = st.links.iter().map(|(_, l)| l.as_ref().map_or(0, |l| l.sent_bytes())).collect();
    let Replica { peers, bitmaps, disk, sb, .. } = &mut st.replica;
    let peers = peers
        .iter_mut()
        .zip(link_sent)
        .map(|(p, link_sent)| {
            let out_of_sync_bytes = bitmaps[p.slot].weight_bytes().min(shared.data_size_bytes);
            let resync = p.resync.as_mut().map(|r| {
                r.progress.observe(out_of_sync_bytes);
                let (done_percent, rate_kib_per_s, eta_s) = progress_figures(&r.progress, r.started);
                ResyncStatus {
                    full: r.full,
                    total_bytes: r.progress.total_bytes(),
                    done_bytes: r.progress.done_bytes(),
                    done_percent,
                    rate_kib_per_s,
                    eta_s,
                }
            });
            let verify = p.sync.verify.as_ref().map(|v| {
                let (done_percent, rate_kib_per_s, eta_s) = progress_figures(&v.progress, v.started);
                VerifyStatus {
                    state: match &v.state {
                        VerifyState::Running => "running".into(),
                        VerifyState::Finished => "finished".into(),
                        VerifyState::Aborted(reason) => format!("aborted: {reason}"),
                    },
                    total_bytes: v.progress.total_bytes(),
                    checked_bytes: v.progress.done_bytes(),
                    done_percent,
                    rate_kib_per_s,
                    eta_s: eta_s.filter(|_| v.state == VerifyState::Running),
                    out_of_sync_found_bytes: v.found_bytes,
                    first_out_of_sync: v.found_ranges.iter().map(|&(offset, len)| ByteRange { offset, len }).collect(),
                }
            });
            PeerStatus {
                name: p.name.clone(),
                node_id: p.node_id,
                witness: p.witness,
                departed: sb.peers[p.slot].departed,
                connection: p.conn.to_string(),
                replication: shown_replication(p.repl, p.pending_sync).to_owned(),
                peer_role: p.role.to_string(),
                // What the fence-peer handler said of it while its link is down.
                peer_disk: shown_peer_disk(*disk, p.fenced_disk.unwrap_or(p.disk), out_of_sync_bytes).to_string(),
                out_of_sync_bytes,
                sent_bytes: p.sent_bytes_before + link_sent,
                received_bytes: p.received_bytes,
                unwritten_bytes: p.applying.held_bytes() as u64,
                resync,
                verify,
                split_brain: p.conn == ConnState::StandAlone
                    && p.last_error.as_deref().is_some_and(|e| e.contains(SPLIT_BRAIN_REFUSED)),
                last_error: p.last_error.clone(),
            }
        })
        .collect();
    let now = Instant::now();
    let quorum = st.replica.quorum(now);
    let promotion = st.replica.promotion_inputs(now);
    ResourceStatus {
        name: shared.config.name.clone(),
        node: shared.me.name.clone(),
        node_id: shared.me.id,
        role: st.replica.role.to_string(),
        disk: st.replica.disk.to_string(),
        quorum: quorum.has_quorum,
        quorum_policy: st.replica.quorum_policy.to_string(),
        quorum_votes: quorum.votes,
        quorum_voters: quorum.voters,
        quorum_needed: quorum.needed,
        on_no_quorum: st.replica.on_no_quorum,
        suspended_writes: st.replica.held_count(),
        writes_waiting_for_room: st.replica.awaiting_room(),
        io_suspended: st.replica.io_suspended().map(str::to_owned),
        stepped_down: st.replica.stepped_down.clone(),
        local_write_failed: st.replica.io_failed.clone(),
        may_promote: promotion.as_ref().is_some_and(PromotionInputs::may_promote),
        promotion_score: promotion.as_ref().and_then(PromotionInputs::promotion_score),
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
        generation_uuid: format!("{:016X}", st.replica.sb.uuids.current),
        resyncs_as_target: st.replica.resyncs_taken.iter().sum(),
        peers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decided_resync_waiting_for_the_bitmaps_is_shown_with_its_direction_not_as_the_link_state() {
        use SyncDecision::*;
        assert_eq!(shown_replication(ReplState::Established, Some(BitmapSource)), "WFBitMapS");
        assert_eq!(shown_replication(ReplState::Off, Some(FullSource)), "WFBitMapS");
        assert_eq!(shown_replication(ReplState::Established, Some(BitmapTarget)), "WFBitMapT");
        assert_eq!(shown_replication(ReplState::Off, Some(FullTarget)), "WFBitMapT");
        for repl in [ReplState::Off, ReplState::Established, ReplState::SyncSource, ReplState::Behind] {
            assert_eq!(shown_replication(repl, None), repl.as_str());
        }
    }
}
