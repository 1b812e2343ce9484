//! What the engine's operations (attach, promote, demote, the admin commands) refuse or fail
//! with, each with what the operator can do about it.

use crate::core::states::DiskState;
use crate::disk::DiskError;
use crate::frontend::ublk::UblkError;
use crate::meta::MetaError;
use crate::replica::PromoteRefusal;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("cannot listen on {address} for peers: {source} (is another daemon using this address?)")]
    Listen { address: std::net::SocketAddr, source: std::io::Error },
    #[error("metadata on {disk} was created for peer node ids {in_meta:?}, the resource file has {in_config:?}: run `blkrepl create-md --force` on this node (its data will be fully resynced)")]
    PeersChanged { disk: String, in_meta: Vec<u8>, in_config: Vec<u8> },
    #[error("this node's data is {disk}, not UpToDate: promote only a node with good data, or use `primary --force` to declare this node's data the good copy")]
    NotUpToDate { disk: DiskState },
    #[error("peer {peer} is primary: demote it first (`blkrepl secondary` there)")]
    PeerIsPrimary { peer: String },
    #[error("no quorum: this node reaches {votes} of {voters} voters and needs {needed}; bring more nodes (or the witness) up and connected. --force does not override quorum: if the majority is lost for good, change `quorum` in the resource file on purpose and run `blkrepl adjust`")]
    NoQuorum { votes: u8, voters: u8, needed: u8 },
    #[error("the device {device} is in use by {users}: stop using it (unmount it, close it, disconnect NBD clients) first")]
    InUse { device: String, users: String },
    #[error("the device {device} fails every request ({why}) and is still in use by {users}: the data under it may have changed since they read it, so it never serves again; unmount it (it then goes away) and promote again")]
    FailingDeviceInUse { device: String, why: String, users: String },
    #[error("cannot export NBD on {url}: {source}")]
    Nbd { url: String, source: std::io::Error },
    #[error("cannot export the ublk device: {0}")]
    Ublk(#[from] UblkError),
    #[error("{0}")]
    Refused(String),
    #[error("writing metadata failed: {0}; the disk is marked Failed")]
    MetaWrite(MetaError),
    #[error("a metadata write failed and the disk is marked Failed (the log has the error)")]
    DiskFailed,
    #[error("cannot start a thread: {0} (out of memory, or the process's thread limit)")]
    Thread(std::io::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

impl From<PromoteRefusal> for EngineError {
    fn from(refusal: PromoteRefusal) -> EngineError {
        match refusal {
            PromoteRefusal::PeerIsPrimary { peer } => EngineError::PeerIsPrimary { peer },
            PromoteRefusal::NoQuorum { votes, voters, needed } => EngineError::NoQuorum { votes, voters, needed },
            PromoteRefusal::NotUpToDate { disk } => EngineError::NotUpToDate { disk },
            other => EngineError::Refused(other.to_string()),
        }
    }
}

impl EngineError {
    /// The CLI's exit code for this error (documented in docs/OPERATIONS.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            EngineError::NotUpToDate { .. } | EngineError::PeerIsPrimary { .. } | EngineError::Refused(_) => 11,
            EngineError::InUse { .. } | EngineError::FailingDeviceInUse { .. } => 12,
            EngineError::NoQuorum { .. } => 14,
            _ => 1,
        }
    }
}
