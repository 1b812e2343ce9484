//! `[handlers]` against real daemons on 127.0.0.1: each handler fires on what it is for, with
//! the event as JSON on stdin and the `BLKREPL_*` environment; a handler that hangs is killed
//! after its timeout while writes go on; a missing command is logged and nothing else breaks;
//! a bad key in `[handlers]` is refused at `up`.

mod common;

use blkrepl::events::time::iso8601;
use common::{split_brain_pair, synced_pair, text, write_patterns, Cluster, Options};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

const MIB: u64 = 1 << 20;

/// One handler run as the recording script saw it.
#[derive(Debug, Clone)]
struct Record {
    handler: String,
    resource: String,
    node: String,
    /// `-` when the run has no peer; likewise below.
    peer: String,
    peer_node_id: String,
    recovered: String,
    /// What the handler read on stdin.
    event: Value,
}

/// A directory with `record.sh`, a handler that appends its environment and stdin to
/// `handlers.<node>` next to it.
struct Recorder {
    dir: tempfile::TempDir,
}

impl Recorder {
    fn new() -> Recorder {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("record.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\n\
             out=\"$(dirname \"$0\")/handlers.$BLKREPL_NODE\"\n\
             { printf 'env %s %s %s %s %s %s\\n' \"$BLKREPL_HANDLER\" \"$BLKREPL_RESOURCE\" \"$BLKREPL_NODE\" \
             \"${BLKREPL_PEER:--}\" \"${BLKREPL_PEER_NODE_ID:--}\" \"${BLKREPL_PEER_RECOVERED:--}\"; cat; } >> \"$out\"\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        Recorder { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A `[handlers]` section for `Options::extra`: `@REC@` is the recording script, `@DIR@` this
    /// directory. Leaked: the options want a static text, and a test makes one or two.
    fn section(&self, text: &str) -> &'static str {
        let text = text.replace("@REC@", &self.path("record.sh").display().to_string()).replace("@DIR@", &self.dir.path().display().to_string());
        Box::leak(format!("[handlers]\n{text}\n").into_boxed_str())
    }

    fn records(&self, node: &str) -> Vec<Record> {
        let text = std::fs::read_to_string(self.path(&format!("handlers.{node}"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines
            .chunks(2)
            .filter(|pair| pair.len() == 2)
            .map(|pair| {
                let env: Vec<&str> = pair[0].split(' ').collect();
                assert_eq!((env.len(), env[0]), (7, "env"), "a record starts with its environment: {pair:?}");
                let event = serde_json::from_str(pair[1]).unwrap_or_else(|e| panic!("stdin is not one JSON object ({e}): {}", pair[1]));
                Record {
                    handler: env[1].into(),
                    resource: env[2].into(),
                    node: env[3].into(),
                    peer: env[4].into(),
                    peer_node_id: env[5].into(),
                    recovered: env[6].into(),
                    event,
                }
            })
            .collect()
    }

    /// Waits until `node`'s records satisfy `done`; panics with them and the logs.
    fn wait(&self, c: &Cluster, node: &str, what: &str, done: impl Fn(&[Record]) -> bool) -> Vec<Record> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let records = self.records(node);
            if done(&records) {
                return records;
            }
            assert!(Instant::now() < deadline, "timed out waiting on {node} for {what}; records {records:#?}\n{}", c.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Waits until `node`'s daemon log has a line containing every one of `parts`; returns it.
fn wait_log(c: &Cluster, node: &str, parts: &[&str]) -> String {
    let log = c.run_dir().join(format!("r0.{node}.log"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return line.to_owned();
        }
        assert!(Instant::now() < deadline, "no line with {parts:?} in {node}'s log\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Gone, or a zombie whose parent is not ours to wait for.
fn wait_gone(pid: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z ")) {
        assert!(Instant::now() < deadline, "process {pid} of the hung handler survived its timeout");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn is(records: &[Record], handler: &str) -> Vec<Record> {
    records.iter().filter(|r| r.handler == handler).cloned().collect()
}

#[test]
fn quorum_lost_runs_when_the_witness_and_the_peer_go() {
    let rec = Recorder::new();
    let c = Cluster::witness_trio(Options { extra: rec.section("quorum-lost = \"@REC@\""), ..Options::default() });
    assert!(rec.records("alpha").is_empty(), "nothing was lost yet");
    c.kill("tie");
    c.kill("beta");
    let records = rec.wait(&c, "alpha", "quorum-lost", |r| !is(r, "quorum-lost").is_empty());
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    assert_eq!((r.resource.as_str(), r.node.as_str(), r.peer.as_str(), r.peer_node_id.as_str()), ("r0", "alpha", "-", "-"));
    let e = &r.event;
    assert_eq!((&e["handler"], &e["node"], &e["object"], &e["name"]), (&"quorum-lost".into(), &"alpha".into(), &"resource".into(), &"r0".into()), "{e}");
    assert_eq!((&e["action"], &e["quorum"], &e["role"]), (&"change".into(), &false.into(), &"Primary".into()), "{e}");
    assert!(e["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{e}");
}

#[test]
fn resync_target_handlers_run_in_order_on_the_node_that_resyncs() {
    let rec = Recorder::new();
    let section = rec.section("before-resync-target = \"@REC@\"\nafter-resync-target = \"@REC@\"");
    let c = synced_pair(Options { extra: section, ..Options::default() });
    // The initial full sync made beta a target already.
    let initial = rec.wait(&c, "beta", "the initial sync's handlers", |r| r.len() >= 2);
    c.ok("beta", &["disconnect", "r0"]);
    c.wait_for("alpha", "beta gone", |s| Cluster::peer(s, "beta")["connection"] != "Connected");
    write_patterns(&c.nbd_url("alpha"), &[(8 * MIB, 4 * MIB, 0x5A)]);
    c.ok("beta", &["connect", "r0"]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    c.wait_for("beta", "UpToDate", |s| s["disk"] == "UpToDate");
    let records = rec.wait(&c, "beta", "the resync's handlers", |r| r.len() >= 4);
    let names: Vec<&str> = records.iter().map(|r| r.handler.as_str()).collect();
    assert_eq!(names, ["before-resync-target", "after-resync-target", "before-resync-target", "after-resync-target"], "{initial:#?}");
    for r in &records {
        assert_eq!((r.resource.as_str(), r.node.as_str(), r.peer.as_str(), r.peer_node_id.as_str()), ("r0", "beta", "alpha", "0"), "{r:?}");
        assert_eq!((&r.event["object"], &r.event["conn_name"], &r.event["handler"]), (&"peer-device".into(), &"alpha".into(), &r.handler.clone().into()), "{r:?}");
    }
    assert_eq!(records[3].event["replication"], "Established", "after: the resync is over");
    assert!(rec.records("alpha").is_empty(), "alpha was the source, never a target: {:#?}", rec.records("alpha"));
}

#[test]
fn peer_unreachable_runs_when_a_peer_stays_away_and_again_when_it_is_back() {
    let rec = Recorder::new();
    let section = rec.section("peer-unreachable = \"@REC@\"\npeer_unreachable_after_s = 1");
    let c = synced_pair(Options { extra: section, ..Options::default() });
    let about_beta = |r: &Record, recovered: &str, since: &str| {
        r.handler == "peer-unreachable" && r.peer == "beta" && r.recovered == recovered && r.event["time"].as_str() >= Some(since)
    };
    let killed_at = iso8601(SystemTime::now());
    c.kill("beta");
    let records = rec.wait(&c, "alpha", "beta unreachable", |r| r.iter().any(|r| about_beta(r, "no", &killed_at)));
    let gone = records.iter().find(|r| about_beta(r, "no", &killed_at)).unwrap();
    assert_eq!((gone.node.as_str(), gone.peer_node_id.as_str()), ("alpha", "1"));
    assert_eq!((&gone.event["object"], &gone.event["conn_name"], &gone.event["recovered"]), (&"connection".into(), &"beta".into(), &false.into()));
    assert_ne!(gone.event["connection"], "Connected");
    let back_at = iso8601(SystemTime::now());
    c.ok("beta", &["up", "r0"]);
    let records = rec.wait(&c, "alpha", "beta recovered", |r| r.iter().any(|r| about_beta(r, "yes", &back_at)));
    let back = records.iter().find(|r| about_beta(r, "yes", &back_at)).unwrap();
    assert_eq!((&back.event["connection"], &back.event["recovered"]), (&"Connected".into(), &true.into()));
}

#[test]
fn a_handler_that_hangs_is_killed_after_its_timeout_while_writes_complete() {
    let rec = Recorder::new();
    let section = rec.section(
        "peer-unreachable = \"sleep 1000 & echo $$ $! > @DIR@/hung.pids; wait\"\npeer_unreachable_after_s = 1\nhandler_timeout_s = 1",
    );
    let c = Cluster::witness_trio(Options { extra: section, ..Options::default() });
    // tie goes: alpha keeps quorum with beta, and runs the handler, which hangs.
    c.kill("tie");
    let pids_file = rec.path("hung.pids");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&pids_file).is_ok_and(|t| t.ends_with('\n')) {
        assert!(Instant::now() < deadline, "the handler never started\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Writes through the primary complete, replicated to beta, with the handler running or killed.
    write_patterns(&c.nbd_url("alpha"), &[(0, MIB, 0x11)]);
    let line = wait_log(&c, "alpha", &["handler peer-unreachable failed", "still running after 1 s: killed"]);
    assert!(line.contains("\"tie\""), "the log names the peer: {line}");
    for pid in std::fs::read_to_string(&pids_file).unwrap().split_whitespace() {
        wait_gone(pid);
    }
    write_patterns(&c.nbd_url("alpha"), &[(MIB, MIB, 0x22)]);
    let alpha = c.wait_peer("alpha", "beta", "Established", "UpToDate");
    assert_eq!((alpha["quorum"].as_bool(), alpha["role"].as_str()), (Some(true), Some("Primary")));
}

#[test]
fn a_missing_handler_command_is_logged_and_nothing_else_breaks() {
    let rec = Recorder::new();
    let section = rec.section("before-resync-target = \"/nonexistent/blkrepl-handler\"\nafter-resync-target = \"@REC@\"");
    let c = synced_pair(Options { extra: section, ..Options::default() });
    let line = wait_log(&c, "beta", &["handler before-resync-target failed", "code 127 (the command was not found)"]);
    assert!(line.contains("/nonexistent/blkrepl-handler"), "the log shows the shell's complaint: {line}");
    // The next handler ran, and the resource works.
    rec.wait(&c, "beta", "after-resync-target", |r| !is(r, "after-resync-target").is_empty());
    write_patterns(&c.nbd_url("alpha"), &[(0, MIB, 0x33)]);
    c.wait_peer("alpha", "beta", "Established", "UpToDate");
    assert_eq!(c.status("beta")["disk"], "UpToDate");
}

#[test]
fn a_split_brain_runs_the_handler_on_both_nodes() {
    let rec = Recorder::new();
    let c = split_brain_pair(rec.section("split-brain = \"@REC@\""), MIB);
    assert!(rec.records("alpha").is_empty() && rec.records("beta").is_empty(), "no split brain before they meet");
    c.ok("alpha", &["connect", "r0"]);
    c.ok("beta", &["connect", "r0"]);
    for (node, peer, peer_id) in [("alpha", "beta", "1"), ("beta", "alpha", "0")] {
        let records = rec.wait(&c, node, "split-brain", |r| !r.is_empty());
        let r = &records[0];
        assert_eq!((r.handler.as_str(), r.node.as_str(), r.peer.as_str(), r.peer_node_id.as_str()), ("split-brain", node, peer, peer_id));
        assert_eq!((&r.event["object"], &r.event["connection"], &r.event["conn_name"]), (&"connection".into(), &"StandAlone".into(), &peer.into()));
        let status = c.status(node);
        assert_eq!(Cluster::peer(&status, peer)["split_brain"], true, "{status:#}");
    }
}

#[test]
fn a_bad_handlers_key_is_a_configuration_error_naming_it() {
    let c = Cluster::new(&["alpha", "beta"], Options { extra: "[handlers]\nquorum-lots = \"true\"", ..Options::default() });
    let out = c.cli("alpha", &["up", "r0"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(10), "{stderr}");
    assert!(stderr.contains("quorum-lots") && stderr.contains("r0.toml"), "{stderr}");
    assert!(!Path::new(&c.run_dir().join("r0.alpha.sock")).exists(), "no daemon started");
}
