//! Handler runs waiting for the runner thread: bounded, so a handler that keeps timing out
//! while events keep coming cannot make the daemon's memory grow; the oldest run goes first.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};

/// Runs waiting at most (the one running not counted).
pub const MAX_QUEUED: usize = 64;

/// A FIFO of at most [`MAX_QUEUED`] items between one producer and one consumer thread.
pub struct Queue<T> {
    items: Mutex<VecDeque<T>>,
    added: Condvar,
}

impl<T> Default for Queue<T> {
    fn default() -> Queue<T> {
        Queue { items: Mutex::new(VecDeque::new()), added: Condvar::new() }
    }
}

impl<T> Queue<T> {
    /// Adds `item`; when the queue is full, drops and returns the oldest waiting item.
    pub fn push(&self, item: T) -> Option<T> {
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        let dropped = if items.len() >= MAX_QUEUED { items.pop_front() } else { None };
        items.push_back(item);
        self.added.notify_one();
        dropped
    }

    /// The oldest item, waiting for one.
    pub fn pop(&self) -> T {
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(item) = items.pop_front() {
                return item;
            }
            items = self.added.wait(items).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn items_come_out_in_order_and_the_oldest_go_when_full() {
        let queue = Queue::default();
        for i in 0..MAX_QUEUED {
            assert_eq!(queue.push(i), None);
        }
        assert_eq!(queue.push(MAX_QUEUED), Some(0));
        assert_eq!(queue.push(MAX_QUEUED + 1), Some(1));
        let out: Vec<usize> = (0..MAX_QUEUED).map(|_| queue.pop()).collect();
        assert_eq!(out, (2..MAX_QUEUED + 2).collect::<Vec<_>>());
    }

    #[test]
    fn pop_waits_for_a_push() {
        let queue = Arc::new(Queue::default());
        let consumer = {
            let queue = queue.clone();
            std::thread::spawn(move || queue.pop())
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        queue.push("late");
        assert_eq!(consumer.join().unwrap(), "late");
    }
}
