//! The replica's clock: one thread calls `Replica::tick` whenever the replica said its next
//! deadline is due (pings, and the checks that run on them), and carries out what it decides.

use super::Shared;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest the timer sleeps without looking: a bound on a missed wake-up, not a schedule.
const MAX_SLEEP: Duration = Duration::from_secs(1);

pub fn spawn(shared: Arc<Shared>) {
    std::thread::Builder::new()
        .name("timer".into())
        .spawn(move || run(&shared))
        .expect("spawn timer thread");
}

fn run(shared: &Shared) {
    let mut st = shared.lock();
    loop {
        if st.replica.stopping {
            return;
        }
        let now = Instant::now();
        let next = st.replica.tick(now);
        let sleep = next.map_or(MAX_SLEEP, |at| at.saturating_duration_since(now).min(MAX_SLEEP));
        st = st.wait_timer(sleep);
    }
}
