//! Online verify (`blkrepl verify`): walk the whole device in order with each connected peer,
//! send the SHA-256 of every block (`core::block_digest` says why not crc32c), and let the peer
//! compare them with its own blocks. Blocks that differ are marked out of sync in the bitmap for
//! that peer and reported in `status` and the log; the peer marks itself Outdated, since it now
//! knows its copy differs. Verify repairs nothing: which copy is right is the operator's call,
//! and the repair is a resync (reconnect, or `invalidate` on the node to overwrite).
//!
//! Each request is read under the resync's range lock and queued before any later write to
//! those blocks, so the peer compares at the same point of the write stream: an application
//! writing meanwhile causes no false report. For that reason a verify runs from the primary (or
//! between secondaries): a secondary sees a primary's writes on the other stream, whose order
//! against its own requests is not defined.

use super::resync::{read_range_then, Pacer, WAIT_SLICE};
use super::state::State;
use crate::replica::{Peer, VerifyRun, VerifyState};
use super::{congestion, EngineError, Shared};
use crate::core::block_digest::block_digests;
use crate::core::states::{DiskState, ReplState, Role};
use crate::wire::{DigestPurpose, Message, MAX_DIGESTS};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

/// Bytes per verify request: 256 digests at 4 KiB blocks.
const CHUNK_BYTES: u64 = 1 << 20;
/// Requests sent and not yet answered, at most.
const MAX_REQUESTS_IN_FLIGHT: usize = 16;

/// Starts a verify with every connected peer it can run against. Returns their names.
pub fn start(shared: &Arc<Shared>) -> Result<Vec<String>, EngineError> {
    let mut st = shared.lock();
    if st.replica.disk != DiskState::UpToDate {
        return Err(EngineError::Refused(format!(
            "this node's disk is {}: verify compares an UpToDate copy with its peers",
            st.replica.disk
        )));
    }
    let me_primary = st.replica.role == Role::Primary;
    let connected = |p: &&Peer| {
        p.connected && p.repl == ReplState::Established && matches!(p.disk, DiskState::UpToDate | DiskState::Outdated)
    };
    if let Some(primary) = st.replica.peers.iter().filter(connected).find(|p| p.role == Role::Primary && !me_primary) {
        return Err(EngineError::Refused(format!("{} is primary: run `blkrepl verify` there", primary.name)));
    }
    // An aborted verify's answers may still be on their way; a new run would take them for its own.
    let busy = |p: &Peer| {
        p.sync.verify.as_ref().is_some_and(|v| {
            v.state == VerifyState::Running || v.generation == p.generation && !v.awaiting.is_empty()
        })
    };
    if let Some(busy) = st.replica.peers.iter().find(|p| busy(p)) {
        return Err(EngineError::Refused(format!("a verify with {} is still running", busy.name)));
    }
    let targets: Vec<(u8, u64, String)> =
        st.replica.peers.iter().filter(connected).map(|p| (p.node_id, p.generation, p.name.clone())).collect();
    if targets.is_empty() {
        return Err(EngineError::Refused(
            "no peer to verify against: one must be connected, Established (not syncing) and have a disk".into(),
        ));
    }
    for (peer_id, generation, name) in &targets {
        st.replica.peer_mut(*peer_id).sync.verify = Some(VerifyRun::new(*generation, Instant::now(), shared.data_size_bytes));
        tracing::info!(resource = %shared.config.name, peer = %name, "online verify started");
        let (shared, peer_id, generation) = (shared.clone(), *peer_id, *generation);
        std::thread::Builder::new()
            .name(format!("verify-{peer_id}"))
            .spawn(move || {
                let outcome = run(&shared, peer_id, generation);
                end(&shared, peer_id, outcome);
            })
            .expect("spawn verify thread");
    }
    Ok(targets.into_iter().map(|(_, _, name)| name).collect())
}

/// Why a verify cannot go on, if it cannot.
fn interrupted(st: &State, peer_id: u8, generation: u64) -> Option<String> {
    let peer = st.replica.peer(peer_id);
    if st.replica.stopping {
        Some("this node is going down".into())
    } else if peer.generation != generation || !peer.connected {
        Some(format!("the connection to {} ended", peer.name))
    } else if peer.repl != ReplState::Established {
        Some(format!("replication with {} became {}", peer.name, peer.repl))
    } else {
        None
    }
}

fn awaiting(st: &mut State, peer_id: u8) -> &mut VecDeque<(u64, u32)> {
    &mut st.replica.peer_mut(peer_id).sync.verify.as_mut().expect("a running verify").awaiting
}

fn run(shared: &Arc<Shared>, peer_id: u8, generation: u64) -> Result<(), String> {
    let block_size = u64::from(shared.config.bitmap_block_size);
    let chunk = (CHUNK_BYTES / block_size).clamp(1, MAX_DIGESTS as u64) * block_size;
    let mut pacer = Pacer::new(shared);
    let mut cursor = 0u64;
    loop {
        pacer.pause(shared);
        let mut st = shared.lock();
        if let Some(reason) = interrupted(&st, peer_id, generation) {
            return Err(reason);
        }
        let in_flight = awaiting(&mut st, peer_id).len();
        if cursor >= shared.data_size_bytes && in_flight == 0 {
            return Ok(());
        }
        if cursor >= shared.data_size_bytes || in_flight >= MAX_REQUESTS_IN_FLIGHT {
            drop(st.wait_timeout(WAIT_SLICE));
            continue;
        }
        let (offset, len) = (cursor, chunk.min(shared.data_size_bytes - cursor));
        let link = st.link(peer_id).cloned().ok_or("link closed")?;
        drop(st);

        link.wait_for_room(congestion::resync_room_bytes(&shared.config));
        let still = |st: &State| interrupted(st, peer_id, generation).is_none();
        let prepare = |data: Vec<u8>| block_digests(&data, block_size as usize);
        let send = |st: &mut State, digests: Vec<[u8; 32]>| {
            awaiting(st, peer_id).push_back((offset, digests.len() as u32));
            st.replica.send_bulk(peer_id, Message::DigestRequest { purpose: DigestPurpose::Verify, offset, digests }, None);
        };
        if read_range_then(shared, offset, len, still, prepare, send)?.is_none() {
            continue; // `interrupted` says why at the top of the loop
        }
        cursor += len;
        pacer.spend(len);
    }
}

/// The verify thread stopped: record how and tell the operator.
fn end(shared: &Shared, peer_id: u8, outcome: Result<(), String>) {
    let mut st = shared.lock();
    let (name, primary) = (st.replica.peer(peer_id).name.clone(), st.replica.role == Role::Primary);
    let Some(run) = st.replica.peer_mut(peer_id).sync.verify.as_mut() else { return };
    run.state = match outcome {
        Ok(()) => VerifyState::Finished,
        Err(reason) => VerifyState::Aborted(reason),
    };
    let (found, done) = (run.found_bytes, run.progress.done_bytes());
    let how = match &run.state {
        VerifyState::Aborted(reason) => format!("aborted ({reason}) after {done} bytes"),
        _ => format!("finished: {done} bytes compared"),
    };
    let resource = &shared.config.name;
    if found == 0 {
        tracing::info!(resource = %resource, peer = %name, "online verify {how}, no difference");
        return;
    }
    let first = run.found_ranges[0];
    let other_way = if primary {
        String::new()
    } else {
        format!("; to take {name}'s copy instead, run `blkrepl invalidate {resource}` here (a full resync)")
    };
    tracing::warn!(
        resource = %resource, peer = %name,
        "online verify {how}: {found} bytes differ (the first {} at offset {}; each range is logged above) and are marked out of sync for {name}. \
         To resync them from this node, run `blkrepl disconnect {resource}` and then `blkrepl connect {resource}` here{other_way}",
        first.1, first.0
    );
}
