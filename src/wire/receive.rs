//! Receiving frames in bulk: one read takes whatever the socket holds, many frames at a high
//! queue depth, and the frames are then taken from memory one by one. A reader that reads each
//! frame from the socket itself makes a system call per frame (or per 8 KiB of a buffered
//! reader), and hands each to the replica alone.
//!
//! The checks are [`read_message_with`]'s, run on the frame in memory: magic and length
//! (before the buffer grows for the frame), crc, protection, payload. A large frame (a 1 MiB
//! write, a resync chunk) is read by it from the socket straight into its payload instead:
//! going through the buffer would copy each of its bytes once more.

use std::io::{self, Read};

use super::mac::FRAME_MAC_LEN;
use super::frame::{read_message_with, WireError, HEADER_LEN, MAX_PAYLOAD};
use super::message::Message;
use super::seal::{Protection, SEAL_TAG_LEN};

/// The buffer's size (more while a larger frame is received): 64 frames of 4 KiB of data.
const READ_BYTES: usize = 256 << 10;
/// What is received moves to the front of the buffer when less room than this is left behind it.
const MIN_READ: usize = 64 << 10;
/// Frames with at least this much payload are read straight into it (see the module's
/// documentation).
const DIRECT_BYTES: usize = 64 << 10;
/// What one read takes right after a large frame: another one likely follows, whose payload
/// should not go through the buffer either.
const AFTER_LARGE_READ: usize = 8 << 10;

/// Bytes received and not yet taken as frames, and the protection of the direction they came
/// from.
pub struct FrameReceiver {
    buf: Vec<u8>,
    /// The received bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    protection: Option<Protection>,
    /// A large frame read straight from the stream, not yet taken.
    read_whole: Option<Message>,
    /// The last frame was read straight from the stream (see [`AFTER_LARGE_READ`]).
    after_large: bool,
}

impl FrameReceiver {
    /// `received`: bytes already read from the stream (by the handshake's buffered reader).
    pub fn new(received: &[u8], protection: Option<Protection>) -> FrameReceiver {
        let mut buf = vec![0; READ_BYTES.max(received.len())];
        buf[..received.len()].copy_from_slice(received);
        FrameReceiver { buf, start: 0, end: received.len(), protection, read_whole: None, after_large: false }
    }

    /// The next whole frame received, checked and decoded; `None` until more is read.
    pub fn next_frame(&mut self) -> Result<Option<Message>, WireError> {
        if let Some(msg) = self.read_whole.take() {
            return Ok(Some(msg));
        }
        let received = &self.buf[self.start..self.end];
        if received.len() < HEADER_LEN {
            return Ok(None);
        }
        let magic_ok = received[..4] == super::MAGIC.to_be_bytes();
        if !magic_ok || payload_len(received) > MAX_PAYLOAD {
            // The header alone is refused: no need to wait for what it announces.
            return Err(read_message_with(&mut &received[..HEADER_LEN], None).expect_err("a bad header is refused"));
        }
        let whole = self.frame_len_wanted();
        if received.len() < whole {
            return Ok(None);
        }
        let mut frame = &self.buf[self.start..self.start + whole];
        let msg = read_message_with(&mut frame, self.protection.as_mut())?;
        // A frame is given only once all of it was read, trailer included.
        debug_assert!(frame.is_empty(), "a frame is read whole");
        self.start += whole;
        Ok(Some(msg))
    }

    /// Reads what `stream` holds (waiting, as the stream does, while it holds nothing), after
    /// the frames taken so far; false when the stream ended. Call once
    /// [`FrameReceiver::next_frame`] gave `None`. A large frame whose header is here is read
    /// whole (see the module's documentation), and its errors are the frame's.
    pub fn receive(&mut self, stream: &mut impl Read) -> Result<bool, WireError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let wanted = self.frame_len_wanted();
        if wanted >= HEADER_LEN + DIRECT_BYTES {
            // What is buffered is the beginning of this frame (the frames before it were
            // taken): the frame's reader takes it, then the rest from the stream.
            let mut frame = (&self.buf[self.start..self.end]).chain(&mut *stream);
            self.read_whole = Some(read_message_with(&mut frame, self.protection.as_mut())?);
            self.start = 0;
            self.end = 0;
            self.after_large = true;
            return Ok(true);
        }
        // Room for the whole frame whose beginning is here (its length was checked against the
        // limit), from where it starts, and for a read of useful size.
        if self.buf.len() < wanted {
            self.buf.resize(wanted, 0);
        }
        if self.start > 0 && (self.buf.len() - self.start < wanted || self.buf.len() - self.end < MIN_READ) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let read_end = if std::mem::take(&mut self.after_large) { (self.end + AFTER_LARGE_READ).min(self.buf.len()) } else { self.buf.len() };
        loop {
            match stream.read(&mut self.buf[self.end..read_end]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Bytes of the frame whose beginning is received (its header if not yet all of it).
    fn frame_len_wanted(&self) -> usize {
        let received = &self.buf[self.start..self.end];
        if received.len() < HEADER_LEN {
            return HEADER_LEN;
        }
        HEADER_LEN + payload_len(received).min(MAX_PAYLOAD) as usize + self.trailer()
    }

    /// Bytes that follow each frame's payload on this link: the MAC, or the seal's tag.
    fn trailer(&self) -> usize {
        match self.protection {
            None => 0,
            Some(Protection::Mac(_)) => FRAME_MAC_LEN,
            Some(Protection::Sealed(_)) => SEAL_TAG_LEN,
        }
    }

    /// Whether bytes of a frame not yet whole were received: a stream that ends now ends
    /// inside a frame.
    pub fn inside_frame(&self) -> bool {
        self.start < self.end
    }
}

/// The payload length a frame's header announces.
fn payload_len(header: &[u8]) -> u32 {
    u32::from_be_bytes(header[8..12].try_into().expect("a header holds the length"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tests::link_protection;
    use crate::wire::write_message_with;
    use bytes::Bytes;

    /// A stream that hands out its bytes in pieces of the given sizes, in turn.
    struct Pieces<'a> {
        bytes: &'a [u8],
        sizes: std::iter::Cycle<std::slice::Iter<'a, usize>>,
    }

    impl Read for Pieces<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = (*self.sizes.next().unwrap()).min(buf.len()).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    fn messages() -> Vec<Message> {
        let data = |id: u64, len: usize| Message::Data { id, epoch: 3, offset: id << 20, fua: id % 2 == 0, payload: Bytes::from(vec![id as u8; len]) };
        let mut messages = vec![Message::Ping, data(1, 4096), Message::WriteAck { id: 1 }, data(2, 1 << 20), Message::Barrier { epoch: 3 }];
        messages.extend((3..200).map(|id| data(id, 512 * (id as usize % 9))));
        messages.push(Message::Disconnect { reason: "done".into() });
        messages
    }

    /// What the dialer sends with and the acceptor receives with on a fresh link: `kind` 0
    /// unprotected, 1 MACed, 2 sealed.
    fn link(kind: u8) -> (Option<Protection>, Option<Protection>) {
        match kind {
            0 => (None, None),
            _ => {
                let ((dialer_sends, _), (_, acceptor_receives)) = link_protection((kind == 2).then_some([3; 32]));
                (Some(dialer_sends), Some(acceptor_receives))
            }
        }
    }

    /// Receives everything `stream` holds; the frames, and the error that ended them if any.
    fn receive_all(receiver: &mut FrameReceiver, stream: &mut impl Read) -> (Vec<Message>, Option<String>) {
        let mut got = Vec::new();
        loop {
            match receiver.next_frame() {
                Ok(Some(msg)) => got.push(msg),
                Ok(None) => {
                    match receiver.receive(stream) {
                        Ok(true) => {}
                        Ok(false) => return (got, None),
                        Err(e) => return (got, Some(e.to_string())),
                    }
                }
                Err(e) => return (got, Some(e.to_string())),
            }
        }
    }

    #[test]
    fn frames_cut_anywhere_are_received_whole_and_in_order_under_every_protection() {
        for kind in 0..3 {
            let (mut send, _) = link(kind);
            let sent = messages();
            let mut stream = Vec::new();
            for msg in &sent {
                write_message_with(&mut stream, msg, send.as_mut()).unwrap();
            }
            for sizes in [vec![1], vec![7, 3, 4096, 1], vec![READ_BYTES * 8], vec![16, 100_000]] {
                let (handshake_took, rest) = stream.split_at(5);
                let mut receiver = FrameReceiver::new(handshake_took, link(kind).1);
                let mut pieces = Pieces { bytes: rest, sizes: sizes.iter().cycle() };
                let (got, error) = receive_all(&mut receiver, &mut pieces);
                assert_eq!(error, None);
                assert_eq!(got, sent, "pieces of {sizes:?}");
                assert!(!receiver.inside_frame());
            }
        }
    }

    #[test]
    fn a_bad_header_is_refused_before_what_it_announces_arrives() {
        let mut header = Vec::new();
        write_message_with(&mut header, &Message::Ping, None).unwrap();
        // A length far over the limit: refused with only the header received.
        header[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut receiver = FrameReceiver::new(&header, None);
        let error = receiver.next_frame().unwrap_err();
        assert!(matches!(error, WireError::TooLarge { .. }), "{error}");
        // Not a blkrepl frame.
        let mut receiver = FrameReceiver::new(b"GET / HTTP/1.1\r\n", None);
        let error = receiver.next_frame().unwrap_err();
        assert!(matches!(error, WireError::BadMagic { .. }), "{error}");
    }

    #[test]
    fn a_frame_changed_on_the_way_is_refused_after_the_frames_before_it() {
        let mut stream = Vec::new();
        let (mut mac, receive) = link(1);
        for id in 0..3 {
            write_message_with(&mut stream, &Message::WriteAck { id }, mac.as_mut()).unwrap();
        }
        let last = stream.len() - 1;
        stream[last] ^= 1;
        let mut receiver = FrameReceiver::new(&[], receive);
        let (got, error) = receive_all(&mut receiver, &mut stream.as_slice());
        assert_eq!(got, vec![Message::WriteAck { id: 0 }, Message::WriteAck { id: 1 }]);
        assert!(error.unwrap().contains("MAC"));
    }

    #[test]
    fn a_stream_that_ends_inside_a_frame_says_so() {
        let mut stream = Vec::new();
        write_message_with(&mut stream, &Message::Ping, None).unwrap();
        write_message_with(&mut stream, &Message::Barrier { epoch: 1 }, None).unwrap();
        stream.pop();
        let mut receiver = FrameReceiver::new(&[], None);
        let (got, error) = receive_all(&mut receiver, &mut stream.as_slice());
        assert_eq!((got, error), (vec![Message::Ping], None));
        assert!(receiver.inside_frame());

        // A large frame, read straight from the stream, cut short.
        let mut stream = Vec::new();
        write_message_with(&mut stream, &Message::Ping, None).unwrap();
        let payload = Bytes::from(vec![1; 128 << 10]);
        write_message_with(&mut stream, &Message::Data { id: 1, epoch: 1, offset: 0, fua: false, payload }, None).unwrap();
        stream.truncate(stream.len() - 1000);
        let mut receiver = FrameReceiver::new(&[], None);
        let (got, error) = receive_all(&mut receiver, &mut stream.as_slice());
        assert_eq!(got, vec![Message::Ping]);
        assert!(error.is_some_and(|e| e.contains("end of file")), "the frame's read reports the cut");
    }
}
