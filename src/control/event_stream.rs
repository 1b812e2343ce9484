//! The daemon's side of `blkrepl events`: one subscriber per control connection, fed by its own
//! thread, which samples the engine's status and sends what changed ([`crate::events::diff`]).
//!
//! Sampling rather than a change notification from the engine: several things the stream
//! shows change with time alone, with no event inside the engine that could signal them (a
//! quorum lease running out, resync progress and rate), and a snapshot is cheap (the engine
//! keeps its counters and bitmap weights current, nothing is scanned) and holds the engine's
//! lock only while it is built. The engine is not touched at all for this.
//!
//! A subscriber that stops reading never slows anything but its own thread: the engine's lock
//! is never held while writing to it, its socket's kernel buffer is small, and a write that
//! cannot complete within [`WRITE_TIMEOUT`] drops it, logged.

use super::Response;
use crate::engine::Engine;
use crate::events::diff::{changes, objects};
use crate::events::follow::{follow, SAMPLE_INTERVAL};
use crate::events::{time, Action, Event, Object};
use nix::sys::socket::{setsockopt, sockopt::SndBuf};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, SystemTime};

/// A subscriber whose socket stays full this long has stopped reading and is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(3);

/// The kernel's buffer for a subscriber (it doubles it): a few dozen lines, so a reader that
/// stopped is found within seconds of lines, not after megabytes.
const SEND_BUFFER_BYTES: usize = 16 << 10;

/// Serves one subscriber until it goes away, stops reading, or sends anything more.
pub fn publish(stream: &UnixStream, engine: &Engine, statistics: bool) {
    let configured = setsockopt(stream, SndBuf, &SEND_BUFFER_BYTES)
        .map_err(std::io::Error::from)
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
        .and_then(|()| stream.set_read_timeout(Some(SAMPLE_INTERVAL)));
    if let Err(e) = configured {
        Response::failed(format!("cannot set up the events stream: {e}"), 1).send_to(stream);
        return;
    }
    Response::ok(None).send_to(stream);
    tracing::debug!(resource = engine.resource(), statistics, "events subscriber connected");
    let first = engine.status();
    let initial = objects(&first, statistics).into_iter().map(|o| (Action::Exists, o)).chain([(Action::Exists, Object::Marker)]);
    if !send(stream, engine, initial.collect()) {
        return;
    }
    // Sleeps one interval, and finds a subscriber that closed its end.
    let pause = || match (&*stream).read(&mut [0; 64]) {
        Ok(0) => {
            tracing::debug!(resource = engine.resource(), "events subscriber went away");
            false
        }
        Ok(_) => {
            tracing::warn!(resource = engine.resource(), "events subscriber sent more than its request: dropped");
            false
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => true,
        Err(e) => {
            tracing::debug!(resource = engine.resource(), error = %e, "events subscriber's connection failed");
            false
        }
    };
    follow(engine, first, pause, |before, after| {
        let lines = changes(before, after, statistics);
        lines.is_empty() || send(stream, engine, lines)
    });
}

/// Writes the lines, stamped now, in one write; false when the subscriber is to be dropped.
fn send(mut stream: &UnixStream, engine: &Engine, lines: Vec<(Action, Object)>) -> bool {
    let time = time::iso8601(SystemTime::now());
    let mut text = String::new();
    for (action, object) in lines {
        text += &serde_json::to_string(&Event { time: time.clone(), action, object }).expect("events serialize");
        text.push('\n');
    }
    match stream.write_all(text.as_bytes()) {
        Ok(()) => true,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            tracing::warn!(
                resource = engine.resource(),
                timeout_s = WRITE_TIMEOUT.as_secs(),
                "events subscriber stopped reading (its socket stayed full): dropped"
            );
            false
        }
        Err(e) => {
            tracing::debug!(resource = engine.resource(), error = %e, "events subscriber went away");
            false
        }
    }
}
