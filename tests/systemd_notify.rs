//! `Type=notify` without systemd: the test plays the service manager, a Unix datagram socket
//! named in `NOTIFY_SOCKET`, and starts `up --foreground` as the unit's ExecStart does.

mod common;

use common::{Cluster, Options, BIN};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The next notification, as its `KEY=VALUE` lines.
fn next(systemd: &UnixDatagram, c: &Cluster) -> Vec<String> {
    let mut buf = [0u8; 4096];
    let n = systemd.recv(&mut buf).unwrap_or_else(|e| panic!("no notification from the daemon ({e})\n{}", c.logs()));
    String::from_utf8_lossy(&buf[..n]).lines().map(str::to_owned).collect()
}

/// Node alpha of a fresh pair, its metadata created, and a socket for it to notify.
fn alpha_and_socket() -> (Cluster, UnixDatagram, PathBuf) {
    let c = Cluster::new(&["alpha", "beta"], Options::default());
    c.ok("alpha", &["create-md", "r0"]);
    let path = c.dir.path().join("notify");
    let systemd = UnixDatagram::bind(&path).unwrap();
    systemd.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    (c, systemd, path)
}

/// `blkrepl ARGS` on alpha with `NOTIFY_SOCKET` naming `socket`.
fn blkrepl_notifying(c: &Cluster, socket: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config-dir").arg(c.config_dir()).arg("--run-dir").arg(c.run_dir()).args(["--node", "alpha"]);
    cmd.args(args).env("NOTIFY_SOCKET", socket).stdin(Stdio::null());
    cmd
}

/// Alpha run as the unit runs it (`up --foreground`); its log goes where `Cluster::logs` reads.
fn started_by_systemd() -> (Cluster, UnixDatagram, Child) {
    let (c, systemd, path) = alpha_and_socket();
    std::fs::create_dir_all(c.run_dir()).unwrap();
    let log = std::fs::File::create(c.run_dir().join("r0.alpha.log")).unwrap();
    let daemon = blkrepl_notifying(&c, &path, &["up", "--foreground", "r0"]).stderr(log).spawn().unwrap();
    (c, systemd, daemon)
}

/// Waits for STOPPING=1 (status lines may come first), then for a clean exit.
fn stops_cleanly(c: &Cluster, systemd: &UnixDatagram, mut daemon: Child) {
    let stopping = std::iter::repeat_with(|| next(systemd, c)).find(|m| m.contains(&"STOPPING=1".to_owned()));
    assert!(stopping.is_some());
    assert!(daemon.wait().unwrap().success(), "{}", c.logs());
}

#[test]
fn ready_once_the_control_socket_answers_and_stopping_at_down() {
    let (c, systemd, daemon) = started_by_systemd();
    let ready = next(&systemd, &c);
    assert!(ready.contains(&"READY=1".to_owned()), "{ready:?}");
    assert!(ready.contains(&format!("MAINPID={}", daemon.id())), "{ready:?}");
    assert!(ready.iter().any(|l| l.starts_with("STATUS=Secondary, disk ")), "{ready:?}");
    // Ready means the control socket answers: no retry, no wait.
    let status = c.cli("alpha", &["status", "--json", "r0"]);
    assert!(status.status.success(), "status right after READY=1: {}", common::text(&status.stderr));
    c.ok("alpha", &["down", "r0"]);
    stops_cleanly(&c, &systemd, daemon);
}

/// `systemctl stop` sends SIGTERM, which means `down`.
#[test]
fn stopping_on_sigterm() {
    let (c, systemd, daemon) = started_by_systemd();
    assert!(next(&systemd, &c).contains(&"READY=1".to_owned()));
    let pid = nix::unistd::Pid::from_raw(daemon.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    stops_cleanly(&c, &systemd, daemon);
}

/// `blkrepl up` (not in the foreground) hears from its daemon through a pipe: a NOTIFY_SOCKET it
/// inherited belongs to whatever service runs it, and the daemon must not speak for that service.
#[test]
fn a_daemon_started_by_up_leaves_an_inherited_notify_socket_alone() {
    let (c, systemd, path) = alpha_and_socket();
    let up = blkrepl_notifying(&c, &path, &["up", "r0"]).output().unwrap();
    assert!(up.status.success(), "{}", common::text(&up.stderr));
    // `up` returned: the daemon is at the point where it would send READY=1, or past it.
    systemd.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 4096];
    let heard = systemd.recv(&mut buf).map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
    assert!(heard.is_err(), "the daemon notified the inherited socket: {heard:?}");
    c.ok("alpha", &["down", "r0"]);
}
