//! One client connection's transmission phase without a socket or a thread: bytes received go
//! in, requests to submit come out under the client's in-flight bounds, completions go in, and
//! the reply bytes to send come out in completion order. An event loop (issue 11) carries the
//! bytes; the rules are here: the bounds of `inflight` (a request's share is released once its
//! reply is sent, as the threaded frontend's permit is), a READ answered with exactly its
//! length or an error, refusals answered in stream order, the session's end.

use std::collections::{HashMap, VecDeque};
use std::mem::MaybeUninit;

use bytes::{Buf, Bytes};

use super::decoder::{Decoded, RequestDecoder};
use super::error::SessionError;
use super::inflight::{MAX_BYTES, MAX_REQUESTS};
use super::protocol::{simple_reply, Errno};
use super::request::Command;
use super::Export;
use crate::frontend::{BlockRequest, BlockResult};

/// Received bytes the connection holds before it stops asking for more: a few requests'
/// worth beyond the one being decoded (whose payload may be up to `MAX_PAYLOAD`).
const READ_AHEAD: usize = 256 << 10;

/// A piece of a reply waiting to be sent (its header, a READ's data: sent as they are, without
/// a copy); the last piece of a reply releases the reply's load once it is sent.
#[derive(Debug)]
struct Outgoing {
    bytes: Bytes,
    last: bool,
    load: u64,
}

#[derive(Debug)]
pub struct Connection {
    export: Export,
    decoder: RequestDecoder,
    /// Decoded but not yet admitted under the bounds.
    held: Option<Decoded>,
    /// Submitted and not yet answered: the READs among them with their length.
    submitted: HashMap<u64, (Option<u32>, u64)>,
    /// Requests and bytes counted against the bounds: submitted, or answered and unsent.
    requests: usize,
    bytes: u64,
    out: VecDeque<Outgoing>,
    /// Why the session ends, once it does (a disconnect is `None` here and `ended` set).
    ended: bool,
    /// Nothing can be sent any more (see [`Connection::broken`]).
    dead: bool,
    error: Option<SessionError>,
}

impl Connection {
    pub fn new(export: Export) -> Connection {
        Connection {
            export,
            decoder: RequestDecoder::default(),
            held: None,
            submitted: HashMap::new(),
            requests: 0,
            bytes: 0,
            out: VecDeque::new(),
            ended: false,
            dead: false,
            error: None,
        }
    }

    /// Whether the socket should be read: not after the session ended, nor while a decoded
    /// request waits for room or enough is buffered (back-pressure on a client that pipelines
    /// faster than the device completes).
    pub fn wants_input(&self) -> bool {
        !self.ended && self.held.is_none() && self.decoder.buffered() < READ_AHEAD.max(self.decoder.needed())
    }

    /// Bytes the client sent, read elsewhere (by the handshake).
    pub fn received(&mut self, bytes: &[u8]) {
        self.decoder.feed(bytes);
    }

    /// Where the next receive puts what the client sends: the decoder's own buffer, so a
    /// WRITE's payload is not copied again (see [`RequestDecoder::lend`]). It stays in place
    /// until [`Connection::received_in_place`] or [`Connection::input_closed`].
    pub fn recv_space(&mut self) -> &mut [MaybeUninit<u8>] {
        self.decoder.lend()
    }

    /// The receive wrote `n` bytes into [`Connection::recv_space`].
    ///
    /// # Safety
    /// As [`RequestDecoder::filled`]: those `n` bytes were written.
    pub unsafe fn received_in_place(&mut self, n: usize) {
        // SAFETY: passed on from the caller.
        unsafe { self.decoder.filled(n) }
    }

    /// The next request to submit under the bounds, with its cookie; refusals are answered on
    /// the way (their replies join the outgoing queue).
    pub fn next_request(&mut self) -> Option<(u64, BlockRequest)> {
        loop {
            let decoded = match self.held.take() {
                Some(decoded) => decoded,
                None if self.ended => return None,
                None => match self.decoder.next(&self.export) {
                    Ok(Some(decoded)) => decoded,
                    Ok(None) => return None,
                    Err(error) => {
                        self.end(Some(error));
                        return None;
                    }
                },
            };
            let load = load_of(&decoded);
            if !self.fits(load) {
                self.held = Some(decoded);
                return None;
            }
            match decoded {
                Decoded::Request { command: Command::Disconnect, .. } => self.end(None),
                Decoded::Request { cookie, command, payload } => {
                    self.admit(load);
                    let read_len = match command {
                        Command::Read { len, .. } => Some(len),
                        _ => None,
                    };
                    self.submitted.insert(cookie, (read_len, load));
                    return Some((cookie, block_request(command, payload)));
                }
                Decoded::Refused { cookie, errno, reason } => {
                    tracing::debug!(cookie, ?errno, reason, "refused NBD request");
                    self.admit(0);
                    self.queue_reply(cookie, Err(errno), 0);
                }
                Decoded::Fatal { cookie, errno, error } => {
                    self.admit(0);
                    self.queue_reply(cookie, Err(errno), 0);
                    self.end(Some(error));
                }
            }
        }
    }

    /// Request `cookie` completed; its reply joins the outgoing queue. A cookie not in flight
    /// (answered already) is ignored.
    pub fn completed(&mut self, cookie: u64, result: BlockResult) {
        let Some((read_len, load)) = self.submitted.remove(&cookie) else { return };
        let outcome = match (result, read_len) {
            (Ok(Some(data)), Some(len)) if data.len() == len as usize => Ok(data),
            (Ok(_), None) => Ok(Bytes::new()),
            // A wrong length would desynchronize the client: the read fails instead.
            (Ok(_), Some(_)) => Err(Errno::Io),
            (Err(error), _) => Err(Errno::from(&error)),
        };
        self.queue_reply(cookie, outcome, load);
    }

    /// The reply bytes to send next, in order (empty when there are none).
    pub fn to_send(&self) -> impl Iterator<Item = &[u8]> {
        self.out.iter().map(|o| &o.bytes[..])
    }

    /// `n` bytes of [`Connection::to_send`] went out; fully sent replies release their load.
    pub fn sent(&mut self, mut n: usize) {
        while n > 0 {
            let front = self.out.front_mut().expect("sent no more than was queued");
            let step = n.min(front.bytes.len());
            front.bytes.advance(step);
            n -= step;
            if front.bytes.is_empty() {
                let done = self.out.pop_front().expect("front");
                if done.last {
                    self.requests -= 1;
                    self.bytes -= done.load;
                }
            }
        }
    }

    /// The session is over and everything owed to the client went out: the socket may close.
    /// Requests still in flight are answered first, as the protocol asks of a disconnect.
    pub fn finished(&self) -> bool {
        self.ended && self.submitted.is_empty() && self.out.is_empty()
    }

    /// The client closed its side: nothing more is decoded; what is in flight is still
    /// answered (a client may half-close and read on).
    pub fn input_closed(&mut self) {
        self.decoder.unfilled();
        self.end(None);
    }

    /// The socket failed: nothing more can be sent. Replies queued or still to come are
    /// dropped; the connection finishes once the device has answered what is in flight.
    pub fn broken(&mut self) {
        self.end(None);
        self.dead = true;
        for dropped in self.out.drain(..) {
            if dropped.last {
                self.requests -= 1;
                self.bytes -= dropped.load;
            }
        }
    }

    /// Why the session ended, if the client broke the protocol (a disconnect is no error).
    pub fn error(&self) -> Option<&SessionError> {
        self.error.as_ref()
    }

    fn fits(&self, load: u64) -> bool {
        self.requests == 0 || (self.requests < MAX_REQUESTS && self.bytes + load <= MAX_BYTES)
    }

    fn admit(&mut self, load: u64) {
        self.requests += 1;
        self.bytes += load;
    }

    fn queue_reply(&mut self, cookie: u64, outcome: Result<Bytes, Errno>, load: u64) {
        if self.dead {
            self.requests -= 1;
            self.bytes -= load;
            return;
        }
        let (error, data) = match outcome {
            Ok(data) => (None, data),
            Err(errno) => (Some(errno), Bytes::new()),
        };
        let header = Bytes::copy_from_slice(&simple_reply(error, cookie));
        let with_data = !data.is_empty();
        self.out.push_back(Outgoing { bytes: header, last: !with_data, load });
        if with_data {
            self.out.push_back(Outgoing { bytes: data, last: true, load });
        }
    }

    fn end(&mut self, error: Option<SessionError>) {
        self.ended = true;
        self.held = None;
        if self.error.is_none() {
            self.error = error;
        }
    }
}

/// The bytes a request counts against the client's bounds: a READ's length, a WRITE's payload.
fn load_of(decoded: &Decoded) -> u64 {
    match decoded {
        Decoded::Request { command: Command::Read { len, .. }, .. } => u64::from(*len),
        Decoded::Request { payload, .. } => payload.len() as u64,
        Decoded::Refused { .. } | Decoded::Fatal { .. } => 0,
    }
}

fn block_request(command: Command, payload: Bytes) -> BlockRequest {
    match command {
        Command::Read { offset, len } => BlockRequest::Read { offset, len },
        Command::Write { offset, fua, .. } => BlockRequest::Write { offset, data: payload, fua },
        Command::Flush => BlockRequest::Flush,
        // A discard's content is unspecified afterwards, so FUA on TRIM adds nothing.
        Command::Trim { offset, len } => BlockRequest::Discard { offset, len },
        Command::WriteZeroes { offset, len, fua } => BlockRequest::WriteZeroes { offset, len, fua },
        Command::Disconnect => unreachable!("a disconnect ends the session, it is not submitted"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::nbd::protocol::{self as p};
    use crate::frontend::BlockError;

    const SIZE: u64 = 1 << 30;

    fn connection() -> Connection {
        Connection::new(Export { name: "disk".into(), size: SIZE, block_size: 512 })
    }

    fn header(kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        p::RequestHeader { flags: 0, kind, cookie, offset, len }.encode()
    }

    /// Everything queued to send, sent; returns it.
    fn drain(c: &mut Connection) -> Vec<u8> {
        let bytes: Vec<u8> = c.to_send().flatten().copied().collect();
        c.sent(bytes.len());
        bytes
    }

    /// (error, cookie) of each simple reply in `bytes`, skipping `data_len` bytes after a
    /// successful one when asked.
    fn replies(bytes: &[u8]) -> Vec<(u32, u64)> {
        bytes.chunks(16).map(|r| (u32::from_be_bytes(r[4..8].try_into().unwrap()), u64::from_be_bytes(r[8..16].try_into().unwrap()))).collect()
    }

    #[test]
    fn requests_are_submitted_and_answered_in_completion_order() {
        let mut c = connection();
        let mut w = header(p::CMD_WRITE, 1, 0, 4096);
        w.extend_from_slice(&[9; 4096]);
        c.received(&w);
        c.received(&header(p::CMD_FLUSH, 2, 0, 0));
        let Some((1, BlockRequest::Write { offset: 0, data, fua: false })) = c.next_request() else { panic!() };
        assert_eq!(&data[..], &[9; 4096][..]);
        assert!(matches!(c.next_request(), Some((2, BlockRequest::Flush))));
        assert!(c.next_request().is_none());
        c.completed(2, Ok(None));
        c.completed(1, Err(BlockError::NoSpace));
        assert_eq!(replies(&drain(&mut c)), vec![(0, 2), (Errno::NoSpc as u32, 1)]);
        assert_eq!((c.requests, c.bytes), (0, 0), "sent replies release their load");
    }

    #[test]
    fn a_read_is_answered_with_its_data_or_an_error_for_a_wrong_length() {
        let mut c = connection();
        c.received(&header(p::CMD_READ, 1, 0, 1024));
        c.received(&header(p::CMD_READ, 2, 1024, 1024));
        assert!(matches!(c.next_request(), Some((1, BlockRequest::Read { offset: 0, len: 1024 }))));
        assert!(matches!(c.next_request(), Some((2, BlockRequest::Read { offset: 1024, len: 1024 }))));
        c.completed(1, Ok(Some(Bytes::from(vec![5; 1024]))));
        c.completed(2, Ok(Some(Bytes::from(vec![5; 1000]))));
        let out = drain(&mut c);
        assert_eq!(out.len(), 16 + 1024 + 16);
        assert_eq!(replies(&out[..16]), vec![(0, 1)]);
        assert!(out[16..16 + 1024].iter().all(|b| *b == 5));
        assert_eq!(replies(&out[16 + 1024..]), vec![(Errno::Io as u32, 2)]);
    }

    #[test]
    fn the_bounds_hold_requests_until_replies_are_sent_not_just_completed() {
        let mut c = connection();
        for cookie in 0..MAX_REQUESTS as u64 + 1 {
            c.received(&header(p::CMD_READ, cookie, 0, 512));
        }
        for _ in 0..MAX_REQUESTS {
            assert!(c.next_request().is_some());
        }
        assert!(c.next_request().is_none(), "the request over the bound waits");
        assert!(!c.wants_input(), "and the socket is not read meanwhile");
        c.completed(0, Ok(Some(Bytes::from(vec![0; 512]))));
        assert!(c.next_request().is_none(), "answered but unsent still counts");
        let out: Vec<u8> = c.to_send().flatten().copied().collect();
        c.sent(out.len() - 1);
        assert!(c.next_request().is_none(), "a reply sent but for its last byte still counts");
        c.sent(1);
        assert!(matches!(c.next_request(), Some((cookie, _)) if cookie == MAX_REQUESTS as u64));
        assert!(c.wants_input());
    }

    #[test]
    fn refusals_are_answered_and_a_disconnect_finishes_after_what_is_in_flight() {
        let mut c = connection();
        c.received(&header(p::CMD_READ, 1, SIZE, 512));
        c.received(&header(p::CMD_WRITE_ZEROES, 2, 0, 4096));
        c.received(&header(p::CMD_DISC, 3, 0, 0));
        c.received(&header(p::CMD_FLUSH, 4, 0, 0));
        assert!(matches!(c.next_request(), Some((2, BlockRequest::WriteZeroes { .. }))));
        assert!(c.next_request().is_none(), "nothing after the disconnect");
        assert_eq!(replies(&drain(&mut c)), vec![(Errno::Inval as u32, 1)]);
        assert!(!c.finished() && !c.wants_input());
        c.completed(2, Ok(None));
        assert_eq!(replies(&drain(&mut c)), vec![(0, 2)]);
        assert!(c.finished() && c.error().is_none());
    }

    #[test]
    fn a_write_larger_than_the_read_ahead_is_read_whole() {
        let mut c = connection();
        let len = 4 * READ_AHEAD;
        let mut w = header(p::CMD_WRITE, 1, 0, len as u32);
        w.extend(std::iter::repeat_n(3, len));
        // As the loop does: decode after every receive.
        let mut got = None;
        for piece in w.chunks(64 << 10) {
            assert!(got.is_none() && c.wants_input(), "input is wanted until the payload is whole");
            c.received(piece);
            got = c.next_request();
        }
        let Some((1, BlockRequest::Write { data, .. })) = got else { panic!("the write") };
        assert_eq!(data.len(), len);
    }

    #[test]
    fn a_framing_error_ends_the_session_with_the_error() {
        let mut c = connection();
        let mut bad = header(p::CMD_READ, 1, 0, 512);
        bad[1] ^= 1;
        c.received(&bad);
        assert!(c.next_request().is_none());
        assert!(c.finished());
        assert!(matches!(c.error(), Some(SessionError::BadRequestMagic(_))));
    }
}
