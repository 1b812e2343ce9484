//! The simulator's checkers catch what the replica's rules prevent: for each checker, one rule
//! is weakened (`blkrepl::replica::weakened`, a switch that exists only with the
//! `weakened-rules` feature) and seeds are swept until one breaks that checker. A demonstration
//! that finds no such seed fails: the checker, or the sweep, would not notice the loss.
//! `cargo test --release --features weakened-rules --test replica_sim_weakened` runs them.

#[path = "replica_sim/rng.rs"]
mod rng;
#[path = "replica_sim/scenario.rs"]
mod scenario;
#[path = "replica_sim/sweep.rs"]
mod sweep;
// `World::fingerprint` is for replays (`replica_sim`, `replica_sim_replay`), not read here.
#[allow(dead_code)]
#[path = "replica_sim/world.rs"]
mod world;

use blkrepl::replica::weakened::{weaken, Rule};
use world::Shape;

/// Seeds a demonstration sweeps at most before it gives up.
const SEEDS: u64 = 2000;

/// The shape the demonstrations run in: the one each was first shown in, three data nodes and
/// no witness (swept over every shape, 2000 seeds found none breaking checker 5 with a
/// secondary that never flushes).
const SHAPE: Shape = Shape { data: 3, witnesses: 0 };

/// Sweeps with `rule` weakened until a seed fails `checker`, and prints that seed.
fn demonstrate(rule: Rule, checker: u8) {
    demonstrate_within(rule, checker, SEEDS, SHAPE);
}

/// [`demonstrate`], sweeping at most `seeds` seeds of `shape`.
fn demonstrate_within(rule: Rule, checker: u8, seeds: u64, shape: Shape) {
    demonstrate_from(rule, checker, 0, seeds, shape);
}

/// [`demonstrate_within`] from seed `first` on: for a checker whose weakened rule breaks one
/// seed in tens of thousands, the sweep starts shortly before the first seed a sweep from 0
/// found (which each test names), so CI does not spend twenty minutes reaching it. When the
/// draws move (a change of the rules or the world), no seed of the window fails any more: the
/// search from 0 starts again (`demonstrate_within` with a larger bound), and the window
/// moves to what it finds.
fn demonstrate_from(rule: Rule, checker: u8, first: u64, seeds: u64, shape: Shape) {
    let expected = format!("checker {checker} ");
    let swept = sweep::sweep(first, seeds, |_| shape, || weaken(Some(rule)), |error| error.starts_with(&expected));
    let found = swept.failures.iter().find(|(_, error)| error.starts_with(&expected));
    let others: Vec<&(u64, String)> = swept.failures.iter().filter(|(_, error)| !error.starts_with(&expected)).collect();
    match found {
        Some((seed, error)) => {
            println!("{rule:?}: seed {seed} fails {error} ({} other failures on the way, {} threads)", others.len(), swept.threads)
        }
        None => panic!("with {rule:?} weakened no seed of {first}..{} failed checker {checker}; other failures: {others:?}", first + seeds),
    }
}

#[test]
fn checker_1_catches_a_primary_serving_without_quorum() {
    demonstrate(Rule::IoWithoutQuorum, 1);
}

/// Under protocol B only (a third of the seeds), and rare: the primary's process killed while
/// an acknowledged write still waits on the secondary that is promoted next, then a read of
/// that block before it is written again. Two data nodes and a witness: seed 27,661 since the
/// client writes zeroes in a third of the seeds (a sweep from 0 found none before it; 8,641
/// since the walks read off the engine's lock as the daemon's do, 11,722 before; three data
/// nodes: 11,131).
#[test]
fn checker_9_catches_a_received_write_acknowledged_before_it_goes_to_the_disk() {
    demonstrate_from(Rule::RecvAckOnArrival, 9, 27_000, 2_000, Shape { data: 2, witnesses: 1 });
}

#[test]
fn checker_2_catches_a_superseded_primary_that_stays() {
    demonstrate(Rule::NoStepDown, 2);
}

#[test]
fn checker_3_catches_decisions_that_wait_forever() {
    // Three data nodes and a witness, the shape of seed 404 that found the rule. Since a
    // primary's State says which peers it lags (followers keep their bits for those), and a
    // secondary marks nothing for the peer that sent every recent write, it is rare: the first
    // seed that shows it is 71103 since the client writes zeroes in a third of the seeds (a
    // sweep from 0 took 18 minutes to reach it, so this one starts near it), 12346 since the
    // walks read off the engine's lock as the daemon's do (6387 since the writes that arrive while an activity-log transaction is written share the
    // next one, 573 since a resync target clears its bits as the resync
    // data becomes durable, 1402 since a peer whose stream was applied lately is lost as a
    // primary, 2804 since secondaries weigh leftover bits on a live link once no one sees a
    // primary, 3883 since two Outdated copies with bits resync, 4946 since a bitmap sent on
    // an out-of-date State is declined, 8565 since a resync source ends on the
    // disk its ResyncDone announced, 8193 since a resync target is no better than its source,
    // 8565 since a killed primary holds its whole stream, 15932 with operators' `disconnect`s,
    // 11401 before).
    demonstrate_from(Rule::ForgetsBitsSilently, 3, 71_000, 2_000, Shape { data: 3, witnesses: 1 });
}

#[test]
fn checker_4_catches_a_resync_recorded_for_no_third_node() {
    // Rare: a resync block must change what its target held while a third data node holds the old
    // copy and is then the one compared. The first seed that shows it is 1412 since the walks
    // read off the engine's lock as the daemon's do (4334 since the writes that arrive while an
    // activity-log transaction is written share the next one, 8034 since a
    // resync's epoch also closes after a second and a resync taken up again brings only its
    // source's bits, 927 since a resync target clears its bits as the resync data becomes durable, 133 since a
    // peer whose stream was applied lately is lost as a primary, 3660 since a bitmap UUID on the
    // nearer copy no longer makes it the source of a further one, and secondaries weigh leftover
    // bits on a live link again when a primary stops lagging a peer, 12598 since they weigh them
    // once no one sees a primary, 3698 since two Outdated copies with bits resync, 13001 since a
    // bitmap sent on an out-of-date State is declined, 19166 since a resync target is no better
    // than its source, 16980 before, 15977 when the simulator began keeping the devices of killed
    // primaries, 16980 with operators' `disconnect`s, 7814 with clean stops alone, 50239 before
    // them, 5631 before runs of zeroes went as their length: each moved every seed's draws); the
    // bound leaves room for the next such move.
    demonstrate_within(Rule::ResyncRecordsForNobody, 4, 60000, SHAPE);
}

#[test]
fn checker_5_catches_a_secondary_that_never_flushes() {
    // Rarer than the others: since the seeds draw large bitmap blocks and failing flushes, the
    // first seed that shows it is 231 since the writes that arrive while an activity-log
    // transaction is written share the next one (3317 since a resync target clears its bits as
    // the resync data becomes durable, 2059 since secondaries weigh leftover bits on a live link again
    // when a primary stops lagging a peer, 452 since a bitmap sent on an out-of-date
    // State is declined, 1405 since a killed primary holds its whole stream, 1380 with
    // operators' `disconnect`s, 983 with clean stops alone, 3408 before): a secondary's lost
    // cache must hold a write a flush made durable, and then be the copy that survives.
    demonstrate_within(Rule::SecondaryWithoutFlush, 5, 5000, SHAPE);
}

#[test]
fn checker_7_catches_writes_left_waiting_for_room() {
    demonstrate(Rule::RoomNeverMade, 7);
}

#[test]
fn checker_6_catches_a_verify_that_reads_beside_writes_in_flight() {
    demonstrate(Rule::VerifyBesideWrites, 6);
}

#[test]
fn checker_8_catches_a_device_left_behind_serving_over_changed_data() {
    demonstrate(Rule::LeftBehindOnAnyData, 8);
}

#[test]
fn checker_4_catches_writes_made_before_their_activity_log_transaction() {
    demonstrate(Rule::WritesBeforeTheirLog, 4);
}

#[test]
fn checker_10_catches_a_fresh_node_deciding_against_a_declared_peer() {
    demonstrate(Rule::DeclarationNotPassedOn, 10);
}
