//! The write side of a client connection, shared by every completion.
//!
//! Completions run on whichever thread the device finishes on, so replies are serialized
//! through one mutex: a reply header and its read data go out back to back, never interleaved
//! with another reply. Once a write fails the connection is dead for good; later replies are
//! dropped quietly, because the client that wanted them is gone.

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::{Mutex, PoisonError};

use tracing::debug;

use super::protocol::{simple_reply, Errno};

#[derive(Debug)]
pub struct ReplySink {
    /// `None` once the connection failed or was closed.
    stream: Mutex<Option<TcpStream>>,
}

impl ReplySink {
    pub fn new(stream: TcpStream) -> Self {
        ReplySink { stream: Mutex::new(Some(stream)) }
    }

    /// Sends one simple reply: an error, or success with a READ's data (empty otherwise).
    pub fn send(&self, cookie: u64, outcome: Result<&[u8], Errno>) {
        let mut guard = self.stream.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(stream) = guard.as_mut() else {
            debug!(cookie, "dropping reply: connection already closed");
            return;
        };
        let (error, data) = match outcome {
            Ok(data) => (None, data),
            Err(errno) => (Some(errno), &[][..]),
        };
        let header = simple_reply(error, cookie);
        if let Err(error) = stream.write_all(&header).and_then(|()| stream.write_all(data)) {
            debug!(cookie, %error, "reply failed; closing the connection");
            // Wakes the reader thread too, so the session winds down.
            let _ = stream.shutdown(Shutdown::Both);
            *guard = None;
        }
    }

    /// Closes both directions; replies still in flight are dropped.
    pub fn close(&self) {
        let mut guard = self.stream.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(stream) = guard.take() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}
