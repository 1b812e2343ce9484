//! Peer authentication against real daemons, on TLS links (the default with a secret) and on
//! plain ones: peers that share the secret replicate; a relay that passes a real node's dial
//! on to another node is not authenticated by it (on TLS, a man in the middle who ends a TLS
//! session with each side); a client without the secret learns nothing about the resource
//! from what it is sent; a plain peer and a TLS one are told why they do not connect.

mod common;

use blkrepl::config::ResourceConfig;
use blkrepl::tls::LinkTls;
use blkrepl::wire::{read_message, write_message, Hello, Message, PROTOCOL_VERSION};
use common::{Cluster, Options};
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

const SECRET: &str = "secret = \"a shared secret for the test\"";
const PLAIN: &str = "secret = \"a shared secret for the test\"\ntransport = \"plain\"";
const MIB: u64 = 1 << 20;

fn address(c: &Cluster, node: &str) -> SocketAddr {
    ResourceConfig::load(&c.config_dir(), "r0").unwrap().node(node).unwrap().address
}

/// A connection to `address`, through a TLS handshake first when `tls`; what follows the
/// handshake is read and written on the socket as the daemons do.
fn connect(address: SocketAddr, tls: bool) -> TcpStream {
    let stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if tls {
        LinkTls::for_this_run().unwrap().dial(&stream, &stream, "alpha").unwrap();
    }
    stream
}

#[test]
fn peers_that_share_the_secret_replicate() {
    let c = Cluster::witness_trio(Options { extra: SECRET, ..Options::default() });
    c.write("alpha", &[(2 * MIB, MIB, 0x3c)]);
    let beta = c.data_of("beta", 3 * MIB);
    assert!(beta[2 * MIB as usize..].iter().all(|b| *b == 0x3c), "the write did not reach beta");
}

/// The attack the old handshake allowed: take the address of a node that is down (beta), so a
/// third node (tie) dials the attacker believing it is beta; dial alpha, and pass the nonces
/// and tie's proof between the two. tie's proof names the node it meant to reach, so alpha
/// refuses it, and the relay never sees alpha prove anything.
#[test]
fn a_relayed_dial_does_not_authenticate_the_relay() {
    relay_is_refused(PLAIN, false);
}

/// The same relay with TLS: the attacker ends tie's TLS session and opens its own to alpha, so
/// tie's proof is bound to another session than the one alpha checks it on.
#[test]
fn a_man_in_the_middle_of_tls_is_not_authenticated() {
    relay_is_refused(SECRET, true);
}

fn relay_is_refused(extra: &'static str, tls: bool) {
    let c = Cluster::witness_trio(Options { extra, ..Options::default() });
    let (alpha, beta) = (address(&c, "alpha"), address(&c, "beta"));
    c.ok("beta", &["down", "r0"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let listener = loop {
        match TcpListener::bind(beta) {
            Ok(listener) => break listener,
            Err(e) => assert!(Instant::now() < deadline, "cannot take beta's address: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut from_tie, _) = listener.accept().unwrap();
    from_tie.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if tls {
        LinkTls::for_this_run().unwrap().accept(&from_tie, &from_tie).unwrap();
    }
    let tie_challenge = read_message(&mut from_tie).unwrap();
    assert!(matches!(tie_challenge, Message::AuthChallenge { .. }), "{tie_challenge:?}");
    let mut to_alpha = connect(alpha, tls);
    write_message(&mut to_alpha, &tie_challenge).unwrap();
    let alpha_challenge = read_message(&mut to_alpha).unwrap();
    assert!(matches!(alpha_challenge, Message::AuthChallenge { .. }), "{alpha_challenge:?}");
    write_message(&mut from_tie, &alpha_challenge).unwrap();
    let tie_proof = read_message(&mut from_tie).unwrap();
    assert!(matches!(tie_proof, Message::AuthResponse { .. }), "tie proves itself to the node it dialed: {tie_proof:?}");
    write_message(&mut to_alpha, &tie_proof).unwrap();
    match read_message(&mut to_alpha) {
        Ok(Message::Disconnect { reason }) => assert!(reason.contains("authentication failed"), "{reason}"),
        other => panic!("alpha answered the relayed proof with {other:?}"),
    }
    assert_eq!(c.status("alpha")["role"], "Primary", "alpha carries on");
}

/// Everything alpha sends a client that does not hold the secret, whatever it tries.
fn what_a_stranger_hears(alpha: SocketAddr, tls: bool, first: Message, then: Option<Message>) -> Vec<u8> {
    let mut stream = connect(alpha, tls);
    write_message(&mut stream, &first).unwrap();
    if let Some(then) = then {
        // After alpha's nonce: a proof made up without the secret.
        let mut header = [0u8; 16];
        stream.read_exact(&mut header).unwrap();
        let len = u32::from_be_bytes(header[8..12].try_into().unwrap()) as usize;
        let mut payload = vec![0; len];
        stream.read_exact(&mut payload).unwrap();
        write_message(&mut stream, &then).unwrap();
        let mut heard = [header.to_vec(), payload].concat();
        stream.read_to_end(&mut heard).unwrap();
        return heard;
    }
    let mut heard = Vec::new();
    stream.read_to_end(&mut heard).unwrap();
    heard
}

#[test]
fn a_client_without_the_secret_learns_nothing_about_the_resource() {
    for (extra, tls) in [(SECRET, true), (PLAIN, false)] {
        a_stranger_learns_nothing(extra, tls);
    }
}

fn a_stranger_learns_nothing(extra: &'static str, tls: bool) {
    let c = Cluster::witness_trio(Options { extra, ..Options::default() });
    let alpha = address(&c, "alpha");
    let hello = Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        features: 0,
        resource: "r0".into(),
        from_node: 2,
        to_node: 0,
        data_size_bytes: 64 * MIB,
        bitmap_block_size: 4096,
        protocol: b'C',
    });
    let hello_first = what_a_stranger_hears(alpha, tls, hello.clone(), None);
    let guessed = what_a_stranger_hears(
        alpha,
        tls,
        Message::AuthChallenge { nonce: [3; 32] },
        Some(Message::AuthResponse { mac: [4; 32] }),
    );
    // The other transport than alpha's: told so, and nothing else.
    let other_transport = if tls {
        what_a_stranger_hears(alpha, false, hello, None)
    } else {
        let stream = TcpStream::connect(alpha).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let err = LinkTls::for_this_run().unwrap().dial(&stream, &stream, "alpha").unwrap_err();
        assert!(err.to_string().contains("does not speak TLS"), "{err}");
        let mut heard = Vec::new();
        let _ = (&stream).read_to_end(&mut heard);
        heard
    };
    let text = String::from_utf8_lossy(&other_transport);
    assert!(text.contains("TLS") && text.contains("`transport`"), "a refusal that says why: {text:?}");
    let config_dir = c.config_dir().display().to_string();
    for heard in [&hello_first, &guessed, &other_transport] {
        let text = String::from_utf8_lossy(heard);
        for secret_fact in ["alpha", "beta", "tie", "r0", config_dir.as_str(), "67108864"] {
            assert!(!text.contains(secret_fact), "a stranger was told {secret_fact:?}: {text:?}");
        }
    }
    for heard in [&hello_first, &guessed] {
        let text = String::from_utf8_lossy(heard);
        assert!(text.contains("authenticat"), "a refusal that says why: {text:?}");
    }
}
