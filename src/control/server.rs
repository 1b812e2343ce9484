//! The daemon's side of the control socket.
//!
//! Connections are served concurrently, each on a thread of its own, at most
//! [`MAX_CONNECTIONS`] at once: an `events` subscriber stays connected for as long as it likes
//! and must not hold up `status` or `primary`. Streams may take at most [`MAX_STREAMS`] of
//! those, so that subscribers never leave commands without a connection. A connection or a
//! stream beyond its cap is refused at once with a message saying so. Commands that change the resource still run one at a time, as they
//! did when the server was serial (a `down` never interleaves with a `primary`); `status` and
//! `events` only read, so they never wait for a command.

use super::{event_stream, Request, Response};
use crate::engine::Engine;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Connections served at once (commands, `status` and `events` subscribers together): a few
/// cluster-manager agents and handlers each with a stream, plus the commands of an operator.
pub const MAX_CONNECTIONS: usize = 16;

/// `events` streams served at once (each also counts as a connection).
pub const MAX_STREAMS: usize = 8;

/// A client that connects and sends no request line within this long is dropped, so that it
/// does not hold one of the connections for ever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the control socket, owner-only.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    // The caller holds the resource's lock file, so a socket file left here is stale.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

struct Server {
    engine: Engine,
    /// Connections being served.
    active: Arc<AtomicUsize>,
    /// `events` streams being served.
    streams: Arc<AtomicUsize>,
    /// Held while a command that changes the resource runs.
    commands: Mutex<()>,
    /// Set once `down` succeeded: the accept loop returns at its next connection.
    stopping: AtomicBool,
    /// Runs once a `down` can no longer be refused (see [`Engine::shutdown`]): the daemon tells
    /// systemd it is stopping.
    on_stopping: Box<dyn Fn() + Send + Sync>,
    /// The socket's path, to wake the accept loop once stopping.
    path: Option<PathBuf>,
}

/// One of a bounded number of places; taken by [`Slot::take`], given back when dropped,
/// however the thread that holds it ends.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        if count.fetch_add(1, Ordering::SeqCst) >= max {
            count.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Slot(count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves requests until a `down` succeeds; returns then (threads still serving `events`
/// streams end with the process). `on_stopping` runs once a `down` can no longer be refused.
pub fn serve(listener: &UnixListener, engine: &Engine, on_stopping: impl Fn() + Send + Sync + 'static) {
    let me = nix::unistd::geteuid().as_raw();
    let server = Arc::new(Server {
        engine: engine.clone(),
        active: Arc::default(),
        streams: Arc::default(),
        commands: Mutex::new(()),
        stopping: AtomicBool::new(false),
        on_stopping: Box::new(on_stopping),
        path: listener.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf)),
    });
    for stream in listener.incoming() {
        if server.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        match getsockopt(&stream, PeerCredentials) {
            Ok(cred) if cred.uid() == 0 || cred.uid() == me => {}
            Ok(cred) => {
                tracing::warn!(uid = cred.uid(), "control request from an unprivileged user refused");
                Response::failed("permission denied: run blkrepl as root".into(), 13).send_to(&stream);
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the control client's credentials");
                continue;
            }
        }
        let Some(slot) = Slot::take(&server.active, MAX_CONNECTIONS) else {
            tracing::warn!(max = MAX_CONNECTIONS, "control connection refused: too many open");
            refuse(&stream, format!("too many control connections ({MAX_CONNECTIONS} open, `events` streams included): try again later"));
            continue;
        };
        let server = server.clone();
        let spawned = std::thread::Builder::new().name("control".into()).spawn(move || {
            let _slot = slot;
            if handle(&stream, &server) {
                // Wake the accept loop: it returns at the next connection.
                if let Some(path) = &server.path {
                    let _ = UnixStream::connect(path);
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a thread for a control connection");
        }
    }
}

/// Answers a connection that gets no thread; the write cannot block for long (the socket's
/// buffer is empty), the timeout is there all the same since this runs on the accept loop.
fn refuse(stream: &UnixStream, message: String) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    Response::failed(message, 1).send_to(stream);
}

/// Answers one connection; true when the daemon should exit (`stopping` is set then).
fn handle(stream: &UnixStream, server: &Server) -> bool {
    let engine = &server.engine;
    let mut line = String::new();
    if stream.set_read_timeout(Some(REQUEST_TIMEOUT)).is_err() || BufReader::new(stream).read_line(&mut line).is_err() {
        return false;
    }
    let request: Request = match serde_json::from_str(&line) {
        Ok(request) => request,
        Err(e) => {
            Response::failed(format!("malformed request: {e}"), 2).send_to(stream);
            return false;
        }
    };
    tracing::debug!(?request, "control request");
    let command = match request {
        Request::Events { statistics } => {
            match Slot::take(&server.streams, MAX_STREAMS) {
                Some(_stream_slot) => event_stream::publish(stream, engine, statistics),
                None => {
                    tracing::warn!(max = MAX_STREAMS, "events stream refused: too many open");
                    Response::failed(format!("too many events streams ({MAX_STREAMS} open): try again later"), 1).send_to(stream);
                }
            }
            return false;
        }
        Request::Status => None,
        _ => Some(server.commands.lock().unwrap_or_else(PoisonError::into_inner)),
    };
    if command.is_some() && server.stopping.load(Ordering::SeqCst) {
        Response::failed("the daemon is going down".into(), 3).send_to(stream);
        return false;
    }
    let result = match request {
        // Only reads (events are answered above).
        Request::Status | Request::Events { .. } => Ok(()),
        Request::Primary { force } => engine.promote(force),
        Request::Secondary => engine.demote(),
        Request::Connect { discard_my_data } => engine.connect(discard_my_data),
        Request::Adjust => engine.adjust(),
        Request::Disconnect => {
            engine.disconnect();
            Ok(())
        }
        Request::NewCurrentUuid { clear_bitmap } => engine.new_current_uuid(clear_bitmap),
        Request::Verify => engine.verify().map(drop),
        Request::Invalidate => engine.invalidate().map(drop),
        Request::ResumeIo => engine.resume_io(),
        Request::Down => match engine.shutdown(&server.on_stopping) {
            Ok(()) => {
                // Before the command lock is released: no command queued behind this one runs.
                server.stopping.store(true, Ordering::SeqCst);
                Response::ok(None).send_to(stream);
                return true;
            }
            Err(e) => Err(e),
        },
    };
    let response = match result {
        Ok(()) => Response::ok(Some(engine.status())),
        Err(e) => Response::failed(e.to_string(), e.exit_code()),
    };
    response.send_to(stream);
    false
}

