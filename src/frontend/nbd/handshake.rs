//! The fixed-newstyle handshake and option haggling, up to the transmission phase.
//!
//! We support the options a modern client needs to find and open our single export (`GO`,
//! `INFO`, `LIST`, legacy `EXPORT_NAME`), and `STARTTLS` where the export requires TLS, and
//! refuse everything else with `REP_ERR_UNSUP`, notably `STRUCTURED_REPLY`: we only ever send
//! simple replies. Where TLS is required, every option but `STARTTLS` and `ABORT` before it is
//! refused with `REP_ERR_TLS_REQD` (and `EXPORT_NAME`, which has no error reply, ends the
//! session), so nothing about the export is said in clear.

use std::io::{Read, Write};

use tracing::debug;

use super::error::SessionError;
use super::protocol::{self as p, OptionHeader};
use super::Export;

/// How option haggling ended when it ended without error.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The client selected our export: transmission starts on the same stream.
    Transmission,
    /// The client sent `OPT_ABORT`.
    Aborted,
    /// The client sent `OPT_STARTTLS` and it was acknowledged: the TLS handshake follows, then
    /// haggling goes on inside TLS.
    StartTls,
}

/// Where the session stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// The export does not offer TLS.
    Off,
    /// The export requires TLS and the client has not started it yet.
    Required,
    /// Haggling goes on inside TLS.
    On,
}

/// Greets the client and reads its flags; returns whether it asked for no zeroes.
pub fn greet<R: Read, W: Write>(reader: &mut R, writer: &mut W) -> Result<bool, SessionError> {
    writer.write_all(&p::greeting())?;
    let client_flags = read_u32(reader)?;
    if client_flags & !(p::FLAG_C_FIXED_NEWSTYLE | p::FLAG_C_NO_ZEROES) != 0
        || client_flags & p::FLAG_C_FIXED_NEWSTYLE == 0
    {
        return Err(SessionError::ClientFlags(client_flags));
    }
    Ok(client_flags & p::FLAG_C_NO_ZEROES != 0)
}

/// Answers the client's options until it picks our export, gives up, or starts TLS.
///
/// Reads and writes are separate handles so the caller can read through a buffer that it keeps
/// for the transmission phase (a client may pipeline its first request behind `OPT_GO`).
pub fn haggle<R: Read, W: Write>(
    reader: &mut R,
    writer: &mut W,
    export: &Export,
    no_zeroes: bool,
    tls: Tls,
) -> Result<Outcome, SessionError> {
    loop {
        let mut header = [0; OptionHeader::LEN];
        reader.read_exact(&mut header)?;
        let OptionHeader { option, len } = OptionHeader::parse(&header)?;
        let mut payload = vec![0; len as usize];
        reader.read_exact(&mut payload)?;
        debug!(option, len, "client option");

        match option {
            p::OPT_STARTTLS => match tls {
                Tls::Off => reply_error(writer, option, p::REP_ERR_UNSUP, "this export does not offer TLS")?,
                Tls::On => reply_error(writer, option, p::REP_ERR_INVALID, "TLS is already on")?,
                Tls::Required if !payload.is_empty() => {
                    reply_error(writer, option, p::REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")?
                }
                Tls::Required => {
                    writer.write_all(&p::option_reply(option, p::REP_ACK, &[]))?;
                    return Ok(Outcome::StartTls);
                }
            },
            p::OPT_ABORT => {
                // The client may already have hung up without waiting for our ACK.
                if let Err(error) = writer.write_all(&p::option_reply(option, p::REP_ACK, &[])) {
                    debug!(%error, "could not acknowledge OPT_ABORT");
                }
                return Ok(Outcome::Aborted);
            }
            p::OPT_EXPORT_NAME if tls == Tls::Required => return Err(SessionError::TlsRequired),
            _ if tls == Tls::Required => {
                reply_error(writer, option, p::REP_ERR_TLS_REQD, "this export requires TLS: send NBD_OPT_STARTTLS first")?
            }
            p::OPT_EXPORT_NAME => {
                // This legacy option has no error reply: an unknown name ends the session.
                if !export.matches(&payload) {
                    return Err(SessionError::UnknownExport(
                        String::from_utf8_lossy(&payload).into_owned(),
                    ));
                }
                let mut reply = Vec::with_capacity(10 + p::EXPORT_NAME_PADDING);
                reply.extend_from_slice(&export.size.to_be_bytes());
                reply.extend_from_slice(&p::TRANSMISSION_FLAGS.to_be_bytes());
                if !no_zeroes {
                    reply.resize(reply.len() + p::EXPORT_NAME_PADDING, 0);
                }
                writer.write_all(&reply)?;
                return Ok(Outcome::Transmission);
            }
            p::OPT_LIST if !payload.is_empty() => {
                reply_error(writer, option, p::REP_ERR_INVALID, "OPT_LIST takes no data")?;
            }
            p::OPT_LIST => {
                let mut server = Vec::with_capacity(4 + export.name.len());
                // Export names are ours and short; the cast cannot truncate.
                server.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                server.extend_from_slice(export.name.as_bytes());
                writer.write_all(&p::option_reply(option, p::REP_SERVER, &server))?;
                writer.write_all(&p::option_reply(option, p::REP_ACK, &[]))?;
            }
            p::OPT_INFO | p::OPT_GO => match p::parse_info_request(&payload) {
                Err(reason) => reply_error(writer, option, p::REP_ERR_INVALID, reason)?,
                Ok(name) if !export.matches(name) => {
                    let message = format!("no export named {:?}", String::from_utf8_lossy(name));
                    reply_error(writer, option, p::REP_ERR_UNKNOWN, &message)?;
                }
                Ok(_) => {
                    let mut replies =
                        p::option_reply(option, p::REP_INFO, &p::info_export(export.size));
                    replies.extend(p::option_reply(
                        option,
                        p::REP_INFO,
                        &p::info_block_size(export.block_size),
                    ));
                    replies.extend(p::option_reply(option, p::REP_ACK, &[]));
                    writer.write_all(&replies)?;
                    if option == p::OPT_GO {
                        return Ok(Outcome::Transmission);
                    }
                }
            },
            _ => reply_error(writer, option, p::REP_ERR_UNSUP, "option not supported")?,
        }
    }
}

fn reply_error<W: Write>(
    writer: &mut W,
    option: u32,
    reply_type: u32,
    message: &str,
) -> Result<(), SessionError> {
    debug!(option, reply_type, message, "refusing option");
    writer.write_all(&p::option_reply(option, reply_type, message.as_bytes()))?;
    Ok(())
}

fn read_u32<R: Read>(reader: &mut R) -> std::io::Result<u32> {
    let mut buf = [0; 4];
    reader.read_exact(&mut buf)?;
    Ok(u32::from_be_bytes(buf))
}
