//! NBD clients in their transmission phase served by one io_uring thread, in place of a reader
//! and a reply-writer thread per client (issue 11, step 1: see DESIGN.md "The event loop"):
//! a request no longer crosses two threads and two wake-ups on its way in and out.
//! The rules are [`Connection`]'s; this only moves bytes: one receive armed per client while it
//! wants input, one vectored send per client while replies wait, completions of the device
//! handed back through a queue and the ring's eventfd (no wake-up for those the ring's own
//! thread completes: a small write the device makes on it, see
//! [`BlockDevice::submit_from_loop`]; the loop looks at the queue before it waits).
//!
//! A client that stops reading holds only its own replies (bounded by its in-flight permits):
//! a send that has not completed for the reply deadline ([`REPLY_TIMEOUT`] in the daemon)
//! shuts the socket down, which fails the send and ends the client, as the threaded writer's
//! socket timeout does. A one-second timeout on the ring checks the deadlines while a send is
//! pending. Shutting a client's socket down from outside (the server stopping) ends it the same
//! way once what it has in flight is answered.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::connection::Connection;
use super::socket::Stream;
use super::Export;
use crate::frontend::{BlockDevice, BlockResult};

/// Bytes one receive may bring.
const RECV_BYTES: usize = 256 << 10;
/// Reply pieces one send takes.
const SEND_PIECES: usize = 64;
/// How often pending sends are checked against the reply deadline.
const DEADLINE_CHECK: Duration = Duration::from_secs(1);
/// `user_data`: the eventfd's read, the deadline check's timeout, else a client's slot and
/// which operation.
const WAKE: u64 = u64::MAX;
const TICK: u64 = u64::MAX - 1;
const RECV: u64 = 0;
const SEND: u64 = 1;

thread_local! {
    /// Set on a ring's own thread (see the module's documentation).
    static ON_RING: Cell<bool> = const { Cell::new(false) };
}

/// Told when a client is gone (its socket closed, everything in flight answered).
pub type Done = std::sync::mpsc::Sender<()>;

#[derive(Default)]
struct Inboxed {
    clients: Vec<(Stream, Export, Vec<u8>, Done)>,
    /// (slot, the client's generation in it, cookie, result).
    completed: Vec<(usize, u64, u64, BlockResult)>,
    closed: bool,
}

struct Inbox {
    queue: Mutex<Inboxed>,
    wake: EventFd,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inboxed> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(&self) {
        let _ = self.wake.arm();
    }
}

pub struct RingServer {
    inbox: Arc<Inbox>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl RingServer {
    /// Starts the ring's thread for `device`; a client whose replies wait longer than
    /// `reply_timeout` to be sent is disconnected. Fails where io_uring is not available (a
    /// kernel without it, a seccomp filter): the caller serves its clients on threads then.
    pub fn start(device: Arc<dyn BlockDevice>, reply_timeout: Duration) -> io::Result<RingServer> {
        let inbox = Arc::new(Inbox { queue: Mutex::default(), wake: EventFd::from_flags(EfdFlags::EFD_CLOEXEC)? });
        let ring = IoUring::new(256)?;
        let shared = inbox.clone();
        let thread = std::thread::Builder::new()
            .name("nbd-ring".into())
            .spawn(move || {
                ON_RING.with(|on| on.set(true));
                Loop::new(ring, shared, device, reply_timeout).run();
            })?;
        Ok(RingServer { inbox, thread: Mutex::new(Some(thread)) })
    }

    /// Serves `stream`, whose handshake is done, for `export`; `received`: bytes the client
    /// sent that the handshake's reader already took. `done` hears when the client is gone
    /// (its socket shut down, everything it had in flight answered or dropped).
    pub fn serve(&self, stream: Stream, export: Export, received: Vec<u8>, done: Done) {
        self.inbox.lock().clients.push((stream, export, received, done));
        self.inbox.wake();
    }

    /// Stops the thread once every client has gone (the server shuts their sockets down
    /// first, see `NbdHandle::stop`).
    pub fn shutdown(&self) {
        self.inbox.lock().closed = true;
        self.inbox.wake();
        if let Some(thread) = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take() {
            let _ = thread.join();
        }
    }
}

struct Client {
    stream: Stream,
    done: Done,
    conn: Connection,
    generation: u64,
    buf: Box<[u8]>,
    recv_armed: bool,
    /// The iovecs of the send in flight (they must live until it completes).
    iov: Vec<nix::libc::iovec>,
    /// Since when the send in flight has been waiting, if one is.
    send_armed: Option<Instant>,
}

struct Loop {
    ring: IoUring,
    inbox: Arc<Inbox>,
    device: Arc<dyn BlockDevice>,
    clients: Vec<Option<Client>>,
    generations: u64,
    wake_buf: u64,
    wake_armed: bool,
    reply_timeout: Duration,
    /// The deadline check's timeout (it must live until its completion).
    tick: types::Timespec,
    tick_armed: bool,
    overflow: VecDeque<io_uring::squeue::Entry>,
}

impl Loop {
    fn new(ring: IoUring, inbox: Arc<Inbox>, device: Arc<dyn BlockDevice>, reply_timeout: Duration) -> Loop {
        Loop {
            ring,
            inbox,
            device,
            clients: Vec::new(),
            generations: 0,
            wake_buf: 0,
            wake_armed: false,
            reply_timeout,
            tick: types::Timespec::from(DEADLINE_CHECK),
            tick_armed: false,
            overflow: VecDeque::new(),
        }
    }

    fn run(mut self) {
        loop {
            let (new, completed, closed) = {
                let mut inbox = self.inbox.lock();
                (std::mem::take(&mut inbox.clients), std::mem::take(&mut inbox.completed), inbox.closed)
            };
            for (stream, export, received, done) in new {
                self.add(stream, export, &received, done);
            }
            for (slot, generation, cookie, result) in completed {
                if let Some(client) = self.clients[slot].as_mut().filter(|c| c.generation == generation) {
                    client.conn.completed(cookie, result);
                }
            }
            for slot in 0..self.clients.len() {
                self.step(slot);
            }
            if closed && self.clients.iter().all(Option::is_none) && !self.wake_armed && !self.tick_armed {
                return;
            }
            let sending = self.clients.iter().flatten().any(|c| c.send_armed.is_some());
            if sending && !self.tick_armed {
                let timeout = opcode::Timeout::new(std::ptr::addr_of!(self.tick)).build().user_data(TICK);
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
            if closed && self.clients.iter().all(Option::is_none) {
                self.inbox.wake();
            }
            // Completions this thread queued itself are answered before it waits.
            let answered_here = !self.inbox.lock().completed.is_empty();
            self.submit_and_wait(!answered_here);
            self.reap();
        }
    }

    fn add(&mut self, stream: Stream, export: Export, received: &[u8], done: Done) {
        self.generations += 1;
        let mut conn = Connection::new(export);
        conn.received(received);
        let client = Client {
            stream,
            done,
            conn,
            generation: self.generations,
            buf: vec![0; RECV_BYTES].into_boxed_slice(),
            recv_armed: false,
            iov: Vec::with_capacity(SEND_PIECES),
            send_armed: None,
        };
        match self.clients.iter().position(Option::is_none) {
            Some(slot) => self.clients[slot] = Some(client),
            None => self.clients.push(Some(client)),
        }
    }

    /// Submits a client's decoded requests, arms its receive and send, closes it when done.
    fn step(&mut self, slot: usize) {
        let Some(client) = self.clients[slot].as_mut() else { return };
        while let Some((cookie, request)) = client.conn.next_request() {
            let (inbox, generation) = (self.inbox.clone(), client.generation);
            self.device.submit_from_loop(
                request,
                Box::new(move |result| {
                    let mut queue = inbox.lock();
                    let first = queue.completed.is_empty();
                    queue.completed.push((slot, generation, cookie, result));
                    drop(queue);
                    if first && !ON_RING.with(Cell::get) {
                        inbox.wake();
                    }
                }),
            );
        }
        let fd = types::Fd(client.stream.as_raw_fd());
        let mut entries = Vec::new();
        if client.conn.wants_input() && !client.recv_armed {
            client.recv_armed = true;
            entries.push(opcode::Recv::new(fd, client.buf.as_mut_ptr(), client.buf.len() as u32).build().user_data(tag(slot, RECV)));
        }
        if client.send_armed.is_none() {
            client.iov.clear();
            client.iov.extend(
                client
                    .conn
                    .to_send()
                    .take(SEND_PIECES)
                    .map(|piece| nix::libc::iovec { iov_base: piece.as_ptr() as *mut _, iov_len: piece.len() }),
            );
            if !client.iov.is_empty() {
                client.send_armed = Some(Instant::now());
                entries.push(opcode::Writev::new(fd, client.iov.as_ptr(), client.iov.len() as u32).build().user_data(tag(slot, SEND)));
            }
        }
        if client.conn.finished() && !client.recv_armed && client.send_armed.is_none() {
            if let Some(error) = client.conn.error() {
                tracing::warn!(%error, "NBD client broke the protocol; closing it");
            }
            let _ = client.stream.shutdown(Shutdown::Both);
            let _ = client.done.send(());
            self.clients[slot] = None;
            return;
        }
        if client.conn.finished() && client.recv_armed {
            // A receive still waits on the socket: shutting it down completes it.
            let _ = client.stream.shutdown(Shutdown::Read);
        }
        for entry in entries {
            self.push(entry);
        }
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) {
        // SAFETY: every buffer an entry points to (a client's receive buffer and iovecs, the
        // reply pieces they point to, `wake_buf`) lives until its completion is reaped: a client
        // is removed only with nothing armed, and the pieces stay queued until `sent`.
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
            if e.raw_os_error() != Some(nix::libc::EINTR) && e.raw_os_error() != Some(nix::libc::EBUSY) {
                tracing::error!("the NBD ring failed: {e}");
            }
        }
    }

    fn reap(&mut self) {
        let cqes: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (user_data, result) in cqes {
            if user_data == WAKE {
                self.wake_armed = false;
                continue;
            }
            if user_data == TICK {
                self.tick_armed = false;
                self.disconnect_stalled();
                continue;
            }
            let (slot, op) = ((user_data >> 1) as usize, user_data & 1);
            let Some(client) = self.clients[slot].as_mut() else { continue };
            match (op, result) {
                (RECV, n) if n > 0 => {
                    client.recv_armed = false;
                    client.conn.received(&client.buf[..n as usize]);
                }
                (RECV, n) if n == -nix::libc::EINTR || n == -nix::libc::EAGAIN => client.recv_armed = false,
                (RECV, _) => {
                    // End of stream or a failed socket: nothing more comes from this client.
                    client.recv_armed = false;
                    client.conn.input_closed();
                }
                (_, n) if n >= 0 => {
                    client.send_armed = None;
                    client.conn.sent(n as usize);
                }
                (_, n) if n == -nix::libc::EINTR || n == -nix::libc::EAGAIN => client.send_armed = None,
                (_, _) => {
                    client.send_armed = None;
                    client.conn.broken();
                }
            }
        }
    }

    /// Shuts down the socket of every client whose send has waited past the reply deadline:
    /// its send then fails, and the client ends (see `reap`).
    fn disconnect_stalled(&mut self) {
        let now = Instant::now();
        for client in self.clients.iter().flatten() {
            if client.send_armed.is_some_and(|since| now.duration_since(since) >= self.reply_timeout) {
                tracing::warn!("NBD client read no reply for {:?}: disconnecting it", self.reply_timeout);
                let _ = client.stream.shutdown(Shutdown::Both);
            }
        }
    }
}

fn tag(slot: usize, op: u64) -> u64 {
    (slot as u64) << 1 | op
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{Disk, MemDisk};
    use crate::frontend::nbd::protocol as p;
    use crate::frontend::{BlockRequest, Completion};
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// A device over memory that completes every request at once on the caller's thread.
    struct Memory(MemDisk);

    impl BlockDevice for Memory {
        fn size_bytes(&self) -> u64 {
            self.0.len().unwrap()
        }
        fn block_size(&self) -> u32 {
            512
        }
        fn submit(&self, request: BlockRequest, done: Completion) {
            done(match request {
                BlockRequest::Read { offset, len } => {
                    let mut buf = vec![0; len as usize];
                    self.0.read_at(&mut buf, offset).map(|()| Some(bytes::Bytes::from(buf))).map_err(|_| crate::frontend::BlockError::Io)
                }
                BlockRequest::Write { offset, data, .. } => self.0.write_at(&data, offset).map(|()| None).map_err(|_| crate::frontend::BlockError::Io),
                _ => Ok(None),
            });
        }
    }

    /// A client of `server`, through `listener`; the receiver hears when the server let it go.
    fn connect(server: &RingServer, listener: &TcpListener) -> (TcpStream, std::sync::mpsc::Receiver<()>) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let (done, gone) = std::sync::mpsc::channel();
        server.serve(Stream::Tcp(accepted), Export { name: "disk".into(), size: 1 << 20, block_size: 512 }, Vec::new(), done);
        (client, gone)
    }

    #[test]
    fn a_client_that_stops_reading_is_disconnected_at_the_deadline_and_stalls_nobody_else() {
        let device: Arc<dyn BlockDevice> = Arc::new(Memory(MemDisk::new(1 << 20)));
        let server = RingServer::start(device, Duration::from_millis(500)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut stalled, stalled_gone) = connect(&server, &listener);
        // Reads of the whole device whose replies are never read: far more than the sockets
        // buffer, so a send stays pending.
        let reads: Vec<u8> = (0..32).flat_map(|cookie| header(p::CMD_READ, cookie, 0, 1 << 20)).collect();
        stalled.write_all(&reads).unwrap();
        let (mut other, _other_gone) = connect(&server, &listener);
        let mut write = header(p::CMD_WRITE, 1, 0, 4096);
        write.extend([0x5a; 4096]);
        write.extend(header(p::CMD_READ, 2, 0, 4096));
        other.write_all(&write).unwrap();
        let mut reply = [0u8; 16 + 16 + 4096];
        other.read_exact(&mut reply).unwrap();
        assert_eq!(u64::from_be_bytes(reply[24..32].try_into().unwrap()), 2, "the other client is answered");
        assert!(reply[32..].iter().all(|b| *b == 0x5a));
        // The stalled client is let go (its socket shut down) once its send waited past the
        // deadline.
        stalled_gone.recv_timeout(Duration::from_secs(30)).expect("the stalled client is disconnected");
        drop(other);
        server.shutdown();
    }

    fn header(kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        p::RequestHeader { flags: 0, kind, cookie, offset, len }.encode()
    }

    #[test]
    fn pipelined_writes_and_reads_are_answered_over_the_ring() {
        let device: Arc<dyn BlockDevice> = Arc::new(Memory(MemDisk::new(1 << 20)));
        let server = RingServer::start(device, Duration::from_secs(30)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut client, gone) = connect(&server, &listener);

        // 64 writes then 64 reads, sent at once, before any reply is read.
        let mut out = Vec::new();
        for i in 0..64u64 {
            out.extend(header(p::CMD_WRITE, i, i * 4096, 4096));
            out.extend(std::iter::repeat_n(i as u8, 4096));
        }
        for i in 0..64u64 {
            out.extend(header(p::CMD_READ, 100 + i, i * 4096, 4096));
        }
        out.extend(header(p::CMD_DISC, 999, 0, 0));
        client.write_all(&out).unwrap();

        let mut seen_writes = 0;
        let mut reads = std::collections::BTreeMap::new();
        let mut head = [0u8; 16];
        for _ in 0..128 {
            client.read_exact(&mut head).unwrap();
            assert_eq!(u32::from_be_bytes(head[4..8].try_into().unwrap()), 0, "no error");
            let cookie = u64::from_be_bytes(head[8..16].try_into().unwrap());
            if cookie < 100 {
                seen_writes += 1;
            } else {
                let mut data = vec![0; 4096];
                client.read_exact(&mut data).unwrap();
                reads.insert(cookie - 100, data);
            }
        }
        assert_eq!(seen_writes, 64);
        for (i, data) in reads {
            assert!(data.iter().all(|b| *b == i as u8), "block {i} reads back what was written");
        }
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "the server closed after the disconnect");
        gone.recv().expect("told that the client is gone");
        server.shutdown();
    }
}
