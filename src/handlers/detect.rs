//! Which handlers a new status snapshot calls for: pure (no I/O, no clock: the caller says when
//! the snapshot was taken), so every rule is unit-tested on hand-made snapshots.
//!
//! What a handler is about is read from the status as `blkrepl status` shows it, through the
//! same objects as the `events` stream ([`objects`]), whose JSON is what a handler gets.

use crate::core::states::{ConnState, DiskState, ReplState};
use crate::engine::{PeerStatus, ResourceStatus};
use crate::events::diff::objects;
use crate::events::Object;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The handlers, by what they are called for (DRBD's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    /// A connect found a split brain that no policy resolved.
    SplitBrain,
    /// This node had quorum and lost it.
    QuorumLost,
    /// This node started a resync as a peer's target.
    BeforeResyncTarget,
    /// That resync ended with this node UpToDate.
    AfterResyncTarget,
    /// A peer not connected for `peer_unreachable_after_s`, and again when it is back.
    PeerUnreachable,
    /// A primary lost a data peer under `fencing` (called by the replica's rule, not by a
    /// snapshot: see `handlers::fence`).
    FencePeer,
}

impl Handler {
    /// The handlers the status watch calls (`fence-peer` is not one of them).
    pub const ALL: [Handler; 5] =
        [Handler::SplitBrain, Handler::QuorumLost, Handler::BeforeResyncTarget, Handler::AfterResyncTarget, Handler::PeerUnreachable];

    /// The name in `[handlers]`, in `BLKREPL_HANDLER` and in the `handler` field of the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Handler::SplitBrain => "split-brain",
            Handler::QuorumLost => "quorum-lost",
            Handler::BeforeResyncTarget => "before-resync-target",
            Handler::AfterResyncTarget => "after-resync-target",
            Handler::PeerUnreachable => "peer-unreachable",
            Handler::FencePeer => "fence-peer",
        }
    }
}

/// The peer a call is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRef {
    pub name: String,
    pub node_id: u8,
}

/// One handler to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub handler: Handler,
    pub peer: Option<PeerRef>,
    /// The object as the events stream shows it in the snapshot that called for the handler:
    /// the resource (quorum), the connection (split brain, unreachable) or the peer device
    /// (resync).
    pub object: Object,
    /// `peer-unreachable` only: false when the peer became unreachable, true when it is back.
    pub recovered: Option<bool>,
}

/// What is remembered of a peer between snapshots.
#[derive(Debug, Default)]
struct PeerWatch {
    /// Since when the peer has not been connected (as first seen not connected).
    down_since: Option<Instant>,
    /// `peer-unreachable` was called for it, its recovery not yet.
    unreachable: bool,
    /// `before-resync-target` was called for it, `after-resync-target` not yet.
    resyncing: bool,
}

/// Follows consecutive snapshots of one resource and says which handlers they call for.
#[derive(Debug)]
pub struct Watch {
    unreachable_after: Duration,
    peers: BTreeMap<u8, PeerWatch>,
}

impl Watch {
    pub fn new(unreachable_after: Duration) -> Watch {
        Watch { unreachable_after, peers: BTreeMap::new() }
    }

    /// The calls that `after`, taken at `now`, makes due; `before` is the snapshot before it.
    /// In order: quorum lost, split brains, resyncs started, resyncs ended, unreachable peers.
    pub fn step(&mut self, before: &ResourceStatus, after: &ResourceStatus, now: Instant) -> Vec<Call> {
        let shown = objects(after, false);
        let call = |handler, p: &PeerStatus, which, recovered| Call {
            handler,
            peer: Some(PeerRef { name: p.name.clone(), node_id: p.node_id }),
            object: peer_object(&shown, which, p.node_id),
            recovered,
        };
        let mut calls = Vec::new();
        if before.quorum && !after.quorum {
            let object = shown.iter().find(|o| matches!(o, Object::Resource(_))).cloned().expect("a snapshot shows its resource");
            calls.push(Call { handler: Handler::QuorumLost, peer: None, object, recovered: None });
        }
        let was = |p: &PeerStatus| before.peers.iter().find(|b| b.node_id == p.node_id);
        for p in after.peers.iter().filter(|p| p.split_brain && !was(p).is_some_and(|b| b.split_brain)) {
            calls.push(call(Handler::SplitBrain, p, PeerObject::Connection, None));
        }

        // Resyncs as target: seen running, or counted as started though already over (one
        // that begins and ends between two snapshots).
        let mut unseen = after.resyncs_as_target.saturating_sub(before.resyncs_as_target);
        for p in &after.peers {
            let watch = self.peers.entry(p.node_id).or_default();
            if p.replication == ReplState::SyncTarget.as_str() && !watch.resyncing {
                watch.resyncing = true;
                unseen = unseen.saturating_sub(1);
                calls.push(call(Handler::BeforeResyncTarget, p, PeerObject::PeerDevice, None));
            }
        }
        if unseen > 0 {
            // Its source is the data peer this node received the most from meanwhile.
            let received = |p: &PeerStatus| p.received_bytes.saturating_sub(was(p).map_or(0, |b| b.received_bytes));
            let source = after
                .peers
                .iter()
                .filter(|p| !p.witness && p.connection == ConnState::Connected.as_str())
                .filter(|p| !self.peers.get(&p.node_id).is_some_and(|w| w.resyncing))
                .max_by_key(|p| received(p));
            if let Some(p) = source {
                self.peers.entry(p.node_id).or_default().resyncing = true;
                calls.push(call(Handler::BeforeResyncTarget, p, PeerObject::PeerDevice, None));
            }
        }
        for p in &after.peers {
            let watch = self.peers.entry(p.node_id).or_default();
            if !watch.resyncing || p.replication == ReplState::SyncTarget.as_str() {
                continue;
            }
            if after.disk == DiskState::UpToDate.as_str() {
                watch.resyncing = false;
                calls.push(call(Handler::AfterResyncTarget, p, PeerObject::PeerDevice, None));
            } else if p.connection != ConnState::Connected.as_str() {
                // Cut off before it ended: not UpToDate, so no after-resync-target.
                watch.resyncing = false;
            }
        }

        for p in &after.peers {
            let watch = self.peers.entry(p.node_id).or_default();
            if p.connection == ConnState::Connected.as_str() {
                watch.down_since = None;
                if std::mem::take(&mut watch.unreachable) {
                    calls.push(call(Handler::PeerUnreachable, p, PeerObject::Connection, Some(true)));
                }
            } else {
                let since = *watch.down_since.get_or_insert(now);
                if !watch.unreachable && now.duration_since(since) >= self.unreachable_after {
                    watch.unreachable = true;
                    calls.push(call(Handler::PeerUnreachable, p, PeerObject::Connection, Some(false)));
                }
            }
        }
        calls
    }
}

/// Which of a peer's objects a call carries.
#[derive(Clone, Copy)]
pub(super) enum PeerObject {
    Connection,
    PeerDevice,
}

pub(super) fn peer_object(shown: &[Object], which: PeerObject, node_id: u8) -> Object {
    let found = shown.iter().find(|o| match (which, o) {
        (PeerObject::Connection, Object::Connection(c)) => c.peer_node_id == node_id,
        (PeerObject::PeerDevice, Object::PeerDevice(d)) => d.peer_node_id == node_id,
        _ => false,
    });
    found.cloned().expect("a snapshot shows every peer's objects")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::fixtures::status;

    const AFTER: Duration = Duration::from_secs(10);

    /// Each snapshot in turn, taken a second apart: the handlers called, with their peer.
    fn run(snapshots: &[ResourceStatus]) -> Vec<(Handler, Option<String>, Option<bool>)> {
        let mut watch = Watch::new(AFTER);
        let start = Instant::now();
        let mut calls = Vec::new();
        for (i, pair) in snapshots.windows(2).enumerate() {
            let now = start + Duration::from_secs(i as u64 + 1);
            calls.extend(watch.step(&pair[0], &pair[1], now).into_iter().map(|c| (c.handler, c.peer.map(|p| p.name), c.recovered)));
        }
        calls
    }

    fn with(change: impl Fn(&mut ResourceStatus)) -> ResourceStatus {
        let mut s = status();
        change(&mut s);
        s
    }

    #[test]
    fn a_steady_state_calls_nothing() {
        assert!(run(&vec![status(); 30]).is_empty());
    }

    #[test]
    fn quorum_lost_is_called_once_when_quorum_goes() {
        let lost = with(|s| s.quorum = false);
        let calls = run(&[status(), lost.clone(), lost.clone(), status(), lost]);
        assert_eq!(calls, [(Handler::QuorumLost, None, None), (Handler::QuorumLost, None, None)]);
        let mut watch = Watch::new(AFTER);
        let call = watch.step(&status(), &with(|s| s.quorum = false), Instant::now()).remove(0);
        assert!(matches!(&call.object, Object::Resource(r) if !r.quorum && r.name == "r0"), "{call:?}");
    }

    #[test]
    fn a_daemon_that_starts_without_quorum_has_lost_nothing() {
        let starting = with(|s| s.quorum = false);
        assert!(run(&[starting.clone(), starting]).is_empty());
    }

    #[test]
    fn a_split_brain_calls_for_that_peer_once() {
        let split = with(|s| {
            s.peers[0].connection = "StandAlone".into();
            s.peers[0].split_brain = true;
        });
        let calls = run(&[status(), split.clone(), split]);
        assert_eq!(calls, [(Handler::SplitBrain, Some("beta".into()), None)]);
        let call = Watch::new(AFTER).step(&status(), &with(|s| s.peers[0].split_brain = true), Instant::now()).remove(0);
        assert!(matches!(&call.object, Object::Connection(c) if c.conn_name == "beta"), "{call:?}");
    }

    fn resyncing(started: u64) -> ResourceStatus {
        with(|s| {
            s.disk = "Inconsistent".into();
            s.peers[0].replication = "SyncTarget".into();
            s.resyncs_as_target = started;
        })
    }

    fn resynced(started: u64) -> ResourceStatus {
        with(|s| s.resyncs_as_target = started)
    }

    #[test]
    fn a_resync_as_target_calls_before_then_after_when_up_to_date() {
        let calls = run(&[status(), resyncing(1), resyncing(1), resynced(1), resynced(1)]);
        let beta = Some("beta".to_owned());
        assert_eq!(calls, [(Handler::BeforeResyncTarget, beta.clone(), None), (Handler::AfterResyncTarget, beta, None)]);
    }

    #[test]
    fn a_resync_between_two_snapshots_still_calls_both_in_order_for_its_source() {
        let over = with(|s| {
            s.resyncs_as_target = 1;
            s.peers[1].received_bytes = 100;
            s.peers[0].received_bytes = 4 << 20;
        });
        let calls = run(&[status(), over]);
        let beta = Some("beta".to_owned());
        assert_eq!(calls, [(Handler::BeforeResyncTarget, beta.clone(), None), (Handler::AfterResyncTarget, beta, None)]);
    }

    #[test]
    fn a_resync_cut_off_calls_no_after_and_the_next_one_starts_over() {
        let cut = with(|s| {
            s.disk = "Inconsistent".into();
            s.resyncs_as_target = 1;
            s.peers[0].connection = "Connecting".into();
            s.peers[0].replication = "Off".into();
        });
        let calls = run(&[status(), resyncing(1), cut, resyncing(2), resynced(2)]);
        let names: Vec<Handler> = calls.into_iter().map(|c| c.0).collect();
        assert_eq!(names, [Handler::BeforeResyncTarget, Handler::BeforeResyncTarget, Handler::AfterResyncTarget]);
    }

    #[test]
    fn after_waits_until_this_node_is_up_to_date() {
        // Resynced from beta, while the disk waits for another peer's resync to end.
        let established_inconsistent = with(|s| {
            s.disk = "Inconsistent".into();
            s.resyncs_as_target = 1;
        });
        let calls = run(&[status(), resyncing(1), established_inconsistent.clone(), established_inconsistent, resynced(1)]);
        let names: Vec<Handler> = calls.into_iter().map(|c| c.0).collect();
        assert_eq!(names, [Handler::BeforeResyncTarget, Handler::AfterResyncTarget]);
    }

    #[test]
    fn an_unreachable_peer_is_called_after_the_delay_and_again_when_it_is_back() {
        let gone = with(|s| s.peers[1].connection = "Connecting".into());
        // Not connected from the second snapshot on (t = 1 s): due at t = 11 s.
        let mut snapshots = vec![status()];
        snapshots.extend(vec![gone.clone(); 10]);
        assert!(run(&snapshots).is_empty(), "not before {AFTER:?}");
        snapshots.extend(vec![gone; 5]);
        snapshots.extend(vec![status(); 3]);
        let tie = Some("tie".to_owned());
        assert_eq!(run(&snapshots), [(Handler::PeerUnreachable, tie.clone(), Some(false)), (Handler::PeerUnreachable, tie, Some(true))]);
    }

    #[test]
    fn a_peer_back_before_the_delay_calls_nothing_and_its_clock_starts_over() {
        let gone = with(|s| s.peers[0].connection = "StandAlone".into());
        let mut snapshots = vec![status()];
        for _ in 0..3 {
            snapshots.extend(vec![gone.clone(); 8]);
            snapshots.push(status());
        }
        assert!(run(&snapshots).is_empty());
    }
}
