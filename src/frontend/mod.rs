//! How a host reaches the replicated device.
//!
//! A frontend (NBD, or ublk's `/dev/ublkbN`) turns host requests into [`BlockRequest`]s and hands
//! them to a [`BlockDevice`]. The engine is the only real implementation; tests use
//! [`MemDevice`]. Nothing outside this module (and the `blkrepl-ublk` crate) knows a frontend's
//! wire format.

pub mod nbd;
mod request;
pub mod ublk;

pub use request::{BlockError, BlockRequest, BlockResult};

use bytes::Bytes;
use std::sync::Mutex;

/// A running export of the device, whichever frontend serves it.
#[derive(Debug)]
pub enum Export {
    Nbd { handle: nbd::NbdHandle, export_name: String },
    Ublk(Box<ublk::UblkExport>),
}

impl Export {
    /// Where hosts find the device: `nbd://ADDR/NAME`, `nbd+unix:///NAME?socket=PATH` or `/dev/ublkbN`.
    pub fn device(&self) -> String {
        match self {
            Export::Nbd { handle, export_name } => handle.address().url(export_name),
            Export::Ublk(ublk) => ublk.path().display().to_string(),
        }
    }

    /// Who uses the device right now ("1 NBD client(s)", "a mount on /mnt (ext4)"), if anyone:
    /// demotion and `down` refuse while someone does.
    pub fn users(&self) -> Option<String> {
        match self {
            Export::Nbd { handle, .. } => match handle.connected_clients() {
                0 => None,
                n => Some(format!("{n} NBD client(s)")),
            },
            Export::Ublk(ublk) => ublk.users(),
        }
    }

    pub fn nbd_clients(&self) -> usize {
        match self {
            Export::Nbd { handle, .. } => handle.connected_clients(),
            Export::Ublk(_) => 0,
        }
    }

    /// The ublk features in use; `None` for NBD.
    pub fn ublk_features(&self) -> Option<Vec<String>> {
        match self {
            Export::Nbd { .. } => None,
            Export::Ublk(ublk) => Some(ublk.features()),
        }
    }

    /// Stops serving: NBD clients are disconnected, a ublk device is removed.
    pub fn stop(self) -> Result<(), ublk::UblkError> {
        match self {
            Export::Nbd { handle, .. } => {
                handle.shutdown();
                Ok(())
            }
            Export::Ublk(ublk) => ublk.remove(),
        }
    }
}

/// Called exactly once per submitted request, from whichever thread completes it.
pub type Completion = Box<dyn FnOnce(BlockResult) + Send>;

/// The narrow interface between a frontend and the replication engine.
///
/// `submit` must not block for the duration of the I/O: it queues the request and returns, so a
/// frontend can keep many requests in flight (writes that must wait, for an overlapping write or
/// for room in a peer's send queue, wait in the engine, not in the caller).
pub trait BlockDevice: Send + Sync {
    fn size_bytes(&self) -> u64;
    /// The smallest unit of addressing; requests are multiples of it.
    fn block_size(&self) -> u32 {
        512
    }
    fn submit(&self, request: BlockRequest, done: Completion);

    /// [`BlockDevice::submit`] from an event loop that serves many clients: the device may
    /// make a small write into the page cache on the calling thread rather than hand it over
    /// (which costs more), so the call may take as long as such a write.
    fn submit_from_loop(&self, request: BlockRequest, done: Completion) {
        self.submit(request, done)
    }
}

/// An in-memory device, completing every request synchronously: for frontend tests.
#[derive(Debug)]
pub struct MemDevice {
    data: Mutex<Vec<u8>>,
}

impl MemDevice {
    pub fn new(size_bytes: usize) -> Self {
        Self { data: Mutex::new(vec![0; size_bytes]) }
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().expect("MemDevice lock").clone()
    }
}

impl BlockDevice for MemDevice {
    fn size_bytes(&self) -> u64 {
        self.data.lock().expect("MemDevice lock").len() as u64
    }

    fn submit(&self, request: BlockRequest, done: Completion) {
        let mut data = self.data.lock().expect("MemDevice lock");
        let range = |offset: u64, len: usize| -> Option<std::ops::Range<usize>> {
            let start = usize::try_from(offset).ok()?;
            let end = start.checked_add(len)?;
            (end <= data.len()).then_some(start..end)
        };
        let result = match request {
            BlockRequest::Read { offset, len } => range(offset, len as usize)
                .map(|r| Some(Bytes::copy_from_slice(&data[r])))
                .ok_or(BlockError::Invalid),
            BlockRequest::Write { offset, data: bytes, .. } => match range(offset, bytes.len()) {
                Some(r) => {
                    data[r].copy_from_slice(&bytes);
                    Ok(None)
                }
                None => Err(BlockError::Invalid),
            },
            BlockRequest::Discard { offset, len } | BlockRequest::WriteZeroes { offset, len, .. } => {
                match range(offset, len as usize) {
                    Some(r) => {
                        data[r].fill(0);
                        Ok(None)
                    }
                    None => Err(BlockError::Invalid),
                }
            }
            BlockRequest::Flush => Ok(None),
        };
        drop(data);
        done(result);
    }
}
