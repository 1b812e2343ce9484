//! One TLS session read by one thread and written by another: an NBD client's session after
//! STARTTLS, whose requests its own thread reads while its reply writer sends.
//!
//! rustls keeps a session in one object, so both halves share it behind a lock, held only to
//! decrypt or encrypt, never across a socket read or write: a client that stops reading stalls
//! its replies, not the reading of its requests. The bytes a half encrypts must reach the
//! socket in the order they were encrypted (records are numbered), so a half takes the socket's
//! write lock before it lets go of the session (lock order: session, then socket).

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rustls::{ServerConfig, ServerConnection};

use super::{drive, TlsError};

/// Ciphertext read from the socket at a time.
const READ_CHUNK: usize = 64 * 1024;

struct Channel<W> {
    session: Mutex<ServerConnection>,
    socket: Mutex<W>,
}

impl<W: Write> Channel<W> {
    fn session(&self) -> MutexGuard<'_, ServerConnection> {
        self.session.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends what `session` has encrypted, in order, without holding it across the write.
    fn send(&self, mut session: MutexGuard<'_, ServerConnection>) -> io::Result<()> {
        let mut out = Vec::new();
        while session.wants_write() {
            session.write_tls(&mut out)?;
        }
        let mut socket = self.socket.lock().unwrap_or_else(PoisonError::into_inner);
        drop(session);
        socket.write_all(&out)
    }
}

/// The reading half: decrypts what arrives on the socket (read through `R`, which may bound
/// the wait, as a handshake deadline does).
pub struct TlsReader<R, W> {
    channel: Arc<Channel<W>>,
    socket: R,
    ciphertext: Box<[u8]>,
    start: usize,
    end: usize,
}

/// The writing half: encrypts and sends.
pub struct TlsWriter<W> {
    channel: Arc<Channel<W>>,
}

/// Runs the server side of a TLS handshake on a socket (read through `reader`, which must not
/// have read ahead, and written through `socket`), and splits the session into its two halves.
pub fn accept<R: Read, W: Write>(config: Arc<ServerConfig>, mut reader: R, mut socket: W) -> Result<(TlsReader<R, W>, TlsWriter<W>), TlsError> {
    let mut session = ServerConnection::new(config)?;
    drive(&mut session, &mut reader, &mut socket)?;
    // A reply may be as large as a read request (32 MiB): encrypted at once, sent at once.
    session.set_buffer_limit(None);
    let channel = Arc::new(Channel { session: Mutex::new(session), socket: Mutex::new(socket) });
    let writer = TlsWriter { channel: channel.clone() };
    Ok((TlsReader { channel, socket: reader, ciphertext: vec![0; READ_CHUNK].into_boxed_slice(), start: 0, end: 0 }, writer))
}

impl<R, W> TlsReader<R, W> {
    /// The socket's reader (to end a handshake deadline).
    pub fn socket_mut(&mut self) -> &mut R {
        &mut self.socket
    }
}

impl<R: Read, W: Write> Read for TlsReader<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut session = self.channel.session();
            match session.reader().read(buf) {
                // 0: the client closed the session cleanly (close_notify).
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if self.start < self.end {
                self.start += session.read_tls(&mut &self.ciphertext[self.start..self.end])?;
                session.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if session.wants_write() {
                    self.channel.send(session)?;
                }
                continue;
            }
            drop(session);
            self.end = self.socket.read(&mut self.ciphertext)?;
            self.start = 0;
            if self.end == 0 {
                // The socket ended: rustls tells a clean close from a truncated session.
                self.channel.session().read_tls(&mut &[][..])?;
            }
        }
    }
}

impl<W: Write> Write for TlsWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut session = self.channel.session();
        session.writer().write_all(buf)?;
        self.channel.send(session)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
