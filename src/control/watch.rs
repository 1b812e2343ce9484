//! The CLI's side of `blkrepl events`: one stream per resource, merged, in DRBD's framing: the
//! `exists` lines of every running resource, one `exists -` marker, then changes as they come.
//!
//! A resource whose daemon is not running yields no line; it is looked for again every
//! [`RETRY`], and when its daemon starts its objects are `create`d. A daemon that stops or dies
//! yields `destroy` lines for every object it had (the daemon cannot send those itself when it
//! is killed), and is then waited for in the same way.

use super::client::{self, ClientError};
use crate::events::diff::diff;
use crate::events::{time, Action, Event, Object};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

/// How often a resource whose daemon is not running is looked for again.
pub const RETRY: Duration = Duration::from_millis(500);

/// One resource to follow and its daemon's control socket.
pub struct Source {
    pub resource: String,
    pub socket: PathBuf,
}

pub struct Options {
    /// Add the byte counters and resync rate (`--statistics`).
    pub statistics: bool,
    /// Stop after the marker (`--now`).
    pub now: bool,
    /// A resource not running before the marker is an error (a resource named on the command
    /// line with `--now`, as `status RES` does) rather than a resource with no lines.
    pub require_running: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("{resource}: events: {source}")]
    Stream { resource: String, source: ClientError },
    #[error("{resource} is not running")]
    NotRunning { resource: String },
    #[error("cannot write the events: {0}")]
    Output(#[source] std::io::Error),
    #[error("cannot start a thread to follow {resource}: {source}")]
    Thread { resource: String, source: std::io::Error },
}

/// What a resource's thread reports.
enum Report {
    Event(Event),
    /// No daemon answers (yet).
    Absent,
    /// The daemon's stream ended: it stopped or died.
    Gone,
    Failed(ClientError),
}

/// Follows `sources`, handing each line to `out`; returns after the marker with `now`, never
/// otherwise unless something fails.
pub fn watch(sources: Vec<Source>, options: Options, mut out: impl FnMut(&Event) -> std::io::Result<()>) -> Result<(), WatchError> {
    let (tx, rx) = mpsc::channel();
    for (index, Source { resource, socket }) in sources.iter().enumerate() {
        let (tx, socket, statistics, now) = (tx.clone(), socket.clone(), options.statistics, options.now);
        std::thread::Builder::new()
            .name(format!("events-{resource}"))
            .spawn(move || follow(&socket, statistics, now, |report| tx.send((index, report)).is_ok()))
            .map_err(|source| WatchError::Thread { resource: resource.clone(), source })?;
    }
    drop(tx);
    let mut out = |event: &Event| out(event).map_err(WatchError::Output);
    let mut known: Vec<Vec<Object>> = vec![Vec::new(); sources.len()];
    let mut listed = vec![false; sources.len()];
    let mut marked = false;
    let mut reports = rx.into_iter();
    loop {
        if !marked && listed.iter().all(|&l| l) {
            marked = true;
            out(&Event { time: time::iso8601(SystemTime::now()), action: Action::Exists, object: Object::Marker })?;
            if options.now {
                return Ok(());
            }
        }
        let Some((index, report)) = reports.next() else { return Ok(()) };
        let resource = &sources[index].resource;
        match report {
            Report::Event(Event { object: Object::Marker, .. }) => listed[index] = true,
            Report::Event(mut event) => {
                if marked && event.action == Action::Exists {
                    event.action = Action::Create;
                }
                remember(&mut known[index], &event);
                out(&event)?;
            }
            Report::Absent if options.require_running && !listed[index] => {
                return Err(WatchError::NotRunning { resource: resource.clone() });
            }
            Report::Absent => listed[index] = true,
            Report::Gone => {
                listed[index] = true;
                let time = time::iso8601(SystemTime::now());
                for (action, object) in diff(&std::mem::take(&mut known[index]), &[]) {
                    out(&Event { time: time.clone(), action, object })?;
                }
            }
            Report::Failed(source) => return Err(WatchError::Stream { resource: resource.clone(), source }),
        }
    }
}

/// Keeps `known` as the objects the consumer has been told of.
fn remember(known: &mut Vec<Object>, event: &Event) {
    let at = known.iter().position(|o| o.key() == event.object.key());
    match (event.action, at) {
        (Action::Destroy, Some(at)) => {
            known.remove(at);
        }
        (Action::Destroy, None) => {}
        (_, Some(at)) => known[at] = event.object.clone(),
        (_, None) => known.push(event.object.clone()),
    }
}

/// One resource's thread: subscribes, reports, and subscribes again after its daemon went
/// away, until `report` says nobody listens (or, with `now`, after one attempt).
fn follow(socket: &std::path::Path, statistics: bool, now: bool, report: impl Fn(Report) -> bool) {
    loop {
        match client::subscribe(socket, statistics) {
            Ok(events) => {
                for event in events {
                    let event = match event {
                        Ok(event) => event,
                        Err(e) => {
                            report(Report::Failed(e));
                            return;
                        }
                    };
                    let marker = matches!(event.object, Object::Marker);
                    if !report(Report::Event(event)) || (now && marker) {
                        return;
                    }
                }
                if !report(Report::Gone) {
                    return;
                }
            }
            Err(ClientError::NotRunning) => {
                if !report(Report::Absent) {
                    return;
                }
            }
            Err(e) => {
                report(Report::Failed(e));
                return;
            }
        }
        if now {
            return;
        }
        std::thread::sleep(RETRY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::ConnectionObject;

    fn connection(peer_node_id: u8, state: &str) -> Object {
        Object::Connection(ConnectionObject {
            name: "r0".into(),
            peer_node_id,
            conn_name: format!("n{peer_node_id}"),
            connection: state.into(),
            role: "Unknown".into(),
        })
    }

    fn event(action: Action, object: Object) -> Event {
        Event { time: String::new(), action, object }
    }

    #[test]
    fn what_was_announced_is_what_gets_destroyed() {
        let mut known = Vec::new();
        remember(&mut known, &event(Action::Exists, connection(1, "Connecting")));
        remember(&mut known, &event(Action::Create, connection(2, "Connecting")));
        remember(&mut known, &event(Action::Change, connection(1, "Connected")));
        assert_eq!(known, [connection(1, "Connected"), connection(2, "Connecting")]);
        remember(&mut known, &event(Action::Destroy, connection(2, "Connecting")));
        remember(&mut known, &event(Action::Destroy, connection(3, "Connecting")));
        assert_eq!(known, [connection(1, "Connected")]);
    }
}
