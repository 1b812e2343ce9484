//! The engine's state under its lock, and the carrying out of what the replica queued meanwhile:
//! frames join their links' queues in the order the replica pushed them, while the lock is
//! still held (so two threads' frames never swap places), and without any socket write (a
//! queued frame is written by the link's own thread). Links the replica gave up on are dropped
//! once the lock is released.

use super::state::State;
use super::Shared;
use crate::replica::{Action, Lane, MetaWrite};
use std::ops::{Deref, DerefMut};
use std::sync::MutexGuard;
use std::time::Duration;

pub(crate) struct Locked<'a> {
    shared: &'a Shared,
    guard: Option<MutexGuard<'a, State>>,
}

impl<'a> Locked<'a> {
    pub fn new(shared: &'a Shared, guard: MutexGuard<'a, State>) -> Locked<'a> {
        Locked { shared, guard: Some(guard) }
    }

    /// Waits for `Shared::changed`, the lock released meanwhile (queued frames go out first).
    pub fn wait(mut self) -> Locked<'a> {
        let guard = self.release_for_wait();
        let guard = self.shared.changed.wait(guard).expect("engine state lock poisoned");
        Locked::new(self.shared, guard)
    }

    /// [`Locked::wait`], for at most `timeout`.
    pub fn wait_timeout(mut self, timeout: Duration) -> Locked<'a> {
        let guard = self.release_for_wait();
        let (guard, _) = self.shared.changed.wait_timeout(guard, timeout).expect("engine state lock poisoned");
        Locked::new(self.shared, guard)
    }

    /// [`Locked::wait_timeout`] on `Shared::timer` (a nearer deadline).
    pub fn wait_timer(mut self, timeout: Duration) -> Locked<'a> {
        let guard = self.release_for_wait();
        let (guard, _) = self.shared.timer.wait_timeout(guard, timeout).expect("engine state lock poisoned");
        Locked::new(self.shared, guard)
    }

    /// Queues the frames before the wait; links to drop stay queued for the final release.
    fn release_for_wait(&mut self) -> MutexGuard<'a, State> {
        let mut guard = self.guard.take().expect("locked");
        let drops = carry_out_in_order(self.shared, &mut guard);
        guard.replica.requeue(drops);
        guard
    }
}

/// Puts every queued frame on its link and makes every queued metadata write durable, in the
/// replica's order; returns the other actions, to run after the lock.
fn carry_out_in_order(shared: &Shared, st: &mut State) -> Vec<Action> {
    let mut rest = Vec::new();
    let mut queue = st.replica.take_actions().into_iter();
    while let Some(action) = queue.next() {
        match action {
            Action::Persist(what) => {
                let written = match what {
                    MetaWrite::Superblock => st.persist().map_err(|e| e.to_string()),
                    MetaWrite::Bitmap(slot) => st.persist_bitmap(slot).map_err(|e| e.to_string()),
                    MetaWrite::DataFlush => shared.data.sync().map_err(|e| e.to_string()),
                };
                if let Err(e) = written {
                    st.replica.persist_failed(what, &e, queue.collect());
                    queue = st.replica.take_actions().into_iter();
                }
            }
            Action::Send { peer, msg, lane, sent_write } => {
                let Some(link) = st.link(peer) else { continue };
                match lane {
                    Lane::Control => link.queue_control(msg),
                    Lane::Bulk => {
                        let on_sent = sent_write.and_then(|id| {
                            let shared = shared.this.upgrade()?;
                            Some(Box::new(move || {
                                super::write_path::peer_reached(&shared, id, peer, crate::core::inflight::AckLevel::Sent)
                            }) as super::link::OnSent)
                        });
                        link.send_bulk(msg, on_sent);
                    }
                }
            }
            other => rest.push(other),
        }
    }
    rest
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let Some(mut guard) = self.guard.take() else { return };
        let after = carry_out_in_order(self.shared, &mut guard);
        drop(guard);
        if after.is_empty() {
            return;
        }
        let Some(shared) = self.shared.this.upgrade() else { return };
        for action in after {
            match action {
                Action::DropLink { peer, generation, reason } => super::connection::lost(&shared, peer, generation, &reason),
                Action::StartResync { peer, generation } => super::resync::spawn_source(shared.clone(), peer, generation),
                Action::Send { .. } | Action::Persist(_) => unreachable!("carried out under the lock"),
            }
        }
    }
}

impl Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.guard.as_ref().expect("locked")
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.guard.as_mut().expect("locked")
    }
}
