//! Two real daemons on 127.0.0.1: initial sync, failover after kill -9, bitmap resync after a
//! disconnect, the protocols, and role rules. I/O goes through the NBD export with qemu-io.

mod common;

use common::{check_patterns, synced_pair, write_patterns, Cluster, Options};

const MIB: u64 = 1 << 20;

fn patterns() -> Vec<(u64, u64, u8)> {
    vec![(0, MIB, 0x11), (5 * MIB, 64 << 10, 0x22), (17 * MIB + 4096, 4096, 0x33), (59 * MIB, MIB, 0x44)]
}

#[test]
fn failover_after_kill_9_serves_every_acknowledged_write() {
    let c = synced_pair(Options::default());
    let status = c.status("alpha");
    assert_eq!(status["role"], "Primary");
    assert_eq!(status["device"], c.nbd_url("alpha"));
    let data = patterns();
    write_patterns(&c.nbd_url("alpha"), &data);
    // Writes after the flush, acknowledged under protocol C without another flush.
    write_patterns(&c.nbd_url("alpha"), &[(30 * MIB, 128 << 10, 0x55)]);

    c.kill("alpha");
    c.wait_for("beta", "alpha gone", |s| Cluster::peer(s, "alpha")["connection"] == "Connecting");
    assert_eq!(c.status("beta")["disk"], "UpToDate");
    c.ok("beta", &["primary", "r0"]);
    let (ok, out) = check_patterns(&c.nbd_url("beta"), &[data.clone(), vec![(30 * MIB, 128 << 10, 0x55)]].concat());
    assert!(ok, "beta lost acknowledged data: {out}");

    // beta writes on alone; alpha comes back, resyncs from beta and holds beta's data.
    write_patterns(&c.nbd_url("beta"), &[(40 * MIB, MIB, 0x66)]);
    assert!(Cluster::peer(&c.status("beta"), "alpha")["out_of_sync_bytes"].as_u64().unwrap() >= MIB);
    c.ok("alpha", &["up", "r0"]);
    c.wait_peer("beta", "alpha", "Established", "UpToDate");
    let beta = c.status("beta");
    assert_eq!(Cluster::peer(&beta, "alpha")["out_of_sync_bytes"], 0);
    c.ok("beta", &["secondary", "r0"]);
    c.ok("alpha", &["primary", "r0"]);
    let (ok, out) = check_patterns(&c.nbd_url("alpha"), &[data, vec![(40 * MIB, MIB, 0x66)]].concat());
    assert!(ok, "alpha did not get beta's writes back: {out}");
}

#[test]
fn reconnect_resyncs_only_what_changed() {
    let c = synced_pair(Options { disk_mib: 256, ..Options::default() });
    let received_before = Cluster::peer(&c.status("beta"), "alpha")["received_bytes"].as_u64().unwrap();
    c.ok("beta", &["disconnect", "r0"]);
    c.wait_for("alpha", "beta gone", |s| Cluster::peer(s, "beta")["connection"] != "Connected");
    write_patterns(&c.nbd_url("alpha"), &[(10 * MIB, 2 * MIB, 0x77), (200 * MIB, 4096, 0x78)]);
    let dirty = Cluster::peer(&c.status("alpha"), "beta")["out_of_sync_bytes"].as_u64().unwrap();
    assert_eq!(dirty, 2 * MIB + 4096, "bitmap must record exactly the written blocks");

    c.ok("beta", &["connect", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    let moved = Cluster::peer(&c.status("beta"), "alpha")["received_bytes"].as_u64().unwrap() - received_before;
    assert!(moved >= dirty && moved < dirty + MIB, "resync moved {moved} bytes for {dirty} dirty bytes (disk is 256 MiB)");

    c.ok("alpha", &["secondary", "r0"]);
    c.ok("beta", &["primary", "r0"]);
    let (ok, out) = check_patterns(&c.nbd_url("beta"), &[(10 * MIB, 2 * MIB, 0x77), (200 * MIB, 4096, 0x78)]);
    assert!(ok, "resynced data differs: {out}");
}

fn replicates_with(protocol: &'static str) {
    let c = synced_pair(Options { protocol, ..Options::default() });
    let data = patterns();
    write_patterns(&c.nbd_url("alpha"), &data);
    c.ok("alpha", &["secondary", "r0"]);
    c.ok("beta", &["primary", "r0"]);
    let (ok, out) = check_patterns(&c.nbd_url("beta"), &data);
    assert!(ok, "protocol {protocol}: {out}");
}

#[test]
fn protocol_a_replicates() {
    replicates_with("A");
}

#[test]
fn protocol_b_replicates() {
    replicates_with("B");
}

#[test]
fn role_rules_are_enforced() {
    let c = Cluster::new(&["alpha", "beta"], Options::default());
    c.create_md_and_up();
    c.wait_for("alpha", "connection", |s| Cluster::peer(s, "beta")["connection"] == "Connected");
    // Fresh metadata is Inconsistent: promotion needs --force.
    let out = c.cli("alpha", &["primary", "r0"]);
    assert_eq!(out.status.code(), Some(11), "{}", common::text(&out.stderr));
    assert!(common::text(&out.stderr).contains("not UpToDate"));
    c.ok("alpha", &["primary", "--force", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    // Only one primary.
    let out = c.cli("beta", &["primary", "--force", "r0"]);
    assert_eq!(out.status.code(), Some(11));
    assert!(common::text(&out.stderr).contains("alpha is primary"), "{}", common::text(&out.stderr));
    // The secondary exports nothing.
    assert!(c.status("beta")["device"].is_null());
    // Demotion is refused while a client has the device open.
    let mut client = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &c.nbd_url("alpha")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    c.wait_for("alpha", "client connected", |s| s["nbd_clients"] == 1);
    let out = c.cli("alpha", &["secondary", "r0"]);
    assert_eq!(out.status.code(), Some(12), "{}", common::text(&out.stderr));
    assert!(common::text(&out.stderr).contains("in use by 1 NBD client"));
    drop(client.stdin.take());
    client.wait().unwrap();
    c.wait_for("alpha", "demotion after the client left", |_| c.cli("alpha", &["secondary", "r0"]).status.success());
    assert_eq!(c.status("alpha")["role"], "Secondary");
    assert!(c.status("alpha")["device"].is_null());
}

#[test]
fn skip_initial_sync_of_two_fresh_disks() {
    let c = Cluster::new(&["alpha", "beta"], Options::default());
    c.create_md_and_up();
    c.wait_connected("alpha", &["beta"]);
    c.ok("alpha", &["new-current-uuid", "--clear-bitmap", "r0"]);
    c.wait_for("beta", "UpToDate", |s| s["disk"] == "UpToDate");
    let alpha = c.wait_for("alpha", "UpToDate", |s| s["disk"] == "UpToDate");
    assert_eq!(Cluster::peer(&alpha, "beta")["out_of_sync_bytes"], 0);
    assert_eq!(alpha["generation_uuid"], c.status("beta")["generation_uuid"]);
    c.ok("alpha", &["primary", "r0"]);
    assert_eq!(Cluster::peer(&c.status("alpha"), "beta")["replication"], "Established");
}

/// Three fresh disks declared in sync: each secondary's declaration races the State of the
/// other, declared first, on another link. Until the rules took that race in hand, about one
/// declaration in nine ended in a full sync decided on a State from before a declaration, the
/// bitmap refused and links dropped. Each round declares new metadata on every node.
#[test]
fn skip_initial_sync_of_three_fresh_disks_drops_no_link_and_copies_nothing() {
    const ROUNDS: usize = 20;
    let nodes = ["alpha", "beta", "gamma"];
    let c = Cluster::new(&nodes, Options::default());
    c.create_md_and_up();
    for round in 0..ROUNDS {
        if round > 0 {
            for node in nodes {
                c.ok(node, &["down", "r0"]);
            }
            for node in nodes {
                c.ok(node, &["create-md", "--force", "r0"]);
                c.ok(node, &["up", "r0"]);
            }
        }
        c.wait_connected("alpha", &["beta", "gamma"]);
        c.wait_connected("beta", &["gamma"]);
        let marks = c.log_marks(&nodes);
        c.ok("alpha", &["new-current-uuid", "--clear-bitmap", "r0"]);
        c.wait_all_in_sync(&nodes);
        let generation = c.status("alpha")["generation_uuid"].clone();
        for node in nodes {
            assert_eq!(c.status(node)["generation_uuid"], generation, "round {round}: {node}'s generation");
        }
        let unwanted = ["connection lost", "resync needed", "resync started"];
        c.assert_logs_lack_since(&nodes, &marks, &unwanted, &format!("round {round}, after the declaration"));
    }
}

/// Planned switchovers of three data nodes: each primary in turn writes, steps down, and the
/// next one is promoted. The secondaries hold every write of the primary that stepped down, so
/// nothing is resynced between them and no link drops. (Each secondary heard the demotion on
/// its own link; the first to hear it was taken by the other for a node that lost the primary,
/// and the two resynced its last writes, often dropping a link on decisions taken on either
/// side of the demotion.)
#[test]
fn planned_switchovers_of_three_data_nodes_resync_nothing() {
    let nodes = ["alpha", "beta", "gamma"];
    let c = Cluster::new(&nodes, Options::default());
    c.create_md_and_up();
    c.wait_connected("alpha", &["beta", "gamma"]);
    c.wait_connected("beta", &["gamma"]);
    c.ok("alpha", &["new-current-uuid", "--clear-bitmap", "r0"]);
    c.wait_all_in_sync(&nodes);
    let marks = c.log_marks(&nodes);
    let mut written = Vec::new();
    for round in 0..6u8 {
        let primary = nodes[usize::from(round) % 3];
        c.ok(primary, &["primary", "r0"]);
        let pattern = (u64::from(round) * 5 * MIB, 5 * MIB, 0x70 + round);
        write_patterns(&c.nbd_url(primary), &[pattern]);
        written.push(pattern);
        c.ok(primary, &["secondary", "r0"]);
    }
    c.wait_all_in_sync(&nodes);
    c.assert_logs_lack_since(&nodes, &marks, &["connection lost", "resync started"], "over the switchovers");
    c.ok("gamma", &["primary", "r0"]);
    let (ok, out) = check_patterns(&c.nbd_url("gamma"), &written);
    assert!(ok, "the writes of every tenure, read through gamma: {out}");
}

#[test]
fn writes_larger_than_a_frame_replicate_without_reconnecting() {
    let c = synced_pair(Options::default());
    let generation = c.status("alpha")["generation_uuid"].clone();
    // qemu-io sends each of these as one NBD request; the wire carries at most 1 MiB a frame.
    let data = [(8 * MIB, 4 * MIB, 0x5a), (20 * MIB + 4096, 3 * MIB, 0x5b)];
    write_patterns(&c.nbd_url("alpha"), &data);
    let alpha = c.status("alpha");
    let beta = Cluster::peer(&alpha, "beta");
    assert_eq!(beta["connection"], "Connected");
    assert!(beta["last_error"].is_null(), "link dropped: {}", beta["last_error"]);
    assert_eq!(alpha["generation_uuid"], generation, "a lost link would have started a new generation\n{}", c.logs());
    c.ok("alpha", &["secondary", "r0"]);
    c.ok("beta", &["primary", "r0"]);
    let (ok, out) = check_patterns(&c.nbd_url("beta"), &data);
    assert!(ok, "large writes did not reach beta intact: {out}");
}

/// The two replicas' data areas are equal byte for byte (the metadata at the end of each disk
/// differs by nature); panics at the first byte that differs, with the daemons' logs.
#[test]
fn write_zeroes_and_discards_replicate_and_resync() {
    let c = synced_pair(Options::default());
    let url = c.nbd_url("alpha");
    write_patterns(&url, &[(0, 2 * MIB, 0x11), (4 * MIB, 2 * MIB, 0x22), (8 * MIB, MIB, 0x33)]);
    // Zeroes with and without FUA, a discard (a hole punched on each node's file), one larger
    // than a frame's data.
    let commands = ["write -z 256k 256k", "write -z -f 4M 512k", "discard 8M 256k", "write -z 12M 3M"].map(String::from);
    let (ok, out) = c.qemu_io("alpha", &commands);
    assert!(ok, "{out}");
    let expected = [(0, 256 << 10, 0x11), (256 << 10, 256 << 10, 0), (512 << 10, 1536 << 10, 0x11), (4 * MIB, 512 << 10, 0), (4 * MIB + (512 << 10), 1536 << 10, 0x22), (8 * MIB, 256 << 10, 0), (8 * MIB + (256 << 10), 768 << 10, 0x33), (12 * MIB, 3 * MIB, 0)];
    let (ok, out) = check_patterns(&url, &expected);
    assert!(ok, "alpha reads back something else: {out}");
    c.assert_data_equal("alpha", &["beta"], "zeroes and a discard replicated");

    // Zeroes and a discard while beta is away go to the bitmap and reach beta by resync.
    c.ok("beta", &["disconnect", "r0"]);
    c.wait_for("alpha", "beta gone", |s| Cluster::peer(s, "beta")["connection"] != "Connected");
    let (ok, out) = c.qemu_io("alpha", &["write -z 1M 512k", "discard 5M 512k"].map(String::from));
    assert!(ok, "{out}");
    assert_eq!(Cluster::peer(&c.status("alpha"), "beta")["out_of_sync_bytes"], MIB, "the zeroed blocks are marked for beta");
    c.ok("beta", &["connect", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    c.assert_data_equal("alpha", &["beta"], "zeroes and a discard resynced");
    c.ok("alpha", &["secondary", "r0"]);
    c.ok("beta", &["primary", "r0"]);
    let (ok, out) = check_patterns(&c.nbd_url("beta"), &[(MIB, 512 << 10, 0), (5 * MIB, 512 << 10, 0), (MIB + (512 << 10), 512 << 10, 0x11), (5 * MIB + (512 << 10), 512 << 10, 0x22)]);
    assert!(ok, "beta after the resync: {out}");
}

#[test]
fn secondary_crash_and_restart_resyncs_only_what_it_missed() {
    let c = synced_pair(Options { disk_mib: 256, ..Options::default() });
    c.kill("beta");
    c.wait_for("alpha", "beta gone", |s| Cluster::peer(s, "beta")["connection"] != "Connected");
    write_patterns(&c.nbd_url("alpha"), &[(100 * MIB, MIB, 0x99)]);
    assert_eq!(Cluster::peer(&c.status("alpha"), "beta")["out_of_sync_bytes"], MIB);

    c.ok("beta", &["up", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    // The restarted daemon counts from zero: everything it received is the resync.
    let moved = Cluster::peer(&c.status("beta"), "alpha")["received_bytes"].as_u64().unwrap();
    assert!((MIB..2 * MIB).contains(&moved), "resync after a secondary crash moved {moved} bytes for 1 MiB written");
    c.ok("alpha", &["secondary", "r0"]);
    c.ok("beta", &["primary", "r0"]);
    let (ok, out) = check_patterns(&c.nbd_url("beta"), &[(100 * MIB, MIB, 0x99)]);
    assert!(ok, "{out}");
}

#[test]
fn a_planned_stop_of_every_node_comes_back_in_sync_without_a_resync() {
    // The upgrade across a peer protocol version (OPERATIONS.md, "Upgrading"): demote, `down`
    // everywhere, `up` everywhere. The nodes were in sync when they stopped, so nothing moves.
    let c = synced_pair(Options { disk_mib: 256, ..Options::default() });
    let data = patterns();
    write_patterns(&c.nbd_url("alpha"), &data);
    c.ok("alpha", &["secondary", "r0"]);
    c.ok("alpha", &["down", "r0"]);
    c.ok("beta", &["down", "r0"]);
    c.ok("beta", &["up", "r0"]);
    c.ok("alpha", &["up", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    c.wait_peer("beta", "alpha", "Established", "UpToDate");
    // Both daemons count from zero: whatever either received since is a resync.
    assert_eq!(c.received("beta", "alpha"), 0, "beta was resynced after a clean stop");
    assert_eq!(c.received("alpha", "beta"), 0, "alpha was resynced after a clean stop\n{}", c.logs());
    c.ok("alpha", &["primary", "r0"]);
    let (ok, out) = check_patterns(&c.nbd_url("alpha"), &data);
    assert!(ok, "{out}");
}
