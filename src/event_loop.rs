//! One thread with an io_uring that moves the bytes of many sockets (issue 11, see DESIGN.md
//! "The event loop"): NBD clients and peer links alike, so a request does not cross a thread
//! and a wake-up for each socket it touches. What the bytes mean is each socket's own
//! ([`Socket`]); the loop arms one receive per socket while it wants input and one vectored send
//! while it has output, submits everything an iteration armed with one system call, and hands
//! the completions back.
//!
//! Other threads add sockets and wake the loop through a queue and an eventfd ([`Waker`]); a
//! wake from the loop's own thread costs no system call (the loop looks again before it waits).
//! A tick every `TICK` lets each socket check its deadlines ([`Socket::overdue`]): a socket
//! that is overdue is shut down, which completes what it has armed with an error.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use nix::libc;
use nix::sys::eventfd::{EfdFlags, EventFd};

/// Pieces one send takes.
const SEND_PIECES: usize = 64;
/// How often the sockets' deadlines are checked.
const TICK: Duration = Duration::from_millis(100);
/// `user_data`: the eventfd's read, the tick's timeout, else a socket's slot and operation.
const WAKE: u64 = u64::MAX;
const TICKED: u64 = u64::MAX - 1;
const RECV: u64 = 0;
const SEND: u64 = 1;

thread_local! {
    /// On a loop's own thread, that loop's inbox (see [`Waker::wake`]).
    static ON_LOOP: Cell<*const Inbox> = const { Cell::new(std::ptr::null()) };
}

/// A socket served by the loop: everything but moving its bytes. Every method runs on the
/// loop's thread.
pub trait Socket: Send {
    /// The socket's descriptor; it stays open until [`Socket::gone`].
    fn fd(&self) -> RawFd;

    /// The socket's work for this iteration, after its completions were handed over and before
    /// its I/O is armed: decoding what arrived, handing it on, taking what is to be sent.
    fn step(&mut self);

    /// The buffer the next receive fills, while the socket wants input (it need not be
    /// initialized: the kernel writes it). It stays where it is, untouched, until
    /// [`Socket::received`] or [`Socket::input_closed`].
    fn recv_buf(&mut self) -> Option<&mut [std::mem::MaybeUninit<u8>]>;

    /// `n` bytes (at least one) arrived in the buffer.
    fn received(&mut self, n: usize);

    /// Nothing more comes: the stream ended (`None`) or the receive failed.
    fn input_closed(&mut self, error: Option<io::Error>);

    /// Appends at most `max` pieces to send next. They stay valid and unchanged until
    /// [`Socket::sent`] or [`Socket::send_failed`].
    fn to_send(&mut self, iov: &mut Vec<libc::iovec>, max: usize);

    /// `n` bytes of the pieces were sent (maybe fewer than all of them).
    fn sent(&mut self, n: usize);

    fn send_failed(&mut self, error: io::Error);

    /// Nothing more is to be armed: once what is armed completes, the loop shuts the socket
    /// down and lets it go.
    fn finished(&self) -> bool;

    /// Checked every tick, with how long the armed send has waited: true to have the socket
    /// shut down (what it armed then fails).
    fn overdue(&mut self, now: Instant, sending_since: Option<Instant>) -> bool;

    /// The socket left the loop, everything it armed completed.
    fn gone(self: Box<Self>);
}

#[derive(Default)]
struct Inboxed {
    added: Vec<Box<dyn Socket>>,
    closed: bool,
}

struct Inbox {
    queue: Mutex<Inboxed>,
    wake: EventFd,
    /// A wake-up is on its way (the eventfd was written and not yet read): others need not.
    woken: AtomicBool,
    /// The loop's thread woke itself: it looks again before it waits.
    again: AtomicBool,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inboxed> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Wakes the loop from any thread: its sockets then step again.
#[derive(Clone)]
pub struct Waker(Arc<Inbox>);

impl Waker {
    /// No system call on the loop's own thread, nor while an earlier wake-up is unread.
    pub fn wake(&self) {
        if std::ptr::eq(ON_LOOP.with(Cell::get), Arc::as_ptr(&self.0)) {
            self.0.again.store(true, Ordering::Relaxed);
        } else if !self.0.woken.swap(true, Ordering::AcqRel) {
            let _ = self.0.wake.arm();
        }
    }
}

pub struct EventLoop {
    inbox: Arc<Inbox>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl EventLoop {
    /// Starts the loop's thread, named `name`. Fails where io_uring is not available (a kernel
    /// without it, a seccomp filter): the callers serve their sockets on threads then.
    pub fn start(name: &str) -> io::Result<EventLoop> {
        let inbox = Arc::new(Inbox {
            queue: Mutex::default(),
            wake: EventFd::from_flags(EfdFlags::EFD_CLOEXEC)?,
            woken: AtomicBool::new(false),
            again: AtomicBool::new(false),
        });
        let ring = IoUring::new(256)?;
        let shared = inbox.clone();
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
            ON_LOOP.with(|on| on.set(Arc::as_ptr(&shared)));
            Loop::new(ring, shared).run();
        })?;
        Ok(EventLoop { inbox, thread: Mutex::new(Some(thread)) })
    }

    pub fn waker(&self) -> Waker {
        Waker(self.inbox.clone())
    }

    /// Serves `socket` until it is finished.
    pub fn add(&self, socket: Box<dyn Socket>) {
        self.inbox.lock().added.push(socket);
        self.waker().wake();
    }

    /// Stops the thread once every socket has gone (their owners end them first).
    pub fn shutdown(&self) {
        self.inbox.lock().closed = true;
        self.waker().wake();
        if let Some(thread) = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take() {
            let _ = thread.join();
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Slot {
    socket: Box<dyn Socket>,
    recv_armed: bool,
    /// The iovecs of the send in flight (they must live until it completes).
    iov: Vec<libc::iovec>,
    /// Since when the send in flight has been waiting, if one is.
    send_armed: Option<Instant>,
}

// SAFETY: the iovecs point into the socket's own pieces, which it keeps until the send
// completes; they are only used on the loop's thread.
unsafe impl Send for Slot {}

struct Loop {
    ring: IoUring,
    inbox: Arc<Inbox>,
    slots: Vec<Option<Slot>>,
    wake_buf: u64,
    wake_armed: bool,
    /// The tick's timeout (it must live until its completion).
    tick: types::Timespec,
    tick_armed: bool,
    overflow: VecDeque<io_uring::squeue::Entry>,
}

impl Loop {
    fn new(ring: IoUring, inbox: Arc<Inbox>) -> Loop {
        Loop {
            ring,
            inbox,
            slots: Vec::new(),
            wake_buf: 0,
            wake_armed: false,
            tick: types::Timespec::from(TICK),
            tick_armed: false,
            overflow: VecDeque::new(),
        }
    }

    fn run(mut self) {
        loop {
            self.inbox.again.store(false, Ordering::Relaxed);
            let (added, closed) = {
                let mut inbox = self.inbox.lock();
                (std::mem::take(&mut inbox.added), inbox.closed)
            };
            for socket in added {
                let slot = Slot { socket, recv_armed: false, iov: Vec::with_capacity(SEND_PIECES), send_armed: None };
                match self.slots.iter().position(Option::is_none) {
                    Some(free) => self.slots[free] = Some(slot),
                    None => self.slots.push(Some(slot)),
                }
            }
            for slot in 0..self.slots.len() {
                self.step(slot);
            }
            let empty = self.slots.iter().all(Option::is_none);
            if closed && empty && !self.wake_armed && !self.tick_armed {
                return;
            }
            if !empty && !self.tick_armed {
                let timeout = opcode::Timeout::new(std::ptr::addr_of!(self.tick)).build().user_data(TICKED);
                self.push(timeout);
                self.tick_armed = true;
            }
            if !self.wake_armed {
                let read = opcode::Read::new(types::Fd(self.inbox.wake.as_fd().as_raw_fd()), std::ptr::addr_of_mut!(self.wake_buf).cast(), 8)
                    .build()
                    .user_data(WAKE);
                self.push(read);
                self.wake_armed = true;
            }
            if closed && empty {
                // Completes the armed read, so the loop can end.
                let _ = self.inbox.wake.arm();
            }
            // What the loop's thread woke itself for is done before it waits.
            let again = self.inbox.again.load(Ordering::Relaxed);
            self.submit_and_wait(!again);
            self.reap();
        }
    }

    /// Steps a socket, arms its receive and send, lets it go when it is finished.
    fn step(&mut self, index: usize) {
        let Some(slot) = self.slots[index].as_mut() else { return };
        slot.socket.step();
        let fd = types::Fd(slot.socket.fd());
        let mut entries = Vec::new();
        if !slot.recv_armed {
            if let Some(buf) = slot.socket.recv_buf() {
                slot.recv_armed = true;
                entries.push(opcode::Recv::new(fd, buf.as_mut_ptr().cast(), buf.len() as u32).build().user_data(tag(index, RECV)));
            }
        }
        if slot.send_armed.is_none() {
            slot.iov.clear();
            slot.socket.to_send(&mut slot.iov, SEND_PIECES);
            if !slot.iov.is_empty() {
                slot.send_armed = Some(Instant::now());
                entries.push(opcode::Writev::new(fd, slot.iov.as_ptr(), slot.iov.len() as u32).build().user_data(tag(index, SEND)));
            }
        }
        if slot.socket.finished() {
            if !slot.recv_armed && slot.send_armed.is_none() {
                shutdown(slot.socket.fd(), libc::SHUT_RDWR);
                if let Some(slot) = self.slots[index].take() {
                    slot.socket.gone();
                }
                return;
            }
            if slot.recv_armed {
                // A receive still waits on the socket: shutting its reading down completes it.
                shutdown(slot.socket.fd(), libc::SHUT_RD);
            }
        }
        for entry in entries {
            self.push(entry);
        }
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) {
        // SAFETY: every buffer an entry points to (a socket's receive buffer, its iovecs and
        // the pieces they point to, `wake_buf`, `tick`) lives until its completion is reaped: a
        // socket is let go only with nothing armed, and keeps its pieces until they are sent.
        if !self.overflow.is_empty() || unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.overflow.push_back(entry);
        }
    }

    /// Submits what is queued and, if `wait`, waits for a completion.
    fn submit_and_wait(&mut self, wait: bool) {
        while let Some(entry) = self.overflow.front() {
            // SAFETY: as in `push`.
            if unsafe { self.ring.submission().push(entry) }.is_err() {
                break;
            }
            self.overflow.pop_front();
        }
        if let Err(e) = self.ring.submit_and_wait(usize::from(wait)) {
            if e.raw_os_error() != Some(libc::EINTR) && e.raw_os_error() != Some(libc::EBUSY) {
                tracing::error!("the event loop's io_uring failed: {e}");
            }
        }
    }

    fn reap(&mut self) {
        let cqes: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (user_data, result) in cqes {
            if user_data == WAKE {
                self.wake_armed = false;
                self.inbox.woken.store(false, Ordering::Release);
                continue;
            }
            if user_data == TICKED {
                self.tick_armed = false;
                self.check_deadlines();
                continue;
            }
            let (index, op) = ((user_data >> 1) as usize, user_data & 1);
            let Some(slot) = self.slots[index].as_mut() else { continue };
            let retry = result == -libc::EINTR || result == -libc::EAGAIN;
            if op == RECV {
                slot.recv_armed = false;
                match result {
                    n if n > 0 => slot.socket.received(n as usize),
                    _ if retry => {}
                    0 => slot.socket.input_closed(None),
                    n => slot.socket.input_closed(Some(io::Error::from_raw_os_error(-n))),
                }
            } else {
                slot.send_armed = None;
                match result {
                    n if n >= 0 => slot.socket.sent(n as usize),
                    _ if retry => {}
                    n => slot.socket.send_failed(io::Error::from_raw_os_error(-n)),
                }
            }
        }
    }

    /// Shuts down every socket that says it is overdue: what it armed then fails.
    fn check_deadlines(&mut self) {
        let now = Instant::now();
        for slot in self.slots.iter_mut().flatten() {
            if slot.socket.overdue(now, slot.send_armed) {
                shutdown(slot.socket.fd(), libc::SHUT_RDWR);
            }
        }
    }
}

fn shutdown(fd: RawFd, how: libc::c_int) {
    // SAFETY: the socket keeps its descriptor open until it is let go.
    unsafe { libc::shutdown(fd, how) };
}

fn tag(slot: usize, op: u64) -> u64 {
    (slot as u64) << 1 | op
}
