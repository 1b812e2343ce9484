//! The state a resource's driver threads share, and the handle the rest of the daemon holds
//! (`Engine`, whose operations are in the engine's `mod.rs`).

use super::counters::Counters;
use super::io_pool::IoPool;
use super::state::State;
use crate::config::{NodeConfig, ResourceConfig};
use crate::disk::Disk;
use crate::quiet_condvar::QuietCondvar;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// The replication engine of one resource on this node. Cheap to clone (a handle).
#[derive(Clone)]
pub struct Engine {
    pub(super) shared: Arc<Shared>,
}

/// What every driver thread of a resource shares: its configuration, its disk, the engine's
/// state under its lock (see `Shared::lock` in `locked`) and the condition variables that
/// wake the threads waiting on it.
pub(crate) struct Shared {
    /// This, for what must outlive a borrow of it (protocol A's sent notifications).
    pub this: std::sync::Weak<Shared>,
    pub config: ResourceConfig,
    pub me: NodeConfig,
    pub data: Arc<dyn Disk>,
    pub data_size_bytes: u64,
    pub io: IoPool,
    /// What the drivers count for the metrics endpoint (atomics: never under `state`'s lock
    /// for their sake).
    pub counters: Counters,
    pub state: Mutex<State>,
    /// Signalled whenever in-flight writes, peers or roles change.
    pub changed: QuietCondvar,
    /// Wakes the timer thread (see `timer`) when a deadline may have moved closer.
    pub timer: QuietCondvar,
    /// Wakes the dialers (see `connection::spawn_dialers`) when a link went or `connect`
    /// wants one: not `changed`, which every frame signals.
    pub dial: QuietCondvar,
    /// Where this node's daemon keeps run-time files (the ublk device record).
    pub run_dir: PathBuf,
    /// Serializes role changes: a promotion starts the export without the state lock held (a
    /// ublk device reads from the engine while it starts), so nothing else may change the role
    /// meanwhile.
    pub admin: Mutex<()>,
    /// Runs the `fence-peer` handler (see [`Engine::set_fence_runner`]).
    pub fence_runner: std::sync::OnceLock<FenceRunner>,
    /// The peer links' TLS (`transport = "tls"`), or `None` for plain links.
    pub tls: Option<crate::tls::LinkTls>,
}

/// Starts a `fence-peer` run for a peer's lost connection (peer, connection generation); the
/// outcome comes back through [`Engine::fence_done`]. It must not wait for the run: it is called
/// from the thread that released the engine lock.
pub type FenceRunner = Box<dyn Fn(&Engine, u8, u64) + Send + Sync>;

impl Shared {
    pub(super) fn admin(&self) -> MutexGuard<'_, ()> {
        self.admin.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Once this primary was superseded, what `Replica::superseded_action` says: a step-down
/// (see [`Engine::step_down`]) runs on a thread of its own, once at a time.
pub(crate) fn step_down_if_superseded(shared: &Arc<Shared>, st: &mut State) {
    if st.stepping_down || !st.replica.superseded_action(Instant::now()) {
        return;
    }
    st.stepping_down = true;
    let engine = Engine { shared: shared.clone() };
    if let Err(e) = std::thread::Builder::new().name("step-down".into()).spawn(move || engine.step_down()) {
        st.stepping_down = false;
        tracing::error!(resource = %shared.config.name, error = %e, "cannot start stepping down; retried at the next state change");
    }
}
