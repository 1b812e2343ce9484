//! Codec tests: round trips, the byte layout of `docs/PROTOCOL.md`, and every way a frame is
//! refused. Frames for the error cases are built by hand here (with their own crc), so the
//! tests check the decoder against the documented format, not against the encoder.

use std::io::{self, Read, Write};

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;

use super::seal::Protection;
use super::*;

/// A frame with the given header fields and payload and a correct crc.
fn raw_frame(code: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(b"BLKR");
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(&flags.to_be_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&[0; 4]);
    frame.extend_from_slice(payload);
    reseal(&mut frame);
    frame
}

/// Recomputes the crc of a frame whose bytes a test has changed on purpose.
fn reseal(frame: &mut [u8]) {
    frame[12..16].fill(0);
    let crc = crc32c::crc32c(frame);
    frame[12..16].copy_from_slice(&crc.to_be_bytes());
}

fn encoded(msg: &Message) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(msg, &mut out);
    out.to_vec()
}

fn malformed_reason(frame: &[u8]) -> &'static str {
    match decode(frame) {
        Err(WireError::Malformed { reason, .. }) => reason,
        other => panic!("expected Malformed, got {other:?}"),
    }
}

fn hello(resource: &str) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        features: 0,
        resource: resource.to_owned(),
        from_node: 1,
        to_node: 2,
        data_size_bytes: 1 << 30,
        bitmap_block_size: 4096,
        protocol: b'C',
    }
}

fn data(len: usize) -> Message {
    Message::Data {
        id: 7,
        epoch: 3,
        offset: 4096,
        fua: true,
        payload: Bytes::from(vec![0xab; len]),
    }
}

fn arb_bytes(max_len: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..max_len).prop_map(Bytes::from)
}

fn arb_hello() -> impl Strategy<Value = Hello> {
    (
        any::<u32>(),
        any::<u64>(),
        // At most 15 chars of at most 4 bytes: within the 63-byte limit.
        "\\PC{0,15}",
        any::<u8>(),
        any::<u8>(),
        any::<u64>(),
        any::<u32>(),
        prop::sample::select(vec![b'A', b'B', b'C']),
    )
        .prop_map(
            |(
                version,
                features,
                resource,
                from_node,
                to_node,
                data_size_bytes,
                bitmap_block_size,
                protocol,
            )| {
                Hello {
                    version,
                    features,
                    resource,
                    from_node,
                    to_node,
                    data_size_bytes,
                    bitmap_block_size,
                    protocol,
                }
            },
        )
}

fn arb_state() -> impl Strategy<Value = PeerState> {
    (
        any::<u8>(),
        any::<u8>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<[u64; 4]>(),
        (any::<u64>(), any::<u32>(), any::<u64>(), arb_position()),
        (proptest::option::of(0..u8::MAX), any::<u32>()),
    )
        .prop_map(
            |(role, disk, flags, current_uuid, bitmap_uuid, history, (bitmap_weight, primaries, term, data_position), (resynced_by, lagging))| PeerState {
                role,
                disk,
                flags,
                current_uuid,
                bitmap_uuid,
                history,
                bitmap_weight,
                primaries,
                term,
                data_position,
                resynced_by,
                lagging,
            },
        )
}

fn arb_position() -> impl Strategy<Value = DataPosition> {
    any::<(u64, u64, u64)>().prop_map(|(term, epoch, fua)| DataPosition { term, epoch, fua })
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        arb_hello().prop_map(Message::Hello),
        any::<[u8; 32]>().prop_map(|nonce| Message::AuthChallenge { nonce }),
        any::<[u8; 32]>().prop_map(|mac| Message::AuthResponse { mac }),
        arb_state().prop_map(Message::State),
        (any::<bool>(), vec(any::<(u64, u64)>(), 0..64))
            .prop_map(|(last, runs)| Message::BitmapRuns { last, runs }),
        (any::<u8>(), vec(any::<(u64, u64)>(), 0..64)).prop_map(|(node, runs)| Message::ThirdPeerBits { node, runs }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            arb_bytes(8192)
        )
            .prop_map(|(id, epoch, offset, fua, payload)| Message::Data {
                id,
                epoch,
                offset,
                fua,
                payload
            }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(id, epoch, offset, len, fua, discard)| Message::Zeroes {
                id,
                epoch,
                offset,
                len,
                fua,
                discard
            }),
        any::<u64>().prop_map(|id| Message::RecvAck { id }),
        any::<u64>().prop_map(|id| Message::WriteAck { id }),
        (any::<u64>(), any::<u32>()).prop_map(|(id, errno)| Message::NegAck { id, errno }),
        any::<u64>().prop_map(|epoch| Message::Barrier { epoch }),
        (any::<u64>(), any::<u32>())
            .prop_map(|(epoch, writes)| Message::BarrierAck { epoch, writes }),
        (any::<u64>(), arb_bytes(8192))
            .prop_map(|(offset, payload)| Message::ResyncData { offset, payload }),
        (any::<u64>(), 1..=MAX_DATA_BYTES as u32).prop_map(|(offset, len)| Message::ResyncZeroes { offset, len }),
        (any::<u64>(), any::<[u64; 4]>(), arb_position())
            .prop_map(|(current_uuid, history, position)| Message::ResyncDone { current_uuid, history, position }),
        (
            arb_purpose(),
            any::<u64>(),
            vec(any::<[u8; DIGEST_BYTES]>(), 1..64)
        )
            .prop_map(|(purpose, offset, digests)| Message::DigestRequest {
                purpose,
                offset,
                digests
            }),
        (
            arb_purpose(),
            any::<u64>(),
            1..=MAX_DIGESTS as u32,
            any::<u64>()
        )
            .prop_map(|(purpose, offset, blocks, seed)| Message::DigestReply {
                purpose,
                offset,
                blocks,
                differing: runs_within(blocks, seed),
            }),
        Just(Message::Ping),
        Just(Message::PingAck),
        (any::<(u64, u64)>(), arb_position())
            .prop_map(|((ballot, term), position)| Message::VoteRequest { ballot, term, position }),
        (any::<u64>(), any::<bool>()).prop_map(|(ballot, granted)| Message::Vote { ballot, granted }),
        // At most 256 chars of at most 4 bytes: within the 1024-byte limit.
        "\\PC{0,256}".prop_map(|reason| Message::Disconnect { reason }),
    ]
}

fn arb_purpose() -> impl Strategy<Value = DigestPurpose> {
    prop_oneof![Just(DigestPurpose::Verify), Just(DigestPurpose::Resync)]
}

/// Valid differing runs within `blocks` blocks, chosen by the bits of `seed`: each bit of the
/// seed marks whether one of up to 64 equal slices of the blocks differs.
fn runs_within(blocks: u32, seed: u64) -> Vec<(u32, u32)> {
    let slice = blocks.div_ceil(64).max(1);
    (0..64u32)
        .filter(|i| seed & (1 << i) != 0)
        .map(|i| (i * slice, slice))
        .filter(|(first, count)| first + count <= blocks)
        .collect()
}

/// Hands out one byte per call and an `Interrupted` error before every other byte, the
/// worst a blocking socket may legally do.
struct Trickle<'a> {
    bytes: &'a [u8],
    interrupt: bool,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.interrupt = !self.interrupt;
        if self.interrupt {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = buf.len().min(self.bytes.len()).min(1);
        buf[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        Ok(n)
    }
}

/// Accepts at most 3 bytes per write and has no vectored write, so every split of the
/// header/data pair in `write_message` is exercised.
struct ShortWrites(Vec<u8>);

impl Write for ShortWrites {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(3);
        self.0.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

proptest! {
    #[test]
    fn round_trip(msg in arb_message()) {
        let frame = encoded(&msg);
        let (decoded, used) = decode(&frame).expect("an encoded frame decodes");
        prop_assert_eq!(&decoded, &msg);
        prop_assert_eq!(used, frame.len());

        let mut written = Vec::new();
        write_message(&mut written, &msg).expect("writing to a Vec succeeds");
        prop_assert_eq!(&written, &frame, "write_message and encode produce one format");
        prop_assert_eq!(read_message(&mut written.as_slice()).expect("reads back"), msg);
    }

    #[test]
    fn stream_of_frames_through_short_io(msgs in vec(arb_message(), 1..8)) {
        let mut out = ShortWrites(Vec::new());
        for msg in &msgs {
            write_message(&mut out, msg).expect("short writes are retried");
        }
        let mut reader = Trickle { bytes: &out.0, interrupt: false };
        for msg in &msgs {
            prop_assert_eq!(&read_message(&mut reader).expect("frame reads"), msg);
        }
        prop_assert!(matches!(read_message(&mut reader), Err(WireError::Closed)));
    }

    /// Any changed byte outside magic and length (whose changes give their own errors) is
    /// caught by the crc, the header's type and flags included.
    #[test]
    fn flipped_byte_is_bad_crc(msg in arb_message(), pick in any::<prop::sample::Index>(), bit in 0..8u8) {
        let mut frame = encoded(&msg);
        let checked: Vec<usize> = (4..8).chain(12..frame.len()).collect();
        frame[*pick.get(&checked)] ^= 1 << bit;
        prop_assert!(matches!(decode(&frame), Err(WireError::BadCrc { .. })), "{:?}", decode(&frame));
    }

    #[test]
    fn decode_of_arbitrary_bytes_never_panics(bytes in vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes);
    }

    /// Arbitrary bytes rarely pass the magic and crc checks, so this wraps arbitrary payloads
    /// in valid headers of every known type to reach the payload decoders.
    #[test]
    fn decode_of_arbitrary_payload_never_panics(
        code in prop::sample::select(vec![
            0x01u16, 0x02, 0x03, 0x04, 0x05, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16,
            0x20, 0x21, 0x22, 0x23, 0x24, 0x30, 0x31, 0x32,
        ]),
        payload in vec(any::<u8>(), 0..256),
    ) {
        let frame = raw_frame(code, 0, &payload);
        if let Ok((msg, used)) = decode(&frame) {
            prop_assert_eq!(used, frame.len());
            // Whatever decodes must re-encode (only Hello may shed unknown trailing fields).
            let reencoded = encoded(&msg);
            if code != 0x01 {
                prop_assert_eq!(reencoded, frame);
            }
        }
    }
}

#[test]
fn header_layout_is_as_documented() {
    let frame = encoded(&Message::Barrier {
        epoch: 0x0102_0304_0506_0708,
    });
    assert_eq!(&frame[0..4], b"BLKR");
    assert_eq!(&frame[4..6], &[0x00, 0x12], "message type");
    assert_eq!(&frame[6..8], &[0, 0], "flags");
    assert_eq!(&frame[8..12], &[0, 0, 0, 8], "payload length");
    assert_eq!(
        &frame[16..],
        &[1, 2, 3, 4, 5, 6, 7, 8],
        "big-endian payload"
    );
    assert_eq!(
        frame,
        raw_frame(0x12, 0, &[1, 2, 3, 4, 5, 6, 7, 8]),
        "crc over header with zeroed crc, then payload"
    );
}

#[test]
fn payload_sizes_are_as_documented() {
    let state = PeerState {
        role: 0,
        disk: 0,
        flags: 0,
        current_uuid: 0,
        bitmap_uuid: 0,
        history: [0; 4],
        bitmap_weight: 0,
        primaries: 0,
        term: 0,
        data_position: DataPosition::default(),
        resynced_by: None,
        lagging: 0,
    };
    let cases: [(Message, usize); 23] = [
        (Message::Hello(hello("r0")), 91),
        (Message::AuthChallenge { nonce: [0; 32] }, 32),
        (Message::AuthResponse { mac: [0; 32] }, 32),
        (Message::State(state), 103),
        (
            Message::BitmapRuns {
                last: true,
                runs: vec![(1, 2), (5, 1)],
            },
            5 + 32,
        ),
        (data(4096), 25 + 4096),
        (
            Message::Zeroes {
                id: 1,
                epoch: 1,
                offset: 0,
                len: 4096,
                fua: false,
                discard: true,
            },
            30,
        ),
        (Message::RecvAck { id: 1 }, 8),
        (Message::WriteAck { id: 1 }, 8),
        (Message::NegAck { id: 1, errno: 5 }, 12),
        (Message::Barrier { epoch: 1 }, 8),
        (
            Message::BarrierAck {
                epoch: 1,
                writes: 3,
            },
            12,
        ),
        (
            Message::ResyncData {
                offset: 0,
                payload: Bytes::from_static(&[1; 512]),
            },
            8 + 512,
        ),
        (Message::ResyncZeroes { offset: 0, len: 1 << 20 }, 12),
        (
            Message::ResyncDone {
                current_uuid: 1,
                history: [2; 4],
                position: DataPosition { term: 3, epoch: 4, fua: 5 },
            },
            64,
        ),
        (Message::ThirdPeerBits { node: 2, runs: vec![(1, 2), (5, 1)] }, 5 + 32),
        (
            Message::DigestRequest {
                purpose: DigestPurpose::Verify,
                offset: 0,
                digests: vec![[0; 32]; 3],
            },
            9 + 3 * 32,
        ),
        (
            Message::DigestReply {
                purpose: DigestPurpose::Resync,
                offset: 0,
                blocks: 64,
                differing: vec![(1, 2), (9, 1)],
            },
            17 + 2 * 8,
        ),
        (Message::Ping, 0),
        (Message::PingAck, 0),
        (Message::VoteRequest { ballot: 7, term: 2, position: DataPosition { term: 1, epoch: 9, fua: 4 } }, 40),
        (Message::Vote { ballot: 7, granted: true }, 9),
        (
            Message::Disconnect {
                reason: "bye".into(),
            },
            3,
        ),
    ];
    for (msg, payload_len) in cases {
        assert_eq!(
            encoded(&msg).len(),
            HEADER_LEN + payload_len,
            "{}",
            msg.name()
        );
    }
}

#[test]
fn hello_layout_is_as_documented() {
    let frame = encoded(&Message::Hello(hello("r0")));
    let payload = &frame[HEADER_LEN..];
    assert_eq!(&payload[0..4], &PROTOCOL_VERSION.to_be_bytes());
    assert_eq!(payload[12], 2, "resource length");
    assert_eq!(&payload[13..15], b"r0");
    assert!(payload[15..76].iter().all(|b| *b == 0), "zero padding");
    assert_eq!(&payload[76..78], &[1, 2], "from_node, to_node");
    assert_eq!(
        &payload[86..90],
        &4096u32.to_be_bytes(),
        "bitmap_block_size"
    );
    assert_eq!(payload[90], b'C');
}

#[test]
fn control_messages_are_the_small_acks() {
    let control = [
        Message::RecvAck { id: 1 },
        Message::WriteAck { id: 1 },
        Message::NegAck { id: 1, errno: 5 },
        Message::BarrierAck {
            epoch: 1,
            writes: 1,
        },
        Message::DigestReply {
            purpose: DigestPurpose::Verify,
            offset: 0,
            blocks: 1,
            differing: vec![],
        },
        Message::Ping,
        Message::PingAck,
        Message::VoteRequest { ballot: 1, term: 1, position: DataPosition::default() },
        Message::Vote { ballot: 1, granted: false },
    ];
    let bulk = [
        data(1),
        Message::Barrier { epoch: 1 },
        Message::ResyncData {
            offset: 0,
            payload: Bytes::new(),
        },
        Message::ResyncZeroes { offset: 0, len: 1 },
        Message::Disconnect {
            reason: String::new(),
        },
        Message::Hello(hello("r0")),
        Message::DigestRequest {
            purpose: DigestPurpose::Resync,
            offset: 0,
            digests: vec![[0; 32]],
        },
    ];
    assert!(control.iter().all(Message::is_control));
    assert!(!bulk.iter().any(Message::is_control));
    assert_eq!(Message::NegAck { id: 1, errno: 5 }.name(), "NegAck");
}

#[test]
fn limits_are_inclusive() {
    let biggest = [
        data(MAX_DATA_BYTES),
        Message::Hello(hello(&"r".repeat(MAX_RESOURCE_BYTES))),
        Message::BitmapRuns {
            last: false,
            runs: vec![(u64::MAX, u64::MAX); MAX_BITMAP_RUNS],
        },
        Message::Disconnect {
            reason: "x".repeat(MAX_REASON_BYTES),
        },
        Message::DigestRequest {
            purpose: DigestPurpose::Resync,
            offset: u64::MAX,
            digests: vec![[0xff; DIGEST_BYTES]; MAX_DIGESTS],
        },
        Message::DigestReply {
            purpose: DigestPurpose::Verify,
            offset: u64::MAX,
            blocks: MAX_DIGESTS as u32,
            differing: (0..MAX_DIGESTS as u32 / 2).map(|i| (2 * i, 1)).collect(),
        },
    ];
    for msg in biggest {
        let frame = encoded(&msg);
        assert!(
            frame.len() - HEADER_LEN <= MAX_PAYLOAD as usize,
            "{}",
            msg.name()
        );
        assert_eq!(decode(&frame).expect("largest allowed decodes").0, msg);
    }
}

#[test]
fn bad_magic() {
    let mut frame = encoded(&Message::Ping);
    frame[0] = b'X';
    match decode(&frame) {
        Err(WireError::BadMagic { found }) => assert_eq!(found, u32::from_be_bytes(*b"XLKR")),
        other => panic!("expected BadMagic, got {other:?}"),
    }
}

#[test]
fn bad_crc_reports_both_values() {
    let mut frame = encoded(&Message::Barrier { epoch: 9 });
    let sent = u32::from_be_bytes([frame[12], frame[13], frame[14], frame[15]]);
    frame[HEADER_LEN] ^= 1;
    match decode(&frame) {
        Err(WireError::BadCrc { expected, found }) => {
            assert_eq!(expected, sent);
            assert_ne!(found, sent);
        }
        other => panic!("expected BadCrc, got {other:?}"),
    }
}

#[test]
fn truncated_frame_is_a_clean_error() {
    let frame = encoded(&data(100));
    assert!(matches!(
        read_message(&mut &frame[..0]),
        Err(WireError::Closed)
    ));
    for cut in 1..frame.len() {
        match read_message(&mut &frame[..cut]) {
            Err(WireError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {}
            other => panic!("cut at {cut}: expected UnexpectedEof, got {other:?}"),
        }
    }
}

/// The reader holds only the header: had the decoder tried to allocate and read the payload it
/// would report `UnexpectedEof`, not `TooLarge`.
#[test]
fn oversize_length_is_rejected_before_reading_the_payload() {
    for len in [MAX_PAYLOAD + 1, u32::MAX] {
        let mut header = raw_frame(0x10, 0, &[]);
        header[8..12].copy_from_slice(&len.to_be_bytes());
        match read_message(&mut header.as_slice()) {
            Err(WireError::TooLarge { len: found, max }) => {
                assert_eq!((found, max), (len, MAX_PAYLOAD))
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }
}

#[test]
fn unknown_type() {
    for code in [0x0000, 0x0006, 0x7777, 0xffff] {
        assert!(
            matches!(decode(&raw_frame(code, 0, &[])), Err(WireError::UnknownType(c)) if c == code)
        );
    }
}

#[test]
fn flags_the_link_did_not_agree_to_are_refused() {
    assert_eq!(
        malformed_reason(&raw_frame(0x30, 0x0001, &[])),
        "header flags set that this link did not agree to"
    );
}

/// The frame MACs of both directions of one authenticated link, as the dialer and the
/// acceptor hold them.
fn link_macs() -> ((Protection, Protection), (Protection, Protection)) {
    link_protection(None)
}

/// The same for a link whose TLS session exported `channel`, or a plain one.
pub(super) fn link_protection(channel: Option<[u8; 32]>) -> ((Protection, Protection), (Protection, Protection)) {
    use super::auth::{Role, Transcript};
    let t = Transcript { resource: "r0", dialer_nonce: [1; 32], acceptor_nonce: [2; 32], dialer: 1, acceptor: 0, channel };
    let secret = b"a shared secret of some length";
    (t.protection(secret, Role::Dialer), t.protection(secret, Role::Acceptor))
}

fn sealed(msgs: &[Message], mac: &mut Protection) -> Vec<u8> {
    let mut out = Vec::new();
    for msg in msgs {
        write_message_with(&mut out, msg, Some(mac)).unwrap();
    }
    out
}

#[test]
fn an_authenticated_link_reads_its_frames_in_order() {
    let ((mut dialer_tx, _), (_, mut acceptor_rx)) = link_macs();
    let data = Message::Data { id: 7, offset: 4096, epoch: 1, fua: true, payload: Bytes::from(vec![0x5a; 4096]) };
    let stream = sealed(&[Message::Ping, data.clone()], &mut dialer_tx);
    let mut reader = stream.as_slice();
    assert_eq!(read_message_with(&mut reader, Some(&mut acceptor_rx)).unwrap(), Message::Ping);
    assert_eq!(read_message_with(&mut reader, Some(&mut acceptor_rx)).unwrap(), data);
    assert!(reader.is_empty());
}

#[test]
fn a_frame_changed_dropped_replayed_or_unsealed_on_the_path_is_refused() {
    let ((mut dialer_tx, _), (_, acceptor_rx)) = link_macs();
    let first = sealed(&[Message::PingAck], &mut dialer_tx);
    let second = sealed(&[Message::Ping], &mut dialer_tx);
    let read = |bytes: &[u8]| read_message_with(&mut &bytes[..], Some(&mut acceptor_rx.clone()));
    // Changed: a byte of the payload flipped, the crc recomputed as an attacker would.
    let mut changed = sealed(&[Message::Disconnect { reason: "bye".into() }], &mut link_macs().0 .0);
    let payload_at = HEADER_LEN + 1;
    changed[payload_at] ^= 1;
    let crc_end = changed.len() - crate::wire::mac::FRAME_MAC_LEN;
    reseal(&mut changed[..crc_end]);
    assert!(matches!(read(&changed), Err(WireError::BadMac)), "changed");
    assert!(matches!(read(&second), Err(WireError::BadMac)), "the frame before it dropped");
    let replayed = [first.clone(), first.clone()].concat();
    let mut reader = replayed.as_slice();
    let mut rx = acceptor_rx.clone();
    assert!(read_message_with(&mut reader, Some(&mut rx)).is_ok());
    assert!(matches!(read_message_with(&mut reader, Some(&mut rx)), Err(WireError::BadMac)), "replayed");
    let unsealed = encoded(&Message::Ping);
    assert!(matches!(read(&unsealed), Err(WireError::Unprotected)), "injected without a MAC");
}

#[test]
fn a_tls_link_reads_its_frames_in_order_and_shows_no_byte_of_their_payload() {
    let ((mut dialer_tx, _), (_, mut acceptor_rx)) = link_protection(Some([9; 32]));
    let block: Vec<u8> = (0..4096u32).map(|i| (i * 7 + i / 256) as u8).collect();
    let data = Message::Data { id: 7, offset: 4096, epoch: 1, fua: true, payload: Bytes::from(block.clone()) };
    let reason = Message::Disconnect { reason: "a reason in clear".into() };
    let stream = sealed(&[data.clone(), reason.clone()], &mut dialer_tx);
    assert!(!stream.windows(16).any(|w| block.windows(16).any(|b| b == w)), "no 16 bytes of the data in clear");
    assert!(!stream.windows(6).any(|w| w == b"reason"));
    // Nor a crc of the payload an eavesdropper could test a guess of the data against.
    let crc_field = u32::from_be_bytes(stream[12..16].try_into().unwrap());
    let mut header = stream[..HEADER_LEN].to_vec();
    header[12..16].fill(0);
    assert_eq!(crc_field, crc32c::crc32c(&header), "the crc covers the header alone");
    let mut reader = stream.as_slice();
    assert_eq!(read_message_with(&mut reader, Some(&mut acceptor_rx)).unwrap(), data);
    assert_eq!(read_message_with(&mut reader, Some(&mut acceptor_rx)).unwrap(), reason);
    assert!(reader.is_empty());
}

#[test]
fn a_tls_frame_changed_dropped_replayed_injected_or_cut_on_the_path_is_refused() {
    let ((mut dialer_tx, _), (_, acceptor_rx)) = link_protection(Some([9; 32]));
    let first = sealed(&[Message::PingAck], &mut dialer_tx);
    let second = sealed(&[Message::Disconnect { reason: "bye".into() }], &mut dialer_tx);
    let read = |bytes: &[u8]| read_message_with(&mut &bytes[..], Some(&mut acceptor_rx.clone()));
    assert!(matches!(read(&second), Err(WireError::BadSeal)), "the frame before it dropped");
    for at in [HEADER_LEN, first.len() - 1] {
        let mut changed = first.clone();
        changed[at] ^= 1;
        assert!(matches!(read(&changed), Err(WireError::BadSeal)), "byte {at} flipped");
    }
    // The type in the header, with the header's crc recomputed as an attacker would.
    let mut retyped = sealed(&[Message::Ping], &mut link_protection(Some([9; 32])).0 .0);
    retyped[5] ^= 1;
    retyped[12..16].fill(0);
    let crc = crc32c::crc32c(&retyped[..HEADER_LEN]);
    retyped[12..16].copy_from_slice(&crc.to_be_bytes());
    assert!(matches!(read(&retyped), Err(WireError::BadSeal)), "the header is authenticated");
    let replayed = [first.clone(), first.clone()].concat();
    let mut reader = replayed.as_slice();
    let mut rx = acceptor_rx.clone();
    assert!(read_message_with(&mut reader, Some(&mut rx)).is_ok());
    assert!(matches!(read_message_with(&mut reader, Some(&mut rx)), Err(WireError::BadSeal)), "replayed");
    let clear = [encoded(&Message::Ping), first.clone()].concat();
    assert!(matches!(read(&clear), Err(WireError::Unprotected)), "injected in clear");
    let maced = sealed(&[Message::Ping], &mut link_macs().0 .0);
    assert!(matches!(read(&maced), Err(WireError::Unprotected)), "injected with a MAC");
    match read(&first[..first.len() - 1]) {
        Err(WireError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
        other => panic!("a frame cut short: {other:?}"),
    }
}

#[test]
fn malformed_hello() {
    let good = encoded(&Message::Hello(hello("r0")));
    let resource_len_at = HEADER_LEN + 12;
    let mutate = |at: usize, byte: u8| {
        let mut frame = good.clone();
        frame[at] = byte;
        reseal(&mut frame);
        malformed_reason(&frame)
    };
    assert_eq!(
        mutate(resource_len_at, 64),
        "resource name longer than 63 bytes"
    );
    assert_eq!(
        mutate(resource_len_at, 255),
        "resource name longer than 63 bytes"
    );
    assert_eq!(
        mutate(resource_len_at + 1 + 10, b'x'),
        "resource padding is not zero"
    );
    assert_eq!(
        mutate(resource_len_at + 1, 0xff),
        "resource name is not UTF-8"
    );
    assert_eq!(mutate(HEADER_LEN + 90, b'D'), "protocol is not A, B or C");
    assert_eq!(
        malformed_reason(&raw_frame(0x01, 0, &good[HEADER_LEN..HEADER_LEN + 90])),
        "payload too short"
    );
}

#[test]
fn hello_ignores_fields_a_later_version_appends() {
    let mut payload = encoded(&Message::Hello(hello("r0")))[HEADER_LEN..].to_vec();
    payload.extend_from_slice(&[0xee; 40]);
    let (msg, _) = decode(&raw_frame(0x01, 0, &payload)).expect("longer Hello decodes");
    assert_eq!(msg, Message::Hello(hello("r0")));
}

#[test]
fn bad_bool() {
    let data_fua_at = HEADER_LEN + 24;
    let zeroes_discard_at = HEADER_LEN + 29;
    let runs_last_at = HEADER_LEN;
    let cases = [
        (encoded(&data(8)), data_fua_at),
        (
            encoded(&Message::Zeroes {
                id: 1,
                epoch: 1,
                offset: 0,
                len: 8,
                fua: false,
                discard: false,
            }),
            zeroes_discard_at,
        ),
        (
            encoded(&Message::BitmapRuns {
                last: false,
                runs: vec![],
            }),
            runs_last_at,
        ),
    ];
    for (mut frame, at) in cases {
        frame[at] = 2;
        reseal(&mut frame);
        assert_eq!(malformed_reason(&frame), "bool is neither 0 nor 1");
    }
}

#[test]
fn runs_count_must_match_length() {
    let runs_payload = |count: u32, run_bytes: usize| {
        let mut payload = vec![1];
        payload.extend_from_slice(&count.to_be_bytes());
        payload.extend(std::iter::repeat_n(0, run_bytes));
        raw_frame(0x05, 0, &payload)
    };
    let reason = "run count does not match payload length";
    assert_eq!(malformed_reason(&runs_payload(3, 32)), reason);
    assert_eq!(malformed_reason(&runs_payload(1, 32)), reason);
    assert_eq!(malformed_reason(&runs_payload(2, 33)), reason);
    // A huge count with no runs behind it must not turn into a huge allocation.
    assert_eq!(malformed_reason(&runs_payload(u32::MAX, 0)), reason);
    // Within the frame limit but over the per-frame run limit.
    let too_many = MAX_BITMAP_RUNS as u32 + 1;
    assert_eq!(
        malformed_reason(&runs_payload(too_many, too_many as usize * 16)),
        "more than 65536 runs"
    );
}

#[test]
fn digest_layout_is_as_documented() {
    let frame = encoded(&Message::DigestReply {
        purpose: DigestPurpose::Verify,
        offset: 0x1000,
        blocks: 16,
        differing: vec![(3, 2)],
    });
    let payload = &frame[HEADER_LEN..];
    assert_eq!(&frame[4..6], &[0x00, 0x24]);
    assert_eq!(payload[0], 1, "purpose: verify");
    assert_eq!(&payload[1..9], &0x1000u64.to_be_bytes());
    assert_eq!(&payload[9..13], &16u32.to_be_bytes(), "blocks");
    assert_eq!(&payload[13..17], &1u32.to_be_bytes(), "run count");
    assert_eq!(&payload[17..25], &[0, 0, 0, 3, 0, 0, 0, 2]);
    let frame = encoded(&Message::DigestRequest {
        purpose: DigestPurpose::Resync,
        offset: 7,
        digests: vec![[0xab; 32]],
    });
    assert_eq!(&frame[4..6], &[0x00, 0x23]);
    assert_eq!(frame[HEADER_LEN], 2, "purpose: resync");
    assert_eq!(&frame[HEADER_LEN + 9..], &[0xab; 32]);
}

#[test]
fn malformed_digest_frames() {
    let request = |purpose: u8, digest_bytes: usize| {
        let mut payload = vec![purpose];
        payload.extend_from_slice(&0u64.to_be_bytes());
        payload.extend(std::iter::repeat_n(0, digest_bytes));
        raw_frame(0x23, 0, &payload)
    };
    assert_eq!(malformed_reason(&request(0, 32)), "unknown digest purpose");
    assert_eq!(malformed_reason(&request(3, 32)), "unknown digest purpose");
    assert_eq!(
        malformed_reason(&request(1, 33)),
        "digest bytes are not a multiple of 32"
    );
    assert_eq!(
        malformed_reason(&request(1, 0)),
        "digest count is not 1 to 4096"
    );
    assert_eq!(
        malformed_reason(&request(2, 32 * (MAX_DIGESTS + 1))),
        "digest count is not 1 to 4096"
    );

    let reply = |blocks: u32, runs: &[(u32, u32)], count: u32| {
        let mut payload = vec![1];
        payload.extend_from_slice(&0u64.to_be_bytes());
        payload.extend_from_slice(&blocks.to_be_bytes());
        payload.extend_from_slice(&count.to_be_bytes());
        for (first, n) in runs {
            payload.extend_from_slice(&first.to_be_bytes());
            payload.extend_from_slice(&n.to_be_bytes());
        }
        raw_frame(0x24, 0, &payload)
    };
    let bad_runs = "differing runs are empty, overlap, are out of order or pass the block count";
    assert_eq!(malformed_reason(&reply(8, &[(6, 3)], 1)), bad_runs);
    assert_eq!(malformed_reason(&reply(8, &[(2, 0)], 1)), bad_runs);
    assert_eq!(malformed_reason(&reply(8, &[(4, 2), (1, 1)], 2)), bad_runs);
    assert_eq!(malformed_reason(&reply(8, &[(1, 2), (2, 1)], 2)), bad_runs);
    assert_eq!(
        malformed_reason(&reply(u32::MAX, &[(u32::MAX - 1, 2)], 1)),
        "block count is not 1 to 4096"
    );
    assert_eq!(
        malformed_reason(&reply(0, &[], 0)),
        "block count is not 1 to 4096"
    );
    assert_eq!(
        malformed_reason(&reply(8, &[(1, 1)], 2)),
        "run count does not match payload length"
    );
    assert_eq!(
        malformed_reason(&reply(8, &[], u32::MAX)),
        "run count does not match payload length"
    );
    assert!(
        decode(&reply(8, &[(0, 1), (1, 7)], 2)).is_ok(),
        "touching runs are fine"
    );
}

#[test]
fn malformed_text() {
    let long = vec![b'x'; MAX_REASON_BYTES + 1];
    assert_eq!(
        malformed_reason(&raw_frame(0x32, 0, &long)),
        "reason longer than 1024 bytes"
    );
    assert_eq!(
        malformed_reason(&raw_frame(0x32, 0, &[0xc3])),
        "text is not UTF-8"
    );
}

#[test]
fn resync_zeroes_of_no_bytes_or_over_one_mib_are_malformed() {
    for len in [0, MAX_DATA_BYTES as u32 + 1] {
        let mut fields = 4096u64.to_be_bytes().to_vec();
        fields.extend_from_slice(&len.to_be_bytes());
        assert_eq!(malformed_reason(&raw_frame(0x26, 0, &fields)), "zeroes of no bytes or longer than 1 MiB", "{len}");
    }
}

#[test]
fn data_over_one_mib_is_malformed() {
    let payload = vec![0; 25 + MAX_DATA_BYTES + 1];
    assert_eq!(
        malformed_reason(&raw_frame(0x10, 0, &payload)),
        "data longer than 1 MiB"
    );
}

#[test]
fn wrong_payload_length() {
    assert_eq!(
        malformed_reason(&raw_frame(0x04, 0, &[0; 61])),
        "payload too short"
    );
    assert_eq!(
        malformed_reason(&raw_frame(0x12, 0, &[0; 7])),
        "payload too short"
    );
    assert_eq!(
        malformed_reason(&raw_frame(0x12, 0, &[0; 9])),
        "trailing bytes after the payload"
    );
    assert_eq!(
        malformed_reason(&raw_frame(0x30, 0, &[0])),
        "trailing bytes after the payload"
    );
    assert_eq!(
        malformed_reason(&raw_frame(0x02, 0, &[0; 31])),
        "payload too short"
    );
}

#[test]
fn sender_refuses_what_the_receiver_would_reject() {
    let refused = [
        data(MAX_DATA_BYTES + 1),
        Message::Hello(hello(&"r".repeat(MAX_RESOURCE_BYTES + 1))),
        Message::Hello(Hello {
            protocol: b'D',
            ..hello("r0")
        }),
        Message::BitmapRuns {
            last: true,
            runs: vec![(0, 1); MAX_BITMAP_RUNS + 1],
        },
        Message::Disconnect {
            reason: "x".repeat(MAX_REASON_BYTES + 1),
        },
        Message::DigestRequest {
            purpose: DigestPurpose::Verify,
            offset: 0,
            digests: vec![],
        },
        Message::DigestReply {
            purpose: DigestPurpose::Verify,
            offset: 0,
            blocks: 4,
            differing: vec![(3, 2)],
        },
    ];
    for msg in refused {
        let mut out = Vec::new();
        let err = write_message(&mut out, &msg).expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{}", msg.name());
        assert!(out.is_empty(), "nothing written for {}", msg.name());
    }
}

#[test]
#[should_panic(expected = "cannot encode Data: data longer than 1 MiB")]
fn encode_panics_on_a_message_the_receiver_would_reject() {
    encode(&data(MAX_DATA_BYTES + 1), &mut BytesMut::new());
}

#[test]
fn decode_reports_bytes_used_in_a_buffer_of_frames() {
    let mut buf = BytesMut::new();
    encode(&Message::Ping, &mut buf);
    encode(&data(10), &mut buf);
    let (first, used) = decode(&buf).expect("first");
    assert_eq!((first, used), (Message::Ping, HEADER_LEN));
    let (second, used2) = decode(&buf[used..]).expect("second");
    assert_eq!(second, data(10));
    assert_eq!(used + used2, buf.len());
}
