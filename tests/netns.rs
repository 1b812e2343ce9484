//! Real daemons in network namespaces (root only): partitions that drop packets silently, as a
//! failed switch port does, instead of the clean resets of killed processes on loopback.
//! Two data nodes and a diskless witness under quorum "majority".

mod common;

use common::{netns, Cluster, Options};

const MIB: u64 = 1 << 20;

/// alpha Primary, beta UpToDate, witness `tie`; each in its own namespace.
fn trio(extra: &'static str) -> Option<Cluster> {
    netns::usable().then(|| Cluster::witness_trio(Options { netns: true, disk_mib: 128, extra, ..Options::default() }))
}

#[test]
fn a_partitioned_primary_stops_the_majority_promotes_and_nothing_acknowledged_is_lost() {
    let Some(c) = trio("after_sb_1pri = \"discard-secondary\"") else { return };
    let before = vec![(0, MIB, 0x11), (20 * MIB, 256 << 10, 0x12)];
    c.write("alpha", &before);

    c.isolate("alpha");
    // A client keeps writing on the isolated primary: it must not be acknowledged.
    let ns = c.ns("alpha").unwrap();
    let url = c.nbd_url("alpha");
    let writer = std::thread::spawn(move || {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "qemu-io", "-f", "raw", "-t", "writeback", &url])
            .args(["-c", "write -P 0x66 0 1M", "-c", "flush"])
            .output()
            .unwrap();
        (out.status.success(), format!("{}{}", common::text(&out.stdout), common::text(&out.stderr)))
    });
    c.wait_for("alpha", "quorum lost", |s| s["quorum"] == false);
    c.wait_for("beta", "may promote", |s| s["may_promote"] == true);
    c.ok("beta", &["primary", "r0"]);
    let after = vec![(40 * MIB, MIB, 0x22)];
    c.write("beta", &after);
    let alpha = c.status("alpha");
    assert!(!writer.is_finished(), "the isolated primary acknowledged a write");
    assert_eq!((alpha["role"].as_str(), alpha["quorum"].as_bool()), (Some("Primary"), Some(false)));

    // Heal: alpha sees beta as primary (directly or through the witness); the split brain
    // between the two primaries is reported, not merged, and the write alpha held can never be
    // acknowledged: it fails.
    c.heal("alpha");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !writer.is_finished() {
        assert!(std::time::Instant::now() < deadline, "the old primary still holds its write after the heal\n{}", c.logs());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (ok, out) = writer.join().unwrap();
    assert!(!ok, "the old primary acknowledged a write after the heal: {out}");
    c.wait_for("alpha", "split brain reported", |s| {
        Cluster::peer(s, "beta")["last_error"].as_str().is_some_and(|e| e.contains("split brain"))
    });
    c.ok("alpha", &["secondary", "r0"]);
    // Both sides went StandAlone at the split brain; the operator reconnects them, and
    // after_sb_1pri = discard-secondary drops alpha's unacknowledged change.
    c.ok("beta", &["connect", "r0"]);
    c.ok("alpha", &["connect", "r0"]);
    c.wait_peer("beta", "alpha", "Established", "UpToDate");
    c.wait_for("alpha", "resynced", |s| s["disk"] == "UpToDate");
    c.ok("beta", &["secondary", "r0"]);
    c.wait_for("alpha", "may promote", |s| s["may_promote"] == true);
    c.ok("alpha", &["primary", "r0"]);
    let (ok, out) = c.check("alpha", &[before, after].concat());
    assert!(ok, "an acknowledged write is missing after the heal: {out}");
}

#[test]
fn witness_down_secondary_reboot_and_primary_crash_resync_only_what_differs() {
    let Some(c) = trio("") else { return };
    // Witness down: the data nodes keep quorum and keep writing.
    c.kill("tie");
    c.write("alpha", &[(0, MIB, 0x31)]);
    assert_eq!(c.status("alpha")["quorum"], true);
    c.ok("tie", &["up", "r0"]);
    c.wait_for("alpha", "tie back", |s| Cluster::peer(s, "tie")["connection"] == "Connected");

    // Secondary reboot: only the 2 MiB written meanwhile move.
    // (The restarted daemon counts received bytes from zero.)
    c.kill("beta");
    c.write("alpha", &[(8 * MIB, 2 * MIB, 0x32)]);
    c.ok("beta", &["up", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    let moved = c.received("beta", "alpha");
    assert!((2 * MIB..3 * MIB).contains(&moved), "secondary reboot moved {moved} bytes for 2 MiB written");

    // Primary crash: beta takes over; alpha returns and resyncs only its activity log's hot
    // extents (4 MiB each) plus what beta wrote, never the 128 MiB device.
    c.write("alpha", &[(60 * MIB, 4096, 0x33)]);
    c.kill("alpha");
    c.wait_for("beta", "may promote", |s| s["may_promote"] == true);
    c.ok("beta", &["primary", "r0"]);
    c.write("beta", &[(100 * MIB, MIB, 0x34)]);
    c.ok("alpha", &["up", "r0"]);
    c.wait_peer("beta", "alpha", "Established", "UpToDate");
    let moved = c.received("alpha", "beta");
    assert!(moved >= MIB && moved <= MIB + 4 * 4 * MIB, "crashed primary resynced {moved} bytes");
    let (ok, out) = c.check("beta", &[(0, MIB, 0x31), (8 * MIB, 2 * MIB, 0x32), (60 * MIB, 4096, 0x33), (100 * MIB, MIB, 0x34)]);
    assert!(ok, "{out}");
}
