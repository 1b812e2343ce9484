//! One daemon per resource and node: lock, open, listen, serve the control socket, stop cleanly
//! on `down` or SIGTERM.

use crate::config::{NodeConfig, ResourceConfig};
use crate::control::{self, server};
use crate::engine::{Engine, EngineError, ResourceStatus};
use crate::sd_notify::Notifier;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{SigSet, Signal};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create run directory {path}: {source}")]
    RunDir { path: PathBuf, source: std::io::Error },
    #[error("resource {resource} is already up on node {node} (lock {path} is held{pid}); `blkrepl down {resource}` first")]
    AlreadyUp { resource: String, node: String, path: PathBuf, pid: String },
    #[error("cannot bind control socket {path}: {source}")]
    Control { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("cannot start the threads that run handlers: {0}")]
    Handlers(#[source] std::io::Error),
}

/// Tells whoever started this daemon how start-up went: the `up` command through a pipe on
/// stdout (so `up` returns only once the daemon listens, or prints why it could not), and
/// systemd through `NOTIFY_SOCKET` (`Type=notify`: the unit is active, and units ordered after
/// it start, only once the control socket answers).
pub struct Readiness {
    pipe: Option<File>,
    systemd: Systemd,
}

impl Readiness {
    /// With `BLKREPL_READY_PIPE=1`, stdout is the pipe back to `blkrepl up`; with
    /// `NOTIFY_SOCKET`, systemd listens (the variable is consumed: see
    /// [`Notifier::take_from_env`], which is why this runs before any thread starts).
    pub fn from_env() -> Readiness {
        let pipe = std::env::var_os("BLKREPL_READY_PIPE").and_then(|_| {
            use std::os::fd::FromRawFd;
            // Close-on-exec: a handler the daemon runs must not hold `up`'s pipe open.
            let stdout = nix::fcntl::fcntl(1, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(0)).map(|fd| unsafe { File::from_raw_fd(fd) }).ok();
            // fd 1 now points at /dev/null: later prints must not keep the pipe open.
            if let Ok(null) = File::options().write(true).open("/dev/null") {
                use std::os::fd::AsRawFd;
                let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
            }
            stdout
        });
        // A socket that cannot be used does not stop the daemon: it serves, and systemd, which
        // never hears READY=1, fails the start after its timeout; the log says why.
        let notifier = Notifier::take_from_env().unwrap_or_else(|e| {
            tracing::error!("{e}");
            None
        });
        Readiness { pipe, systemd: Systemd(notifier.map(Arc::new)) }
    }

    fn report(&mut self, line: &str) {
        if let Some(mut pipe) = self.pipe.take() {
            let _ = writeln!(pipe, "{line}");
        }
    }

    fn failed(&mut self, error: &DaemonError) {
        self.report(&format!("ERROR: {error}"));
        self.systemd.send(&format!("STATUS=cannot start: {error}"));
    }

    /// The control socket listens: requests are answered from now on.
    fn ready(&mut self, engine: &Engine) {
        self.report("READY");
        let summary = summary(&engine.status());
        self.systemd.send(&format!("READY=1\nMAINPID={}\nSTATUS={summary}", std::process::id()));
        self.systemd.follow_status(engine.clone(), summary);
    }
}

/// The service manager, when it started this daemon with `Type=notify`.
#[derive(Clone)]
struct Systemd(Option<Arc<Notifier>>);

impl Systemd {
    /// A message that cannot be sent is logged: systemd then misses a status line, or fails
    /// the start after its timeout, and the log says why.
    fn send(&self, message: &str) {
        if let Some(notifier) = &self.0 {
            if let Err(e) = notifier.notify(message) {
                tracing::warn!("{e}");
            }
        }
    }

    /// Sent once the stop can no longer be refused (the device is free): from then on systemd
    /// waits for the process to exit instead of treating its exit as a failure.
    fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping: demoted, telling the peers, writing clean metadata");
    }

    /// `systemctl status` shows the role, disk, peers and quorum: a status line is sent whenever
    /// they change. Checked once a second, which costs one status snapshot.
    fn follow_status(&self, engine: Engine, mut last: String) {
        if self.0.is_none() {
            return;
        }
        let systemd = self.clone();
        std::thread::Builder::new()
            .name("sd-status".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(1));
                let now = summary(&engine.status());
                if now != last {
                    systemd.send(&format!("STATUS={now}"));
                    last = now;
                }
            })
            .expect("spawn status thread");
    }
}

/// One line for `systemctl status`: what an operator checks first.
fn summary(s: &ResourceStatus) -> String {
    let connected = s.peers.iter().filter(|p| p.connection == "Connected").count();
    let mut line = format!(
        "{}, disk {}, {connected} of {} peers connected, quorum {}",
        s.role,
        s.disk,
        s.peers.len(),
        if s.quorum { "yes" } else { "no" }
    );
    if s.peers.iter().any(|p| p.resync.is_some()) {
        line += ", resyncing";
    }
    if let Some(device) = &s.device {
        line += &format!(", device {device}");
    }
    line
}

/// Runs the daemon until `down` (or SIGTERM/SIGINT) stops it.
pub fn run(config: ResourceConfig, me: NodeConfig, run_dir: &Path, mut ready: Readiness) -> Result<(), DaemonError> {
    let result = start(config, me, run_dir);
    let (engine, listener, _lock) = match result {
        Ok(started) => started,
        Err(e) => {
            ready.failed(&e);
            return Err(e);
        }
    };
    tracing::info!(resource = engine.resource(), "up");
    for warning in engine.config_warnings() {
        tracing::warn!(resource = engine.resource(), "{warning}");
    }
    if !engine.has_secret() {
        tracing::warn!(resource = engine.resource(), "trusted_network = true: peers are not authenticated, and any host that reaches the replication port can connect as one");
    }
    spawn_signal_handler(engine.clone(), ready.systemd.clone());
    ready.ready(&engine);
    let systemd = ready.systemd.clone();
    server::serve(&listener, &engine, move || systemd.stopping());
    // Stopped cleanly: nothing listens on the socket any more.
    if let Some(path) = listener.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf)) {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

type Started = (Engine, std::os::unix::net::UnixListener, Flock<File>);

fn start(config: ResourceConfig, me: NodeConfig, run_dir: &Path) -> Result<Started, DaemonError> {
    config.check_authenticates()?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(run_dir)
        .map_err(|source| DaemonError::RunDir { path: run_dir.to_owned(), source })?;
    let lock = take_lock(&config.name, &me.name, run_dir)?;
    let socket = control::socket_path(run_dir, &config.name, &me.name);
    // Bound before anything starts: a port in use is a start-up error `up` reports.
    let metrics = me.metrics_address.map(crate::metrics::bind).transpose()?;
    let handlers = config.handlers.clone();
    let fencing = config.fencing;
    let engine = Engine::open(config, me, run_dir)?;
    // Before any link is up: the first loss as primary may call for it.
    crate::handlers::fence::install(&engine, fencing, &handlers);
    engine.start()?;
    if let Some(listener) = metrics {
        crate::metrics::spawn(listener, engine.clone())?;
    }
    crate::handlers::spawn(&engine, handlers).map_err(DaemonError::Handlers)?;
    engine.resume_export();
    let listener = server::bind(&socket).map_err(|source| DaemonError::Control { path: socket, source })?;
    Ok((engine, listener, lock))
}

fn take_lock(resource: &str, node: &str, run_dir: &Path) -> Result<Flock<File>, DaemonError> {
    let path = control::lock_path(run_dir, resource, node);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|source| DaemonError::RunDir { path: path.clone(), source })?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            let _ = lock.set_len(0);
            let _ = writeln!(lock, "{}", std::process::id());
            Ok(lock)
        }
        Err((_, _)) => {
            let pid = std::fs::read_to_string(&path).map(|p| format!(" by pid {}", p.trim())).unwrap_or_default();
            Err(DaemonError::AlreadyUp { resource: resource.into(), node: node.into(), path, pid })
        }
    }
}

/// SIGTERM/SIGINT (systemd stop, Ctrl-C) mean `down`. Signals are blocked in every thread and
/// taken synchronously by one, so no handler runs in an arbitrary thread's context.
pub fn block_termination_signals() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    let _ = set.thread_block();
}

fn spawn_signal_handler(engine: Engine, systemd: Systemd) {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut set = SigSet::empty();
            set.add(Signal::SIGTERM);
            set.add(Signal::SIGINT);
            loop {
                let Ok(signal) = set.wait() else { return };
                tracing::info!(?signal, "stopping on signal");
                match engine.shutdown(|| systemd.stopping()) {
                    Ok(()) => std::process::exit(0),
                    Err(e) => tracing::error!(error = %e, "cannot stop: {e}"),
                }
            }
        })
        .expect("spawn signal thread");
}
