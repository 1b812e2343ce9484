//! Running one handler: `/bin/sh -c COMMAND` in a process group of its own, the event as JSON
//! on its stdin, the `BLKREPL_*` environment, and a deadline after which the whole group is
//! killed (a handler's own children included, so nothing it started outlives the timeout).

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How much of a handler's stderr a failure shows (its end: where the reason usually is).
const STDERR_TAIL_BYTES: usize = 2048;

/// How often a running handler is checked for its exit.
const POLL: Duration = Duration::from_millis(20);

/// How long the end of stderr is waited for once the handler is gone: a child it moved to
/// another process group may hold the pipe open (its tail is then left out, not waited for).
const STDERR_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start /bin/sh: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("cannot wait for it: {0}")]
    Wait(#[source] std::io::Error),
    #[error("exited with code {code}{hint}; stderr: {stderr}")]
    Exit { code: i32, hint: &'static str, stderr: String },
    #[error("killed by signal {signal}; stderr: {stderr}")]
    Signal { signal: i32, stderr: String },
    #[error("still running after {timeout_s} s: killed with its process group; stderr: {stderr}")]
    TimedOut { timeout_s: u64, stderr: String },
}

/// Runs `command` with `stdin` and `env` until it exits or `timeout` passes.
pub fn run(command: &str, stdin: &[u8], env: &[(&str, String)], timeout: Duration) -> Result<(), RunError> {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own group: a timeout kills the handler and whatever it started, and a terminal's
        // signals to the daemon's group never reach it.
        .process_group(0)
        .spawn()
        .map_err(RunError::Spawn)?;
    // The event is far smaller than a pipe's buffer: this write never waits for the handler
    // to read. A handler that exits without reading it is no error of ours (EPIPE).
    if let Some(mut pipe) = child.stdin.take() {
        let _ = pipe.write_all(stdin);
    }
    let stderr = stderr_tail(&mut child);
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => std::thread::sleep(POLL),
            Err(e) => {
                kill_group(&mut child);
                return Err(RunError::Wait(e));
            }
        }
    };
    let Some(status) = status else {
        kill_group(&mut child);
        return Err(RunError::TimedOut { timeout_s: timeout.as_secs(), stderr: tail_text(&stderr) });
    };
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(()),
        (Some(code), _) => Err(RunError::Exit { code, hint: exit_hint(code), stderr: tail_text(&stderr) }),
        (None, signal) => Err(RunError::Signal { signal: signal.unwrap_or(0), stderr: tail_text(&stderr) }),
    }
}

/// The shell's codes for a command it could not run.
fn exit_hint(code: i32) -> &'static str {
    match code {
        126 => " (the command is not executable)",
        127 => " (the command was not found)",
        _ => "",
    }
}

/// Reads the child's stderr on a thread of its own (so a chatty handler never blocks on a full
/// pipe), keeping its last [`STDERR_TAIL_BYTES`]; the tail arrives when the pipe closes.
fn stderr_tail(child: &mut Child) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = child.stderr.take() {
        let reader = std::thread::Builder::new().name("handler-stderr".into()).spawn(move || {
            let mut tail = Vec::new();
            let mut buf = [0; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                tail.extend_from_slice(&buf[..n]);
                let excess = tail.len().saturating_sub(STDERR_TAIL_BYTES);
                tail.drain(..excess);
            }
            let _ = tx.send(tail);
        });
        if let Err(e) = reader {
            tracing::warn!(error = %e, "cannot read a handler's stderr");
        }
    }
    rx
}

fn tail_text(stderr: &mpsc::Receiver<Vec<u8>>) -> String {
    match stderr.recv_timeout(STDERR_GRACE) {
        Ok(tail) if tail.iter().all(u8::is_ascii_whitespace) => "(empty)".into(),
        Ok(tail) => String::from_utf8_lossy(&tail).trim().replace('\n', " | "),
        Err(_) => "(still held open by a process the handler started)".into(),
    }
}

/// SIGKILL to the handler's whole process group, then reaps the handler.
fn kill_group(child: &mut Child) {
    if let Err(e) = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL) {
        tracing::warn!(pid = child.id(), error = %e, "cannot kill a handler's process group");
    }
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(20);

    #[test]
    fn stdin_and_environment_reach_the_command() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let command = format!("{{ printf '%s ' \"$BLKREPL_HANDLER\"; cat; }} > {}", out.display());
        run(&command, b"{\"x\":1}", &[("BLKREPL_HANDLER", "quorum-lost".into())], LONG).unwrap();
        assert_eq!(std::fs::read_to_string(out).unwrap(), "quorum-lost {\"x\":1}");
    }

    #[test]
    fn a_failure_shows_its_code_and_the_end_of_stderr() {
        let err = run("echo first >&2; head -c 5000 /dev/zero | tr '\\0' x >&2; echo last words >&2; exit 3", b"", &[], LONG).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("exited with code 3;") && text.ends_with("last words"), "{text}");
        assert!(!text.contains("first") && text.len() < STDERR_TAIL_BYTES + 100, "only the tail: {text}");
        let missing = run("/nonexistent/handler", b"", &[], LONG).unwrap_err().to_string();
        assert!(missing.contains("code 127 (the command was not found)") && missing.contains("/nonexistent/handler"), "{missing}");
    }

    #[test]
    fn a_handler_that_hangs_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        let command = format!("sleep 1000 & echo $$ $! > {}; echo waiting >&2; wait", pids.display());
        let started = Instant::now();
        let err = run(&command, b"", &[], Duration::from_secs(1)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
        assert!(matches!(&err, RunError::TimedOut { timeout_s: 1, stderr } if stderr == "waiting"), "{err}");
        let text = std::fs::read_to_string(pids).unwrap();
        for pid in text.split_whitespace() {
            let deadline = Instant::now() + LONG;
            // Gone, or a zombie waiting for a parent that is not this test.
            while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z ")) {
                assert!(Instant::now() < deadline, "process {pid} of the handler survived");
                std::thread::sleep(POLL);
            }
        }
    }
}
