//! The drivers: backing-disk I/O, peer connections, resync, admin operations. They feed events
//! into the pure pieces of [`crate::core`] and carry out what those decide.

mod congestion;
mod connection;
mod digests;
mod io_pool;
mod link;
mod resync;
mod state;
mod status;
mod verify;
mod write_path;

pub use status::{ByteRange, PeerStatus, ResourceStatus, ResyncStatus, VerifyStatus};

use crate::config::{NodeConfig, ResourceConfig};
use crate::core::inflight::InflightWrites;
use crate::core::states::{ConnState, DiskState, ReplState, Role};
use crate::core::sync_decision::UUID_JUST_CREATED;
use crate::core::transfer_log::TransferLog;
use crate::disk::{Disk, DiskError, FileDisk};
use crate::frontend::nbd::NbdServer;
use crate::meta::{MetaError, MetaFlags, MetaStore};
use io_pool::IoPool;
use state::{Deferred, Peer, State};
use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::net::TcpListener;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Threads doing local disk I/O for the frontends.
const IO_THREADS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("cannot listen on {address} for peers: {source} (is another daemon using this address?)")]
    Listen { address: std::net::SocketAddr, source: std::io::Error },
    #[error("metadata on {disk} was created for peer node ids {in_meta:?}, the resource file has {in_config:?}: run `blkrepl create-md --force` on this node (its data will be fully resynced)")]
    PeersChanged { disk: String, in_meta: Vec<u8>, in_config: Vec<u8> },
    #[error("this node's data is {disk}, not UpToDate: promote only a node with good data, or use `primary --force` to declare this node's data the good copy")]
    NotUpToDate { disk: DiskState },
    #[error("peer {peer} is primary: demote it first (`blkrepl secondary` there)")]
    PeerIsPrimary { peer: String },
    #[error("the device is in use by {clients} NBD client(s): disconnect them first")]
    InUse { clients: usize },
    #[error("cannot export NBD on {address}: {source}")]
    Nbd { address: std::net::SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Refused(String),
    #[error("writing metadata failed: {0}; the disk is marked Failed")]
    MetaWrite(MetaError),
}

impl EngineError {
    /// The CLI's exit code for this error (documented in docs/OPERATIONS.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            EngineError::NotUpToDate { .. } | EngineError::PeerIsPrimary { .. } | EngineError::Refused(_) => 11,
            EngineError::InUse { .. } => 12,
            _ => 1,
        }
    }
}

pub(crate) struct Shared {
    pub config: ResourceConfig,
    pub me: NodeConfig,
    pub data: Arc<dyn Disk>,
    pub data_size_bytes: u64,
    pub io: IoPool,
    pub state: Mutex<State>,
    /// Signalled whenever in-flight writes, peers or roles change.
    pub changed: Condvar,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("engine state lock poisoned")
    }
}

/// The replication engine of one resource on this node. Cheap to clone (a handle).
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    /// Opens the disks and metadata, recovers from a crash as primary, and starts as Secondary.
    /// No network activity yet: see [`Engine::start`].
    pub fn open(config: ResourceConfig, me: NodeConfig) -> Result<Engine, EngineError> {
        let data: Arc<dyn Disk> = Arc::new(FileDisk::open(&me.disk)?);
        let meta_disk = match &me.meta_disk {
            Some(path) => Some(Arc::new(FileDisk::open(path)?) as Arc<dyn Disk>),
            None => None,
        };
        Engine::open_on(config, me, data, meta_disk)
    }

    /// [`Engine::open`] on given disks: tests use in-memory and fault-injecting ones.
    /// `meta_disk == None` means internal metadata on `data`.
    pub fn open_on(
        config: ResourceConfig,
        me: NodeConfig,
        data: Arc<dyn Disk>,
        meta_disk: Option<Arc<dyn Disk>>,
    ) -> Result<Engine, EngineError> {
        let internal = meta_disk.is_none();
        let meta_disk = meta_disk.unwrap_or_else(|| data.clone());
        let data_disk_len = data.len().map_err(|source| DiskError::Open { path: me.disk.clone(), source })?;
        let (mut meta, loaded) = MetaStore::open(meta_disk, data_disk_len, internal, &config.name, me.id)?;
        let sb = loaded.superblock;

        let mut in_meta: Vec<u8> = sb.peers.iter().map(|p| p.node_id).collect();
        let mut in_config: Vec<u8> = config.peers_of(&me).map(|p| p.id).collect();
        in_meta.sort_unstable();
        in_config.sort_unstable();
        if in_meta != in_config {
            return Err(EngineError::PeersChanged { disk: me.disk.display().to_string(), in_meta, in_config });
        }

        let mut bitmaps = loaded.bitmaps;
        let mut al = loaded.activity_log;
        let crashed_primary = loaded.crashed_as_primary;
        if crashed_primary {
            // Writes in the hot extents may have reached only this disk, or only the peers:
            // every hot extent is out of sync with every peer until a resync says otherwise.
            // PRIMARY_IND stays set until then, so a second crash does not forget it.
            let hot = al.hot_extents();
            tracing::warn!(resource = %config.name, extents = hot.len(), "crashed while primary: marking the activity log's extents out of sync");
            for extent in &hot {
                let (offset, len) = state::extent_range(*extent, sb.data_size);
                for bitmap in bitmaps.iter_mut() {
                    bitmap.set_range(offset, len);
                }
            }
            // Emptying the log writes the evicted extents' bitmap pages first.
            let clean = al.mark_clean().expect("nothing is in flight at attach");
            meta.write_al_update(&clean, &bitmaps)?;
            al.commit(clean);
        }

        let peers = sb
            .peers
            .iter()
            .enumerate()
            .map(|(slot, p)| {
                let node = config.node_by_id(p.node_id).expect("peer ids checked against the config");
                Peer {
                    node_id: p.node_id,
                    name: node.name.clone(),
                    slot,
                    want_connect: true,
                    conn: ConnState::Connecting,
                    repl: ReplState::Off,
                    role: Role::Unknown,
                    disk: DiskState::DUnknown,
                    generation: 0,
                    link: None,
                    last_state: None,
                    tl: TransferLog::default(),
                    barriers: VecDeque::new(),
                    rx_epoch_writes: 0,
                    pending_sync: None,
                    resync: None,
                    sync: Default::default(),
                    sent_bytes_before: 0,
                    received_bytes: 0,
                    last_error: None,
                }
            })
            .collect();
        let disk = State::disk_state_from_flags(sb.flags);
        let data_size_bytes = sb.data_size;
        let state = State {
            role: Role::Secondary,
            disk,
            meta,
            sb,
            bitmaps,
            al,
            crashed_primary,
            inflight: InflightWrites::new(),
            completions: HashMap::new(),
            flushes: Vec::new(),
            next_flush_id: 0,
            epoch: 1,
            peers,
            nbd: None,
            read_locks: Vec::new(),
            app_write_bytes: 0,
            stopping: false,
        };
        let io = IoPool::new(data.clone(), IO_THREADS);
        let shared = Shared { config, me, data, data_size_bytes, io, state: Mutex::new(state), changed: Condvar::new() };
        Ok(Engine { shared: Arc::new(shared) })
    }

    /// Starts listening for peers and dialing them.
    pub fn start(&self) -> Result<(), EngineError> {
        let address = self.shared.me.address;
        let listener = TcpListener::bind(address).map_err(|source| EngineError::Listen { address, source })?;
        connection::spawn_listener(self.shared.clone(), listener);
        connection::spawn_dialers(&self.shared);
        Ok(())
    }

    pub fn resource(&self) -> &str {
        &self.shared.config.name
    }

    /// Whether peers must prove they know the shared secret.
    pub fn has_secret(&self) -> bool {
        self.shared.config.secret.is_some()
    }

    pub fn status(&self) -> ResourceStatus {
        status::build(&self.shared, &mut self.shared.lock())
    }

    /// Starts an online verify with every connected peer it can run against; returns their
    /// names. Progress and findings are in `status`.
    pub fn verify(&self) -> Result<Vec<String>, EngineError> {
        verify::start(&self.shared)
    }

    /// Discards this node's data and resyncs all of it from a connected UpToDate peer; returns
    /// that peer's name.
    pub fn invalidate(&self) -> Result<String, EngineError> {
        resync::invalidate(&self.shared)
    }

    /// Promotes this node to Primary and exports the device.
    pub fn promote(&self, force: bool) -> Result<(), EngineError> {
        let shared = &self.shared;
        let mut st = shared.lock();
        if st.role == Role::Primary {
            return Ok(());
        }
        if let Some(peer) = st.peers.iter().find(|p| p.link.is_some() && p.role == Role::Primary) {
            return Err(EngineError::PeerIsPrimary { peer: peer.name.clone() });
        }
        if st.disk != DiskState::UpToDate && !force {
            return Err(EngineError::NotUpToDate { disk: st.disk });
        }
        if matches!(st.disk, DiskState::Diskless | DiskState::Failed) {
            return Err(EngineError::Refused(format!("cannot promote with a {} disk", st.disk)));
        }
        let (disk_before, sb_before) = (st.disk, st.sb.clone());
        // Peers that will not see this node's writes from the start: a new generation begins,
        // and they track from the old one.
        let absent: Vec<usize> = st
            .peers
            .iter()
            .filter(|p| force || !(p.link.is_some() && p.repl == ReplState::Established && p.disk == DiskState::UpToDate))
            .map(|p| p.slot)
            .collect();
        if force || !absent.is_empty() {
            let was_fresh = crate::core::sync_decision::same_uuid(st.sb.uuids.current, UUID_JUST_CREATED);
            let mut generation = st.generation();
            let started = generation.new_current(random_u64(), true, &absent);
            st.set_generation(generation);
            if was_fresh {
                // A peer of a just-created node holds none of its data: all of it must flow.
                for slot in started {
                    let len = st.bitmaps[slot].blocks() * u64::from(st.bitmaps[slot].block_size());
                    st.mark_out_of_sync(slot, 0, len);
                }
            }
        }
        st.disk = DiskState::UpToDate;
        st.sb.flags.insert(MetaFlags::CONSISTENT | MetaFlags::WAS_UP_TO_DATE | MetaFlags::PRIMARY_IND);
        st.sb.flags.remove(MetaFlags::AL_CLEAN);
        if let Err(e) = st.persist() {
            st.disk = DiskState::Failed;
            return Err(EngineError::MetaWrite(e));
        }
        st.role = Role::Primary;
        if let Some(address) = shared.me.nbd {
            match NbdServer::bind(&address.to_string()) {
                Ok(server) => {
                    let device: Arc<dyn crate::frontend::BlockDevice> = Arc::new(self.clone());
                    st.nbd = Some(server.serve(&shared.config.name, device));
                }
                Err(source) => {
                    st.role = Role::Secondary;
                    // Bits marked for absent peers stay: over-reporting is safe.
                    st.disk = disk_before;
                    st.sb = sb_before;
                    let _ = st.persist();
                    return Err(EngineError::Nbd { address, source });
                }
            }
        }
        tracing::info!(resource = %shared.config.name, force, uuid = format_args!("{:016X}", st.sb.uuids.current), "promoted to Primary");
        st.broadcast_state();
        let mut deferred = Deferred::default();
        connection::reconsider_peers(shared, &mut st, &mut deferred);
        shared.changed.notify_all();
        drop(st);
        deferred.run();
        Ok(())
    }

    /// Demotes to Secondary: refuses while the device is in use; otherwise waits for in-flight
    /// writes and makes everything durable on this node and its connected peers.
    pub fn demote(&self) -> Result<(), EngineError> {
        let shared = &self.shared;
        let mut st = shared.lock();
        if st.role != Role::Primary {
            return Ok(());
        }
        if let Some(clients) = st.nbd.as_ref().map(|n| n.connected_clients()).filter(|c| *c > 0) {
            return Err(EngineError::InUse { clients });
        }
        st.role = Role::Secondary;
        // Sent ahead of the final flush's barrier: once the barrier is acked, every peer knows
        // this node is no longer primary and may promote itself.
        st.broadcast_state();
        let nbd = st.nbd.take();
        drop(st);
        if let Some(nbd) = nbd {
            nbd.shutdown();
        }
        self.flush_all();
        let mut st = shared.lock();
        st.sb.flags.remove(MetaFlags::PRIMARY_IND);
        // Every write finished (flush_all waited), so nothing holds an extent.
        let clean = st.al.mark_clean().expect("no write in flight after the final flush");
        let result = st.apply_al_update(clean).and_then(|()| {
            st.sb.flags.insert(MetaFlags::AL_CLEAN);
            st.persist()
        });
        if let Err(e) = result {
            st.disk = DiskState::Failed;
            return Err(EngineError::MetaWrite(e));
        }
        tracing::info!(resource = %shared.config.name, "demoted to Secondary");
        shared.changed.notify_all();
        Ok(())
    }

    /// Waits for every in-flight write, then flushes locally and on connected peers.
    fn flush_all(&self) {
        {
            let mut st = self.shared.lock();
            while !st.inflight.is_empty() {
                st = self.shared.changed.wait(st).expect("engine state lock poisoned");
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        write_path::submit_flush(&self.shared, Box::new(move |result| drop(tx.send(result))));
        if let Ok(Err(e)) = rx.recv() {
            tracing::warn!(resource = %self.shared.config.name, error = %e, "flush at demotion failed");
        }
    }

    /// Lets the node (re)connect to every peer.
    pub fn connect(&self) {
        let mut st = self.shared.lock();
        for peer in st.peers.iter_mut() {
            peer.want_connect = true;
            if peer.link.is_none() {
                peer.conn = ConnState::Connecting;
                peer.last_error = None;
            }
        }
        self.shared.changed.notify_all();
    }

    /// Drops every peer connection and stays StandAlone until `connect`.
    pub fn disconnect(&self) {
        let mut st = self.shared.lock();
        let ids: Vec<u8> = st.peers.iter().map(|p| p.node_id).collect();
        let mut deferred = Deferred::default();
        for id in ids {
            st.peer_mut(id).want_connect = false;
            connection::drop_peer(&self.shared, &mut st, id, "disconnected by the operator", &mut deferred);
            st.peer_mut(id).conn = ConnState::StandAlone;
        }
        drop(st);
        deferred.run();
    }

    /// Starts a new data generation on two fresh nodes and declares them in sync without copying
    /// (both disks hold nothing of value yet), or with `clear_bitmap == false` simply begins a
    /// new generation on this node.
    pub fn new_current_uuid(&self, clear_bitmap: bool) -> Result<(), EngineError> {
        let shared = &self.shared;
        let mut st = shared.lock();
        if clear_bitmap {
            let fresh = crate::core::sync_decision::same_uuid(st.sb.uuids.current, UUID_JUST_CREATED);
            let all_fresh_and_connected = st.peers.iter().all(|p| {
                p.link.is_some()
                    && p.last_state.is_some_and(|s| crate::core::sync_decision::same_uuid(s.current_uuid, UUID_JUST_CREATED))
            });
            if !fresh || !all_fresh_and_connected || st.role == Role::Primary {
                return Err(EngineError::Refused(
                    "--clear-bitmap needs freshly created metadata on every node, all connected, all Secondary".into(),
                ));
            }
        }
        let mut generation = st.generation();
        generation.new_current(random_u64(), st.role == Role::Primary, &[]);
        st.set_generation(generation);
        if clear_bitmap {
            for bitmap in st.bitmaps.iter_mut() {
                bitmap.clear_all();
            }
            st.disk = DiskState::UpToDate;
            st.sb.flags.insert(MetaFlags::CONSISTENT | MetaFlags::WAS_UP_TO_DATE);
            let uuids = (st.sb.uuids.current, st.sb.uuids.history);
            for peer in st.peers.iter() {
                if let Some(link) = &peer.link {
                    link.send_control(crate::wire::Message::ResyncDone { current_uuid: uuids.0, history: uuids.1 });
                }
            }
        }
        for slot in 0..st.bitmaps.len() {
            st.persist_bitmap(slot).map_err(EngineError::MetaWrite)?;
        }
        st.persist().map_err(EngineError::MetaWrite)?;
        st.broadcast_state();
        Ok(())
    }

    /// Orderly stop: refuses while the device is in use; demotes, tells the peers, and leaves
    /// clean metadata (bitmaps written with their checksums, activity log clean).
    pub fn shutdown(&self) -> Result<(), EngineError> {
        self.demote()?;
        let shared = &self.shared;
        let mut st = shared.lock();
        st.stopping = true;
        let ids: Vec<u8> = st.peers.iter().map(|p| p.node_id).collect();
        let mut deferred = Deferred::default();
        for id in ids {
            if let Some(link) = &st.peer(id).link {
                link.send_control(crate::wire::Message::Disconnect { reason: "peer is going down".into() });
            }
            st.peer_mut(id).want_connect = false;
        }
        // Give the writers a moment to put the goodbye on the wire.
        drop(st);
        std::thread::sleep(Duration::from_millis(50));
        let mut st = shared.lock();
        for id in st.peers.iter().map(|p| p.node_id).collect::<Vec<_>>() {
            connection::drop_peer(shared, &mut st, id, "going down", &mut deferred);
        }
        let crashed_primary = st.crashed_primary;
        let State { meta, sb, bitmaps, al, .. } = &mut *st;
        meta.clean_shutdown(sb, bitmaps, al)?;
        if crashed_primary {
            // The activity log's extents are in the bitmaps, but no resync has repaired them
            // yet: keep the marker that makes the next connection resync them.
            st.sb.flags.insert(MetaFlags::PRIMARY_IND);
            st.persist()?;
        }
        shared.changed.notify_all();
        drop(st);
        deferred.run();
        shared.io.shutdown();
        tracing::info!(resource = %shared.config.name, "stopped");
        Ok(())
    }
}

impl crate::frontend::BlockDevice for Engine {
    fn size_bytes(&self) -> u64 {
        self.shared.data_size_bytes
    }

    fn submit(&self, request: crate::frontend::BlockRequest, done: crate::frontend::Completion) {
        write_path::submit(&self.shared, request, done);
    }
}

/// A fresh random value for generation UUIDs and auth nonces.
pub(crate) fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    random_bytes(&mut bytes);
    u64::from_le_bytes(bytes)
}

pub(crate) fn random_bytes(buf: &mut [u8]) {
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("the kernel's random source /dev/urandom must be readable");
}
