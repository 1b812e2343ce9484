//! Real daemons in network namespaces (root only): partitions that drop packets silently, as a
//! failed switch port does, instead of the clean resets of killed processes on loopback.
//! Two data nodes and a diskless witness under quorum "majority", and three data nodes where
//! the primary, or one link alone, fails.

mod common;

use common::nbd_client::{NbdClient, Outcome};
use common::{netns, Cluster, Options};
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// alpha Primary, beta UpToDate, witness `tie`; each in its own namespace.
fn trio(extra: &'static str) -> Option<Cluster> {
    netns::usable().then(|| Cluster::witness_trio(Options { netns: true, disk_mib: 128, extra, ..Options::default() }))
}

#[test]
fn a_partitioned_primary_stops_the_majority_promotes_and_the_heal_needs_no_operator() {
    let Some(c) = trio("") else { return };
    let before = vec![(0, MIB, 0x11), (20 * MIB, 256 << 10, 0x12)];
    c.write("alpha", &before);
    let generation_before = c.status("alpha")["generation_uuid"].as_str().unwrap().to_owned();

    c.isolate("alpha");
    // Clients keep writing on the isolated primary: nothing may be acknowledged. The first write
    // may start while alpha's lease still holds (it then reaches alpha's disk only); the second
    // starts once quorum is lost and must not reach any disk.
    let writer = |command: &str| {
        let (ns, url, command) = (c.ns("alpha").unwrap(), c.nbd_url("alpha"), command.to_owned());
        std::thread::spawn(move || {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &ns, "qemu-io", "-f", "raw", "-t", "writeback", &url])
                .args(["-c", &command, "-c", "flush"])
                .output()
                .unwrap();
            (out.status.success(), format!("{}{}", common::text(&out.stdout), common::text(&out.stderr)))
        })
    };
    let early = writer("write -P 0x66 0 1M");
    c.wait_for("alpha", "quorum lost", |s| s["quorum"] == false);
    let late = writer("write -P 0x67 2M 1M");
    c.wait_for("alpha", "both writes held", |s| s["suspended_writes"].as_u64() >= Some(2));
    c.wait_for("beta", "may promote", |s| s["may_promote"] == true);
    c.ok("beta", &["primary", "r0"]);
    let after = vec![(40 * MIB, MIB, 0x22)];
    c.write("beta", &after);
    let alpha = c.status("alpha");
    assert!(!early.is_finished() && !late.is_finished(), "the isolated primary acknowledged a write");
    assert_eq!((alpha["role"].as_str(), alpha["quorum"].as_bool()), (Some("Primary"), Some(false)));
    // Without quorum it started no generation of its own: the new primary's history holds its.
    assert_eq!(alpha["generation_uuid"].as_str(), Some(generation_before.as_str()), "a new generation without quorum");
    let held_block = c.data_of("alpha", 3 * MIB).split_off(2 * MIB as usize);
    assert!(held_block.iter().all(|b| *b == 0), "a write held without quorum reached the isolated primary's disk");

    // Heal: alpha learns (directly or through the witness) that beta was promoted. It fails the
    // write it held, steps down to Secondary by itself and resyncs from beta: no split brain,
    // no operator command.
    c.heal("alpha");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !(early.is_finished() && late.is_finished()) {
        assert!(std::time::Instant::now() < deadline, "the old primary still holds writes after the heal\n{}", c.logs());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for w in [early, late] {
        let (ok, out) = w.join().unwrap();
        assert!(!ok, "the old primary acknowledged a write after the heal: {out}");
    }
    let alpha = c.wait_for("alpha", "stepped down", |s| s["role"] == "Secondary");
    assert!(alpha["stepped_down"].as_str().is_some_and(|why| why.contains("beta")), "status says why: {alpha}");
    c.wait_peer("beta", "alpha", "Established", "UpToDate");
    c.wait_for("alpha", "resynced", |s| s["disk"] == "UpToDate");
    let beta = c.status("beta");
    assert_eq!(beta["role"], "Primary", "{}", c.logs());
    assert!(beta["peers"].as_array().unwrap().iter().all(|p| p["last_error"].as_str().is_none_or(|e| !e.contains("split brain"))), "{beta}");
    // beta kept serving throughout: a write after the heal completes at once.
    let later = vec![(60 * MIB, MIB, 0x23)];
    c.write("beta", &later);
    // What alpha held or wrote alone is gone everywhere (2 MiB..3 MiB reads back as zeroes).
    let all = [before, after, later, vec![(2 * MIB, MIB, 0)]].concat();
    let (ok, out) = c.check("beta", &all);
    assert!(ok, "an acknowledged write is missing on the primary: {out}");
    // And alpha holds the same bytes: a switchover to it loses nothing.
    c.wait_peer("beta", "alpha", "Established", "UpToDate");
    c.ok("beta", &["secondary", "r0"]);
    c.wait_for("alpha", "may promote", |s| s["may_promote"] == true);
    c.ok("alpha", &["primary", "r0"]);
    let (ok, out) = c.check("alpha", &all);
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

    // Secondary crash: the 2 MiB written meanwhile move, and the activity-log extent of the
    // last write beta applied (4 MiB at 0): the write a secondary applied last may be one no
    // other node got, so its hot extents are resynced wherever it reconnects (seed 12660).
    // (The restarted daemon counts received bytes from zero.)
    c.kill("beta");
    c.write("alpha", &[(8 * MIB, 2 * MIB, 0x32)]);
    c.ok("beta", &["up", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    let moved = c.received("beta", "alpha");
    assert!((2 * MIB..=6 * MIB).contains(&moved), "secondary crash moved {moved} bytes for 2 MiB written and one hot extent");

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
    assert!((MIB..=MIB + 4 * 4 * MIB).contains(&moved), "crashed primary resynced {moved} bytes");
    let (ok, out) = c.check("beta", &[(0, MIB, 0x31), (8 * MIB, 2 * MIB, 0x32), (60 * MIB, 4096, 0x33), (100 * MIB, MIB, 0x34)]);
    assert!(ok, "{out}");
}

/// Three data nodes: the primary drops off the network silently while a client writes to it.
/// The two others hold the majority, one is promoted and writes on; at the heal the old primary
/// fails what it held, steps down and is resynced, and every node ends showing every other
/// in sync, with nothing recorded out of sync (a copy shown UpToDate must hold what this node
/// holds) and the same bytes on all three disks.
#[test]
fn three_data_nodes_heal_a_silently_isolated_primary_into_one_primary_and_three_equal_copies() {
    if !netns::usable() {
        return;
    }
    let nodes = ["alpha", "beta", "gamma"];
    let c = Cluster::new(&nodes, Options { netns: true, quorum: "majority", ..Options::default() });
    c.create_md_and_up();
    c.wait_connected("alpha", &["beta", "gamma"]);
    c.ok("alpha", &["primary", "--force", "r0"]);
    c.wait_all_in_sync(&nodes);
    let before = (0, MIB, 0x41);
    c.write("alpha", &[before]);

    c.isolate("alpha");
    let held = {
        let (ns, url) = (c.ns("alpha").unwrap(), c.nbd_url("alpha"));
        std::thread::spawn(move || {
            std::process::Command::new("ip")
                .args(["netns", "exec", &ns, "qemu-io", "-f", "raw", "-t", "writeback", &url])
                .args(["-c", "write -P 0x42 4M 1M", "-c", "flush"])
                .output()
                .unwrap()
        })
    };
    c.wait_for("alpha", "quorum lost", |s| s["quorum"] == false);
    c.wait_for("beta", "may promote", |s| s["may_promote"] == true);
    c.ok("beta", &["primary", "r0"]);
    let after = (8 * MIB, 2 * MIB, 0x43);
    c.write("beta", &[after]);
    assert!(!held.is_finished(), "the isolated primary acknowledged a write");

    c.heal("alpha");
    let out = held.join().unwrap();
    assert!(!out.status.success(), "the old primary acknowledged a write after the heal: {}", common::text(&out.stdout));
    c.wait_for("alpha", "stepped down", |s| s["role"] == "Secondary");
    c.wait_all_in_sync(&nodes);
    let primaries: Vec<&str> = nodes.iter().copied().filter(|n| c.status(n)["role"] == "Primary").collect();
    assert_eq!(primaries, ["beta"], "{}", c.logs());
    // What alpha held is gone everywhere: 4 MiB..5 MiB reads back as zeroes.
    let (ok, out) = c.check("beta", &[before, after, (4 * MIB, MIB, 0)]);
    assert!(ok, "{out}");
    c.assert_data_equal("beta", &["alpha", "gamma"], "after the heal");
}

/// One link alone fails: the primary loses a peer that its other secondary still reaches. That
/// secondary follows the primary into the generation it starts without the peer and records
/// the writes it applies for the peer, and does not resync it while the primary writes (only
/// a primary resyncs a node that sees it, here through the secondary). Once the primary steps
/// down, the secondary resyncs the peer over the link they kept, the cut one still down.
#[test]
fn secondaries_resync_what_they_recorded_for_each_other_once_no_one_is_primary() {
    if !netns::usable() {
        return;
    }
    let c = Cluster::new(&["alpha", "beta", "gamma"], Options { netns: true, quorum: "majority", ..Options::default() });
    c.create_md_and_up();
    c.wait_connected("alpha", &["beta", "gamma"]);
    c.ok("alpha", &["primary", "--force", "r0"]);
    // alpha resynced both at once: neither keeps for the other what both got from alpha.
    c.wait_all_in_sync(&["alpha", "beta", "gamma"]);

    c.cut("alpha", "gamma");
    let gone = |s: &serde_json::Value| Cluster::peer(s, "gamma")["connection"] != "Connected";
    c.wait_for("alpha", "gamma cut off", gone);
    let written = (8 * MIB, 2 * MIB, 0x5a);
    c.write("alpha", &[written]);
    // beta applies alpha's writes and records them for gamma, which no longer follows alpha
    // (alpha itself started a generation without gamma).
    let tracked = |s: &serde_json::Value| Cluster::peer(s, "gamma")["out_of_sync_bytes"].as_u64() >= Some(2 * MIB);
    c.wait_for("beta", "writes recorded for gamma", tracked);
    assert_eq!(Cluster::peer(&c.status("beta"), "gamma")["replication"], "Established", "beta and gamma stay linked");

    c.ok("alpha", &["secondary", "r0"]);
    c.wait_for("beta", "gamma resynced", |s| {
        let gamma = Cluster::peer(s, "gamma");
        gamma["replication"] == "Established" && gamma["out_of_sync_bytes"] == 0
    });
    c.wait_for("gamma", "UpToDate", |s| s["disk"] == "UpToDate");
    c.assert_data_equal("beta", &["gamma"], "gamma given what beta recorded for it");
    let (offset, len, byte) = written;
    assert!(c.data_of("gamma", offset + len)[offset as usize..].iter().all(|b| *b == byte), "the write reached gamma");
    assert_ne!(Cluster::peer(&c.status("gamma"), "alpha")["connection"], "Connected", "the cut held: beta was the source");
    c.mend("alpha", "gamma");
    c.wait_peer("alpha", "gamma", "Established", "UpToDate");
}

/// `on_suspended_primary_outdated = "disconnect"`: the old primary does not step down; it fails
/// what it holds and goes StandAlone, so the new primary does not wait for it, until an operator
/// demotes and reconnects it.
#[test]
fn an_old_primary_told_to_disconnect_goes_stand_alone_and_the_new_one_keeps_writing() {
    let Some(c) = trio("on_suspended_primary_outdated = \"disconnect\"") else { return };
    c.write("alpha", &[(0, MIB, 0x41)]);
    c.isolate("alpha");
    c.wait_for("alpha", "quorum lost", |s| s["quorum"] == false);
    let (ns, url) = (c.ns("alpha").unwrap(), c.nbd_url("alpha"));
    let held = std::thread::spawn(move || {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "qemu-io", "-f", "raw", "-t", "writeback", &url, "-c", "write -P 0x42 4M 64k", "-c", "flush"])
            .output()
            .unwrap();
        out.status.success()
    });
    c.wait_for("alpha", "the write held", |s| s["suspended_writes"].as_u64() >= Some(1));
    c.wait_for("beta", "may promote", |s| s["may_promote"] == true);
    c.ok("beta", &["primary", "r0"]);
    c.heal("alpha");
    assert!(!held.join().unwrap(), "the old primary acknowledged a write it held");
    let alpha = c.wait_for("alpha", "StandAlone", |s| {
        s["peers"].as_array().unwrap().iter().all(|p| p["connection"] == "StandAlone")
    });
    assert_eq!(alpha["role"], "Primary", "disconnect keeps it primary: {alpha}");
    let (ok, out) = c.qemu_io("alpha", &["write -P 0x44 4M 64k".into()]);
    assert!(!ok, "a superseded primary accepted a write: {out}");
    // beta does not wait for it: writes complete.
    c.write("beta", &[(8 * MIB, MIB, 0x43)]);
    c.ok("alpha", &["secondary", "r0"]);
    c.ok("alpha", &["connect", "r0"]);
    c.wait_peer("beta", "alpha", "Established", "UpToDate");
    let (ok, out) = c.check("beta", &[(0, MIB, 0x41), (4 * MIB, 64 << 10, 0), (8 * MIB, MIB, 0x43)]);
    assert!(ok, "{out}");
}

/// Anyone who reaches the replication port can open connections. A flood of idle ones from
/// one address (the clients', a thousand opened and reopened as the daemon closes them) must
/// not keep a real peer out, nor cost the daemon a thread and a descriptor each: beta
/// reconnects to alpha meanwhile, and writes through alpha reach beta's disk.
#[test]
fn a_flood_of_idle_connections_does_not_keep_a_peer_out() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let Some(c) = trio("") else { return };
    let (stop, opened) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let target: std::net::SocketAddr = format!("{}:7789", netns::Net::address(0)).parse().unwrap();
    let client_ns = format!("/var/run/netns/{}", c.net.as_ref().unwrap().client_ns());
    let flood = {
        let (stop, opened) = (stop.clone(), opened.clone());
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&client_ns).unwrap();
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let mut open = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                open.retain(open_and_idle);
                while open.len() < 1000 && !stop.load(Ordering::Relaxed) {
                    let Ok(s) = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)) else { break };
                    s.set_nonblocking(true).unwrap();
                    open.push(s);
                    opened.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while opened.load(Ordering::Relaxed) < 1000 {
        assert!(Instant::now() < deadline, "the flood opened only {} connections", opened.load(Ordering::Relaxed));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(c.logs().contains("closing unauthenticated connections at once"), "{}", c.logs());
    let fds = std::fs::read_dir(format!("/proc/{}/fd", c.pid("alpha"))).unwrap().count();
    assert!(fds < 200, "alpha holds {fds} file descriptors under the flood");
    c.ok("beta", &["disconnect", "r0"]);
    c.wait_for("alpha", "beta gone", |s| common::Cluster::peer(s, "beta")["connection"] != "Connected");
    c.ok("beta", &["connect", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    c.write("alpha", &[(4 * MIB, MIB, 0x5a)]);
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    let beta = c.data_of("beta", 5 * MIB);
    assert!(beta[4 * MIB as usize..].iter().all(|b| *b == 0x5a), "the write did not reach beta");
}

/// Whether a non-blocking socket is still open with nothing to read.
fn open_and_idle(s: &std::net::TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(s.peek(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[test]
fn a_client_whose_network_vanished_is_let_go_and_the_primary_can_step_down() {
    // A cluster manager demotes a primary whose NBD clients are gone; one whose host lost power
    // says nothing (no FIN, no reset), and without keepalive probes it would hold the export,
    // and so the primary, for ever.
    let Some(c) = trio("") else { return };
    let net = c.net.as_ref().unwrap();
    let address = c.nbd_address("alpha");
    let mut client = net.as_client(|| NbdClient::connect(address, "r0", Duration::from_secs(10)).expect("connect to alpha's export"));
    let outcome = client.write(0, &[0x5a; 4096]);
    assert!(matches!(outcome, Outcome::Answered(0)), "{outcome:?}");
    assert_eq!(c.status("alpha")["nbd_clients"], 1);

    net.cut_clients();
    let refused = c.cli("alpha", &["secondary", "r0"]);
    assert_eq!(refused.status.code(), Some(12), "demoted under a client that may still be there");
    assert!(common::text(&refused.stderr).contains("1 NBD client"), "{}", common::text(&refused.stderr));
    c.wait_for("alpha", "the silent client given up", |s| s["nbd_clients"] == 0);
    let log = std::fs::read_to_string(c.run_dir().join("r0.alpha.log")).unwrap();
    assert!(log.contains("NBD client stopped answering"), "alpha says why it let the client go\n{}", c.logs());
    c.ok("alpha", &["secondary", "r0"]);
    c.ok("beta", &["primary", "r0"]);
    net.mend_clients();
    let (ok, out) = c.check("beta", &[(0, 4096, 0x5a)]);
    assert!(ok, "the client's acknowledged write on beta: {out}");
}
