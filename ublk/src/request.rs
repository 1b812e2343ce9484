//! Requests as the block layer sends them, and the handle that completes one.

use crate::buffers::WriteData;
use crate::shared::QueueShared;
use libublk::sys;
use std::fmt;
use std::sync::Arc;

/// One request on `/dev/ublkbN`. Offsets and lengths are in bytes, whatever the device's
/// logical block size (the kernel already checked alignment and bounds).
#[derive(Clone, PartialEq, Eq)]
pub enum Request {
    Read { offset: u64, len: u32 },
    /// `fua`: complete only once the data is durable.
    Write { offset: u64, data: WriteData, fua: bool },
    /// Complete only once every write completed before it is durable.
    Flush,
    /// The range's content becomes unspecified.
    Discard { offset: u64, len: u32 },
    /// The range reads back as zeroes afterwards.
    WriteZeroes { offset: u64, len: u32, fua: bool },
}

impl fmt::Debug for Request {
    // A write's payload would flood any log it appears in.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Read { offset, len } => write!(f, "Read {{ offset: {offset}, len: {len} }}"),
            Request::Write { offset, data, fua } => {
                write!(f, "Write {{ offset: {offset}, len: {}, fua: {fua} }}", data.len())
            }
            Request::Flush => f.write_str("Flush"),
            Request::Discard { offset, len } => write!(f, "Discard {{ offset: {offset}, len: {len} }}"),
            Request::WriteZeroes { offset, len, fua } => {
                write!(f, "WriteZeroes {{ offset: {offset}, len: {len}, fua: {fua} }}")
            }
        }
    }
}

/// What a device does with its requests.
pub trait Handler: Send + Sync + 'static {
    /// Called on the queue's own thread, once per request. It must not wait for the I/O: it
    /// hands the request on and returns, and `done` is completed later from any thread. While
    /// this runs, no other request of the same queue is started or completed.
    fn handle(&self, request: Request, done: Completion);
}

/// A request's operation as decoded from the kernel's descriptor, before any data is fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Read { offset: u64, len: u32 },
    Write { offset: u64, len: u32, fua: bool },
    Flush,
    Discard { offset: u64, len: u32 },
    WriteZeroes { offset: u64, len: u32, fua: bool },
}

/// Sectors in a descriptor are always 512 bytes, whatever the logical block size.
const SECTOR_SHIFT: u32 = 9;

/// Decodes a request descriptor; `Err(errno)` for operations the device does not offer.
pub(crate) fn decode(op_flags: u32, start_sector: u64, nr_sectors: u32) -> Result<Op, i32> {
    let op = op_flags & 0xff;
    // A flush's sector fields are not set: only the other operations have a range.
    if op == sys::UBLK_IO_OP_FLUSH {
        return Ok(Op::Flush);
    }
    let offset = start_sector.checked_shl(SECTOR_SHIFT).filter(|o| o >> SECTOR_SHIFT == start_sector);
    let len = u32::try_from(u64::from(nr_sectors) << SECTOR_SHIFT).ok();
    let fua = op_flags & sys::UBLK_IO_F_FUA != 0;
    let (Some(offset), Some(len)) = (offset, len) else { return Err(libc::EINVAL) };
    match op {
        sys::UBLK_IO_OP_READ => Ok(Op::Read { offset, len }),
        sys::UBLK_IO_OP_WRITE => Ok(Op::Write { offset, len, fua }),
        sys::UBLK_IO_OP_DISCARD => Ok(Op::Discard { offset, len }),
        sys::UBLK_IO_OP_WRITE_ZEROES => Ok(Op::WriteZeroes { offset, len, fua }),
        _ => Err(libc::EOPNOTSUPP),
    }
}

/// Completes one request. Call exactly one of [`Completion::ok`], [`Completion::read`] or
/// [`Completion::fail`], from any thread; the data of a read is copied to the kernel by the
/// calling thread, and the queue thread is only woken to commit the result.
///
/// Dropping it without completing fails the request with `EIO` (and logs it), so a request
/// can never be lost: the kernel would wait for it forever.
#[must_use = "a request that is never completed hangs its issuer"]
pub struct Completion {
    queue: Arc<QueueShared>,
    tag: u16,
    op: Op,
    done: bool,
}

impl Completion {
    pub(crate) fn new(queue: Arc<QueueShared>, tag: u16, op: Op) -> Completion {
        Completion { queue, tag, op, done: false }
    }

    /// Success of a write, flush, discard or write-zeroes.
    pub fn ok(mut self) {
        let result = match self.op {
            Op::Read { .. } => {
                tracing::error!(device = self.queue.device_id, ?self.op, "read completed without data; failing it");
                -libc::EIO
            }
            // The block layer counts a write's progress in bytes.
            Op::Write { len, .. } => len as i32,
            Op::Flush | Op::Discard { .. } | Op::WriteZeroes { .. } => 0,
        };
        self.finish(result);
    }

    /// Success of a read: `data` must be exactly the requested length.
    pub fn read(mut self, data: &[u8]) {
        let result = match self.op {
            Op::Read { len, .. } if data.len() == len as usize => match self.queue.copy_to_request(self.tag, data) {
                Ok(()) => len as i32,
                Err(error) => {
                    tracing::error!(device = self.queue.device_id, %error, "cannot copy read data to the request");
                    -libc::EIO
                }
            },
            op => {
                tracing::error!(device = self.queue.device_id, ?op, got = data.len(), "read data does not match the request; failing it");
                -libc::EIO
            }
        };
        self.finish(result);
    }

    /// Failure with `errno` (a positive `libc::E*` value; anything else becomes `EIO`).
    pub fn fail(mut self, errno: i32) {
        let errno = if (1..4096).contains(&errno) { errno } else { libc::EIO };
        self.finish(-errno);
    }

    fn finish(&mut self, result: i32) {
        self.done = true;
        self.queue.finish(self.tag, result);
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if !self.done {
            tracing::error!(device = self.queue.device_id, op = ?self.op, "request dropped without a completion; failing it with EIO");
            self.finish(-libc::EIO);
        }
    }
}

impl fmt::Debug for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completion").field("tag", &self.tag).field("op", &self.op).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_decode_to_byte_ranges() {
        assert_eq!(decode(sys::UBLK_IO_OP_READ, 8, 8), Ok(Op::Read { offset: 4096, len: 4096 }));
        assert_eq!(
            decode(sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA, 1, 1),
            Ok(Op::Write { offset: 512, len: 512, fua: true })
        );
        assert_eq!(decode(sys::UBLK_IO_OP_FLUSH, 0, 0), Ok(Op::Flush));
        // Seen from the 6.12 driver: a flush carries whatever was in the descriptor before.
        assert_eq!(decode(sys::UBLK_IO_OP_FLUSH, u64::MAX, u32::MAX), Ok(Op::Flush));
        assert_eq!(decode(sys::UBLK_IO_OP_DISCARD, 16, 32), Ok(Op::Discard { offset: 8192, len: 16384 }));
        assert_eq!(
            decode(sys::UBLK_IO_OP_WRITE_ZEROES, 0, 2048),
            Ok(Op::WriteZeroes { offset: 0, len: 1 << 20, fua: false })
        );
    }

    #[test]
    fn unsupported_and_oversized_requests_are_refused() {
        assert_eq!(decode(sys::UBLK_IO_OP_WRITE_SAME, 0, 8), Err(libc::EOPNOTSUPP));
        assert_eq!(decode(sys::UBLK_IO_OP_ZONE_APPEND, 0, 8), Err(libc::EOPNOTSUPP));
        // 8 GiB in one request does not fit the u32 length.
        assert_eq!(decode(sys::UBLK_IO_OP_DISCARD, 0, 1 << 24), Err(libc::EINVAL));
        assert_eq!(decode(sys::UBLK_IO_OP_READ, u64::MAX >> 1, 8), Err(libc::EINVAL));
    }
}
