//! Requests from the frontends: handed to the replica, which answers each through an
//! `Action::Complete` (see `engine::locked`), with the peers' send queues as they are now (a
//! write may wait for room in one, in the replica: see `replica/send_queue.rs`). Nothing here
//! blocks the submitting thread beyond the engine lock.

use super::counters::Timed;
use super::state::{queued_bytes, Pending, State};
use super::shared::Shared;
use crate::frontend::{BlockRequest, Completion};
use std::sync::Arc;
use std::time::Instant;

/// A request's latency runs from here (before any wait for the lock or for room in a send
/// queue) to its answer (see `locked::run_after`). `small_writes_here`: the caller is an event
/// loop that makes a small write itself (see `Locked::run_small_writes_here`).
pub fn submit(shared: &Arc<Shared>, request: BlockRequest, done: Completion, small_writes_here: bool) {
    let arrived = Instant::now();
    let timed = Timed::of(&request);
    shared.counters.arrived(timed);
    let mut st = shared.lock();
    if small_writes_here {
        st.run_small_writes_here();
    }
    let id = st.next_request;
    st.next_request += 1;
    st.requests.insert(id, Pending { done, arrived, timed });
    let State { replica, links, .. } = &mut *st;
    replica.submit(Instant::now(), id, request, |peer| queued_bytes(links, peer));
    want_room_if_waiting(&st);
}

/// A link's send queue drained below its limit (see `PeerLink::run_writer`): the writes that
/// wait for room may go on.
pub fn room_made(shared: &Shared) {
    let mut st = shared.lock();
    let State { replica, links, .. } = &mut *st;
    replica.send_queues(Instant::now(), |peer| queued_bytes(links, peer));
    want_room_if_waiting(&st);
}

/// Writes wait for room: every link is to say when it has some.
fn want_room_if_waiting(st: &State) {
    if st.replica.awaiting_room() > 0 {
        st.links.iter().filter_map(|(_, link)| link.as_ref()).for_each(|link| link.want_room());
    }
}
