//! The write side of a client connection: one writer thread per client.
//!
//! Completions run on whichever thread the device finishes on (the engine's disk threads, a
//! peer's receiver), and those threads serve every client and the replication itself. A
//! completion therefore only queues its reply; the client's own writer thread sends it. A
//! client that stops reading blocks nothing but its writer, and after [`REPLY_TIMEOUT`] with a
//! reply unsent it is disconnected. The queue is bounded by the client's in-flight permits
//! (`inflight`), which travel with each reply and are released once it is written or dropped.
//! Once a write fails the connection is dead for good; later replies are dropped quietly,
//! because the client that wanted them is gone.

use std::io::{self, Write};
use std::net::Shutdown;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use bytes::Bytes;
use tracing::{debug, warn};

use super::inflight::Permit;
use super::protocol::{simple_reply, Errno};
use super::socket::Stream;
use crate::handshake_stream::TimedSocket;

/// How long one reply may wait for the client to read: a client that reads nothing for this
/// long while it has replies pending has stopped reading (a real client reads as it sends).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// One reply on its way to the writer, with the in-flight permit it still holds.
struct Reply {
    cookie: u64,
    outcome: Result<Bytes, Errno>,
    _permit: Permit,
}

#[derive(Debug)]
pub struct ReplySink {
    /// `None` once closed.
    queue: Mutex<Option<Sender<Reply>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    stream: Stream,
}

impl ReplySink {
    /// Starts the client's writer thread, writing through `out` to `stream` (the socket itself,
    /// or a TLS session on it).
    pub fn new(stream: Stream, out: Box<dyn Write + Send>, name: &str) -> io::Result<ReplySink> {
        stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let (tx, rx) = channel();
        let writer_stream = stream.try_clone()?;
        let writer = thread::Builder::new().name(format!("nbd-w-{name}")).spawn(move || write_replies(&writer_stream, out, &rx))?;
        Ok(ReplySink { queue: Mutex::new(Some(tx)), writer: Mutex::new(Some(writer)), stream })
    }

    /// Queues one simple reply: an error, or success with a READ's data (empty otherwise).
    /// `permit` is released once the reply is written (or dropped with the connection).
    pub fn send(&self, cookie: u64, outcome: Result<Bytes, Errno>, permit: Permit) {
        let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(tx) = queue.as_ref() else {
            debug!(cookie, "dropping reply: connection already closed");
            return;
        };
        // A writer that gave up dropped its receiver: the reply (and its permit) goes too.
        let _ = tx.send(Reply { cookie, outcome, _permit: permit });
    }

    /// Lets the writer send what is queued, waits for it, then closes both directions.
    pub fn close(&self) {
        drop(self.queue.lock().unwrap_or_else(PoisonError::into_inner).take());
        if let Some(writer) = self.writer.lock().unwrap_or_else(PoisonError::into_inner).take() {
            if writer.join().is_err() {
                warn!("NBD reply writer panicked");
            }
        }
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// The writer thread: sends replies in the order they were queued until the queue closes or a
/// write fails (then the connection is shut down, which ends the client's reader too).
fn write_replies(stream: &Stream, mut out: Box<dyn Write + Send>, replies: &Receiver<Reply>) {
    for reply in replies {
        let (error, data) = match &reply.outcome {
            Ok(data) => (None, &data[..]),
            Err(errno) => (Some(*errno), &[][..]),
        };
        let header = simple_reply(error, reply.cookie);
        if let Err(error) = out.write_all(&header).and_then(|()| out.write_all(data)) {
            let stalled = matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut);
            if stalled {
                warn!(cookie = reply.cookie, "NBD client read no reply for {REPLY_TIMEOUT:?}: disconnecting it");
            } else {
                debug!(cookie = reply.cookie, %error, "reply failed; closing the connection");
            }
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    }
}
