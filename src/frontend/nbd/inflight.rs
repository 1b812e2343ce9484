//! Bounding the requests one client has in flight.
//!
//! The reader thread takes a [`Permit`] before submitting a request and the completion drops
//! it after the reply is written. Bounding both the count and the bytes keeps a client that
//! pipelines faster than the device completes from queueing unbounded work or memory
//! (128 reads of 32 MiB would otherwise be 4 GiB). Because a permit releases on drop, a
//! completion the device drops without calling still frees its slot.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::quiet_condvar::QuietCondvar;

/// Most requests one client may have submitted and not yet answered.
pub const MAX_REQUESTS: usize = 128;
/// Most payload bytes (read lengths plus write payloads) one client may have in flight.
/// A single request larger than this is still admitted once the client is otherwise idle.
pub const MAX_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, Default)]
struct Load {
    requests: usize,
    bytes: u64,
}

/// The in-flight accounting of one client connection.
#[derive(Debug, Default)]
pub struct InFlight {
    load: Mutex<Load>,
    changed: QuietCondvar,
}

impl InFlight {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Waits until a request of `bytes` fits under the bounds, then reserves it.
    pub fn acquire(self: &Arc<Self>, bytes: u32) -> Permit {
        let bytes = u64::from(bytes);
        let mut load = self.lock();
        while load.requests > 0 && (load.requests >= MAX_REQUESTS || load.bytes + bytes > MAX_BYTES)
        {
            load = self.changed.wait(load).unwrap_or_else(PoisonError::into_inner);
        }
        load.requests += 1;
        load.bytes += bytes;
        Permit { owner: Arc::clone(self), bytes }
    }

    /// Waits until every permit has been released.
    pub fn wait_idle(&self) {
        let mut load = self.lock();
        while load.requests > 0 {
            load = self.changed.wait(load).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The number of requests currently in flight.
    #[cfg(test)]
    pub fn requests(&self) -> usize {
        self.lock().requests
    }

    fn lock(&self) -> MutexGuard<'_, Load> {
        // The counters stay consistent even if a holder panicked: every update is one step.
        self.load.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One admitted request; dropping it frees its share of the bounds.
#[derive(Debug)]
pub struct Permit {
    owner: Arc<InFlight>,
    bytes: u64,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut load = self.owner.lock();
        load.requests -= 1;
        load.bytes -= self.bytes;
        drop(load);
        self.owner.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn count_bound_blocks_until_a_permit_drops() {
        let inflight = InFlight::new();
        let mut permits: Vec<Permit> = (0..MAX_REQUESTS).map(|_| inflight.acquire(0)).collect();
        let (tx, rx) = mpsc::channel();
        let waiter = {
            let inflight = Arc::clone(&inflight);
            thread::spawn(move || {
                let permit = inflight.acquire(0);
                tx.send(()).unwrap();
                drop(permit);
            })
        };
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "admitted past the bound");
        permits.pop();
        rx.recv_timeout(Duration::from_secs(5)).expect("waiter admitted after a release");
        waiter.join().unwrap();
        drop(permits);
        inflight.wait_idle();
        assert_eq!(inflight.requests(), 0);
    }

    #[test]
    fn byte_bound_admits_an_oversized_request_when_idle() {
        let inflight = InFlight::new();
        let big = inflight.acquire(u32::MAX);
        let (tx, rx) = mpsc::channel();
        let waiter = {
            let inflight = Arc::clone(&inflight);
            thread::spawn(move || {
                let permit = inflight.acquire(512);
                tx.send(()).unwrap();
                drop(permit);
            })
        };
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "admitted over the bytes");
        drop(big);
        rx.recv_timeout(Duration::from_secs(5)).expect("waiter admitted after a release");
        waiter.join().unwrap();
    }
}
