//! The transmission phase's requests, decoded from bytes in whatever pieces they arrive: the
//! sans-I/O half of a client connection. A reader that owns no socket (an event loop, issue 11)
//! has its receives fill the decoder's own buffer in place ([`RequestDecoder::lend`]), so a
//! WRITE's payload is the very memory the kernel copied it into, not a copy of it, and takes
//! decoded requests out; nothing here blocks, reads or allocates more than the request being
//! decoded and one receive hold.
//!
//! It applies the rules of [`request::validate`] in stream order: a refused WRITE's payload is
//! skipped so the next header is found where it starts, a payload too large to skip safely
//! ends the session after its refusal, and a header with the wrong magic means the framing is
//! lost (the session ends at once).

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};

use super::error::SessionError;
use super::protocol::{Errno, RequestHeader};
use super::request::{self, Command};
use super::Export;

/// The least room a receive is lent: a client's pipelined requests at once (32 writes of 4 KiB
/// with their headers fit twice), or a large payload's rest (then as much as it still needs).
const RECV_ROOM: usize = 256 << 10;

/// The smallest payload that stays in the receive's room rather than being copied out of it. A
/// payload keeps its whole allocation for as long as the write is in flight (a peer's send
/// queue included): a few KiB received alone would keep up to [`RECV_ROOM`], so small payloads
/// are copied into their own (as every payload was before receives in place), and only those
/// of at least half the room skip the copy. Such a payload keeps at most the allocation its
/// receive filled: the bytes buffered before it (part of the payload) and the room lent, at most
/// its size plus [`RECV_ROOM`], so at most three times its size.
const IN_PLACE_PAYLOAD: usize = RECV_ROOM / 2;

/// One request of the stream, in order.
#[derive(Debug)]
pub enum Decoded {
    /// A valid request; a WRITE carries its payload, every other command an empty one.
    Request { cookie: u64, command: Command, payload: Bytes },
    /// Refused; the session goes on.
    Refused { cookie: u64, errno: Errno, reason: &'static str },
    /// Refused, and the stream cannot be trusted afterwards: answer it, then end the session
    /// with `error`.
    Fatal { cookie: u64, errno: Errno, error: SessionError },
}

/// Where the decoder is in the stream.
#[derive(Debug)]
enum State {
    /// Waiting for a request header.
    Header,
    /// A valid WRITE's payload: `len` bytes.
    Payload { cookie: u64, command: Command, len: usize },
    /// A refused WRITE's payload still to skip, `left` bytes.
    Skip { left: usize },
    /// A fatal refusal or a framing error was returned: nothing more is decoded.
    Ended,
}

#[derive(Debug)]
pub struct RequestDecoder {
    state: State,
    /// Received and not yet decoded (or skipped).
    pending: BytesMut,
    /// `pending`'s spare room is lent to a receive: nothing may move or free it until
    /// [`RequestDecoder::filled`] or [`RequestDecoder::unfilled`].
    lent: bool,
}

impl Default for RequestDecoder {
    fn default() -> Self {
        RequestDecoder { state: State::Header, pending: BytesMut::new(), lent: false }
    }
}

impl RequestDecoder {
    /// Adds bytes as they came from the client (those a handshake read ahead, say).
    pub fn feed(&mut self, bytes: &[u8]) {
        debug_assert!(!self.lent, "bytes fed while a receive fills the room after them");
        if !matches!(self.state, State::Ended) {
            self.pending.extend_from_slice(bytes);
        }
    }

    /// Room after the bytes held for a receive to fill in place: at least what the request
    /// being decoded still needs, and at least [`RECV_ROOM`]. It stays where it is (decoding
    /// meanwhile neither moves nor frees it) until [`RequestDecoder::filled`] says how much
    /// the receive wrote, or [`RequestDecoder::unfilled`] that it wrote nothing.
    pub fn lend(&mut self) -> &mut [MaybeUninit<u8>] {
        if !self.lent {
            self.pending.reserve(self.needed().saturating_sub(self.pending.len()).max(RECV_ROOM));
            self.lent = true;
        }
        self.pending.spare_capacity_mut()
    }

    /// The receive wrote the first `n` bytes of the room [`RequestDecoder::lend`] gave.
    ///
    /// # Safety
    /// Those `n` bytes were written since that room was lent.
    pub unsafe fn filled(&mut self, n: usize) {
        assert!(self.lent, "filled without a loan");
        self.lent = false;
        if matches!(self.state, State::Ended) {
            // The session is over: what arrived is not decoded.
            return;
        }
        assert!(n <= self.pending.capacity() - self.pending.len(), "filled past the room lent");
        // SAFETY: the room lent is `pending`'s spare capacity, unmoved since (see `lent`), and
        // the caller vouches that its first `n` bytes were written.
        unsafe { self.pending.set_len(self.pending.len() + n) };
    }

    /// The receive the room was lent to ended without writing to it.
    pub fn unfilled(&mut self) {
        self.lent = false;
    }

    /// Bytes received and not yet decoded: what the caller's receive bound counts.
    pub fn buffered(&self) -> usize {
        self.pending.len()
    }

    /// Bytes the request being decoded still needs in the buffer: a bound on input that stops
    /// below it would wait forever for a large WRITE's payload.
    pub fn needed(&self) -> usize {
        match self.state {
            State::Payload { len, .. } => len,
            State::Header => RequestHeader::LEN,
            State::Skip { .. } | State::Ended => 0,
        }
    }

    /// The next complete request, if the bytes fed so far hold one. A header with the wrong
    /// magic is an error, after which nothing more is decoded.
    pub fn next(&mut self, export: &Export) -> Result<Option<Decoded>, SessionError> {
        loop {
            match self.state {
                State::Ended => return Ok(None),
                State::Skip { left } => {
                    let n = left.min(self.pending.len());
                    self.pending.advance(n);
                    if n < left {
                        self.state = State::Skip { left: left - n };
                        return Ok(None);
                    }
                    self.state = State::Header;
                }
                State::Payload { cookie, command, len } => {
                    if self.pending.len() < len {
                        // Room for the rest in one allocation, not one per piece (a loan
                        // made it already, and must not be moved).
                        if !self.lent {
                            self.pending.reserve(len - self.pending.len());
                        }
                        return Ok(None);
                    }
                    let payload = if len >= IN_PLACE_PAYLOAD {
                        self.pending.split_to(len).freeze()
                    } else {
                        let payload = Bytes::copy_from_slice(&self.pending[..len]);
                        self.pending.advance(len);
                        payload
                    };
                    self.state = State::Header;
                    return Ok(Some(Decoded::Request { cookie, command, payload }));
                }
                State::Header => {
                    if self.pending.len() < RequestHeader::LEN {
                        return Ok(None);
                    }
                    let mut raw = [0; RequestHeader::LEN];
                    raw.copy_from_slice(&self.pending[..RequestHeader::LEN]);
                    let header = match RequestHeader::parse(&raw) {
                        Ok(header) => header,
                        Err(e) => {
                            self.end();
                            return Err(e);
                        }
                    };
                    self.pending.advance(RequestHeader::LEN);
                    if let Some(decoded) = self.after_header(&header, export) {
                        return Ok(Some(decoded));
                    }
                    // A WRITE: its payload next.
                }
            }
        }
    }

    /// What a parsed header leads to: `None` for a valid WRITE, whose payload comes next (the
    /// state says how long it is).
    fn after_header(&mut self, header: &RequestHeader, export: &Export) -> Option<Decoded> {
        let cookie = header.cookie;
        Some(match request::validate(header, export) {
            Ok(command @ Command::Write { len, .. }) => {
                self.state = State::Payload { cookie, command, len: len as usize };
                return None;
            }
            Ok(command) => Decoded::Request { cookie, command, payload: Bytes::new() },
            Err(rejection) if rejection.fatal => {
                self.end();
                let error = SessionError::OversizedRequest { kind: header.kind, len: header.len };
                Decoded::Fatal { cookie, errno: rejection.errno, error }
            }
            Err(rejection) => {
                self.state = State::Skip { left: header.payload_len() as usize };
                Decoded::Refused { cookie, errno: rejection.errno, reason: rejection.reason }
            }
        })
    }

    fn end(&mut self) {
        self.state = State::Ended;
        if self.lent {
            // A receive still writes into the room after these bytes: the buffer lives on.
            self.pending.clear();
        } else {
            self.pending = BytesMut::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::nbd::protocol::{self as p};
    use proptest::prelude::*;

    const SIZE: u64 = 1 << 20;

    fn export() -> Export {
        Export { name: "disk".into(), size: SIZE, block_size: 512 }
    }

    fn header(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        RequestHeader { flags, kind, cookie, offset, len }.encode()
    }

    fn write(cookie: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
        let mut w = header(p::CMD_WRITE, 0, cookie, offset, payload.len() as u32);
        w.extend_from_slice(payload);
        w
    }

    /// A stream of good and refused requests, and what each decodes to (as text, to compare).
    fn stream() -> (Vec<u8>, Vec<String>) {
        let mut bytes = Vec::new();
        bytes.extend(write(1, 0, &[0xAA; 4096]));
        bytes.extend(header(p::CMD_READ, 0, 2, 512, 1024));
        // Out of bounds: refused, its payload skipped.
        bytes.extend(write(3, SIZE, &[0xBB; 512]));
        bytes.extend(header(p::CMD_FLUSH, 0, 4, 0, 0));
        bytes.extend(header(p::CMD_WRITE_ZEROES, p::CMD_FLAG_FUA, 5, 4096, 8192));
        bytes.extend(write(6, 8192, &[0xCC; 1024]));
        bytes.extend(header(p::CMD_DISC, 0, 7, 0, 0));
        let expected = vec![
            format!("request 1 {:?} {}", Command::Write { offset: 0, len: 4096, fua: false }, "aa*4096"),
            format!("request 2 {:?} -", Command::Read { offset: 512, len: 1024 }),
            "refused 3".to_owned(),
            format!("request 4 {:?} -", Command::Flush),
            format!("request 5 {:?} -", Command::WriteZeroes { offset: 4096, len: 8192, fua: true }),
            format!("request 6 {:?} {}", Command::Write { offset: 8192, len: 1024, fua: false }, "cc*1024"),
            format!("request 7 {:?} -", Command::Disconnect),
        ];
        (bytes, expected)
    }

    fn describe(decoded: &Decoded) -> String {
        match decoded {
            Decoded::Request { cookie, command, payload } if payload.is_empty() => format!("request {cookie} {command:?} -"),
            Decoded::Request { cookie, command, payload } => {
                assert!(payload.iter().all(|b| *b == payload[0]), "a payload of one byte value");
                format!("request {cookie} {command:?} {:02x}*{}", payload[0], payload.len())
            }
            Decoded::Refused { cookie, .. } => format!("refused {cookie}"),
            Decoded::Fatal { cookie, .. } => format!("fatal {cookie}"),
        }
    }

    /// Feeds `bytes` in pieces cut at `cuts` and collects what comes out.
    fn decode_in_pieces(bytes: &[u8], cuts: &[usize]) -> Vec<String> {
        let mut decoder = RequestDecoder::default();
        let mut out = Vec::new();
        let mut start = 0;
        let mut ends: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        ends.push(bytes.len());
        ends.sort_unstable();
        for end in ends {
            decoder.feed(&bytes[start..end.max(start)]);
            start = end.max(start);
            while let Some(decoded) = decoder.next(&export()).expect("no framing error") {
                out.push(describe(&decoded));
            }
        }
        assert_eq!(decoder.buffered(), 0, "everything fed was decoded or skipped");
        out
    }

    /// Has `bytes` arrive as receives into the room the decoder lends, each at most `cuts`
    /// apart (and never more than the room), decoding as the event loop does: also while a
    /// receive holds the room.
    fn decode_in_place(bytes: &[u8], cuts: &[usize]) -> Vec<String> {
        let mut decoder = RequestDecoder::default();
        let mut out = Vec::new();
        let mut ends: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        ends.push(bytes.len());
        ends.sort_unstable();
        let mut start = 0;
        for end in ends {
            while start < end {
                let room = decoder.lend();
                let n = (end - start).min(room.len());
                // Decoding goes on while the receive is armed; the room must stay put.
                let before = decoder.lend().as_ptr();
                while let Some(decoded) = decoder.next(&export()).expect("no framing error") {
                    out.push(describe(&decoded));
                }
                let room = decoder.lend();
                assert_eq!(room.as_ptr(), before, "decoding moved the room lent to a receive");
                for (slot, byte) in room.iter_mut().zip(&bytes[start..start + n]) {
                    slot.write(*byte);
                }
                // SAFETY: the first `n` bytes of the room were just written.
                unsafe { decoder.filled(n) };
                start += n;
            }
            while let Some(decoded) = decoder.next(&export()).expect("no framing error") {
                out.push(describe(&decoded));
            }
        }
        assert_eq!(decoder.buffered(), 0, "everything received was decoded or skipped");
        out
    }

    #[test]
    fn receives_in_place_decode_the_same_and_a_payload_is_the_received_memory() {
        let (bytes, expected) = stream();
        assert_eq!(decode_in_place(&bytes, &[]), expected);
        let cuts: Vec<usize> = (0..bytes.len()).step_by(7).collect();
        assert_eq!(decode_in_place(&bytes, &cuts), expected);
        // A large payload is received into the room lent, not copied out of it.
        let mut decoder = RequestDecoder::default();
        let w = write(1, 0, &[9; 256 << 10]);
        decoder.feed(&w[..RequestHeader::LEN]);
        assert!(matches!(decoder.next(&export()), Ok(None)));
        let room = decoder.lend();
        assert!(room.len() >= 256 << 10, "room for the whole payload in one receive");
        let at = room.as_ptr() as usize;
        for (slot, byte) in room.iter_mut().zip(&w[RequestHeader::LEN..]) {
            slot.write(*byte);
        }
        // SAFETY: the payload's bytes were just written.
        unsafe { decoder.filled(256 << 10) };
        let Ok(Some(Decoded::Request { payload, .. })) = decoder.next(&export()) else { panic!() };
        assert_eq!(payload.as_ptr() as usize, at, "the payload is where the receive put it");
        assert!(payload.iter().all(|b| *b == 9));
        // A small payload is copied out: it does not keep the room's allocation.
        let w = write(2, 0, &[8; 4096]);
        let room = decoder.lend();
        let at = room.as_ptr() as usize;
        for (slot, byte) in room.iter_mut().zip(&w) {
            slot.write(*byte);
        }
        // SAFETY: the request's bytes were just written.
        unsafe { decoder.filled(w.len()) };
        let Ok(Some(Decoded::Request { payload, .. })) = decoder.next(&export()) else { panic!() };
        assert_eq!(&payload[..], &[8; 4096][..]);
        let payload_at = payload.as_ptr() as usize;
        assert!(!(at..at + RECV_ROOM).contains(&payload_at), "a small payload has its own allocation");
    }

    /// A decoder fed a READ header whose magic is wrong.
    fn fed_a_wrong_magic() -> RequestDecoder {
        let mut decoder = RequestDecoder::default();
        let mut bad = header(p::CMD_READ, 0, 1, 0, 512);
        bad[0] ^= 0xFF;
        decoder.feed(&bad);
        decoder
    }

    #[test]
    fn a_framing_error_while_a_receive_holds_the_room_keeps_the_room_alive_and_ignores_what_arrives() {
        let mut decoder = fed_a_wrong_magic();
        let room = decoder.lend();
        let at = room.as_ptr();
        assert!(matches!(decoder.next(&export()), Err(SessionError::BadRequestMagic(_))));
        // The receive still completes into the room lent, which must still be the decoder's:
        // the buffer was emptied, not freed (the room now starts where the bad header was).
        let room = decoder.lend();
        assert_eq!(room.as_ptr(), at.wrapping_sub(RequestHeader::LEN), "the buffer was kept");
        // What the receive writes where the room was lent, a good header, is not decoded.
        let good = header(p::CMD_READ, 0, 2, 0, 512);
        for (slot, byte) in room.iter_mut().skip(RequestHeader::LEN).zip(&good) {
            slot.write(*byte);
        }
        // SAFETY: the first LEN bytes of the room lent were written above.
        unsafe { decoder.filled(RequestHeader::LEN) };
        assert!(matches!(decoder.next(&export()), Ok(None)));
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn a_stream_decodes_in_order_with_refused_payloads_skipped() {
        let (bytes, expected) = stream();
        assert_eq!(decode_in_pieces(&bytes, &[]), expected);
    }

    proptest! {
        /// However the stream is cut into pieces (one byte at a time included), fed or received
        /// in place, the same requests come out.
        #[test]
        fn any_split_decodes_the_same(cuts in proptest::collection::vec(0usize..20_000, 0..40)) {
            let (bytes, expected) = stream();
            prop_assert_eq!(decode_in_pieces(&bytes, &cuts), expected.clone());
            prop_assert_eq!(decode_in_place(&bytes, &cuts), expected);
        }
    }

    #[test]
    fn byte_by_byte_decodes_the_same() {
        let (bytes, expected) = stream();
        let cuts: Vec<usize> = (0..bytes.len()).collect();
        assert_eq!(decode_in_pieces(&bytes, &cuts), expected);
    }

    #[test]
    fn a_wrong_magic_ends_the_session_and_nothing_more_is_decoded() {
        let mut decoder = fed_a_wrong_magic();
        decoder.feed(&header(p::CMD_READ, 0, 2, 0, 512));
        assert!(matches!(decoder.next(&export()), Err(SessionError::BadRequestMagic(_))));
        assert!(matches!(decoder.next(&export()), Ok(None)));
        decoder.feed(&header(p::CMD_READ, 0, 3, 0, 512));
        assert!(matches!(decoder.next(&export()), Ok(None)));
        assert_eq!(decoder.buffered(), 0, "an ended session holds nothing");
    }

    #[test]
    fn an_oversized_write_is_refused_fatally_before_its_payload() {
        let mut decoder = RequestDecoder::default();
        decoder.feed(&header(p::CMD_WRITE, 0, 9, 0, p::MAX_PAYLOAD + 512));
        match decoder.next(&export()) {
            Ok(Some(Decoded::Fatal { cookie: 9, errno, error: SessionError::OversizedRequest { .. } })) => {
                assert_ne!(errno as u32, 0);
            }
            other => panic!("{other:?}"),
        }
        decoder.feed(&[0; 4096]);
        assert!(matches!(decoder.next(&export()), Ok(None)));
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn a_partial_write_waits_for_its_payload() {
        let mut decoder = RequestDecoder::default();
        let w = write(1, 0, &[7; 2048]);
        decoder.feed(&w[..RequestHeader::LEN + 1000]);
        assert!(matches!(decoder.next(&export()), Ok(None)));
        decoder.feed(&w[RequestHeader::LEN + 1000..]);
        let Ok(Some(Decoded::Request { cookie: 1, payload, .. })) = decoder.next(&export()) else { panic!() };
        assert_eq!(&payload[..], &[7; 2048][..]);
    }
}
