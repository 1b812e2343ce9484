//! The promoter's process side: per resource, one thread follows the daemon's events (the same
//! [`watch`] as `blkrepl events`, so a daemon that stops or dies is seen and waited for) into a
//! channel, one probes whether the daemon answers (see [`super::liveness`]: the events cannot
//! tell a hung daemon from a quiet one) into the same channel, and one feeds them to its
//! [`Decider`] and carries out its steps; one more thread waits for SIGTERM and SIGINT. The
//! promoter wakes for a line, a probe, a signal, or the end of a wait the decider asked for.

use super::decide::{Decider, Step};
use super::liveness::Liveness;
use super::role;
use super::services::Services;
use super::view::Tracker;
use super::Target;
use crate::control::client::{self, ClientError};
use crate::control::watch::{self, Source, WatchError};
use crate::control::Request;
use crate::events::Event;
use nix::sys::signal::{SigSet, Signal};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// How long a probe waits for its answer before the next one is sent (the decider judges the
/// silence much earlier, by when the probe went out).
const PROBE_GIVE_UP: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum PromoterError {
    #[error("cannot start a thread for {resource}: {source}")]
    Thread { resource: String, source: std::io::Error },
    #[error("{resource}: the promoter gave up: services not stopped or the node not demoted (see the log above)")]
    Failed { resource: String },
}

/// What a resource's deciding thread hears.
enum Message {
    Event(Box<Event>),
    /// A new events subscription starts listing the state.
    Resubscribed,
    /// A status probe went out at this instant.
    ProbeSent(Instant),
    /// The daemon answered a probe at this instant.
    ProbeAnswered(Instant),
    Shutdown,
}

/// What the main thread hears.
enum Done {
    Signal,
    Finished { resource: String, failed: bool },
}

/// Looks after `targets` until SIGTERM or SIGINT (then stops every service, demotes, and
/// returns), or until a resource fails under `on_stop_failure = "exit"` (returns at once).
pub fn run(targets: Vec<Target>) -> Result<(), PromoterError> {
    // Before any thread starts, so that every thread inherits the mask and only the signal
    // thread takes them.
    crate::daemon::block_termination_signals();
    let (done_tx, done_rx) = mpsc::channel();
    let mut inboxes = Vec::new();
    let count = targets.len();
    for target in targets {
        let (tx, rx) = mpsc::channel();
        let resource = target.resource.clone();
        let thread_error = |source| PromoterError::Thread { resource: resource.clone(), source };
        let (socket, events) = (target.socket.clone(), tx.clone());
        let follower = resource.clone();
        std::thread::Builder::new()
            .name(format!("events-{resource}"))
            .spawn(move || follow(follower, socket, events))
            .map_err(thread_error)?;
        let (socket, probes, every) = (target.socket.clone(), tx.clone(), target.timing.ping_interval);
        std::thread::Builder::new()
            .name(format!("probe-{resource}"))
            .spawn(move || probe(socket, every, probes))
            .map_err(thread_error)?;
        let done = done_tx.clone();
        std::thread::Builder::new()
            .name(format!("promote-{resource}"))
            .spawn(move || {
                let failed = drive(&target, &rx);
                let _ = done.send(Done::Finished { resource: target.resource, failed });
            })
            .map_err(thread_error)?;
        inboxes.push(tx);
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || wait_for_signals(&inboxes, &done_tx))
        .map_err(|source| PromoterError::Thread { resource: "signals".into(), source })?;
    let mut shutting_down = false;
    let mut first_failure = None;
    let mut finished = 0;
    while finished < count {
        match done_rx.recv() {
            Ok(Done::Signal) => shutting_down = true,
            Ok(Done::Finished { resource, failed }) => {
                finished += 1;
                if failed && !shutting_down {
                    // on_stop_failure = "exit": leave now, for systemd to escalate.
                    return Err(PromoterError::Failed { resource });
                }
                if failed {
                    first_failure.get_or_insert(PromoterError::Failed { resource });
                }
            }
            Err(_) => break,
        }
    }
    first_failure.map_or(Ok(()), Err)
}

fn wait_for_signals(inboxes: &[Sender<Message>], done: &Sender<Done>) {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    let Ok(signal) = set.wait() else { return };
    tracing::info!(?signal, "stopping: services are stopped and primaries demoted first");
    let _ = done.send(Done::Signal);
    for inbox in inboxes {
        let _ = inbox.send(Message::Shutdown);
    }
    // Later signals are taken here and ignored: the stop under way finishes.
    while let Ok(signal) = set.wait() {
        tracing::info!(?signal, "already stopping");
    }
}

/// Follows one resource's events for as long as the deciding thread listens; a stream that
/// fails (refused, broken) is subscribed again.
fn follow(resource: String, socket: std::path::PathBuf, inbox: Sender<Message>) {
    loop {
        if inbox.send(Message::Resubscribed).is_err() {
            return;
        }
        let sources = vec![Source { resource: resource.clone(), socket: socket.clone() }];
        let options = watch::Options { statistics: false, now: false, require_running: false };
        let forward = |event: &Event| {
            inbox.send(Message::Event(Box::new(event.clone()))).map_err(|_| std::io::Error::other("the promoter stopped listening"))
        };
        match watch::watch(sources, options, forward) {
            Ok(()) | Err(WatchError::Output(_)) => return,
            Err(e) => {
                tracing::warn!(resource, error = %e, "events stream failed, subscribing again: {e}");
                std::thread::sleep(watch::RETRY);
            }
        }
    }
}

/// Asks the daemon for its status every `every`, one request at a time, for as long as the
/// deciding thread listens, and tells it when each went out and when it was answered.
fn probe(socket: PathBuf, every: Duration, inbox: Sender<Message>) {
    loop {
        if inbox.send(Message::ProbeSent(Instant::now())).is_err() {
            return;
        }
        let answered = match client::call_within(&socket, &Request::Status, PROBE_GIVE_UP) {
            // A daemon not running answers for itself: the events say it went away.
            Ok(_) | Err(ClientError::NotRunning | ClientError::Refused { .. } | ClientError::Malformed { .. }) => true,
            // No answer in time, or the connection broke before one.
            Err(ClientError::Io { .. }) => false,
        };
        if answered && inbox.send(Message::ProbeAnswered(Instant::now())).is_err() {
            return;
        }
        std::thread::sleep(every);
    }
}

/// Decides and acts for one resource until the decider says to exit; true if it failed.
fn drive(target: &Target, inbox: &Receiver<Message>) -> bool {
    let resource = target.resource.as_str();
    let services = Services::new(&target.promoter, resource, &target.node);
    // Silent past the quorum lease, settled after a ping timeout (see `liveness`).
    let liveness = Liveness::new(target.timing.lease(), target.timing.ping_timeout);
    let mut decider = Decider::new(&target.promoter, target.placement, liveness);
    let mut tracker = Tracker::default();
    tracing::info!(resource, node = target.node, rank = target.placement.rank, "promoter following the resource");
    loop {
        match decider.next(Instant::now()) {
            Step::Wait(until) => {
                let message = match until {
                    None => inbox.recv().map_err(|_| RecvTimeoutError::Disconnected),
                    Some(until) => inbox.recv_timeout(until.saturating_duration_since(Instant::now())),
                };
                match message {
                    Ok(message) => take(message, &mut tracker, &mut decider),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => {
                        tracing::error!(resource, "the events of the resource are no longer followed: stopping");
                        return true;
                    }
                }
            }
            Step::Promote => {
                tracing::info!(resource, "this node may promote and nobody is primary: promoting");
                decider.promoted(role::promote(&target.socket, resource), Instant::now());
            }
            Step::Start => {
                tracing::info!(resource, "primary: starting services");
                decider.started(services.start(), Instant::now());
            }
            Step::Stop { count, why } => {
                tracing::warn!(resource, why, "stopping services");
                decider.stopped(services.stop(count));
            }
            Step::Demote { why } => {
                tracing::info!(resource, why, "demoting");
                decider.demoted(role::demote(&target.socket, resource), Instant::now());
            }
            Step::Exit { failed } => return failed,
        }
        // Whatever came meanwhile (a step may take long): the next decision reads the newest.
        while let Ok(message) = inbox.try_recv() {
            take(message, &mut tracker, &mut decider);
        }
    }
}

/// Takes one message in; a line updates the decider's view.
fn take(message: Message, tracker: &mut Tracker, decider: &mut Decider) {
    match message {
        Message::Event(event) => {
            tracker.apply(&event);
            decider.observe(tracker.view(), Instant::now());
        }
        Message::Resubscribed => tracker.resubscribe(),
        Message::ProbeSent(at) => decider.probe_sent(at),
        Message::ProbeAnswered(at) => decider.probe_answered(at),
        Message::Shutdown => decider.shutdown(),
    }
}
