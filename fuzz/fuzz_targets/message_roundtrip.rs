//! A message payload, whatever it holds, in a frame whose header is right (magic, length and
//! crc32c computed here from PROTOCOL.md, independently of the codec), so that the fuzzer's
//! bytes reach each message's decoder. What decodes must encode back to the same frame, byte
//! for byte (the codec has one encoding per message), except a `Hello` carrying the fields of a
//! later version, which the decoder skips; and the re-encoded frame must decode to the same
//! message.
//!
//! Input: the message type (u16, big-endian), then the payload.
#![no_main]

use blkrepl::wire::{self, Message, HEADER_LEN, MAGIC, MAX_PAYLOAD};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

/// The frame PROTOCOL.md describes: header with flags 0, crc32c over the header with the crc
/// field zeroed, then the payload.
fn frame(msg_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&MAGIC.to_be_bytes());
    frame.extend_from_slice(&msg_type.to_be_bytes());
    frame.extend_from_slice(&0u16.to_be_bytes());
    let len = u32::try_from(payload.len()).expect("libFuzzer inputs are far below 4 GiB");
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&[0; 4]);
    frame.extend_from_slice(payload);
    let crc = crc32c::crc32c(&frame);
    frame[12..HEADER_LEN].copy_from_slice(&crc.to_be_bytes());
    frame
}

fuzz_target!(
    init: {
        blkrepl_fuzz::cap_allocations(2 * (HEADER_LEN + MAX_PAYLOAD as usize));
    },
    |data: &[u8]| {
        let Some((msg_type, payload)) = data.split_first_chunk::<2>() else { return };
        let original = frame(u16::from_be_bytes(*msg_type), payload);
        let Ok((msg, used)) = wire::decode(&original) else { return };
        assert_eq!(used, original.len());

        let mut encoded = BytesMut::new();
        wire::encode(&msg, &mut encoded);
        let later_hello_fields = matches!(msg, Message::Hello(_)) && encoded.len() < original.len();
        if !later_hello_fields {
            assert_eq!(&encoded[..], &original[..], "{msg:?} re-encodes differently");
        }
        let (again, used) = wire::decode(&encoded).expect("a re-encoded message decodes");
        assert_eq!(used, encoded.len());
        assert_eq!(again, msg);

        // The writer of the daemon's sockets sends the same bytes as `encode`.
        let mut written = Vec::new();
        wire::write_message(&mut written, &msg).expect("what decoded is within the limits");
        assert_eq!(&written[..], &encoded[..]);
    }
);
