//! What can go wrong with a ublk device, with the device and the operation in every message.

use std::io;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No `/dev/ublk-control`: the module is not loaded, or the kernel has no ublk at all.
    #[error("this kernel has no ublk driver ({path} is missing): load it with `modprobe ublk_drv` (Linux 6.0 or later, CONFIG_BLK_DEV_UBLK)", path = crate::CONTROL_PATH)]
    NoDriver,
    #[error("invalid ublk device configuration: {0}")]
    Config(String),
    /// A control command (ADD_DEV, START_DEV, ...) failed.
    #[error("ublk {op}{device} failed: {source}", device = device_suffix(*.id))]
    Control { op: &'static str, id: Option<u32>, source: io::Error },
    #[error("cannot start queue {queue} of /dev/ublkb{id}: {source}")]
    Queue { id: u32, queue: u16, source: io::Error },
    /// Recovery found no device with this id, or only a dead one.
    #[error("ublk device {id} does not exist any more")]
    Gone { id: u32 },
    /// The device with this id was not created by the caller (its owner tag differs).
    #[error("ublk device {id} belongs to another server (owner tag {found:#x}, expected {expected:#x}): not touching it")]
    NotOurs { id: u32, found: u64, expected: u64 },
    #[error("ublk device {id} is still served by running process {pid}: stop that process first")]
    StillServed { id: u32, pid: i32 },
    #[error("ublk device {id} was created without user recovery: it cannot be re-attached, only removed")]
    NotRecoverable { id: u32 },
}

fn device_suffix(id: Option<u32>) -> String {
    id.map(|id| format!(" on /dev/ublkb{id}")).unwrap_or_default()
}

/// libublk reports kernel errors as negative errno values inside its own error type.
pub(crate) fn to_io(error: libublk::UblkError) -> io::Error {
    match error {
        libublk::UblkError::UringIOError(errno) | libublk::UblkError::OtherError(errno) => {
            io::Error::from_raw_os_error(errno.abs())
        }
        libublk::UblkError::IOError(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

/// An error from control command `op` on device `id`.
pub(crate) fn control(op: &'static str, id: Option<u32>) -> impl FnOnce(libublk::UblkError) -> Error {
    move |e| Error::Control { op, id, source: to_io(e) }
}
