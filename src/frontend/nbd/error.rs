//! Why an NBD session ended early.
//!
//! The distinction that matters to the server is between a peer that broke the protocol
//! (logged as a warning, with the reason) and a connection that merely went away.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connection I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("client sent unsupported handshake flags {0:#x}")]
    ClientFlags(u32),
    #[error("option has bad magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("option {option} has a {len}-byte payload, over the limit")]
    OptionTooLong { option: u32, len: u32 },
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("request has bad magic {0:#010x}")]
    BadRequestMagic(u32),
    #[error("request of type {kind} has a {len}-byte length, over the maximum payload")]
    OversizedRequest { kind: u16, len: u32 },
    #[error("client asked for the export with NBD_OPT_EXPORT_NAME without TLS, which this export requires")]
    TlsRequired,
    #[error("client sent data after NBD_OPT_STARTTLS before the TLS handshake")]
    DataBeforeTls,
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl SessionError {
    /// True when the peer violated the protocol, as opposed to disconnecting or asking for an
    /// export we do not have.
    pub fn is_protocol_violation(&self) -> bool {
        !matches!(self, SessionError::Io(_) | SessionError::UnknownExport(_))
    }
}
