//! The ublk driver's feature flags (`UBLK_F_*`), probed with `GET_FEATURES` at run time.
//!
//! Kernels differ a lot (6.12 has user copy and recovery with re-issue; 7.x adds zero copy and
//! automatic buffer registration), so the device is configured from what the running driver
//! says, never from the kernel version.

use crate::error::{control, Error};
use libublk::sys;
use std::fmt;

/// A set of `UBLK_F_*` flags: what a driver offers, or what a device uses.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Features(u64);

/// Every flag this crate can name, in bit order.
const NAMES: &[(u32, &str)] = &[
    (sys::UBLK_F_SUPPORT_ZERO_COPY, "zero_copy"),
    (sys::UBLK_F_URING_CMD_COMP_IN_TASK, "uring_cmd_comp_in_task"),
    (sys::UBLK_F_NEED_GET_DATA, "need_get_data"),
    (sys::UBLK_F_USER_RECOVERY, "user_recovery"),
    (sys::UBLK_F_USER_RECOVERY_REISSUE, "user_recovery_reissue"),
    (sys::UBLK_F_UNPRIVILEGED_DEV, "unprivileged_dev"),
    (sys::UBLK_F_CMD_IOCTL_ENCODE, "cmd_ioctl_encode"),
    (sys::UBLK_F_USER_COPY, "user_copy"),
    (sys::UBLK_F_ZONED, "zoned"),
    (sys::UBLK_F_USER_RECOVERY_FAIL_IO, "user_recovery_fail_io"),
    (sys::UBLK_F_UPDATE_SIZE, "update_size"),
    (sys::UBLK_F_AUTO_BUF_REG, "auto_buf_reg"),
    (sys::UBLK_F_QUIESCE, "quiesce"),
    (sys::UBLK_F_PER_IO_DAEMON, "per_io_daemon"),
    (sys::UBLK_F_BUF_REG_OFF_DAEMON, "buf_reg_off_daemon"),
    (sys::UBLK_F_BATCH_IO, "batch_io"),
    (sys::UBLK_F_INTEGRITY, "integrity"),
    (sys::UBLK_F_SAFE_STOP_DEV, "safe_stop_dev"),
    (sys::UBLK_F_NO_AUTO_PART_SCAN, "no_auto_part_scan"),
    (sys::UBLK_F_SHMEM_ZC, "shmem_zc"),
];

impl Features {
    /// Asks the driver what it supports. A driver older than `GET_FEATURES` (Linux 6.5) is
    /// reported as offering nothing, so the device falls back to the basic copy mode and has
    /// no recovery.
    pub fn probe() -> Result<Features, Error> {
        if !crate::kernel_has_ublk() {
            return Err(Error::NoDriver);
        }
        // A control handle with no device: opening /dev/ublk-control also proves permission.
        let ctrl = libublk::ctrl::UblkCtrl::new(None, -1, 0, 0, 0, 0, 0, libublk::UblkFlags::empty())
            .map_err(control("GET_FEATURES", None))?;
        Ok(Features(ctrl.get_driver_features().unwrap_or(0)))
    }

    pub const fn from_bits(bits: u64) -> Features {
        Features(bits)
    }

    fn has(self, flag: u32) -> bool {
        self.0 & u64::from(flag) != 0
    }

    /// The driver copies request data only when the server `pread`s/`pwrite`s `/dev/ublkcN`.
    pub fn user_copy(self) -> bool {
        self.has(sys::UBLK_F_USER_COPY)
    }

    /// A device survives its server's death (quiesced) and a new server can re-attach.
    pub fn user_recovery(self) -> bool {
        self.has(sys::UBLK_F_USER_RECOVERY)
    }

    /// Requests the dead server had taken are handed to the new server instead of failing.
    pub fn user_recovery_reissue(self) -> bool {
        self.has(sys::UBLK_F_USER_RECOVERY_REISSUE)
    }

    pub fn cmd_ioctl_encode(self) -> bool {
        self.has(sys::UBLK_F_CMD_IOCTL_ENCODE)
    }

    /// The named flags that are set, in bit order (unknown bits as `bit<N>`).
    pub fn names(self) -> Vec<String> {
        let mut names: Vec<String> =
            NAMES.iter().filter(|(flag, _)| self.has(*flag)).map(|(_, name)| (*name).to_owned()).collect();
        let known = NAMES.iter().fold(0u64, |bits, (flag, _)| bits | u64::from(*flag));
        names.extend((0..64).filter(|bit| (self.0 & !known) & (1 << bit) != 0).map(|bit| format!("bit{bit}")));
        names
    }
}

impl fmt::Debug for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Features({:#x}: {})", self.0, self.names().join(" "))
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_bits() {
        // The 6.12 driver's answer, as probed on Debian's bookworm-backports kernel.
        let features = Features::from_bits(0x1f8 | 0x4 | 0x1000_0000_0000);
        assert_eq!(
            features.names(),
            [
                "need_get_data",
                "user_recovery",
                "user_recovery_reissue",
                "unprivileged_dev",
                "cmd_ioctl_encode",
                "user_copy",
                "zoned",
                "bit44"
            ]
        );
        assert!(features.user_copy() && features.user_recovery_reissue() && features.cmd_ioctl_encode());
        assert!(!Features::from_bits(0x4).user_recovery());
    }
}
