//! A frame from a peer, as the replica takes it: checked against the link's state (see
//! `replica/frames.rs`), then handed to the rule it is for. The daemon's reader threads and the
//! simulator's network both deliver frames here, so which frame does what is decided once.

use super::Replica;
use crate::core::inflight::AckLevel;
use crate::replica::LocalIo;
use crate::wire::{DigestPurpose, Message};
use std::time::Instant;

impl Replica {
    /// `msg` arrived from `peer_id` on connection `generation`. The error is why the link must
    /// be dropped; nothing of the offending frame was applied.
    pub fn receive(&mut self, now: Instant, peer_id: u8, generation: u64, msg: Message) -> Result<(), String> {
        let acked = match msg {
            Message::RecvAck { id } => Some((id, AckLevel::Received)),
            Message::WriteAck { id } => Some((id, AckLevel::Written)),
            _ => None,
        };
        if let Some((id, level)) = acked {
            // Matched by id against the writes in flight to that peer (see `frames::needs_check`).
            self.peer_reached(now, id, peer_id, level);
            return Ok(());
        }
        self.check_frame(peer_id, generation, &msg)?;
        match msg {
            Message::Data { id, epoch, offset, fua, payload } => {
                let len = payload.len() as u64;
                self.peer_write_received(now, peer_id, (id, epoch), offset, len, fua, LocalIo::Write { offset, data: payload, fua });
            }
            Message::Zeroes { id, epoch, offset, len, fua, discard } => {
                let op = LocalIo::Zeroes { offset, len: u64::from(len), discard, fua };
                self.peer_write_received(now, peer_id, (id, epoch), offset, u64::from(len), fua, op);
            }
            Message::NegAck { id, errno } => {
                return Err(format!("peer failed to write request {id} (errno {errno}); its disk is out of sync"));
            }
            Message::Barrier { epoch } => self.peer_barrier_received(peer_id, epoch),
            Message::BarrierAck { epoch, .. } => self.barrier_acked(now, peer_id, epoch),
            Message::ResyncData { offset, payload } => self.resync_data_received(peer_id, offset, payload),
            Message::ResyncZeroes { offset, len } => self.resync_zeroes_received(peer_id, offset, len),
            Message::ResyncDone { current_uuid, history, position } => {
                self.resync_done_in_stream(peer_id, current_uuid, history, position)
            }
            Message::DigestRequest { purpose, offset, digests } => self.digest_request_received(peer_id, purpose, offset, digests),
            Message::DigestReply { purpose: DigestPurpose::Verify, offset, blocks, differing } => {
                self.verify_reply_received(peer_id, offset, blocks, &differing)
            }
            Message::DigestReply { purpose: DigestPurpose::Resync, offset, blocks, differing } => {
                self.resync_digest_reply_received(peer_id, offset, blocks, &differing)
            }
            Message::State(state) => {
                let result = self.peer_state_received(peer_id, state);
                self.fence_ended_by_reconnect(peer_id);
                self.release_suspended(now, false);
                return result;
            }
            Message::BitmapRuns { last, .. } if self.peer(peer_id).pending_sync.is_none() => self.bitmap_declined(peer_id, last),
            Message::BitmapRuns { last, runs } => return self.bitmap_received(peer_id, last, &runs, now),
            Message::ThirdPeerBits { node, runs } => return self.third_peer_bits_received(peer_id, node, &runs),
            Message::Ping => self.send(peer_id, Message::PingAck),
            Message::PingAck => {
                self.peer_mut(peer_id).lease.answered();
                self.release_suspended(now, false);
            }
            Message::VoteRequest { ballot, term, position } => {
                self.vote_requested(now, peer_id, ballot, term, position)
            }
            Message::Vote { ballot, granted } => self.vote_received(peer_id, ballot, granted),
            Message::Disconnect { reason } => return Err(format!("peer disconnected: {reason}")),
            Message::RecvAck { .. } | Message::WriteAck { .. } => unreachable!("answered above"),
            Message::Hello(_) | Message::AuthChallenge { .. } | Message::AuthResponse { .. } => {
                unreachable!("refused by check_frame")
            }
        }
        Ok(())
    }
}
