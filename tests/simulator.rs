//! The deterministic simulator (issue #4, "Proof"): seeded runs of 2 to 5 node clusters
//! through partitions, crashes with torn metadata writes, clean downs, failing disks,
//! promotions and heal, with the invariants of `sim::checkers` checked after every step.
//! What is modelled and what is not: tests/sim/mod.rs and docs/DESIGN.md ("Simulator").
//!
//! - `BLKREPL_SIM_SEEDS=<n>`: run seeds 0..n (default 2000).
//! - `BLKREPL_SIM_SEED=<s>`: replay seed `s` alone and print its trace.

mod sim;

use sim::checkers::Violation;
use sim::scenario::{Config, Outcome, Sim};
use std::io::Write;
use std::time::Instant;

const DEFAULT_SEEDS: u64 = 2000;

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(value.parse().unwrap_or_else(|_| panic!("{name}={value:?} is not a number")))
}

/// Bypasses the test harness's output capture, so the line shows in a normal `cargo test`.
fn say(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// Replays `seed` with its trace on (the run is deterministic, so it fails the same way) and
/// formats the report.
fn report(seed: u64, config: Option<Config>, violation: &Violation) -> String {
    let replay = Sim::new(seed, config, 150).run();
    let mut out = format!("seed {seed} failed: {violation}\nconfig: {:?}\ntrace tail:\n", replay.config);
    for line in &replay.trace {
        out += line;
        out.push('\n');
    }
    out += &format!("replay: BLKREPL_SIM_SEED={seed} cargo test --release --test simulator\n");
    out
}

#[test]
fn random_seeds_keep_every_invariant() {
    if let Some(seed) = env_u64("BLKREPL_SIM_SEED") {
        let outcome = Sim::new(seed, None, usize::MAX).run();
        for line in &outcome.trace {
            say(line);
        }
        if let Some(v) = &outcome.violation {
            panic!("seed {seed} failed: {v}\nconfig: {:?}", outcome.config);
        }
        say(&format!("seed {seed}: ok, {} acknowledged writes, {:?}", outcome.acked_writes, outcome.config));
        return;
    }
    let seeds = env_u64("BLKREPL_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let started = Instant::now();
    let (mut acked, mut virtual_us) = (0, 0);
    for seed in 0..seeds {
        let Outcome { violation, acked_writes, end, .. } = Sim::new(seed, None, 0).run();
        if let Some(v) = violation {
            panic!("{}", report(seed, None, &v));
        }
        acked += acked_writes;
        virtual_us += end;
    }
    let secs = started.elapsed().as_secs_f64();
    say(&format!(
        "simulator: {seeds} seeds in {secs:.1} s ({:.0} seeds/s), {:.0} virtual hours, {acked} acknowledged writes",
        seeds as f64 / secs,
        virtual_us as f64 / 3.6e9
    ));
}
