//! The handshake of a peer connection: on a TLS link the TLS 1.3 handshake first (`crate::tls`);
//! with a shared secret, the proofs (the dialer proves itself, then the acceptor; see
//! `wire::auth`), bound to the TLS session, and every frame sealed (TLS) or MACed (plain) from
//! then on; then the Hellos, checked against this node's configuration. Nothing about the
//! configuration (names, sizes, paths) goes to a peer that has not proven it holds the secret.
//!
//! The node with the higher id dials; the lower one accepts. One rule, so two nodes never race
//! two connections into existence.

use super::host::random_bytes;
use super::shared::Shared;
use crate::handshake_stream::HandshakeStream;
use crate::tls::{Session, TlsError};
use crate::wire::auth::{Role, Transcript};
use crate::wire::seal::Protection;
use crate::wire::{read_message_with, write_message_with, Hello, Message, WireError, PROTOCOL_VERSION};
use std::io::{BufReader, BufWriter, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

/// Hello feature bit: this node is a diskless witness (no data, no size to compare).
const FEATURE_DISKLESS: u64 = 2;

/// Why a proof did not verify, as both sides say it: nothing more (which secret, which node)
/// goes to a party that may not hold the secret.
const AUTH_FAILED: &str = "authentication failed: the shared secrets differ, or this is not a peer of the resource";

/// A connection during its handshake: the socket, its reader (one deadline for the whole
/// handshake), and once both proofs verified, the MACs of both directions.
pub(super) struct Handshake {
    pub stream: TcpStream,
    pub reader: BufReader<HandshakeStream>,
    pub tx: Option<Protection>,
    pub rx: Option<Protection>,
}

impl Handshake {
    fn new(stream: TcpStream, budget: Duration) -> Result<Handshake, String> {
        let clone = stream.try_clone().map_err(|e| e.to_string())?;
        let reader = BufReader::new(HandshakeStream::handshaking(clone, budget).map_err(|e| e.to_string())?);
        Ok(Handshake { stream, reader, tx: None, rx: None })
    }

    fn send(&mut self, msg: &Message) -> Result<(), String> {
        let mut out = BufWriter::new(&self.stream);
        write_message_with(&mut out, msg, self.tx.as_mut()).and_then(|()| out.flush()).map_err(|e| format!("handshake send: {e}"))
    }

    fn recv(&mut self) -> Result<Message, WireError> {
        read_message_with(&mut self.reader, self.rx.as_mut())
    }

    /// Tells the peer why this node closes the connection (best effort); returns the reason.
    pub fn refuse(&mut self, reason: &str) -> String {
        let _ = self.send(&Message::Disconnect { reason: reason.to_owned() });
        reason.to_owned()
    }

    /// Runs the TLS handshake first when the links use TLS (`None`: a plain link). `dialed`:
    /// the node this side dialed, whose certificate the acceptor must show.
    fn secure(&mut self, shared: &Shared, dialed: Option<&str>) -> Result<Option<Session>, String> {
        let Some(tls) = &shared.tls else { return Ok(None) };
        debug_assert!(self.reader.buffer().is_empty(), "TLS comes before any frame is read");
        let reader = self.reader.get_mut();
        let done = match dialed {
            Some(peer) => tls.dial(reader, &self.stream, peer),
            None => tls.accept(reader, &self.stream),
        };
        match done {
            Ok(session) => Ok(Some(session)),
            // In clear, so that the plain peer's log says why too; it names nothing.
            Err(e @ TlsError::PlainPeer) => {
                let reason = self.refuse(&e.to_string());
                self.linger();
                Err(reason)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Closes this side and reads what the peer still sends (at most 64 KiB, until the
    /// handshake's deadline): closing a socket with unread bytes resets the connection, and
    /// the peer would lose the refusal just sent.
    fn linger(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let _ = std::io::copy(&mut std::io::Read::take(self.reader.get_mut(), 64 << 10), &mut std::io::sink());
    }

    /// Why reading `what` failed; a TLS peer on a plain link is told so (in clear) and named.
    fn unreadable(&mut self, what: &str, e: WireError) -> String {
        match e {
            // 0x16: a TLS handshake record, the start of a ClientHello.
            WireError::BadMagic { found } if found >> 24 == 0x16 => {
                let reason = self.refuse("this node's peer links are plain and the peer speaks TLS: set the same `transport` on both nodes");
                self.linger();
                reason
            }
            // 0x15: a TLS alert record, which a TLS 1.3 server sends a client whose certificate
            // it refused after the client's side of the handshake had ended.
            WireError::BadMagic { found } if found >> 24 == 0x15 => {
                format!("{what}: the peer ended the TLS session with an alert: it refused this node's certificate (check `tls_ca` and `certificate` on both nodes)")
            }
            e => format!("{what}: {e}"),
        }
    }
}

/// How long a whole handshake may take, from accept or connect to the link being up: a few
/// round trips on a healthy network, so the silence timeout twice over is generous.
fn handshake_budget(shared: &Shared) -> Duration {
    2 * shared.config.timing.ping_timeout
}

fn nonce() -> [u8; 32] {
    let mut nonce = [0u8; 32];
    random_bytes(&mut nonce);
    nonce
}

/// How a dial that the peer refused is reported.
pub(super) const PEER_REFUSED: &str = "peer refused: ";

/// Takes a connection a peer dialed: its proof, then its Hello. Returns the peer and the
/// finished handshake, for the caller to make it that peer's link.
pub(super) fn accept(shared: &Arc<Shared>, stream: TcpStream) -> Result<(u8, Handshake), String> {
    let mut hs = Handshake::new(stream, handshake_budget(shared))?;
    let session = hs.secure(shared, None)?;
    let proven = match &shared.config.secret {
        Some(secret) => Some(prove_after_dialer(shared, secret, &mut hs, session.as_ref().map(|s| s.channel))?),
        None => {
            protect_by_certificates(&mut hs, session.as_ref(), Role::Acceptor);
            None
        }
    };
    let hello = match hs.recv() {
        Ok(Message::Hello(hello)) => hello,
        Ok(Message::AuthChallenge { .. }) => {
            return Err(hs.refuse("the peer authenticates and this node has no `secret`: configure the same secret on both nodes"))
        }
        Ok(other) => return Err(hs.refuse(&format!("expected Hello, got {}", other.name()))),
        Err(e) => return Err(hs.unreadable("handshake", e)),
    };
    // Before anything in the Hello is looked at: the dialer is the node its certificate names.
    let named = shared.config.node_by_id(hello.from_node).filter(|peer| session.as_ref().is_none_or(|s| s.names(&peer.name)));
    if named.is_none() {
        return Err(hs.refuse(&format!("the peer's certificate does not name node id {}: check its `certificate`", hello.from_node)));
    }
    let peer_id = check_hello(shared, &hello, proven).map_err(|reason| hs.refuse(&reason))?;
    if let Some(reason) = shared.lock().replica.link_refusal(peer_id) {
        return Err(hs.refuse(reason));
    }
    if peer_id < shared.me.id {
        return Err(hs.refuse("the node with the higher id dials: check the node ids in both resource files"));
    }
    hs.send(&Message::Hello(my_hello(shared, peer_id)))?;
    Ok((peer_id, hs))
}

/// Connects to `peer_id` over a connection this node dialed: its proof first, then the Hellos.
/// Returns the finished handshake, for the caller to make it the peer's link.
pub(super) fn dial(shared: &Arc<Shared>, peer_id: u8, stream: TcpStream) -> Result<Handshake, String> {
    let mut hs = Handshake::new(stream, handshake_budget(shared))?;
    let peer_name = shared.config.node_by_id(peer_id).map(|peer| peer.name.clone()).unwrap_or_default();
    let session = hs.secure(shared, Some(&peer_name))?;
    match &shared.config.secret {
        Some(secret) => prove_first(shared, secret, &mut hs, peer_id, session.map(|s| s.channel))?,
        None => protect_by_certificates(&mut hs, session.as_ref(), Role::Dialer),
    }
    hs.send(&Message::Hello(my_hello(shared, peer_id)))?;
    let hello = match hs.recv() {
        Ok(Message::Hello(hello)) => hello,
        Ok(Message::Disconnect { reason }) => return Err(format!("{PEER_REFUSED}{reason}")),
        Ok(other) => return Err(hs.refuse(&format!("expected Hello, got {}", other.name()))),
        Err(e) => return Err(hs.unreadable("handshake", e)),
    };
    check_hello(shared, &hello, Some(peer_id)).map_err(|reason| hs.refuse(&reason))?;
    Ok(hs)
}

/// On a link without a secret: its frames are sealed with keys from the TLS session (a link
/// authenticated by certificates), or travel unprotected (a trusted network, no session).
fn protect_by_certificates(hs: &mut Handshake, session: Option<&Session>, role: Role) {
    if let Some(session) = session {
        let (tx, rx) = session.protection(role);
        (hs.tx, hs.rx) = (Some(tx), Some(rx));
    }
}

/// The dialer's side of the proofs: it sends its nonce, takes the acceptor's, proves itself,
/// then checks the acceptor's proof.
fn prove_first(shared: &Shared, secret: &[u8], hs: &mut Handshake, peer_id: u8, channel: Option<[u8; 32]>) -> Result<(), String> {
    let dialer_nonce = nonce();
    hs.send(&Message::AuthChallenge { nonce: dialer_nonce })?;
    let acceptor_nonce = match hs.recv() {
        Ok(Message::AuthChallenge { nonce }) => nonce,
        Ok(Message::Disconnect { reason }) => return Err(format!("{PEER_REFUSED}{reason}")),
        Ok(other) => return Err(hs.refuse(&format!("expected AuthChallenge, got {}", other.name()))),
        Err(e) => return Err(hs.unreadable("authentication", e)),
    };
    let transcript =
        Transcript { resource: &shared.config.name, dialer_nonce, acceptor_nonce, dialer: shared.me.id, acceptor: peer_id, channel };
    hs.send(&Message::AuthResponse { mac: transcript.proof(secret, Role::Dialer) })?;
    match hs.recv() {
        Ok(Message::AuthResponse { mac }) if transcript.verify(secret, Role::Acceptor, &mac) => {}
        Ok(Message::AuthResponse { .. }) => return Err(hs.refuse(AUTH_FAILED)),
        Ok(Message::Disconnect { reason }) => return Err(format!("{PEER_REFUSED}{reason}")),
        Ok(other) => return Err(hs.refuse(&format!("expected AuthResponse, got {}", other.name()))),
        Err(e) => return Err(hs.unreadable("authentication", e)),
    }
    let (tx, rx) = transcript.protection(secret, Role::Dialer);
    (hs.tx, hs.rx) = (Some(tx), Some(rx));
    Ok(())
}

/// The acceptor's side of the proofs: nothing computed from the secret leaves this node before
/// the dialer proved itself. Returns the node the dialer's proof names.
fn prove_after_dialer(shared: &Shared, secret: &[u8], hs: &mut Handshake, channel: Option<[u8; 32]>) -> Result<u8, String> {
    let dialer_nonce = match hs.recv() {
        Ok(Message::AuthChallenge { nonce }) => nonce,
        Ok(Message::Hello(_)) => {
            return Err(hs.refuse("this node requires authentication first: configure the same `secret` on both nodes"))
        }
        Ok(other) => return Err(hs.refuse(&format!("expected AuthChallenge, got {}", other.name()))),
        Err(e) => return Err(hs.unreadable("authentication", e)),
    };
    let acceptor_nonce = nonce();
    hs.send(&Message::AuthChallenge { nonce: acceptor_nonce })?;
    let proof = match hs.recv() {
        Ok(Message::AuthResponse { mac }) => mac,
        Ok(other) => return Err(hs.refuse(&format!("expected AuthResponse, got {}", other.name()))),
        Err(e) => return Err(hs.unreadable("authentication", e)),
    };
    let transcript = |dialer: u8| Transcript {
        resource: &shared.config.name,
        dialer_nonce,
        acceptor_nonce,
        dialer,
        acceptor: shared.me.id,
        channel,
    };
    // The proof names its dialer: whichever peer's id makes it verify (none: not a peer).
    let dialer = shared.config.peers_of(&shared.me).map(|p| p.id).find(|id| transcript(*id).verify(secret, Role::Dialer, &proof));
    let Some(dialer) = dialer else {
        return Err(hs.refuse(AUTH_FAILED));
    };
    let transcript = transcript(dialer);
    hs.send(&Message::AuthResponse { mac: transcript.proof(secret, Role::Acceptor) })?;
    let (tx, rx) = transcript.protection(secret, Role::Acceptor);
    (hs.tx, hs.rx) = (Some(tx), Some(rx));
    Ok(dialer)
}

fn my_hello(shared: &Shared, to_node: u8) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        features: if shared.me.disk.is_none() { FEATURE_DISKLESS } else { 0 },
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
    Ok(peer.id)
}
