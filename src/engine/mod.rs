//! The drivers: backing-disk I/O, peer connections, resync, admin operations. They feed events
//! into the pure pieces of [`crate::core`] and carry out what those decide.

mod admission;
mod congestion;
mod connection;
mod dial_pacing;
mod error;
mod handshake;
mod counters;
mod host;
mod io_pool;
mod link;
mod locked;
mod shared;
mod timer;
mod resync;
mod state;
mod status;
mod verify;
mod write_path;

pub use counters::{CountersSnapshot, HistogramSnapshot};
pub use error::EngineError;
pub use shared::{Engine, FenceRunner};
pub use status::{ByteRange, PeerStatus, ResourceStatus, ResyncStatus, VerifyStatus, WAITING_FOR_BITMAPS};

use crate::config::{Frontend, NodeConfig, OnCongestion, ResourceConfig, Transport, UblkSettings};
use crate::core::states::{DiskState, Role};
use crate::disk::{Disk, DiskError, FileDisk};
use crate::frontend::nbd::NbdServer;
use crate::frontend::ublk::{UblkExport, UblkPlan};
use crate::frontend::{BlockDevice, Export};
use crate::meta::MetaStore;
use crate::quiet_condvar::QuietCondvar;
use io_pool::IoPool;
use crate::replica::{Attached, FenceOutcome, Peer, PromoteRefusal, PromoteStep, Replica};
use host::{machine_boot_id, random_u64};
use locked::Locked;
use shared::Shared;
use state::State;
use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Threads doing local disk I/O for the frontends.
const IO_THREADS: usize = 4;

/// How long `secondary` waits for the device's last user to finish going before it refuses.
const IN_USE_GRACE: Duration = Duration::from_secs(1);

/// How long `primary` waits for a resync between this node and a peer to end when only that
/// resync stands in its way (see `Engine::promote`).
const RESYNC_GRACE: Duration = Duration::from_secs(30);

/// Why a device a previous daemon left behind is attached failing at once.
const NOT_SERVING_WHEN_LEFT: &str =
    "the previous daemon had stopped serving it (it failed every request, or that daemon was not primary when it died)";

/// A witness's metadata store: big enough for the smallest layout, its "data" never used.
const WITNESS_STORE_BYTES: u64 = 4 << 20;

/// Creates a witness's metadata on `store`.
fn create_witness_store(config: &ResourceConfig, me: &NodeConfig, store: Arc<dyn Disk>, force: bool) -> Result<(), EngineError> {
    let params = crate::meta::MetaParams {
        max_peers: (config.nodes.len() - 1) as u8,
        bitmap_block_size: config.bitmap_block_size,
        al_extents: crate::meta::layout::MIN_AL_EXTENTS,
    };
    let peers: Vec<u8> = config.peers_of(me).map(|p| p.id).collect();
    MetaStore::create(store, WITNESS_STORE_BYTES, true, params, &config.name, me.id, &peers, force)?;
    Ok(())
}




impl Engine {
    /// Opens the disks and metadata, recovers from a crash as primary, and starts as Secondary.
    /// No network activity yet: see [`Engine::start`]. `run_dir` holds the node's run-time files.
    pub fn open(config: ResourceConfig, me: NodeConfig, run_dir: &Path) -> Result<Engine, EngineError> {
        let Some(disk) = &me.disk else {
            return Engine::open_witness(config, me, run_dir);
        };
        let data: Arc<dyn Disk> = Arc::new(FileDisk::open(disk)?);
        let meta_disk = match &me.meta_disk {
            Some(path) => Some(Arc::new(FileDisk::open(path)?) as Arc<dyn Disk>),
            None => None,
        };
        Engine::open_on(config, me, data, meta_disk, run_dir)
    }

    /// A diskless witness: it keeps no data, only votes. It runs over a small metadata store of
    /// its own, so one code path serves data nodes and witnesses: what it learns (the newest
    /// primary generation it saw) lives there. With `meta_disk` that store is a file and
    /// survives a restart; without, it is in memory and starts fresh each time.
    fn open_witness(config: ResourceConfig, me: NodeConfig, run_dir: &Path) -> Result<Engine, EngineError> {
        let store: Arc<dyn Disk> = match &me.meta_disk {
            Some(path) if !path.exists() => {
                return Err(EngineError::Refused(format!(
                    "the witness's metadata file {} does not exist: run `blkrepl create-md {}` on this node first",
                    path.display(),
                    config.name
                )))
            }
            Some(path) => Arc::new(FileDisk::open(path)?),
            None => {
                let store: Arc<dyn Disk> = Arc::new(crate::disk::MemDisk::new(WITNESS_STORE_BYTES as usize));
                create_witness_store(&config, &me, store.clone(), true)?;
                store
            }
        };
        Engine::open_on(config, me, store, None, run_dir)
    }

    /// Creates a witness's metadata file at its `meta_disk` (see `Engine::open_witness`);
    /// an existing one is kept unless `force`.
    pub fn create_witness_metadata(config: &ResourceConfig, me: &NodeConfig, force: bool) -> Result<PathBuf, EngineError> {
        let path = me.meta_disk.clone().ok_or_else(|| EngineError::Refused("this witness has no meta_disk".into()))?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .and_then(|file| if file.metadata()?.len() < WITNESS_STORE_BYTES { file.set_len(WITNESS_STORE_BYTES) } else { Ok(()) });
        file.map_err(|source| DiskError::Open { path: path.clone(), source })?;
        create_witness_store(config, me, Arc::new(FileDisk::open(&path)?), force)?;
        Ok(path)
    }

    /// [`Engine::open`] on given disks: tests use in-memory and fault-injecting ones.
    /// `meta_disk == None` means internal metadata on `data`.
    pub fn open_on(
        config: ResourceConfig,
        me: NodeConfig,
        data: Arc<dyn Disk>,
        meta_disk: Option<Arc<dyn Disk>>,
        run_dir: &Path,
    ) -> Result<Engine, EngineError> {
        let internal = meta_disk.is_none();
        let meta_disk = meta_disk.unwrap_or_else(|| data.clone());
        let data_disk_len =
            data.len().map_err(|source| DiskError::Open { path: me.disk.clone().unwrap_or_default(), source })?;
        let (meta, loaded) = MetaStore::open(meta_disk, data_disk_len, internal, &config.name, me.id)?;
        let sb = loaded.superblock;

        let mut in_meta: Vec<u8> = sb.peers.iter().map(|p| p.node_id).collect();
        let mut in_config: Vec<u8> = config.peers_of(&me).map(|p| p.id).collect();
        in_meta.sort_unstable();
        in_config.sort_unstable();
        if in_meta != in_config {
            let disk = me.disk.as_ref().map_or_else(|| "(witness)".into(), |d| d.display().to_string());
            return Err(EngineError::PeersChanged { disk, in_meta, in_config });
        }

        let crashed_primary = loaded.crashed_as_primary;
        // Before any link is up: the replica decides whether that device serves again from
        // the generation it served (see `replica/left_behind.rs`).
        let left_behind = match &me.frontend {
            Frontend::Ublk(settings) => {
                UblkPlan::new(*settings, &config.name, &me.name, run_dir, sb.data_size, config.logical_block_size).left_behind()
            }
            _ => None,
        };
        let peers: Vec<Peer> = sb
            .peers
            .iter()
            .enumerate()
            .map(|(slot, p)| {
                let node = config.node_by_id(p.node_id).expect("peer ids checked against the config");
                Peer::new(p.node_id, node.name.clone(), slot, node.disk.is_none())
            })
            .collect();
        let data_size_bytes = sb.data_size;
        let links = peers.iter().map(|p| (p.node_id, None)).collect();
        let replica = Replica::attach(Attached {
            resource: config.name.clone(),
            witness: me.disk.is_none(),
            timing: config.timing,
            protocol: config.protocol,
            congestion_fill: match config.on_congestion {
                OnCongestion::Block => None,
                OnCongestion::PullAhead { fill_bytes } => Some(fill_bytes),
            },
            send_queue_bytes: link::BULK_QUEUE_LIMIT_BYTES,
            resync_rate: config.resync_rate(),
            sb,
            bitmaps: loaded.bitmaps,
            al: loaded.activity_log,
            crashed_primary,
            left_behind_device: left_behind.is_some_and(|d| !d.failing),
            peers,
            quorum_policy: config.quorum,
            on_no_quorum: config.on_no_quorum,
            split_brain: config.split_brain,
            fencing: config.fencing,
            on_superseded: config.on_superseded,
            now: std::time::Instant::now(),
            uuid_seed: random_u64(),
            boot_id: machine_boot_id(),
        });
        let left_behind = left_behind.map(|d| {
            let waiting = if replica.has_left_behind() { "waiting for the peers' state" } else { NOT_SERVING_WHEN_LEFT };
            (d.id, waiting.to_owned())
        });
        let state = State {
            replica,
            meta,
            links,
            requests: HashMap::new(),
            next_request: 0,
            export: None,
            export_failing: None,
            left_behind,
            stepping_down: false,
        };
        let io = IoPool::new(data.clone(), IO_THREADS).map_err(EngineError::Thread)?;
        let tls = match (config.transport, &config.tls_ca, &me.certificate) {
            (Transport::Plain, _, _) => None,
            (Transport::Tls, Some(ca), Some(own)) => Some(crate::tls::LinkTls::with_certificates(ca, own, &me.name)?),
            (Transport::Tls, _, _) => Some(crate::tls::LinkTls::for_this_run()?),
        };
        let shared = Arc::new_cyclic(|this| Shared {
            this: this.clone(),
            config,
            me,
            data,
            data_size_bytes,
            io,
            counters: counters::Counters::new(),
            state: Mutex::new(state),
            changed: QuietCondvar::new(),
            timer: QuietCondvar::new(),
            dial: QuietCondvar::new(),
            run_dir: run_dir.to_owned(),
            admin: Mutex::new(()),
            fence_runner: std::sync::OnceLock::new(),
            tls,
        });
        let engine = Engine { shared };
        // What attaching queued (the activity log emptied after a crash as primary) is written
        // as the lock is released.
        drop(engine.shared.lock());
        engine.refuse_if_disk_failed()?;
        Ok(engine)
    }

    /// Starts listening for peers and dialing them.
    pub fn start(&self) -> Result<(), EngineError> {
        let address = self.shared.me.address;
        let listener = TcpListener::bind(address).map_err(|source| EngineError::Listen { address, source })?;
        connection::spawn_listener(self.shared.clone(), listener).map_err(EngineError::Thread)?;
        connection::spawn_dialers(&self.shared).map_err(EngineError::Thread)?;
        timer::spawn(self.shared.clone()).map_err(EngineError::Thread)?;
        Ok(())
    }

    pub fn resource(&self) -> &str {
        &self.shared.config.name
    }

    /// Risky settings of the resource file (see [`ResourceConfig::warnings`]).
    pub fn config_warnings(&self) -> Vec<String> {
        self.shared.config.warnings()
    }

    /// Whether peers must prove they know the shared secret.
    pub fn has_secret(&self) -> bool {
        self.shared.config.secret.is_some()
    }

    pub fn status(&self) -> ResourceStatus {
        status::build(&self.shared, &mut self.shared.lock())
    }

    /// The drivers' counters (latencies, writes in flight, metadata writes), read without the
    /// engine lock.
    pub fn counters(&self) -> CountersSnapshot {
        self.shared.counters.snapshot()
    }

    /// Installs what runs the `fence-peer` handler (the daemon's `handlers::fence`); the first
    /// one stays. Without one, a fence the replica asks for fails at once (as a handler that
    /// cannot run).
    pub fn set_fence_runner(&self, runner: FenceRunner) {
        let _ = self.shared.fence_runner.set(runner);
    }

    /// The `fence-peer` run for `peer`'s lost connection `generation` ended with `outcome`.
    pub fn fence_done(&self, peer: u8, generation: u64, outcome: FenceOutcome) {
        self.shared.lock().replica.fence_done(Instant::now(), peer, generation, outcome);
        self.shared.changed.notify_all();
    }

    /// `resume-io`: ends what fencing holds or fails (see `Replica::resume_io`).
    pub fn resume_io(&self) -> Result<(), EngineError> {
        self.shared.lock().replica.resume_io(Instant::now()).map_err(EngineError::Refused)?;
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Starts an online verify with every connected peer it can run against; returns their
    /// names. Progress and findings are in `status`.
    pub fn verify(&self) -> Result<Vec<String>, EngineError> {
        verify::start(&self.shared)
    }

    /// Discards this node's data and resyncs all of it from a connected UpToDate peer; returns
    /// that peer's name.
    pub fn invalidate(&self) -> Result<String, EngineError> {
        let mut st = self.shared.lock();
        let name = st.replica.invalidate().map_err(EngineError::Refused)?;
        drop(st);
        self.shared.changed.notify_all();
        self.refuse_if_disk_failed()?;
        Ok(name)
    }

    /// Before a promotion (with the admin lock): a device that fails every request (this node
    /// stepped down, or gave up a device a crashed daemon left behind) never serves again, as
    /// what its holders cached may no longer be what the disk holds (another primary wrote,
    /// and this node was resynced). Refused while it is in use; otherwise it goes now, and the
    /// promotion exports a device afresh.
    fn retire_failing_export(&self) -> Result<(), EngineError> {
        let mut st = self.shared.lock();
        let Some(why) = st.export_failing.clone() else { return Ok(()) };
        if let Some((device, users)) = st.export.as_ref().and_then(|e| e.users().map(|users| (e.device(), users))) {
            return Err(EngineError::FailingDeviceInUse { device, why, users });
        }
        let export = st.export.take();
        st.export_failing = None;
        drop(st);
        stop_export(&self.shared.config.name, export);
        Ok(())
    }

    /// After a command whose metadata writes were carried out as the lock was released: a
    /// failed one left the disk Failed.
    fn refuse_if_disk_failed(&self) -> Result<(), EngineError> {
        match self.shared.lock().replica.disk {
            DiskState::Failed => Err(EngineError::DiskFailed),
            _ => Ok(()),
        }
    }

    /// Promotes this node to Primary and exports the device.
    pub fn promote(&self, force: bool) -> Result<(), EngineError> {
        let shared = &self.shared;
        let _admin = shared.admin();
        // A device left behind that the replica gave up, and that could not be attached failing
        // then: attached failing first, so this promotion never re-attaches it serving.
        let given_up = {
            let st = shared.lock();
            st.left_behind.is_some() && !st.replica.has_left_behind()
        };
        if given_up {
            self.fail_left_behind("given up earlier: the data may have changed under it")?;
        }
        self.retire_failing_export()?;
        let mut st = self.wait_for_quorum(shared.lock());
        if st.replica.role == Role::Primary {
            return Ok(());
        }
        // Under quorum the votes are asked for; their answers arrive on the reader threads.
        let resync_deadline = Instant::now() + RESYNC_GRACE;
        // Whether a resync ran while the votes were asked: it can end, on the reader thread,
        // between a target's refusal and this thread's next look (CI, `tests/chaos.rs`: the
        // target refused its vote, then sent the State that ended the resync; the promotion
        // saw no resync and failed).
        let mut resync_seen = false;
        let undo = loop {
            resync_seen |= in_resync(&st.replica);
            match st.replica.promote(Instant::now(), force) {
                Ok(PromoteStep::Promoted(undo)) => break undo,
                Ok(PromoteStep::Waiting) => st = st.wait_timeout(Duration::from_millis(5)),
                Err(PromoteRefusal::LeftBehindStale { why }) => {
                    drop(st);
                    self.fail_left_behind(&why)?;
                    return Err(PromoteRefusal::LeftBehindStale { why }.into());
                }
                // Once a primary is gone, its secondaries resync between them what they applied
                // lately (its last writes may have reached some and not others), and a resync
                // target neither promotes nor gives a vote: a cluster manager's promotion right
                // after the loss met that nearly every time (59 of 60 cycles of
                // `tests/chaos.rs` with three data nodes). The resync is short (a few seconds of
                // writes), so the promotion waits for it and asks again, rather than fail.
                Err(refusal @ (PromoteRefusal::NoQuorum { .. } | PromoteRefusal::BeingResynced { .. })) => {
                    if !(resync_seen || in_resync(&st.replica)) || Instant::now() >= resync_deadline {
                        return Err(refusal.into());
                    }
                    tracing::info!(resource = %shared.config.name, %refusal, "promotion waits for a resync with a peer to end");
                    while in_resync(&st.replica) && Instant::now() < resync_deadline {
                        st = st.wait_timeout(Duration::from_millis(20));
                    }
                    resync_seen = false;
                }
                Err(refusal) => return Err(refusal.into()),
            }
        };
        drop(st);
        // The promotion's metadata write was carried out as the lock was released.
        let started = self.refuse_if_disk_failed().and_then(|()| self.start_export(false));
        let mut st = shared.lock();
        match started {
            Ok(export) => {
                st.export = export;
                st.export_failing = None;
                st.left_behind = None;
            }
            Err(e) => {
                st.replica.promotion_failed(undo);
                return Err(e);
            }
        }
        tracing::info!(resource = %shared.config.name, force, device = st.export.as_ref().map(|e| e.device()).unwrap_or_default(), "exporting");
        st.replica.promoted();
        shared.changed.notify_all();
        Ok(())
    }

    /// Starts this node's configured export of the device (nothing, NBD, or ublk). Called
    /// without the state lock: a starting ublk device reads its partition table from us.
    fn start_export(&self, failing: bool) -> Result<Option<Export>, EngineError> {
        let shared = &self.shared;
        let device: Arc<dyn BlockDevice> = Arc::new(self.clone());
        match &shared.me.frontend {
            Frontend::None => Ok(None),
            Frontend::Nbd(address) => {
                let mut server =
                    NbdServer::bind(address).map_err(|source| EngineError::Nbd { url: address.url(&shared.config.name), source })?;
                if shared.config.nbd_tls {
                    let tls = shared.tls.as_ref().and_then(|tls| tls.export_config());
                    server = server.require_tls(tls.expect("nbd_tls needs tls_ca, which makes the links' TLS use certificates"));
                }
                let export_name = shared.config.name.clone();
                Ok(Some(Export::Nbd { handle: server.serve(&export_name, device), export_name }))
            }
            Frontend::Ublk(settings) => {
                let ublk = UblkExport::start(&self.ublk_plan(settings), device, failing)?;
                Ok(Some(Export::Ublk(Box::new(ublk))))
            }
        }
    }

    fn ublk_plan(&self, settings: &UblkSettings) -> UblkPlan {
        let shared = &self.shared;
        UblkPlan::new(
            *settings,
            &shared.config.name,
            &shared.me.name,
            &shared.run_dir,
            shared.data_size_bytes,
            shared.config.logical_block_size,
        )
    }

    /// After a restart: a ublk device the previous daemon left behind when it died as primary
    /// (its I/O held by the kernel, found by [`Engine::open_on`]) is re-attached by a promotion
    /// as soon as this node may be primary again, so a filesystem mounted on it carries on. The
    /// replica refuses that promotion for good once the data may have changed under the device
    /// (another node was primary meanwhile): the device is then attached failing every request
    /// (see `replica/left_behind.rs`).
    pub fn resume_export(&self) {
        let (found, resumable) = {
            let st = self.shared.lock();
            (st.left_behind.clone(), st.replica.has_left_behind())
        };
        let Some((id, _)) = found else { return };
        if !resumable {
            let _admin = self.shared.admin();
            if let Err(e) = self.fail_left_behind(NOT_SERVING_WHEN_LEFT) {
                tracing::error!(resource = %self.shared.config.name, error = %e, "cannot attach the device left behind");
            }
            return;
        }
        tracing::warn!(resource = %self.shared.config.name, device = id,
            "the previous daemon died as primary and left /dev/ublkb{id} behind with its I/O held; re-attaching it once this node may be primary again");
        let engine = self.clone();
        std::thread::Builder::new()
            .name("resume-export".into())
            .spawn(move || engine.resume())
            .expect("failed to start the thread that resumes the export");
    }

    /// Tries the promotion that re-attaches the device left behind once a second, until it is
    /// re-attached or given up (by this promotion, an operator's, or a demotion).
    fn resume(&self) {
        let shared = &self.shared;
        loop {
            {
                let st = shared.lock();
                if st.left_behind.is_none() || st.replica.stopping {
                    return;
                }
            }
            match self.promote(false) {
                Ok(()) => return,
                Err(e) => {
                    let mut st = shared.lock();
                    if let Some((_, why)) = st.left_behind.as_mut() {
                        *why = format!("waiting to be primary again: {e}");
                    }
                    drop(st.wait_timeout(Duration::from_secs(1)));
                }
            }
        }
    }

    /// Attaches a device left behind failing every request (a host can then unmount it), and
    /// tells the replica it is given up. Needs the admin lock.
    fn fail_left_behind(&self, why: &str) -> Result<(), EngineError> {
        let shared = &self.shared;
        let Some((id, _)) = shared.lock().left_behind.clone() else { return Ok(()) };
        let export = self.start_export(true)?;
        let reason = format!("{why}; it fails every request rather than serve stale data: unmount it, then `blkrepl secondary {}`", shared.config.name);
        tracing::error!(resource = %shared.config.name, device = id, "/dev/ublkb{id} {reason}");
        let mut st = shared.lock();
        st.export = export;
        st.export_failing = Some(reason);
        st.left_behind = None;
        st.replica.give_up_left_behind();
        Ok(())
    }

    /// Demotes to Secondary: refuses while the device is in use; otherwise waits for in-flight
    /// writes and makes everything durable on this node and its connected peers. A device that
    /// fails every request (see [`Engine::resume_export`]) goes away too, once unused.
    pub fn demote(&self) -> Result<(), EngineError> {
        let shared = &self.shared;
        let _admin = shared.admin();
        // A device still left behind must first be attached (failing): its holders could never
        // unmount it while its I/O is held.
        self.fail_left_behind("demoted by the operator")?;
        // A user that is just going (an NBD client whose disconnect is being processed, a
        // device just unmounted) gets a moment: `umount && blkrepl secondary` must not race.
        let deadline = Instant::now() + IN_USE_GRACE;
        let mut st = loop {
            let st = shared.lock();
            let users = st.export.as_ref().and_then(|e| e.users().map(|users| (e.device(), users)));
            match users {
                None => break st,
                Some((device, users)) if Instant::now() >= deadline => return Err(EngineError::InUse { device, users }),
                Some(_) => {
                    drop(st);
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        if st.replica.role != Role::Primary {
            let export = st.export.take();
            st.export_failing = None;
            drop(st);
            stop_export(&shared.config.name, export);
            return Ok(());
        }
        let export = st.export.take();
        self.leave_primary(st, export)?;
        tracing::info!(resource = %shared.config.name, "demoted to Secondary");
        Ok(())
    }

    /// Becomes Secondary (needs the admin lock; see `Replica::begin_demotion`): the export taken
    /// out of the state stops, and every write is made durable before the metadata says this
    /// node is no longer primary.
    fn leave_primary(&self, mut st: Locked<'_>, export: Option<Export>) -> Result<(), EngineError> {
        let shared = &self.shared;
        // A detached disk (see `Replica::detach`) is written no more: its metadata keeps
        // saying primary, which the next attach treats as a crash. The demotion itself holds.
        let detached = st.replica.detached();
        st.replica.begin_demotion(Instant::now());
        // The export's removal waits for requests in flight: the held ones fail first (as the
        // lock is released).
        drop(st);
        stop_export(&shared.config.name, export);
        self.flush_all();
        let mut st = shared.lock();
        st.replica.finish_demotion();
        drop(st);
        shared.changed.notify_all();
        if detached {
            return Ok(());
        }
        self.refuse_if_disk_failed()
    }

    /// Steps down by itself (`on_suspended_primary_outdated = "force-secondary"`, see
    /// [`step_down_if_superseded`]): this primary lost quorum, and a connected node reports
    /// another primary, promoted meanwhile by the majority. Nothing it holds was acknowledged and
    /// its data lacks the new primary's writes, so it fails what it holds, becomes Secondary and
    /// Outdated, and resyncs from the new primary like any node that fell behind (it started no
    /// generation without quorum, so the new primary's history holds its own). Its export goes:
    /// NBD clients are disconnected; a ublk device in use fails every request (the filesystem
    /// above sees EIO) until nothing holds it, then goes.
    fn step_down(&self) {
        let shared = &self.shared;
        let _admin = shared.admin();
        let mut st = shared.lock();
        st.stepping_down = false;
        let Some(why) = st.replica.step_down(Instant::now()) else { return };
        // A device in use cannot go at once: it fails every request until nothing holds it.
        let keep_failing = matches!(&st.export, Some(Export::Ublk(ublk)) if ublk.users().is_some());
        let export = if keep_failing {
            if let Some(Export::Ublk(ublk)) = &st.export {
                ublk.fail_from_now_on();
            }
            st.export_failing = Some(format!("{why}; it fails every request until it is unmounted, then goes away"));
            None
        } else {
            st.export.take()
        };
        // The demotion's end decides again with every peer (`Replica::finish_demotion`).
        if let Err(e) = self.leave_primary(st, export) {
            tracing::error!(resource = %shared.config.name, error = %e, "stepping down failed");
        }
        if keep_failing {
            self.retire_export_when_unused();
        }
    }

    /// Removes a device that fails every request once nothing holds it any more (the host
    /// unmounted it), unless this node was promoted again meanwhile.
    fn retire_export_when_unused(&self) {
        let engine = self.clone();
        let spawned = std::thread::Builder::new().name("retire-export".into()).spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            let shared = &engine.shared;
            let _admin = shared.admin();
            let mut st = shared.lock();
            if st.replica.stopping || st.replica.role == Role::Primary || st.export_failing.is_none() {
                return;
            }
            if st.export.as_ref().is_some_and(|e| e.users().is_none()) {
                let export = st.export.take();
                st.export_failing = None;
                drop(st);
                stop_export(&shared.config.name, export);
                return;
            }
        });
        if let Err(e) = spawned {
            tracing::error!(resource = %self.shared.config.name, error = %e,
                "cannot watch the failing device: it goes at `blkrepl secondary` once unmounted");
        }
    }

    /// Waits for every in-flight write, then flushes locally and on connected peers.
    fn flush_all(&self) {
        {
            let mut st = self.shared.lock();
            while !st.replica.writes_idle() {
                st = st.wait();
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        write_path::submit(&self.shared, crate::frontend::BlockRequest::Flush, Box::new(move |result| drop(tx.send(result))), false);
        if let Ok(Err(e)) = rx.recv() {
            tracing::warn!(resource = %self.shared.config.name, error = %e, "flush at demotion failed");
        }
    }

    /// Lets the node (re)connect to every peer. With `discard_my_data`, this node offers
    /// itself as the victim of a split brain: its changes since the split are overwritten.
    pub fn connect(&self, discard_my_data: bool) -> Result<(), EngineError> {
        self.shared.lock().replica.connect_wanted(discard_my_data).map_err(EngineError::Refused)?;
        self.shared.changed.notify_all();
        self.shared.dial.notify_all();
        Ok(())
    }

    /// Quorum as this node would have it as primary: peers count only with a valid lease. A
    /// peer that connected a moment ago gets up to one lease period to answer its first ping.
    fn wait_for_quorum<'a>(&'a self, mut st: Locked<'a>) -> Locked<'a> {
        let deadline = std::time::Instant::now() + self.shared.config.timing.lease();
        loop {
            let now = Instant::now();
            let quorum = st.replica.quorum_with_leases(now, true);
            let pending = st.replica.quorum_with_leases(now, false) != quorum;
            if quorum.has_quorum || !pending || std::time::Instant::now() >= deadline {
                return st;
            }
            st = st.wait_timeout(Duration::from_millis(20));
        }
    }

    /// Drops every peer connection and stays StandAlone until `connect`.
    pub fn disconnect(&self) {
        self.shared.lock().replica.stand_alone("disconnected by the operator");
        self.shared.dial.notify_all();
    }

    /// Starts a new data generation on two fresh nodes and declares them in sync without copying
    /// (both disks hold nothing of value yet), or with `clear_bitmap == false` simply begins a
    /// new generation on this node.
    pub fn new_current_uuid(&self, clear_bitmap: bool) -> Result<(), EngineError> {
        self.shared.lock().replica.new_current_uuid(clear_bitmap).map_err(EngineError::Refused)?;
        self.refuse_if_disk_failed()
    }

    /// Re-reads the resource file and applies `quorum`, `on_no_quorum` and `after_sb_*` at
    /// once. Other settings only take effect at the next `up`: a difference in them is refused
    /// rather than half-applied.
    pub fn adjust(&self) -> Result<(), EngineError> {
        let running = &self.shared.config;
        let dir = running.path.parent().unwrap_or(std::path::Path::new("."));
        let new = ResourceConfig::load(dir, &running.name).map_err(|e| EngineError::Refused(e.to_string()))?;
        let mut rest = new.clone();
        (rest.quorum, rest.on_no_quorum, rest.split_brain) = (running.quorum, running.on_no_quorum, running.split_brain);
        if rest != *running {
            return Err(EngineError::Refused(format!(
                "{} changed in more than quorum, on_no_quorum and after_sb_*: those other changes need `blkrepl down` and `up`",
                running.path.display()
            )));
        }
        self.shared.lock().replica.adjust_policies(Instant::now(), new.quorum, new.on_no_quorum, new.split_brain);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Orderly stop: refuses while the device is in use; demotes, tells the peers, and leaves
    /// clean metadata (bitmaps written with their checksums, activity log clean). `stopping`
    /// runs once the stop can no longer be refused (demoted, the device gone), so a service
    /// manager told then that the daemon is stopping is never told wrong.
    pub fn shutdown(&self, stopping: impl FnOnce()) -> Result<(), EngineError> {
        self.demote()?;
        stopping();
        let shared = &self.shared;
        shared.lock().replica.leave();
        // Give the writers a moment to put the goodbye on the wire.
        std::thread::sleep(Duration::from_millis(50));
        let mut st = shared.lock();
        let ids: Vec<u8> = st.replica.peers.iter().map(|p| p.node_id).collect();
        let closing: Vec<_> = ids.into_iter().filter_map(|id| connection::drop_peer(shared, &mut st, id, "going down")).collect();
        drop(st);
        closing.into_iter().for_each(|link| link.finish());
        let mut st = shared.lock();
        // An activity-log transaction still being written (for a peer's write that came just
        // before its link went) ends first: the log is emptied after it.
        while !st.replica.writes_idle() {
            st = st.wait();
        }
        let State { meta, replica, .. } = &mut *st;
        if replica.detached() {
            tracing::warn!(resource = %shared.config.name, "the disk is Failed: its metadata stays as the failure left it, and the next `up` recovers it as after a crash");
        } else {
            // A crash marker not yet repaired stays in `sb` (see `Replica::clear_crash_marker`):
            // the next connection resyncs the activity log's extents, which are in the bitmaps.
            meta.clean_shutdown(&replica.sb, &mut replica.bitmaps, &mut replica.al)?;
        }
        shared.changed.notify_all();
        drop(st);
        shared.io.shutdown();
        tracing::info!(resource = %shared.config.name, "stopped");
        Ok(())
    }
}


/// Whether this node resyncs a peer or is resynced by one (or is about to): what a promotion
/// refused for want of votes, or for being resynced, waits out (see `Engine::promote`).
fn in_resync(replica: &Replica) -> bool {
    replica.sync_target_of().is_some() || replica.resyncs_other_than(None)
}

/// Stops an export taken out of the state; a ublk device that cannot be removed is logged (it
/// keeps its record in the run directory, so the next start finds it).
fn stop_export(resource: &str, export: Option<Export>) {
    if let Some(export) = export {
        let device = export.device();
        if let Err(error) = export.stop() {
            tracing::error!(resource, device, %error, "cannot remove the device");
        }
    }
}

impl crate::frontend::BlockDevice for Engine {
    fn size_bytes(&self) -> u64 {
        self.shared.data_size_bytes
    }

    fn block_size(&self) -> u32 {
        self.shared.config.logical_block_size
    }

    fn submit(&self, request: crate::frontend::BlockRequest, done: crate::frontend::Completion) {
        write_path::submit(&self.shared, request, done, false);
    }

    fn submit_from_loop(&self, request: crate::frontend::BlockRequest, done: crate::frontend::Completion) {
        write_path::submit(&self.shared, request, done, true);
    }
}

