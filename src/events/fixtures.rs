//! Status snapshots for unit tests of what is derived from them (event lines, handler calls):
//! three nodes, alpha (this one) Secondary and UpToDate, connected and in sync with the data
//! node beta (id 1) and the node tie (id 2).

use crate::core::quorum::OnNoQuorum;
use crate::engine::{PeerStatus, ResourceStatus};

/// A connected, in-sync peer.
pub fn peer(name: &str, node_id: u8) -> PeerStatus {
    PeerStatus {
        name: name.into(),
        node_id,
        witness: false,
        departed: false,
        connection: "Connected".into(),
        replication: "Established".into(),
        peer_role: "Secondary".into(),
        peer_disk: "UpToDate".into(),
        out_of_sync_bytes: 0,
        sent_bytes: 0,
        received_bytes: 0,
        unwritten_bytes: 0,
        resync: None,
        verify: None,
        last_error: None,
        split_brain: false,
    }
}

/// alpha's status.
pub fn status() -> ResourceStatus {
    ResourceStatus {
        name: "r0".into(),
        node: "alpha".into(),
        node_id: 0,
        role: "Secondary".into(),
        disk: "UpToDate".into(),
        quorum: true,
        quorum_policy: "majority".into(),
        quorum_votes: 3,
        quorum_voters: 3,
        quorum_needed: 2,
        on_no_quorum: OnNoQuorum::SuspendIo,
        suspended_writes: 0,
        writes_waiting_for_room: 0,
        io_suspended: None,
        stepped_down: None,
        local_write_failed: None,
        may_promote: true,
        promotion_score: Some(10_000),
        device: None,
        device_io: None,
        ublk_features: None,
        nbd_clients: 0,
        protocol: "C".into(),
        size_bytes: 64 << 20,
        generation_uuid: "0123456789ABCDEF".into(),
        resyncs_as_target: 0,
        peers: vec![peer("beta", 1), peer("tie", 2)],
    }
}
