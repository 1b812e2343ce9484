//! A ublk device and its control operations: create (ADD_DEV, SET_PARAMS, START_DEV), recover
//! after the server died (START/END_USER_RECOVERY), remove (STOP_DEV, DEL_DEV).
//!
//! libublk keeps its control io_uring in a thread-local that only its constructor sets up, and
//! its control handle deletes the device when dropped on any thread: every control call here
//! first makes sure the calling thread has a ring, so a device can be created on one thread and
//! removed on another.

use crate::buffers::BufferPool;
use crate::error::{control, to_io, Error};
use crate::features::Features;
use crate::holders::{holders, Holder};
use crate::queue;
use crate::shared::QueueShared;
use crate::request::Handler;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};
use std::io;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

/// Size of the control ring created on threads that did not construct the control handle.
const CONTROL_RING_DEPTH: u32 = 16;
/// The kernel's limits (`UBLK_MAX_NR_QUEUES`, `UBLK_MAX_QUEUE_DEPTH`, one request's buffer).
const MAX_QUEUES: u16 = 4096;
const MAX_DEPTH: u16 = 4096;
const MAX_IO_BYTES: u32 = 32 << 20;
/// The kernel numbers ublk devices with 20-bit minors.
const MAX_ID: u32 = (1 << 20) - 1;

/// How request data moves between the kernel and the handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyMode {
    /// User copy when the driver offers it (one copy, straight into the handler's buffer),
    /// per-tag buffers otherwise.
    #[default]
    Auto,
    /// Per-tag buffers the kernel copies into, and a second copy out of them: the fallback for
    /// drivers without user copy, selectable to test it on drivers that have it.
    Buffered,
}

/// What a device looks like to the block layer and how it is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// A fixed device number (`/dev/ublkbN`); `None` lets the kernel pick a free one.
    pub id: Option<u32>,
    pub size_bytes: u64,
    /// 512 or 4096.
    pub logical_block_size: u32,
    /// Hardware queues, each with its own thread.
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Largest single read or write.
    pub max_io_bytes: u32,
    /// Largest discard; 0 = the device does not discard.
    pub max_discard_bytes: u32,
    /// Largest write-zeroes; 0 = the block layer writes zero pages instead.
    pub max_write_zeroes_bytes: u32,
    /// Advertise a volatile write cache with FUA, so FLUSH and FUA reach the handler. Without
    /// it the block layer assumes every completed write is durable.
    pub write_cache: bool,
    /// Stored in the kernel with the device (`ublksrv_flags`) and checked by
    /// [`Device::recover`], so a restarted server only ever re-attaches its own device.
    pub owner_tag: u64,
    pub copy: CopyMode,
}

impl DeviceConfig {
    /// Defaults: one queue per CPU, depth 128, 512-byte blocks, 512 KiB requests, write cache.
    pub fn new(size_bytes: u64, owner_tag: u64) -> DeviceConfig {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        DeviceConfig {
            id: None,
            size_bytes,
            logical_block_size: 512,
            queues: u16::try_from(cpus).unwrap_or(MAX_QUEUES).min(MAX_QUEUES),
            depth: 128,
            max_io_bytes: 512 << 10,
            max_discard_bytes: 0,
            max_write_zeroes_bytes: 0,
            write_cache: true,
            owner_tag,
            copy: CopyMode::Auto,
        }
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |what: String| Err(Error::Config(what));
        if !matches!(self.logical_block_size, 512 | 4096) {
            return bad(format!("logical block size {} is not 512 or 4096", self.logical_block_size));
        }
        let lbs = u64::from(self.logical_block_size);
        if self.size_bytes == 0 || self.size_bytes % lbs != 0 {
            return bad(format!("size {} bytes is not a positive multiple of the {lbs}-byte block", self.size_bytes));
        }
        if !(1..=MAX_QUEUES).contains(&self.queues) {
            return bad(format!("{} queues: must be 1 to {MAX_QUEUES}", self.queues));
        }
        if !(1..=MAX_DEPTH).contains(&self.depth) {
            return bad(format!("queue depth {}: must be 1 to {MAX_DEPTH}", self.depth));
        }
        if self.max_io_bytes < 4096 || self.max_io_bytes > MAX_IO_BYTES || self.max_io_bytes % 4096 != 0 {
            return bad(format!("max request size {}: must be a multiple of 4096 up to {MAX_IO_BYTES}", self.max_io_bytes));
        }
        for (what, bytes) in [("discard", self.max_discard_bytes), ("write-zeroes", self.max_write_zeroes_bytes)] {
            if u64::from(bytes) % lbs != 0 {
                return bad(format!("max {what} size {bytes} is not a multiple of the {lbs}-byte block"));
            }
        }
        if self.id.is_some_and(|id| id > MAX_ID) {
            return bad(format!("device id {} is above the kernel's maximum {MAX_ID}", self.id.unwrap_or_default()));
        }
        Ok(())
    }

    fn params(&self, max_io_buf_bytes: u32) -> sys::ublk_params {
        let shift = self.logical_block_size.trailing_zeros() as u8;
        let discard = self.max_discard_bytes > 0 || self.max_write_zeroes_bytes > 0;
        sys::ublk_params {
            types: sys::UBLK_PARAM_TYPE_BASIC | if discard { sys::UBLK_PARAM_TYPE_DISCARD } else { 0 },
            basic: sys::ublk_param_basic {
                attrs: if self.write_cache { sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA } else { 0 },
                logical_bs_shift: shift,
                physical_bs_shift: shift.max(12),
                io_min_shift: shift.max(12),
                io_opt_shift: shift.max(12),
                max_sectors: max_io_buf_bytes >> 9,
                dev_sectors: self.size_bytes >> 9,
                ..Default::default()
            },
            discard: sys::ublk_param_discard {
                discard_granularity: self.logical_block_size.max(4096),
                max_discard_sectors: self.max_discard_bytes >> 9,
                max_write_zeroes_sectors: self.max_write_zeroes_bytes >> 9,
                max_discard_segments: u16::from(self.max_discard_bytes > 0),
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

/// A device's state in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// Served: I/O flows.
    Live,
    /// Its server died and it waits for a new one; I/O is held, not failed.
    Quiesced,
    /// Its server died and I/O fails until a new one attaches.
    FailIo,
    /// Stopped: it can only be deleted.
    Dead,
}

/// What the kernel knows of a device that this process may not serve (yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatus {
    pub state: DeviceState,
    /// As given at creation ([`DeviceConfig::owner_tag`]).
    pub owner_tag: u64,
}

/// A started device, served by this process. Dropping it removes the device like
/// [`Device::remove`]; a process that dies without removing it leaves it quiesced for
/// [`Device::recover`] (when the driver has user recovery).
pub struct Device {
    ctrl: UblkCtrl,
    id: u32,
    features: Features,
    queue_threads: Vec<JoinHandle<()>>,
    removed: bool,
}

/// libublk's control calls use the calling thread's control ring and panic without one.
fn ensure_control_ring() -> Result<(), Error> {
    libublk::ublk_init_ctrl_task_ring(|ring| {
        if ring.is_none() {
            *ring = Some(io_uring::IoUring::builder().build(CONTROL_RING_DEPTH).map_err(libublk::UblkError::IOError)?);
        }
        Ok(())
    })
    .map_err(control("control ring setup", None))
}

fn state_of(state: u16) -> DeviceState {
    match u32::from(state) {
        sys::UBLK_S_DEV_LIVE => DeviceState::Live,
        sys::UBLK_S_DEV_QUIESCED => DeviceState::Quiesced,
        sys::UBLK_S_DEV_FAIL_IO => DeviceState::FailIo,
        _ => DeviceState::Dead,
    }
}

/// Opens the control handle of an existing device, or `None` when there is no such device.
fn existing(id: u32, flags: UblkFlags) -> Result<Option<UblkCtrl>, Error> {
    if !crate::kernel_has_ublk() {
        return Err(Error::NoDriver);
    }
    ensure_control_ring()?;
    let built = UblkCtrlBuilder::default().name("blkrepl").id(id as i32).dev_flags(flags).build();
    match built.map_err(to_io) {
        Ok(ctrl) => Ok(Some(ctrl)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ENOENT)) => Ok(None),
        Err(source) => Err(Error::Control { op: "GET_DEV_INFO", id: Some(id), source }),
    }
}

impl Device {
    /// Adds, configures and starts a new device; requests go to `handler` from then on.
    ///
    /// Uses user copy when the driver offers it (unless `config.copy` says otherwise), and
    /// user recovery with re-issue when offered, so a server killed mid-request loses nothing.
    pub fn create(config: &DeviceConfig, handler: Arc<dyn Handler>) -> Result<Device, Error> {
        config.validate()?;
        let offered = Features::probe()?;
        let mut flags = 0u64;
        if offered.user_recovery() {
            flags |= u64::from(sys::UBLK_F_USER_RECOVERY);
            if offered.user_recovery_reissue() {
                flags |= u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE);
            }
        }
        if offered.user_copy() && config.copy == CopyMode::Auto {
            flags |= u64::from(sys::UBLK_F_USER_COPY);
        }
        if offered.cmd_ioctl_encode() {
            flags |= u64::from(sys::UBLK_F_CMD_IOCTL_ENCODE);
        }
        // libublk deletes the device of a failed ADD_DEV's id, even when the failure was that
        // another device already has that id: check first.
        if let Some(id) = config.id {
            if Device::status(id)?.is_some() {
                let source = io::Error::from_raw_os_error(libc::EEXIST);
                return Err(Error::Control { op: "ADD_DEV", id: Some(id), source });
            }
        }
        let ctrl = UblkCtrlBuilder::default()
            .name("blkrepl")
            .id(config.id.map_or(-1, |id| id as i32))
            .nr_queues(config.queues)
            .depth(config.depth)
            .io_buf_bytes(config.max_io_bytes)
            .ctrl_flags(flags)
            .ctrl_target_flags(config.owner_tag)
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build()
            .map_err(control("ADD_DEV", config.id))?;
        tracing::info!(device = ctrl.dev_info().dev_id, offered = %offered, "ublk device added");
        Device::start(ctrl, config, handler)
    }

    /// The kernel's view of device `id`; `None` when it does not exist.
    pub fn status(id: u32) -> Result<Option<DeviceStatus>, Error> {
        Ok(existing(id, UblkFlags::empty())?.map(|ctrl| {
            let info = ctrl.dev_info();
            DeviceStatus { state: state_of(info.state), owner_tag: info.ublksrv_flags }
        }))
    }

    /// Re-attaches to device `id`, whose server died (user recovery): the block device, and
    /// whatever is mounted on it, stays; held requests (and, with re-issue, the ones the dead
    /// server had taken) go to `handler`. Refuses a device with another owner tag. A dead
    /// leftover is deleted and reported as [`Error::Gone`].
    pub fn recover(id: u32, config: &DeviceConfig, handler: Arc<dyn Handler>) -> Result<Device, Error> {
        config.validate()?;
        let ctrl = existing(id, UblkFlags::UBLK_DEV_F_RECOVER_DEV)?.ok_or(Error::Gone { id })?;
        let info = ctrl.dev_info();
        if info.ublksrv_flags != config.owner_tag {
            return Err(Error::NotOurs { id, found: info.ublksrv_flags, expected: config.owner_tag });
        }
        if state_of(info.state) == DeviceState::Dead {
            ctrl.del_dev().map_err(control("DEL_DEV", Some(id)))?;
            return Err(Error::Gone { id });
        }
        if !Features::from_bits(info.flags).user_recovery() {
            return Err(Error::NotRecoverable { id });
        }
        // The kernel answers EBUSY until it has noticed the old server's death (libublk retries
        // for 30 s); still EBUSY after that means a live server holds the device.
        match ctrl.start_user_recover().map_err(control("START_USER_RECOVERY", Some(id)))? {
            r if r == -libc::EBUSY => return Err(Error::StillServed { id, pid: info.ublksrv_pid }),
            r if r < 0 => {
                let source = io::Error::from_raw_os_error(-r);
                return Err(Error::Control { op: "START_USER_RECOVERY", id: Some(id), source });
            }
            _ => {}
        }
        tracing::info!(device = id, "ublk device recovery started");
        Device::start(ctrl, config, handler)
    }

    /// Deletes device `id`, which this process does not serve, if its owner tag is ours.
    pub fn delete(id: u32, owner_tag: u64) -> Result<(), Error> {
        let Some(ctrl) = existing(id, UblkFlags::empty())? else { return Ok(()) };
        let found = ctrl.dev_info().ublksrv_flags;
        if found != owner_tag {
            return Err(Error::NotOurs { id, found, expected: owner_tag });
        }
        let _ = ctrl.kill_dev();
        ctrl.del_dev().map_err(control("DEL_DEV", Some(id)))?;
        Ok(())
    }

    /// Starts the queue threads, then the device (START_DEV, or END_USER_RECOVERY for a
    /// recovered one). On failure the device is stopped and, if this call added it, deleted.
    fn start(ctrl: UblkCtrl, config: &DeviceConfig, handler: Arc<dyn Handler>) -> Result<Device, Error> {
        let info = ctrl.dev_info();
        let id = info.dev_id;
        let features = Features::from_bits(info.flags);
        let params = config.params(info.max_io_buf_bytes);
        let dev = UblkDev::new(
            "blkrepl".into(),
            |dev| {
                dev.tgt.dev_size = config.size_bytes;
                dev.tgt.params = params;
                // One more ring slot each way for the completion wakeup's poll.
                dev.tgt.sq_depth = dev.dev_info.queue_depth + 1;
                dev.tgt.cq_depth = dev.dev_info.queue_depth + 1;
                Ok(())
            },
            &ctrl,
        )
        .map_err(control("open /dev/ublkcN", Some(id)))?;
        let dev = Arc::new(dev);
        let mut device = Device { ctrl, id, features, queue_threads: Vec::new(), removed: false };
        match device.start_queues(&dev, handler) {
            Ok(()) => {
                drop(dev);
                tracing::info!(device = id, path = %device.path().display(), features = %features, "ublk device started");
                Ok(device)
            }
            Err(e) => {
                drop(dev);
                if let Err(cleanup) = device.teardown() {
                    tracing::warn!(device = id, error = %cleanup, "cleanup after a failed start");
                }
                Err(e)
            }
        }
    }

    fn start_queues(&mut self, dev: &Arc<UblkDev>, handler: Arc<dyn Handler>) -> Result<(), Error> {
        let user_copy = self.features.user_copy();
        let (ready_tx, ready_rx) = mpsc::channel();
        let pool = Arc::new(BufferPool::default());
        for qid in 0..dev.dev_info.nr_hw_queues {
            let shared = QueueShared::new(Arc::clone(dev), qid, user_copy, Arc::clone(&pool))
                .map_err(|source| Error::Queue { id: self.id, queue: qid, source })?;
            let (shared, handler, ready) = (Arc::new(shared), Arc::clone(&handler), ready_tx.clone());
            let thread = std::thread::Builder::new()
                .name(format!("ublk{}q{qid}", self.id))
                .spawn(move || queue::run(shared, handler, ready))
                .map_err(|source| Error::Queue { id: self.id, queue: qid, source })?;
            self.queue_threads.push(thread);
        }
        drop(ready_tx);
        // Every queue must be fetching before START_DEV, which otherwise waits forever.
        for qid in 0..dev.dev_info.nr_hw_queues {
            let tid = ready_rx.recv().map_err(|_| Error::Queue {
                id: self.id,
                queue: qid,
                source: io::Error::other("queue thread exited during start-up"),
            })??;
            // The kernel maps each CPU's submissions to one queue: run that queue's thread there.
            self.ctrl.set_thread_affinity(qid, tid);
        }
        self.ctrl.start_dev(dev).map_err(control("START_DEV", Some(self.id)))?;
        Ok(())
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// `/dev/ublkbN`.
    pub fn path(&self) -> PathBuf {
        crate::block_device_path(self.id)
    }

    /// The feature flags this device was created with (user copy, recovery, ...).
    pub fn features(&self) -> Features {
        self.features
    }

    /// Who keeps the block device busy (see [`holders`]); empty when nobody does.
    pub fn holders(&self) -> io::Result<Vec<Holder>> {
        holders(&self.path())
    }

    /// Stops the device (its block device disappears; anything still using it gets errors, so
    /// check [`Device::holders`] first) and deletes it.
    pub fn remove(mut self) -> Result<(), Error> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), Error> {
        if std::mem::replace(&mut self.removed, true) {
            return Ok(());
        }
        ensure_control_ring()?;
        // STOP_DEV waits for requests in flight, then aborts the queues' fetches: the threads end.
        let stopped = self.ctrl.kill_dev().map_err(control("STOP_DEV", Some(self.id)));
        if stopped.is_ok() {
            for thread in self.queue_threads.drain(..) {
                if thread.join().is_err() {
                    tracing::error!(device = self.id, "a queue thread panicked");
                }
            }
        }
        stopped?;
        // Waits until /dev/ublkcN is closed: the last completion of a request may still hold it.
        self.ctrl.del_dev().map_err(control("DEL_DEV", Some(self.id)))?;
        tracing::info!(device = self.id, "ublk device removed");
        Ok(())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Err(error) = self.teardown() {
            tracing::error!(device = self.id, %error, "cannot remove the ublk device");
        }
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("id", &self.id).field("features", &self.features).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_are_checked_before_the_kernel_sees_them() {
        let good = DeviceConfig::new(1 << 30, 7);
        assert!(good.validate().is_ok());
        type Breaks = fn(&mut DeviceConfig);
        let cases: [(Breaks, &str); 6] = [
            (|c| c.logical_block_size = 1024, "not 512 or 4096"),
            (|c| c.size_bytes = (1 << 30) + 512, "not a positive multiple"),
            (|c| c.queues = 0, "queues"),
            (|c| c.depth = 5000, "queue depth"),
            (|c| c.max_io_bytes = 1000, "max request size"),
            (|c| c.max_discard_bytes = 1000, "max discard size"),
        ];
        for (change, expected) in cases {
            let mut config = good.clone();
            config.logical_block_size = 4096;
            change(&mut config);
            let err = config.validate().expect_err(expected).to_string();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn parameters_follow_the_configuration() {
        let mut config = DeviceConfig::new(8 << 30, 7);
        config.logical_block_size = 4096;
        config.max_discard_bytes = 16 << 20;
        let p = config.params(512 << 10);
        assert_eq!((p.basic.logical_bs_shift, p.basic.physical_bs_shift), (12, 12));
        assert_eq!(p.basic.dev_sectors, (8 << 30) >> 9);
        assert_eq!(p.basic.max_sectors, 1024);
        assert_eq!(p.basic.attrs, sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA);
        assert_eq!(p.types, sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD);
        assert_eq!((p.discard.max_discard_sectors, p.discard.max_discard_segments), (32768, 1));
        config.max_discard_bytes = 0;
        config.write_cache = false;
        let p = config.params(512 << 10);
        assert_eq!((p.types, p.basic.attrs), (sys::UBLK_PARAM_TYPE_BASIC, 0));
    }
}
