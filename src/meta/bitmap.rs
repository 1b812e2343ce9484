//! The quick-sync bitmap: one bit per `block_size` bytes of data, per peer.
//!
//! A set bit means "this block may differ on that peer". The one rule every caller relies on:
//! **over-report, never under-report**. Setting marks every block a byte range touches; clearing
//! only clears blocks the range covers completely, because the rest of a partially covered block
//! may still differ.
//!
//! Bits are kept in 64-bit words and every range operation works a word at a time, so marking a
//! whole 1 TiB device costs a few million word writes, not billions of bit operations. The weight
//! (number of set bits) is maintained incrementally. Changed 4 KiB pages are tracked so the store
//! writes back only what changed.
//!
//! On disk each 4 KiB page holds 511 words of bits and a trailer: the page's crc32c and its
//! index. A page that fails either check (torn by a crash, damaged on the medium, zeroed,
//! written elsewhere) loads with every one of its bits set: which of its blocks differ is
//! unknown, and over-reporting costs only resync. Without the trailer a page that lost set bits
//! while the bitmap was dirty would go unnoticed (the whole-bitmap checksum only exists after a
//! clean shutdown).

use std::ops::Range;

use super::{block_crc, le, Block, MetaError, BLOCK_SIZE};

/// 64-bit words of bits in one on-disk page; the last 8 bytes are the trailer.
const WORDS_PER_PAGE: usize = BLOCK_SIZE / 8 - 1;
/// Bits in one on-disk page.
pub const BITS_PER_PAGE: u64 = WORDS_PER_PAGE as u64 * 64;
/// Where a page's crc32c sits (computed with these 4 bytes as zero), then its index.
pub(super) const PAGE_CRC_OFFSET: usize = WORDS_PER_PAGE * 8;
const PAGE_INDEX_OFFSET: usize = PAGE_CRC_OFFSET + 4;

/// How a page read from disk was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageLoad {
    Intact,
    /// Its checksum or index did not match: every bit of it is set now, and it is dirty, so the
    /// next write-out stores it intact.
    Damaged,
}

/// On-disk pages needed for a bitmap of `blocks` bits.
pub fn pages_for_blocks(blocks: u64) -> u64 {
    blocks.div_ceil(BITS_PER_PAGE)
}

/// A run of set bits received from a peer that does not fit this bitmap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bitmap run of {len} blocks at block {start} lies outside the {blocks}-block bitmap")]
pub struct RunOutOfRange {
    pub start: u64,
    pub len: u64,
    pub blocks: u64,
}

/// The out-of-sync bitmap for one peer.
#[derive(Clone)]
pub struct DirtyBitmap {
    data_size: u64,
    block_size: u32,
    blocks: u64,
    /// Padded to whole pages; bits at and beyond `blocks` are always zero.
    words: Vec<u64>,
    weight: u64,
    /// One bit per page changed since the last `take_dirty_pages`.
    dirty: Vec<u64>,
}

/// Bits `lo..hi` of a word (`lo < hi <= 64`).
fn mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi == 64 { u64::MAX } else { (1 << hi) - 1 };
    upper & (u64::MAX << lo)
}

impl DirtyBitmap {
    /// An all-clear bitmap for `data_size_bytes` of data.
    ///
    /// # Panics
    /// If `block_size` is not a power of two (validated `MetaParams` always are).
    pub fn new(data_size_bytes: u64, block_size: u32) -> DirtyBitmap {
        assert!(block_size.is_power_of_two(), "bitmap block size {block_size} not a power of two");
        let blocks = data_size_bytes.div_ceil(u64::from(block_size));
        let pages = pages_for_blocks(blocks) as usize;
        DirtyBitmap {
            data_size: data_size_bytes,
            block_size,
            blocks,
            words: vec![0; pages * WORDS_PER_PAGE],
            weight: 0,
            dirty: vec![0; pages.div_ceil(64)],
        }
    }

    pub fn data_size(&self) -> u64 {
        self.data_size
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Number of bits.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Number of set bits.
    pub fn weight(&self) -> u64 {
        self.weight
    }

    /// Bytes of data the set bits stand for (the last block may be shorter than `block_size`).
    pub fn weight_bytes(&self) -> u64 {
        let bytes = self.weight * u64::from(self.block_size);
        if self.blocks > 0 && self.test_block(self.blocks - 1) {
            bytes - (self.blocks * u64::from(self.block_size) - self.data_size)
        } else {
            bytes
        }
    }

    pub fn test_block(&self, block: u64) -> bool {
        block < self.blocks && self.words[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// Marks every block the byte range touches. Returns how many bits were newly set.
    pub fn set_range(&mut self, offset: u64, len: u64) -> u64 {
        let bs = u64::from(self.block_size);
        let start = offset / bs;
        let end = offset.saturating_add(len).div_ceil(bs).min(self.blocks);
        self.update(start, end, true)
    }

    /// Clears the blocks the byte range covers completely (a block cut short by the end of the
    /// data counts as covered when the range reaches that end). Returns how many bits were
    /// newly cleared.
    pub fn clear_range(&mut self, offset: u64, len: u64) -> u64 {
        let bs = u64::from(self.block_size);
        let start = offset.div_ceil(bs);
        let end_byte = offset.saturating_add(len);
        let end = if end_byte >= self.data_size { self.blocks } else { end_byte / bs };
        self.update(start, end, false)
    }

    /// Sets `count` blocks from `start` (clamped to the bitmap). Returns how many were newly set.
    pub fn set_blocks(&mut self, start: u64, count: u64) -> u64 {
        self.update(start, start.saturating_add(count).min(self.blocks), true)
    }

    /// Clears `count` blocks from `start` (clamped). Returns how many were newly cleared.
    pub fn clear_blocks(&mut self, start: u64, count: u64) -> u64 {
        self.update(start, start.saturating_add(count).min(self.blocks), false)
    }

    pub fn set_all(&mut self) {
        self.update(0, self.blocks, true);
    }

    pub fn clear_all(&mut self) {
        self.update(0, self.blocks, false);
    }

    /// Sets every bit set in `other`. Returns how many were newly set.
    ///
    /// # Panics
    /// If the two bitmaps do not describe the same data geometry.
    pub fn or_with(&mut self, other: &DirtyBitmap) -> u64 {
        assert_eq!(
            (self.data_size, self.block_size),
            (other.data_size, other.block_size),
            "or_with on bitmaps of different geometry"
        );
        let mut newly = 0;
        for (i, (w, o)) in self.words.iter_mut().zip(&other.words).enumerate() {
            let changed = !*w & o;
            if changed != 0 {
                newly += u64::from(changed.count_ones());
                *w |= o;
                self.dirty[i / WORDS_PER_PAGE / 64] |= 1 << (i / WORDS_PER_PAGE % 64);
            }
        }
        self.weight += newly;
        newly
    }

    /// The first run of set bits at or after `from_block`, at most `max_blocks` long.
    pub fn next_run(&self, from_block: u64, max_blocks: u64) -> Option<(u64, u64)> {
        if max_blocks == 0 {
            return None;
        }
        let start = self.find_set(from_block)?;
        let limit = start.saturating_add(max_blocks).min(self.blocks);
        Some((start, self.find_clear(start, limit) - start))
    }

    /// The runs of set bits within blocks `[start, end)`, cut at its edges, in order.
    pub fn runs_within(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let end = end.min(self.blocks);
        let mut from = start;
        std::iter::from_fn(move || {
            let (at, len) = self.next_run(from, end.checked_sub(from)?)?;
            if at >= end {
                return None;
            }
            let len = len.min(end - at);
            from = at + len;
            Some((at, len))
        })
    }

    /// All runs of set bits as `(start_block, len_blocks)`, in order: the compact form for
    /// sending a bitmap to a peer.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut from = 0;
        std::iter::from_fn(move || {
            let (start, len) = self.next_run(from, u64::MAX)?;
            from = start + len;
            Some((start, len))
        })
    }

    /// A bitmap with exactly the given runs set.
    pub fn from_runs(
        data_size_bytes: u64,
        block_size: u32,
        runs: impl IntoIterator<Item = (u64, u64)>,
    ) -> Result<DirtyBitmap, RunOutOfRange> {
        let mut bitmap = DirtyBitmap::new(data_size_bytes, block_size);
        bitmap.or_runs(runs)?;
        Ok(bitmap)
    }

    /// Sets the given runs. Returns how many bits were newly set. On error the runs before the
    /// bad one stay set (harmless: bits only ever over-report).
    pub fn or_runs(
        &mut self,
        runs: impl IntoIterator<Item = (u64, u64)>,
    ) -> Result<u64, RunOutOfRange> {
        let mut newly = 0;
        for (start, len) in runs {
            match start.checked_add(len) {
                Some(end) if end <= self.blocks => newly += self.update(start, end, true),
                _ => return Err(RunOutOfRange { start, len, blocks: self.blocks }),
            }
        }
        Ok(newly)
    }

    /// On-disk pages (4 KiB each).
    pub fn page_count(&self) -> usize {
        self.words.len() / WORDS_PER_PAGE
    }

    /// Page `index` in its on-disk form: little-endian 64-bit words (bit `b` of the page is bit
    /// `b % 64` of word `b / 64`), then the page's crc32c and its index (u32 each).
    pub fn encode_page(&self, index: usize) -> Block {
        let mut page = [0; BLOCK_SIZE];
        let words = &self.words[index * WORDS_PER_PAGE..(index + 1) * WORDS_PER_PAGE];
        for (i, w) in words.iter().enumerate() {
            le::put_u64(&mut page, i * 8, *w);
        }
        le::put_u32(&mut page, PAGE_INDEX_OFFSET, index as u32);
        let crc = block_crc(&page, PAGE_CRC_OFFSET);
        le::put_u32(&mut page, PAGE_CRC_OFFSET, crc);
        page
    }

    /// Replaces page `index` with its on-disk form. An intact page is not marked dirty (it came
    /// from disk); a damaged one is taken as all set (see [`PageLoad::Damaged`]). An intact page
    /// with bits beyond the end of the bitmap was written for another geometry: an error.
    ///
    /// # Panics
    /// If `index >= page_count()`.
    pub fn load_page(&mut self, index: usize, page: &Block) -> Result<PageLoad, MetaError> {
        let intact = le::u32_at(page, PAGE_CRC_OFFSET) == block_crc(page, PAGE_CRC_OFFSET)
            && le::u32_at(page, PAGE_INDEX_OFFSET) as usize == index;
        let first_bit = index as u64 * BITS_PER_PAGE;
        if !intact {
            let end = (first_bit + BITS_PER_PAGE).min(self.blocks);
            self.update(first_bit, end, true);
            self.mark_pages_dirty([index]);
            return Ok(PageLoad::Damaged);
        }
        let mut old = 0;
        let mut new = 0;
        for i in 0..WORDS_PER_PAGE {
            let w = le::u64_at(page, i * 8);
            let bit = first_bit + i as u64 * 64;
            let valid = if bit >= self.blocks { 0 } else { mask(0, (self.blocks - bit).min(64)) };
            if w & !valid != 0 {
                return Err(MetaError::corrupt(format!(
                    "bitmap page {index} has bits set beyond the end of the {}-block bitmap",
                    self.blocks
                )));
            }
            let slot = &mut self.words[index * WORDS_PER_PAGE + i];
            old += u64::from(slot.count_ones());
            new += u64::from(w.count_ones());
            *slot = w;
        }
        self.weight = self.weight - old + new;
        Ok(PageLoad::Intact)
    }

    /// Pages changed since the last call, in order; they count as clean afterwards.
    pub fn take_dirty_pages(&mut self) -> Vec<usize> {
        let mut pages = Vec::new();
        for (i, word) in self.dirty.iter_mut().enumerate() {
            let mut w = std::mem::take(word);
            while w != 0 {
                pages.push(i * 64 + w.trailing_zeros() as usize);
                w &= w - 1;
            }
        }
        pages
    }

    /// Marks pages dirty again, e.g. after writing pages from `take_dirty_pages` failed.
    pub fn mark_pages_dirty(&mut self, pages: impl IntoIterator<Item = usize>) {
        let count = self.page_count();
        for page in pages.into_iter().filter(|&p| p < count) {
            self.dirty[page / 64] |= 1 << (page % 64);
        }
    }

    /// The pages holding the bits of every block the byte range touches (e.g. an activity-log
    /// extent about to be evicted).
    pub fn pages_for_range(&self, offset: u64, len: u64) -> Range<usize> {
        let bs = u64::from(self.block_size);
        let start = (offset / bs).min(self.blocks);
        let end = offset.saturating_add(len).div_ceil(bs).min(self.blocks);
        if len == 0 || start >= end {
            return 0..0;
        }
        (start / BITS_PER_PAGE) as usize..((end - 1) / BITS_PER_PAGE + 1) as usize
    }

    /// crc32c over all pages in their on-disk form.
    pub fn crc32c(&self) -> u32 {
        (0..self.page_count())
            .fold(0, |crc, page| crc32c::crc32c_append(crc, &self.encode_page(page)))
    }

    /// Sets or clears blocks `start..end`, a word at a time. Returns how many bits changed.
    fn update(&mut self, start: u64, end: u64, set: bool) -> u64 {
        if start >= end {
            return 0;
        }
        let (first, last) = (start / 64, (end - 1) / 64);
        let mut changed = 0;
        for i in first..=last {
            let lo = if i == first { start % 64 } else { 0 };
            let hi = if i == last { (end - 1) % 64 + 1 } else { 64 };
            let m = mask(lo, hi);
            let i = i as usize;
            let old = self.words[i];
            let new = if set { old | m } else { old & !m };
            if new != old {
                changed += u64::from((new ^ old).count_ones());
                self.words[i] = new;
                let page = i / WORDS_PER_PAGE;
                self.dirty[page / 64] |= 1 << (page % 64);
            }
        }
        if set {
            self.weight += changed;
        } else {
            self.weight -= changed;
        }
        changed
    }

    /// The first set bit at or after `from`.
    fn find_set(&self, from: u64) -> Option<u64> {
        if from >= self.blocks {
            return None;
        }
        let mut i = (from / 64) as usize;
        let mut w = self.words[i] & (u64::MAX << (from % 64));
        loop {
            if w != 0 {
                // Bits past `blocks` are never set, so this is in range.
                return Some(i as u64 * 64 + u64::from(w.trailing_zeros()));
            }
            i += 1;
            w = *self.words.get(i)?;
        }
    }

    /// The first clear bit in `from..limit`, or `limit` (`limit <= blocks`).
    fn find_clear(&self, from: u64, limit: u64) -> u64 {
        let mut i = (from / 64) as usize;
        let mut w = !self.words[i] & (u64::MAX << (from % 64));
        loop {
            if w != 0 {
                return (i as u64 * 64 + u64::from(w.trailing_zeros())).min(limit);
            }
            i += 1;
            if i as u64 * 64 >= limit {
                return limit;
            }
            w = !self.words[i];
        }
    }
}

impl PartialEq for DirtyBitmap {
    /// Same geometry and same bits; which pages are dirty does not matter.
    fn eq(&self, other: &DirtyBitmap) -> bool {
        self.data_size == other.data_size
            && self.block_size == other.block_size
            && self.words == other.words
    }
}

impl Eq for DirtyBitmap {}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("data_size", &self.data_size)
            .field("block_size", &self.block_size)
            .field("blocks", &self.blocks)
            .field("weight", &self.weight)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn partial_blocks_are_set_but_not_cleared() {
        let mut bm = DirtyBitmap::new(10 * 4096, 4096);
        assert_eq!(bm.set_range(100, 4096), 2);
        assert!(bm.test_block(0) && bm.test_block(1));
        assert_eq!(bm.clear_range(100, 8000), 0, "neither block fully covered");
        assert_eq!(bm.clear_range(0, 4096 + 4095), 1);
        assert!(!bm.test_block(0) && bm.test_block(1));
        assert_eq!(bm.set_range(4096 * 9, 1_000_000), 1, "clamped at the end");
        assert_eq!(bm.weight(), 2);
        assert_eq!(bm.weight_bytes(), 2 * 4096);
        assert_eq!(bm.set_range(0, 0), 0);
    }

    #[test]
    fn short_last_block_counts_and_clears_at_the_end() {
        let mut bm = DirtyBitmap::new(3 * 65536 + 4096, 65536);
        assert_eq!(bm.blocks(), 4);
        bm.set_all();
        assert_eq!(bm.weight_bytes(), 3 * 65536 + 4096);
        assert_eq!(bm.clear_range(3 * 65536, 4096), 1, "reaches the end of the data");
        assert_eq!(bm.weight_bytes(), 3 * 65536);
    }

    #[test]
    fn large_ranges_are_word_level_fast() {
        // 1 TiB at 4 KiB: 2^28 bits. Bit-by-bit would take seconds even in release builds.
        let mut bm = DirtyBitmap::new(1 << 40, 4096);
        let started = std::time::Instant::now();
        bm.set_all();
        assert_eq!(bm.weight(), 1 << 28);
        assert_eq!(bm.next_run(5, u64::MAX), Some((5, (1 << 28) - 5)));
        assert_eq!(bm.clear_range(4096, (1 << 40) - 8192), (1 << 28) - 2);
        assert_eq!(bm.runs().collect::<Vec<_>>(), vec![(0, 1), ((1 << 28) - 1, 1)]);
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }

    #[test]
    fn dirty_pages_and_pages_for_range() {
        let mut bm = DirtyBitmap::new(3 * BITS_PER_PAGE * 4096, 4096);
        assert_eq!(bm.page_count(), 3);
        bm.set_blocks(BITS_PER_PAGE - 1, 2);
        assert_eq!(bm.take_dirty_pages(), vec![0, 1]);
        assert_eq!(bm.take_dirty_pages(), Vec::<usize>::new());
        bm.mark_pages_dirty([2, 0, 7]);
        assert_eq!(bm.take_dirty_pages(), vec![0, 2]);
        bm.set_blocks(BITS_PER_PAGE - 1, 2);
        assert!(bm.take_dirty_pages().is_empty(), "no change, no dirty page");
        assert_eq!(bm.pages_for_range(0, 4096), 0..1);
        assert_eq!(bm.pages_for_range(BITS_PER_PAGE * 4096 - 1, 2), 0..2);
        assert_eq!(bm.pages_for_range(5, 0), 0..0);
        assert_eq!(bm.pages_for_range(1 << 60, 4096), 0..0);
    }

    /// `page` with a valid trailer for page `index`.
    fn sealed(mut page: Block, index: u32) -> Block {
        le::put_u32(&mut page, PAGE_INDEX_OFFSET, index);
        let crc = block_crc(&page, PAGE_CRC_OFFSET);
        le::put_u32(&mut page, PAGE_CRC_OFFSET, crc);
        page
    }

    #[test]
    fn load_page_rejects_bits_past_the_end() {
        let mut bm = DirtyBitmap::new(100 * 4096, 4096);
        let mut page = [0; BLOCK_SIZE];
        page[12] = 0x10; // bit 100
        assert!(matches!(bm.load_page(0, &sealed(page, 0)), Err(MetaError::Corrupt { .. })));
        page[12] = 0x08; // bit 99
        assert_eq!(bm.load_page(0, &sealed(page, 0)).unwrap(), PageLoad::Intact);
        assert_eq!(bm.weight(), 1);
        assert!(bm.test_block(99));
        assert!(bm.take_dirty_pages().is_empty(), "as on disk");
    }

    #[test]
    fn a_page_failing_its_checksum_or_index_loads_as_all_set_and_dirty() {
        let blocks = BITS_PER_PAGE + 100;
        let mut source = DirtyBitmap::new(blocks * 4096, 4096);
        source.set_range(7 * 4096, 4096);
        source.set_range(BITS_PER_PAGE * 4096, 4096);
        let intact = [source.encode_page(0), source.encode_page(1)];
        let mut torn = intact[1];
        torn[5] ^= 1;
        let zeroed = [0u8; BLOCK_SIZE];
        for (second, why) in [(torn, "torn"), (zeroed, "zeroed"), (intact[0], "another page's")] {
            let mut bm = DirtyBitmap::new(blocks * 4096, 4096);
            assert_eq!(bm.load_page(0, &intact[0]).unwrap(), PageLoad::Intact);
            assert_eq!(bm.load_page(1, &second).unwrap(), PageLoad::Damaged, "{why}");
            assert_eq!(bm.weight(), 1 + 100, "{why}: page 1's 100 blocks all set, page 0 as written");
            assert_eq!(bm.take_dirty_pages(), vec![1], "{why}: rewritten intact at the next write-out");
        }
        let mut bm = DirtyBitmap::new(blocks * 4096, 4096);
        for (index, page) in intact.iter().enumerate() {
            bm.load_page(index, page).unwrap();
        }
        assert_eq!(bm, source, "round trip");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(u64, u64),
        Clear(u64, u64),
        SetBlocks(u64, u64),
        ClearBlocks(u64, u64),
        SetAll,
        ClearAll,
    }

    fn op(data_size: u64, bs: u32) -> impl Strategy<Value = Op> {
        let bs = u64::from(bs);
        let blocks = data_size.div_ceil(bs);
        let range = (0..data_size + 3 * bs, 0..data_size / 2 + 3 * bs);
        let block_range = (0..blocks + 2, 0..blocks + 2);
        prop_oneof![
            4 => range.clone().prop_map(|(o, l)| Op::Set(o, l)),
            4 => range.prop_map(|(o, l)| Op::Clear(o, l)),
            2 => block_range.clone().prop_map(|(s, c)| Op::SetBlocks(s, c)),
            2 => block_range.prop_map(|(s, c)| Op::ClearBlocks(s, c)),
            1 => Just(Op::SetAll),
            1 => Just(Op::ClearAll),
        ]
    }

    /// Applies `op` to the model; returns how many bits changed.
    fn apply_model(model: &mut [bool], op: &Op, bs: u64, data_size: u64) -> u64 {
        let blocks = model.len() as u64;
        let (start, end, value) = match *op {
            Op::Set(o, l) => (o / bs, (o + l).div_ceil(bs), true),
            Op::Clear(o, l) => {
                let end = if o + l >= data_size { blocks } else { (o + l) / bs };
                (o.div_ceil(bs), end, false)
            }
            Op::SetBlocks(s, c) => (s, s + c, true),
            Op::ClearBlocks(s, c) => (s, s + c, false),
            Op::SetAll => (0, blocks, true),
            Op::ClearAll => (0, blocks, false),
        };
        let mut changed = 0;
        for b in start..end.min(blocks) {
            if model[b as usize] != value {
                model[b as usize] = value;
                changed += 1;
            }
        }
        changed
    }

    fn model_runs(model: &[bool]) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut b = 0;
        while b < model.len() {
            if model[b] {
                let start = b;
                while b < model.len() && model[b] {
                    b += 1;
                }
                runs.push((start as u64, (b - start) as u64));
            } else {
                b += 1;
            }
        }
        runs
    }

    fn geometry() -> impl Strategy<Value = (u64, u32)> {
        // Small bitmaps, and ones straddling the first page boundary (32,704 bits).
        let blocks = prop_oneof![1..300u64, 32_600..33_000u64];
        (blocks, prop_oneof![Just(4096u32), Just(8192), Just(65536)], 0..4096u64).prop_map(
            |(blocks, bs, short)| {
                let size = blocks * u64::from(bs);
                // Sometimes cut the last block short (a multiple of 4 KiB, as the layout gives).
                (size - (short / 4096 * 4096).min(u64::from(bs) - 4096), bs)
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn matches_naive_model(
            (data_size, bs, ops) in geometry().prop_flat_map(|(size, bs)| (
                Just(size),
                Just(bs),
                prop::collection::vec((op(size, bs), any::<prop::sample::Index>()), 1..12),
            )),
        ) {
            let mut bm = DirtyBitmap::new(data_size, bs);
            let mut model = vec![false; bm.blocks() as usize];
            for (op, pick) in ops {
                let before: Vec<Block> = (0..bm.page_count()).map(|p| bm.encode_page(p)).collect();
                let expected = apply_model(&mut model, &op, u64::from(bs), data_size);
                let got = match op {
                    Op::Set(o, l) => bm.set_range(o, l),
                    Op::Clear(o, l) => bm.clear_range(o, l),
                    Op::SetBlocks(s, c) => bm.set_blocks(s, c),
                    Op::ClearBlocks(s, c) => bm.clear_blocks(s, c),
                    Op::SetAll => { bm.set_all(); expected }
                    Op::ClearAll => { bm.clear_all(); expected }
                };
                prop_assert_eq!(got, expected, "{:?}", op);
                let dirty = bm.take_dirty_pages();
                for (p, old) in before.iter().enumerate() {
                    if bm.encode_page(p) != *old {
                        prop_assert!(dirty.contains(&p), "changed page {} not dirty", p);
                    }
                }
                let from = pick.index(model.len() + 1) as u64;
                let cap = (pick.index(50) + 1) as u64;
                let expected_run = model_runs(&model).into_iter().find_map(|(s, l)| {
                    let start = s.max(from);
                    (s + l > from).then(|| (start, (s + l - start).min(cap)))
                });
                prop_assert_eq!(bm.next_run(from, cap), expected_run);
            }
            let weight = model.iter().filter(|&&b| b).count() as u64;
            prop_assert_eq!(bm.weight(), weight);
            for (b, &bit) in model.iter().enumerate() {
                prop_assert_eq!(bm.test_block(b as u64), bit);
            }
            let runs: Vec<_> = bm.runs().collect();
            prop_assert_eq!(&runs, &model_runs(&model));
            let rebuilt = DirtyBitmap::from_runs(data_size, bs, runs).unwrap();
            prop_assert_eq!(&rebuilt, &bm);
            let mut loaded = DirtyBitmap::new(data_size, bs);
            loaded.set_all();
            for p in 0..bm.page_count() {
                loaded.load_page(p, &bm.encode_page(p)).unwrap();
            }
            prop_assert_eq!(&loaded, &bm);
            prop_assert_eq!(loaded.weight(), weight);
            prop_assert_eq!(loaded.crc32c(), bm.crc32c());
        }

        #[test]
        fn or_with_and_or_runs_union(
            (data_size, bs) in geometry(),
            a in prop::collection::vec((any::<prop::sample::Index>(), 1..80u64), 0..6),
            b in prop::collection::vec((any::<prop::sample::Index>(), 1..80u64), 0..6),
        ) {
            let blocks = data_size.div_ceil(u64::from(bs));
            let runs = |v: &[(prop::sample::Index, u64)]| -> Vec<(u64, u64)> {
                v.iter().map(|(i, l)| {
                    let s = i.index(blocks as usize) as u64;
                    (s, (*l).min(blocks - s))
                }).collect()
            };
            let mut x = DirtyBitmap::from_runs(data_size, bs, runs(&a)).unwrap();
            let y = DirtyBitmap::from_runs(data_size, bs, runs(&b)).unwrap();
            let mut z = x.clone();
            let newly = x.or_with(&y);
            let newly_runs = z.or_runs(runs(&b)).unwrap();
            prop_assert_eq!(&x, &z);
            prop_assert_eq!(newly, newly_runs);
            for blk in 0..blocks {
                prop_assert_eq!(x.test_block(blk), z.test_block(blk));
            }
            prop_assert_eq!(
                z.or_runs([(blocks, 1)]),
                Err(RunOutOfRange { start: blocks, len: 1, blocks })
            );
        }
    }
}
