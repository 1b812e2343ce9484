//! What a replica asks its driver to do. The replica decides; the driver carries the actions
//! out, in the order they were pushed, after the replica is no longer borrowed.

use crate::wire::Message;

/// Which queue of a peer's stream a frame joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Acks, pings, state: they overtake queued bulk data.
    Control,
    /// Data, barriers, resync and verify traffic: in order among themselves.
    Bulk,
}

/// Metadata the replica changed. Its write must be durable before any action queued after it
/// is carried out; it writes the replica's state as it is when carried out (never older than
/// when it was queued).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaWrite {
    Superblock,
    /// One peer slot's whole bitmap.
    Bitmap(usize),
    /// The data disk's cache flushed: what was written to it is durable (the end of a resync
    /// is recorded only after the data it brought).
    DataFlush,
}

#[derive(Debug)]
pub enum Action {
    /// Make `MetaWrite` durable; on failure the driver hands the actions queued behind it to
    /// [`crate::replica::Replica::persist_failed`] instead of carrying them out.
    Persist(MetaWrite),
    /// Send `msg` to `peer` if its link is still up. `sent_write`: protocol A's completion,
    /// reported back for this write once the frame has been handed to the kernel.
    Send { peer: u8, msg: Message, lane: Lane, sent_write: Option<u64> },
    /// Drop the link of connection `generation` to `peer` for `reason` (nothing happens if
    /// that connection is gone already).
    DropLink { peer: u8, generation: u64, reason: String },
    /// Start walking the bitmap for `peer` as its resync source on connection `generation`
    /// (the driver reads and paces; `Replica::resync_next` decides).
    StartResync { peer: u8, generation: u64 },
}
