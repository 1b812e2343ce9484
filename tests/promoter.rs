//! `blkrepl promoter` on real daemons: two data nodes and a witness under quorum "majority",
//! a promoter on each data node whose service is a marker file (tests/common/promoter.rs).
//! Exactly one node promotes and runs its service; a crash or a partition moves both to the
//! other, and so does a primary daemon that hangs; never are both markers there at once.

mod common;

use common::promoter::{MarkerSampler, SAMPLE};
use common::{netns, Cluster, Options};
use std::time::{Duration, Instant};

/// Longer than any wait the promoters choose here (promote_delay_ms 1000, two data nodes, the
/// best score: 0 or 1 s; a peer unknown: 2 or 3 s): a node that has not promoted by then will
/// not without a change.
const SETTLE: Duration = Duration::from_secs(5);

fn role(c: &Cluster, node: &str) -> String {
    c.status(node)["role"].as_str().unwrap().to_owned()
}

/// For [`SETTLE`], checks every [`SAMPLE`] that `primary` is Primary with its marker and `other`
/// Secondary without one.
fn assert_stays(c: &Cluster, primary: &str, other: &str) {
    let until = Instant::now() + SETTLE;
    while Instant::now() < until {
        let state = (role(c, primary), c.marker(primary).exists(), role(c, other), c.marker(other).exists());
        let expected = ("Primary".to_owned(), true, "Secondary".to_owned(), false);
        assert_eq!(state, expected, "{primary} should be the only primary, with the only marker\n{}", c.promoter_logs());
        std::thread::sleep(SAMPLE);
    }
}

#[test]
fn promoters_elect_one_primary_take_over_from_a_crashed_one_and_never_take_it_back() {
    let c = Cluster::fresh_witness_trio();
    c.add_promoter_section();
    let sampler = MarkerSampler::start(vec![c.marker("alpha"), c.marker("beta")]);
    let (mut alpha, mut beta) = (c.promoter("alpha"), c.promoter("beta"));
    c.wait_until("a node's service started", || c.marker("alpha").exists() || c.marker("beta").exists());
    // Equal scores: the first data node by id goes first, the other sees it and stands down.
    let (first, second) = if c.marker("alpha").exists() { ("alpha", "beta") } else { ("beta", "alpha") };
    assert_eq!(first, "alpha", "equal scores: alpha (the lower id) goes first\n{}", c.promoter_logs());
    assert_stays(&c, first, second);

    // kill -9 of the primary's daemon: its promoter stops the service, the other promotes.
    c.kill(first);
    c.wait_until("the crashed primary's service stopped", || !c.marker(first).exists());
    c.wait_until("the survivor promoted with its service", || c.marker(second).exists());
    assert_eq!(role(&c, second), "Primary");

    // The old primary's daemon returns: it resyncs and stays Secondary.
    c.ok(first, &["up", "r0"]);
    c.wait_peer(second, first, "Established", "UpToDate");
    assert_stays(&c, second, first);
    assert!(alpha.running() && beta.running(), "a promoter gave up\n{}", c.promoter_logs());

    // SIGTERM: the primary's promoter stops the service and demotes before it exits.
    let (primary, secondary) = if second == "alpha" { (&mut alpha, &mut beta) } else { (&mut beta, &mut alpha) };
    assert!(secondary.stop().success());
    assert!(primary.stop().success(), "{}", c.promoter_logs());
    assert!(!c.marker(second).exists(), "the service outlived its promoter");
    assert_eq!(role(&c, second), "Secondary");
    let samples = sampler.finish();
    assert!(samples.overlaps.is_empty(), "both services ran at {:?}", samples.overlaps);
}

#[test]
fn a_partitioned_primary_stops_its_service_and_demotes_before_the_majority_takes_over() {
    if !netns::usable() {
        return;
    }
    let c = Cluster::witness_trio(Options { netns: true, ..Options::default() });
    c.add_promoter_section();
    let sampler = MarkerSampler::start(vec![c.marker("alpha"), c.marker("beta")]);
    let (mut alpha, mut beta) = (c.promoter("alpha"), c.promoter("beta"));
    // alpha was promoted by hand before the promoters started: its promoter starts its service.
    c.wait_until("alpha's service started", || c.marker("alpha").exists());
    assert_stays(&c, "alpha", "beta");

    c.isolate("alpha");
    let cut = Instant::now();
    c.wait_until("the isolated primary's service stopped", || !c.marker("alpha").exists());
    let stopped_after = cut.elapsed();
    c.wait_until("the isolated primary demoted", || role(&c, "alpha") == "Secondary");
    c.wait_until("the majority promoted with its service", || c.marker("beta").exists());
    assert_eq!(role(&c, "beta"), "Primary");
    assert!(c.marker("beta").exists() && !c.marker("alpha").exists());
    // The isolated node lost quorum within its lease (1 s) and its service went at once.
    assert!(stopped_after < Duration::from_secs(10), "the service ran {stopped_after:?} after the cut");

    c.heal("alpha");
    c.wait_peer("beta", "alpha", "Established", "UpToDate");
    c.wait_for("alpha", "resynced", |s| s["disk"] == "UpToDate");
    assert_stays(&c, "beta", "alpha");
    for node in ["alpha", "beta"] {
        let status = c.status(node);
        let split = status["peers"].as_array().unwrap().iter().any(|p| p["last_error"].as_str().is_some_and(|e| e.contains("split brain")));
        assert!(!split, "split brain on {node}: {status}");
    }
    assert!(alpha.running() && beta.running(), "a promoter gave up\n{}", c.promoter_logs());
    assert!(alpha.stop().success() && beta.stop().success());
    let samples = sampler.finish();
    // Two settling windows alone are 200 samples: the sampler watched the whole scenario.
    assert!(samples.taken > 200, "the sampler ran {} times only", samples.taken);
    assert!(samples.overlaps.is_empty(), "both services ran at {:?}", samples.overlaps);
}

#[test]
fn a_hung_primary_daemon_loses_its_service_before_the_majority_takes_over() {
    let c = Cluster::fresh_witness_trio();
    c.add_promoter_section();
    let sampler = MarkerSampler::start(vec![c.marker("alpha"), c.marker("beta")]);
    let (mut alpha, mut beta) = (c.promoter("alpha"), c.promoter("beta"));
    c.wait_until("alpha's service started", || c.marker("alpha").exists());
    assert_stays(&c, "alpha", "beta");

    // The daemon hangs (SIGSTOP): its events stop as a quiet daemon's do, but it answers no
    // probe. Its promoter stops the service, with no demotion (nothing would answer it),
    // before the majority, which drops it after the ping timeout, starts the service there.
    c.signal("alpha", "STOP");
    c.wait_until("the hung primary's service stopped", || !c.marker("alpha").exists());
    c.wait_until("the majority promoted with its service", || c.marker("beta").exists());
    assert_eq!(role(&c, "beta"), "Primary");
    assert!(!c.marker("alpha").exists(), "the hung daemon's service came back");

    // It resumes, superseded: its promoter, which waited for it to settle, starts nothing, and
    // it ends Secondary, resynced from the new primary.
    c.signal("alpha", "CONT");
    c.wait_for("alpha", "stepped down", |s| s["role"] == "Secondary");
    c.wait_peer("beta", "alpha", "Established", "UpToDate");
    assert_stays(&c, "beta", "alpha");
    assert!(alpha.running() && beta.running(), "a promoter gave up\n{}", c.promoter_logs());
    assert!(alpha.stop().success() && beta.stop().success());
    let samples = sampler.finish();
    assert!(samples.overlaps.is_empty(), "both services ran at {:?}\n{}", samples.overlaps, c.promoter_logs());
}

#[test]
fn a_promoter_with_nothing_to_look_after_or_a_bad_key_is_a_configuration_error() {
    let c = Cluster::new(&["alpha", "beta", "tie"], Options { quorum: "majority", witnesses: &["tie"], ..Options::default() });
    let refused = |node: &str, args: &[&str], says: &str| {
        let out = c.cli(node, args);
        let stderr = common::text(&out.stderr);
        assert_eq!(out.status.code(), Some(10), "{args:?} on {node}: {stderr}");
        assert!(stderr.contains(says), "{args:?} on {node}: {stderr}");
    };
    refused("alpha", &["promoter", "r0"], "has no [promoter] section");
    refused("alpha", &["promoter"], "no resource in");
    c.add_promoter_section();
    refused("tie", &["promoter", "r0"], "diskless witness");
    refused("tie", &["promoter"], "no resource in");
    c.edit_config("stop_timeout_s = 10", "stop_timeout_s = 0");
    refused("alpha", &["promoter", "r0"], "`promoter.stop_timeout_s`");
}
