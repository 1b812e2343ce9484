//! One deadline for a whole handshake, however the other side trickles its bytes.
//!
//! A read timeout bounds each read, not the handshake: a client that sends one byte just
//! before every timeout holds its connection (and the thread and the place it was admitted
//! to) for ever. Both the peer links and the NBD export read their handshakes through
//! [`HandshakeStream`], which gives every read only what is left of the deadline.

use std::io::{self, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A socket whose reads and writes can be bounded in time.
pub trait TimedSocket: Read {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl TimedSocket for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
}

/// A socket as its reader sees it: during the handshake every read waits at most until the
/// handshake's deadline; afterwards as long as the caller says.
pub struct HandshakeStream<S = TcpStream> {
    stream: S,
    deadline: Option<Instant>,
}

impl<S: TimedSocket> HandshakeStream<S> {
    /// `stream` at the start of a handshake that must end within `budget` (writes too: a
    /// client that never reads cannot hold a handshake's send either).
    pub fn handshaking(stream: S, budget: Duration) -> io::Result<HandshakeStream<S>> {
        stream.set_write_timeout(Some(budget))?;
        Ok(HandshakeStream { stream, deadline: Some(Instant::now() + budget) })
    }

    /// The handshake is done: each read waits up to `read_timeout` (`None`: as long as it
    /// takes), writes as long as they take (the caller bounds them its own way).
    pub fn handshake_done(&mut self, read_timeout: Option<Duration>) -> io::Result<()> {
        self.deadline = None;
        self.stream.set_write_timeout(None)?;
        self.stream.set_read_timeout(read_timeout)
    }
}

impl<S: TimedSocket> Read for HandshakeStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the handshake took too long"));
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        self.stream.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trickling_client_cannot_outlast_the_handshake_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut stream = HandshakeStream::handshaking(server, Duration::from_millis(300)).unwrap();
        let trickle = std::thread::spawn(move || {
            use std::io::Write;
            // One byte every 100 ms: each read alone would be quick enough.
            for _ in 0..30 {
                if client.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let mut got = 0;
        let mut buf = [0u8; 1];
        let err = loop {
            match stream.read(&mut buf) {
                Ok(0) => panic!("the client closed first"),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break e,
            }
        };
        assert!(matches!(err.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock), "{err}");
        assert!(got < 30, "the deadline ended the handshake before the client stopped ({got} bytes)");
        drop(stream);
        trickle.join().unwrap();
    }
}
