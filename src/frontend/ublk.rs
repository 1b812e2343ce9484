//! The ublk frontend: the replicated device as a Linux block device, `/dev/ublkbN`.
//!
//! The `blkrepl-ublk` crate runs the device (queue threads, control, recovery); this module maps
//! its requests onto a [`BlockDevice`] and its results back to errno values, and remembers the
//! device's number in the run directory (`<run>/<resource>.<node>.ublk`): a daemon killed while
//! primary leaves the device quiesced, with its I/O held by the kernel, and the next daemon
//! re-attaches to the same device through that record (ublk user recovery), so a filesystem
//! mounted on it never notices. The record also says when the device fails every request (its
//! data may have changed under its users): such a device never serves again, even after a
//! restart.

use super::{BlockDevice, BlockError, BlockRequest};
use crate::config::UblkSettings;
use blkrepl_ublk::{Completion, CopyMode, Device, DeviceConfig, DeviceState, Handler, Request};
use bytes::Bytes;
use nix::errno::Errno;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Largest discard and write-zeroes request: a few activity-log extents at a time.
const MAX_DISCARD_BYTES: u32 = 16 << 20;

/// The record's second word for a device that fails every request.
const FAILING: &str = "failing";

/// A device a previous daemon of this node left in the kernel, as its record describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeftBehind {
    pub id: u32,
    /// It was failing every request: it never serves again.
    pub failing: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum UblkError {
    #[error("{0}; or export the device over NBD instead: `frontend = \"nbd\"` and `nbd = \"IP:PORT\"` in this node's [[node]] section")]
    NoDriver(blkrepl_ublk::Error),
    #[error(transparent)]
    Device(blkrepl_ublk::Error),
    #[error("cannot record the ublk device number in {path}: {source}")]
    Record { path: PathBuf, source: io::Error },
}

impl From<blkrepl_ublk::Error> for UblkError {
    fn from(e: blkrepl_ublk::Error) -> UblkError {
        match e {
            blkrepl_ublk::Error::NoDriver => UblkError::NoDriver(e),
            e => UblkError::Device(e),
        }
    }
}

/// Everything needed to create or re-attach this node's device.
#[derive(Debug, Clone)]
pub struct UblkPlan {
    pub settings: UblkSettings,
    pub size_bytes: u64,
    pub logical_block_size: u32,
    /// Stored with the device in the kernel: only this resource and node re-attach to it.
    pub owner_tag: u64,
    /// Where the device number is kept while the device exists.
    pub record: PathBuf,
}

impl UblkPlan {
    pub fn new(settings: UblkSettings, resource: &str, node: &str, run_dir: &Path, size_bytes: u64, logical_block_size: u32) -> UblkPlan {
        UblkPlan {
            settings,
            size_bytes,
            logical_block_size,
            owner_tag: owner_tag(resource, node),
            record: run_dir.join(format!("{resource}.{node}.ublk")),
        }
    }

    fn device_config(&self) -> DeviceConfig {
        let mut config = DeviceConfig::new(self.size_bytes, self.owner_tag);
        config.id = self.settings.id;
        config.logical_block_size = self.logical_block_size;
        if let Some(queues) = self.settings.queues {
            config.queues = queues;
        }
        config.depth = self.settings.depth;
        config.max_discard_bytes = MAX_DISCARD_BYTES;
        config.max_write_zeroes_bytes = MAX_DISCARD_BYTES;
        config.copy = CopyMode::Auto;
        config
    }

    /// The device number recorded, and whether the device was failing every request (a record
    /// of the number alone, as earlier builds wrote it, is a serving device's).
    fn recorded(&self) -> Option<LeftBehind> {
        let text = std::fs::read_to_string(&self.record).ok()?;
        let mut words = text.split_whitespace();
        let id = words.next()?.parse().ok()?;
        Some(LeftBehind { id, failing: words.next() == Some(FAILING) })
    }

    fn write_record(&self, id: u32, failing: bool) -> Result<(), UblkError> {
        let record = if failing { format!("{id} {FAILING}\n") } else { format!("{id}\n") };
        std::fs::write(&self.record, record).map_err(|source| UblkError::Record { path: self.record.clone(), source })
    }

    fn forget(&self) {
        let _ = std::fs::remove_file(&self.record);
    }

    /// The device a previous daemon of this node left behind when it died, if the kernel still
    /// holds it for us (its I/O waiting). Stale records are cleaned up.
    pub fn left_behind(&self) -> Option<LeftBehind> {
        let found = self.recorded().or(self.settings.id.map(|id| LeftBehind { id, failing: false }))?;
        let id = found.id;
        let status = match Device::status(id) {
            Ok(Some(status)) if status.owner_tag == self.owner_tag => status,
            Ok(_) => {
                self.forget();
                return None;
            }
            Err(error) => {
                tracing::warn!(%error, device = id, "cannot look at the ublk device recorded in {}", self.record.display());
                return None;
            }
        };
        if status.state == DeviceState::Dead {
            if let Err(error) = Device::delete(id, self.owner_tag) {
                tracing::warn!(%error, device = id, "cannot delete a stopped ublk device left behind");
            }
            self.forget();
            return None;
        }
        Some(found)
    }
}

/// "bkrp" and a checksum of the resource and node names.
fn owner_tag(resource: &str, node: &str) -> u64 {
    0x626b_7270_0000_0000 | u64::from(crc32c::crc32c(format!("{resource}/{node}").as_bytes()))
}

/// Requests from the device, passed to the engine unless the export is failing.
struct Adapter {
    device: Arc<dyn BlockDevice>,
    /// Set when this node must not serve the device's data (another node became primary):
    /// every request fails with EIO, so nothing stale is ever read or written.
    failing: AtomicBool,
}

impl Handler for Adapter {
    fn handle(&self, request: Request, done: Completion) {
        if self.failing.load(Ordering::SeqCst) {
            return done.fail(Errno::EIO as i32);
        }
        let request = match request {
            Request::Read { offset, len } => BlockRequest::Read { offset, len },
            Request::Write { offset, data, fua } => {
                // A pooled buffer goes back to the device's pool when the engine drops the data.
                let data = data.into_vec().map_or_else(Bytes::from_owner, Bytes::from);
                BlockRequest::Write { offset, data, fua }
            }
            Request::Flush => BlockRequest::Flush,
            Request::Discard { offset, len } => BlockRequest::Discard { offset, len },
            Request::WriteZeroes { offset, len, fua } => BlockRequest::WriteZeroes { offset, len, fua },
        };
        // The queue thread is the queue's event loop: a small write into the page cache costs it
        // less than the handoff to the I/O pool, and on one CPU far less (see DESIGN.md, "The
        // ublk frontend").
        self.device.submit_from_loop(
            request,
            Box::new(move |result| match result {
                Ok(Some(data)) => done.read(&data),
                Ok(None) => done.ok(),
                Err(e) => done.fail(errno(&e) as i32),
            }),
        );
    }
}

/// The block layer understands a handful of errno values; everything else reads as EIO.
fn errno(e: &BlockError) -> Errno {
    match e {
        BlockError::NoSpace => Errno::ENOSPC,
        BlockError::Invalid => Errno::EINVAL,
        BlockError::NotSupported => Errno::EOPNOTSUPP,
        // The node lost the right to serve the device, or is stopping: the data is unavailable.
        BlockError::Io | BlockError::ReadOnly | BlockError::Shutdown => Errno::EIO,
    }
}

/// This node's running `/dev/ublkbN`.
pub struct UblkExport {
    device: Device,
    adapter: Arc<Adapter>,
    plan: UblkPlan,
}

impl UblkExport {
    /// Re-attaches to the device a previous daemon left behind (user recovery) or creates a
    /// new one, serving `device`; with `failing`, every request fails instead.
    pub fn start(plan: &UblkPlan, device: Arc<dyn BlockDevice>, failing: bool) -> Result<UblkExport, UblkError> {
        let adapter = Arc::new(Adapter { device, failing: AtomicBool::new(failing) });
        let config = plan.device_config();
        let handler: Arc<dyn Handler> = adapter.clone();
        let recovered = match plan.recorded().map(|r| r.id).or(plan.settings.id) {
            Some(id) => match Device::recover(id, &config, handler.clone()) {
                Ok(device) => {
                    tracing::info!(device = %device.path().display(), "re-attached to the ublk device a previous daemon left behind");
                    Some(device)
                }
                Err(blkrepl_ublk::Error::Gone { .. } | blkrepl_ublk::Error::NotOurs { .. }) => None,
                Err(e) => return Err(e.into()),
            },
            None => None,
        };
        let device = match recovered {
            Some(device) => device,
            None => Device::create(&config, handler)?,
        };
        plan.write_record(device.id(), failing)?;
        Ok(UblkExport { device, adapter, plan: plan.clone() })
    }

    pub fn path(&self) -> PathBuf {
        self.device.path()
    }

    /// The ublk features the device runs with (user copy, recovery, ...).
    pub fn features(&self) -> Vec<String> {
        self.device.features().names()
    }

    /// Who uses the device, as "a mount on /mnt (ext4), process 12 (fio)"; `None` if nobody.
    pub fn users(&self) -> Option<String> {
        match self.device.holders() {
            Ok(holders) if holders.is_empty() => None,
            Ok(holders) => Some(holders.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")),
            Err(e) => Some(format!("an unknown user (cannot check: {e})")),
        }
    }

    /// Fails every request from now on: the device never serves again (see
    /// `Engine::retire_failing_export`), it only waits to be unused and removed. The record
    /// says so first, so a daemon that dies now leaves a device the next one keeps failing.
    pub fn fail_from_now_on(&self) {
        if let Err(error) = self.plan.write_record(self.device.id(), true) {
            tracing::error!(%error, "cannot record that the device fails every request: a daemon restarted before it is removed takes it for one left behind as primary");
        }
        self.adapter.failing.store(true, Ordering::SeqCst);
    }

    /// Removes the device (check [`UblkExport::users`] first) and its record.
    pub fn remove(self) -> Result<(), UblkError> {
        let path = self.device.path();
        self.device.remove()?;
        self.plan.forget();
        tracing::info!(device = %path.display(), "ublk device removed");
        Ok(())
    }
}

impl std::fmt::Debug for UblkExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UblkExport").field("device", &self.device).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_tags_tell_resources_and_nodes_apart() {
        assert_eq!(owner_tag("r0", "alpha"), owner_tag("r0", "alpha"));
        assert_ne!(owner_tag("r0", "alpha"), owner_tag("r0", "beta"));
        assert_ne!(owner_tag("r0", "alpha"), owner_tag("r1", "alpha"));
        assert_eq!(owner_tag("r0", "alpha") >> 32, 0x626b_7270);
    }

    #[test]
    fn engine_errors_become_errno_values_the_block_layer_knows() {
        assert_eq!(errno(&BlockError::NoSpace), Errno::ENOSPC);
        assert_eq!(errno(&BlockError::Invalid), Errno::EINVAL);
        assert_eq!(errno(&BlockError::NotSupported), Errno::EOPNOTSUPP);
        for e in [BlockError::Io, BlockError::ReadOnly, BlockError::Shutdown] {
            assert_eq!(errno(&e), Errno::EIO);
        }
    }

    #[test]
    fn the_record_says_whether_the_device_fails_every_request() {
        let dir = std::env::temp_dir().join(format!("blkrepl-ublk-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plan = UblkPlan::new(UblkSettings { id: None, queues: None, depth: 64 }, "r0", "alpha", &dir, 1 << 30, 4096);
        assert_eq!(plan.recorded(), None);
        plan.write_record(3, false).unwrap();
        assert_eq!(plan.recorded(), Some(LeftBehind { id: 3, failing: false }));
        plan.write_record(3, true).unwrap();
        assert_eq!(plan.recorded(), Some(LeftBehind { id: 3, failing: true }));
        // A record of the number alone (earlier builds) is a serving device's.
        std::fs::write(&plan.record, "5\n").unwrap();
        assert_eq!(plan.recorded(), Some(LeftBehind { id: 5, failing: false }));
        std::fs::write(&plan.record, "garbage\n").unwrap();
        assert_eq!(plan.recorded(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_plan_carries_the_configured_device_shape() {
        let settings = UblkSettings { id: Some(3), queues: Some(2), depth: 64 };
        let plan = UblkPlan::new(settings, "r0", "alpha", Path::new("/run/blkrepl"), 1 << 30, 4096);
        assert_eq!(plan.record, Path::new("/run/blkrepl/r0.alpha.ublk"));
        let config = plan.device_config();
        assert_eq!((config.id, config.queues, config.depth, config.logical_block_size), (Some(3), 2, 64, 4096));
        assert_eq!(config.max_discard_bytes, MAX_DISCARD_BYTES);
        assert_eq!(config.owner_tag, owner_tag("r0", "alpha"));
    }
}
