//! What a connection may cost before it has authenticated as a peer.
//!
//! Anyone who reaches the replication port can open connections. Each accepted one gets a
//! thread for its handshake, so without a bound a flood of idle connections would exhaust
//! threads and file descriptors, and a real peer (a node coming back after a partition) could
//! not get in. Hence: a cap on handshakes in progress, in total and per source address (a
//! flood from one address leaves room for the peers, which each have their own), and one
//! deadline for the whole handshake rather than one per read (a client that trickles a byte at
//! a time cannot hold its slot longer than that).

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{IpAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Handshakes in progress at once: a cluster has a few dozen nodes at most, each dialing once.
pub const MAX_HANDSHAKES: usize = 32;
/// Handshakes in progress from one address: a node dials each peer once per resource.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 4;

/// Counts the handshakes in progress (see the module documentation).
#[derive(Default)]
pub struct HandshakeGate {
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
    /// A refusal was logged since the last admission: a flood is reported once, not per
    /// connection.
    refusing: bool,
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GateFull {
    #[error("{MAX_HANDSHAKES} peer handshakes are already in progress")]
    Total,
    #[error("{MAX_HANDSHAKES_PER_SOURCE} peer handshakes from {0} are already in progress")]
    Source(IpAddr),
}

/// A handshake's place at the gate, given back when dropped.
pub struct Admission {
    gate: Arc<HandshakeGate>,
    source: IpAddr,
}

impl HandshakeGate {
    /// A place for a handshake from `source`, or why there is none. The error's second field
    /// says whether this is the first refusal since the last admission (worth a log line).
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Admission, (GateFull, bool)> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let from_source = st.by_source.get(&source).copied().unwrap_or(0);
        let full = if st.total >= MAX_HANDSHAKES {
            Some(GateFull::Total)
        } else if from_source >= MAX_HANDSHAKES_PER_SOURCE {
            Some(GateFull::Source(source))
        } else {
            None
        };
        if let Some(full) = full {
            let first = !std::mem::replace(&mut st.refusing, true);
            return Err((full, first));
        }
        st.total += 1;
        *st.by_source.entry(source).or_default() += 1;
        st.refusing = false;
        Ok(Admission { gate: self.clone(), source })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut st = self.gate.state.lock().unwrap_or_else(|e| e.into_inner());
        st.total -= 1;
        if let Some(n) = st.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                st.by_source.remove(&self.source);
            }
        }
    }
}

/// A peer's socket as its reader sees it: during the handshake every read waits at most until
/// the handshake's deadline; once the link is up, until the link's silence timeout.
pub struct PeerStream {
    stream: TcpStream,
    deadline: Option<Instant>,
}

impl PeerStream {
    /// `stream` at the start of a handshake that must end within `budget` (writes too: a
    /// client that never reads cannot hold a handshake's send either).
    pub fn handshaking(stream: TcpStream, budget: Duration) -> io::Result<PeerStream> {
        stream.set_write_timeout(Some(budget))?;
        Ok(PeerStream { stream, deadline: Some(Instant::now() + budget) })
    }

    /// The handshake is done: reads wait up to `silence` each, writes as long as they take (the
    /// link's sender bounds them itself).
    pub fn handshake_done(&mut self, silence: Duration) -> io::Result<()> {
        self.deadline = None;
        self.stream.set_write_timeout(None)?;
        self.stream.set_read_timeout(Some(silence))
    }
}

impl Read for PeerStream {
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

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn one_source_gets_its_share_and_the_others_still_get_in() {
        let gate = Arc::new(HandshakeGate::default());
        let flood: Vec<Admission> = (0..MAX_HANDSHAKES_PER_SOURCE).map(|_| gate.admit(ip(9)).ok().unwrap()).collect();
        assert_eq!(gate.admit(ip(9)).err(), Some((GateFull::Source(ip(9)), true)));
        assert_eq!(gate.admit(ip(9)).err(), Some((GateFull::Source(ip(9)), false)), "reported once");
        let peer = gate.admit(ip(1));
        assert!(peer.is_ok(), "another address still gets in");
        drop(flood);
        assert!(gate.admit(ip(9)).is_ok(), "places come back when handshakes end");
    }

    #[test]
    fn the_total_is_capped_across_sources() {
        let gate = Arc::new(HandshakeGate::default());
        let held: Vec<Admission> = (0..MAX_HANDSHAKES).map(|i| gate.admit(ip((i / MAX_HANDSHAKES_PER_SOURCE) as u8)).ok().unwrap()).collect();
        assert_eq!(gate.admit(ip(200)).err().map(|e| e.0), Some(GateFull::Total));
        drop(held);
        let last = gate.admit(ip(200));
        assert!(last.is_ok());
        assert_eq!(gate.state.lock().unwrap().by_source.len(), 1, "sources with no handshake are forgotten");
    }

    #[test]
    fn a_trickling_client_cannot_outlast_the_handshake_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut stream = PeerStream::handshaking(server, Duration::from_millis(300)).unwrap();
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
                Err(e) => break e,
            }
        };
        assert!(matches!(err.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock), "{err}");
        assert!(got < 30, "the deadline ended the handshake before the client stopped ({got} bytes)");
        drop(stream);
        trickle.join().unwrap();
    }
}
