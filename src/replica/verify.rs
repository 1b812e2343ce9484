//! Online verify (`blkrepl verify`) as the node that runs it: with each connected peer it walks
//! the whole device in order and sends the digests of every block (`core::block_digest` says
//! why SHA-256, not crc32c); the peer compares them with its own blocks (`replica/compare.rs`).
//! Blocks that differ are marked out of sync for that peer and reported in `status` and the
//! log; the peer marks itself Outdated. Verify repairs nothing: which copy is right is the
//! operator's call, and the repair is a resync (reconnect, or `invalidate` on the node to
//! overwrite).
//!
//! Each request is read under the resync's range lock and queued before any later write to
//! those blocks, so the peer compares at the same point of the write stream: an application
//! writing meanwhile causes no false report. For that reason a verify runs from the primary (or
//! between secondaries): a secondary sees a primary's writes on the other stream, whose order
//! against its own requests is not defined.

use super::weakened::{is_weakened, Rule};
use super::{Peer, Replica, VerifyRun, VerifyState};
use crate::core::states::{DiskState, ReplState, Role};
use crate::wire::{DigestPurpose, Message, DIGEST_BYTES, MAX_DIGESTS};
use std::time::{Duration, Instant};

/// Bytes per verify request: 256 digests at 4 KiB blocks. Also the most a peer's digest request
/// may ask this node to read (or one block, if larger): see `Replica::check_frame`.
pub(super) const CHUNK_BYTES: u64 = 1 << 20;
/// Requests sent and not yet answered, at most.
const MAX_REQUESTS_IN_FLIGHT: usize = 16;

/// What a verify with one peer does next.
#[derive(Debug, PartialEq, Eq)]
pub enum VerifyStep {
    /// Read these bytes (under the range lock), then [`Replica::verify_chunk_read`].
    Read { offset: u64, len: u64 },
    /// Too many requests unanswered, or the walk is done and answers are missing.
    Wait,
    /// The rate controller holds the walk back this long (see `pacing.rs`).
    Pace(Duration),
    /// Every block was compared.
    Finished,
    /// It cannot go on, for this reason.
    Stop(String),
}

impl Replica {
    /// Starts a verify with every connected peer it can run against: their ids, connection
    /// generations and names. The error is why none can start.
    pub fn verify_start(&mut self, now: Instant) -> Result<Vec<(u8, u64, String)>, String> {
        if self.disk != DiskState::UpToDate {
            return Err(format!("this node's disk is {}: verify compares an UpToDate copy with its peers", self.disk));
        }
        let me_primary = self.role == Role::Primary;
        let connected = |p: &&Peer| {
            p.connected && p.repl == ReplState::Established && matches!(p.disk, DiskState::UpToDate | DiskState::Outdated)
        };
        if let Some(primary) = self.peers.iter().filter(connected).find(|p| p.role == Role::Primary && !me_primary) {
            return Err(format!("{} is primary: run `blkrepl verify` there", primary.name));
        }
        // An aborted verify's answers may still be on their way; a new run would take them for its own.
        let busy = |p: &Peer| {
            p.sync.verify.as_ref().is_some_and(|v| {
                v.state == VerifyState::Running || v.generation == p.generation && !v.awaiting.is_empty()
            })
        };
        if let Some(busy) = self.peers.iter().find(|p| busy(p)) {
            return Err(format!("a verify with {} is still running", busy.name));
        }
        let targets: Vec<(u8, u64, String)> =
            self.peers.iter().filter(connected).map(|p| (p.node_id, p.generation, p.name.clone())).collect();
        if targets.is_empty() {
            return Err("no peer to verify against: one must be connected, Established (not syncing) and have a disk".into());
        }
        let device = self.sb.data_size;
        for (peer_id, generation, name) in &targets {
            self.peer_mut(*peer_id).sync.verify = Some(VerifyRun::new(*generation, now, device));
            self.start_pacing(*peer_id, now);
            tracing::info!(resource = %self.resource, peer = %name, "online verify started");
        }
        Ok(targets)
    }

    /// Why the verify with `peer_id` on connection `generation` cannot go on, if it cannot.
    pub fn verify_interrupted(&self, peer_id: u8, generation: u64) -> Option<String> {
        let peer = self.peer(peer_id);
        if self.stopping {
            Some("this node is going down".into())
        } else if peer.generation != generation || !peer.connected {
            Some(format!("the connection to {} ended", peer.name))
        } else if peer.repl != ReplState::Established {
            Some(format!("replication with {} became {}", peer.name, peer.repl))
        } else {
            self.disk_failed_under_verify()
        }
    }

    /// This primary's disk failed under its verify (a write or a flush, `io_failed`): its copy
    /// of the blocks written lately is unknown (already marked for every data peer), so
    /// comparing it says nothing of the peer's, and a difference would make the peer, which
    /// may hold the newer copy, Outdated, and the source of the next resync this node (seed
    /// 78085 of the long run).
    fn disk_failed_under_verify(&self) -> Option<String> {
        self.io_failed.as_ref().map(|why| format!("this node's disk failed ({why})"))
    }

    /// The next step of the verify with `peer_id` (see [`VerifyStep`]).
    pub fn verify_next(&mut self, now: Instant, peer_id: u8, generation: u64) -> VerifyStep {
        if let Some(reason) = self.verify_interrupted(peer_id, generation) {
            return VerifyStep::Stop(reason);
        }
        let Some(run) = self.peer(peer_id).sync.verify.as_ref() else { return VerifyStep::Stop("no verify".into()) };
        let device = self.sb.data_size;
        let (in_flight, cursor) = (run.awaiting.len(), run.cursor);
        if cursor >= device {
            return if in_flight == 0 { VerifyStep::Finished } else { VerifyStep::Wait };
        }
        if in_flight >= MAX_REQUESTS_IN_FLIGHT {
            return VerifyStep::Wait;
        }
        if let Some(wait) = self.pace_wait(peer_id, now) {
            return VerifyStep::Pace(wait);
        }
        let block_size = u64::from(self.sb.params.bitmap_block_size);
        let chunk = (CHUNK_BYTES / block_size).clamp(1, MAX_DIGESTS as u64) * block_size;
        let (offset, len) = (cursor, chunk.min(device - cursor));
        if self.overlaps_busy(offset, len) && !is_weakened(Rule::VerifyBesideWrites) {
            // A write in flight there is in the stream ahead of this request, but maybe not on
            // this disk yet: the peer would compare a newer block with an older digest.
            return VerifyStep::Wait;
        }
        VerifyStep::Read { offset, len }
    }

    /// The digests of the blocks read at `offset` (under the range lock, before any later
    /// write to them): the request goes out and the walk moves on.
    pub fn verify_chunk_read(&mut self, peer_id: u8, offset: u64, len: u64, digests: Vec<[u8; DIGEST_BYTES]>) {
        if self.disk_failed_under_verify().is_some() {
            // Read after the failure, maybe from a cache it emptied: not sent; the next step
            // stops the verify.
            return;
        }
        self.paced(peer_id, len);
        let run = self.peer_mut(peer_id).sync.verify.as_mut().expect("a running verify");
        run.awaiting.push_back((offset, digests.len() as u32));
        run.cursor = offset + len;
        self.send_bulk(peer_id, Message::DigestRequest { purpose: DigestPurpose::Verify, offset, digests }, None);
    }

    /// The verify with `peer_id` stopped: how is recorded and told to the operator.
    pub fn verify_ended(&mut self, peer_id: u8, outcome: Result<(), String>) {
        let (name, primary) = (self.peer(peer_id).name.clone(), self.role == Role::Primary);
        let resource = self.resource.clone();
        let Some(run) = self.peer_mut(peer_id).sync.verify.as_mut() else { return };
        run.state = match outcome {
            Ok(()) => VerifyState::Finished,
            Err(reason) => VerifyState::Aborted(reason),
        };
        let (found, done) = (run.found_bytes, run.progress.done_bytes());
        let how = match &run.state {
            VerifyState::Aborted(reason) => format!("aborted ({reason}) after {done} bytes"),
            _ => format!("finished: {done} bytes compared"),
        };
        if found == 0 {
            tracing::info!(resource = %resource, peer = %name, "online verify {how}, no difference");
            return;
        }
        let first = run.found_ranges[0];
        let other_way = if primary {
            String::new()
        } else {
            format!("; to take {name}'s copy instead, run `blkrepl invalidate {resource}` here (a full resync)")
        };
        tracing::warn!(
            resource = %resource, peer = %name,
            "online verify {how}: {found} bytes differ (the first {} at offset {}; each range is logged above) and are marked out of sync for {name}. \
             To resync them from this node, run `blkrepl disconnect {resource}` and then `blkrepl connect {resource}` here{other_way}",
            first.1, first.0
        );
    }
}

#[cfg(test)]
mod tests {
    use super::VerifyStep;
    use crate::replica::testing::{primary_replicating, settled};
    use crate::replica::{Action, VerifyState};
    use crate::wire::Message;

    #[test]
    fn a_verify_walks_the_device_with_a_bounded_number_of_requests_and_finishes_on_the_last_answer() {
        let (mut r, t0) = primary_replicating();
        let targets = r.verify_start(t0).expect("an Established peer");
        let generation = targets[0].1;
        assert!(r.verify_start(t0).unwrap_err().contains("still running"));
        let mut requests = Vec::new();
        let mut now = t0;
        loop {
            match r.verify_next(now, 1, generation) {
                VerifyStep::Read { offset, len } => {
                    let digests = vec![[0u8; 32]; (len / 4096) as usize];
                    r.verify_chunk_read(1, offset, len, digests);
                    requests.push((offset, len));
                }
                VerifyStep::Pace(wait) => now += wait,
                VerifyStep::Wait => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(requests.len(), 16, "at most 16 requests unanswered");
        let sent = r.take_actions().iter().filter(|a| matches!(a, Action::Send { msg: Message::DigestRequest { .. }, .. })).count();
        assert_eq!(sent, 16);
        let mut answered = 0;
        while r.verify_next(now, 1, generation) != VerifyStep::Finished {
            match r.verify_next(now, 1, generation) {
                VerifyStep::Read { offset, len } => {
                    r.verify_chunk_read(1, offset, len, vec![[0u8; 32]; (len / 4096) as usize]);
                    requests.push((offset, len));
                }
                VerifyStep::Pace(wait) => now += wait,
                VerifyStep::Wait => {
                    let (offset, len) = requests[answered];
                    r.verify_reply_received(1, offset, (len / 4096) as u32, &[]);
                    answered += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(answered, requests.len());
        assert_eq!(requests.iter().map(|r| r.1).sum::<u64>(), r.sb.data_size, "the whole device, once");
        r.verify_ended(1, Ok(()));
        assert_eq!(r.peer(1).sync.verify.as_ref().unwrap().state, VerifyState::Finished);
    }

    #[test]
    fn a_verify_request_waits_for_a_write_in_flight_to_its_blocks() {
        let (mut r, t0) = primary_replicating();
        let generation = r.verify_start(t0).unwrap()[0].1;
        let data = bytes::Bytes::from(vec![7u8; 4096]);
        r.submit(t0, 1, crate::frontend::BlockRequest::Write { offset: 8192, data, fua: false }, |_| 0);
        let id = settled(&mut r).iter().find_map(|a| match a {
            Action::Io { tag: crate::replica::IoTag::Write(id), .. } => Some(*id),
            _ => None,
        }).expect("the local write");
        // Its Data frame is in the stream already, its local write not done: a digest read now
        // would hold the old block and the peer would compare the new one.
        assert_eq!(r.verify_next(t0, 1, generation), VerifyStep::Wait);
        r.io_done(t0, crate::replica::IoTag::Write(id), Ok(None));
        r.peer_reached(t0, id, 1, crate::core::inflight::AckLevel::Written);
        assert!(matches!(r.verify_next(t0, 1, generation), VerifyStep::Read { offset: 0, .. }));
    }

    #[test]
    fn a_verify_stops_when_a_flush_of_its_disk_fails_and_sends_nothing_read_after() {
        let (mut r, t0) = primary_replicating();
        let generation = r.verify_start(t0).unwrap()[0].1;
        let VerifyStep::Read { offset, len } = r.verify_next(t0, 1, generation) else { panic!("a first read") };
        r.submit(t0, 1, crate::frontend::BlockRequest::Flush, |_| 0);
        let flush = settled(&mut r).iter().find_map(|a| match a {
            Action::Io { tag: tag @ crate::replica::IoTag::Flush(_), .. } => Some(*tag),
            _ => None,
        }).expect("the local flush");
        r.io_done(t0, flush, Err(crate::core::inflight::LocalFailure::Io));
        r.take_actions();
        r.verify_chunk_read(1, offset, len, vec![[0u8; 32]; (len / 4096) as usize]);
        assert!(!r.take_actions().iter().any(|a| matches!(a, Action::Send { msg: Message::DigestRequest { .. }, .. })), "what it read after the failure is not compared");
        assert!(matches!(r.verify_next(t0, 1, generation), VerifyStep::Stop(reason) if reason.contains("disk failed")));
    }

    #[test]
    fn a_verify_stops_when_its_connection_goes() {
        let (mut r, t0) = primary_replicating();
        let generation = r.verify_start(t0).unwrap()[0].1;
        r.link_down(1, "gone", 0);
        assert!(matches!(r.verify_next(t0, 1, generation), VerifyStep::Stop(reason) if reason.contains("ended")));
    }
}
