//! The engine's state under its lock, and the carrying out of what the replica queued meanwhile:
//! frames join their links' queues in the order the replica pushed them, while the lock is
//! still held (so two threads' frames never swap places), and without any socket write (a
//! queued frame is written by the link's own thread). Links the replica gave up on are dropped
//! once the lock is released.

use super::state::{Pending, State};
use super::shared::{Engine, Shared};
use crate::core::inflight::{AckLevel, LocalFailure};
use crate::frontend::BlockResult;
use super::link::PeerLink;
use crate::meta::AlWrite;
use crate::replica::{Action, FenceOutcome, IoTag, Lane, LocalIo, MetaWrite};
use crate::wire::Message;
use std::sync::Arc;
use std::ops::{Deref, DerefMut};
use std::sync::MutexGuard;

use crate::quiet_condvar::QuietCondvar;
use std::time::{Duration, Instant};

pub(crate) struct Locked<'a> {
    shared: &'a Shared,
    guard: Option<MutexGuard<'a, State>>,
    /// Which local I/O runs on this thread once the lock is released.
    io_here: IoHere,
}

/// Which of the local I/O queued under a guard the releasing thread runs itself, rather than
/// hand it to the I/O pool (a handoff costs two context switches, more than a small write
/// into the page cache).
#[derive(Clone, Copy)]
pub(crate) enum IoHere {
    None,
    /// See [`Locked::run_stream_io_here`].
    Stream,
    /// See [`Locked::run_small_writes_here`].
    SmallWrites,
}

/// The largest local write a frontend's thread makes itself (see
/// [`Locked::run_small_writes_here`]).
const SMALL_WRITE_BYTES: usize = 64 << 10;

impl Shared {
    /// The engine's state, for as long as the guard lives; what the replica queued meanwhile
    /// is carried out as it is released (see [`Locked`]).
    pub fn lock(&self) -> Locked<'_> {
        Locked::new(self, self.state.lock().expect("engine state lock poisoned"))
    }
}

impl<'a> Locked<'a> {
    fn new(shared: &'a Shared, guard: MutexGuard<'a, State>) -> Locked<'a> {
        Locked { shared, guard: Some(guard), io_here: IoHere::None }
    }

    /// The local I/O of a peer's stream queued under this guard (replicated writes, resync
    /// data, reads to compare, barrier flushes) runs on this thread once the lock is released,
    /// not on the I/O pool: a peer's reader applies its stream without a thread handoff per
    /// write, as it reads it. The replica already ordered what may run together.
    pub fn run_stream_io_here(&mut self) {
        self.io_here = IoHere::Stream;
    }

    /// The application's writes queued under this guard of up to [`SMALL_WRITE_BYTES`], without
    /// FUA, run on this thread once the lock is released: a frontend's event loop writes them
    /// into the page cache itself, which costs less than the handoff to the pool (measured:
    /// local-only 4 KiB writes at QD32 +30 %). Larger writes, FUA writes, reads and flushes,
    /// which may wait for the device, go to the pool.
    pub fn run_small_writes_here(&mut self) {
        self.io_here = IoHere::SmallWrites;
    }

    /// Waits for `Shared::changed`, the lock released meanwhile (queued frames go out first).
    /// Returns at once, as a spurious wakeup would, when completions or dropped links had to
    /// run without the lock first (a wakeup may have been missed meanwhile).
    pub fn wait(mut self) -> Locked<'a> {
        match self.release_for_wait() {
            Some(guard) => self.relocked(self.shared.changed.wait(guard).expect("engine state lock poisoned")),
            None => self.shared.lock(),
        }
    }

    /// [`Locked::wait`], for at most `timeout`.
    pub fn wait_timeout(self, timeout: Duration) -> Locked<'a> {
        let changed = &self.shared.changed;
        self.wait_timeout_on(changed, timeout)
    }

    /// [`Locked::wait_timeout`] on `Shared::timer` (a nearer deadline).
    pub fn wait_timer(self, timeout: Duration) -> Locked<'a> {
        let timer = &self.shared.timer;
        self.wait_timeout_on(timer, timeout)
    }

    /// [`Locked::wait_timeout`] on `Shared::dial` (a link went, or one is wanted).
    pub fn wait_dial(self, timeout: Duration) -> Locked<'a> {
        let dial = &self.shared.dial;
        self.wait_timeout_on(dial, timeout)
    }

    fn wait_timeout_on(mut self, condvar: &QuietCondvar, timeout: Duration) -> Locked<'a> {
        match self.release_for_wait() {
            Some(guard) => {
                let (guard, _) = condvar.wait_timeout(guard, timeout).expect("engine state lock poisoned");
                self.relocked(guard)
            }
            None => self.shared.lock(),
        }
    }

    /// Carries out what must happen under the lock; `None` if what must happen without it
    /// (completions, which may write to a socket, and links to drop) had to run, the lock
    /// released for it.
    fn release_for_wait(&mut self) -> Option<MutexGuard<'a, State>> {
        let mut guard = self.guard.take().expect("locked");
        let after = carry_out_in_order(self.shared, &mut guard, self.io_here);
        if after.is_empty() {
            return Some(guard);
        }
        drop(guard);
        run_after(self.shared, after);
        None
    }

    fn relocked(&self, guard: MutexGuard<'a, State>) -> Locked<'a> {
        Locked { shared: self.shared, guard: Some(guard), io_here: self.io_here }
    }
}

/// What is left to do once the lock is released.
enum After {
    /// Written by this thread when the socket is free, together (see `PeerLink::send_acks`).
    Acks(Arc<PeerLink>, Vec<Message>),
    /// Run by this thread (see [`IoHere`]).
    IoHere(IoTag, LocalIo),
    /// Handed to the I/O pool.
    PoolIo(IoTag, LocalIo),
    /// An activity-log transaction finished on the I/O pool (see `Action::WriteLog`).
    Log { seq: u64, write: AlWrite, flush_data: bool },
    Complete(Pending, BlockResult),
    Action(Action),
}

/// Puts every queued frame on its link, makes every queued metadata write durable and submits
/// every local I/O, in the replica's order; returns the rest, to run after the lock.
fn carry_out_in_order(shared: &Shared, st: &mut State, io_here: IoHere) -> Vec<After> {
    let mut rest = Vec::new();
    // Where in `rest` each link's acks are gathered.
    let mut acks_at: Vec<usize> = Vec::new();
    let mut queue = st.replica.take_actions().into_iter();
    while let Some(action) = queue.next() {
        match action {
            Action::Persist(what) => {
                let written = match &what {
                    MetaWrite::Superblock => st.persist().map_err(|e| e.to_string()),
                    MetaWrite::Bitmap(slot) => st.persist_bitmap(*slot).map_err(|e| e.to_string()),
                    MetaWrite::BitmapPages { slot, pages } => {
                        let State { meta, replica, .. } = &mut *st;
                        meta.write_bitmap_pages(*slot, &replica.bitmaps[*slot], pages.iter().copied()).map_err(|e| e.to_string())
                    }
                    MetaWrite::DataFlush => shared.data.sync().map_err(|e| e.to_string()),
                    MetaWrite::ActivityLog(update) => {
                        st.meta.write_al_update(update, &st.replica.bitmaps).map_err(|e| e.to_string())
                    }
                };
                if written.is_ok() {
                    shared.counters.metadata_written(&what, st.meta.bitmap_pages_written());
                }
                if let Err(e) = written {
                    st.replica.persist_failed(Instant::now(), what, &e, queue.collect());
                    queue = st.replica.take_actions().into_iter();
                }
            }
            Action::WriteLog { update, flush_data } => {
                let seq = update.transaction.seq();
                let State { meta, replica, .. } = &mut *st;
                match meta.begin_al_update(&update, &replica.bitmaps) {
                    Ok(write) => {
                        shared.counters.bitmap_pages_written(meta.bitmap_pages_written());
                        rest.push(After::Log { seq, write, flush_data });
                    }
                    Err(e) => {
                        st.replica.log_written(seq, Err(e.to_string()));
                        let mut behind: Vec<Action> = queue.collect();
                        behind.extend(st.replica.take_actions());
                        queue = behind.into_iter();
                    }
                }
            }
            Action::Send { peer, msg, lane, sent_write } => {
                let Some(link) = st.link(peer) else { continue };
                let ack = matches!(msg, Message::RecvAck { .. } | Message::WriteAck { .. } | Message::NegAck { .. } | Message::BarrierAck { .. });
                match lane {
                    // Acks may overtake or follow other control frames: each is matched by
                    // what it answers, never by its place.
                    Lane::Control if ack => {
                        let gathered = acks_at.iter().find(|at| matches!(&rest[**at], After::Acks(to, _) if Arc::ptr_eq(to, link)));
                        match gathered.map(|at| &mut rest[*at]) {
                            Some(After::Acks(_, acks)) => acks.push(msg),
                            _ => {
                                acks_at.push(rest.len());
                                rest.push(After::Acks(link.clone(), vec![msg]));
                            }
                        }
                    }
                    Lane::Control => link.queue_control(msg),
                    Lane::Bulk => {
                        let on_sent = sent_write.and_then(|id| {
                            let shared = shared.this.upgrade()?;
                            Some(Box::new(move || {
                                shared.lock().replica.peer_reached(Instant::now(), id, peer, AckLevel::Sent);
                            }) as super::link::OnSent)
                        });
                        link.send_bulk(msg, on_sent);
                    }
                }
            }
            Action::Io { tag, op } if runs_here(io_here, &tag, &op) => rest.push(After::IoHere(tag, op)),
            Action::Io { tag, op } => rest.push(After::PoolIo(tag, op)),
            Action::Complete { request, result } => {
                if let Some(pending) = st.requests.remove(&request) {
                    rest.push(After::Complete(pending, result));
                }
            }
            other => rest.push(After::Action(other)),
        }
    }
    rest
}

/// Whether the releasing thread runs this local I/O itself (see [`IoHere`]).
fn runs_here(io_here: IoHere, tag: &IoTag, op: &LocalIo) -> bool {
    match io_here {
        IoHere::None => false,
        IoHere::Stream => matches!(tag, IoTag::Stream { .. } | IoTag::Barrier { .. }),
        IoHere::SmallWrites => {
            matches!((tag, op), (IoTag::Write(_), LocalIo::Write { data, fua: false, .. }) if data.len() <= SMALL_WRITE_BYTES)
        }
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let Some(mut guard) = self.guard.take() else { return };
        let after = carry_out_in_order(self.shared, &mut guard, self.io_here);
        drop(guard);
        run_after(self.shared, after);
    }
}

/// Answers completed requests and drops the links the replica gave up on, without the lock.
fn run_after(shared: &Shared, after: Vec<After>) {
    if after.is_empty() {
        return;
    }
    let owner = shared.this.upgrade();
    let mut done_here = Vec::new();
    for after in after {
        match after {
            After::Acks(link, acks) => link.send_acks(acks),
            After::IoHere(tag, op) => {
                let result = super::io_pool::execute(&*shared.data, op).map_err(|e| LocalFailure::of(&e));
                done_here.push((tag, result));
            }
            After::PoolIo(tag, op) => {
                let Some(owner) = owner.clone() else { continue };
                shared.io.submit(
                    op,
                    Box::new(move |result| {
                        owner.lock().replica.io_done(Instant::now(), tag, result.map_err(|e| LocalFailure::of(&e)));
                        owner.changed.notify_all();
                    }),
                );
            }
            After::Log { seq, write, flush_data } => {
                let Some(owner) = owner.clone() else { continue };
                shared.io.run(Box::new(move |data| {
                    let result = write.finish(flush_data.then_some(data)).map_err(|e| e.to_string());
                    if result.is_ok() {
                        owner.counters.al_transaction_written();
                    }
                    owner.lock().replica.log_written(seq, result);
                    owner.changed.notify_all();
                }));
            }
            After::Complete(Pending { done, arrived, timed }, result) => {
                shared.counters.completed(timed, arrived);
                done(result);
            }
            After::Action(action) => {
                let Some(shared) = &owner else { continue };
                match action {
                    Action::DropLink { peer, generation, reason } => super::connection::lost(shared, peer, generation, &reason),
                    Action::StartResync { peer, generation } => super::resync::spawn_source(shared.clone(), peer, generation),
                    Action::FencePeer { peer, generation } => {
                        let engine = Engine { shared: shared.clone() };
                        match shared.fence_runner.get() {
                            Some(run) => run(&engine, peer, generation),
                            None => engine.fence_done(peer, generation, FenceOutcome::Failed("no fence-peer handler runs in this process".into())),
                        }
                    }
                    Action::Send { .. } | Action::Persist(_) | Action::WriteLog { .. } | Action::Io { .. } | Action::Complete { .. } => {
                        unreachable!("carried out under the lock")
                    }
                }
            }
        }
    }
    // What this thread wrote (a peer's stream, say) is reported under one lock: their acks
    // then leave together.
    if !done_here.is_empty() {
        let mut st = shared.lock();
        for (tag, result) in done_here {
            st.replica.io_done(Instant::now(), tag, result);
        }
        drop(st);
        shared.changed.notify_all();
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
