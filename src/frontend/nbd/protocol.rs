//! The NBD wire format: magic numbers, flag bits and codes, and the fixed-layout messages.
//!
//! Everything here is pure encoding and decoding so the phases that do I/O (`handshake`,
//! `transmission`) read as protocol logic. All integers are big-endian on the wire. Names
//! follow the constants of the NBD protocol document without their `NBD_` prefix.

use super::error::SessionError;
use crate::frontend::BlockError;

/// First word of the server greeting ("NBDMAGIC").
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Second word of the greeting and the prefix of every client option ("IHAVEOPT").
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every server reply during option haggling.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission-phase request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of every simple reply (the only reply kind we send: no structured replies).
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags we send: fixed newstyle, and the 124 trailing zeroes may be skipped.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags; any other bit means the client expects something we never offered.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags. `CAN_MULTI_CONN` is sound because the engine's flush (and FUA) covers
/// writes completed on every connection, not just the one that sent the flush.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TRANSMISSION_FLAGS: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_CAN_MULTI_CONN;

/// Options a client may send during haggling (everything else is answered `REP_ERR_UNSUP`).
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

/// Option reply types; errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;

/// Information items inside an `REP_INFO` reply.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Request flags we accept. FUA is valid on every command once `SEND_FUA` is advertised;
/// `NO_HOLE` only on WRITE_ZEROES. DF and FAST_ZERO need features we never advertise.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Request types we serve (CACHE, BLOCK_STATUS and unknown types get `EINVAL`).
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Longest option payload we read; anything longer is hostile or broken, so we hang up.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Largest READ/WRITE we accept, advertised as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Smallest alignment we ever accept, whatever the device says.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Advertised preferred block size: smaller writes may cost a read-modify-write downstream.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Trailing padding after `OPT_EXPORT_NAME`'s reply unless both sides agreed on NO_ZEROES.
pub const EXPORT_NAME_PADDING: usize = 124;

/// Error codes of simple replies. The protocol fixes these values; they are not host errnos.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    Perm = 1,
    Io = 5,
    Inval = 22,
    NoSpc = 28,
    NotSup = 95,
    Shutdown = 108,
}

impl From<&BlockError> for Errno {
    fn from(error: &BlockError) -> Self {
        match error {
            BlockError::Io => Errno::Io,
            BlockError::NoSpace => Errno::NoSpc,
            BlockError::Invalid => Errno::Inval,
            BlockError::ReadOnly => Errno::Perm,
            BlockError::NotSupported => Errno::NotSup,
            BlockError::Shutdown => Errno::Shutdown,
        }
    }
}

/// The 18-byte greeting that opens every connection.
pub fn greeting() -> [u8; 18] {
    let mut out = [0; 18];
    out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// The header of one client option (its payload follows on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub const LEN: usize = 16;

    /// Rejects a wrong magic or an oversized payload: either way the stream cannot be trusted.
    pub fn parse(buf: &[u8; Self::LEN]) -> Result<Self, SessionError> {
        let magic = be_u64(&buf[0..8]);
        if magic != IHAVEOPT {
            return Err(SessionError::BadOptionMagic(magic));
        }
        let header = OptionHeader { option: be_u32(&buf[8..12]), len: be_u32(&buf[12..16]) };
        if header.len > MAX_OPTION_LEN {
            return Err(SessionError::OptionTooLong { option: header.option, len: header.len });
        }
        Ok(header)
    }
}

/// Encodes one option reply: header and payload in a single buffer, written with one call.
pub fn option_reply(option: u32, reply_type: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + payload.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    // Payloads are bounded by our own message sizes, far below u32::MAX.
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The export name and information requests carried by `OPT_INFO` and `OPT_GO`.
///
/// Returns a human-readable reason when the payload is malformed, for `REP_ERR_INVALID`.
pub fn parse_info_request(payload: &[u8]) -> Result<&[u8], &'static str> {
    let name_len = payload.get(..4).map(be_u32).ok_or("payload shorter than its name length")?;
    let rest = &payload[4..];
    let name_len = usize::try_from(name_len).map_err(|_| "export name length overflows")?;
    if rest.len() < name_len {
        return Err("export name longer than the option");
    }
    let (name, rest) = rest.split_at(name_len);
    let count = rest.get(..2).map(be_u16).ok_or("missing information request count")?;
    if rest.len() - 2 != usize::from(count) * 2 {
        return Err("information request count does not match the option length");
    }
    // We always send the export and block-size items, so which ones were asked for is moot.
    Ok(name)
}

/// `INFO_EXPORT`: size and transmission flags.
pub fn info_export(size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
    out
}

/// `INFO_BLOCK_SIZE`: minimum (our alignment), preferred, and maximum payload.
pub fn info_block_size(minimum: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&minimum.to_be_bytes());
    out.extend_from_slice(&PREFERRED_BLOCK_SIZE.max(minimum).to_be_bytes());
    out.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
    out
}

/// A transmission-phase request header (a WRITE's payload follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl RequestHeader {
    pub const LEN: usize = 28;

    /// Rejects a wrong magic: we have lost the framing and must hang up.
    pub fn parse(buf: &[u8; Self::LEN]) -> Result<Self, SessionError> {
        let magic = be_u32(&buf[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(SessionError::BadRequestMagic(magic));
        }
        Ok(RequestHeader {
            flags: be_u16(&buf[4..6]),
            kind: be_u16(&buf[6..8]),
            cookie: be_u64(&buf[8..16]),
            offset: be_u64(&buf[16..24]),
            len: be_u32(&buf[24..28]),
        })
    }

    /// The header as a client sends it (for tests, which play the client).
    #[cfg(test)]
    pub fn encode(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(Self::LEN);
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&self.flags.to_be_bytes());
        h.extend_from_slice(&self.kind.to_be_bytes());
        h.extend_from_slice(&self.cookie.to_be_bytes());
        h.extend_from_slice(&self.offset.to_be_bytes());
        h.extend_from_slice(&self.len.to_be_bytes());
        h
    }

    /// How many payload bytes follow this header: only WRITE carries data.
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.len
        } else {
            0
        }
    }
}

/// A simple reply header; a successful READ's data follows it.
pub fn simple_reply(error: Option<Errno>, cookie: u64) -> [u8; 16] {
    let mut out = [0; 16];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.map_or(0, |e| e as u32).to_be_bytes());
    out[8..].copy_from_slice(&cookie.to_be_bytes());
    out
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&b[..8]);
    u64::from_be_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option_header_bytes(magic: u64, option: u32, len: u32) -> [u8; OptionHeader::LEN] {
        let mut buf = [0; OptionHeader::LEN];
        buf[..8].copy_from_slice(&magic.to_be_bytes());
        buf[8..12].copy_from_slice(&option.to_be_bytes());
        buf[12..].copy_from_slice(&len.to_be_bytes());
        buf
    }

    #[test]
    fn greeting_layout() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn option_header_checks_magic_and_length() {
        let ok = OptionHeader::parse(&option_header_bytes(IHAVEOPT, OPT_GO, MAX_OPTION_LEN));
        assert_eq!(ok.unwrap(), OptionHeader { option: OPT_GO, len: MAX_OPTION_LEN });
        assert!(matches!(
            OptionHeader::parse(&option_header_bytes(NBDMAGIC, OPT_GO, 0)),
            Err(SessionError::BadOptionMagic(NBDMAGIC))
        ));
        assert!(matches!(
            OptionHeader::parse(&option_header_bytes(IHAVEOPT, OPT_GO, MAX_OPTION_LEN + 1)),
            Err(SessionError::OptionTooLong { option: OPT_GO, .. })
        ));
    }

    #[test]
    fn info_request_parsing() {
        let mut good = Vec::new();
        good.extend_from_slice(&3u32.to_be_bytes());
        good.extend_from_slice(b"abc");
        good.extend_from_slice(&2u16.to_be_bytes());
        good.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        good.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(parse_info_request(&good), Ok(&b"abc"[..]));

        assert!(parse_info_request(&good[..3]).is_err(), "truncated name length");
        assert!(parse_info_request(&good[..6]).is_err(), "truncated name");
        assert!(parse_info_request(&good[..7]).is_err(), "missing count");
        assert!(parse_info_request(&good[..10]).is_err(), "fewer items than counted");
        let mut long = good.clone();
        long.push(0);
        assert!(parse_info_request(&long).is_err(), "trailing garbage");
        let mut huge = good.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_info_request(&huge).is_err(), "name length past the end");
    }

    #[test]
    fn request_header_round_trip_and_bad_magic() {
        let mut buf = [0u8; RequestHeader::LEN];
        buf[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        buf[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        buf[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        buf[8..16].copy_from_slice(&0xdead_beef_u64.to_be_bytes());
        buf[16..24].copy_from_slice(&4096u64.to_be_bytes());
        buf[24..].copy_from_slice(&512u32.to_be_bytes());
        let header = RequestHeader::parse(&buf).unwrap();
        assert_eq!(
            header,
            RequestHeader {
                flags: 1,
                kind: CMD_WRITE,
                cookie: 0xdead_beef,
                offset: 4096,
                len: 512
            }
        );
        assert_eq!(header.payload_len(), 512);
        assert_eq!(RequestHeader { kind: CMD_READ, ..header }.payload_len(), 0);

        buf[0] ^= 1;
        assert!(matches!(RequestHeader::parse(&buf), Err(SessionError::BadRequestMagic(_))));
    }

    #[test]
    fn block_errors_map_to_protocol_errnos() {
        assert_eq!(Errno::from(&BlockError::ReadOnly) as u32, 1);
        assert_eq!(Errno::from(&BlockError::Io) as u32, 5);
        assert_eq!(Errno::from(&BlockError::Invalid) as u32, 22);
        assert_eq!(Errno::from(&BlockError::NoSpace) as u32, 28);
        assert_eq!(Errno::from(&BlockError::NotSupported) as u32, 95);
        assert_eq!(Errno::from(&BlockError::Shutdown) as u32, 108);
    }

    #[test]
    fn simple_reply_layout() {
        let r = simple_reply(Some(Errno::Inval), 7);
        assert_eq!(&r[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[4..8], &22u32.to_be_bytes());
        assert_eq!(&r[8..], &7u64.to_be_bytes());
        assert_eq!(&simple_reply(None, 7)[4..8], &[0; 4]);
    }
}
