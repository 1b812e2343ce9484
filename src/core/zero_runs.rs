//! Telling zeroes apart in a resync chunk: space never written on a thin or fresh device, or
//! freed by a filesystem, reads as zeroes, and a resync source sends such runs as their length
//! alone (`ResyncZeroes`) instead of the bytes. A first full sync of a mostly empty device then
//! moves little more than what was written on it.

/// Granule in which zeroes are looked for: the smallest bitmap block, and a page.
pub const ZERO_GRANULE: usize = 4096;

/// Shortest run of zeroes sent apart from the data around it, unless it is the whole chunk: a
/// shorter one costs a frame (and a step on the target) to save less than it.
pub const MIN_ZERO_RUN: usize = 32 << 10;

/// Whether every byte of `block` is zero, 64 bytes at a time (the fold vectorises).
pub fn is_zero(block: &[u8]) -> bool {
    let mut words = block.chunks_exact(64);
    words.all(|word| word.iter().fold(0u8, |any, &byte| any | byte) == 0)
        && words.remainder().iter().all(|&byte| byte == 0)
}

/// `data` cut into runs `(start, len, zeroes)` that cover it in order, alternating: a run of
/// zeroes is whole [`ZERO_GRANULE`]s (the last may be short, at the end of `data`) and at
/// least [`MIN_ZERO_RUN`] long, or all of `data`; everything else is data.
pub fn zero_runs(data: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for (i, granule) in data.chunks(ZERO_GRANULE).enumerate() {
        let zero = is_zero(granule);
        match runs.last_mut() {
            Some((_, len, kind)) if *kind == zero => *len += granule.len(),
            _ => runs.push((i * ZERO_GRANULE, granule.len(), zero)),
        }
    }
    if runs.len() <= 1 {
        return runs;
    }
    // Zeroes too short to stand alone join the data around them.
    let mut merged: Vec<(usize, usize, bool)> = Vec::with_capacity(runs.len());
    for (start, len, zero) in runs {
        let zero = zero && len >= MIN_ZERO_RUN;
        match merged.last_mut() {
            Some((_, last_len, kind)) if *kind == zero => *last_len += len,
            _ => merged.push((start, len, zero)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_data_at(len: usize, pages: &[usize]) -> Vec<u8> {
        let mut data = vec![0u8; len];
        for &page in pages {
            data[page * ZERO_GRANULE + 17] = 0xA5;
        }
        data
    }

    #[test]
    fn a_chunk_of_zeroes_is_one_run_however_short() {
        assert_eq!(zero_runs(&[0u8; 4096]), vec![(0, 4096, true)]);
        assert_eq!(zero_runs(&[0u8; 100]), vec![(0, 100, true)]);
        assert_eq!(zero_runs(&with_data_at(4096, &[0])), vec![(0, 4096, false)]);
    }

    #[test]
    fn long_runs_of_zeroes_stand_apart_from_the_data() {
        let data = with_data_at(1 << 20, &[20]);
        assert_eq!(zero_runs(&data), vec![(0, 20 * 4096, true), (20 * 4096, 4096, false), (21 * 4096, (1 << 20) - 21 * 4096, true)]);
    }

    #[test]
    fn short_runs_of_zeroes_join_the_data() {
        // Seven zero pages after each data page: shorter than MIN_ZERO_RUN.
        let data = with_data_at(64 << 10, &[0, 8]);
        assert_eq!(zero_runs(&data), vec![(0, 64 << 10, false)]);
    }

    #[test]
    fn the_runs_cover_the_data_in_order_and_alternate() {
        let data = with_data_at(300 * 1024 + 5, &[0, 3, 40, 41, 70]);
        let runs = zero_runs(&data);
        let mut next = 0;
        for (i, &(start, len, zero)) in runs.iter().enumerate() {
            assert_eq!(start, next);
            assert!(len > 0);
            if zero {
                assert!(is_zero(&data[start..start + len]) && len >= MIN_ZERO_RUN, "{runs:?}");
            }
            if i > 0 {
                assert_ne!(zero, runs[i - 1].2, "{runs:?}");
            }
            next = start + len;
        }
        assert_eq!(next, data.len());
    }

    #[test]
    fn a_set_byte_anywhere_is_not_zero() {
        let mut block = vec![0u8; 129];
        assert!(is_zero(&block) && is_zero(&[]));
        for at in [0, 63, 64, 70, 127, 128] {
            block[at] = 0x80;
            assert!(!is_zero(&block), "byte {at}");
            block[at] = 0;
        }
    }
}
