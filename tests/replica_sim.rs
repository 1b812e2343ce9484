//! The simulator on the real replica (issue 10): every simulated node is a
//! `blkrepl::replica::Replica`, frames travel through the real codec, and the world (network,
//! disks with a volatile cache, clock, faults) is all this file adds. A seed replays exactly:
//! `BLKREPL_SIM_SEED=N cargo test --release --test replica_sim -- --nocapture` runs seed N with
//! its trace.

#[path = "sim/rng.rs"]
mod rng;
#[path = "replica_sim/scenario.rs"]
mod scenario;
#[path = "replica_sim/world.rs"]
mod world;

use scenario::{Scenario, Stats};
use std::time::Instant;

/// Seeds a test run sweeps (BLKREPL_SIM_SEEDS overrides).
const SEEDS: u64 = 200;

fn run_seed(seed: u64, tracing: bool) -> (Result<(), String>, Scenario) {
    let mut scenario = Scenario::new(seed, tracing);
    let result = scenario.run();
    (result, scenario)
}

#[test]
fn real_replicas_under_partitions_and_power_losses_lose_no_acknowledged_write_and_converge() {
    if let Some(seed) = std::env::var("BLKREPL_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        let _ = tracing_subscriber::fmt().without_time().with_target(false).with_test_writer().try_init();
        let (result, _) = run_seed(seed, true);
        result.unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        return;
    }
    let seeds = std::env::var("BLKREPL_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(SEEDS);
    let started = Instant::now();
    let mut total = Stats::default();
    for seed in 0..seeds {
        let (result, scenario) = run_seed(seed, false);
        if let Err(e) = result {
            panic!("seed {seed} fails: {e}\nreplay: BLKREPL_SIM_SEED={seed} cargo test --release --test replica_sim -- --nocapture");
        }
        total.add(&scenario.stats);
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "replica_sim: {seeds} seeds in {secs:.1} s ({:.0} seeds/s), {:.1} virtual hours, {} acknowledged writes, {} reads checked, {} promotions, {} power losses, {} partitions",
        seeds as f64 / secs,
        total.virtual_us as f64 / 3.6e9,
        total.acked_writes,
        total.reads_checked,
        total.promotions,
        total.power_losses,
        total.partitions
    );
}
