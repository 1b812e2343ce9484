//! Which frames a peer may send, given what this replica knows of their link. A frame that does
//! not fit is a protocol violation: the link is dropped with the reason, and nothing of the
//! frame is applied. A buggy or hostile peer can then neither write into a primary, nor slip
//! data past a sync decision, nor end a resync it does not run.

use super::Replica;
use crate::core::states::{ReplState, Role};
use crate::core::sync_decision::{same_uuid, UUID_JUST_CREATED};
use crate::wire::{DigestPurpose, Message};

/// Whether [`Replica::check_frame`] has anything to say about `msg`. Write acks are not
/// checked: each is matched by id against the writes in flight to that peer, and one that
/// matches none (its write completed when a link changed) changes nothing.
pub fn needs_check(msg: &Message) -> bool {
    !matches!(msg, Message::RecvAck { .. } | Message::WriteAck { .. })
}

impl Replica {
    /// Checks a frame from `peer_id` that arrived on connection `generation` against the state
    /// of their link. The error is why the link must be dropped.
    pub fn check_frame(&self, peer_id: u8, generation: u64, msg: &Message) -> Result<(), String> {
        let peer = self.peer(peer_id);
        if !peer.connected || peer.generation != generation {
            return Err("the connection was replaced".into());
        }
        let name = &peer.name;
        let repl = peer.repl;
        let primary_here = self.role == Role::Primary;
        // The stream of an Established primary (or of this node's sync source, which sends
        // application writes too if it is the primary): Behind, what it queued before it went
        // Ahead still arrives.
        let from_primary_stream = || -> Result<(), String> {
            if self.witness {
                return Err(format!("{name} sent {} to a witness, which holds no data", msg.name()));
            }
            if primary_here {
                return Err(format!("{name} sent {} but this node is Primary: two primaries", msg.name()));
            }
            if peer.role != Role::Primary {
                return Err(format!("{name} sent {} but is not primary", msg.name()));
            }
            if !matches!(repl, ReplState::Established | ReplState::SyncTarget | ReplState::Behind) {
                return Err(format!("{name} sent {} while replication is {repl}", msg.name()));
            }
            Ok(())
        };
        let inside = |offset: u64, len: u64| match offset.checked_add(len) {
            Some(end) if end <= self.sb.data_size => Ok(()),
            _ => Err(format!("{} at {offset}+{len} is outside the device", msg.name())),
        };
        match msg {
            Message::Hello(_) | Message::AuthChallenge { .. } | Message::AuthResponse { .. } => {
                Err(format!("unexpected {} after the handshake", msg.name()))
            }
            // What a frame asks for is checked before whether the link may ask it: a frame that
            // could never be right says so whatever the state.
            Message::Data { offset, payload, .. } => {
                inside(*offset, payload.len() as u64)?;
                from_primary_stream()
            }
            Message::Zeroes { offset, len, .. } => {
                inside(*offset, u64::from(*len))?;
                from_primary_stream()
            }
            // A barrier closes an epoch of the primary's writes (the last one of a primary that
            // demoted follows the State saying so) or of this node's resync.
            Message::Barrier { .. } => match repl {
                ReplState::SyncTarget | ReplState::Behind if !primary_here && !self.witness => Ok(()),
                // Off: this node paused the link for a resync from a third node meanwhile.
                ReplState::Established | ReplState::Off if peer.was_primary && !primary_here && !self.witness => Ok(()),
                _ => from_primary_stream(),
            },
            Message::BarrierAck { epoch, writes } => match peer.barriers.front() {
                Some(&(sent_epoch, sent_writes)) if (sent_epoch, sent_writes) == (*epoch, *writes) => Ok(()),
                Some(&(sent_epoch, sent_writes)) => Err(format!(
                    "barrier ack for epoch {epoch} counts {writes} writes; epoch {sent_epoch} had {sent_writes}"
                )),
                None => Err(format!("barrier ack for epoch {epoch} that was never sent")),
            },
            Message::NegAck { .. } | Message::State(_) | Message::Ping | Message::Disconnect { .. } => Ok(()),
            Message::VoteRequest { .. } | Message::Vote { .. } => Ok(()),
            Message::RecvAck { .. } | Message::WriteAck { .. } => Ok(()),
            Message::PingAck if peer.lease.awaits_answer() => Ok(()),
            Message::PingAck => Err("ping answer without a ping".into()),
            Message::BitmapRuns { .. } if peer.pending_sync.is_some() => Ok(()),
            // Decided on a State of this node's from before it began to wait for a third node's
            // resync: declined (see `Replica::bitmap_declined`).
            Message::BitmapRuns { .. } if self.waits_for_a_third_resync_seen_by(peer_id) => Ok(()),
            Message::BitmapRuns { .. } => Err(format!("{name} sent its bitmap while no sync decision is pending")),
            Message::ResyncData { offset, .. } | Message::ResyncZeroes { offset, .. } => {
                let len = match msg {
                    Message::ResyncZeroes { len, .. } => u64::from(*len),
                    _ => msg.payload_len() as u64,
                };
                inside(*offset, len)?;
                if primary_here || !matches!(repl, ReplState::SyncTarget | ReplState::Behind) {
                    return Err(format!("resync data from {name} while replication is {repl}"));
                }
                Ok(())
            }
            Message::ThirdPeerBits { .. } => {
                if primary_here || self.witness || repl != ReplState::SyncTarget {
                    return Err(format!("{name} sent its bits for a third node outside a resync into this node (replication is {repl})"));
                }
                Ok(())
            }
            Message::ResyncDone { current_uuid, .. } => {
                // Two fresh nodes are declared in sync by `new-current-uuid --clear-bitmap` on one;
                // a declared peer may have passed the generation on before (see
                // `replica/declaration.rs`).
                let declared = same_uuid(self.sb.uuids.current, UUID_JUST_CREATED) || same_uuid(self.sb.uuids.current, *current_uuid);
                if primary_here || self.witness || !(repl == ReplState::SyncTarget || declared && repl == ReplState::Established) {
                    return Err(format!("{name} ended a resync it does not run (replication is {repl}, this node {})", self.role));
                }
                Ok(())
            }
            Message::DigestRequest { purpose, offset, digests } => {
                // Whole blocks of the device (its last block may be short); the codec bounds
                // their number.
                let block = u64::from(self.sb.params.bitmap_block_size);
                let last_start = (digests.len() as u64).checked_sub(1).and_then(|n| n.checked_mul(block)).and_then(|b| b.checked_add(*offset));
                if offset % block != 0 || last_start.is_none_or(|start| start >= self.sb.data_size) {
                    return Err(format!("digests for {} blocks at {offset} do not match the device's {block}-byte blocks", digests.len()));
                }
                // Each request costs this node a read of its span: no more than this node's own
                // requests ever ask (the codec's bound on the count alone allows 4 GiB).
                let span = digests.len() as u64 * block;
                let most = super::verify::CHUNK_BYTES.max(block);
                if span > most {
                    return Err(format!("digests for {span} bytes in one request, more than the {most} this node reads for one"));
                }
                let expected = match purpose {
                    DigestPurpose::Verify => matches!(repl, ReplState::Established | ReplState::Behind),
                    DigestPurpose::Resync => matches!(repl, ReplState::SyncTarget | ReplState::Behind),
                };
                if !expected || primary_here || self.witness {
                    return Err(format!("{purpose:?} digests from {name} while replication is {repl} and this node {}", self.role));
                }
                Ok(())
            }
            Message::DigestReply { purpose: DigestPurpose::Verify, offset, blocks, .. } => {
                let run = peer.sync.verify.as_ref().filter(|v| v.generation == peer.generation);
                match run.and_then(|v| v.awaiting.front()) {
                    Some(&expected) if expected == (*offset, *blocks) => Ok(()),
                    expected => Err(format!("verify answer for {offset} ({blocks} blocks), expected {expected:?}")),
                }
            }
            Message::DigestReply { purpose: DigestPurpose::Resync, offset, blocks, .. } => match repl {
                // The resync stopped when this node went Ahead; the answer changes nothing.
                ReplState::Ahead => Ok(()),
                ReplState::SyncSource => match peer.sync.resync_digests.front() {
                    Some(expected) if (expected.offset, expected.blocks) == (*offset, *blocks) => Ok(()),
                    expected => Err(format!("resync digest answer for {offset} ({blocks} blocks), expected {expected:?}")),
                },
                _ => Err(format!("resync digest answer from {name} while replication is {repl}")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::core::states::{ReplState, Role};
    use crate::core::sync_decision::SyncDecision;
    use crate::replica::testing::two_node_replica;
    use crate::replica::Replica;
    use crate::wire::{DataPosition, DigestPurpose, Message};
    use bytes::Bytes;

    /// This node Secondary, linked (connection 1) to node 1, an Established primary.
    fn linked_to_primary() -> Replica {
        let (mut replica, t0) = two_node_replica();
        replica.link_up(1, t0);
        let peer = replica.peer_mut(1);
        peer.role = Role::Primary;
        peer.repl = ReplState::Established;
        replica
    }

    fn data(offset: u64) -> Message {
        Message::Data { id: 1, epoch: 1, offset, fua: false, payload: Bytes::from(vec![0u8; 4096]) }
    }

    #[test]
    fn writes_come_only_from_the_established_primary_and_inside_the_device() {
        let mut r = linked_to_primary();
        assert_eq!(r.check_frame(1, 1, &data(0)), Ok(()));
        assert_eq!(r.check_frame(1, 1, &Message::Barrier { epoch: 1 }), Ok(()));
        let end = r.sb.data_size;
        assert!(r.check_frame(1, 1, &data(end - 4096)).is_ok());
        assert!(r.check_frame(1, 1, &data(end - 2048)).unwrap_err().contains("outside the device"));
        assert!(r.check_frame(1, 1, &data(u64::MAX - 100)).unwrap_err().contains("outside the device"));
        assert!(r.check_frame(1, 2, &data(0)).unwrap_err().contains("replaced"), "another connection's frame");
        r.peer_mut(1).repl = ReplState::Off;
        assert!(r.check_frame(1, 1, &data(0)).unwrap_err().contains("while replication is Off"));
        r.peer_mut(1).repl = ReplState::Established;
        r.peer_mut(1).role = Role::Secondary;
        assert!(r.check_frame(1, 1, &data(0)).unwrap_err().contains("not primary"));
        assert!(r.check_frame(1, 1, &Message::Barrier { epoch: 1 }).is_err());
        r.peer_mut(1).was_primary = true;
        assert_eq!(r.check_frame(1, 1, &Message::Barrier { epoch: 1 }), Ok(()), "the last barrier of a primary that demoted");
        assert!(r.check_frame(1, 1, &data(0)).is_err(), "but no write after its demotion");
        r.peer_mut(1).role = Role::Primary;
        r.role = Role::Primary;
        assert!(r.check_frame(1, 1, &data(0)).unwrap_err().contains("two primaries"));
    }

    #[test]
    fn a_sync_source_sends_resync_data_and_ends_the_resync_nobody_else_does() {
        let mut r = linked_to_primary();
        let resync_data = Message::ResyncData { offset: 0, payload: Bytes::from(vec![0u8; 4096]) };
        let zeroes = Message::ResyncZeroes { offset: 0, len: 4096 };
        let done = Message::ResyncDone { current_uuid: 5, history: [0; 4], position: DataPosition::default() };
        assert!(r.check_frame(1, 1, &resync_data).is_err());
        assert!(r.check_frame(1, 1, &zeroes).unwrap_err().contains("resync data"));
        assert_eq!(r.check_frame(1, 1, &done), Ok(()), "two fresh nodes declared in sync (new-current-uuid --clear-bitmap)");
        r.sb.uuids.current = 0xABC0;
        assert!(r.check_frame(1, 1, &done).unwrap_err().contains("does not run"));
        r.peer_mut(1).role = Role::Secondary;
        r.peer_mut(1).repl = ReplState::SyncTarget;
        assert_eq!(r.check_frame(1, 1, &resync_data), Ok(()));
        assert_eq!(r.check_frame(1, 1, &zeroes), Ok(()));
        let past_the_end = Message::ResyncZeroes { offset: r.sb.data_size - 4096, len: 8192 };
        assert!(r.check_frame(1, 1, &past_the_end).is_err(), "bounded by the device");
        assert_eq!(r.check_frame(1, 1, &Message::Barrier { epoch: 1 }), Ok(()), "the source's epochs");
        assert_eq!(r.check_frame(1, 1, &done), Ok(()));
    }

    #[test]
    fn a_bitmap_only_while_a_sync_decision_waits_for_it() {
        let mut r = linked_to_primary();
        let runs = Message::BitmapRuns { last: true, runs: vec![(0, 1)] };
        assert!(r.check_frame(1, 1, &runs).unwrap_err().contains("no sync decision"));
        r.peer_mut(1).pending_sync = Some(SyncDecision::BitmapTarget);
        assert_eq!(r.check_frame(1, 1, &runs), Ok(()));
    }

    #[test]
    fn acks_answer_what_was_sent() {
        let mut r = linked_to_primary();
        let ack = Message::BarrierAck { epoch: 3, writes: 2 };
        assert!(r.check_frame(1, 1, &ack).unwrap_err().contains("never sent"));
        r.peer_mut(1).barriers.push_back((3, 1));
        assert!(r.check_frame(1, 1, &ack).unwrap_err().contains("had 1"));
        r.peer_mut(1).barriers.push_front((3, 2));
        assert_eq!(r.check_frame(1, 1, &ack), Ok(()));
        let pong = Message::PingAck;
        assert!(r.check_frame(1, 1, &pong).unwrap_err().contains("without a ping"));
        let t = std::time::Instant::now();
        let timing = r.timing;
        assert!(r.peer_mut(1).lease.ping_due(t, &timing));
        assert_eq!(r.check_frame(1, 1, &pong), Ok(()));
        let reply = Message::DigestReply { purpose: DigestPurpose::Verify, offset: 0, blocks: 1, differing: vec![] };
        assert!(r.check_frame(1, 1, &reply).is_err(), "no verify runs");
    }

    #[test]
    fn digest_requests_cover_whole_blocks_of_the_device_and_the_handshake_is_over() {
        let r = linked_to_primary();
        let request = |offset: u64, n: usize| Message::DigestRequest { purpose: DigestPurpose::Verify, offset, digests: vec![[0u8; 32]; n] };
        assert_eq!(r.check_frame(1, 1, &request(4096, 4)), Ok(()));
        assert!(r.check_frame(1, 1, &request(100, 1)).is_err(), "unaligned");
        assert!(r.check_frame(1, 1, &request(r.sb.data_size, 1)).is_err(), "past the end");
        // 4 KiB blocks: 256 digests are the most this node reads for one request.
        assert_eq!(r.check_frame(1, 1, &request(0, 256)), Ok(()));
        let too_much = r.check_frame(1, 1, &request(0, 257)).unwrap_err();
        assert!(too_much.contains("1052672 bytes"), "{too_much}");
        let hello = Message::Hello(crate::wire::Hello {
            version: 1,
            features: 0,
            resource: "r0".into(),
            from_node: 1,
            to_node: 0,
            data_size_bytes: 0,
            bitmap_block_size: 4096,
            protocol: b'C',
        });
        assert!(r.check_frame(1, 1, &hello).unwrap_err().contains("after the handshake"));
    }
}
