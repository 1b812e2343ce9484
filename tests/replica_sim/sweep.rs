//! Seeds are independent worlds: a sweep runs them on one thread per core, each thread taking
//! the next seed until the range is done or a failure ends the sweep.

use super::scenario::{Scenario, Stats};
use super::world::Shape;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What a sweep found: the runs' summed statistics and each failing seed with its error.
pub struct Swept {
    pub stats: Stats,
    pub failures: Vec<(u64, String)>,
    pub threads: usize,
}

/// Runs seeds `first..first + seeds`, each in the shape `shape_of` gives it. `on_thread`
/// prepares each sweeping thread (the weakened-rule demonstrations switch a rule off there); a
/// failure for which `ends` holds stops the sweep (the seeds already running finish).
pub fn sweep(
    first: u64,
    seeds: u64,
    shape_of: impl Fn(u64) -> Shape + Sync,
    on_thread: impl Fn() + Sync,
    ends: impl Fn(&str) -> bool + Sync,
) -> Swept {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = AtomicU64::new(first);
    let stop = AtomicBool::new(false);
    let worker = || {
        on_thread();
        let mut stats = Stats::default();
        let mut failures = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let seed = next.fetch_add(1, Ordering::Relaxed);
            if seed >= first + seeds {
                break;
            }
            let mut scenario = Scenario::new(seed, shape_of(seed), false);
            if let Err(error) = scenario.run() {
                if ends(&error) {
                    stop.store(true, Ordering::Relaxed);
                }
                failures.push((seed, error));
            }
            stats.add(&scenario.stats);
        }
        (stats, failures)
    };
    let mut swept = Swept { stats: Stats::default(), failures: Vec::new(), threads };
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads).map(|_| scope.spawn(worker)).collect();
        for handle in workers {
            let (stats, failures) = handle.join().expect("a sweep thread panicked");
            swept.stats.add(&stats);
            swept.failures.extend(failures);
        }
    });
    swept.failures.sort_unstable_by_key(|(seed, _)| *seed);
    swept
}
