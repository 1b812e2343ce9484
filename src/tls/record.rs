//! Reading a TLS handshake one record at a time, so that no byte after it is taken.
//!
//! rustls reads as much as the socket offers. A peer may send its first blkrepl frame right
//! behind its last handshake record, and those bytes must reach the frame reader, not rustls.
//! [`RecordReader`] hands out the 5-byte header of a record, then at most the body that header
//! announces, and only then reads the next header.

use std::io::{self, Read};

/// Bytes of a TLS record header: content type, legacy version (2 bytes), body length (2 bytes).
const RECORD_HEADER_LEN: usize = 5;

/// A reader that never reads past the TLS record it is in.
pub struct RecordReader<R> {
    inner: R,
    header: [u8; RECORD_HEADER_LEN],
    /// Bytes of `header` not yet handed out (taken from its end).
    header_left: usize,
    body_left: usize,
    /// The first header this reader saw: what the peer started with.
    first: Option<[u8; RECORD_HEADER_LEN]>,
}

impl<R: Read> RecordReader<R> {
    pub fn new(inner: R) -> RecordReader<R> {
        RecordReader { inner, header: [0; RECORD_HEADER_LEN], header_left: 0, body_left: 0, first: None }
    }

    /// Whether the peer started with a blkrepl frame instead of a TLS record: it speaks plain.
    pub fn saw_plain_frame(&self) -> bool {
        self.first.is_some_and(|first| first[..4] == crate::wire::MAGIC.to_be_bytes())
    }
}

impl<R: Read> Read for RecordReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.header_left == 0 && self.body_left == 0 {
            self.inner.read_exact(&mut self.header)?;
            self.first.get_or_insert(self.header);
            self.header_left = RECORD_HEADER_LEN;
            self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
        }
        if self.header_left > 0 {
            let from = RECORD_HEADER_LEN - self.header_left;
            let n = self.header_left.min(buf.len());
            buf[..n].copy_from_slice(&self.header[from..from + n]);
            self.header_left -= n;
            return Ok(n);
        }
        let want = self.body_left.min(buf.len());
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.body_left -= n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that returns at most `step` bytes per call, as a socket may.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn reads_whole_records_and_not_one_byte_past_the_last_one_asked_for() {
        let mut stream = vec![22, 3, 3, 0, 3, b'a', b'b', b'c', 23, 3, 3, 0, 1, b'd'];
        stream.extend_from_slice(b"BLKR and what follows");
        for step in [1, 2, 7, 4096] {
            let mut source = Trickle(&stream, step);
            let mut reader = RecordReader::new(&mut source);
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while got.len() < 14 {
                let n = reader.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, stream[..14], "step {step}");
            assert_eq!(source.0, b"BLKR and what follows", "step {step}: nothing after the records was read");
        }
    }

    #[test]
    fn tells_a_plain_peer_and_a_stream_cut_inside_a_record() {
        let mut reader = RecordReader::new(&b"BLKR\x00\x01"[..]);
        let mut buf = [0u8; 16];
        assert_eq!(reader.read(&mut buf).unwrap(), 5);
        assert!(reader.saw_plain_frame());
        let mut cut = RecordReader::new(&[22u8, 3, 3, 0, 9, 1, 2][..]);
        assert!(!cut.saw_plain_frame());
        assert_eq!(cut.read(&mut buf).unwrap(), 5);
        assert_eq!(cut.read(&mut buf).unwrap(), 2);
        assert_eq!(cut.read(&mut buf).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
