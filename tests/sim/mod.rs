//! A deterministic simulator of a blkrepl cluster (issue #4, "Proof").
//!
//! Several model nodes drive the library's pure state machines (`core::quorum`,
//! `core::sync_decision`, `core::generation`, `core::split_brain`, `core::inflight`,
//! `core::transfer_log`) and its metadata store (`meta::MetaStore` over `disk::FaultyDisk`, so a
//! crash tears real superblock, bitmap and activity-log writes), following the rules the engine
//! follows when it uses them (`src/engine`). Between the nodes sit a simulated network and
//! simulated data disks; everything runs in virtual time from one seeded RNG, one event at a
//! time, so a seed replays exactly.
//!
//! - [`rng`]: the one source of randomness.
//! - [`network`]: ordered links with delay, partitions, heal.
//! - [`disk`]: data disks (latency, I/O errors, power loss) and the metadata store wrapper.
//! - [`node`], [`replication`], [`sync`]: one node: roles and quorum; the write path and the
//!   replicated stream; handshake, connect-time decision and resync.
//! - [`world`]: the event queue, the context handed to nodes, the resource's rules and the
//!   amendments the model makes to the engine's rules (each one a finding of this simulator).
//! - [`checkers`]: the invariants checked after every step, and what the client was told.
//! - [`scenario`]: the cluster, the client and the random fault schedule; runs one seed.

pub mod checkers;
pub mod disk;
pub mod network;
pub mod node;
pub mod replication;
pub mod rng;
pub mod scenario;
pub mod sync;
pub mod world;

/// Virtual time in microseconds.
pub type Time = u64;
pub const MS: Time = 1_000;
pub const SEC: Time = 1_000_000;

/// Blocks of the simulated device. One block is one bitmap bit and one client write.
pub const BLOCKS: usize = 32;
/// Bytes per block: the largest bitmap block the metadata allows, so the 32 blocks span eight
/// 4 MiB activity-log extents, one more than the log holds (evictions happen).
pub const BLOCK_BYTES: u64 = 1 << 20;
pub const DATA_BYTES: u64 = BLOCKS as u64 * BLOCK_BYTES;
/// Activity-log slots: the minimum the metadata allows.
pub const AL_EXTENTS: u32 = 7;
