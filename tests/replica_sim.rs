//! The simulator on the real replica (issue 10): every simulated node is a
//! `blkrepl::replica::Replica`, frames travel through the real codec, and the world (network,
//! disks with a volatile cache, clock, faults) is all this file adds. A seed replays exactly:
//! `BLKREPL_SIM_SEED=N cargo test --release --test replica_sim -- --nocapture` runs seed N with
//! its trace. `BLKREPL_SIM_SEEDS=n` sweeps n seeds from `BLKREPL_SIM_FIRST` (default 0);
//! `BLKREPL_SIM_KEEP_GOING=1` reports every failing seed of the sweep instead of stopping at the
//! first. Seeds run on one thread per core.

#[path = "sim/rng.rs"]
mod rng;
#[path = "replica_sim/scenario.rs"]
mod scenario;
#[path = "replica_sim/world.rs"]
mod world;

use scenario::{Scenario, Stats};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    let env = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    let seeds = env("BLKREPL_SIM_SEEDS").unwrap_or(SEEDS);
    let first = env("BLKREPL_SIM_FIRST").unwrap_or(0);
    let keep_going = env("BLKREPL_SIM_KEEP_GOING").is_some_and(|v| v != 0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = Instant::now();
    // Seeds are independent worlds: one thread per core takes the next seed until the sweep is
    // done (or, unless keep-going, a seed failed).
    let next = AtomicU64::new(first);
    let stop = AtomicBool::new(false);
    let sweep = || {
        let mut stats = Stats::default();
        let mut failures = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let seed = next.fetch_add(1, Ordering::Relaxed);
            if seed >= first + seeds {
                break;
            }
            let (result, scenario) = run_seed(seed, false);
            if let Err(e) = result {
                println!("seed {seed} fails: {e}\nreplay: BLKREPL_SIM_SEED={seed} cargo test --release --test replica_sim -- --nocapture");
                failures.push(seed);
                stop.store(!keep_going, Ordering::Relaxed);
            }
            stats.add(&scenario.stats);
        }
        (stats, failures)
    };
    let mut total = Stats::default();
    let mut failures = Vec::new();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads).map(|_| scope.spawn(sweep)).collect();
        for worker in workers {
            let (stats, failed) = worker.join().expect("a sweep thread panicked");
            total.add(&stats);
            failures.extend(failed);
        }
    });
    failures.sort_unstable();
    assert!(failures.is_empty(), "seeds failing: {failures:?} (of {seeds} from {first}{})", if keep_going { "" } else { ", stopped at the first" });
    let secs = started.elapsed().as_secs_f64();
    println!(
        "replica_sim: {seeds} seeds in {secs:.1} s on {threads} threads ({:.0} seeds/s), {:.1} virtual hours, {} acknowledged writes, {} reads checked, {} promotions, {} power losses, {} killed processes, {} partitions",
        seeds as f64 / secs,
        total.virtual_us as f64 / 3.6e9,
        total.acked_writes,
        total.reads_checked,
        total.promotions,
        total.power_losses,
        total.kills,
        total.partitions
    );
}
