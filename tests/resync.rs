//! Online verify, invalidate, checksum-based resync and resync progress, with real daemons on
//! 127.0.0.1: every test asserts bytes moved, states and errors.

mod common;

use common::{synced_pair, text, write_patterns, Cluster, Options};

const MIB: u64 = 1 << 20;

fn patterns() -> Vec<(u64, u64, u8)> {
    vec![(0, MIB, 0x11), (5 * MIB, 64 << 10, 0x22), (17 * MIB, 256 << 10, 0x33), (59 * MIB, MIB, 0x44)]
}

/// Asserts that `moved` bytes resynced the whole device of `size` bytes written with
/// `patterns()` and zeroes elsewhere: the patterns' data as bytes, every run of zeroes as its
/// length alone (`ResyncZeroes`: 12 bytes, for runs of at least 32 KiB).
fn assert_moved_whole_device(moved: u64, size: u64) {
    let data: u64 = patterns().iter().map(|(_, len, _)| len).sum();
    let zero_frames = moved.checked_sub(data).unwrap_or_else(|| panic!("{moved} bytes moved, less than the {data} written"));
    assert!(zero_frames % 12 == 0 && zero_frames > 0 && zero_frames / 12 <= size / (32 << 10), "{moved} bytes moved for {data} bytes written on a {size}-byte device");
}

/// The peer entry `node` shows for `peer`.
fn peer_of(c: &Cluster, node: &str, peer: &str) -> serde_json::Value {
    Cluster::peer(&c.status(node), peer).clone()
}

/// Asserts both replicas hold the same bytes.
#[test]
fn verify_reports_the_corrupted_block_and_a_reconnect_or_a_demotion_repairs_it() {
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

    // Verify repaired nothing. A reconnect resyncs the block.
    let received = c.received("beta", "alpha");
    c.ok("alpha", &["disconnect", "r0"]);
    c.ok("alpha", &["connect", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    c.wait_for("beta", "UpToDate", |s| s["disk"] == "UpToDate");
    // The union of both bitmaps moves: the marked block, and on beta's side the writes it
    // applied lately (a secondary marks those for a peer that drops), never the whole device.
    let moved = c.received("beta", "alpha") - received;
    let written: u64 = patterns().iter().map(|(_, len, _)| len).sum();
    assert!((4096..=written + 4096).contains(&moved), "the reconnect moved {moved} bytes");
    assert_eq!(peer_of(&c, "alpha", "beta")["out_of_sync_bytes"], 0);
    c.assert_data_equal("alpha", &["beta"], "after the resync");

    // A second verify finds nothing.
    c.ok("alpha", &["verify", "r0"]);
    let s = c.wait_for("alpha", "verify finished", |s| Cluster::peer(s, "beta")["verify"]["state"] == "finished");
    assert_eq!(Cluster::peer(&s, "beta")["verify"]["out_of_sync_found_bytes"], 0);
    assert_eq!(c.status("beta")["disk"], "UpToDate");

    // Between two secondaries no reconnect is needed: once neither sees a primary, they weigh
    // the bits on their live link, and the block moves.
    c.corrupt_byte("beta", corrupted);
    c.ok("alpha", &["verify", "r0"]);
    let s = c.wait_for("alpha", "verify finished", |s| Cluster::peer(s, "beta")["verify"]["state"] == "finished");
    assert_eq!(Cluster::peer(&s, "beta")["verify"]["out_of_sync_found_bytes"], 4096);
    assert_eq!(c.status("beta")["disk"], "Outdated");
    c.ok("alpha", &["secondary", "r0"]);
    c.wait_for("beta", "UpToDate", |s| s["disk"] == "UpToDate");
    c.wait_for("alpha", "in sync", |s| Cluster::peer(s, "beta")["out_of_sync_bytes"] == 0);
    assert_eq!(c.status("alpha")["disk"], "UpToDate");
    c.assert_data_equal("alpha", &["beta"], "after the resync");
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
    assert_moved_whole_device(c.received("beta", "alpha") - received, size);
    c.assert_data_equal("alpha", &["beta"], "after the resync");
}

#[test]
fn checksum_resync_sends_only_the_blocks_that_differ() {
    let c = synced_pair(Options { extra: "csums_resync = true", ..Options::default() });
    write_patterns(&c.nbd_url("alpha"), &patterns());
    c.corrupt_byte("beta", 30 * MIB + 5);
    let sent = |c: &Cluster| peer_of(c, "alpha", "beta")["sent_bytes"].as_u64().unwrap();
    let (received, sent_before) = (c.received("beta", "alpha"), sent(&c));
    c.ok("beta", &["invalidate", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    c.wait_for("beta", "UpToDate", |s| s["disk"] == "UpToDate");
    let size = c.status("beta")["size_bytes"].as_u64().unwrap();
    let digests = size / 4096 * 32;
    let moved = c.received("beta", "alpha") - received;
    // The block that differs holds zeroes on alpha: it goes as its length.
    assert_eq!(moved, digests + 12, "a digest per block, and the one block that differs (device {size} bytes)");
    assert_eq!(sent(&c) - sent_before, moved, "both ends count the same bytes");
    c.assert_data_equal("alpha", &["beta"], "after the resync");
}

/// Two fresh nodes declared in sync without a copy, alpha Primary: tests that need a slow
/// resync do not wait for a slow initial one.
fn fresh_pair(options: Options) -> Cluster {
    let c = Cluster::new(&["alpha", "beta"], options);
    c.create_md_and_up();
    c.wait_connected("alpha", &["beta"]);
    c.ok("alpha", &["new-current-uuid", "--clear-bitmap", "r0"]);
    c.wait_for("beta", "UpToDate", |s| s["disk"] == "UpToDate");
    c.wait_for("alpha", "UpToDate", |s| s["disk"] == "UpToDate");
    c.ok("alpha", &["primary", "r0"]);
    c
}

#[test]
fn an_invalidated_node_killed_midway_resyncs_after_restart() {
    let c = fresh_pair(Options { extra: "resync_rate_max_kib = 4096\nresync_rate_min_kib = 4096", ..Options::default() });
    write_patterns(&c.nbd_url("alpha"), &patterns());
    c.ok("beta", &["invalidate", "r0"]);
    c.wait_for("beta", "resync started", |s| Cluster::peer(s, "alpha")["replication"] == "SyncTarget");
    c.kill("beta");
    c.ok("beta", &["up", "r0"]);
    assert_eq!(c.status("beta")["disk"], "Inconsistent", "the invalidation survived the crash");
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    c.wait_for("beta", "UpToDate", |s| s["disk"] == "UpToDate");
    let size = c.status("beta")["size_bytes"].as_u64().unwrap();
    // After the restart the whole device is resynced again.
    assert_moved_whole_device(c.received("beta", "alpha"), size);
    c.assert_data_equal("alpha", &["beta"], "after the resync");
}

#[test]
fn resync_progress_never_runs_backwards_and_no_copy_shows_up_to_date_while_out_of_sync() {
    let c = fresh_pair(Options { extra: "resync_rate_max_kib = 2048\nresync_rate_min_kib = 1024", ..Options::default() });
    c.ok("beta", &["disconnect", "r0"]);
    c.wait_for("alpha", "beta gone", |s| Cluster::peer(s, "beta")["connection"] != "Connected");
    write_patterns(&c.nbd_url("alpha"), &[(0, 8 * MIB, 0x51)]);
    c.ok("beta", &["connect", "r0"]);
    // The application keeps writing while the resync runs: into blocks not resynced yet and
    // elsewhere.
    let url = c.nbd_url("alpha");
    let writer = std::thread::spawn(move || {
        for (i, offset) in [6 * MIB, 40 * MIB, 2 * MIB, 50 * MIB].into_iter().enumerate() {
            write_patterns(&url, &[(offset, MIB, 0x60 + i as u8)]);
        }
    });
    let mut last_percent = [0.0f64; 2];
    let mut samples = 0;
    loop {
        let statuses = [c.status("alpha"), c.status("beta")];
        for (i, status) in statuses.iter().enumerate() {
            for peer in status["peers"].as_array().unwrap() {
                let out_of_sync = peer["out_of_sync_bytes"].as_u64().unwrap();
                assert!(
                    out_of_sync == 0 || status["disk"] != "UpToDate" || peer["peer_disk"] != "UpToDate",
                    "both copies shown UpToDate with {out_of_sync} bytes out of sync: {status:#}"
                );
                if let Some(percent) = peer["resync"]["done_percent"].as_f64() {
                    assert!(percent >= last_percent[i], "progress ran backwards: {percent} after {}", last_percent[i]);
                    last_percent[i] = percent;
                    samples += 1;
                }
            }
        }
        let beta_peer = Cluster::peer(&statuses[0], "beta");
        if writer.is_finished() && beta_peer["replication"] == "Established" && statuses[1]["disk"] == "UpToDate" {
            break;
        }
    }
    writer.join().unwrap();
    assert!(samples > 2, "the resync was never seen running");
    assert_eq!(peer_of(&c, "alpha", "beta")["out_of_sync_bytes"], 0);
    c.assert_data_equal("alpha", &["beta"], "after the resync");
}

#[test]
fn an_interrupted_resync_resumes_where_it_stood() {
    let c = fresh_pair(Options { extra: "resync_rate_max_kib = 4096\nresync_rate_min_kib = 4096", ..Options::default() });
    c.ok("beta", &["disconnect", "r0"]);
    c.wait_for("alpha", "beta gone", |s| Cluster::peer(s, "beta")["connection"] != "Connected");
    let written = 24 * MIB;
    write_patterns(&c.nbd_url("alpha"), &[(0, written, 0x5e)]);
    c.ok("beta", &["connect", "r0"]);
    // The source clears its bits as barrier acks come back (an epoch of resync data is 8 MiB
    // here): cut the link once at least one came back, while the rest is still to send.
    c.wait_for("alpha", "an epoch of the resync acknowledged", |s| {
        Cluster::peer(s, "beta")["out_of_sync_bytes"].as_u64().is_some_and(|left| left <= written - 8 * MIB)
    });
    c.ok("beta", &["disconnect", "r0"]);
    let beta = c.wait_for("beta", "alpha gone", |s| Cluster::peer(s, "alpha")["connection"] != "Connected");
    assert_eq!(beta["disk"], "Inconsistent", "the resync was cut off before its end:\n{}", c.logs());
    let left_on_target = Cluster::peer(&beta, "alpha")["out_of_sync_bytes"].as_u64().unwrap();
    assert!(left_on_target < written, "the target kept every bit of the resync: {left_on_target} bytes");
    let received_before = c.received("beta", "alpha");
    c.ok("beta", &["connect", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    c.wait_for("beta", "UpToDate", |s| s["disk"] == "UpToDate");
    let resent = c.received("beta", "alpha") - received_before;
    // What the first resync made durable on beta and acknowledged to alpha stays done.
    assert!(resent <= written - 8 * MIB, "the second resync moved {resent} of the {written} bytes: some of them again");
    assert_eq!(peer_of(&c, "alpha", "beta")["out_of_sync_bytes"], 0);
    c.assert_data_equal("alpha", &["beta"], "after the resync");
}

#[test]
fn a_node_cut_off_mid_resync_waits_for_its_source_and_a_fresh_metadata_gives_its_copy_up() {
    // gamma, further than beta, is cut off mid-resync by the loss of alpha: beta is no source
    // for it (it lacks what gamma took in while beta was away). The escape OPERATIONS gives for
    // a source gone for good: new metadata on gamma, which joins as a fresh disk.
    let c = Cluster::new(&["alpha", "beta", "gamma"], Options { extra: "resync_rate_max_kib = 2048\nresync_rate_min_kib = 2048", ..Options::default() });
    c.create_md_and_up();
    c.wait_connected("alpha", &["beta", "gamma"]);
    c.ok("alpha", &["new-current-uuid", "--clear-bitmap", "r0"]);
    for node in ["alpha", "beta", "gamma"] {
        c.wait_for(node, "UpToDate", |s| s["disk"] == "UpToDate");
    }
    // The scenario starts once every link is in sync, so that the first write reaches every
    // node (what beta lacks later is then the scenario's doing alone).
    c.wait_all_in_sync(&["alpha", "beta", "gamma"]);
    c.ok("alpha", &["primary", "r0"]);
    let first = [(0, MIB, 0x61)];
    write_patterns(&c.nbd_url("alpha"), &first);
    c.ok("beta", &["disconnect", "r0"]);
    c.wait_for("alpha", "beta gone", |s| Cluster::peer(s, "beta")["connection"] != "Connected");
    // Not zeroes: a run of zeroes is resynced as its length alone, at once.
    let second = [(8 * MIB, 32 * MIB, 0x62)];
    write_patterns(&c.nbd_url("alpha"), &second);
    // gamma holds both; a full resync of it from alpha, cut off by alpha's death.
    c.ok("gamma", &["invalidate", "r0"]);
    c.wait_for("gamma", "the resync under way", |s| {
        Cluster::peer(s, "alpha")["out_of_sync_bytes"].as_u64().is_some_and(|left| left > 8 * MIB && left < 60 * MIB)
    });
    c.kill("alpha");
    c.wait_for("gamma", "alpha gone", |s| Cluster::peer(s, "alpha")["connection"] != "Connected");
    c.ok("beta", &["connect", "r0"]);
    let log = c.run_dir().join("r0.gamma.log");
    let waits = "no source between this node and beta while one is Inconsistent: waiting for a third node";
    c.wait_for("gamma", "waiting for a third node", |_| std::fs::read_to_string(&log).unwrap().contains(waits));
    let gamma = c.status("gamma");
    assert_eq!(gamma["disk"], "Inconsistent", "{gamma:#}");
    assert_eq!(Cluster::peer(&gamma, "beta")["connection"], "Connected");
    assert_ne!(Cluster::peer(&gamma, "beta")["replication"], "SyncTarget", "beta lacks what gamma took in since it left");

    c.ok("gamma", &["down", "r0"]);
    c.ok("gamma", &["create-md", "--force", "r0"]);
    c.ok("gamma", &["up", "r0"]);
    let gamma = c.wait_for("gamma", "synced in full from beta", |s| {
        s["disk"] != "Inconsistent" && Cluster::peer(s, "beta")["replication"] == "Established"
    });
    let size = gamma["size_bytes"].as_u64().unwrap();
    c.assert_data_equal("beta", &["gamma"], "gamma synced in full from beta");
    let data = c.data_of("gamma", size);
    let first_other = data[..MIB as usize].iter().position(|b| *b != 0x61);
    assert!(first_other.is_none(), "what beta held: byte {first_other:?} differs; gamma {:#}\nbeta {:#}\n{}", c.status("gamma"), c.status("beta"), c.logs());
    assert!(data[8 * MIB as usize..40 * MIB as usize].iter().all(|b| *b == 0), "what only alpha and gamma held is given up\n{}", c.logs());
}

/// Stops (or resumes) a daemon: a peer that neither reads nor answers, as on a saturated link.
fn signal(c: &Cluster, node: &str, signal: &str) {
    let status = std::process::Command::new("kill").args([signal, &c.pid(node).to_string()]).status().unwrap();
    assert!(status.success());
}

#[test]
fn pull_ahead_keeps_writes_completing_while_the_peer_is_stuck_then_resyncs() {
    let extra = "on_congestion = \"pull-ahead\"\ncongestion_fill_kib = 1024";
    let c = fresh_pair(Options { protocol: "A", extra, ..Options::default() });
    let data = [(0, 40 * MIB, 0x7a), (50 * MIB, 4 * MIB, 0x7b)];
    signal(&c, "beta", "-STOP");
    // Under `block` these writes would wait for beta once the 8 MiB send queue is full.
    write_patterns(&c.nbd_url("alpha"), &data);
    let alpha = c.status("alpha");
    signal(&c, "beta", "-CONT");
    let beta = Cluster::peer(&alpha, "beta");
    assert_eq!(beta["replication"], "Ahead", "{alpha:#}\n{}", c.logs());
    assert_eq!(beta["connection"], "Connected");
    assert!(beta["out_of_sync_bytes"].as_u64().unwrap() > 0);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    c.wait_for("beta", "UpToDate", |s| s["disk"] == "UpToDate");
    assert_eq!(peer_of(&c, "alpha", "beta")["out_of_sync_bytes"], 0);
    assert!(std::fs::read_to_string(c.run_dir().join("r0.alpha.log")).unwrap().contains("Ahead of beta"));
    c.assert_data_equal("alpha", &["beta"], "after the resync");
}

#[test]
fn a_reconnect_resyncs_every_changed_bit_of_one_mebibyte_bitmap_blocks() {
    let c = synced_pair(Options { extra: "bitmap_block_size = 1048576", ..Options::default() });
    c.ok("beta", &["disconnect", "r0"]);
    c.wait_for("alpha", "beta gone", |s| Cluster::peer(s, "beta")["connection"] != "Connected");
    write_patterns(&c.nbd_url("alpha"), &[(3 * MIB + 100 * 4096, 4096, 0x5c), (10 * MIB, 2 * MIB, 0x5d)]);
    let dirty = peer_of(&c, "alpha", "beta")["out_of_sync_bytes"].as_u64().unwrap();
    assert_eq!(dirty, 3 * MIB, "a bit per mebibyte touched");
    c.ok("beta", &["connect", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    c.wait_for("beta", "UpToDate", |s| s["disk"] == "UpToDate");
    assert_eq!(peer_of(&c, "alpha", "beta")["out_of_sync_bytes"], 0);
    c.assert_data_equal("alpha", &["beta"], "after the resync");
}
