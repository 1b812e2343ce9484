//! The simulator on the real replica (issue 10): every simulated node is a
//! `blkrepl::replica::Replica`, frames travel through the real codec, and the world (network,
//! disks with a volatile cache, clock, faults) is all this file adds. A seed replays exactly:
//! `BLKREPL_SIM_SEED=N cargo test --release --test replica_sim -- --nocapture` runs seed N with
//! its trace. `BLKREPL_SIM_SEEDS=n` sweeps n seeds from `BLKREPL_SIM_FIRST` (default 0);
//! `BLKREPL_SIM_KEEP_GOING=1` reports every failing seed of the sweep instead of stopping at the
//! first. Seeds run on one thread per core. Each seed draws its cluster's shape (data nodes +
//! witnesses, see `scenario::SHAPES`); `BLKREPL_SIM_SHAPE=3+1` runs every seed in one shape.

#[path = "replica_sim/rng.rs"]
mod rng;
#[path = "replica_sim/scenario.rs"]
mod scenario;
#[path = "replica_sim/sweep.rs"]
mod sweep;
#[path = "replica_sim/world.rs"]
mod world;

use rng::Rng;
use scenario::{Scenario, Stats, SHAPES};
use std::time::Instant;
use world::Shape;

/// Seeds a test run sweeps (BLKREPL_SIM_SEEDS overrides).
const SEEDS: u64 = 200;

#[test]
fn real_replicas_under_partitions_and_power_losses_lose_no_acknowledged_write_and_converge() {
    if let Some(seed) = std::env::var("BLKREPL_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        let _ = tracing_subscriber::fmt().without_time().with_target(false).with_test_writer().try_init();
        let mut scenario = Scenario::new(seed, shape_of(seed), true);
        let outcome = scenario.run();
        // Two replays of a seed (other runs, other machines) print the same fingerprint.
        println!("seed {seed}: fingerprint {:08x} (every frame sent, with its time)", scenario.world.fingerprint());
        outcome.unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        return;
    }
    let env = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    let seeds = env("BLKREPL_SIM_SEEDS").unwrap_or(SEEDS);
    let first = env("BLKREPL_SIM_FIRST").unwrap_or(0);
    let keep_going = env("BLKREPL_SIM_KEEP_GOING").is_some_and(|v| v != 0);
    let started = Instant::now();
    let swept = sweep::sweep(first, seeds, shape_of, || {}, |_| !keep_going);
    for (seed, error) in &swept.failures {
        let shape = shape_of(*seed);
        println!("seed {seed} (shape {shape}) fails: {error}\nreplay: BLKREPL_SIM_SEED={seed} cargo test --release --test replica_sim -- --nocapture");
    }
    let (total, threads) = (swept.stats, swept.threads);
    let secs = started.elapsed().as_secs_f64();
    let ran = total.seeds_by_shape.iter().sum::<u64>();
    println!(
        "replica_sim: {ran} seeds in {secs:.1} s on {threads} threads ({:.0} seeds/s), {:.1} virtual hours, {} acknowledged writes, {} reads checked, {} promotions, {} power losses, {} killed processes ({} devices left behind served again, {} given up), {} clean stops, {} partitions, {} disconnects, {} split brains (diverged copies), each reconciled by election term (unacknowledged changes discarded), {} bitmap resyncs, {} full resyncs, {} first syncs of fresh disks, {} MiB of resync data sent; {} seeds with checksum resync, {} with pull-ahead, {} with a send queue of three pages ({} writes waited for room), {} with a slow resync rate ({} with resyncs still moving a window after the heal, given more), {} with bitmap blocks over 4 KiB, {} online verifies run to their end ({} bytes found differing), {} with a failing disk ({} failing after the heal; {} local writes, {} reads, {} flushes and {} metadata writes failed); {} seeds fencing resource-only and {} resource-and-stonith, {} fence-peer runs ({} answered that the peer is primary), {} resume-io; {} seeds with on-no-quorum io-error; {} seeds writing zeroes and discards too ({} of them acknowledged); {}",
        ran as f64 / secs,
        total.virtual_us as f64 / 3.6e9,
        total.acked_writes,
        total.reads_checked,
        total.promotions,
        total.power_losses,
        total.kills,
        total.resumed_devices,
        total.given_up_devices,
        total.clean_stops,
        total.partitions,
        total.disconnects,
        total.divergences,
        total.bitmap_resyncs,
        total.full_resyncs,
        total.first_syncs,
        total.resync_bytes >> 20,
        total.csums_seeds,
        total.pull_ahead_seeds,
        total.small_queue_seeds,
        total.writes_waited_for_room,
        total.slow_resync_seeds,
        total.long_resync_seeds,
        total.large_block_seeds,
        total.verifies,
        total.verify_found_bytes,
        total.disk_fault_seeds,
        total.late_fault_seeds,
        total.failed_writes,
        total.failed_reads,
        total.failed_flushes,
        total.failed_meta_writes,
        total.fencing_seeds[0],
        total.fencing_seeds[1],
        total.fence_runs,
        total.fence_self_outdated,
        total.resume_ios,
        total.io_error_seeds,
        total.zeroes_seeds,
        total.acked_zeroes,
        by_shape(&total, &swept.failures)
    );
    let failing: Vec<u64> = swept.failures.iter().map(|(seed, _)| *seed).collect();
    assert!(failing.is_empty(), "seeds failing: {failing:?} (of {seeds} from {first}{})", if keep_going { "" } else { ", stopped at the first" });
}

/// Where the shape's draw starts in SplitMix64's sequence: away from the world's stream, which
/// the draw leaves alone, so a seed that draws 3+0 (or any seed with `BLKREPL_SIM_SHAPE=3+0`)
/// runs the world it ran before shapes existed.
const SHAPE_STREAM: u64 = 0x5348_4150_4553_0001;

/// Seed `seed`'s shape: `BLKREPL_SIM_SHAPE` ("3+1": data nodes + witnesses, one of [`SHAPES`])
/// forces one; otherwise drawn uniformly from the seed.
fn shape_of(seed: u64) -> Shape {
    if let Ok(forced) = std::env::var("BLKREPL_SIM_SHAPE") {
        return *SHAPES.iter().find(|s| s.to_string() == forced).unwrap_or_else(|| panic!("BLKREPL_SIM_SHAPE={forced} is none of the shapes {SHAPES:?}"));
    }
    SHAPES[Rng::new(seed ^ SHAPE_STREAM).below(SHAPES.len())]
}

/// The sweep's seeds per shape, with how many failed, and the witnesses they simulated:
/// "seeds per shape (data nodes+witnesses): 2+0 25 (1 failed), ..., 150 witnesses".
fn by_shape(total: &Stats, failures: &[(u64, String)]) -> String {
    let shapes: Vec<String> = SHAPES
        .iter()
        .zip(total.seeds_by_shape)
        .map(|(shape, seeds)| match failures.iter().filter(|(seed, _)| shape_of(*seed) == *shape).count() {
            0 => format!("{shape} {seeds}"),
            failed => format!("{shape} {seeds} ({failed} failed)"),
        })
        .collect();
    let witnesses: u64 = SHAPES.iter().zip(total.seeds_by_shape).map(|(shape, seeds)| u64::from(shape.witnesses) * seeds).sum();
    format!("seeds per shape (data nodes+witnesses): {}, {witnesses} witnesses", shapes.join(", "))
}
