//! Following a running engine's status: a snapshot every [`SAMPLE_INTERVAL`], each handed over
//! with the one before it. The `events` stream and the handlers both follow the status this way
//! (see `control::event_stream` for why sampling rather than a notification from the engine).

use crate::engine::{Engine, ResourceStatus};
use std::time::Duration;

/// How often a follower samples the status: how late a line or a handler may come.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// From `first` on: after each `pause()` (one interval; false stops), takes a snapshot and
/// calls `step(before, after)` (false stops). The engine's lock is held only while a snapshot
/// is built, never during `pause` or `step`.
pub fn follow(
    engine: &Engine,
    first: ResourceStatus,
    mut pause: impl FnMut() -> bool,
    mut step: impl FnMut(&ResourceStatus, &ResourceStatus) -> bool,
) {
    let mut before = first;
    while pause() {
        let after = engine.status();
        let go_on = step(&before, &after);
        before = after;
        if !go_on {
            return;
        }
    }
}
