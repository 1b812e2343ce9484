//! Requests from the frontends: handed to the replica, which answers each through an
//! `Action::Complete` (see `engine::locked`). What stays here is flow control: a writer waits
//! while a peer's send queue is full (after the replica had its say on congestion).

use super::counters::Timed;
use super::link::BULK_QUEUE_LIMIT_BYTES;
use super::locked::Locked;
use super::state::{Pending, State};
use super::Shared;
use crate::frontend::{BlockRequest, Completion};
use std::sync::Arc;
use std::time::Instant;

/// A request's latency runs from here (before any wait for the lock or for room in a send
/// queue) to its answer (see `locked::run_after`).
pub fn submit(shared: &Arc<Shared>, request: BlockRequest, done: Completion) {
    let arrived = Instant::now();
    let timed = Timed::of(&request);
    shared.counters.arrived(timed);
    let mut st = shared.lock();
    if !matches!(request, BlockRequest::Read { .. } | BlockRequest::Flush) {
        st = wait_for_room(shared, st);
    }
    let id = st.next_request;
    st.next_request += 1;
    st.requests.insert(id, Pending { done, arrived, timed });
    let queued = queued_bytes(&st);
    st.replica.submit(Instant::now(), id, request, |peer| queued.iter().find(|(id, _)| *id == peer).map_or(0, |(_, q)| *q));
}

/// How much waits in each connected peer's send queue, where pull-ahead asks.
fn queued_bytes(st: &State) -> Vec<(u8, usize)> {
    if st.replica.congestion_fill.is_none() {
        return Vec::new();
    }
    st.replica.peers.iter().filter_map(|p| st.link(p.node_id).map(|l| (p.node_id, l.queued_bytes()))).collect()
}

/// Back-pressure: a full send queue slows writers down (under pull-ahead the replica leaves the
/// peer behind first). The wait happens outside the engine lock, so it never blocks the acks
/// that drain the queue.
fn wait_for_room<'a>(shared: &'a Shared, mut st: Locked<'a>) -> Locked<'a> {
    loop {
        let queued = queued_bytes(&st);
        st.replica.send_queues(Instant::now(), &queued);
        let replicating = st.replica.peers.iter().filter(|p| p.is_replicating());
        let full = replicating.filter_map(|p| st.link(p.node_id)).find(|l| l.is_full()).cloned();
        match full {
            None => return st,
            Some(link) => {
                drop(st);
                link.wait_for_room(BULK_QUEUE_LIMIT_BYTES);
                st = shared.lock();
            }
        }
    }
}
