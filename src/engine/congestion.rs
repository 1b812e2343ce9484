//! Protocol A on a slow link (`on_congestion = "pull-ahead"`): when the send queue to a peer
//! holds more than `congestion_fill_kib`, the primary goes Ahead of it. It stops sending that
//! peer data and records the writes in its bitmap (a new generation starts, as for a lost peer,
//! so the peer can never be promoted as if it were current), and the peer goes Behind and
//! Outdated. Application writes never wait for the slow peer. Once the peer has taken in
//! everything queued to it (it acknowledged the barrier that closed the queue), the primary
//! resyncs what the peer missed through the usual connect-time decision (the bitmap UUID it just
//! set makes it the source of a bitmap resync) and replication is Established again. The
//! barrier ack, not an empty queue, is the signal: kernel socket buffers take megabytes from a
//! peer that reads nothing.

use super::link::BULK_QUEUE_LIMIT_BYTES;
use super::resync::{self, WAIT_SLICE};
use super::state::{Deferred, State};
use super::{connection, Shared};
use crate::config::{OnCongestion, ResourceConfig};
use crate::core::states::ReplState;
use std::sync::Arc;

/// How full a resync (or verify) lets the send queue get before it waits. Under pull-ahead it
/// stays at half the fill mark, so that resync traffic alone never makes the primary go Ahead
/// and application writes keep the other half.
pub fn resync_room_bytes(config: &ResourceConfig) -> usize {
    match config.on_congestion {
        OnCongestion::Block => BULK_QUEUE_LIMIT_BYTES,
        OnCongestion::PullAhead { fill_bytes } => (fill_bytes / 2) as usize,
    }
}

/// Called by the write path under the lock before a write picks its peers: every replicating
/// peer whose queue passed the fill mark is left behind. Returns whether one was (completions
/// may then be waiting in `deferred`).
pub fn pull_ahead_if_congested(shared: &Arc<Shared>, st: &mut State, deferred: &mut Deferred) -> bool {
    let OnCongestion::PullAhead { fill_bytes } = shared.config.on_congestion else { return false };
    let congested: Vec<(u8, usize)> = st
        .replica
        .peers
        .iter()
        // A peer whose bitmap exchange is under way is left alone: its resync decision stands.
        .filter(|p| p.is_replicating() && p.pending_sync.is_none())
        .filter_map(|p| st.link(p.node_id).map(|link| (p.node_id, link.queued_bytes())))
        .filter(|(_, queued)| *queued as u64 > fill_bytes)
        .collect();
    for &(peer_id, queued_bytes) in &congested {
        go_ahead(shared, st, peer_id, queued_bytes, deferred);
    }
    !congested.is_empty()
}

fn go_ahead(shared: &Arc<Shared>, st: &mut State, peer_id: u8, queued_bytes: usize, deferred: &mut Deferred) {
    // Close the epoch while the peer still counts as replicating: the writes already queued to
    // it end with a barrier whose count matches what the peer will count, and whose ack says
    // the peer has taken in everything queued before.
    let last_epoch = st.replica.close_epoch();
    let peer = st.replica.peer_mut(peer_id);
    let was = std::mem::replace(&mut peer.repl, ReplState::Ahead);
    // A resync in progress stops (its thread sees the state) and starts over when caught up.
    peer.resync = None;
    let (name, generation) = (peer.name.clone(), peer.generation);
    tracing::warn!(
        resource = %shared.config.name, peer = %name, was = %was, queued_bytes,
        "send queue passed congestion_fill_kib: Ahead of {name}; its writes are recorded in the bitmap until it catches up"
    );
    connection::stops_following(shared, st, peer_id, None, deferred);
    st.replica.broadcast_state();
    let shared = shared.clone();
    std::thread::Builder::new()
        .name(format!("ahead-{peer_id}"))
        .spawn(move || catch_up_after(&shared, peer_id, generation, last_epoch))
        .expect("spawn congestion thread");
}

/// Waits until the peer acknowledged the barrier of `last_epoch`, then resyncs what it missed.
fn catch_up_after(shared: &Arc<Shared>, peer_id: u8, generation: u64, last_epoch: u64) {
    let mut st = shared.lock();
    loop {
        let peer = st.replica.peer(peer_id);
        if peer.generation != generation || peer.repl != ReplState::Ahead {
            return;
        }
        if !peer.barriers.iter().any(|(epoch, _)| *epoch <= last_epoch) {
            break;
        }
        st = st.wait_timeout(WAIT_SLICE);
    }
    let peer = st.replica.peer_mut(peer_id);
    peer.repl = ReplState::Off;
    tracing::info!(resource = %shared.config.name, peer = %peer.name, "the peer caught up with the send queue: resyncing what it missed");
    // The state without the Ahead flag makes the peer leave Behind.
    resync::announce_and_reconsider(shared, st, peer_id);
}
