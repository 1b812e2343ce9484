//! What a connection may cost before it has authenticated as a peer.
//!
//! Anyone who reaches the replication port can open connections. Each accepted one gets a
//! thread for its handshake, so without a bound a flood of idle connections would exhaust
//! threads and file descriptors, and a real peer (a node coming back after a partition) could
//! not get in. Hence a cap on handshakes in progress, in total and per source address (a
//! flood from one address leaves room for the peers, which each have their own); and one
//! deadline for the whole handshake (see [`crate::handshake_stream`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

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
}
