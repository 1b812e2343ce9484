//! Handlers, as DRBD's: commands from the resource file's `[handlers]` that the daemon runs when
//! something an operator must hear of happens (quorum lost, a split brain, a resync as target,
//! a peer unreachable for long). See docs/OPERATIONS.md, "Handlers".
//!
//! They follow the status as the `events` stream does ([`crate::events::follow`]): a thread
//! samples it every 100 ms and [`detect::Watch`] says which handlers each new snapshot calls
//! for. Another thread runs them one at a time, in order ([`process`]), from a bounded
//! [`queue`]: a handler never runs under the engine's lock and never holds I/O; a slow one
//! delays only the handlers after it, each by at most `handler_timeout_s`. One at a time
//! rather than concurrently so that a handler sees events in the order they happened
//! (`before-resync-target` before its `after-resync-target`).

pub mod detect;
pub mod fence;
pub mod process;
pub mod queue;

use crate::config::HandlersConfig;
use crate::engine::{Engine, ResourceStatus};
use crate::events::follow::{follow, SAMPLE_INTERVAL};
use crate::events::{time, Action, Event};
use detect::{Call, Handler, Watch};
use queue::Queue;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// One handler run, ready to go.
struct Job {
    handler: Handler,
    command: String,
    /// For log lines: whom the run is about.
    peer: Option<String>,
    /// The event as JSON (one line).
    stdin: String,
    env: Vec<(&'static str, String)>,
}

/// What a handler reads on stdin: an `events --json` line, plus which handler runs, this node's
/// name, and for `peer-unreachable` whether the peer is back.
#[derive(Serialize)]
struct HandlerEvent<'a> {
    #[serde(flatten)]
    event: Event,
    handler: &'static str,
    node: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
}

/// The command configured for `handler`, if any.
fn command(config: &HandlersConfig, handler: Handler) -> Option<&str> {
    match handler {
        Handler::SplitBrain => config.split_brain.as_deref(),
        Handler::QuorumLost => config.quorum_lost.as_deref(),
        Handler::BeforeResyncTarget => config.before_resync_target.as_deref(),
        Handler::AfterResyncTarget => config.after_resync_target.as_deref(),
        Handler::PeerUnreachable => config.peer_unreachable.as_deref(),
        Handler::FencePeer => config.fence_peer.as_deref(),
    }
}

impl Job {
    fn new(call: Call, command: &str, status: &ResourceStatus, now: SystemTime) -> Job {
        let event = Event { time: time::iso8601(now), action: Action::Change, object: call.object };
        let stdin = HandlerEvent { event, handler: call.handler.name(), node: &status.node, recovered: call.recovered };
        let mut env = vec![
            ("BLKREPL_RESOURCE", status.name.clone()),
            ("BLKREPL_NODE", status.node.clone()),
            ("BLKREPL_HANDLER", call.handler.name().to_owned()),
        ];
        if let Some(peer) = &call.peer {
            env.push(("BLKREPL_PEER", peer.name.clone()));
            env.push(("BLKREPL_PEER_NODE_ID", peer.node_id.to_string()));
        }
        if let Some(recovered) = call.recovered {
            env.push(("BLKREPL_PEER_RECOVERED", if recovered { "yes" } else { "no" }.to_owned()));
        }
        Job {
            handler: call.handler,
            command: command.to_owned(),
            peer: call.peer.map(|p| p.name),
            stdin: serde_json::to_string(&stdin).expect("handler events serialize") + "\n",
            env,
        }
    }
}

/// Starts the two handler threads (none when no handler is configured).
pub fn spawn(engine: &Engine, config: HandlersConfig) -> std::io::Result<()> {
    if Handler::ALL.iter().all(|h| command(&config, *h).is_none()) {
        return Ok(());
    }
    let queue: Arc<Queue<Job>> = Arc::new(Queue::default());
    let resource = engine.resource().to_owned();
    let timeout = config.timeout;
    let jobs = queue.clone();
    std::thread::Builder::new().name("handlers".into()).spawn(move || loop {
        run(&resource, &jobs.pop(), timeout);
    })?;
    let engine = engine.clone();
    std::thread::Builder::new().name("handler-watch".into()).spawn(move || {
        let mut watch = Watch::new(config.peer_unreachable_after);
        let pause = || {
            std::thread::sleep(SAMPLE_INTERVAL);
            true
        };
        follow(&engine, engine.status(), pause, |before, after| {
            for call in watch.step(before, after, Instant::now()) {
                let Some(command) = command(&config, call.handler) else { continue };
                let job = Job::new(call, command, after, SystemTime::now());
                if let Some(dropped) = queue.push(job) {
                    tracing::warn!(
                        resource = engine.resource(),
                        handler = dropped.handler.name(),
                        peer = dropped.peer,
                        "{} handler runs already wait: the oldest is dropped",
                        queue::MAX_QUEUED
                    );
                }
            }
            true
        });
    })?;
    Ok(())
}

/// Runs one job and logs how it went.
fn run(resource: &str, job: &Job, timeout: Duration) {
    let (handler, peer, command) = (job.handler.name(), job.peer.as_deref(), job.command.as_str());
    tracing::info!(resource, handler, peer, command, "running handler");
    let started = Instant::now();
    match process::run(&job.command, job.stdin.as_bytes(), &job.env, timeout) {
        Ok(()) => tracing::info!(resource, handler, peer, ms = started.elapsed().as_millis() as u64, "handler succeeded"),
        Err(e) => tracing::error!(resource, handler, peer, command, "handler {handler} failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::fixtures::status;
    use std::time::UNIX_EPOCH;

    #[test]
    fn a_job_carries_the_events_line_the_handler_and_the_environment() {
        let mut gone = status();
        gone.peers[1].connection = "Connecting".into();
        let mut watch = Watch::new(Duration::ZERO);
        let call = watch.step(&status(), &gone, Instant::now()).remove(0);
        let job = Job::new(call, "notify", &gone, UNIX_EPOCH + Duration::from_millis(1_796_146_881_123));
        assert_eq!(
            job.stdin,
            "{\"time\":\"2026-12-01T17:41:21.123Z\",\"action\":\"change\",\"object\":\"connection\",\"name\":\"r0\",\"peer_node_id\":2,\"conn_name\":\"tie\",\"connection\":\"Connecting\",\"role\":\"Secondary\",\"handler\":\"peer-unreachable\",\"node\":\"alpha\",\"recovered\":false}\n"
        );
        let env: Vec<(&str, &str)> = job.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(
            env,
            [
                ("BLKREPL_RESOURCE", "r0"),
                ("BLKREPL_NODE", "alpha"),
                ("BLKREPL_HANDLER", "peer-unreachable"),
                ("BLKREPL_PEER", "tie"),
                ("BLKREPL_PEER_NODE_ID", "2"),
                ("BLKREPL_PEER_RECOVERED", "no"),
            ]
        );
        let mut lost = status();
        lost.quorum = false;
        let call = watch.step(&status(), &lost, Instant::now()).remove(0);
        let job = Job::new(call, "notify", &lost, UNIX_EPOCH);
        assert!(job.stdin.contains("\"object\":\"resource\"") && job.stdin.ends_with("\"handler\":\"quorum-lost\",\"node\":\"alpha\"}\n"), "{}", job.stdin);
        assert_eq!(job.env.len(), 3, "no peer: {:?}", job.env);
    }
}
