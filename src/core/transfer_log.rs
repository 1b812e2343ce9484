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
/// the peer does not get this way), so its barrier ack proves nothing about it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    epoch: u64,
    offset: u64,
    len: u64,
    void: bool,
}

impl TransferLog {
    pub fn record(&mut self, epoch: u64, offset: u64, len: u64) {
        self.entries.push_back(Entry { epoch, offset, len, void: false });
        self.open_epoch_writes += 1;
    }

    /// A range the peer already holds (checksum-based resync found it equal): it counts as
    /// durable there once a barrier after it is acked, like a write, but is no write of the
    /// epoch (the peer counts none for it).
    pub fn record_held(&mut self, epoch: u64, offset: u64, len: u64) {
        self.entries.push_back(Entry { epoch, offset, len, void: false });
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

    /// The open epoch is closed by a barrier; returns its write count.
    pub fn close_epoch(&mut self) -> u32 {
        std::mem::take(&mut self.open_epoch_writes)
    }

    /// The peer flushed everything up to and including `epoch`; returns the ranges now known durable
    /// there.
    pub fn barrier_acked(&mut self, epoch: u64) -> Vec<(u64, u64)> {
        let mut durable = Vec::new();
        while let Some(&entry) = self.entries.front() {
            if entry.epoch > epoch {
                break;
            }
            if !entry.void {
                durable.push((entry.offset, entry.len));
            }
            self.entries.pop_front();
        }
        durable
    }

    /// The connection is gone: every range the peer might lack.
    pub fn drain_lost(&mut self) -> Vec<(u64, u64)> {
        self.open_epoch_writes = 0;
        self.entries.drain(..).map(|e| (e.offset, e.len)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn barrier_ack_releases_only_its_epochs() {
        let mut log = TransferLog::default();
        log.record(1, 0, 4096);
        log.record(1, 4096, 4096);
        assert_eq!(log.close_epoch(), 2);
        log.record(2, 8192, 4096);
        assert_eq!(log.barrier_acked(1), vec![(0, 4096), (4096, 4096)]);
        assert_eq!(log.len(), 1);
        assert_eq!(log.drain_lost(), vec![(8192, 4096)]);
        assert!(log.is_empty());
    }

    #[test]
    fn a_range_marked_again_after_it_was_sent_is_not_cleared_by_its_ack() {
        let mut log = TransferLog::default();
        log.record(1, 0, 8192);
        log.record(1, 1 << 20, 4096);
        log.void_overlapping(4096, 512);
        assert_eq!(log.barrier_acked(1), vec![(1 << 20, 4096)]);
        log.record(2, 0, 4096);
        log.void_overlapping(0, 4096);
        assert_eq!(log.drain_lost(), vec![(0, 4096)], "a lost link still re-marks it");
    }

    #[test]
    fn a_held_range_clears_with_its_epoch_but_is_not_counted() {
        let mut log = TransferLog::default();
        log.record(3, 0, 4096);
        log.record_held(3, 1 << 20, 1 << 18);
        assert_eq!(log.close_epoch(), 1, "the peer counts only the write");
        log.record_held(4, 8192, 4096);
        assert_eq!(log.barrier_acked(3), vec![(0, 4096), (1 << 20, 1 << 18)]);
        assert_eq!(log.drain_lost(), vec![(8192, 4096)], "a lost link re-marks what was not acked");
    }
}
