//! NBD clients in their transmission phase served by an event loop (`crate::event_loop`), in
//! place of a reader and a reply-writer thread per client (issue 11, step 1: see DESIGN.md "The
//! event loop"): a request no longer crosses two threads and two wake-ups on its way in and
//! out. The rules are [`Connection`]'s; a [`Client`] only hands bytes between it, the loop and
//! the device. The device's completions come back through the client's queue and the loop's
//! waker (no system call for those the loop's own thread completes: a small write the device
//! makes on it, see [`BlockDevice::submit_from_loop`]).
//!
//! A client that stops reading holds only its own replies (bounded by its in-flight permits):
//! a send that has not completed for the reply deadline ([`REPLY_TIMEOUT`] in the daemon)
//! shuts the socket down, which fails the send and ends the client, as the threaded writer's
//! socket timeout does. Shutting a client's socket down from outside (the server stopping)
//! ends it the same way once what it has in flight is answered.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::libc;

use super::connection::Connection;
use super::socket::Stream;
use super::Export;
use crate::event_loop::{EventLoop, Socket, Waker};
use crate::frontend::{BlockDevice, BlockResult};

/// Told when a client is gone (its socket closed, everything in flight answered), with the
/// socket's error if one ended it.
pub type Done = std::sync::mpsc::Sender<Option<io::Error>>;

pub struct RingServer {
    event_loop: Arc<EventLoop>,
    /// The loop was started for this server, which stops it.
    own_loop: bool,
    device: Arc<dyn BlockDevice>,
    reply_timeout: Duration,
}

impl RingServer {
    /// Serves clients of `device` on `event_loop`, or on a loop of its own if `None`; a client
    /// whose replies wait longer than `reply_timeout` to be sent is disconnected. Fails where
    /// io_uring is not available (a kernel without it, a seccomp filter): the caller serves its
    /// clients on threads then.
    pub fn start(device: Arc<dyn BlockDevice>, reply_timeout: Duration, event_loop: Option<Arc<EventLoop>>) -> io::Result<RingServer> {
        let own_loop = event_loop.is_none();
        let event_loop = match event_loop {
            Some(shared) => shared,
            None => Arc::new(EventLoop::start("nbd-ring")?),
        };
        Ok(RingServer { event_loop, own_loop, device, reply_timeout })
    }

    /// Serves `stream`, whose handshake is done, for `export`; `received`: bytes the client
    /// sent that the handshake's reader already took. `done` hears when the client is gone
    /// (its socket shut down, everything it had in flight answered or dropped).
    pub fn serve(&self, stream: Stream, export: Export, received: Vec<u8>, done: Done) {
        let mut conn = Connection::new(export);
        conn.received(&received);
        self.event_loop.add(Box::new(Client {
            stream,
            done,
            conn,
            device: self.device.clone(),
            completed: Arc::default(),
            waker: self.event_loop.waker(),
            reply_timeout: self.reply_timeout,
            socket_error: None,
        }));
    }

    /// Stops the loop if it is this server's own, once every client has gone (the server shuts
    /// their sockets down first, see `NbdHandle::stop`); a shared loop goes on.
    pub fn shutdown(&self) {
        if self.own_loop {
            self.event_loop.shutdown();
        }
    }
}

/// One client on the loop.
struct Client {
    stream: Stream,
    done: Done,
    conn: Connection,
    device: Arc<dyn BlockDevice>,
    /// The device's answers not yet handed to `conn`: (cookie, result).
    completed: Arc<Mutex<Vec<(u64, BlockResult)>>>,
    waker: Waker,
    reply_timeout: Duration,
    /// The error a receive or a send failed with (a client that stopped answering, see
    /// `socket::went_silent`), reported through `done`.
    socket_error: Option<io::Error>,
}

impl Socket for Client {
    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    fn step(&mut self) {
        while let Some((cookie, request)) = self.conn.next_request() {
            let (completed, waker) = (self.completed.clone(), self.waker.clone());
            self.device.submit_from_loop(
                request,
                Box::new(move |result| {
                    completed.lock().unwrap_or_else(PoisonError::into_inner).push((cookie, result));
                    waker.wake();
                }),
            );
        }
        // Those the device completed on this thread just now are answered at once.
        let completed = std::mem::take(&mut *self.completed.lock().unwrap_or_else(PoisonError::into_inner));
        for (cookie, result) in completed {
            self.conn.completed(cookie, result);
        }
    }

    fn recv_buf(&mut self) -> Option<&mut [MaybeUninit<u8>]> {
        self.conn.wants_input().then(|| self.conn.recv_space())
    }

    fn received(&mut self, n: usize) {
        // SAFETY: the loop's receive wrote `n` bytes into the buffer `recv_buf` gave.
        unsafe { self.conn.received_in_place(n) }
    }

    fn input_closed(&mut self, error: Option<io::Error>) {
        // End of stream or a failed socket: nothing more comes from this client.
        self.socket_error = self.socket_error.take().or(error);
        self.conn.input_closed();
    }

    fn to_send(&mut self, iov: &mut Vec<libc::iovec>, max: usize) {
        iov.extend(self.conn.to_send().take(max).map(|piece| libc::iovec { iov_base: piece.as_ptr() as *mut _, iov_len: piece.len() }));
    }

    fn sent(&mut self, n: usize) {
        self.conn.sent(n);
    }

    fn send_failed(&mut self, error: io::Error) {
        self.socket_error.get_or_insert(error);
        self.conn.broken();
    }

    fn finished(&self) -> bool {
        self.conn.finished()
    }

    fn overdue(&mut self, now: Instant, sending_since: Option<Instant>) -> bool {
        let overdue = sending_since.is_some_and(|since| now.duration_since(since) >= self.reply_timeout);
        if overdue {
            tracing::warn!("NBD client read no reply for {:?}: disconnecting it", self.reply_timeout);
        }
        overdue
    }

    fn gone(self: Box<Self>) {
        if let Some(error) = self.conn.error() {
            tracing::warn!(%error, "NBD client broke the protocol; closing it");
        }
        let _ = self.done.send(self.socket_error);
    }
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
    fn connect(server: &RingServer, listener: &TcpListener) -> (TcpStream, std::sync::mpsc::Receiver<Option<io::Error>>) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let (done, gone) = std::sync::mpsc::channel();
        server.serve(Stream::Tcp(accepted), Export { name: "disk".into(), size: 1 << 20, block_size: 512 }, Vec::new(), done);
        (client, gone)
    }

    #[test]
    fn a_client_that_stops_reading_is_disconnected_at_the_deadline_and_stalls_nobody_else() {
        let device: Arc<dyn BlockDevice> = Arc::new(Memory(MemDisk::new(1 << 20)));
        let server = RingServer::start(device, Duration::from_millis(500), None).unwrap();
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
        let server = RingServer::start(device, Duration::from_secs(30), None).unwrap();
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
