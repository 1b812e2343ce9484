//! The replica's clock: one thread calls `Replica::tick` whenever the replica's next deadline
//! (`Replica::poll_timeout`) is due, and carries out what it decides. A new deadline (a link
//! that came up) wakes it through `Shared::timer`, which it waits on with the lock held, so no
//! wake-up is lost.

use super::state::{queued_bytes, State};
use super::shared::Shared;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest the timer sleeps without looking: a bound on a missed wake-up, not a schedule.
const MAX_SLEEP: Duration = Duration::from_secs(1);

pub fn spawn(shared: Arc<Shared>) -> std::io::Result<()> {
    std::thread::Builder::new().name("timer".into()).spawn(move || run(&shared))?;
    Ok(())
}

fn run(shared: &Shared) {
    loop {
        let mut st = shared.lock();
        if st.replica.stopping {
            return;
        }
        let State { replica, links, .. } = &mut *st;
        replica.tick(Instant::now(), |peer| queued_bytes(links, peer));
        // Released: frames queued, stalled links dropped.
        drop(st);
        let st = shared.lock();
        let now = Instant::now();
        let sleep = st.replica.poll_timeout().map_or(MAX_SLEEP, |at| at.saturating_duration_since(now).min(MAX_SLEEP));
        drop(st.wait_timer(sleep));
    }
}
