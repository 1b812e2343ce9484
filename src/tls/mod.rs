//! TLS 1.3 on the peer links (rustls, `ring` provider): the key agreement and the channel
//! binding the link's proofs and frame keys are tied to.
//!
//! With a shared secret (the only way peers authenticate today), the TLS certificates identify
//! no one: each daemon makes a key pair and a self-signed certificate when it starts, and a
//! dialer accepts any certificate whose key signed the handshake. Who the peer is, is proven
//! afterwards inside the TLS session by the secret's proofs (`wire::auth`), over a value both
//! ends export from their session ([`LinkTls::dial`], [`LinkTls::accept`]): a man in the
//! middle holds two sessions with two different values, and no proof made for one verifies on
//! the other. What TLS adds over the plain transport is confidentiality and forward secrecy
//! (an ephemeral ECDHE exchange per connection); the frames are then sealed with keys from the
//! same transcript (`wire::seal`).

mod record;

use std::io::{self, Read, Write};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, ConnectionCommon, DigitallySignedStruct, ServerConfig, ServerConnection, SignatureScheme};

pub use record::RecordReader;

/// The exporter label of the channel binding (RFC 8446, section 7.5).
const CHANNEL_LABEL: &[u8] = b"EXPORTER-blkrepl-channel-binding";

/// The name a dialer puts in its ClientHello; never checked (see the module documentation).
const PEER_NAME: &str = "blkrepl-peer";

/// Why TLS could not be set up or a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot make this run's TLS certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("the peer does not speak TLS: set the same `transport` on both nodes")]
    PlainPeer,
    #[error("TLS handshake: {0}")]
    Handshake(io::Error),
}

/// The TLS side of this daemon's peer links: one client and one server configuration, made once.
pub struct LinkTls {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
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
        Ok(LinkTls { client: Arc::new(client), server: Arc::new(server) })
    }

    /// Runs the handshake of a connection this node dialed; returns its channel binding.
    /// Reads no byte past the handshake.
    pub fn dial<R: Read, W: Write>(&self, r: R, w: W) -> Result<[u8; 32], TlsError> {
        let name = ServerName::try_from(PEER_NAME).expect("a valid DNS name");
        let mut conn = ClientConnection::new(self.client.clone(), name)?;
        handshake(&mut conn, r, w)
    }

    /// Runs the handshake of a connection a peer dialed; returns its channel binding.
    pub fn accept<R: Read, W: Write>(&self, r: R, w: W) -> Result<[u8; 32], TlsError> {
        let mut conn = ServerConnection::new(self.server.clone())?;
        handshake(&mut conn, r, w)
    }
}

/// Drives `conn` through its handshake over a blocking reader and writer.
fn handshake<Data>(conn: &mut ConnectionCommon<Data>, r: impl Read, w: impl Write) -> Result<[u8; 32], TlsError> {
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
        Ok(()) => Ok(conn.export_keying_material([0u8; 32], CHANNEL_LABEL, None)?),
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
            let binding = tls_b.accept(&acceptor, &acceptor).unwrap();
            let mut next = [0u8; 9];
            (&acceptor).read_exact(&mut next).unwrap();
            (binding, next)
        });
        let binding = tls_a.dial(&dialer, &dialer).unwrap();
        // Sent right behind the client's Finished, as a dialer's first frame is.
        (&dialer).write_all(b"BLKR next").unwrap();
        let (accepted, next) = accepting.join().unwrap();
        assert_eq!(binding, accepted);
        assert_eq!(&next, b"BLKR next");

        let (dialer, acceptor) = pair();
        let (tls_a, tls_b) = (LinkTls::for_this_run().unwrap(), LinkTls::for_this_run().unwrap());
        let accepting = std::thread::spawn(move || tls_b.accept(&acceptor, &acceptor).unwrap());
        assert_ne!(tls_a.dial(&dialer, &dialer).unwrap(), binding, "every session has its own binding");
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
        let err = LinkTls::for_this_run().unwrap().dial(&dialer, &dialer).unwrap_err();
        assert!(matches!(err, TlsError::PlainPeer), "{err}");
    }
}
