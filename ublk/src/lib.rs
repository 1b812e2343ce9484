//! ublk device support for blkrepl.
//!
//! Until the ublk frontend lands this crate only answers whether the running kernel offers ublk
//! at all, so the daemon can say so clearly and point users at the NBD frontend.

use std::path::Path;

/// The control node the ublk driver creates when `ublk_drv` is loaded.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// Whether this kernel exposes ublk (the `ublk_drv` module is loaded or built in).
pub fn kernel_has_ublk() -> bool {
    Path::new(CONTROL_PATH).exists()
}
