//! A condition variable whose notify costs nothing when nobody waits.
//!
//! On Linux, std's `Condvar::notify_one` and `notify_all` make a `futex` system call every time,
//! waiters or not. The write path notifies on every frame, completion and reply (so that the
//! rare thread waiting for room, a drain or a role change wakes up), and most of those calls
//! found nobody waiting: on a protocol C primary they were most of its 16 futex calls per 4 KiB
//! write. [`QuietCondvar`] counts its waiters and skips the call when there are none.
//!
//! Why that loses no wake-up: a waiter counts itself while it holds the mutex, before `wait`
//! releases it; a notifier changes what the waiter waits for while it holds the same mutex, and
//! reads the count after that. Either the notifier's critical section comes first (the waiter
//! then sees the change and does not wait), or the waiter's does (the notifier, taking the
//! mutex after it, sees the count). So every notifier must change the waited-for state under the
//! mutex the waiters use, as with any condition variable.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, LockResult, MutexGuard, WaitTimeoutResult};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct QuietCondvar {
    inner: Condvar,
    waiters: AtomicUsize,
}

impl QuietCondvar {
    pub const fn new() -> QuietCondvar {
        QuietCondvar { inner: Condvar::new(), waiters: AtomicUsize::new(0) }
    }

    /// As [`Condvar::wait`].
    pub fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> LockResult<MutexGuard<'a, T>> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let woken = self.inner.wait(guard);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        woken
    }

    /// As [`Condvar::wait_timeout`].
    pub fn wait_timeout<'a, T>(&self, guard: MutexGuard<'a, T>, timeout: Duration) -> LockResult<(MutexGuard<'a, T>, WaitTimeoutResult)> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let woken = self.inner.wait_timeout(guard, timeout);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        woken
    }

    /// Wakes every waiter, if there is one.
    pub fn notify_all(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.inner.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Many hand-offs in both directions between two threads that only wait when they must: a
    /// lost wake-up would hang the test (and the harness's timeout would report it).
    #[test]
    fn no_wakeup_is_lost_between_two_threads_taking_turns() {
        let shared = Arc::new((Mutex::new(0u64), QuietCondvar::new()));
        let other = shared.clone();
        let rounds = 20_000;
        let odd = std::thread::spawn(move || {
            let (turn, changed) = &*other;
            for round in 0..rounds {
                let mut t = turn.lock().unwrap();
                while *t != 2 * round + 1 {
                    t = changed.wait(t).unwrap();
                }
                *t += 1;
                changed.notify_all();
            }
        });
        let (turn, changed) = &*shared;
        for round in 0..rounds {
            let mut t = turn.lock().unwrap();
            while *t != 2 * round {
                t = changed.wait(t).unwrap();
            }
            *t += 1;
            changed.notify_all();
        }
        odd.join().unwrap();
        assert_eq!(*turn.lock().unwrap(), 2 * rounds);
        assert_eq!(changed.waiters.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_timed_wait_counts_itself_out_when_it_times_out() {
        let lock = Mutex::new(());
        let changed = QuietCondvar::new();
        let (_guard, timed_out) = changed.wait_timeout(lock.lock().unwrap(), Duration::from_millis(10)).unwrap();
        assert!(timed_out.timed_out());
        assert_eq!(changed.waiters.load(Ordering::SeqCst), 0);
    }
}
