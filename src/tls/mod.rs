//! TLS 1.3 on the peer links (rustls, `ring` provider): the key agreement, and either the
//! peers' certificates or the channel binding the secret's proofs are tied to.
//!
//! Peers authenticate in one of two ways:
//! - **Certificates** (`tls_ca`, and each node's `certificate` and `certificate_key`,
//!   [`LinkTls::with_certificates`]): both sides show a certificate that the resource's CA
//!   signed; the dialer checks that the acceptor's names the node it dialed, the acceptor that
//!   the dialer's names the node its Hello claims ([`Session::names`]). The frame keys are
//!   exported from the session ([`Session::protection`]).
//! - **A shared secret only** ([`LinkTls::for_this_run`]): the certificates identify no one.
//!   Each daemon makes a key pair and a self-signed certificate when it starts, and a dialer
//!   accepts any certificate whose key signed the handshake. Who the peer is, is proven
//!   afterwards inside the TLS session by the secret's proofs (`wire::auth`), over a value both
//!   ends export from their session ([`Session::channel`]): a man in the middle holds two
//!   sessions with two different values, and no proof made for one verifies on the other.
//!
//! Either way TLS gives confidentiality and forward secrecy (an ephemeral ECDHE exchange per
//! connection), and the frames are sealed per direction (`wire::seal`).

pub mod channel;
mod record;

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, ClientConnection, ConnectionCommon, DigitallySignedStruct, RootCertStore, ServerConfig, ServerConnection,
    SignatureScheme,
};

use crate::config::NodeCertificate;
use crate::wire::auth::Role;
use crate::wire::seal::{FrameSeal, Protection};

pub use record::RecordReader;

/// The exporter label of the channel binding (RFC 8446, section 7.5).
const CHANNEL_LABEL: &[u8] = b"EXPORTER-blkrepl-channel-binding";

/// The exporter label of the frame keys of a link authenticated by certificates alone.
const FRAME_KEYS_LABEL: &[u8] = b"EXPORTER-blkrepl-frame-keys";

/// The name a dialer puts in its ClientHello; never checked (see the module documentation).
const PEER_NAME: &str = "blkrepl-peer";

/// Why TLS could not be set up or a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot make this run's TLS certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("TLS configuration: {0:?}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("cannot read {}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("{} is readable by other users (mode {mode:o}): `chmod 600` it", path.display())]
    KeyReadable { path: PathBuf, mode: u32 },
    #[error("this node's certificate {} does not pass the checks its peers make: {reason}", path.display())]
    OwnCertificate { path: PathBuf, reason: rustls::Error },
    #[error("the peer does not speak TLS: set the same `transport` on both nodes")]
    PlainPeer,
    #[error("TLS handshake: {0}")]
    Handshake(io::Error),
}

/// The TLS side of this daemon's peer links: one client and one server configuration, made once.
pub struct LinkTls {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    /// With certificates: what checks that a peer's certificate names a node.
    names: Option<Arc<WebPkiServerVerifier>>,
}

/// What one TLS handshake established.
pub struct Session {
    /// The channel binding: what the secret's proofs are bound to.
    pub channel: [u8; 32],
    /// Keys of both directions (from the dialer, from the acceptor), exported from the session.
    frame_keys: [[u8; 32]; 2],
    /// The certificates the peer showed (its own first, then intermediates), when the link
    /// uses certificates.
    peer: Option<Vec<CertificateDer<'static>>>,
    names: Option<Arc<WebPkiServerVerifier>>,
}

/// Shows no key material.
impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("peer_certificate", &self.peer.is_some()).finish_non_exhaustive()
    }
}

impl Session {
    /// What protects the frames of a link authenticated by certificates alone: (what this side
    /// sends with, what it receives with), for a side in `role`.
    pub fn protection(&self, role: Role) -> (Protection, Protection) {
        let [from_dialer, from_acceptor] = self.frame_keys.map(|key| Protection::Sealed(FrameSeal::new(key)));
        match role {
            Role::Dialer => (from_dialer, from_acceptor),
            Role::Acceptor => (from_acceptor, from_dialer),
        }
    }

    /// Whether the peer's certificate names `node` (always true on a link without
    /// certificates, whose peers prove who they are with the secret). The CA already signed it:
    /// the handshake checked that.
    pub fn names(&self, node: &str) -> bool {
        match (&self.names, &self.peer) {
            (None, _) => true,
            (Some(names), Some(chain)) => match chain.split_first() {
                Some((own, intermediates)) => ServerName::try_from(node)
                    .is_ok_and(|name| names.verify_server_cert(own, intermediates, &name, &[], UnixTime::now()).is_ok()),
                None => false,
            },
            (Some(_), None) => false,
        }
    }
}

impl LinkTls {
    /// Configurations around a certificate made for this run (see the module documentation).
    pub fn for_this_run() -> Result<LinkTls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let made = rcgen::generate_simple_self_signed(vec![PEER_NAME.to_owned()])?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![made.cert.der().clone()], key)?;
        // One connection per link and nothing to resume: no tickets, which would also be bytes
        // sent after the handshake that the frame reader would have to skip.
        server.send_tls13_tickets = 0;
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        client.resumption = rustls::client::Resumption::disabled();
        client.enable_sni = false;
        Ok(LinkTls { client: Arc::new(client), server: Arc::new(server), names: None })
    }

    /// Configurations for a node that proves who it is with `own` (its certificate and key)
    /// and accepts peers whose certificates `ca` signed. Checks its own certificate as its
    /// peers will (signed by `ca`, naming `node`), so a wrong file fails `up`, not every
    /// handshake.
    pub fn with_certificates(ca: &Path, own: &NodeCertificate, node: &str) -> Result<LinkTls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for cert in certificates(ca)? {
            roots.add(cert).map_err(|e| TlsError::File { path: ca.to_owned(), reason: e.to_string() })?;
        }
        let roots = Arc::new(roots);
        let chain = certificates(&own.certificate)?;
        let key = private_key(&own.key)?;
        let names = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        let own_name = ServerName::try_from(node.to_owned()).map_err(|e| TlsError::File { path: own.certificate.clone(), reason: e.to_string() })?;
        names
            .verify_server_cert(&chain[0], &chain[1..], &own_name, &[], UnixTime::now())
            .map_err(|reason| TlsError::OwnCertificate { path: own.certificate.clone(), reason })?;
        let clients = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(clients)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.send_tls13_tickets = 0;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        client.resumption = rustls::client::Resumption::disabled();
        client.enable_sni = false;
        Ok(LinkTls { client: Arc::new(client), server: Arc::new(server), names: Some(names) })
    }

    /// What an NBD export that requires TLS serves with: this node's certificate, and client
    /// certificates the resource's CA signed. `None` without certificates.
    pub fn export_config(&self) -> Option<Arc<ServerConfig>> {
        self.names.as_ref().map(|_| self.server.clone())
    }

    /// Runs the handshake of a connection this node dialed to `peer` (the node's name, which
    /// its certificate must carry when the link uses certificates). Reads no byte past the
    /// handshake.
    pub fn dial<R: Read, W: Write>(&self, r: R, w: W, peer: &str) -> Result<Session, TlsError> {
        let name = if self.names.is_some() { peer } else { PEER_NAME };
        let name = ServerName::try_from(name.to_owned()).map_err(|e| TlsError::Handshake(io::Error::other(e)))?;
        let mut conn = ClientConnection::new(self.client.clone(), name)?;
        self.handshake(&mut conn, r, w)
    }

    /// Runs the handshake of a connection a peer dialed.
    pub fn accept<R: Read, W: Write>(&self, r: R, w: W) -> Result<Session, TlsError> {
        let mut conn = ServerConnection::new(self.server.clone())?;
        self.handshake(&mut conn, r, w)
    }

    fn handshake<Data>(&self, conn: &mut ConnectionCommon<Data>, r: impl Read, w: impl Write) -> Result<Session, TlsError> {
        drive(conn, r, w)?;
        let keys: [u8; 64] = conn.export_keying_material([0u8; 64], FRAME_KEYS_LABEL, None)?;
        let (from_dialer, from_acceptor) = keys.split_at(32);
        Ok(Session {
            channel: conn.export_keying_material([0u8; 32], CHANNEL_LABEL, None)?,
            frame_keys: [from_dialer.try_into().expect("32 bytes"), from_acceptor.try_into().expect("32 bytes")],
            peer: conn.peer_certificates().map(|chain| chain.iter().map(|cert| cert.clone().into_owned()).collect()),
            names: self.names.clone(),
        })
    }
}

/// The certificates of a PEM file, at least one.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let unreadable = |reason: String| TlsError::File { path: path.to_owned(), reason };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unreadable(e.to_string()))?;
    if certs.is_empty() {
        return Err(unreadable("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// The private key of a PEM file that only its owner may read.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let meta = std::fs::metadata(path).map_err(|e| TlsError::File { path: path.to_owned(), reason: e.to_string() })?;
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyReadable { path: path.to_owned(), mode });
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File { path: path.to_owned(), reason: e.to_string() })
}

/// Drives `conn` through its handshake over a blocking reader and writer.
fn drive<Data>(conn: &mut ConnectionCommon<Data>, r: impl Read, w: impl Write) -> Result<(), TlsError> {
    let mut io = Duplex { r: RecordReader::new(r), w };
    let done = (|| {
        while conn.is_handshaking() {
            conn.complete_io(&mut io)?;
        }
        // The client's Finished, when this side is the client.
        while conn.wants_write() {
            conn.write_tls(&mut io)?;
        }
        io.w.flush()
    })();
    match done {
        Err(_) if io.r.saw_plain_frame() => Err(TlsError::PlainPeer),
        Err(e) => Err(TlsError::Handshake(e)),
        Ok(()) => Ok(()),
    }
}

/// A reader and a writer as the one stream rustls drives.
struct Duplex<R, W> {
    r: RecordReader<R>,
    w: W,
}

impl<R: Read, W> Read for Duplex<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.r.read(buf)
    }
}

impl<R, W: Write> Write for Duplex<R, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.w.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

/// Accepts whichever certificate the peer shows, as long as its key signed the handshake: the
/// peer is authenticated by the secret's proofs over the channel binding, not by a certificate.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let dialed = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (dialed, listener.accept().unwrap().0)
    }

    #[test]
    fn both_ends_export_the_same_binding_and_the_bytes_after_the_handshake_reach_the_frame_reader() {
        let (dialer, acceptor) = pair();
        let (tls_a, tls_b) = (LinkTls::for_this_run().unwrap(), LinkTls::for_this_run().unwrap());
        let accepting = std::thread::spawn(move || {
            let session = tls_b.accept(&acceptor, &acceptor).unwrap();
            let mut next = [0u8; 9];
            (&acceptor).read_exact(&mut next).unwrap();
            (session, next)
        });
        let session = tls_a.dial(&dialer, &dialer, "beta").unwrap();
        // Sent right behind the client's Finished, as a dialer's first frame is.
        (&dialer).write_all(b"BLKR next").unwrap();
        let (accepted, next) = accepting.join().unwrap();
        assert_eq!(session.channel, accepted.channel);
        assert_eq!(session.frame_keys, accepted.frame_keys);
        assert_ne!(session.frame_keys[0], session.frame_keys[1], "a key per direction");
        assert!(accepted.names("alpha") && accepted.names("anyone"), "without certificates the secret says who the peer is");
        assert_eq!(&next, b"BLKR next");

        let (dialer, acceptor) = pair();
        let (tls_a, tls_b) = (LinkTls::for_this_run().unwrap(), LinkTls::for_this_run().unwrap());
        let accepting = std::thread::spawn(move || tls_b.accept(&acceptor, &acceptor).unwrap());
        assert_ne!(tls_a.dial(&dialer, &dialer, "beta").unwrap().channel, session.channel, "every session has its own binding");
        accepting.join().unwrap();
    }

    #[test]
    fn a_plain_peer_is_told_apart() {
        let (dialer, acceptor) = pair();
        (&dialer).write_all(b"BLKR\0\x30\0\0\0\0\0\0\0\0\0\0").unwrap();
        let err = LinkTls::for_this_run().unwrap().accept(&acceptor, &acceptor).unwrap_err();
        assert!(matches!(err, TlsError::PlainPeer), "{err}");
        drop(dialer);
        let (dialer, acceptor) = pair();
        (&acceptor).write_all(b"BLKR\0\x30\0\0\0\0\0\0\0\0\0\0").unwrap();
        let err = LinkTls::for_this_run().unwrap().dial(&dialer, &dialer, "alpha").unwrap_err();
        assert!(matches!(err, TlsError::PlainPeer), "{err}");
    }
}
