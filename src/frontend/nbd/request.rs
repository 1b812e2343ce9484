//! Turning a request header into a command the device can run, or a reason to refuse it.
//!
//! Pure logic, so every bounds and flags rule is unit-tested without a socket. The device
//! never sees a request we could have refused here.

use super::protocol::{self as p, Errno, RequestHeader};
use super::Export;

/// A request that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    /// The payload (`len` bytes) still has to be read from the stream.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disconnect,
}

/// Why a request is refused, and whether the session can go on afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub errno: Errno,
    pub reason: &'static str,
    /// The stream cannot be trusted any more (e.g. a payload too large to consume).
    pub fatal: bool,
}

impl Rejection {
    fn new(errno: Errno, reason: &'static str) -> Self {
        Rejection { errno, reason, fatal: false }
    }
}

/// Validates flags, length limits, alignment and bounds.
///
/// Out-of-bounds writes get `ENOSPC` and everything else `EINVAL`, as the protocol
/// recommends. Zero-length data requests are refused: their meaning is unspecified and the
/// device should never have to guess.
pub fn validate(header: &RequestHeader, export: &Export) -> Result<Command, Rejection> {
    let allowed_flags = match header.kind {
        p::CMD_WRITE_ZEROES => p::CMD_FLAG_FUA | p::CMD_FLAG_NO_HOLE,
        _ => p::CMD_FLAG_FUA,
    };
    let fua = header.flags & p::CMD_FLAG_FUA != 0;
    let (offset, len) = (header.offset, header.len);

    if header.kind == p::CMD_DISC {
        // Nothing follows a disconnect, not even a reply, so its flags are moot.
        return Ok(Command::Disconnect);
    }
    if matches!(header.kind, p::CMD_READ | p::CMD_WRITE) && len > p::MAX_PAYLOAD {
        return Err(Rejection {
            errno: Errno::Inval,
            reason: "length over the maximum payload",
            fatal: true,
        });
    }
    if header.flags & !allowed_flags != 0 {
        return Err(Rejection::new(Errno::Inval, "flag not valid for this command"));
    }

    let command = match header.kind {
        p::CMD_READ => Command::Read { offset, len },
        p::CMD_WRITE => Command::Write { offset, len, fua },
        p::CMD_FLUSH => return Ok(Command::Flush),
        p::CMD_TRIM => Command::Trim { offset, len },
        p::CMD_WRITE_ZEROES => Command::WriteZeroes { offset, len, fua },
        _ => return Err(Rejection::new(Errno::Inval, "unsupported command")),
    };

    let block = u64::from(export.block_size);
    if len == 0 {
        return Err(Rejection::new(Errno::Inval, "zero-length request"));
    }
    if offset % block != 0 || u64::from(len) % block != 0 {
        return Err(Rejection::new(Errno::Inval, "request not aligned to the block size"));
    }
    if offset.checked_add(u64::from(len)).is_none_or(|end| end > export.size) {
        let errno = match command {
            Command::Write { .. } | Command::WriteZeroes { .. } => Errno::NoSpc,
            _ => Errno::Inval,
        };
        return Err(Rejection::new(errno, "request beyond the end of the export"));
    }
    Ok(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;

    fn export() -> Export {
        Export { name: "disk".into(), size: SIZE, block_size: 512 }
    }

    fn header(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader { flags, kind, cookie: 1, offset, len }
    }

    fn check(kind: u16, flags: u16, offset: u64, len: u32) -> Result<Command, Rejection> {
        validate(&header(kind, flags, offset, len), &export())
    }

    fn errno(result: Result<Command, Rejection>) -> Errno {
        result.expect_err("request should be refused").errno
    }

    #[test]
    fn valid_requests_become_commands() {
        assert_eq!(check(p::CMD_READ, 0, 0, 4096), Ok(Command::Read { offset: 0, len: 4096 }));
        assert_eq!(
            check(p::CMD_WRITE, p::CMD_FLAG_FUA, SIZE - 512, 512),
            Ok(Command::Write { offset: SIZE - 512, len: 512, fua: true })
        );
        assert_eq!(check(p::CMD_FLUSH, 0, 0, 0), Ok(Command::Flush));
        assert_eq!(check(p::CMD_DISC, 0, 0, 0), Ok(Command::Disconnect));
        assert_eq!(
            check(p::CMD_TRIM, p::CMD_FLAG_FUA, 512, 1024),
            Ok(Command::Trim { offset: 512, len: 1024 })
        );
        assert_eq!(
            check(p::CMD_WRITE_ZEROES, p::CMD_FLAG_NO_HOLE, 0, SIZE as u32),
            Ok(Command::WriteZeroes { offset: 0, len: SIZE as u32, fua: false })
        );
    }

    #[test]
    fn out_of_bounds_is_einval_for_reads_and_enospc_for_writes() {
        assert_eq!(errno(check(p::CMD_READ, 0, SIZE, 512)), Errno::Inval);
        assert_eq!(errno(check(p::CMD_READ, 0, SIZE - 512, 1024)), Errno::Inval);
        assert_eq!(errno(check(p::CMD_TRIM, 0, SIZE, 512)), Errno::Inval);
        assert_eq!(errno(check(p::CMD_WRITE, 0, SIZE, 512)), Errno::NoSpc);
        assert_eq!(errno(check(p::CMD_WRITE_ZEROES, 0, SIZE - 512, 1024)), Errno::NoSpc);
        // offset + len must not wrap around.
        assert_eq!(errno(check(p::CMD_READ, 0, u64::MAX - 511, 512)), Errno::Inval);
    }

    #[test]
    fn misaligned_and_empty_requests_are_einval() {
        assert_eq!(errno(check(p::CMD_READ, 0, 1, 512)), Errno::Inval);
        assert_eq!(errno(check(p::CMD_WRITE, 0, 0, 100)), Errno::Inval);
        assert_eq!(errno(check(p::CMD_READ, 0, 0, 0)), Errno::Inval);
        let big_blocks = Export { block_size: 4096, ..export() };
        let rejected = validate(&header(p::CMD_READ, 0, 512, 4096), &big_blocks);
        assert_eq!(errno(rejected), Errno::Inval);
    }

    #[test]
    fn oversized_payload_is_fatal_only_for_read_and_write() {
        for kind in [p::CMD_READ, p::CMD_WRITE] {
            let rejection = check(kind, 0, 0, p::MAX_PAYLOAD + 512).unwrap_err();
            assert_eq!(rejection.errno, Errno::Inval);
            assert!(rejection.fatal);
        }
        // TRIM and WRITE_ZEROES carry no payload, so a long one is just out of bounds here.
        let rejection = check(p::CMD_TRIM, 0, 0, p::MAX_PAYLOAD + 512).unwrap_err();
        assert!(!rejection.fatal);
        let big = Export { size: 1 << 30, ..export() };
        let long_zeroes = validate(&header(p::CMD_WRITE_ZEROES, 0, 0, 1 << 29), &big);
        assert_eq!(long_zeroes, Ok(Command::WriteZeroes { offset: 0, len: 1 << 29, fua: false }));
    }

    #[test]
    fn unknown_commands_and_flags_are_einval() {
        for kind in [5 /* CACHE */, 7 /* BLOCK_STATUS */, 0x1234] {
            let rejection = check(kind, 0, 0, 512).unwrap_err();
            assert_eq!(rejection.errno, Errno::Inval);
            assert!(!rejection.fatal);
        }
        assert_eq!(errno(check(p::CMD_READ, 4 /* DF */, 0, 512)), Errno::Inval);
        assert_eq!(errno(check(p::CMD_WRITE, p::CMD_FLAG_NO_HOLE, 0, 512)), Errno::Inval);
        assert_eq!(errno(check(p::CMD_WRITE_ZEROES, 16 /* FAST_ZERO */, 0, 512)), Errno::Inval);
        assert_eq!(errno(check(p::CMD_FLUSH, 0x8000, 0, 0)), Errno::Inval);
    }
}
