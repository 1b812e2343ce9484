//! A small, safe ublk device crate for blkrepl: `/dev/ublkbN` served from userspace.
//!
//! Everything ublk lives here, over [`libublk`] (by the ublk driver's author, tracking the
//! kernel's interface). None of libublk's types leave this crate: callers see a [`Request`], a
//! [`Handler`] they implement, a [`Completion`] they may call from any thread, and a [`Device`]
//! with its control operations (create, recover after a crash, remove).
//!
//! Shape:
//! - `features`: what the running kernel's driver offers (`GET_FEATURES`).
//! - `device`: control: add, set parameters, start, stop, delete, and user recovery.
//! - `queue`: one thread and one io_uring per hardware queue; requests go to the handler,
//!   completions come back through a per-queue list and an eventfd.
//! - `request`: the request type and the completion handle.
//! - `buffers`: the reused memory of large writes' data.
//! - `holders`: who keeps a block device busy (mounts, stacked devices, open file descriptors).
//!
//! The crate knows nothing of replication.

mod buffers;
mod device;
mod error;
mod features;
mod holders;
mod queue;
mod request;
mod shared;

pub use buffers::WriteData;
pub use device::{CopyMode, Device, DeviceConfig, DeviceState, DeviceStatus};
pub use error::Error;
pub use features::Features;
pub use holders::{holders, Holder};
pub use request::{Completion, Handler, Request};

use std::path::{Path, PathBuf};

/// The control node the ublk driver creates when `ublk_drv` is loaded.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// Whether this kernel exposes ublk (the `ublk_drv` module is loaded or built in).
pub fn kernel_has_ublk() -> bool {
    Path::new(CONTROL_PATH).exists()
}

/// The block device of ublk device `id`.
pub fn block_device_path(id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{id}"))
}
