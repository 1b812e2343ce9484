//! The verify threads: one per peer, walking as `Replica::verify_next` says (which paces it with
//! the rate controller) and reading each chunk under the range lock (see `resync::read_range_then`), so
//! the peer compares at the same point of the write stream. The rules are the replica's
//! (`replica/verify.rs`).

use super::resync::{read_range_then, WAIT_SLICE};
use super::error::EngineError;
use super::shared::Shared;
use super::congestion;
use crate::core::block_digest::block_digests;
use crate::replica::VerifyStep;
use std::sync::Arc;
use std::time::Instant;

/// Starts a verify with every connected peer it can run against. Returns their names.
pub fn start(shared: &Arc<Shared>) -> Result<Vec<String>, EngineError> {
    let targets = shared.lock().replica.verify_start(Instant::now()).map_err(EngineError::Refused)?;
    for (peer_id, generation, _) in &targets {
        let (walker, peer_id, generation) = (shared.clone(), *peer_id, *generation);
        let spawned = std::thread::Builder::new().name(format!("verify-{peer_id}")).spawn(move || {
            let outcome = run(&walker, peer_id, generation);
            walker.lock().replica.verify_ended(peer_id, outcome);
        });
        if let Err(e) = spawned {
            shared.lock().replica.verify_ended(peer_id, Err(format!("cannot start the verify thread: {e}")));
        }
    }
    Ok(targets.into_iter().map(|(_, _, name)| name).collect())
}

fn run(shared: &Arc<Shared>, peer_id: u8, generation: u64) -> Result<(), String> {
    let block_size = shared.config.bitmap_block_size as usize;
    loop {
        let mut st = shared.lock();
        let (offset, len) = match st.replica.verify_next(Instant::now(), peer_id, generation) {
            VerifyStep::Finished => return Ok(()),
            VerifyStep::Stop(reason) => return Err(reason),
            VerifyStep::Wait => {
                drop(st.wait_timeout(WAIT_SLICE));
                continue;
            }
            VerifyStep::Pace(wait) => {
                drop(st);
                std::thread::sleep(wait.min(WAIT_SLICE));
                continue;
            }
            VerifyStep::Read { offset, len } => (offset, len),
        };
        let link = st.link(peer_id).cloned().ok_or("link closed")?;
        drop(st);

        link.wait_for_room(congestion::resync_room_bytes(&shared.config));
        let still = |st: &super::state::State| st.replica.verify_interrupted(peer_id, generation).is_none();
        let prepare = |data: Vec<u8>| block_digests(&data, block_size);
        let send = |st: &mut super::state::State, digests| st.replica.verify_chunk_read(peer_id, offset, len, digests);
        // `None`: interrupted meanwhile, and `verify_next` says why.
        read_range_then(shared, offset, len, still, prepare, send)?;
    }
}
