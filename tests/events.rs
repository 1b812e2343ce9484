//! `blkrepl events` against real daemons on 127.0.0.1: the initial state and its marker, a
//! live stream through a promotion, a disconnect, a reconnect and its resync, a daemon going
//! away and coming back, a reader that stops reading, the caps and the errors.

mod common;

use common::{synced_pair, text, write_patterns, Cluster, Options, BIN};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// A running `blkrepl events ...` whose lines arrive on a channel.
struct Stream {
    child: Child,
    lines: Receiver<String>,
    /// Every line seen so far, for failure messages and order checks.
    seen: Vec<String>,
}

impl Stream {
    fn start(c: &Cluster, node: &str, args: &[&str]) -> Stream {
        let mut child = Command::new(BIN)
            .arg("--config-dir")
            .arg(c.config_dir())
            .arg("--run-dir")
            .arg(c.run_dir())
            .arg("--node")
            .arg(node)
            .arg("events")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Stream { child, lines, seen: Vec::new() }
    }

    /// Waits for the next line that satisfies `pred` (lines before it are kept in `seen`).
    fn expect(&mut self, c: &Cluster, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("no line for {what}; lines so far:\n{}\n{}", self.seen.join("\n"), c.logs()),
            }
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json_lines(out: &str) -> Vec<Value> {
    out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

#[test]
fn events_now_json_lists_the_state_of_a_synced_pair_and_ends_with_the_marker() {
    let c = synced_pair(Options::default());
    let out = c.ok("alpha", &["events", "--now", "--json", "r0"]);
    let events = json_lines(&out);
    let objects: Vec<&str> = events.iter().map(|e| e["object"].as_str().unwrap()).collect();
    assert_eq!(objects, ["resource", "connection", "device", "peer-device", "-"], "{out}");
    assert!(events.iter().all(|e| e["action"] == "exists" && e["time"].as_str().is_some_and(|t| t.ends_with('Z'))), "{out}");
    let (resource, connection, device, peer_device) = (&events[0], &events[1], &events[2], &events[3]);
    assert_eq!(resource["name"], "r0");
    assert_eq!(resource["role"], "Primary");
    assert_eq!(resource["suspended"], "no");
    assert_eq!(resource["quorum"], true);
    assert_eq!(resource["may_promote"], false, "already primary");
    assert_eq!(connection["peer_node_id"], 1);
    assert_eq!(connection["conn_name"], "beta");
    assert_eq!(connection["connection"], "Connected");
    assert_eq!(connection["role"], "Secondary");
    assert_eq!(device["disk"], "UpToDate");
    assert_eq!(device["export"], c.nbd_url("alpha"));
    assert_eq!(device["io"], "serving");
    assert_eq!(device["write_failed"], false);
    assert_eq!(peer_device["replication"], "Established");
    assert_eq!(peer_device["peer_disk"], "UpToDate");
    assert_eq!(peer_device["out_of_sync_kib"], 0);
    assert_eq!(peer_device["done"], Value::Null);
    assert!(peer_device.get("sent_kib").is_none(), "statistics only when asked for: {peer_device}");

    // The text form, on the other node, every resource of the config directory, timestamped.
    let out = c.ok("beta", &["events", "--now", "--timestamps"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    for line in &lines {
        let (time, rest) = line.split_once(' ').unwrap();
        assert!(time.len() == 24 && time.as_bytes()[10] == b'T' && time.ends_with('Z'), "{line}");
        assert!(rest.starts_with("exists "), "{line}");
    }
    assert!(lines[0].ends_with("exists resource name:r0 role:Secondary suspended:no quorum:yes may-promote:no promotion-score:none"), "{out}");
    assert!(lines[1].ends_with("exists connection name:r0 peer-node-id:0 conn-name:alpha connection:Connected role:Primary"), "{out}");
    assert!(lines[2].ends_with("exists device name:r0 disk:UpToDate write-failed:no"), "{out}");
    assert!(
        lines[3].ends_with("exists peer-device name:r0 peer-node-id:0 conn-name:alpha replication:Established peer-disk:UpToDate out-of-sync:0"),
        "{out}"
    );
    assert!(lines[4].ends_with(" exists -"), "{out}");

    let out = c.ok("alpha", &["events", "--now", "--statistics", "r0"]);
    assert!(out.lines().nth(3).is_some_and(|l| l.contains(" sent:") && l.contains(" received:")), "{out}");
}

#[test]
fn a_stream_shows_a_promotion_a_disconnect_a_reconnect_and_its_resync_in_order() {
    // A slow resync (8 MiB/s) so that its progress shows (bits clear in steps of 8 MiB, as
    // barrier acks return); fresh disks declared in sync so that no initial copy runs at that
    // pace.
    let c = Cluster::new(&["alpha", "beta"], Options { extra: "resync_rate_max_kib = 8192", ..Options::default() });
    c.create_md_and_up();
    c.wait_connected("alpha", &["beta"]);
    c.ok("alpha", &["new-current-uuid", "--clear-bitmap", "r0"]);
    c.wait_for("alpha", "UpToDate", |s| s["disk"] == "UpToDate" && Cluster::peer(s, "beta")["peer_disk"] == "UpToDate");

    let mut s = Stream::start(&c, "alpha", &["r0"]);
    s.expect(&c, "the marker", |l| l == "exists -");
    assert!(s.seen.iter().take(4).all(|l| l.starts_with("exists ")), "{:?}", s.seen);

    c.ok("alpha", &["primary", "r0"]);
    s.expect(&c, "the promotion", |l| l.starts_with("change resource name:r0 role:Primary "));
    s.expect(&c, "the export", |l| l.starts_with("change device name:r0 disk:UpToDate export:nbd://"));

    c.ok("alpha", &["disconnect", "r0"]);
    s.expect(&c, "the disconnect", |l| l.starts_with("change connection name:r0 peer-node-id:1 conn-name:beta connection:StandAlone"));
    write_patterns(&c.nbd_url("alpha"), &[(0, 32 * MIB, 0x5a)]);
    s.expect(&c, "the writes beta misses", |l| {
        l.starts_with("change peer-device name:r0 peer-node-id:1 conn-name:beta replication:Off") && l.contains(" out-of-sync:32768")
    });

    c.ok("alpha", &["connect", "r0"]);
    s.expect(&c, "the reconnect", |l| l.starts_with("change connection name:r0 peer-node-id:1 conn-name:beta connection:Connected"));
    let start = s.expect(&c, "the resync's start", |l| l.contains(" replication:SyncSource "));
    assert!(start.starts_with("change peer-device name:r0 peer-node-id:1 conn-name:beta replication:SyncSource"), "{start}");
    // The resync takes seconds: the human status shows its progress bar meanwhile.
    let human = c.ok("alpha", &["status", "--verbose", "--statistics", "r0"]);
    assert!(human.contains("replication:SyncSource"), "the resync ended within a status call: {human}");
    let bar = human.lines().find(|l| l.trim_start().starts_with('[')).unwrap_or_else(|| panic!("no progress bar: {human}"));
    assert!(bar.contains("] sync'ed: ") && bar.contains("/32768)K finish: ") && bar.contains(" K/sec"), "{bar}");
    assert!(human.contains("resync-done:") && human.contains("resync-total:32768KiB"), "{human}");
    assert!(human.contains(" unwritten:0KiB"), "a sync source holds none of its target's stream: {human}");
    let end = s.expect(&c, "the resync's end", |l| {
        l.starts_with("change peer-device ") && l.contains(" replication:Established peer-disk:UpToDate out-of-sync:0")
    });
    assert!(!end.contains(" done:"), "{end}");

    // Progress in between: several values, never going down, some strictly between the ends.
    let from = s.seen.iter().position(|l| *l == start).unwrap();
    let done: Vec<f64> = s.seen[from..]
        .iter()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("done:")).map(|d| d.parse().unwrap()))
        .collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "progress went down: {done:?}");
    assert!(done.iter().filter(|&&d| d > 0.0 && d < 100.0).count() >= 2, "too little progress shown: {done:?}\n{}\n{}", s.seen.join("\n"), c.logs());
    let human = c.ok("alpha", &["status", "--verbose", "--statistics", "r0"]);
    assert!(human.contains("node-id:0 generation:") && human.contains("device-io: serving") && human.contains("size:"), "{human}");
    assert!(!human.contains("sync'ed:"), "{human}");
}

#[test]
fn a_daemon_that_goes_away_is_destroyed_and_created_again_when_it_returns() {
    let c = Cluster::new(&["alpha", "beta"], Options::default());
    for node in &c.nodes {
        c.ok(node, &["create-md", "r0"]);
    }
    // Not running yet: no line but the marker, then its objects are created.
    let mut s = Stream::start(&c, "alpha", &["--json"]);
    let marker: Value = serde_json::from_str(&s.expect(&c, "the marker", |_| true)).unwrap();
    assert_eq!((marker["action"].as_str(), marker["object"].as_str()), (Some("exists"), Some("-")));
    c.ok("alpha", &["up", "r0"]);
    let created = s.expect(&c, "the resource created", |l| l.contains("\"object\":\"resource\""));
    assert!(created.contains("\"action\":\"create\""), "{created}");
    s.expect(&c, "its peer device created", |l| l.contains("\"action\":\"create\"") && l.contains("\"object\":\"peer-device\""));

    c.kill("alpha");
    let first = s.expect(&c, "a destroy", |l| l.contains("\"action\":\"destroy\""));
    assert!(first.contains("\"object\":\"peer-device\""), "destroyed last listed first: {first}");
    s.expect(&c, "the resource destroyed", |l| l.contains("\"action\":\"destroy\"") && l.contains("\"object\":\"resource\""));

    c.ok("alpha", &["up", "r0"]);
    s.expect(&c, "the resource back", |l| l.contains("\"action\":\"create\"") && l.contains("\"object\":\"resource\""));
}

#[test]
fn a_reader_that_stops_reading_is_dropped_without_stalling_writes() {
    let c = synced_pair(Options::default());
    // Asks for the statistics (a line at every sample with writes) and never reads.
    let mut stalled = UnixStream::connect(c.run_dir().join("r0.alpha.sock")).unwrap();
    stalled.write_all(b"{\"command\":\"events\",\"statistics\":true}\n").unwrap();

    let log = c.run_dir().join("r0.alpha.log");
    let dropped = || text(&std::fs::read(&log).unwrap()).contains("events subscriber stopped reading");
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut offset = 0;
    while !dropped() {
        assert!(Instant::now() < deadline, "the stalled reader was never dropped\n{}", c.logs());
        let started = Instant::now();
        write_patterns(&c.nbd_url("alpha"), &[(offset % (32 * MIB), MIB, (offset / MIB) as u8)]);
        assert!(started.elapsed() < Duration::from_secs(10), "a 1 MiB write took {:?}", started.elapsed());
        assert_eq!(c.status("alpha")["role"], "Primary");
        offset += MIB;
    }
    // The daemon closed its end: what was buffered, then the end of the stream.
    stalled.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    stalled.read_to_end(&mut rest).expect("the daemon closes the stream of a reader it dropped");
    assert!(text(&rest).starts_with("{\"error\":null"), "{}", text(&rest));
    // Writes and the other clients carry on.
    write_patterns(&c.nbd_url("alpha"), &[(40 * MIB, MIB, 0x77)]);
    let out = c.ok("alpha", &["events", "--now", "r0"]);
    assert!(out.ends_with("exists -\n"), "{out}");
}

#[test]
fn streams_beyond_the_cap_are_refused_and_commands_still_served() {
    let c = synced_pair(Options::default());
    let socket = c.run_dir().join("r0.alpha.sock");
    let mut open = Vec::new();
    for _ in 0..8 {
        let mut stream = UnixStream::connect(&socket).unwrap();
        stream.write_all(b"{\"command\":\"events\",\"statistics\":false}\n").unwrap();
        let mut reader = BufReader::new(stream);
        let mut response = String::new();
        reader.read_line(&mut response).unwrap();
        assert!(response.starts_with("{\"error\":null"), "{response}");
        open.push(reader);
    }
    let out = c.cli("alpha", &["events", "--now", "r0"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("too many events streams (8 open)"), "{}", text(&out.stderr));
    assert_eq!(c.status("alpha")["role"], "Primary", "commands are served beside the streams");
    c.ok("alpha", &["disconnect", "r0"]);
    c.ok("alpha", &["connect", "r0"]);

    drop(open.pop());
    // The daemon notices the closed stream within a sample.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = c.cli("alpha", &["events", "--now", "r0"]);
        if out.status.success() {
            assert!(text(&out.stdout).ends_with("exists -\n"));
            break;
        }
        assert!(Instant::now() < deadline, "a stream place never came free: {}", text(&out.stderr));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn events_for_an_unknown_or_stopped_resource_fail_clearly() {
    let c = Cluster::new(&["alpha", "beta"], Options::default());
    let out = c.cli("alpha", &["events", "nosuch"]);
    assert_eq!(out.status.code(), Some(10), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("nosuch.toml"), "{}", text(&out.stderr));

    let out = c.cli("alpha", &["events", "--now", "r0"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("r0 is not up on node alpha"), "{}", text(&out.stderr));

    // Every resource, none running: the marker alone.
    assert_eq!(c.ok("alpha", &["events", "--now"]), "exists -\n");
}
