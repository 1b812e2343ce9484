//! The pure state machines: no sockets, no files, no clock, no randomness. Drivers in
//! [`crate::engine`] feed them events and carry out what they decide, so the same rules can be
//! driven by a deterministic simulator.

pub mod states;
pub mod sync_decision;
pub mod inflight;
pub mod transfer_log;
pub mod generation;
pub mod block_digest;
pub mod zero_runs;
pub mod leftover_bits;
pub mod resync_rate;
pub mod sync_progress;
pub mod quorum;
pub mod split_brain;
