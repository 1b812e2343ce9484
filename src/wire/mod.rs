//! The peer-to-peer wire format: frames, the messages they carry, and the authentication of
//! the handshake and of every frame after it.
//!
//! Encode/decode only: nothing here opens a socket, keeps connection state or decides what a
//! message means for replication (that is `core`'s job). The readers and writers are generic
//! `std::io` streams, so the same code serves TCP, tests and fuzzing. The byte layout is
//! specified in `docs/PROTOCOL.md`; the tests in `tests.rs` pin it.

pub mod auth;
pub mod mac;
mod frame;
mod message;
mod position;
mod receive;
pub mod seal;

#[cfg(test)]
mod tests;

pub use frame::{
    decode, encode, read_message, read_message_with, write_message, write_message_with, WireError, FLAG_MAC,
    FLAG_SEALED,    HEADER_LEN, MAGIC, MAX_PAYLOAD,
};
pub use message::{
    DigestPurpose, Hello, Message, PeerState, DIGEST_BYTES, MAX_BITMAP_RUNS, MAX_DATA_BYTES,
    MAX_DIGESTS, MAX_REASON_BYTES, MAX_RESOURCE_BYTES, RESYNC_ZEROES_BYTES, zero_bytes,
};
pub use position::DataPosition;
pub use receive::FrameReceiver;

/// The protocol version carried in [`Hello`]. Version 1 requires both sides to send the same
/// value; later versions may negotiate down.
pub const PROTOCOL_VERSION: u32 = 8;
