//! What a host asks of the device and what it gets back, whichever frontend carries it: the
//! replica's input and output for I/O. Kept apart from the frontends so that the simulator's
//! long run counts a change here as a change of the rules and a frontend's change as none
//! (`scripts/sim-long-run.sh`).

use bytes::Bytes;

/// One request from the host. Offsets and lengths are in bytes; frontends check alignment and
/// bounds against [`BlockDevice::size_bytes`](super::BlockDevice::size_bytes) before submitting.
#[derive(Debug, Clone)]
pub enum BlockRequest {
    Read { offset: u64, len: u32 },
    /// `fua`: complete only once the data is durable on every replica that receives it.
    Write { offset: u64, data: Bytes, fua: bool },
    /// Complete only once every write completed before it is durable locally and on every
    /// connected UpToDate peer.
    Flush,
    /// The range's content becomes unspecified (a hint; may be a no-op).
    Discard { offset: u64, len: u32 },
    /// The range reads back as zeroes afterwards.
    WriteZeroes { offset: u64, len: u32, fua: bool },
}

/// Why a request failed, mapped by each frontend onto its own error codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("I/O error on the backing disk")]
    Io,
    #[error("no space left on the backing disk")]
    NoSpace,
    #[error("request outside the device or misaligned")]
    Invalid,
    /// The node is not primary (or lost the right to write, e.g. quorum).
    #[error("device is read-only on this node")]
    ReadOnly,
    #[error("operation not supported")]
    NotSupported,
    #[error("device is shutting down")]
    Shutdown,
}

/// What a completed request yields: the data for a read, nothing otherwise.
pub type BlockResult = Result<Option<Bytes>, BlockError>;
