//! The `fence-peer` handler. Unlike the other handlers it is called by a rule of the replica
//! (`replica/fencing.rs`: a primary lost a data peer under `fencing`), not by the status watch,
//! and its answer matters: under `resource-and-stonith` the primary's writes are held until it
//! comes. So each run gets a thread of its own instead of a place in the one-at-a-time queue:
//! behind a slow unrelated handler (up to 64 waiting, each up to `handler_timeout_s`) frozen
//! I/O would wait far longer than the fence handler's own timeout, which is the most a handler
//! may hold it. At most one run per peer at a time: a link that flaps while a run is going
//! queues one more run, for its newest loss, started when the current one ends (the replica
//! ignores the older loss's answer), so a flapping link never piles up handler processes.
//!
//! It reads the `events --json` line of the lost peer's connection on stdin, with the other
//! handlers' environment plus `BLKREPL_FENCING`; its exit code is handed to
//! `Engine::fence_done` (a timeout, a signal or a shell that cannot start as a failure).

use super::detect::{peer_object, Call, Handler, PeerObject, PeerRef};
use super::process::{self, RunError};
use super::Job;
use crate::config::{Fencing, HandlersConfig};
use crate::engine::Engine;
use crate::events::diff::objects;
use crate::replica::FenceOutcome;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

/// Makes `engine` run the configured `fence-peer` handler when its replica asks (nothing to do
/// under `fencing = "dont-care"`: the replica never asks).
pub fn install(engine: &Engine, fencing: Fencing, config: &HandlersConfig) {
    let Some(command) = config.fence_peer.clone().filter(|_| fencing != Fencing::DontCare) else { return };
    let timeout = config.timeout;
    // Per peer with a run going: the loss (connection generation) to fence once it ends.
    let running: Arc<Mutex<HashMap<u8, Option<u64>>>> = Arc::default();
    engine.set_fence_runner(Box::new(move |engine, peer, generation| {
        {
            let mut runs = lock(&running);
            if let Some(next) = runs.get_mut(&peer) {
                *next = Some(generation);
                return;
            }
            runs.insert(peer, None);
        }
        let (runner, command, runs) = (engine.clone(), command.clone(), running.clone());
        let started = std::thread::Builder::new().name(format!("fence-peer-{peer}")).spawn(move || {
            let mut generation = generation;
            loop {
                let outcome = run(&runner, &command, fencing, peer, timeout);
                runner.fence_done(peer, generation, outcome);
                let mut runs = lock(&runs);
                match runs.get_mut(&peer).and_then(Option::take) {
                    Some(newer) => generation = newer,
                    None => {
                        runs.remove(&peer);
                        return;
                    }
                }
            }
        });
        if let Err(e) = started {
            lock(&running).remove(&peer);
            engine.fence_done(peer, generation, FenceOutcome::Failed(format!("cannot start a thread for it: {e}")));
        }
    }));
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A map of plain values: a panic elsewhere cannot leave it inconsistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs the handler for `peer` once and says how it ended.
fn run(engine: &Engine, command: &str, fencing: Fencing, peer: u8, timeout: Duration) -> FenceOutcome {
    let status = engine.status();
    let Some(name) = status.peers.iter().find(|p| p.node_id == peer).map(|p| p.name.clone()) else {
        return FenceOutcome::Failed(format!("node {peer} is not a peer"));
    };
    let object = peer_object(&objects(&status, false), PeerObject::Connection, peer);
    let call = Call { handler: Handler::FencePeer, peer: Some(PeerRef { name: name.clone(), node_id: peer }), object, recovered: None };
    let mut job = Job::new(call, command, &status, SystemTime::now());
    job.env.push(("BLKREPL_FENCING", fencing.as_str().to_owned()));
    let resource = engine.resource();
    tracing::warn!(resource, peer = %name, command, "running the fence-peer handler");
    let started = Instant::now();
    let outcome = outcome_of(process::run(command, job.stdin.as_bytes(), &job.env, timeout));
    tracing::info!(resource, peer = %name, ?outcome, ms = started.elapsed().as_millis() as u64, "the fence-peer handler ended");
    outcome
}

/// The handler's exit code is its answer, 0 included (which settles nothing: see
/// `Replica::fence_done`); no exit code at all is a failure.
fn outcome_of(result: Result<(), RunError>) -> FenceOutcome {
    match result {
        Ok(()) => FenceOutcome::Exited(0),
        Err(RunError::Exit { code, .. }) => FenceOutcome::Exited(code),
        Err(e) => FenceOutcome::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_answers_and_anything_else_a_failure() {
        let long = Duration::from_secs(20);
        assert_eq!(outcome_of(process::run("exit 4", b"", &[], long)), FenceOutcome::Exited(4));
        assert_eq!(outcome_of(process::run("true", b"", &[], long)), FenceOutcome::Exited(0));
        let hung = outcome_of(process::run("sleep 30", b"", &[], Duration::from_secs(1)));
        assert!(matches!(&hung, FenceOutcome::Failed(why) if why.contains("still running after 1 s")), "{hung:?}");
    }
}
