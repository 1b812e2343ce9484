//! A peer's byte stream, whatever it holds, decoded by the real codec and handed frame after
//! frame to the real replica (`Replica::receive`), as a link's reader does: on a link that
//! has just come up (the handshake's State and BitmapRuns are due), and on established links
//! where this node is the primary or its peer is. The replica's local I/O completes (reads
//! return zeroes, a few fail) and its clock moves on between frames, so what a frame starts
//! (an applied write, a resync step, a verify) runs on. The replica must refuse what it will
//! not act on by dropping the link, never panic, and never ask for more than a bounded amount
//! of local I/O for one frame.
//!
//! Input: a setup byte (bits 0-1: which replica; bit 2: I/O fails now and then; bits 3-7:
//! milliseconds between frames), then the stream.
#![no_main]

use std::time::Duration;

use blkrepl::core::inflight::LocalFailure;
use blkrepl::replica::testing::{primary_replicating, secondary_of_primary, three_node_replica, two_node_replica};
use blkrepl::replica::{Action, LocalIo};
use blkrepl::wire::{decode, MAX_DATA_BYTES};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

/// The peer that sends the stream.
const PEER: u8 = 1;
/// Rounds of carrying out actions after one frame: what one frame starts settles in a few.
const ROUNDS: usize = 16;

fuzz_target!(
    init: {
        // The fixture's in-memory disk (32 MiB, metadata included) is the largest allocation
        // a replica needs; nothing a frame asks for may come near it (a frame's data and
        // what the replica reads for one are at most a few MiB).
        blkrepl_fuzz::cap_allocations(32 * MAX_DATA_BYTES + (1 << 20));
    },
    |data: &[u8]| {
        let Some((&setup, mut stream)) = data.split_first() else { return };
        let (mut replica, mut now) = match setup & 3 {
            0 => primary_replicating(),
            1 => secondary_of_primary(),
            2 => two_node_replica(),
            _ => three_node_replica(),
        };
        let generation = if setup & 3 >= 2 { replica.link_up(PEER, now) } else { replica.peer(PEER).generation };
        let failing = setup & 4 != 0;
        let step = Duration::from_millis(u64::from(setup >> 3) * 20);
        let mut completions = 0u64;
        while let Ok((msg, used)) = decode(stream) {
            stream = &stream[used..];
            now += step;
            if replica.receive(now, PEER, generation, msg).is_err() {
                return;
            }
            // The frames this harness is handed go nowhere: no link holds any of them.
            replica.tick(now, |_| 0);
            for _ in 0..ROUNDS {
                let actions = replica.take_actions();
                if actions.is_empty() {
                    break;
                }
                for action in actions {
                    match action {
                        Action::DropLink { peer: PEER, generation: dropped, .. } if dropped == generation => return,
                        Action::Io { tag, op } => {
                            completions += 1;
                            let result = outcome(&op, failing && completions % 7 == 0);
                            replica.io_done(now, tag, result);
                        }
                        _ => {}
                    }
                }
            }
        }
    }
);

/// How a local I/O ends: reads return zeroes, the rest succeeds, or it fails.
fn outcome(op: &LocalIo, fail: bool) -> Result<Option<Bytes>, LocalFailure> {
    if fail {
        return Err(LocalFailure::Io);
    }
    Ok(match op {
        LocalIo::Read { len, .. } => Some(Bytes::from(vec![0; *len])),
        _ => None,
    })
}
