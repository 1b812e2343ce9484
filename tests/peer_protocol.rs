//! A hand-driven fake peer against a real daemon: a peer speaking another version is refused
//! with a reason, and a malformed or out-of-range frame drops the connection without writing.

mod common;

use blkrepl::wire::{read_message, write_message, DigestPurpose, Hello, Message, PROTOCOL_VERSION};
use bytes::{Bytes, BytesMut};
use common::{Cluster, Options};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::time::Duration;

/// alpha up alone (Secondary); returns the cluster and alpha's replication address.
fn alpha_alone() -> (Cluster, String) {
    let c = Cluster::new(&["alpha", "beta"], Options { extra: "trusted_network = true", ..Options::default() });
    c.ok("alpha", &["create-md", "r0"]);
    c.ok("alpha", &["up", "r0"]);
    let text = std::fs::read_to_string(c.config_dir().join("r0.toml")).unwrap();
    let address = text.lines().find(|l| l.starts_with("address")).unwrap().split('"').nth(1).unwrap().to_owned();
    (c, address)
}

fn hello(version: u32, data_size_bytes: u64) -> Message {
    hello_for("r0", version, data_size_bytes)
}

fn hello_for(resource: &str, version: u32, data_size_bytes: u64) -> Message {
    Message::Hello(Hello {
        version,
        features: 0,
        resource: resource.into(),
        from_node: 1,
        to_node: 0,
        data_size_bytes,
        bitmap_block_size: 4096,
        protocol: b'C',
    })
}

fn connect(address: &str) -> (TcpStream, BufReader<TcpStream>) {
    let stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let reader = BufReader::new(stream.try_clone().unwrap());
    (stream, reader)
}

fn alpha_size(c: &Cluster) -> u64 {
    c.status("alpha")["size_bytes"].as_u64().unwrap()
}

/// Completes the handshake as beta and returns the streams after alpha's State.
fn handshake_as_beta(c: &Cluster, address: &str) -> (TcpStream, BufReader<TcpStream>) {
    let (mut stream, mut reader) = connect(address);
    write_message(&mut stream, &hello(PROTOCOL_VERSION, alpha_size(c))).unwrap();
    assert!(matches!(read_message(&mut reader).unwrap(), Message::Hello(_)));
    assert!(matches!(read_message(&mut reader).unwrap(), Message::State(_)));
    c.wait_for("alpha", "fake beta connected", |s| Cluster::peer(s, "beta")["connection"] == "Connected");
    (stream, reader)
}

fn disk_at(c: &Cluster, offset: u64) -> Vec<u8> {
    let mut file = std::fs::File::open(c.disk("alpha")).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    let mut bytes = vec![0u8; 8192];
    file.read_exact(&mut bytes).unwrap();
    bytes
}

/// Sends `hello` to alpha and expects a refusal whose reason contains `needle`.
fn assert_refused(address: &str, hello: Message, needle: &str) {
    let (mut stream, mut reader) = connect(address);
    write_message(&mut stream, &hello).unwrap();
    match read_message(&mut reader).unwrap() {
        Message::Disconnect { reason } => assert!(reason.contains(needle), "{reason}"),
        other => panic!("expected a refusal, got {}", other.name()),
    }
}

#[test]
fn peer_with_another_version_is_told_why() {
    let (c, address) = alpha_alone();
    assert_refused(&address, hello(PROTOCOL_VERSION + 1, alpha_size(&c)), "protocol version");
}

#[test]
fn peer_with_another_size_is_told_why() {
    let (c, address) = alpha_alone();
    assert_refused(&address, hello(PROTOCOL_VERSION, alpha_size(&c) + 4096), "sizes differ");
}

#[test]
fn peer_of_another_resource_is_told_why() {
    let (c, address) = alpha_alone();
    assert_refused(&address, hello_for("r7", PROTOCOL_VERSION, alpha_size(&c)), "\"r7\"");
}

#[test]
fn corrupt_frame_drops_the_connection_and_writes_nothing() {
    let (c, address) = alpha_alone();
    let (mut stream, _reader) = handshake_as_beta(&c, &address);
    let before = disk_at(&c, 0);
    let mut frame = BytesMut::new();
    let data = Message::Data { id: 1, epoch: 1, offset: 0, fua: false, payload: Bytes::from(vec![0xEE; 4096]) };
    blkrepl::wire::encode(&data, &mut frame);
    let last = frame.len() - 1;
    frame[last] ^= 0xFF;
    stream.write_all(&frame).unwrap();
    let s = c.wait_for("alpha", "drop", |s| Cluster::peer(s, "beta")["connection"] != "Connected");
    let reason = Cluster::peer(&s, "beta")["last_error"].as_str().unwrap().to_owned();
    assert!(reason.contains("crc") || reason.contains("checksum"), "{reason}");
    assert_eq!(disk_at(&c, 0), before, "a corrupt frame wrote data");
}

#[test]
fn write_outside_the_device_drops_the_connection() {
    let (c, address) = alpha_alone();
    let (mut stream, _reader) = handshake_as_beta(&c, &address);
    let size = alpha_size(&c);
    // Right past the device starts the metadata: a write there would damage it.
    let metadata_before = disk_at(&c, size);
    let data = Message::Data { id: 1, epoch: 1, offset: size, fua: false, payload: Bytes::from(vec![0xEE; 4096]) };
    write_message(&mut stream, &data).unwrap();
    let s = c.wait_for("alpha", "drop", |s| Cluster::peer(s, "beta")["connection"] != "Connected");
    let reason = Cluster::peer(&s, "beta")["last_error"].as_str().unwrap().to_owned();
    assert!(reason.contains("outside the device"), "{reason}");
    assert_eq!(disk_at(&c, size), metadata_before, "the metadata area was written");
    c.ok("alpha", &["down", "r0"]);
    c.ok("alpha", &["up", "r0"]);
}

#[test]
fn bad_digest_frames_drop_the_connection_and_change_nothing() {
    let (c, address) = alpha_alone();
    let disk_before = c.status("alpha")["disk"].clone();
    let digests = vec![[0xAB; 32]];
    let cases = [
        (
            Message::DigestRequest { purpose: DigestPurpose::Verify, offset: 512, digests: digests.clone() },
            "do not match the device's 4096-byte blocks",
        ),
        (
            Message::DigestRequest { purpose: DigestPurpose::Verify, offset: alpha_size(&c), digests: digests.clone() },
            "do not match the device's 4096-byte blocks",
        ),
        // Well formed, but this connection never became Established: nothing is compared.
        (Message::DigestRequest { purpose: DigestPurpose::Verify, offset: 0, digests }, "Verify digests from beta while replication is Off"),
        (
            Message::DigestReply { purpose: DigestPurpose::Verify, offset: 0, blocks: 1, differing: vec![(0, 1)] },
            "verify answer for 0 (1 blocks), expected None",
        ),
        (
            Message::DigestReply { purpose: DigestPurpose::Resync, offset: 0, blocks: 1, differing: vec![] },
            "resync digest answer from beta while replication is Off",
        ),
    ];
    for (msg, needle) in cases {
        let s = assert_dropped_for(&c, &address, &msg, needle);
        assert_eq!(s["disk"], disk_before);
        assert_eq!(Cluster::peer(&s, "beta")["out_of_sync_bytes"], 0);
    }
}

/// Frames a connected peer may not send in this state of the link: each drops the connection
/// with its reason, and nothing of it reaches the disk or the bitmaps.
#[test]
fn frames_out_of_turn_drop_the_connection_and_change_nothing() {
    let (c, address) = alpha_alone();
    let before = disk_at(&c, 0);
    let cases = [
        // beta never said it is primary: no write of its may land.
        (Message::Data { id: 1, epoch: 1, offset: 0, fua: false, payload: Bytes::from(vec![0xEE; 4096]) }, "but is not primary"),
        (Message::Barrier { epoch: 1 }, "but is not primary"),
        (Message::BitmapRuns { last: true, runs: vec![(0, 16)] }, "no sync decision is pending"),
        (Message::ResyncData { offset: 0, payload: Bytes::from(vec![0xEE; 4096]) }, "resync data from beta while replication is Off"),
        (Message::ResyncZeroes { offset: 0, len: 4096 }, "resync data from beta while replication is Off"),
        (Message::ResyncDone { current_uuid: 0x1234_5678, history: [0; 4], position: blkrepl::wire::DataPosition::default() }, "ended a resync it does not run"),
        (Message::BarrierAck { epoch: 7, writes: 0 }, "never sent"),
    ];
    for (msg, needle) in cases {
        let s = assert_dropped_for(&c, &address, &msg, needle);
        assert_eq!(Cluster::peer(&s, "beta")["out_of_sync_bytes"], 0, "{}", msg.name());
        assert_eq!(disk_at(&c, 0), before, "{} wrote data", msg.name());
    }
}

/// Sends `msg` to alpha on a fresh connection as beta; alpha must drop it for a reason that
/// contains `needle`. Returns alpha's status after the drop.
fn assert_dropped_for(c: &Cluster, address: &str, msg: &Message, needle: &str) -> serde_json::Value {
    let (mut stream, _reader) = handshake_as_beta(c, address);
    write_message(&mut stream, msg).unwrap();
    let s = c.wait_for("alpha", "drop", |s| Cluster::peer(s, "beta")["connection"] != "Connected");
    let reason = Cluster::peer(&s, "beta")["last_error"].as_str().unwrap().to_owned();
    assert!(reason.contains(needle), "{}: {reason}", msg.name());
    s
}
