//! The activity log: which 4 MiB extents may hold writes a peer has not seen.
//!
//! Before a write goes to a cold extent, the extent is made hot by a **durable** transaction; an
//! extent leaves the log only when no write into it is in flight and its bitmap pages are on
//! disk. So after a crash as primary, "every hot extent" bounds what may differ between the
//! replicas, and only that much needs a resync.
//!
//! This module is pure: it decides and encodes, the store writes. Slots are assigned least
//! recently used first.
//!
//! **On disk** a transaction is one 4 KiB block in a ring of [`AL_RING_BLOCKS`]; transaction
//! `seq` lives at position `seq % AL_RING_BLOCKS`. Each carries its slot updates plus a rotating
//! slice of the whole slot table (the "context"), such that any `AL_RING_BLOCKS - 1` consecutive
//! transactions together cover every slot. Replaying the valid blocks from oldest to newest
//! therefore rebuilds the full table even when the newest one is torn.
//!
//! ```text
//!  0 magic "BLKRPLAL"   8 version u32   12 crc32c u32 (of the block, this field as 0)
//! 16 seq u64           24 al_extents u32 28 kind u16 (0 update, 1 clear all)
//! 30 updates u16       32 context start slot u32   36 context entries u16   38 zero u16
//! 40 context: 256 x extent u64 (u64::MAX = empty)
//! 2088 updates: up to 200 x (slot u16, extent u64)
//! ```

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ops::RangeInclusive;

use super::layout::{AL_RING_BLOCKS, MAX_AL_EXTENTS};
use super::{block_crc, le, Block, MetaError, BLOCK_SIZE, SEQ_LIMIT};

/// Bytes per extent: the granularity of the hot set.
pub const AL_EXTENT_SHIFT: u32 = 22;
pub const AL_EXTENT_SIZE: u64 = 1 << AL_EXTENT_SHIFT;
/// Slot-table entries each transaction repeats.
pub const AL_CONTEXT_PER_TRANSACTION: usize = 256;
/// Slot updates one transaction can carry, i.e. the most cold extents one `prepare` can add.
pub const AL_MAX_UPDATES: usize = (BLOCK_SIZE - UPDATES_OFFSET) / UPDATE_SIZE;

// A torn newest transaction must not lose part of the table.
const _: () = assert!((AL_RING_BLOCKS - 1) * AL_CONTEXT_PER_TRANSACTION >= MAX_AL_EXTENTS as usize);

pub(super) const MAGIC: &[u8; 8] = b"BLKRPLAL";
const VERSION: u32 = 1;
pub(super) const CRC_OFFSET: usize = 12;
const CONTEXT_OFFSET: usize = 40;
const UPDATES_OFFSET: usize = CONTEXT_OFFSET + AL_CONTEXT_PER_TRANSACTION * 8;
const UPDATE_SIZE: usize = 10;
const EMPTY: u64 = u64::MAX;
const KIND_UPDATE: u16 = 0;
const KIND_CLEAR: u16 = 1;

/// The extents a byte range touches, or `None` for an empty range.
pub fn extents_for(offset: u64, len: u64) -> Option<RangeInclusive<u64>> {
    let last = offset.checked_add(len)?.checked_sub(1)?;
    (len > 0).then_some((offset >> AL_EXTENT_SHIFT)..=(last >> AL_EXTENT_SHIFT))
}

/// The first byte of an extent.
pub fn extent_offset(extent: u64) -> u64 {
    extent << AL_EXTENT_SHIFT
}

/// Why `prepare` or `mark_clean` cannot proceed now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AlError {
    /// Every slot that could be reused is held by in-flight I/O or waits for a transaction, a
    /// transaction is still being written, or the next one is full. Retry after a `release` or
    /// `commit`.
    #[error(
        "activity log busy: retry after in-flight I/O completes or the pending transaction commits"
    )]
    Busy,
    /// The range can never fit one transaction; the caller must split it.
    #[error(
        "the range spans {extents} activity-log extents, but one transaction holds at most {max}"
    )]
    TooLarge { extents: u64, max: u64 },
    /// The next transaction's sequence number would reach 2^63 (see `SEQ_LIMIT`): only
    /// metadata not written by this software gets here, and writing it would leave a log
    /// that loading refuses.
    #[error("the activity log's next sequence number {next} is beyond 2^63 transactions: the metadata was not written by blkrepl's counter; recreate it (`blkrepl create-md --force`, then a full resync)")]
    Exhausted { next: u64 },
}

/// One transaction block, ready to be written at ring position `ring_index`.
#[derive(Clone)]
pub struct AlTransaction {
    seq: u64,
    ring_index: usize,
    empties_log: bool,
    bytes: Box<Block>,
}

impl AlTransaction {
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Position in the ring, in blocks.
    pub fn ring_index(&self) -> usize {
        self.ring_index
    }

    pub fn bytes(&self) -> &Block {
        &self.bytes
    }

    /// Whether this transaction empties the whole log (from `mark_clean`).
    pub fn empties_log(&self) -> bool {
        self.empties_log
    }
}

impl std::fmt::Debug for AlTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlTransaction")
            .field("seq", &self.seq)
            .field("ring_index", &self.ring_index)
            .finish_non_exhaustive()
    }
}

/// A change of the hot set that must become durable before the writes it covers are submitted.
///
/// Protocol: persist the bitmap pages covering every `evicted` extent (for every peer), then
/// write `transaction` durably, then [`ActivityLog::commit`].
#[derive(Debug, Clone)]
pub struct AlUpdate {
    pub transaction: AlTransaction,
    /// Extents leaving the log, sorted.
    pub evicted: Vec<u64>,
    added: Vec<u64>,
}

impl AlUpdate {
    /// The extents it makes hot.
    pub fn added(&self) -> &[u64] {
        &self.added
    }
}

/// The outcome of [`ActivityLog::join`]; either way the range's reference counts are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlJoined {
    /// Every extent was already durably hot: submit the I/O now.
    AllHot,
    /// Some extent is hot only in a transaction not yet durable: submit the I/O once
    /// transaction `seq` is committed (the pending one, or the open batch sealed after it).
    Batched { seq: u64 },
}

/// The outcome of [`ActivityLog::prepare`]; either way the range's reference counts are taken.
#[derive(Debug)]
pub enum AlPrepared {
    /// Every extent was already durably hot: submit the I/O now.
    AllHot,
    /// Make the update durable first (see [`AlUpdate`]).
    Transaction(AlUpdate),
}

#[derive(Debug, Clone, Copy)]
struct Hot {
    /// In-flight I/O holding the extent; only an unreferenced extent may be evicted.
    refs: u32,
    last_use: u64,
    /// Added by transaction `seq`, not yet committed: not durable, so no I/O may rely on it
    /// before that.
    pending: Option<u64>,
}

/// The slot updates gathered for the next transaction (see [`ActivityLog::join`]).
#[derive(Debug, Default)]
struct Batch {
    updates: Vec<(usize, u64)>,
    evicted: Vec<u64>,
    added: Vec<u64>,
}

/// The in-memory activity log.
pub struct ActivityLog {
    slots: Vec<Option<u64>>,
    hot: HashMap<u64, Hot>,
    tick: u64,
    next_seq: u64,
    /// The sealed transaction not yet committed.
    pending: Option<u64>,
    /// Updates not yet sealed, for transaction `next_seq`: gathered while the pending one is
    /// written, sealed once it is committed.
    open: Batch,
}

impl ActivityLog {
    /// An empty log with `al_extents` slots, as after `create-md`.
    pub fn new(al_extents: u32) -> ActivityLog {
        ActivityLog {
            slots: vec![None; al_extents as usize],
            hot: HashMap::new(),
            tick: 0,
            next_seq: 1,
            pending: None,
            open: Batch::default(),
        }
    }

    /// Rebuilds the log from the ring (`AL_RING_BLOCKS` blocks, position order). Blocks without
    /// the magic or with a bad checksum (never written, or torn) are skipped. A checksummed block
    /// that makes no sense, or a gap in the sequence, is corruption: the hot set cannot be
    /// trusted, and guessing could under-report.
    ///
    /// # Panics
    /// If `ring` does not hold exactly `AL_RING_BLOCKS` blocks.
    pub fn recover(al_extents: u32, ring: &[Block]) -> Result<ActivityLog, MetaError> {
        assert_eq!(ring.len(), AL_RING_BLOCKS, "activity-log ring length");
        let mut txs = Vec::new();
        for (position, block) in ring.iter().enumerate() {
            if let Some(tx) = Decoded::parse(block, al_extents)? {
                if tx.seq % AL_RING_BLOCKS as u64 != position as u64 {
                    return Err(MetaError::corrupt(format!(
                        "activity-log transaction {} found at ring position {position}",
                        tx.seq
                    )));
                }
                txs.push(tx);
            }
        }
        txs.sort_by_key(|tx| tx.seq);
        let mut log = ActivityLog::new(al_extents);
        if let (Some(oldest), Some(newest)) = (txs.first(), txs.last()) {
            if newest.seq - oldest.seq + 1 != txs.len() as u64 {
                return Err(MetaError::corrupt(format!(
                    "the activity-log ring has lost transactions between {} and {}; the set of \
                     extents to resync is unknown, recreate the metadata (full resync)",
                    oldest.seq, newest.seq
                )));
            }
            log.next_seq = newest.seq + 1;
        }
        for tx in &txs {
            tx.apply(&mut log.slots);
        }
        for extent in log.slots.iter_mut() {
            if let Some(e) = *extent {
                // Only media damage inside the window could duplicate an extent; keep one.
                match log.hot.entry(e) {
                    Entry::Occupied(_) => *extent = None,
                    Entry::Vacant(v) => {
                        v.insert(Hot { refs: 0, last_use: 0, pending: None });
                    }
                }
            }
        }
        Ok(log)
    }

    /// Fails if a recovered extent lies beyond the `data_size` bytes of the device: a checksummed
    /// transaction that names one was not written for this device, and the rest of the log is
    /// no more to be trusted than it (the extents to resync after a crash would be guessed).
    pub fn check_within(&self, data_size: u64) -> Result<(), MetaError> {
        let extents = data_size.div_ceil(AL_EXTENT_SIZE);
        match self.hot.keys().copied().filter(|e| *e >= extents).max() {
            None => Ok(()),
            Some(e) => Err(MetaError::corrupt(format!(
                "the activity log names extent {e}, beyond the {extents} extents of the {data_size}-byte \
                 device; the extents to resync are unknown, recreate the metadata (full resync)"
            ))),
        }
    }

    pub fn al_extents(&self) -> u32 {
        self.slots.len() as u32
    }

    /// The most extents one `prepare` may span; larger requests must be split.
    pub fn max_extents_per_prepare(&self) -> u64 {
        self.slots.len().min(AL_MAX_UPDATES) as u64
    }

    /// The hot extents, sorted: after a crash as primary, these must be resynced.
    pub fn hot_extents(&self) -> Vec<u64> {
        let mut extents: Vec<u64> = self.hot.keys().copied().collect();
        extents.sort_unstable();
        extents
    }

    /// Takes a reference on every extent of the range for an I/O about to be submitted, making
    /// cold extents hot by a transaction of their own. Nothing is taken on error; `Busy` while
    /// another transaction is pending or gathered and the range is not durably hot.
    pub fn prepare(&mut self, extents: RangeInclusive<u64>) -> Result<AlPrepared, AlError> {
        let durably_hot = extents.clone().all(|e| self.hot.get(&e).is_some_and(|h| h.pending.is_none()));
        if !durably_hot && (self.pending.is_some() || self.batch_open()) {
            return Err(AlError::Busy);
        }
        match self.join(extents)? {
            AlJoined::AllHot => Ok(AlPrepared::AllHot),
            AlJoined::Batched { .. } => Ok(AlPrepared::Transaction(self.seal().expect("a batch was joined"))),
        }
    }

    /// Takes a reference on every extent of the range for an I/O about to be submitted; cold
    /// extents join the open batch, which one transaction makes durable for every I/O that
    /// joined it ([`ActivityLog::seal`]): writes that arrive together, or while the pending
    /// transaction is written, share one metadata write and one flush instead of paying one
    /// each. Nothing is taken on error; `Busy` when no slot is free or the batch is full.
    pub fn join(&mut self, extents: RangeInclusive<u64>) -> Result<AlJoined, AlError> {
        let (first, last) = (*extents.start(), *extents.end());
        if first > last {
            return Ok(AlJoined::AllHot);
        }
        let count = last - first + 1;
        let max = self.max_extents_per_prepare();
        if count > max {
            return Err(AlError::TooLarge { extents: count, max });
        }
        let mut cold = Vec::new();
        let mut durable_after = None;
        for e in first..=last {
            match self.hot.get(&e) {
                Some(h) => durable_after = durable_after.max(h.pending),
                None => cold.push(e),
            }
        }
        if !cold.is_empty() {
            if self.open.updates.len() + cold.len() > AL_MAX_UPDATES {
                return Err(AlError::Busy);
            }
            self.check_room()?;
            durable_after = Some(self.next_seq);
        }
        let victims = self.choose_slots(cold.len(), first..=last).ok_or(AlError::Busy)?;
        self.tick += 1;
        for (&slot, &e) in victims.iter().zip(&cold) {
            if let Some(old) = self.slots[slot].replace(e) {
                self.hot.remove(&old);
                self.open.evicted.push(old);
            }
            self.hot.insert(e, Hot { refs: 0, last_use: 0, pending: Some(self.next_seq) });
            self.open.updates.push((slot, e));
            // An extent evicted earlier in this batch and wanted again stays: it never left.
            self.open.evicted.retain(|&old| old != e);
            self.open.added.push(e);
        }
        for e in first..=last {
            if let Some(h) = self.hot.get_mut(&e) {
                h.refs += 1;
                h.last_use = self.tick;
            }
        }
        Ok(match durable_after {
            None => AlJoined::AllHot,
            Some(seq) => AlJoined::Batched { seq },
        })
    }

    /// Whether I/O waits for the open batch (see [`ActivityLog::seal`]).
    fn batch_open(&self) -> bool {
        !self.open.updates.is_empty()
    }

    /// The open batch as one transaction, now pending: make it durable (see [`AlUpdate`]),
    /// then [`ActivityLog::commit`] it. `None` when no I/O joined a batch, or while another
    /// transaction is pending (the ring takes them one after the other).
    pub fn seal(&mut self) -> Option<AlUpdate> {
        if self.open.updates.is_empty() || self.pending.is_some() {
            return None;
        }
        let Batch { updates, mut evicted, added } = std::mem::take(&mut self.open);
        evicted.sort_unstable();
        let transaction = self.transaction(KIND_UPDATE, &updates);
        Some(AlUpdate { transaction, evicted, added })
    }

    /// Records that `update`'s transaction is durable: its extents may now be relied upon.
    ///
    /// # Panics
    /// If `update` is not the pending transaction of this log.
    pub fn commit(&mut self, update: AlUpdate) {
        let seq = update.transaction.seq;
        assert_eq!(self.pending, Some(seq), "commit of a foreign AL update");
        self.pending = None;
        for e in update.added {
            if let Some(h) = self.hot.get_mut(&e).filter(|h| h.pending == Some(seq)) {
                h.pending = None;
            }
        }
    }

    /// One more reference on extents `prepare` made hot (a write that also waits for a peer's
    /// barrier ack holds them until then).
    ///
    /// # Panics
    /// If an extent of the range is not hot.
    pub fn retain(&mut self, extents: RangeInclusive<u64>) {
        for e in extents {
            match self.hot.get_mut(&e) {
                Some(h) => h.refs += 1,
                None => panic!("activity-log retain of extent {e} that is not hot"),
            }
        }
    }

    /// Drops the references `prepare` took, once the I/O completed locally and on every peer.
    ///
    /// # Panics
    /// If an extent of the range holds no reference: the caller's accounting is broken, and
    /// carrying on could evict an extent with writes in flight.
    pub fn release(&mut self, extents: RangeInclusive<u64>) {
        for e in extents {
            match self.hot.get_mut(&e) {
                Some(h) if h.refs > 0 => h.refs -= 1,
                _ => panic!("activity-log release of extent {e} that holds no reference"),
            }
        }
    }

    /// A transaction that empties the log (clean shutdown, or after the hot extents were marked
    /// out of sync following a crash). `evicted` lists every extent that was hot.
    pub fn mark_clean(&mut self) -> Result<AlUpdate, AlError> {
        if self.pending.is_some() || self.batch_open() || self.hot.values().any(|h| h.refs > 0) {
            return Err(AlError::Busy);
        }
        self.check_room()?;
        let evicted = self.hot_extents();
        self.hot.clear();
        self.slots.fill(None);
        let transaction = self.transaction(KIND_CLEAR, &[]);
        Ok(AlUpdate { transaction, evicted, added: Vec::new() })
    }

    /// `n` slots to (re)use, empty ones first, then least recently used unreferenced ones
    /// outside `keep`. `None` if there are not enough.
    fn choose_slots(&self, n: usize, keep: RangeInclusive<u64>) -> Option<Vec<usize>> {
        if n == 0 {
            return Some(Vec::new());
        }
        let mut candidates: Vec<(bool, u64, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(slot, extent)| match extent {
                None => Some((false, 0, slot)),
                Some(e) => {
                    let h = self.hot.get(e)?;
                    (h.refs == 0 && h.pending.is_none() && !keep.contains(e))
                        .then_some((true, h.last_use, slot))
                }
            })
            .collect();
        if candidates.len() < n {
            return None;
        }
        candidates.select_nth_unstable(n - 1);
        candidates.truncate(n);
        candidates.sort_unstable();
        Some(candidates.into_iter().map(|(_, _, slot)| slot).collect())
    }

    /// Whether one more transaction stays below `SEQ_LIMIT` (so what is written loads again).
    fn check_room(&self) -> Result<(), AlError> {
        if self.next_seq >= SEQ_LIMIT {
            return Err(AlError::Exhausted { next: self.next_seq });
        }
        Ok(())
    }

    /// Encodes the next transaction from the (already updated) slot table and marks it pending.
    fn transaction(&mut self, kind: u16, updates: &[(usize, u64)]) -> AlTransaction {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending = Some(seq);
        let n_slots = self.slots.len() as u64;
        let n_ctx = self.slots.len().min(AL_CONTEXT_PER_TRANSACTION);
        let ctx_start = (seq % n_slots) * n_ctx as u64 % n_slots;
        let mut b = Box::new([0u8; BLOCK_SIZE]);
        b[..8].copy_from_slice(MAGIC);
        le::put_u32(&mut b[..], 8, VERSION);
        le::put_u64(&mut b[..], 16, seq);
        le::put_u32(&mut b[..], 24, n_slots as u32);
        le::put_u16(&mut b[..], 28, kind);
        le::put_u16(&mut b[..], 30, updates.len() as u16);
        le::put_u32(&mut b[..], 32, ctx_start as u32);
        le::put_u16(&mut b[..], 36, n_ctx as u16);
        for i in 0..n_ctx {
            let slot = ((ctx_start + i as u64) % n_slots) as usize;
            le::put_u64(&mut b[..], CONTEXT_OFFSET + i * 8, self.slots[slot].unwrap_or(EMPTY));
        }
        for (i, &(slot, extent)) in updates.iter().enumerate() {
            let at = UPDATES_OFFSET + i * UPDATE_SIZE;
            le::put_u16(&mut b[..], at, slot as u16);
            le::put_u64(&mut b[..], at + 2, extent);
        }
        let crc = block_crc(&b, CRC_OFFSET);
        le::put_u32(&mut b[..], CRC_OFFSET, crc);
        AlTransaction {
            seq,
            ring_index: (seq % AL_RING_BLOCKS as u64) as usize,
            empties_log: kind == KIND_CLEAR,
            bytes: b,
        }
    }
}

impl std::fmt::Debug for ActivityLog {
    /// A summary: the slot table can have thousands of entries.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivityLog")
            .field("al_extents", &self.slots.len())
            .field("hot", &self.hot.len())
            .field("next_seq", &self.next_seq)
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

/// A transaction read back from the ring.
struct Decoded {
    seq: u64,
    clear: bool,
    ctx_start: usize,
    context: Vec<Option<u64>>,
    updates: Vec<(usize, Option<u64>)>,
}

fn extent_or_empty(raw: u64) -> Option<u64> {
    (raw != EMPTY).then_some(raw)
}

impl Decoded {
    /// `Ok(None)` for a block that is not a (complete) transaction.
    fn parse(b: &Block, al_extents: u32) -> Result<Option<Decoded>, MetaError> {
        if &b[..8] != MAGIC || le::u32_at(b, CRC_OFFSET) != block_crc(b, CRC_OFFSET) {
            return Ok(None);
        }
        let version = le::u32_at(b, 8);
        if version != VERSION {
            return Err(MetaError::UnsupportedVersion { found: version, supported: VERSION });
        }
        let seq = le::u64_at(b, 16);
        let bad =
            |what: String| MetaError::corrupt(format!("activity-log transaction {seq}: {what}"));
        if seq >= SEQ_LIMIT {
            return Err(bad("a sequence number beyond 2^63 transactions".into()));
        }
        let written_for = le::u32_at(b, 24);
        if written_for != al_extents {
            return Err(bad(format!(
                "written for {written_for} extents, but the superblock says {al_extents}"
            )));
        }
        let kind = le::u16_at(b, 28);
        let n_updates = usize::from(le::u16_at(b, 30));
        let ctx_start = le::u32_at(b, 32) as usize;
        let n_ctx = usize::from(le::u16_at(b, 36));
        let n_slots = al_extents as usize;
        if kind != KIND_UPDATE && kind != KIND_CLEAR {
            return Err(bad(format!("unknown kind {kind}")));
        }
        if n_updates > AL_MAX_UPDATES
            || n_ctx != n_slots.min(AL_CONTEXT_PER_TRANSACTION)
            || ctx_start >= n_slots
        {
            return Err(bad(format!(
                "impossible counts ({n_updates} updates, {n_ctx} context entries from slot \
                 {ctx_start})"
            )));
        }
        let context =
            (0..n_ctx).map(|i| extent_or_empty(le::u64_at(b, CONTEXT_OFFSET + i * 8))).collect();
        let mut updates = Vec::with_capacity(n_updates);
        for i in 0..n_updates {
            let at = UPDATES_OFFSET + i * UPDATE_SIZE;
            let slot = usize::from(le::u16_at(b, at));
            if slot >= n_slots {
                return Err(bad(format!("update of slot {slot} of {n_slots}")));
            }
            updates.push((slot, extent_or_empty(le::u64_at(b, at + 2))));
        }
        Ok(Some(Decoded { seq, clear: kind == KIND_CLEAR, ctx_start, context, updates }))
    }

    /// Applies this transaction to the slot table being rebuilt.
    fn apply(&self, slots: &mut [Option<u64>]) {
        if self.clear {
            slots.fill(None);
        }
        for &(slot, extent) in &self.updates {
            slots[slot] = extent;
        }
        let n = slots.len();
        for (i, &extent) in self.context.iter().enumerate() {
            slots[(self.ctx_start + i) % n] = extent;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An empty ring, as `create-md` leaves it.
    fn blank_ring() -> Vec<Block> {
        vec![[0; BLOCK_SIZE]; AL_RING_BLOCKS]
    }

    /// Prepares, "writes" into `ring` and commits; returns the evicted extents.
    fn make_hot(al: &mut ActivityLog, ring: &mut [Block], range: RangeInclusive<u64>) -> Vec<u64> {
        match al.prepare(range).unwrap() {
            AlPrepared::AllHot => Vec::new(),
            AlPrepared::Transaction(update) => {
                let tx = &update.transaction;
                ring[tx.ring_index()] = *tx.bytes();
                let evicted = update.evicted.clone();
                al.commit(update);
                evicted
            }
        }
    }

    #[test]
    fn extent_arithmetic() {
        assert_eq!(extents_for(0, 4096), Some(0..=0));
        assert_eq!(extents_for(AL_EXTENT_SIZE - 1, 2), Some(0..=1));
        assert_eq!(extents_for(3 * AL_EXTENT_SIZE, AL_EXTENT_SIZE), Some(3..=3));
        assert_eq!(extents_for(5, 0), None);
        assert_eq!(extents_for(u64::MAX, 2), None);
        assert_eq!(extent_offset(3), 3 * AL_EXTENT_SIZE);
        assert_eq!(AL_MAX_UPDATES, 200);
    }

    #[test]
    fn hot_extents_need_no_transaction_and_lru_evicts_unreferenced_only() {
        let mut al = ActivityLog::new(7);
        let mut ring = blank_ring();
        for e in 0..7 {
            assert!(make_hot(&mut al, &mut ring, e..=e).is_empty());
        }
        assert!(matches!(al.prepare(3..=3), Ok(AlPrepared::AllHot)));
        // All seven slots referenced: an eighth extent has to wait.
        assert_eq!(al.prepare(100..=100).unwrap_err(), AlError::Busy);
        for e in [0, 1, 2, 4, 5] {
            al.release(e..=e);
        }
        // Extent 0 is least recently used among the unreferenced.
        assert_eq!(make_hot(&mut al, &mut ring, 100..=100), vec![0]);
        assert_eq!(make_hot(&mut al, &mut ring, 101..=102), vec![1, 2]);
        assert_eq!(al.hot_extents(), vec![3, 4, 5, 6, 100, 101, 102]);
        let recovered = ActivityLog::recover(7, &ring).unwrap();
        assert_eq!(recovered.hot_extents(), al.hot_extents());
        assert_eq!(al.prepare(0..=200).unwrap_err(), AlError::TooLarge { extents: 201, max: 7 });
    }

    #[test]
    fn pending_transaction_blocks_only_what_depends_on_it() {
        let mut al = ActivityLog::new(64);
        let mut ring = blank_ring();
        make_hot(&mut al, &mut ring, 1..=1);
        let Ok(AlPrepared::Transaction(update)) = al.prepare(2..=3) else {
            panic!("cold extents need a transaction");
        };
        assert_eq!(al.prepare(3..=3).unwrap_err(), AlError::Busy, "not durable yet");
        assert_eq!(al.prepare(9..=9).unwrap_err(), AlError::Busy, "one transaction at a time");
        assert!(matches!(al.prepare(1..=1), Ok(AlPrepared::AllHot)), "durable ones proceed");
        assert_eq!(al.mark_clean().unwrap_err(), AlError::Busy);
        al.commit(update);
        assert!(matches!(al.prepare(3..=3), Ok(AlPrepared::AllHot)));
    }

    /// Writes `update`'s transaction into `ring` and commits it.
    fn write_and_commit(al: &mut ActivityLog, ring: &mut [Block], update: AlUpdate) {
        ring[update.transaction.ring_index()] = *update.transaction.bytes();
        al.commit(update);
    }

    #[test]
    fn writes_that_arrive_together_share_one_transaction() {
        let mut al = ActivityLog::new(64);
        let mut ring = blank_ring();
        make_hot(&mut al, &mut ring, 1..=1);
        // Transaction 1 made extent 1 hot; the next one is 2.
        assert_eq!(al.join(1..=1), Ok(AlJoined::AllHot), "durably hot");
        assert_eq!(al.join(2..=2), Ok(AlJoined::Batched { seq: 2 }));
        assert_eq!(al.join(5..=6), Ok(AlJoined::Batched { seq: 2 }));
        assert_eq!(al.join(2..=2), Ok(AlJoined::Batched { seq: 2 }), "hot only in the open batch");
        assert_eq!(al.join(1..=2), Ok(AlJoined::Batched { seq: 2 }));
        assert_eq!(al.prepare(9..=9).unwrap_err(), AlError::Busy, "no transaction of its own beside a batch");
        assert_eq!(al.mark_clean().unwrap_err(), AlError::Busy);
        let update = al.seal().expect("a batch");
        assert_eq!(update.transaction.seq(), 2);
        assert_eq!(update.added, vec![2, 5, 6]);
        assert!(update.evicted.is_empty());
        assert!(al.seal().is_none(), "one transaction for the whole batch");
        // While it is written, writes gather for the next one.
        assert_eq!(al.join(5..=5), Ok(AlJoined::Batched { seq: 2 }), "not durable before 2");
        assert_eq!(al.join(9..=9), Ok(AlJoined::Batched { seq: 3 }));
        assert_eq!(al.join(5..=9), Ok(AlJoined::Batched { seq: 3 }));
        assert_eq!(al.join(1..=1), Ok(AlJoined::AllHot), "durable ones proceed");
        assert!(al.seal().is_none(), "the ring takes one transaction after the other");
        assert_eq!(al.mark_clean().unwrap_err(), AlError::Busy);
        write_and_commit(&mut al, &mut ring, update);
        assert_eq!(al.join(5..=5), Ok(AlJoined::AllHot));
        assert_eq!(al.join(9..=9), Ok(AlJoined::Batched { seq: 3 }));
        let next = al.seal().expect("the batch gathered meanwhile");
        assert_eq!((next.transaction.seq(), next.added.clone()), (3, vec![9, 7, 8]));
        write_and_commit(&mut al, &mut ring, next);
        assert_eq!(ActivityLog::recover(64, &ring).unwrap().hot_extents(), vec![1, 2, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn a_batch_evicts_only_what_it_does_not_take_back() {
        let mut al = ActivityLog::new(3);
        let mut ring = blank_ring();
        for e in 0..3 {
            make_hot(&mut al, &mut ring, e..=e);
            al.release(e..=e);
        }
        assert_eq!(al.join(10..=11), Ok(AlJoined::Batched { seq: 4 }));
        // 0 left for 10 and comes back in the same transaction, in the slot 2 leaves: it never
        // left the log on disk, so it needs no bitmap pages and no flush.
        assert_eq!(al.join(0..=0), Ok(AlJoined::Batched { seq: 4 }));
        let update = al.seal().expect("a batch");
        assert_eq!(update.evicted, vec![1, 2]);
        assert_eq!(update.added, vec![10, 11, 0]);
        // Nothing pending is evicted: a fourth extent finds no slot.
        assert_eq!(al.join(12..=12).unwrap_err(), AlError::Busy);
        write_and_commit(&mut al, &mut ring, update);
        assert_eq!(al.hot_extents(), vec![0, 10, 11]);
        assert_eq!(ActivityLog::recover(3, &ring).unwrap().hot_extents(), vec![0, 10, 11]);
    }

    #[test]
    fn a_batch_holds_what_one_transaction_can_carry() {
        let mut al = ActivityLog::new(300);
        let mut ring = blank_ring();
        make_hot(&mut al, &mut ring, 1000..=1000);
        for e in 0..AL_MAX_UPDATES as u64 {
            assert_eq!(al.join(e..=e), Ok(AlJoined::Batched { seq: 2 }));
        }
        assert_eq!(al.join(500..=500).unwrap_err(), AlError::Busy, "for the next transaction");
        assert_eq!(al.join(1000..=1000), Ok(AlJoined::AllHot));
        let update = al.seal().expect("a batch");
        assert_eq!(update.added.len(), AL_MAX_UPDATES);
        assert_eq!(al.join(500..=500), Ok(AlJoined::Batched { seq: 3 }));
        write_and_commit(&mut al, &mut ring, update);
        let update = al.seal().expect("the next batch");
        write_and_commit(&mut al, &mut ring, update);
        assert_eq!(ActivityLog::recover(300, &ring).unwrap().hot_extents().len(), AL_MAX_UPDATES + 2);
    }

    #[test]
    fn mark_clean_empties_the_recovered_set() {
        let mut al = ActivityLog::new(100);
        let mut ring = blank_ring();
        make_hot(&mut al, &mut ring, 10..=20);
        assert_eq!(al.mark_clean().unwrap_err(), AlError::Busy, "references held");
        al.release(10..=20);
        let update = al.mark_clean().unwrap();
        assert_eq!(update.evicted, (10..=20).collect::<Vec<_>>());
        ring[update.transaction.ring_index()] = *update.transaction.bytes();
        al.commit(update);
        assert!(ActivityLog::recover(100, &ring).unwrap().hot_extents().is_empty());
        make_hot(&mut al, &mut ring, 5..=5);
        let recovered = ActivityLog::recover(100, &ring).unwrap();
        assert_eq!(recovered.hot_extents(), vec![5]);
        assert_eq!(recovered.next_seq, al.next_seq);
    }

    #[test]
    fn an_extent_beyond_the_device_is_corruption() {
        let mut al = ActivityLog::new(8);
        let mut ring = blank_ring();
        make_hot(&mut al, &mut ring, 3..=3);
        let recovered = ActivityLog::recover(8, &ring).unwrap();
        assert!(recovered.check_within(4 * AL_EXTENT_SIZE).is_ok());
        assert!(recovered.check_within(3 * AL_EXTENT_SIZE + 1).is_ok(), "a last extent cut short");
        let err = recovered.check_within(3 * AL_EXTENT_SIZE).unwrap_err();
        assert!(matches!(&err, MetaError::Corrupt { .. }) && err.to_string().contains("extent 3"), "{err}");
    }

    /// A checksummed transaction whose sequence number leaves the counter no room (u64::MAX
    /// overflowed `next_seq` at recovery, u64::MAX - 1 at the next transaction; a wrapped
    /// sequence number then read as a gap) is refused at recovery.
    #[test]
    fn a_sequence_number_beyond_2_63_is_corruption() {
        for seq in [SEQ_LIMIT, u64::MAX - 1] {
            // The writer refuses such numbers: a transaction written with another, renumbered.
            let mut al = ActivityLog::new(7);
            let mut ring = blank_ring();
            make_hot(&mut al, &mut ring, 0..=0);
            let block = ring.iter_mut().find(|b| &b[..8] == MAGIC).expect("the transaction");
            le::put_u64(block, 16, seq);
            let crc = block_crc(block, CRC_OFFSET);
            le::put_u32(block, CRC_OFFSET, crc);
            let err = ActivityLog::recover(7, &ring).unwrap_err();
            assert!(matches!(&err, MetaError::Corrupt { .. }) && err.to_string().contains("2^63"), "{err}");
        }
        let mut al = ActivityLog::new(7);
        al.next_seq = SEQ_LIMIT - 1;
        let mut ring = blank_ring();
        make_hot(&mut al, &mut ring, 0..=0);
        let mut recovered = ActivityLog::recover(7, &ring).unwrap();
        assert_eq!(recovered.next_seq, SEQ_LIMIT);
        // It loads, but no transaction may follow (it would not load): refused, log unchanged.
        let hot = recovered.hot_extents();
        assert!(matches!(recovered.mark_clean(), Err(AlError::Exhausted { next }) if next == SEQ_LIMIT));
        assert!(matches!(recovered.prepare(3..=3), Err(AlError::Exhausted { .. })));
        assert_eq!(recovered.hot_extents(), hot);
        assert!(matches!(recovered.prepare(0..=0), Ok(AlPrepared::AllHot)), "a hot extent needs no transaction");
    }

    #[test]
    fn recover_rejects_gaps_foreign_sizes_and_misplaced_blocks() {
        let mut al = ActivityLog::new(7);
        let mut ring = blank_ring();
        for e in 0..5 {
            make_hot(&mut al, &mut ring, e..=e);
            al.release(e..=e);
        }
        assert!(matches!(ActivityLog::recover(8, &ring), Err(MetaError::Corrupt { .. })));
        let mut gap = ring.clone();
        gap[2][100] ^= 1; // transaction 2 of 1..=5 damaged
        assert!(matches!(ActivityLog::recover(7, &gap), Err(MetaError::Corrupt { .. })));
        let mut newest_torn = ring.clone();
        newest_torn[5][100] ^= 1;
        assert_eq!(ActivityLog::recover(7, &newest_torn).unwrap().hot_extents(), vec![0, 1, 2, 3]);
        let mut misplaced = ring.clone();
        misplaced.swap(1, 9);
        assert!(matches!(ActivityLog::recover(7, &misplaced), Err(MetaError::Corrupt { .. })));
        let mut future = ring;
        future[1][8] = 2;
        let crc = block_crc(&future[1], CRC_OFFSET);
        le::put_u32(&mut future[1], CRC_OFFSET, crc);
        assert!(matches!(
            ActivityLog::recover(7, &future),
            Err(MetaError::UnsupportedVersion { found: 2, .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Whatever the history, dropping the newest transaction (torn) recovers exactly the hot
        /// set committed before it, and keeping it recovers the current one: the rotating context
        /// covers the whole table.
        #[test]
        fn ring_replay_rebuilds_the_table(
            al_extents in prop_oneof![Just(7u32), Just(300), Just(MAX_AL_EXTENTS)],
            ops in prop::collection::vec(
                (0..20_000u64, 1..4u64, prop::bool::weighted(0.02)),
                1..120,
            ),
        ) {
            let mut al = ActivityLog::new(al_extents);
            let mut ring = blank_ring();
            let mut before_last = Vec::new();
            let mut last_tx = None;
            for (first, len, clean) in ops {
                let range = first..=first + len - 1;
                if clean {
                    let update = al.mark_clean().unwrap();
                    before_last = al_hot_before(&ring, al_extents);
                    ring[update.transaction.ring_index()] = *update.transaction.bytes();
                    last_tx = Some(update.transaction.ring_index());
                    al.commit(update);
                    continue;
                }
                match al.prepare(range.clone()).unwrap() {
                    AlPrepared::AllHot => {}
                    AlPrepared::Transaction(update) => {
                        before_last = al_hot_before(&ring, al_extents);
                        ring[update.transaction.ring_index()] = *update.transaction.bytes();
                        last_tx = Some(update.transaction.ring_index());
                        al.commit(update);
                    }
                }
                al.release(range);
            }
            let recovered = ActivityLog::recover(al_extents, &ring).unwrap();
            prop_assert_eq!(recovered.hot_extents(), al.hot_extents());
            if let Some(i) = last_tx {
                ring[i][4095] ^= 0xff;
                let torn = ActivityLog::recover(al_extents, &ring).unwrap();
                prop_assert_eq!(torn.hot_extents(), before_last);
            }
        }
    }

    fn al_hot_before(ring: &[Block], al_extents: u32) -> Vec<u64> {
        ActivityLog::recover(al_extents, ring).unwrap().hot_extents()
    }
}
