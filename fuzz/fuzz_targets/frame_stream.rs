//! A peer's byte stream, whatever it holds, through `wire::FrameReceiver` frame after frame
//! until the first error or its end, as the daemon's peer reader takes it: before
//! authentication unprotected, after it with a MAC per frame (plain links) or sealed (TLS
//! links). The first input byte chooses: modulo 3 the protection (0 unprotected, 1 MACed,
//! 2 sealed), divided by 3 the size of the pieces the stream arrives in (2^0 to 2^20 bytes).
//! Reading must end, in an error or at the end of the input, never in a panic, and no length
//! field may make the receiver allocate more than one maximal frame at once.
#![no_main]

use blkrepl::wire::{self, HEADER_LEN, MAX_PAYLOAD};
use libfuzzer_sys::fuzz_target;
use std::io::Read;

/// The input in pieces of at most `piece` bytes a read.
struct Pieces<'a> {
    bytes: &'a [u8],
    piece: usize,
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.piece.min(buf.len()).min(self.bytes.len());
        buf[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        Ok(n)
    }
}

fuzz_target!(
    init: {
        // One payload buffer, plus the slack of a Vec growing into it.
        blkrepl_fuzz::cap_allocations(2 * (HEADER_LEN + MAX_PAYLOAD as usize));
    },
    |data: &[u8]| {
        let Some((mode, stream)) = data.split_first() else { return };
        let protection = match mode % 3 {
            0 => None,
            mode => Some(blkrepl_fuzz::link_protection(mode == 2).1),
        };
        let mut stream = Pieces { bytes: stream, piece: 1 << (usize::from(mode / 3) % 21) };
        let mut receiver = wire::FrameReceiver::new(&[], protection);
        let mut frames = 0;
        loop {
            match receiver.next_frame() {
                Ok(Some(_)) => {
                    frames += 1;
                    // Every frame takes at least its header: the loop cannot spin on the same
                    // bytes.
                    assert!(frames * HEADER_LEN <= data.len());
                }
                Ok(None) => {
                    if !receiver.receive(&mut stream).unwrap_or(false) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    }
);
