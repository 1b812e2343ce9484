//! Quorum, witnesses and split brain with real daemons on 127.0.0.1: who may promote, what an
//! isolated primary does with writes, and how a split brain ends. I/O through NBD with qemu-io.

mod common;

use common::{check_patterns, qemu_io, split_brain_pair, write_patterns, Cluster, Options};
use std::process::Output;

const MIB: u64 = 1 << 20;

/// alpha and beta hold data, `tie` is a diskless witness; quorum majority; alpha Primary and
/// beta UpToDate.
fn trio(extra: &'static str) -> Cluster {
    Cluster::witness_trio(Options { extra, ..Options::default() })
}

fn stderr(out: &Output) -> String {
    common::text(&out.stderr)
}

#[test]
fn with_a_witness_the_survivor_takes_over_every_acknowledged_write() {
    let c = trio("");
    let alpha = c.status("alpha");
    assert_eq!((alpha["quorum"].as_bool(), alpha["quorum_votes"].as_u64(), alpha["quorum_voters"].as_u64()), (Some(true), Some(3), Some(3)));
    assert!(Cluster::peer(&alpha, "tie")["witness"].as_bool().unwrap());
    assert_eq!(Cluster::peer(&alpha, "tie")["out_of_sync_bytes"], 0, "a witness holds no data to be out of sync");
    let beta = c.status("beta");
    assert_eq!(beta["may_promote"], false, "alpha is primary");
    assert!(beta["promotion_score"].is_null());
    let data = vec![(0, MIB, 0x11), (9 * MIB, 64 << 10, 0x22)];
    write_patterns(&c.nbd_url("alpha"), &data);

    c.kill("alpha");
    let beta = c.wait_for("beta", "alpha gone", |s| Cluster::peer(s, "alpha")["connection"] == "Connecting");
    let tie = c.wait_for("tie", "alpha gone", |s| Cluster::peer(s, "alpha")["connection"] == "Connecting");
    assert_eq!(tie["may_promote"], false, "a witness never promotes");
    assert_eq!((beta["quorum"].as_bool(), beta["quorum_votes"].as_u64()), (Some(true), Some(2)));
    c.wait_for("beta", "may promote", |s| s["may_promote"] == true);
    c.ok("beta", &["primary", "r0"]);
    let (ok, out) = check_patterns(&c.nbd_url("beta"), &data);
    assert!(ok, "beta lost acknowledged writes: {out}");
    let witness_promote = c.cli("tie", &["primary", "r0"]);
    assert_eq!(witness_promote.status.code(), Some(11), "{}", stderr(&witness_promote));
    assert!(stderr(&witness_promote).contains("witness"));
    // alpha comes back from its crash as primary: its activity log's extents are out of sync
    // for beta, never for the witness, which holds no data.
    c.ok("alpha", &["up", "r0"]);
    let alpha = c.wait_for("alpha", "peers known", |s| Cluster::peer(s, "tie")["connection"] == "Connected");
    assert_eq!(Cluster::peer(&alpha, "tie")["out_of_sync_bytes"], 0, "crash recovery marked the witness's slot");
    c.wait_peer("beta", "alpha", "Established", "UpToDate");
}

#[test]
fn declaring_fresh_disks_in_sync_leaves_the_witness_diskless() {
    let c = Cluster::fresh_witness_trio();
    c.ok("alpha", &["primary", "r0"]);
    // The witness hears of the primary after anything alpha sent before: it is in order.
    let tie = c.wait_for("tie", "alpha primary", |s| Cluster::peer(s, "alpha")["peer_role"] == "Primary");
    assert_eq!(tie["disk"], "Diskless", "{tie}");
    let alpha = c.wait_for("alpha", "the witness's state", |s| Cluster::peer(s, "tie")["peer_role"] == "Secondary");
    assert_eq!(Cluster::peer(&alpha, "tie")["peer_disk"], "Diskless", "{alpha}");
}

#[test]
fn the_data_nodes_keep_quorum_when_the_witness_is_down() {
    let c = trio("");
    c.kill("tie");
    c.wait_for("alpha", "tie gone", |s| Cluster::peer(s, "tie")["connection"] == "Connecting");
    let data = vec![(3 * MIB, MIB, 0x33)];
    write_patterns(&c.nbd_url("alpha"), &data);
    let alpha = c.status("alpha");
    assert_eq!((alpha["quorum"].as_bool(), alpha["quorum_votes"].as_u64()), (Some(true), Some(2)));
    assert_eq!(Cluster::peer(&alpha, "beta")["out_of_sync_bytes"], 0);
}

#[test]
fn a_primary_without_quorum_fails_writes_under_io_error_until_quorum_returns() {
    let c = trio("on_no_quorum = \"io-error\"");
    c.kill("beta");
    c.kill("tie");
    c.wait_for("alpha", "quorum lost", |s| s["quorum"] == false);
    let (ok, out) = qemu_io(&c.nbd_url("alpha"), &["write -P 0x44 0 64k".into()]);
    assert!(!ok, "a write completed without quorum: {out}");
    c.ok("tie", &["up", "r0"]);
    c.wait_for("alpha", "quorum back", |s| s["quorum"] == true);
    write_patterns(&c.nbd_url("alpha"), &[(0, 64 << 10, 0x45)]);
}

#[test]
fn under_io_error_a_write_waiting_for_a_silent_witness_fails_once_its_lease_lapses() {
    let c = trio("on_no_quorum = \"io-error\"");
    // The witness hangs (its link goes silent, as in a partition) and beta dies: alpha's write
    // waits for the witness to confirm the generation started without beta while the witness's
    // lease holds, and must fail once it lapses, not wait for a frame that never comes.
    c.signal("tie", "STOP");
    c.kill("beta");
    let url = c.nbd_url("alpha");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(qemu_io(&url, &["write -P 0x46 0 64k".into()])));
    let answer = rx.recv_timeout(std::time::Duration::from_secs(30));
    c.signal("tie", "CONT");
    let (ok, out) = answer.expect("the write was neither completed nor failed within 30 s: held for good");
    assert!(!ok, "a write completed without quorum: {out}");
}

#[test]
fn suspended_writes_complete_when_quorum_returns() {
    let c = trio("");
    c.kill("beta");
    c.kill("tie");
    c.wait_for("alpha", "quorum lost", |s| s["quorum"] == false);
    let url = c.nbd_url("alpha");
    let writer = std::thread::spawn(move || qemu_io(&url, &["write -P 0x55 1M 128k".into()]));
    c.wait_for("alpha", "write held", |s| s["suspended_writes"].as_u64().unwrap() > 0);
    assert!(!writer.is_finished(), "the write completed without quorum");
    c.ok("tie", &["up", "r0"]);
    let (ok, out) = writer.join().unwrap();
    assert!(ok, "held write failed after quorum returned: {out}");
    assert_eq!(c.status("alpha")["suspended_writes"], 0);
    // beta missed the write: it is in beta's bitmap and flows when beta returns.
    c.ok("beta", &["up", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    c.ok("alpha", &["secondary", "r0"]);
    c.wait_for("beta", "UpToDate", |s| s["disk"] == "UpToDate");
    c.ok("beta", &["primary", "r0"]);
    let (ok, out) = check_patterns(&c.nbd_url("beta"), &[(MIB, 128 << 10, 0x55)]);
    assert!(ok, "{out}");
}

#[test]
fn a_lone_survivor_of_two_cannot_promote_until_the_operator_changes_quorum() {
    let c = Cluster::new(&["alpha", "beta"], Options { quorum: "majority", ..Options::default() });
    for node in ["alpha", "beta"] {
        c.ok(node, &["create-md", "r0"]);
        let up = c.cli(node, &["up", "r0"]);
        assert!(up.status.success());
        assert!(stderr(&up).contains("cannot become primary"), "no two-node warning: {}", stderr(&up));
    }
    // Connected is not yet quorum: beta's vote counts once its State arrived.
    c.wait_for("alpha", "quorum", |s| s["quorum"] == true);
    c.ok("alpha", &["primary", "--force", "r0"]);
    c.wait_for("beta", "UpToDate", |s| s["disk"] == "UpToDate");
    write_patterns(&c.nbd_url("alpha"), &[(0, MIB, 0x66)]);
    c.kill("alpha");
    c.wait_for("beta", "alpha gone", |s| Cluster::peer(s, "alpha")["connection"] == "Connecting");
    for args in [&["primary", "r0"][..], &["primary", "--force", "r0"][..]] {
        let out = c.cli("beta", args);
        assert_eq!(out.status.code(), Some(14), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("no quorum"), "{}", stderr(&out));
    }
    assert_eq!(c.status("beta")["promotion_score"], serde_json::Value::Null);
    // The operator knows alpha is gone for good and says so on purpose.
    c.edit_config("quorum = \"majority\"", "quorum = \"off\"");
    c.ok("beta", &["adjust", "r0"]);
    c.ok("beta", &["primary", "r0"]);
    let (ok, out) = check_patterns(&c.nbd_url("beta"), &[(0, MIB, 0x66)]);
    assert!(ok, "{out}");
}

#[test]
fn a_peer_that_leaves_cleanly_stops_counting_and_comes_back_outdated() {
    let c = Cluster::new(&["alpha", "beta"], Options { quorum: "majority", ..Options::default() });
    c.create_md_and_up();
    c.wait_for("alpha", "quorum", |s| s["quorum"] == true);
    c.ok("alpha", &["primary", "--force", "r0"]);
    c.wait_for("beta", "UpToDate", |s| s["disk"] == "UpToDate");
    c.ok("beta", &["down", "r0"]);
    let alpha = c.wait_for("alpha", "beta departed", |s| Cluster::peer(s, "beta")["departed"] == true);
    assert_eq!((alpha["quorum"].as_bool(), alpha["quorum_voters"].as_u64()), (Some(true), Some(1)));
    write_patterns(&c.nbd_url("alpha"), &[(2 * MIB, MIB, 0x77)]);
    c.ok("beta", &["up", "r0"]);
    let beta = c.status("beta");
    assert_ne!(beta["disk"], "UpToDate", "a node that left while others went on must not claim the newest data");
    c.wait_for("beta", "resynced", |s| s["disk"] == "UpToDate");
    let alpha = c.wait_peer("alpha", "beta", "Established", "UpToDate");
    assert_eq!(Cluster::peer(&alpha, "beta")["departed"], false);
}

/// After the resync the victim holds the survivor's data everywhere, and only the blocks both
/// sides changed moved (not the whole device): the `kept` bytes the survivor wrote as data, the
/// `discarded` bytes the victim wrote, which are zeroes on the survivor, as runs of zeroes
/// (12 bytes each, see `ResyncZeroes`).
fn assert_resynced(c: &Cluster, survivor: &str, victim: &str, received_before: u64, kept: u64, discarded: u64) {
    c.wait_peer(survivor, victim, "Established", "UpToDate");
    c.wait_for(victim, "UpToDate", |s| s["disk"] == "UpToDate");
    c.assert_data_equal(survivor, &[victim], "after the resync");
    let moved = c.received(victim, survivor) - received_before;
    assert!((kept..kept + discarded / 2).contains(&moved), "moved {moved} bytes for {kept} kept and {discarded} discarded");
    // A full resync would move little more (the rest is zeroes): the log says which kind ran.
    let log = std::fs::read_to_string(c.run_dir().join(format!("r0.{victim}.log"))).expect("the victim's log");
    let started: Vec<&str> = log.lines().filter(|l| l.contains("resync started as target")).collect();
    assert!(!started.is_empty() && started.iter().all(|l| l.contains("full=false")), "{victim} was resynced in full: {started:?}");
}

#[test]
fn a_split_brain_is_resolved_by_the_discard_least_changes_policy() {
    let c = split_brain_pair("after_sb_0pri = \"discard-least-changes\"", 2 * MIB);
    let before = c.received("beta", "alpha");
    c.ok("alpha", &["connect", "r0"]);
    c.ok("beta", &["connect", "r0"]);
    // beta changed 64 KiB, alpha 2 MiB: beta is the victim; both sides' changes flow to it.
    assert_resynced(&c, "alpha", "beta", before, 2 * MIB, 64 << 10);
    assert!(c.logs().contains("split brain"), "the split brain must be logged");
}

#[test]
fn a_split_brain_waits_for_the_operator_and_discard_my_data_resyncs_both_bitmaps() {
    let c = split_brain_pair("", MIB);
    let before = c.received("alpha", "beta");
    c.ok("alpha", &["connect", "r0"]);
    c.ok("beta", &["connect", "r0"]);
    let alpha = c.wait_for("alpha", "split brain refused", |s| Cluster::peer(s, "beta")["connection"] == "StandAlone");
    let error = Cluster::peer(&alpha, "beta")["last_error"].as_str().unwrap().to_owned();
    assert!(error.contains("split brain") && error.contains("--discard-my-data"), "{error}");
    c.wait_for("beta", "split brain refused", |s| Cluster::peer(s, "alpha")["connection"] == "StandAlone");
    // The operator keeps beta's changes: alpha is the victim.
    c.ok("beta", &["connect", "r0"]);
    c.ok("alpha", &["connect", "--discard-my-data", "r0"]);
    assert_resynced(&c, "beta", "alpha", before, 64 << 10, MIB);
    c.ok("beta", &["primary", "r0"]);
    let (ok, out) = check_patterns(&c.nbd_url("beta"), &[(40 * MIB, 64 << 10, 0xB2), (0, MIB, 0)]);
    assert!(ok, "alpha's discarded changes or beta's kept ones are wrong: {out}");
}

#[test]
fn five_nodes_a_secondary_keeps_the_bitmap_for_a_peer_the_dead_primary_left_behind() {
    let c = Cluster::new(
        &["alpha", "beta", "gamma", "w1", "w2"],
        Options { quorum: "majority", witnesses: &["w1", "w2"], ..Options::default() },
    );
    c.create_md_and_up();
    c.wait_for("alpha", "peers", |s| s["quorum_votes"] == 5);
    c.ok("alpha", &["primary", "--force", "r0"]);
    for node in ["beta", "gamma"] {
        c.wait_peer("alpha", node, "Established", "UpToDate");
    }
    let p1 = (0, MIB, 0x01);
    write_patterns(&c.nbd_url("alpha"), &[p1]);
    c.kill("gamma");
    c.wait_for("alpha", "gamma gone", |s| Cluster::peer(s, "gamma")["connection"] == "Connecting");
    let p2 = (10 * MIB, 2 * MIB, 0x02);
    write_patterns(&c.nbd_url("alpha"), &[p2]);
    // beta receives alpha's writes and records them for gamma, which does not.
    let beta = c.wait_for("beta", "tracking gamma", |s| Cluster::peer(s, "gamma")["out_of_sync_bytes"].as_u64() >= Some(2 * MIB));
    assert_eq!(beta["generation_uuid"], c.status("alpha")["generation_uuid"], "beta follows alpha's new generation");

    c.kill("alpha");
    c.wait_for("beta", "may promote", |s| s["may_promote"] == true);
    c.ok("beta", &["primary", "r0"]);
    let p3 = (30 * MIB, MIB, 0x03);
    write_patterns(&c.nbd_url("beta"), &[p3]);
    let (ok, out) = check_patterns(&c.nbd_url("beta"), &[p1, p2]);
    assert!(ok, "beta lost alpha's acknowledged writes: {out}");

    // gamma returns and is brought up to date from beta by a bitmap resync: p2 and p3, plus
    // the writes beta applied just before it noticed gamma's death; never the whole device.
    c.ok("gamma", &["up", "r0"]);
    c.wait_peer("beta", "gamma", "Established", "UpToDate");
    let moved = c.received("gamma", "beta");
    assert!(moved >= 3 * MIB, "gamma did not receive what it missed: {moved} bytes");
    // The device's unwritten space would go as zero runs in a full resync too: the log says
    // which kind ran.
    let log = std::fs::read_to_string(c.run_dir().join("r0.gamma.log")).expect("gamma's log");
    let started: Vec<&str> = log.lines().filter(|l| l.contains("resync started as target")).collect();
    assert!(!started.is_empty() && started.iter().all(|l| l.contains("full=false")), "gamma was resynced in full where a bitmap suffices: {started:?}");
    // alpha returns after its crash as primary and follows beta.
    c.ok("alpha", &["up", "r0"]);
    c.wait_peer("beta", "alpha", "Established", "UpToDate");
    c.ok("beta", &["secondary", "r0"]);
    for node in ["alpha", "gamma"] {
        c.wait_for(node, "UpToDate", |s| s["disk"] == "UpToDate");
        c.assert_data_equal("beta", &[node], "after alpha's return");
    }
}

/// A witness keeps what it learned in its metadata file (`meta_disk`): after a restart with
/// no other node up, it still knows the newest primary generation it saw, so a stale primary
/// it might hear first cannot take its vote back to an older generation.
#[test]
fn a_witness_remembers_the_newest_primary_generation_across_a_restart() {
    let c = Cluster::witness_trio(Options::default());
    write_patterns(&c.nbd_url("alpha"), &[(0, MIB, 0x21)]);
    c.kill("beta");
    c.wait_for("alpha", "beta gone", |s| Cluster::peer(s, "beta")["connection"] == "Connecting");
    // The next write starts the generation beta lacks; the witness learns it from alpha.
    write_patterns(&c.nbd_url("alpha"), &[(2 * MIB, MIB, 0x22)]);
    let newest = c.status("alpha")["generation_uuid"].clone();
    c.wait_for("tie", "learned", |s| s["generation_uuid"] == newest);
    c.kill("alpha");
    c.kill("tie");
    c.ok("tie", &["up", "r0"]);
    let tie = c.status("tie");
    assert_eq!(tie["generation_uuid"], newest, "the witness forgot the newest generation it saw");
    assert!(tie["peers"].as_array().unwrap().iter().all(|p| p["connection"] != "Connected"), "nobody could have told it");
}

/// A peer that left cleanly stays out of the voter count across a restart of the node that saw
/// it leave (it is kept in the metadata), until it connects again.
#[test]
fn a_clean_departure_is_remembered_across_a_restart() {
    let c = Cluster::witness_trio(Options::default());
    c.ok("beta", &["down", "r0"]);
    c.wait_for("alpha", "beta departed", |s| Cluster::peer(s, "beta")["departed"] == true);
    for node in ["alpha", "tie"] {
        c.kill(node);
        c.ok(node, &["up", "r0"]);
    }
    assert_eq!(Cluster::peer(&c.status("alpha"), "beta")["departed"], true, "the restart forgot that beta left cleanly");
    // Discounted once every other voter (the witness) counts again.
    c.wait_for("alpha", "beta not counted", |s| Cluster::peer(s, "tie")["connection"] == "Connected" && s["quorum_voters"] == 2);
    assert_eq!(Cluster::peer(&c.status("tie"), "beta")["departed"], true, "the witness forgot it too");
    c.ok("beta", &["up", "r0"]);
    c.wait_for("alpha", "beta back", |s| Cluster::peer(s, "beta")["departed"] == false && s["quorum_voters"] == 3);
}
