//! One daemon per resource and node: lock, open, listen, serve the control socket, stop cleanly
//! on `down` or SIGTERM.

use crate::config::{NodeConfig, ResourceConfig};
use crate::control::{self, server};
use crate::engine::{Engine, EngineError};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{SigSet, Signal};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create run directory {path}: {source}")]
    RunDir { path: PathBuf, source: std::io::Error },
    #[error("resource {resource} is already up on node {node} (lock {path} is held{pid}); `blkrepl down {resource}` first")]
    AlreadyUp { resource: String, node: String, path: PathBuf, pid: String },
    #[error("cannot bind control socket {path}: {source}")]
    Control { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
}

/// Tells the `up` command that started this daemon how start-up went (a pipe on stdout), so
/// `up` returns only once the daemon listens, or prints why it could not.
pub struct Readiness(Option<File>);

impl Readiness {
    /// With `BLKREPL_READY_PIPE=1`, stdout is the pipe back to `blkrepl up`.
    pub fn from_env() -> Readiness {
        if std::env::var_os("BLKREPL_READY_PIPE").is_some() {
            use std::os::fd::FromRawFd;
            let stdout = nix::unistd::dup(1).map(|fd| unsafe { File::from_raw_fd(fd) }).ok();
            // fd 1 now points at /dev/null: later prints must not keep the pipe open.
            if let Ok(null) = File::options().write(true).open("/dev/null") {
                use std::os::fd::AsRawFd;
                let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
            }
            Readiness(stdout)
        } else {
            Readiness(None)
        }
    }

    fn report(&mut self, line: &str) {
        if let Some(mut pipe) = self.0.take() {
            let _ = writeln!(pipe, "{line}");
        }
    }
}

/// Runs the daemon until `down` (or SIGTERM/SIGINT) stops it.
pub fn run(config: ResourceConfig, me: NodeConfig, run_dir: &Path, mut ready: Readiness) -> Result<(), DaemonError> {
    let result = start(config, me, run_dir);
    let (engine, listener, _lock) = match result {
        Ok(started) => started,
        Err(e) => {
            ready.report(&format!("ERROR: {e}"));
            return Err(e);
        }
    };
    tracing::info!(resource = engine.resource(), "up");
    for warning in engine.config_warnings() {
        tracing::warn!(resource = engine.resource(), "{warning}");
    }
    if !engine.has_secret() {
        tracing::warn!(resource = engine.resource(), "no `secret` configured: any host that reaches the replication port can connect as a peer");
    }
    spawn_signal_handler(engine.clone());
    ready.report("READY");
    server::serve(&listener, &engine);
    // Stopped cleanly: nothing listens on the socket any more.
    if let Some(path) = listener.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf)) {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

type Started = (Engine, std::os::unix::net::UnixListener, Flock<File>);

fn start(config: ResourceConfig, me: NodeConfig, run_dir: &Path) -> Result<Started, DaemonError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(run_dir)
        .map_err(|source| DaemonError::RunDir { path: run_dir.to_owned(), source })?;
    let lock = take_lock(&config.name, &me.name, run_dir)?;
    let socket = control::socket_path(run_dir, &config.name, &me.name);
    // Bound before anything starts: a port in use is a start-up error `up` reports.
    let metrics = me.metrics_address.map(crate::metrics::bind).transpose()?;
    let engine = Engine::open(config, me, run_dir)?;
    engine.start()?;
    if let Some(listener) = metrics {
        crate::metrics::spawn(listener, engine.clone())?;
    }
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

fn spawn_signal_handler(engine: Engine) {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut set = SigSet::empty();
            set.add(Signal::SIGTERM);
            set.add(Signal::SIGINT);
            loop {
                let Ok(signal) = set.wait() else { return };
                tracing::info!(?signal, "stopping on signal");
                match engine.shutdown() {
                    Ok(()) => std::process::exit(0),
                    Err(e) => tracing::error!(error = %e, "cannot stop: {e}"),
                }
            }
        })
        .expect("spawn signal thread");
}
