//! What a peer may not have durably yet.
//!
//! Every write or resync block sent to a peer stays here until the peer acknowledges a barrier
//! that covers its epoch (the peer flushed it). If the connection drops first, everything left is
//! marked out of sync for that peer: a peer that lost power may have lost it from its cache.

use std::collections::VecDeque;

#[derive(Debug, Default)]
pub struct TransferLog {
    entries: VecDeque<Entry>,
    /// Writes sent in the current (open) epoch.
    open_epoch_writes: u32,
    /// Bytes of the application writes among them.
    open_epoch_bytes: u64,
    /// The epoch and id of the last FUA write sent (ids grow along the stream).
    last_fua: Option<(u64, u64)>,
}

/// A barrier ack whose count disagrees with what was sent: the streams are out of step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("barrier ack for epoch {epoch} counts {acked} writes, {sent} were sent")]
pub struct BarrierMismatch {
    pub epoch: u64,
    pub sent: u32,
    pub acked: u32,
}

/// A range sent in `epoch`. `void`: marked out of sync again after it was sent (a newer write
/// the peer does not get this way), so its barrier ack proves nothing about it. `write`: an
/// application write, which holds its activity-log extents until it is settled here.
#[derive(Debug, Clone, Copy)]
struct Entry {
    epoch: u64,
    offset: u64,
    len: u64,
    void: bool,
    write: bool,
}

/// A range the transfer log let go of: acknowledged durable by a barrier ack, or lost with
/// the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub offset: u64,
    pub len: u64,
    /// Durable on the peer and not marked again since: its out-of-sync bits may clear.
    pub durable: bool,
    /// An application write: its activity-log extents are released now.
    pub write: bool,
}

impl TransferLog {
    /// An application write sent in `epoch`; `fua`: its id, if it is a FUA write.
    pub fn record_write(&mut self, epoch: u64, offset: u64, len: u64, fua: Option<u64>) {
        self.entries.push_back(Entry { epoch, offset, len, void: false, write: true });
        self.open_epoch_writes += 1;
        self.open_epoch_bytes += len;
        if let Some(id) = fua {
            self.last_fua = Some((epoch, id));
        }
    }

    /// The id of the last FUA write sent in `epoch`, 0 for none (the `fua` of a
    /// `DataPosition` one epoch before it).
    pub fn last_fua_of(&self, epoch: u64) -> u64 {
        self.last_fua.filter(|(of, _)| *of == epoch).map_or(0, |(_, id)| id)
    }

    /// Resync data sent in `epoch` in `frames` frames (each counts as a write of the epoch on
    /// the peer). One range for all of them: a bit is cleared only by a range that covers its
    /// whole block, and the frames of one chunk may each cover a part of one.
    pub fn record(&mut self, epoch: u64, offset: u64, len: u64, frames: u32) {
        self.entries.push_back(Entry { epoch, offset, len, void: false, write: false });
        self.open_epoch_writes += frames;
    }

    /// A range the peer already holds (checksum-based resync found it equal): it counts as
    /// durable there once a barrier after it is acked, like a write, but is no write of the
    /// epoch (the peer counts none for it).
    pub fn record_held(&mut self, epoch: u64, offset: u64, len: u64) {
        self.entries.push_back(Entry { epoch, offset, len, void: false, write: false });
    }

    /// `[offset, offset + len)` was marked out of sync for the peer after some of what is in
    /// flight to it was read: the ack of those ranges must not clear the new mark. (A resync
    /// source that is a secondary applies a primary's write to a block it already sent the
    /// target; the older copy's barrier ack would otherwise clear the bit of the newer write.)
    pub fn void_overlapping(&mut self, offset: u64, len: u64) {
        for entry in self.entries.iter_mut().filter(|e| e.offset < offset + len && offset < e.offset + e.len) {
            entry.void = true;
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes in the open epoch (the count a barrier for it carries).
    pub fn open_epoch_writes(&self) -> u32 {
        self.open_epoch_writes
    }

    /// Bytes of the application writes in the open epoch.
    pub fn open_epoch_bytes(&self) -> u64 {
        self.open_epoch_bytes
    }

    /// The open epoch is closed by a barrier; returns its write count.
    pub fn close_epoch(&mut self) -> u32 {
        self.open_epoch_bytes = 0;
        std::mem::take(&mut self.open_epoch_writes)
    }

    /// The peer flushed everything up to and including `epoch`: the ranges of those epochs.
    pub fn barrier_acked(&mut self, epoch: u64) -> Vec<Settled> {
        let mut settled = Vec::new();
        while let Some(&e) = self.entries.front() {
            if e.epoch > epoch {
                break;
            }
            settled.push(Settled { offset: e.offset, len: e.len, durable: !e.void, write: e.write });
            self.entries.pop_front();
        }
        settled
    }

    /// The connection is gone: every range the peer might lack (none durable).
    pub fn drain_lost(&mut self) -> Vec<Settled> {
        self.open_epoch_writes = 0;
        self.open_epoch_bytes = 0;
        self.entries.drain(..).map(|e| Settled { offset: e.offset, len: e.len, durable: false, write: e.write }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ranges, and which of them are durable.
    fn ranges(settled: &[Settled]) -> Vec<(u64, u64, bool)> {
        settled.iter().map(|s| (s.offset, s.len, s.durable)).collect()
    }

    #[test]
    fn barrier_ack_releases_only_its_epochs() {
        let mut log = TransferLog::default();
        log.record_write(1, 0, 4096, None);
        log.record(1, 4096, 4096, 1);
        assert_eq!(log.close_epoch(), 2);
        log.record_write(2, 8192, 4096, None);
        let acked = log.barrier_acked(1);
        assert_eq!(ranges(&acked), vec![(0, 4096, true), (4096, 4096, true)]);
        assert_eq!(acked.iter().map(|s| s.write).collect::<Vec<_>>(), vec![true, false], "only the write holds extents");
        assert_eq!(log.len(), 1);
        assert_eq!(ranges(&log.drain_lost()), vec![(8192, 4096, false)]);
        assert!(log.is_empty());
    }

    #[test]
    fn a_range_marked_again_after_it_was_sent_is_not_cleared_by_its_ack() {
        let mut log = TransferLog::default();
        log.record(1, 0, 8192, 1);
        log.record(1, 1 << 20, 4096, 1);
        log.void_overlapping(4096, 512);
        assert_eq!(ranges(&log.barrier_acked(1)), vec![(0, 8192, false), (1 << 20, 4096, true)]);
        log.record(2, 0, 4096, 1);
        log.void_overlapping(0, 4096);
        assert_eq!(ranges(&log.drain_lost()), vec![(0, 4096, false)], "a lost link still re-marks it");
    }

    #[test]
    fn a_held_range_clears_with_its_epoch_but_is_not_counted() {
        let mut log = TransferLog::default();
        log.record(3, 0, 4096, 1);
        log.record_held(3, 1 << 20, 1 << 18);
        assert_eq!(log.close_epoch(), 1, "the peer counts only the write");
        log.record_held(4, 8192, 4096);
        assert_eq!(ranges(&log.barrier_acked(3)), vec![(0, 4096, true), (1 << 20, 1 << 18, true)]);
        assert_eq!(ranges(&log.drain_lost()), vec![(8192, 4096, false)], "a lost link re-marks what was not acked");
    }
}
