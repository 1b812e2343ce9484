//! Reused memory for the data of large writes.
//!
//! A write's data leaves the queue thread with the request and lives until the handler is done
//! with it (a replicated write: until its peers have it too), so it cannot be the tag's own
//! buffer. Allocating it anew for each request is what it cost before this pool: glibc gives
//! freed memory at the top of a heap back to the kernel, so the next large allocation is fresh
//! memory that faults in page by page. In a TCG guest a 1 MiB write took 50-73 page faults and
//! faulting a page costs more than copying it (3.56 ms per MiB of fresh pages against 0.38 for
//! `memcpy`, probed). With the pool, the device's local-only 1 MiB writes in that guest went
//! from 119-152 to 180-181 MiB/s, with no fault (telling glibc never to trim gave 187-189).
//!
//! Data of at least [`POOLED_FROM`] bytes lives in a buffer whose capacity is a power of two
//! (so a buffer holds at most twice its data); a dropped [`WriteData`] gives its buffer back to
//! the device's pool, which keeps at most [`KEPT_BYTES`] and frees the rest. Small writes come
//! and go through the allocator's own free lists, which do not fault.

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex, PoisonError};

/// Writes from this size on take pooled buffers (below it the allocator's bins serve them).
pub(crate) const POOLED_FROM: usize = 64 << 10;
/// The most memory a device's pool keeps while nothing uses it: eight 1 MiB writes in flight
/// come and go without a fault.
pub(crate) const KEPT_BYTES: usize = 8 << 20;

/// The free buffers of one device, by size class (a power of two from [`POOLED_FROM`]).
#[derive(Default)]
pub(crate) struct BufferPool {
    free: Mutex<Free>,
}

#[derive(Default)]
struct Free {
    /// `classes[i]` holds empty vectors of capacity `POOLED_FROM << i`.
    classes: Vec<Vec<Vec<u8>>>,
    bytes: usize,
}

fn class_of(capacity: usize) -> usize {
    (capacity / POOLED_FROM).trailing_zeros() as usize
}

impl BufferPool {
    /// An empty vector with room for `len` bytes, pooled when it is large.
    pub(crate) fn take(self: &Arc<Self>, len: usize) -> WriteData {
        if len < POOLED_FROM {
            return WriteData { data: Vec::with_capacity(len), pool: None };
        }
        let capacity = len.next_power_of_two();
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
            let reused = free.classes.get_mut(class_of(capacity)).and_then(Vec::pop);
            if reused.is_some() {
                free.bytes -= capacity;
            }
            reused
        };
        let data = reused.unwrap_or_else(|| Vec::with_capacity(capacity));
        WriteData { data, pool: Some(Arc::clone(self)) }
    }

    fn give_back(&self, mut data: Vec<u8>) {
        let capacity = data.capacity();
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.bytes + capacity > KEPT_BYTES {
            return; // freed when `data` drops, outside the pool
        }
        data.clear();
        let class = class_of(capacity);
        if free.classes.len() <= class {
            free.classes.resize_with(class + 1, Vec::new);
        }
        free.classes[class].push(data);
        free.bytes += capacity;
    }

    #[cfg(test)]
    fn kept_bytes(&self) -> usize {
        self.free.lock().unwrap().bytes
    }
}

/// A write's data. Dereferences to the bytes; on drop, a pooled buffer goes back to its pool.
pub struct WriteData {
    data: Vec<u8>,
    pool: Option<Arc<BufferPool>>,
}

impl WriteData {
    /// Data of its own, from no pool (a copy: see `Clone`).
    fn from_vec(data: Vec<u8>) -> WriteData {
        WriteData { data, pool: None }
    }

    /// The vector of data that is not pooled (no copy); pooled data is handed back as it is,
    /// to be kept whole until it drops.
    pub fn into_vec(mut self) -> Result<Vec<u8>, WriteData> {
        match self.pool {
            Some(_) => Err(self),
            None => Ok(std::mem::take(&mut self.data)),
        }
    }

    /// The room behind the data, for the queue to copy the request's bytes into.
    pub(crate) fn spare(&mut self) -> *mut u8 {
        self.data.spare_capacity_mut().as_mut_ptr().cast()
    }

    /// # Safety
    /// The first `len` bytes of the room ([`WriteData::spare`]) must have been written, and
    /// `len` must not exceed the capacity asked for.
    pub(crate) unsafe fn set_len(&mut self, len: usize) {
        // SAFETY: the caller's promise.
        unsafe { self.data.set_len(len) }
    }
}

impl Drop for WriteData {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give_back(std::mem::take(&mut self.data));
        }
    }
}

impl Deref for WriteData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

impl AsRef<[u8]> for WriteData {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

/// A copy is data of its own: the pool only gets back the buffers it handed out.
impl Clone for WriteData {
    fn clone(&self) -> WriteData {
        WriteData::from_vec(self.data.clone())
    }
}

impl PartialEq for WriteData {
    fn eq(&self, other: &WriteData) -> bool {
        self.data == other.data
    }
}

impl Eq for WriteData {}

impl fmt::Debug for WriteData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WriteData({} bytes{})", self.data.len(), if self.pool.is_some() { ", pooled" } else { "" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(pool: &Arc<BufferPool>, len: usize, byte: u8) -> WriteData {
        let mut data = pool.take(len);
        // SAFETY: `take` gave room for `len` bytes, all written before `set_len`.
        unsafe {
            std::ptr::write_bytes(data.spare(), byte, len);
            data.set_len(len);
        }
        data
    }

    #[test]
    fn a_dropped_buffer_is_handed_out_again() {
        let pool = Arc::new(BufferPool::default());
        let first = filled(&pool, 300 << 10, 1);
        let address = first.as_ptr();
        assert_eq!((first.len(), first.data.capacity()), (300 << 10, 512 << 10));
        drop(first);
        assert_eq!(pool.kept_bytes(), 512 << 10);
        // Another size of the same class gets the same memory, with its own data.
        let second = filled(&pool, 260 << 10, 2);
        assert_eq!(second.as_ptr(), address);
        assert!(second.iter().all(|&b| b == 2) && second.len() == 260 << 10);
        assert_eq!(pool.kept_bytes(), 0);
        // Another class does not.
        drop(second);
        let third = filled(&pool, 100 << 10, 3);
        assert_ne!(third.as_ptr(), address);
        assert_eq!(third.data.capacity(), 128 << 10);
    }

    #[test]
    fn small_writes_and_copies_are_not_pooled() {
        let pool = Arc::new(BufferPool::default());
        drop(filled(&pool, 4096, 1));
        assert_eq!(pool.kept_bytes(), 0);
        let large = filled(&pool, 1 << 20, 7);
        let copy = large.clone();
        assert_eq!(copy, large);
        let large = large.into_vec().expect_err("pooled data stays pooled");
        let copy = copy.into_vec().expect("a copy is a plain vector");
        assert_eq!(copy, &large[..]);
        drop(copy);
        assert_eq!(pool.kept_bytes(), 0);
        drop(large);
        assert_eq!(pool.kept_bytes(), 1 << 20);
    }

    #[test]
    fn the_pool_keeps_no_more_than_its_bound() {
        let pool = Arc::new(BufferPool::default());
        let held: Vec<WriteData> = (0..12).map(|i| filled(&pool, 1 << 20, i)).collect();
        drop(held);
        assert_eq!(pool.kept_bytes(), KEPT_BYTES);
        // What it kept is handed out again: eight buffers without a new allocation.
        let again: Vec<WriteData> = (0..8).map(|i| filled(&pool, 1 << 20, i)).collect();
        assert_eq!(pool.kept_bytes(), 0);
        assert!(again.iter().enumerate().all(|(i, d)| d.iter().all(|&b| b == i as u8)));
    }
}
