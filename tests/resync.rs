//! Online verify, invalidate, checksum-based resync and resync progress, with real daemons on
//! 127.0.0.1: every test asserts bytes moved, states and errors.

mod common;

use common::{synced_pair, text, write_patterns, Cluster, Options};

const MIB: u64 = 1 << 20;

fn patterns() -> Vec<(u64, u64, u8)> {
    vec![(0, MIB, 0x11), (5 * MIB, 64 << 10, 0x22), (17 * MIB, 256 << 10, 0x33), (59 * MIB, MIB, 0x44)]
}

/// The peer entry `node` shows for `peer`.
fn peer_of(c: &Cluster, node: &str, peer: &str) -> serde_json::Value {
    Cluster::peer(&c.status(node), peer).clone()
}

/// Asserts both replicas hold the same bytes.
fn assert_replicas_equal(c: &Cluster) {
    assert!(c.data_area("alpha") == c.data_area("beta"), "the replicas differ\n{}", c.logs());
}

#[test]
fn verify_reports_the_corrupted_block_and_a_reconnect_repairs_it() {
    let c = synced_pair(Options::default());
    write_patterns(&c.nbd_url("alpha"), &patterns());
    let corrupted = 17 * MIB + 3 * 4096 + 100;
    c.corrupt_byte("beta", corrupted);

    let out = c.cli("beta", &["verify", "r0"]);
    assert_eq!(out.status.code(), Some(11), "a secondary does not verify against its primary");
    assert!(text(&out.stderr).contains("alpha is primary"), "{}", text(&out.stderr));

    let started = c.ok("alpha", &["verify", "r0"]);
    assert!(started.contains("with beta"), "{started}");
    let s = c.wait_for("alpha", "verify finished", |s| Cluster::peer(s, "beta")["verify"]["state"] == "finished");
    let beta = Cluster::peer(&s, "beta");
    let verify = &beta["verify"];
    assert_eq!(verify["checked_bytes"], s["size_bytes"]);
    assert_eq!(verify["out_of_sync_found_bytes"], 4096);
    assert_eq!(verify["first_out_of_sync"], serde_json::json!([{ "offset": 17 * MIB + 3 * 4096, "len": 4096 }]));
    assert_eq!(beta["out_of_sync_bytes"], 4096);
    assert_eq!(beta["peer_disk"], "Outdated", "a copy known to differ is never shown UpToDate");
    assert_eq!(c.status("beta")["disk"], "Outdated");
    assert!(text(&std::fs::read(c.run_dir().join("r0.alpha.log")).unwrap()).contains("disconnect r0"));
    let human = c.ok("alpha", &["status", "r0"]);
    assert!(human.contains("verify:finished") && human.contains(&format!("{}+4096", 17 * MIB + 3 * 4096)), "{human}");

    // Verify repaired nothing. Between two secondaries a reconnect resyncs exactly the block.
    c.ok("alpha", &["secondary", "r0"]);
    let received = c.received("beta", "alpha");
    c.ok("alpha", &["disconnect", "r0"]);
    c.ok("alpha", &["connect", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    c.wait_for("beta", "UpToDate", |s| s["disk"] == "UpToDate");
    assert_eq!(c.received("beta", "alpha") - received, 4096, "the reconnect resynced more than the block");
    assert_eq!(peer_of(&c, "alpha", "beta")["out_of_sync_bytes"], 0);
    assert_replicas_equal(&c);

    // A second verify finds nothing.
    c.ok("alpha", &["verify", "r0"]);
    let s = c.wait_for("alpha", "verify finished", |s| Cluster::peer(s, "beta")["verify"]["state"] == "finished");
    assert_eq!(Cluster::peer(&s, "beta")["verify"]["out_of_sync_found_bytes"], 0);
    assert_eq!(c.status("beta")["disk"], "UpToDate");
}

#[test]
fn verify_and_invalidate_are_refused_without_a_peer() {
    let c = synced_pair(Options::default());
    c.ok("beta", &["disconnect", "r0"]);
    c.wait_for("alpha", "beta gone", |s| Cluster::peer(s, "beta")["connection"] != "Connected");
    let out = c.cli("alpha", &["verify", "r0"]);
    assert_eq!(out.status.code(), Some(11));
    assert!(text(&out.stderr).contains("no peer to verify against"), "{}", text(&out.stderr));
    let out = c.cli("alpha", &["invalidate", "r0"]);
    assert_eq!(out.status.code(), Some(11));
    assert!(text(&out.stderr).contains("Primary"), "{}", text(&out.stderr));
    let out = c.cli("beta", &["invalidate", "r0"]);
    assert_eq!(out.status.code(), Some(11));
    assert!(text(&out.stderr).contains("no connected UpToDate peer"), "{}", text(&out.stderr));
    assert_eq!(c.status("beta")["disk"], "UpToDate", "a refused invalidate changes nothing");
}

#[test]
fn invalidate_resyncs_the_whole_device() {
    let c = synced_pair(Options::default());
    write_patterns(&c.nbd_url("alpha"), &patterns());
    c.corrupt_byte("beta", 30 * MIB);
    let received = c.received("beta", "alpha");
    c.ok("beta", &["invalidate", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    c.wait_for("beta", "UpToDate", |s| s["disk"] == "UpToDate");
    let size = c.status("beta")["size_bytes"].as_u64().unwrap();
    assert_eq!(c.received("beta", "alpha") - received, size, "invalidate moves the whole device");
    assert_replicas_equal(&c);
}
