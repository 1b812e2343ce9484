//! What a replica asks its driver to do. The replica decides; the driver carries the actions
//! out, in the order they were pushed, after the replica is no longer borrowed.

use crate::frontend::BlockResult;
use crate::wire::Message;
use bytes::Bytes;

/// A frontend request's id, chosen by the driver; the replica answers it with one
/// [`Action::Complete`].
pub type RequestId = u64;

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
#[derive(Debug, Clone)]
pub enum MetaWrite {
    Superblock,
    /// One peer slot's whole bitmap.
    Bitmap(usize),
    /// Some pages of one peer slot's bitmap.
    BitmapPages { slot: usize, pages: Vec<usize> },
    /// The data disk's cache flushed: what was written to it is durable (the end of a resync
    /// is recorded only after the data it brought).
    DataFlush,
    /// An activity-log transaction (already applied to the replica's log): the bitmap pages of
    /// the extents it evicts, then the transaction itself, in that order (crash recovery
    /// relies on it).
    ActivityLog(crate::meta::activity_log::AlUpdate),
}

impl MetaWrite {
    /// What is written, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            MetaWrite::Superblock => "superblock",
            MetaWrite::Bitmap(_) | MetaWrite::BitmapPages { .. } => "bitmap",
            MetaWrite::DataFlush => "flush of the data disk",
            MetaWrite::ActivityLog(_) => "activity-log transaction",
        }
    }
}

/// One operation on the local data disk.
#[derive(Debug, Clone)]
pub enum LocalIo {
    Read { offset: u64, len: usize },
    Write { offset: u64, data: Bytes, fua: bool },
    /// Zeroes, or a discard (which must read back as zeroes too, so replicas stay identical).
    Zeroes { offset: u64, len: u64, discard: bool, fua: bool },
    /// The disk's volatile cache made durable.
    Flush,
}

/// What a local I/O was for: handed back with its result to [`crate::replica::Replica::io_done`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoTag {
    /// A frontend read.
    Read(RequestId),
    /// The local half of the primary's write `id` (see `InflightWrites`).
    Write(u64),
    /// The local half of FLUSH `id` (see `PendingFlush`).
    Flush(u64),
    /// Step `seq` of `peer`'s stream (a replicated write, resync data, a digest comparison's
    /// read), received on connection `generation`.
    Stream { peer: u8, generation: u64, seq: u64 },
    /// The flush behind `peer`'s barrier for `epoch`.
    Barrier { peer: u8, generation: u64, epoch: u64 },
}

#[derive(Debug)]
pub enum Action {
    /// Make `MetaWrite` durable; on failure the driver hands the actions queued behind it to
    /// [`crate::replica::Replica::persist_failed`] instead of carrying them out.
    Persist(MetaWrite),
    /// Make an activity-log transaction durable without holding back the actions queued after
    /// it (the writes that need it wait in the replica, which is how writes arriving meanwhile
    /// gather into the next one): write the bitmap pages of the extents it evicts, for every
    /// peer slot, as they stand when this is carried out; then, off the hot path, flush the
    /// data disk if `flush_data` (an extent leaves the log only with its writes durable), make
    /// those pages durable, and write the transaction durably, in that order. The result goes
    /// to [`crate::replica::Replica::log_written`] with the transaction's sequence number.
    WriteLog { update: crate::meta::AlUpdate, flush_data: bool },
    /// Send `msg` to `peer` if its link is still up. `sent_write`: protocol A's completion,
    /// reported back for this write once the frame has been handed to the kernel.
    Send { peer: u8, msg: Message, lane: Lane, sent_write: Option<u64> },
    /// Submit a local I/O; its result comes back through `Replica::io_done` with `tag`. Local
    /// I/Os may complete in any order: the replica submits two that must not overlap in time
    /// (overlapping writes, a barrier's flush and the writes before it) one after the other.
    Io { tag: IoTag, op: LocalIo },
    /// Answer frontend request `request`.
    Complete { request: RequestId, result: BlockResult },
    /// Drop the link of connection `generation` to `peer` for `reason` (nothing happens if
    /// that connection is gone already).
    DropLink { peer: u8, generation: u64, reason: String },
    /// Start walking the bitmap for `peer` as its resync source on connection `generation`
    /// (the driver reads and paces; `Replica::resync_next` decides).
    StartResync { peer: u8, generation: u64 },
    /// Run the `fence-peer` handler for `peer`, whose connection `generation` was lost; its
    /// outcome comes back through `Replica::fence_done` with the same generation.
    FencePeer { peer: u8, generation: u64 },
}
