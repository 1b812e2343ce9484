//! Peer connections: accepting and dialing (the handshake itself is `handshake.rs`), the
//! reader that applies the peer's stream, and what happens when a link dies.

use super::admission::HandshakeGate;
use super::dial_pacing::{DialPacing, DIAL_INTERVAL, REFUSED_RETRY};
use super::handshake::{accept, dial, Handshake, PEER_REFUSED};
use super::link::{Closing, PeerLink};
use super::state::State;
use super::shared::{step_down_if_superseded, Shared};
use crate::handshake_stream::HandshakeStream;
use crate::wire::seal::Protection;
use crate::wire::{FrameReceiver, Message, WireError};
use std::io::BufReader;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Accept errors (out of file descriptors, say) are retried after a pause that doubles up to
/// a second: retrying at once would spin a core while nothing can be accepted.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

pub fn spawn_listener(shared: Arc<Shared>, listener: TcpListener) -> std::io::Result<()> {
    std::thread::Builder::new().name("peer-listener".into()).spawn(move || run_listener(&shared, &listener))?;
    Ok(())
}

/// Accepts connections until the node stops; each handshake runs on a thread of its own,
/// within the bounds of [`HandshakeGate`].
fn run_listener(shared: &Arc<Shared>, listener: &TcpListener) {
    let gate = Arc::new(HandshakeGate::default());
    let mut backoff = ACCEPT_BACKOFF.0;
    let mut last_error = String::new();
    loop {
        let accepted = listener.accept();
        if shared.lock().replica.stopping {
            return;
        }
        let (stream, from) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                let error = e.to_string();
                if error != last_error {
                    tracing::warn!(resource = %shared.config.name, "cannot accept peer connections: {e}; retrying");
                    last_error = error;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        backoff = ACCEPT_BACKOFF.0;
        last_error.clear();
        let admission = match gate.admit(from.ip()) {
            Ok(admission) => admission,
            Err((full, first)) => {
                if first {
                    tracing::warn!(resource = %shared.config.name, %from, "closing unauthenticated connections at once: {full}");
                }
                continue;
            }
        };
        let handshake = shared.clone();
        let spawned = std::thread::Builder::new().name("peer-handshake".into()).spawn(move || {
            let _admission = admission;
            match accept(&handshake, stream).and_then(|(peer_id, hs)| attach(&handshake, peer_id, hs)) {
                Err(reason) if reason == crate::replica::STAND_ALONE => {
                    tracing::debug!(resource = %handshake.config.name, %from, "refused a peer connection: {reason}");
                }
                Err(reason) => tracing::warn!(resource = %handshake.config.name, %from, "refused a peer connection: {reason}"),
                Ok(()) => {}
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(resource = %shared.config.name, %from, "cannot start a thread for a peer connection, closed it: {e}");
        }
    }
}

pub fn spawn_dialers(shared: &Arc<Shared>) -> std::io::Result<()> {
    for peer in shared.config.peers_of(&shared.me).filter(|p| p.id < shared.me.id) {
        let (shared, peer_id, address) = (shared.clone(), peer.id, peer.address);
        std::thread::Builder::new()
            .name(format!("dial-{}", peer.name))
            .spawn(move || {
                let mut last_error = String::new();
                let mut pacing = DialPacing::default();
                loop {
                    {
                        let st = shared.lock();
                        if st.replica.stopping {
                            return;
                        }
                        if st.replica.link_refusal(peer_id).is_some() {
                            drop(st.wait_dial(DIAL_INTERVAL));
                            continue;
                        }
                        if let Some(rest) = pacing.wait_before_attempt(Instant::now()) {
                            drop(st.wait_dial(rest));
                            continue;
                        }
                    }
                    pacing.attempting(Instant::now());
                    let result = TcpStream::connect_timeout(&address, shared.config.timing.ping_timeout)
                        .map_err(|e| format!("cannot reach {address}: {e}"))
                        .and_then(|stream| dial(&shared, peer_id, stream))
                        .and_then(|hs| attach(&shared, peer_id, hs));
                    if let Err(reason) = result {
                        // Log a failure once, not every retry: a peer that is down for an hour
                        // must not fill the log.
                        if reason != last_error {
                            tracing::info!(resource = %shared.config.name, peer = peer_id, "connecting: {reason}");
                            last_error = reason.clone();
                        }
                        pacing.failed();
                        let refused = reason.starts_with(PEER_REFUSED);
                        shared.lock().replica.peer_mut(peer_id).last_error = Some(reason);
                        std::thread::sleep(if refused { REFUSED_RETRY } else { DIAL_INTERVAL });
                    } else {
                        last_error.clear();
                        pacing.linked();
                    }
                }
            })?;
    }
    Ok(())
}

/// The handshake is done: the connection becomes this peer's link.
fn attach(shared: &Arc<Shared>, peer_id: u8, mut hs: Handshake) -> Result<(), String> {
    let _ = hs.stream.set_nodelay(true);
    hs.reader.get_mut().handshake_done(Some(shared.config.timing.ping_timeout)).map_err(|e| e.to_string())?;
    let mut st = shared.lock();
    if let Some(reason) = st.replica.link_refusal(peer_id) {
        drop(st);
        return Err(hs.refuse(reason));
    }
    let Handshake { stream, reader, tx, rx } = hs;
    let link = Arc::new(PeerLink::new(stream, tx).map_err(|e| e.to_string())?);
    st.set_link(peer_id, Some(link.clone()));
    let generation = st.replica.link_up(peer_id, Instant::now());
    tracing::info!(resource = %shared.config.name, peer = %st.replica.peer(peer_id).name, "connected");
    shared.changed.notify_all();
    shared.timer.notify_all();
    drop(st);

    let (shared_w, link_w) = (shared.clone(), link.clone());
    std::thread::Builder::new()
        .name(format!("send-{peer_id}"))
        .spawn(move || {
            let reason = link_w.run_writer(|| super::write_path::room_made(&shared_w));
            lost(&shared_w, peer_id, generation, &reason);
        })
        .map_err(|e| e.to_string())?;
    let shared_r = shared.clone();
    std::thread::Builder::new()
        .name(format!("recv-{peer_id}"))
        .spawn(move || {
            let reason = run_reader(&shared_r, peer_id, generation, reader, rx);
            lost(&shared_r, peer_id, generation, &reason);
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Reads the peer's frames in bulk (see `FrameReceiver`) and hands each batch to the replica
/// under one lock, until the link fails; returns why.
fn run_reader(
    shared: &Arc<Shared>,
    peer_id: u8,
    generation: u64,
    reader: BufReader<HandshakeStream>,
    protection: Option<Protection>,
) -> String {
    let mut frames = FrameReceiver::new(reader.buffer(), protection);
    let mut stream = reader.into_inner();
    let mut batch = Vec::new();
    loop {
        let decoded = loop {
            match frames.next_frame() {
                Ok(Some(msg)) => batch.push(msg),
                Ok(None) => break Ok(()),
                Err(e) => break Err(format!("receive failed: {e}")),
            }
        };
        // The frames before a bad one are the peer's and are applied.
        match dispatch(shared, peer_id, generation, &mut batch).and_then(|takes_more| decoded.map(|()| takes_more)) {
            Err(reason) => return reason,
            Ok(false) => wait_for_room_to_take_more(shared, peer_id, generation),
            Ok(true) => {}
        }
        match frames.receive(&mut stream) {
            Ok(true) => {}
            Ok(false) if frames.inside_frame() => return "receive failed: the connection ended inside a frame".into(),
            Ok(false) => return "peer closed the connection".into(),
            Err(WireError::Io(e)) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                let silent = shared.config.timing.ping_timeout;
                return format!("nothing heard from the peer for {silent:?} (dead link or network partition)");
            }
            Err(e) => return format!("receive failed: {e}"),
        }
    }
}

/// Reads nothing more while this node holds as much of the peer's stream, not yet written, as
/// it takes in (`Replica::takes_more_of`): the peer's send queue fills instead of this node's
/// memory. Ends too once the link is going (the receive then finds it closed).
fn wait_for_room_to_take_more(shared: &Shared, peer_id: u8, generation: u64) {
    let mut st = shared.lock();
    loop {
        let peer = st.replica.peer(peer_id);
        let current = peer.connected && peer.generation == generation && !st.replica.dropping(peer_id, generation);
        if !current || st.replica.stopping || st.replica.takes_more_of(peer_id) {
            return;
        }
        st = st.wait_timeout(Duration::from_millis(100));
    }
}

/// Hands the frames received from the peer to the replica, in order, under one lock. An error
/// drops the connection with that reason; nothing was applied for the offending frame or
/// after it. Returns whether the node takes in more of the peer's stream now (asked under the
/// same lock, see `wait_for_room_to_take_more`).
fn dispatch(shared: &Arc<Shared>, peer_id: u8, generation: u64, batch: &mut Vec<Message>) -> Result<bool, String> {
    if batch.is_empty() {
        return Ok(true);
    }
    let mut st = shared.lock();
    st.run_stream_io_here();
    let mut result = Ok(());
    for msg in batch.drain(..) {
        if result.is_err() || st.replica.dropping(peer_id, generation) || st.replica.peer(peer_id).generation != generation {
            // Refused, or the link is to go (a frame of this batch, say, led to a split brain):
            // what is left is not applied, as if the link had gone after that frame.
            continue;
        }
        // Only a State or a ping's answer can show that another node was promoted past this
        // one: the writes' frames and acks need no look at quorum.
        let may_supersede = matches!(msg, Message::State(_) | Message::PingAck);
        result = st.replica.receive(Instant::now(), peer_id, generation, msg);
        if may_supersede {
            step_down_if_superseded(shared, &mut st);
        }
    }
    shared.changed.notify_all();
    result.map(|()| st.replica.takes_more_of(peer_id))
}

/// The link to `peer_id` (of `generation`) died.
pub(super) fn lost(shared: &Arc<Shared>, peer_id: u8, generation: u64, reason: &str) {
    let mut st = shared.lock();
    if st.replica.peer(peer_id).generation != generation {
        return;
    }
    let closing = drop_peer(shared, &mut st, peer_id, reason);
    drop(st);
    if let Some(closing) = closing {
        closing.finish();
    }
}

/// Tears down the link to a peer (see `Replica::peer_lost`); the socket is written to and
/// broken by the caller, once it released the lock (`Closing::finish`).
#[must_use = "the socket stays open until `Closing::finish` runs"]
pub fn drop_peer(shared: &Shared, st: &mut State, peer_id: u8, reason: &str) -> Option<Closing> {
    let link = st.set_link(peer_id, None)?;
    let closing = link.close(reason);
    st.replica.peer_lost(Instant::now(), peer_id, reason, link.sent_bytes());
    shared.changed.notify_all();
    shared.dial.notify_all();
    Some(closing)
}
