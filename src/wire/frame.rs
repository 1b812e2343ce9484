//! Frames: the fixed header, its checks, and reading and writing whole messages.
//!
//! Header (16 bytes, big-endian): magic u32, message type u16, flags u16, payload length u32,
//! crc32c u32. The crc covers the header with the crc field zeroed, then the payload, so a
//! corrupted type or length is caught as surely as corrupted data. On a link authenticated
//! with `transport = "plain"` (flag [`FLAG_MAC`]) a MAC follows the payload (see
//! [`super::mac::FrameMac`]): the crc catches what the network corrupts, the MAC what someone
//! on the path changes. On a TLS link (flag [`FLAG_SEALED`]) the payload is encrypted and a tag
//! follows it (see [`super::seal`]); the crc then covers the header only, since a crc of the
//! payload in clear would let an eavesdropper test guesses of it.

use std::io::{self, IoSlice, Read, Write};
use std::ops::Range;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::mac::FRAME_MAC_LEN;
use super::seal::{FrameSeal, Protection, SEAL_TAG_LEN};
use super::message::{Kind, Malformed, Message, MAX_DATA_BYTES};

/// First four bytes of every frame ("BLKR"): a stream that does not start with it is not a
/// blkrepl peer, or has lost its framing.
pub const MAGIC: u32 = u32::from_be_bytes(*b"BLKR");
/// Size of the frame header.
pub const HEADER_LEN: usize = 16;
/// Largest payload a receiver accepts: one maximal data chunk plus room for fixed fields.
/// Checked before the payload buffer is allocated, so a hostile length costs nothing.
pub const MAX_PAYLOAD: u32 = (MAX_DATA_BYTES + 64) as u32;

/// Header flag: a MAC of [`FRAME_MAC_LEN`] bytes follows the payload. Set on every frame of an
/// authenticated link, and on no other.
pub const FLAG_MAC: u16 = 1;
/// Header flag: the payload is encrypted and a tag of [`SEAL_TAG_LEN`] bytes follows it. Set
/// on every frame of a TLS link, and on no other.
pub const FLAG_SEALED: u16 = 2;

const LEN_RANGE: Range<usize> = 8..12;
const CRC_RANGE: Range<usize> = 12..16;

/// Why a frame could not be read. Every variant except `Io` and `Closed` means the peer sent
/// something this node will not act on: the connection is dropped with this as the logged
/// reason.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer closed the stream cleanly between frames.
    #[error("peer closed the connection")]
    Closed,
    /// The stream failed, or ended in the middle of a frame (`UnexpectedEof`).
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    #[error(
        "bad frame magic {found:#010x} (expected {:#010x}): not a blkrepl peer, or the stream lost its framing",
        MAGIC
    )]
    BadMagic { found: u32 },
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u32, max: u32 },
    /// `expected` is the crc the sender put in the header, `found` the crc of what arrived.
    #[error("frame crc mismatch: header says {expected:#010x}, frame hashes to {found:#010x} (corrupted in transit)")]
    BadCrc { expected: u32, found: u32 },
    #[error("unknown message type {0:#06x}")]
    UnknownType(u16),
    #[error("frame MAC does not verify: changed, injected, dropped or replayed on the way")]
    BadMac,
    #[error("frame without the protection (MAC or encryption) every frame of this link carries")]
    Unprotected,
    #[error("frame does not decrypt: changed, injected, dropped or replayed on the way")]
    BadSeal,
    #[error("malformed {msg_type} frame: {reason}")]
    Malformed {
        msg_type: &'static str,
        reason: &'static str,
    },
}

impl From<Malformed> for WireError {
    fn from(Malformed { msg_type, reason }: Malformed) -> WireError {
        WireError::Malformed { msg_type, reason }
    }
}

/// Writes one frame. The header and fixed fields go into one small buffer; the data of `Data`
/// and `ResyncData` is written from the message itself, never copied. Does not flush.
///
/// Refuses (with `InvalidInput`, before writing anything) a message the peer would reject as
/// malformed, such as more than 1 MiB of data or an over-long resource name.
pub fn write_message<W: Write>(w: &mut W, msg: &Message) -> io::Result<()> {
    write_message_with(w, msg, None)
}

/// [`write_message`] on a link whose frames are protected (`protection`: this direction's),
/// or not.
pub fn write_message_with<W: Write>(w: &mut W, msg: &Message, protection: Option<&mut Protection>) -> io::Result<()> {
    let mut head = BytesMut::with_capacity(HEADER_LEN + 128);
    let flags = match protection {
        None => 0,
        Some(Protection::Mac(_)) => FLAG_MAC,
        Some(Protection::Sealed(ref mut seal)) => return write_sealed(w, msg, seal, head),
    };
    let data = put_head(msg, &mut head, flags).map_err(|reason| cannot_send(msg, reason))?;
    write_both(w, &head, data)?;
    match protection {
        Some(Protection::Mac(mac)) => w.write_all(&mac.seal(&[&head, data])),
        _ => Ok(()),
    }
}

/// Writes `msg` encrypted: the whole frame is assembled in `frame` (the data has to be copied
/// once to be encrypted without changing the caller's), sealed in place, and written at once.
fn write_sealed<W: Write>(w: &mut W, msg: &Message, seal: &mut FrameSeal, mut frame: BytesMut) -> io::Result<()> {
    let data = put_head(msg, &mut frame, FLAG_SEALED).map_err(|reason| cannot_send(msg, reason))?;
    frame.reserve(data.len() + SEAL_TAG_LEN);
    frame.extend_from_slice(data);
    let (header, payload) = frame.split_at_mut(HEADER_LEN);
    let tag = seal.seal(header, payload);
    frame.extend_from_slice(&tag);
    w.write_all(&frame)
}

fn cannot_send(msg: &Message, reason: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("cannot send {}: {reason}", msg.name()))
}

/// Appends one whole frame to `out`.
///
/// # Panics
/// If `msg` breaks a limit the receiver enforces (see [`write_message`]): that is a bug in the
/// caller, which builds messages, not input.
pub fn encode(msg: &Message, out: &mut BytesMut) {
    match put_head(msg, out, 0) {
        Ok(data) => out.extend_from_slice(data),
        Err(reason) => panic!("cannot encode {}: {reason}", msg.name()),
    }
}

/// Reads one frame, blocking until it is complete, and checks it in this order: magic, length
/// (before allocating), crc, message type, header flags, payload.
///
/// A stream that ends before the first byte of a frame gives `Closed`; one that ends inside a
/// frame gives `Io` with `UnexpectedEof`.
pub fn read_message<R: Read>(r: &mut R) -> Result<Message, WireError> {
    read_message_with(r, None)
}

/// [`read_message`] on a link whose frames are protected (`protection`: this direction's), or
/// not: the MAC or the seal is checked after the crc, before the frame is decoded.
pub fn read_message_with<R: Read>(r: &mut R, protection: Option<&mut Protection>) -> Result<Message, WireError> {
    let header = read_header(r)?;
    let mut fields = &header[..];
    let magic = fields.get_u32();
    let code = fields.get_u16();
    let flags = fields.get_u16();
    let len = fields.get_u32();
    let expected = fields.get_u32();
    if magic != MAGIC {
        return Err(WireError::BadMagic { found: magic });
    }
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLarge {
            len,
            max: MAX_PAYLOAD,
        });
    }
    let sealed = matches!(protection, Some(Protection::Sealed(_)));
    let tag_len = if sealed { SEAL_TAG_LEN } else { 0 };
    // Filled through `take` + `read_to_end` rather than `read_exact` into a zeroed buffer:
    // skipping the zeroing makes reading a 4 KiB Data frame about a third cheaper.
    let mut payload = Vec::with_capacity(len as usize + tag_len);
    r.take(u64::from(len) + tag_len as u64).read_to_end(&mut payload)?;
    if payload.len() != len as usize + tag_len {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    let covered: &[u8] = if sealed { &[] } else { &payload };
    let found = frame_crc(&header, [covered, &[]]);
    if found != expected {
        return Err(WireError::BadCrc { expected, found });
    }
    match (&protection, flags) {
        (Some(Protection::Mac(_)), FLAG_MAC) | (Some(Protection::Sealed(_)), FLAG_SEALED) | (None, 0) => {}
        (Some(_), _) => return Err(WireError::Unprotected),
        // A flag this side did not agree to may change how the payload reads: refused rather
        // than ignored.
        (None, _) => {
            let kind = Kind::from_code(code).ok_or(WireError::UnknownType(code))?;
            return Err(WireError::Malformed { msg_type: kind.name(), reason: "header flags set that this link did not agree to" });
        }
    }
    match protection {
        Some(Protection::Mac(mac)) => {
            let mut tag = [0; FRAME_MAC_LEN];
            r.read_exact(&mut tag)?;
            if !mac.open(&[&header, &payload], &tag) {
                return Err(WireError::BadMac);
            }
        }
        Some(Protection::Sealed(seal)) => {
            let opened = seal.open(&header, &mut payload).ok_or(WireError::BadSeal)?;
            payload.truncate(opened);
        }
        None => {}
    }
    let kind = Kind::from_code(code).ok_or(WireError::UnknownType(code))?;
    Ok(Message::decode_fields(kind, Bytes::from(payload))?)
}

/// Reads the first frame in `frame`, returning it and the number of bytes it took. Errors as
/// [`read_message`] does: an empty input gives `Closed`, a partial frame `UnexpectedEof`.
pub fn decode(frame: &[u8]) -> Result<(Message, usize), WireError> {
    let mut rest = frame;
    let msg = read_message(&mut rest)?;
    Ok((msg, frame.len() - rest.len()))
}

/// Appends the header and fixed fields of `msg`, with length and crc filled in, and returns
/// the data that must follow them. Checks the limits first, so on error nothing is appended.
fn put_head<'m>(msg: &'m Message, out: &mut BytesMut, flags: u16) -> Result<&'m [u8], &'static str> {
    msg.check_limits()?;
    let start = out.len();
    out.put_u32(MAGIC);
    out.put_u16(msg.kind().code());
    out.put_u16(flags);
    out.put_u32(0); // payload length, set below
    out.put_u32(0); // crc, set below
    let data = msg.put_fields(out);
    let frame = &mut out[start..];
    let len = frame.len() - HEADER_LEN + data.len();
    debug_assert!(
        len <= MAX_PAYLOAD as usize,
        "check_limits keeps every payload in bounds"
    );
    frame[LEN_RANGE].copy_from_slice(&(len as u32).to_be_bytes());
    let (header, fields) = frame.split_at(HEADER_LEN);
    let crc = if flags == FLAG_SEALED { frame_crc(header, [&[], &[]]) } else { frame_crc(header, [fields, data]) };
    frame[CRC_RANGE].copy_from_slice(&crc.to_be_bytes());
    Ok(data)
}

/// The frame crc: crc32c over the header with its crc field taken as zero, then the payload,
/// which the sender holds in two pieces (fixed fields, data) and the receiver in one.
fn frame_crc(header: &[u8], payload: [&[u8]; 2]) -> u32 {
    let crc = crc32c::crc32c(&header[..CRC_RANGE.start]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    payload
        .iter()
        .fold(crc, |crc, part| crc32c::crc32c_append(crc, part))
}

/// Reads the header, telling a stream that ended cleanly between frames (`Closed`) from one
/// cut inside a frame (`UnexpectedEof`).
fn read_header<R: Read>(r: &mut R) -> Result<[u8; HEADER_LEN], WireError> {
    let mut header = [0; HEADER_LEN];
    let first = loop {
        match r.read(&mut header) {
            Ok(0) => return Err(WireError::Closed),
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    };
    r.read_exact(&mut header[first..])?;
    Ok(header)
}

/// Writes `head` then `data`, offering both to one `write_vectored` call so that a frame
/// usually costs one system call on a socket, without copying the data next to the header.
fn write_both<W: Write>(w: &mut W, mut head: &[u8], data: &[u8]) -> io::Result<()> {
    while !head.is_empty() {
        match w.write_vectored(&[IoSlice::new(head), IoSlice::new(data)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) if n < head.len() => head = &head[n..],
            Ok(n) => return w.write_all(&data[n - head.len()..]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    w.write_all(data)
}
