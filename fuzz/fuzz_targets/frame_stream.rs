//! A peer's byte stream, whatever it holds, through `wire::read_message` frame after frame
//! until the first error: reading must end in an error, never a panic, and no length field may
//! make the reader allocate more than one maximal frame.
#![no_main]

use blkrepl::wire::{self, HEADER_LEN, MAX_PAYLOAD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        // One payload buffer, plus the slack of a Vec growing into it.
        blkrepl_fuzz::cap_allocations(2 * (HEADER_LEN + MAX_PAYLOAD as usize));
    },
    |data: &[u8]| {
        let mut stream = data;
        let mut frames = 0;
        while wire::read_message(&mut stream).is_ok() {
            frames += 1;
            // Every frame takes at least its header: the loop cannot spin on the same bytes.
            assert!(frames * HEADER_LEN <= data.len());
        }
    }
);
