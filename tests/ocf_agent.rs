//! The Pacemaker resource agent (`scripts/ocf/blkrepl`) against real daemons on 127.0.0.1:
//! `ocf-tester` (Debian's resource-agents) runs every action on one node of a resource of two
//! data nodes and a witness, and the agent's monitor codes and refusals are checked state by
//! state. `BLKREPL_OCF_AGENT=PATH` tests an installed agent instead of the checkout's.

mod common;

use common::{Cluster, BIN};
use std::path::PathBuf;
use std::process::Command;

const OCF_SUCCESS: i32 = 0;
const OCF_ERR_GENERIC: i32 = 1;
const OCF_NOT_RUNNING: i32 = 7;
const OCF_RUNNING_PROMOTED: i32 = 8;

/// The agent under test: the checkout's, or the one the Debian package installed
/// (`BLKREPL_OCF_AGENT`, set by scripts/package-test.sh).
fn agent() -> PathBuf {
    std::env::var_os("BLKREPL_OCF_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/ocf/blkrepl"))
}

/// The agent's parameters for `node`, as Pacemaker passes them.
fn params(c: &Cluster, node: &str) -> Vec<(String, String)> {
    [
        ("resource", "r0".to_owned()),
        ("config_dir", c.config_dir().display().to_string()),
        ("run_dir", c.run_dir().display().to_string()),
        ("node", node.to_owned()),
        ("binary", BIN.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Runs one action of the agent; returns its exit code and output.
fn action(c: &Cluster, node: &str, name: &str) -> (i32, String) {
    let mut cmd = Command::new(agent());
    cmd.arg(name).env("OCF_ROOT", "/usr/lib/ocf").env("OCF_RESOURCE_INSTANCE", "blkrepl_r0");
    for (k, v) in params(c, node) {
        cmd.env(format!("OCF_RESKEY_{k}"), v);
    }
    let out = cmd.output().expect("the agent runs");
    (out.status.code().unwrap_or(-1), format!("{}{}", common::text(&out.stdout), common::text(&out.stderr)))
}

/// Three fresh nodes declared in sync, then alpha's daemon down: what Pacemaker finds before it
/// starts the clone on alpha.
fn cluster() -> Cluster {
    let c = Cluster::fresh_witness_trio();
    c.ok("alpha", &["down", "r0"]);
    c
}

#[test]
fn ocf_tester_passes_every_action() {
    let c = cluster();
    let mut cmd = Command::new("ocf-tester");
    cmd.args(["-n", "blkrepl_r0"]);
    for (k, v) in params(&c, "alpha") {
        cmd.arg("-o").arg(format!("{k}={v}"));
    }
    let out = cmd.arg(agent()).output().expect("ocf-tester (resource-agents) runs");
    let text = format!("{}{}", common::text(&out.stdout), common::text(&out.stderr));
    assert!(out.status.success(), "ocf-tester failed:\n{text}\n{}", c.logs());
    assert!(text.contains("passed all tests"), "{text}");
    // It ends with the resource stopped.
    assert_eq!(action(&c, "alpha", "monitor").0, OCF_NOT_RUNNING);
}

#[test]
fn monitor_reports_each_role_and_promotion_follows_quorum() {
    let c = cluster();
    assert_eq!(action(&c, "alpha", "monitor").0, OCF_NOT_RUNNING, "down");
    assert_eq!(action(&c, "alpha", "start").0, OCF_SUCCESS);
    assert_eq!(action(&c, "alpha", "start").0, OCF_SUCCESS, "start is idempotent");
    assert_eq!(action(&c, "alpha", "monitor").0, OCF_SUCCESS, "up, Secondary");
    c.wait_for("alpha", "peers", |s| s["quorum_votes"] == 3);
    assert_eq!(action(&c, "alpha", "promote").0, OCF_SUCCESS);
    assert_eq!(action(&c, "alpha", "monitor").0, OCF_RUNNING_PROMOTED, "Primary");
    assert_eq!(action(&c, "alpha", "demote").0, OCF_SUCCESS);
    assert_eq!(action(&c, "alpha", "monitor").0, OCF_SUCCESS);

    // Without quorum Pacemaker's promote is refused, with the daemon's reason, and nothing changes.
    c.kill("beta");
    c.kill("tie");
    c.wait_for("alpha", "quorum lost", |s| s["quorum"] == false);
    let (rc, out) = action(&c, "alpha", "promote");
    assert_eq!(rc, OCF_ERR_GENERIC, "{out}");
    assert!(out.contains("quorum"), "the refusal says why: {out}");
    assert_eq!(c.status("alpha")["role"], "Secondary");
    assert!(c.status("alpha")["promotion_score"].is_null());

    // A device in use cannot be demoted: the agent fails the demote and says by what.
    c.ok("beta", &["up", "r0"]);
    c.ok("tie", &["up", "r0"]);
    c.wait_for("alpha", "quorum back", |s| s["may_promote"] == true);
    assert_eq!(action(&c, "alpha", "promote").0, OCF_SUCCESS);
    let url = c.nbd_url("alpha");
    let mut client = Command::new("qemu-io")
        .args(["-f", "raw", &url])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    c.wait_for("alpha", "client connected", |s| s["nbd_clients"] == 1);
    let (rc, out) = action(&c, "alpha", "demote");
    assert_eq!(rc, OCF_ERR_GENERIC, "{out}");
    assert!(out.contains("NBD client"), "{out}");
    drop(client.stdin.take());
    client.wait().unwrap();
    c.wait_for("alpha", "client gone", |s| s["nbd_clients"] == 0);
    assert_eq!(action(&c, "alpha", "stop").0, OCF_SUCCESS, "stop demotes first");
    assert_eq!(action(&c, "alpha", "monitor").0, OCF_NOT_RUNNING);
    assert_eq!(action(&c, "alpha", "stop").0, OCF_SUCCESS, "stop is idempotent");

    // The primary's daemon dies: Pacemaker demotes the failed instance before it restarts it,
    // and a daemon that is gone holds no role to give up.
    assert_eq!(action(&c, "alpha", "start").0, OCF_SUCCESS);
    c.wait_for("alpha", "quorum", |s| s["may_promote"] == true);
    assert_eq!(action(&c, "alpha", "promote").0, OCF_SUCCESS);
    c.kill("alpha");
    assert_eq!(action(&c, "alpha", "monitor").0, OCF_NOT_RUNNING, "killed");
    let (rc, out) = action(&c, "alpha", "demote");
    assert_eq!(rc, OCF_SUCCESS, "{out}");
    assert!(out.contains("nothing to demote"), "{out}");
}

#[test]
fn a_missing_resource_file_is_a_configuration_error_and_probes_say_not_running() {
    let c = cluster();
    std::fs::remove_file(c.config_dir().join("r0.toml")).unwrap();
    let (rc, out) = action(&c, "alpha", "validate-all");
    assert_eq!(rc, 6, "OCF_ERR_CONFIGURED: {out}");
    assert!(out.contains("r0.toml"), "{out}");
    assert_eq!(action(&c, "alpha", "monitor").0, OCF_NOT_RUNNING);
    assert_eq!(action(&c, "alpha", "stop").0, OCF_SUCCESS);
}

/// A primary whose disk failed a write reports it in `status --json`: the agent's monitor says
/// "failed promoted" (9), so Pacemaker demotes it and recovers the service elsewhere. The
/// daemon's side (`local_write_failed` after an EIO) is `tests/engine_faults.rs`'s; here a
/// stand-in binary answers `status` with it.
#[test]
fn monitor_fails_a_primary_whose_disk_failed_a_write() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("r0.toml"), "").unwrap();
    let status = r#"{"resources":[{"role":"Primary","local_write_failed":"a local write at 8192+4096 failed (Io)","promotion_score":null}]}"#;
    let stub = dir.path().join("blkrepl");
    std::fs::write(&stub, format!("#!/bin/sh\necho '{status}'\n")).unwrap();
    std::fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = Command::new(agent())
        .arg("monitor")
        .env("OCF_ROOT", "/usr/lib/ocf")
        .env("OCF_RESOURCE_INSTANCE", "blkrepl_r0")
        .env("OCF_RESKEY_resource", "r0")
        .env("OCF_RESKEY_config_dir", dir.path())
        .env("OCF_RESKEY_run_dir", dir.path())
        .env("OCF_RESKEY_binary", &stub)
        .output()
        .expect("the agent runs");
    let said = format!("{}{}", common::text(&out.stdout), common::text(&out.stderr));
    assert_eq!(out.status.code(), Some(9), "{said}");
    assert!(said.contains("8192+4096"), "the reason reaches Pacemaker: {said}");
}
