//! Peer connections: dialing and accepting, the handshake (versions, identities, sizes, shared
//! secret), the reader that applies the peer's stream, and what happens when a link dies.
//!
//! The node with the higher id dials; the lower one accepts. One rule, so two nodes never race
//! two connections into existence.

use super::admission::HandshakeGate;
use crate::handshake_stream::HandshakeStream;
use super::link::PeerLink;
use super::state::State;
use super::{random_bytes, Shared};
use crate::wire::{auth, read_message, write_message, Hello, Message, WireError, PROTOCOL_VERSION};
use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Hello feature bit: this node requires the shared-secret challenge.
const FEATURE_AUTH: u64 = 1;
/// Hello feature bit: this node is a diskless witness (no data, no size to compare).
const FEATURE_DISKLESS: u64 = 2;
const DIAL_INTERVAL: Duration = Duration::from_millis(300);
/// After a peer refused the connection (it is StandAlone, or refuses this node): it will not
/// change its mind within a dial interval, and each refusal costs it a handshake.
const REFUSED_RETRY: Duration = Duration::from_secs(2);
/// How a dial that the peer refused is reported.
const PEER_REFUSED: &str = "peer refused: ";
/// Why a StandAlone node refuses a peer (expected, so logged quietly by the refusing side).
const STAND_ALONE: &str = "node is StandAlone (disconnected; `blkrepl connect` reconnects it)";

/// Accept errors (out of file descriptors, say) are retried after a pause that doubles up to
/// a second: retrying at once would spin a core while nothing can be accepted.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// How long a whole handshake may take, from accept or connect to the link being up: a few
/// round trips on a healthy network, so the silence timeout twice over is generous.
fn handshake_budget(shared: &Shared) -> Duration {
    2 * shared.config.timing.ping_timeout
}

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
            match accept(&handshake, stream) {
                Err(reason) if reason == STAND_ALONE => {
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
                let mut last_attempt: Option<Instant> = None;
                loop {
                    // At most one attempt per dial interval, also when the last one connected
                    // and was closed at once (a peer that refuses after its handshake).
                    if let Some(wait) = last_attempt.and_then(|t| DIAL_INTERVAL.checked_sub(t.elapsed())) {
                        std::thread::sleep(wait);
                    }
                    {
                        let st = shared.lock();
                        if st.replica.stopping {
                            return;
                        }
                        let peer = st.replica.peer(peer_id);
                        if !peer.want_connect || peer.connected {
                            drop(st.wait_dial(DIAL_INTERVAL));
                            continue;
                        }
                    }
                    last_attempt = Some(Instant::now());
                    let result = TcpStream::connect_timeout(&address, shared.config.timing.ping_timeout)
                        .map_err(|e| format!("cannot reach {address}: {e}"))
                        .and_then(|stream| dial(&shared, peer_id, stream));
                    if let Err(reason) = result {
                        // Log a failure once, not every retry: a peer that is down for an hour
                        // must not fill the log.
                        if reason != last_error {
                            tracing::info!(resource = %shared.config.name, peer = peer_id, "connecting: {reason}");
                            last_error = reason.clone();
                        }
                        let refused = reason.starts_with(PEER_REFUSED);
                        shared.lock().replica.peer_mut(peer_id).last_error = Some(reason);
                        std::thread::sleep(if refused { REFUSED_RETRY } else { DIAL_INTERVAL });
                    } else {
                        last_error.clear();
                    }
                }
            })?;
    }
    Ok(())
}

fn my_hello(shared: &Shared, to_node: u8) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        features: if shared.config.secret.is_some() { FEATURE_AUTH } else { 0 }
            | if shared.me.disk.is_none() { FEATURE_DISKLESS } else { 0 },
        resource: shared.config.name.clone(),
        from_node: shared.me.id,
        to_node,
        data_size_bytes: shared.data_size_bytes,
        bitmap_block_size: shared.config.bitmap_block_size,
        protocol: shared.config.protocol.as_byte(),
    }
}

/// Checks the peer's Hello against this node's configuration; the error is the reason sent to
/// the peer and logged here.
fn check_hello(shared: &Shared, hello: &Hello, expected_from: Option<u8>) -> Result<u8, String> {
    if hello.version != PROTOCOL_VERSION {
        return Err(format!(
            "peer speaks protocol version {}, this node {PROTOCOL_VERSION}: run the same blkrepl version on both",
            hello.version
        ));
    }
    if hello.resource != shared.config.name {
        return Err(format!("peer is for resource \"{}\", this is \"{}\": check the addresses", hello.resource, shared.config.name));
    }
    if hello.to_node != shared.me.id {
        return Err(format!("peer wants node id {}, this node is {}: check the node ids", hello.to_node, shared.me.id));
    }
    let Some(peer) = shared.config.node_by_id(hello.from_node).filter(|n| n.id != shared.me.id) else {
        return Err(format!("node id {} is not a peer in {}", hello.from_node, shared.config.path.display()));
    };
    if expected_from.is_some_and(|id| id != peer.id) {
        return Err(format!("expected node {}, {} answered", expected_from.unwrap_or_default(), peer.name));
    }
    if hello.protocol != shared.config.protocol.as_byte() {
        return Err(format!(
            "peer {} uses protocol {}, this node {}: make the resource files agree",
            peer.name, hello.protocol as char, shared.config.protocol
        ));
    }
    let peer_diskless = hello.features & FEATURE_DISKLESS != 0;
    if peer_diskless != peer.disk.is_none() {
        return Err(format!(
            "{} is {} here but says it is {}: make the resource files agree on its `disk`",
            peer.name,
            if peer.disk.is_none() { "a witness" } else { "a data node" },
            if peer_diskless { "a witness" } else { "a data node" }
        ));
    }
    let either_diskless = peer_diskless || shared.me.disk.is_none();
    if !either_diskless && hello.data_size_bytes != shared.data_size_bytes {
        return Err(format!(
            "device sizes differ: {} has {} bytes, this node {}: give both nodes disks of the same size and run create-md",
            peer.name, hello.data_size_bytes, shared.data_size_bytes
        ));
    }
    if hello.bitmap_block_size != shared.config.bitmap_block_size {
        return Err(format!("bitmap_block_size differs from {}'s: make the resource files agree", peer.name));
    }
    if (hello.features & FEATURE_AUTH != 0) != shared.config.secret.is_some() {
        return Err(format!("only one of this node and {} has a shared secret configured", peer.name));
    }
    Ok(peer.id)
}

fn refuse(stream: &TcpStream, reason: &str) -> String {
    let mut out = BufWriter::new(stream);
    let _ = write_message(&mut out, &Message::Disconnect { reason: reason.to_owned() });
    let _ = out.flush();
    reason.to_owned()
}

/// The reading side of a connection during its handshake (see [`HandshakeStream::handshaking`]).
fn handshake_reader(shared: &Shared, stream: &TcpStream) -> Result<BufReader<HandshakeStream>, String> {
    let clone = stream.try_clone().map_err(|e| e.to_string())?;
    Ok(BufReader::new(HandshakeStream::handshaking(clone, handshake_budget(shared)).map_err(|e| e.to_string())?))
}

fn accept(shared: &Arc<Shared>, stream: TcpStream) -> Result<(), String> {
    let mut reader = handshake_reader(shared, &stream)?;
    let hello = match read_message(&mut reader) {
        Ok(Message::Hello(hello)) => hello,
        Ok(other) => return Err(refuse(&stream, &format!("expected Hello, got {}", other.name()))),
        Err(e) => return Err(format!("handshake: {e}")),
    };
    let peer_id = check_hello(shared, &hello, None).map_err(|reason| refuse(&stream, &reason))?;
    if !shared.lock().replica.peer(peer_id).want_connect {
        return Err(refuse(&stream, STAND_ALONE));
    }
    if peer_id < shared.me.id {
        return Err(refuse(&stream, "the node with the higher id dials: check the node ids in both resource files"));
    }
    send(&stream, &Message::Hello(my_hello(shared, peer_id)))?;
    authenticate(shared, &stream, &mut reader, peer_id)?;
    attach(shared, peer_id, stream, reader)
}

fn dial(shared: &Arc<Shared>, peer_id: u8, stream: TcpStream) -> Result<(), String> {
    let mut reader = handshake_reader(shared, &stream)?;
    send(&stream, &Message::Hello(my_hello(shared, peer_id)))?;
    let hello = match read_message(&mut reader) {
        Ok(Message::Hello(hello)) => hello,
        Ok(Message::Disconnect { reason }) => return Err(format!("{PEER_REFUSED}{reason}")),
        Ok(other) => return Err(refuse(&stream, &format!("expected Hello, got {}", other.name()))),
        Err(e) => return Err(format!("handshake: {e}")),
    };
    check_hello(shared, &hello, Some(peer_id)).map_err(|reason| refuse(&stream, &reason))?;
    authenticate(shared, &stream, &mut reader, peer_id)?;
    attach(shared, peer_id, stream, reader)
}

fn send(stream: &TcpStream, msg: &Message) -> Result<(), String> {
    let mut out = BufWriter::new(stream);
    write_message(&mut out, msg).and_then(|()| out.flush()).map_err(|e| format!("handshake send: {e}"))
}

/// Mutual challenge-response: each side proves it knows the secret before any data flows.
fn authenticate(shared: &Shared, stream: &TcpStream, reader: &mut BufReader<HandshakeStream>, peer_id: u8) -> Result<(), String> {
    let Some(secret) = &shared.config.secret else {
        return Ok(());
    };
    let mut nonce = [0u8; 32];
    random_bytes(&mut nonce);
    send(stream, &Message::AuthChallenge { nonce })?;
    let peer_nonce = match read_message(reader) {
        Ok(Message::AuthChallenge { nonce }) => nonce,
        Ok(Message::Disconnect { reason }) => return Err(format!("peer refused: {reason}")),
        Ok(other) => return Err(refuse(stream, &format!("expected AuthChallenge, got {}", other.name()))),
        Err(e) => return Err(format!("authentication: {e}")),
    };
    let mac = auth::challenge_response(secret, &peer_nonce, &shared.config.name, shared.me.id);
    send(stream, &Message::AuthResponse { mac })?;
    match read_message(reader) {
        Ok(Message::AuthResponse { mac }) if auth::verify(secret, &nonce, &shared.config.name, peer_id, &mac) => Ok(()),
        Ok(Message::AuthResponse { .. }) => {
            Err(refuse(stream, "authentication failed: the shared secrets differ"))
        }
        Ok(Message::Disconnect { reason }) => Err(format!("peer refused: {reason}")),
        Ok(other) => Err(refuse(stream, &format!("expected AuthResponse, got {}", other.name()))),
        Err(e) => Err(format!("authentication: {e}")),
    }
}

/// The handshake is done: the connection becomes this peer's link.
fn attach(shared: &Arc<Shared>, peer_id: u8, stream: TcpStream, mut reader: BufReader<HandshakeStream>) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    reader.get_mut().handshake_done(Some(shared.config.timing.ping_timeout)).map_err(|e| e.to_string())?;
    let mut st = shared.lock();
    if st.replica.stopping {
        return Err(refuse(&stream, "node is going down"));
    }
    let peer = st.replica.peer(peer_id);
    if !peer.want_connect {
        return Err(refuse(&stream, STAND_ALONE));
    }
    if peer.connected {
        return Err(refuse(&stream, "already connected"));
    }
    let link = Arc::new(PeerLink::new(stream).map_err(|e| e.to_string())?);
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
            let reason = link_w.run_writer();
            lost(&shared_w, peer_id, generation, &reason);
        })
        .map_err(|e| e.to_string())?;
    let shared_r = shared.clone();
    std::thread::Builder::new()
        .name(format!("recv-{peer_id}"))
        .spawn(move || {
            let reason = run_reader(&shared_r, peer_id, generation, reader);
            lost(&shared_r, peer_id, generation, &reason);
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn run_reader(shared: &Arc<Shared>, peer_id: u8, generation: u64, mut reader: BufReader<HandshakeStream>) -> String {
    loop {
        let msg = match read_message(&mut reader) {
            Ok(msg) => msg,
            Err(WireError::Closed) => return "peer closed the connection".into(),
            Err(WireError::Io(e)) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                let silent = shared.config.timing.ping_timeout;
                return format!("nothing heard from the peer for {silent:?} (dead link or network partition)");
            }
            Err(e) => return format!("receive failed: {e}"),
        };
        if let Err(reason) = dispatch(shared, peer_id, generation, msg) {
            return reason;
        }
    }
}

/// Hands one frame from the peer to the replica. An error drops the connection with that
/// reason; nothing was applied for the offending frame.
fn dispatch(shared: &Arc<Shared>, peer_id: u8, generation: u64, msg: Message) -> Result<(), String> {
    // Only a State or a ping's answer can show that another node was promoted past this one:
    // the writes' frames and acks need no look at quorum.
    let may_supersede = matches!(msg, Message::State(_) | Message::PingAck);
    let mut st = shared.lock();
    st.run_stream_io_here();
    let result = st.replica.receive(Instant::now(), peer_id, generation, msg);
    if may_supersede {
        super::step_down_if_superseded(shared, &mut st);
    }
    shared.changed.notify_all();
    result
}

/// The link to `peer_id` (of `generation`) died.
pub(super) fn lost(shared: &Arc<Shared>, peer_id: u8, generation: u64, reason: &str) {
    let mut st = shared.lock();
    if st.replica.peer(peer_id).generation != generation {
        return;
    }
    drop_peer(shared, &mut st, peer_id, reason);
}

/// Tears down the link to a peer (see `Replica::peer_lost`).
pub fn drop_peer(shared: &Shared, st: &mut State, peer_id: u8, reason: &str) {
    let Some(link) = st.set_link(peer_id, None) else { return };
    link.close(reason);
    st.replica.peer_lost(Instant::now(), peer_id, reason, link.sent_bytes());
    shared.changed.notify_all();
    shared.dial.notify_all();
}
