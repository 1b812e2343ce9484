//! The daemon's control socket: one JSON request line, one JSON response line (for `events`,
//! a stream of event lines follows the response).
//!
//! The socket lives in the run directory, is mode 0600, and the server also checks the caller's
//! credentials (SO_PEERCRED): only root or the daemon's own user may drive a replicated device.

pub mod client;
pub mod event_stream;
pub mod server;
pub mod watch;

use crate::engine::ResourceStatus;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Primary { force: bool },
    Secondary,
    Connect { discard_my_data: bool },
    Disconnect,
    Down,
    /// Re-read the resource file and apply the settings that may change while up.
    Adjust,
    NewCurrentUuid { clear_bitmap: bool },
    Verify,
    Invalidate,
    /// End what fencing suspends or fails (drbdadm's `resume-io`).
    ResumeIo,
    /// Keep the connection open: a `Response` line, then one [`crate::events::Event`] line per
    /// change (`event_stream`), until the client goes away.
    Events { statistics: bool },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Empty when the request succeeded.
    pub error: Option<String>,
    /// What the CLI exits with (0 on success).
    pub exit_code: i32,
    pub status: Option<ResourceStatus>,
}

impl Response {
    /// Writes this response to a client as one line of JSON, best effort: a client gone
    /// meanwhile loses only its own answer.
    pub(crate) fn send_to(&self, mut stream: &std::os::unix::net::UnixStream) {
        let mut line = serde_json::to_string(self).expect("responses serialize");
        line.push('\n');
        let _ = std::io::Write::write_all(&mut stream, line.as_bytes());
    }

    pub fn ok(status: Option<ResourceStatus>) -> Response {
        Response { error: None, exit_code: 0, status }
    }

    pub fn failed(error: String, exit_code: i32) -> Response {
        Response { error: Some(error), exit_code, status: None }
    }
}

/// `RUN_DIR/<resource>.<node>.sock`: one per resource and node, so several nodes of a test
/// cluster can share a run directory.
pub fn socket_path(run_dir: &Path, resource: &str, node: &str) -> PathBuf {
    run_dir.join(format!("{resource}.{node}.sock"))
}

/// Held (flock) by the running daemon: a second `up` finds it taken.
pub fn lock_path(run_dir: &Path, resource: &str, node: &str) -> PathBuf {
    run_dir.join(format!("{resource}.{node}.lock"))
}

/// Whether process `pid` has closed every file it had, and so released its locks.
///
/// A process nobody reaps stays a zombie, so "gone" includes one. But its leader thread turns
/// zombie as soon as it exits, while the other threads may still be exiting and holding the
/// files they share: only a zombie leader with no thread left beside it has closed them all.
pub fn process_gone(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return true };
    let zombie = stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z'));
    zombie && std::fs::read_dir(format!("/proc/{pid}/task")).map_or(true, |tasks| tasks.count() <= 1)
}

/// The daemon's log when it runs detached.
pub fn log_path(run_dir: &Path, resource: &str, node: &str) -> PathBuf {
    run_dir.join(format!("{resource}.{node}.log"))
}

#[cfg(test)]
mod tests {
    use super::process_gone;
    use std::process::Command;
    use std::time::{Duration, Instant};

    #[test]
    fn a_running_process_is_not_gone_and_an_unreaped_dead_one_is() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        assert!(!process_gone(pid), "a running sleep counts as gone");
        child.kill().unwrap();
        // Not reaped yet: a zombie, which has closed its files.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !process_gone(pid) {
            assert!(Instant::now() < deadline, "a killed sleep never counted as gone");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok(), "the zombie was reaped by someone else");
        child.wait().unwrap();
        assert!(process_gone(pid));
    }
}
