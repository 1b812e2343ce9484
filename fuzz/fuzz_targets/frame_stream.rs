//! A peer's byte stream, whatever it holds, through `wire::read_message_with` frame after frame
//! until the first error, as the daemon reads it: before authentication unprotected, after it
//! with a MAC per frame (plain links) or sealed (TLS links); the first input byte chooses:
//! 0 unprotected, 1 MACed, 2 sealed (and so on modulo 3). Reading must end in
//! an error, never a panic, and no length field may make the reader allocate more than one
//! maximal frame.
#![no_main]

use blkrepl::wire::{self, HEADER_LEN, MAX_PAYLOAD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        // One payload buffer, plus the slack of a Vec growing into it.
        blkrepl_fuzz::cap_allocations(2 * (HEADER_LEN + MAX_PAYLOAD as usize));
    },
    |data: &[u8]| {
        let Some((mode, mut stream)) = data.split_first() else { return };
        let mut protection = match mode % 3 {
            0 => None,
            mode => Some(blkrepl_fuzz::link_protection(mode == 2).1),
        };
        let mut frames = 0;
        while wire::read_message_with(&mut stream, protection.as_mut()).is_ok() {
            frames += 1;
            // Every frame takes at least its header: the loop cannot spin on the same bytes.
            assert!(frames * HEADER_LEN <= data.len());
        }
    }
);
