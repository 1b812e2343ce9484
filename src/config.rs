//! Resource files: `DIR/<resource>.toml`, one per replicated resource.
//!
//! Parsing is strict (unknown keys are errors) because a typo in a replication config silently
//! ignored is how data gets lost; every error names the file, the key and what to do.

use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Write-completion protocol (see docs/DESIGN.md): when a write is acknowledged upward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    /// Local write done and the data handed to the send path.
    A,
    /// Local write done and the peer has received the data.
    B,
    /// Local write done and the peer's disk write done.
    C,
}

impl Protocol {
    pub fn as_byte(self) -> u8 {
        match self {
            Protocol::A => b'A',
            Protocol::B => b'B',
            Protocol::C => b'C',
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_byte() as char)
    }
}

pub use crate::core::quorum::{LinkTiming, OnNoQuorum, QuorumPolicy};
pub use crate::core::split_brain::{AfterSb0Pri, AfterSb1Pri, AfterSb2Pri, SplitBrainPolicies};

/// How a node exports the replicated device while it is primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frontend {
    /// No export (a node without `nbd` and no `frontend` key, as before frontends were chosen).
    None,
    /// An NBD server on this address.
    Nbd(NbdAddress),
    /// A Linux ublk block device, `/dev/ublkbN`.
    Ublk(UblkSettings),
}

/// Where a node's NBD export listens (`nbd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// `"IP:PORT"`.
    Tcp(SocketAddr),
    /// `"unix:/ABSOLUTE/PATH"`: a Unix socket; only who may write the file (its `mode`, from
    /// `nbd_socket_mode`) can connect.
    Unix { path: PathBuf, mode: u32 },
}

impl NbdAddress {
    /// The NBD URI of `export` here, as qemu and nbdinfo take it.
    pub fn url(&self, export: &str) -> String {
        match self {
            NbdAddress::Tcp(address) => format!("nbd://{address}/{export}"),
            NbdAddress::Unix { path, .. } => format!("nbd+unix:///{export}?socket={}", path.display()),
        }
    }

    /// The TCP address, for a TCP export.
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            NbdAddress::Tcp(address) => Some(*address),
            NbdAddress::Unix { .. } => None,
        }
    }
}

/// The mode of an NBD export's Unix socket unless `nbd_socket_mode` says otherwise: its owner
/// (the daemon's user) only.
pub const DEFAULT_NBD_SOCKET_MODE: u32 = 0o600;

/// The ublk device of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UblkSettings {
    /// A fixed device number (`/dev/ublkbN`); `None` lets the kernel pick one.
    pub id: Option<u32>,
    /// Hardware queues; `None` = one per CPU.
    pub queues: Option<u16>,
    /// Requests in flight per queue.
    pub depth: u16,
}

pub const DEFAULT_UBLK_DEPTH: u16 = 128;
/// The ublk driver's limits: 4096 queues of at most 4096 requests, 20-bit device numbers.
const MAX_UBLK_QUEUES: u16 = 4096;
const MAX_UBLK_DEPTH: u16 = 4096;
const MAX_UBLK_ID: u32 = (1 << 20) - 1;

/// What a primary does when a peer's send queue fills up under protocol A.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnCongestion {
    /// Writes wait for room in the send queue: the peer's link paces the application.
    Block,
    /// Once the queue holds more than `fill_bytes`, the primary goes Ahead of that peer: it stops
    /// sending it data, records the writes in its bitmap, and resyncs them when the queue has
    /// drained. Writes never wait for a slow peer; the peer is Outdated meanwhile.
    PullAhead { fill_bytes: u64 },
}

/// Bytes of bulk frames a peer link queues before writers of new data wait.
pub const SEND_QUEUE_KIB: u64 = 8 * 1024;
pub const DEFAULT_CONGESTION_FILL_KIB: u64 = SEND_QUEUE_KIB / 2;

/// One node of a resource, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Stable node id (0..=31); stored in metadata, so it must never change for a node.
    pub id: u8,
    pub name: String,
    /// Replication endpoint: this node listens here, peers dial it.
    pub address: SocketAddr,
    /// Backing file or block device; `None` for a diskless witness (`disk = "none"`), which
    /// only votes for quorum.
    pub disk: Option<PathBuf>,
    /// External metadata device; `None` keeps metadata at the end of `disk`.
    pub meta_disk: Option<PathBuf>,
    /// How the device is exported while this node is primary.
    pub frontend: Frontend,
    /// Where this node's daemon serves Prometheus scrapes (`GET /metrics`); `None`: it does not.
    pub metrics_address: Option<SocketAddr>,
    /// What this node proves who it is with on TLS links, when the resource has a `tls_ca`.
    pub certificate: Option<NodeCertificate>,
}

/// A node's `certificate` (PEM: its certificate, signed by the resource's `tls_ca` and naming
/// the node, then any intermediates) and `certificate_key` (PEM: its private key, readable by
/// its owner only). Read when the daemon starts, on that node only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCertificate {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// A validated resource file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceConfig {
    pub name: String,
    pub path: PathBuf,
    pub protocol: Protocol,
    pub quorum: QuorumPolicy,
    pub on_no_quorum: OnNoQuorum,
    /// What to do when a connect finds a split brain, by the number of primaries involved.
    pub split_brain: SplitBrainPolicies,
    /// Shared secret for peer authentication (HMAC challenge-response); `None` = no auth.
    pub secret: Option<Vec<u8>>,
    /// Set on purpose where the network between the nodes is trusted: no secret, and peers are
    /// not authenticated. Without it (or a secret) `up` refuses to start.
    pub trusted_network: bool,
    /// How the peer links carry their frames (`transport`).
    pub transport: Transport,
    /// The certificate authority (PEM) that signs every node's certificate (`tls_ca`): peers
    /// then authenticate with certificates that name them.
    pub tls_ca: Option<PathBuf>,
    /// NBD clients must start TLS and show a certificate `tls_ca` signed (`nbd_tls`).
    pub nbd_tls: bool,
    /// Bytes of data per dirty-bitmap bit.
    pub bitmap_block_size: u32,
    /// Activity-log slots (hot 4 MiB extents).
    pub al_extents: u32,
    /// Upper bound of the resync rate, shared with the application's writes.
    pub resync_rate_max_kib: u64,
    /// The device's logical block size (512 or 4096), as every frontend exports it.
    pub logical_block_size: u32,
    /// What a resync keeps however busy the application is.
    pub resync_rate_min_kib: u64,
    /// Send block digests first and data only where they differ.
    pub csums_resync: bool,
    pub on_congestion: OnCongestion,
    /// What a primary that lost quorum does once it learns another node was promoted.
    pub on_superseded: OnSuperseded,
    pub timing: LinkTiming,
    pub nodes: Vec<NodeConfig>,
    /// The `[promoter]` section: what `blkrepl promoter` starts where it promotes; `None`
    /// without one (the promoter leaves the resource alone).
    pub promoter: Option<PromoterConfig>,
    /// Commands run on events (`[handlers]`).
    pub handlers: HandlersConfig,
    /// What this node does when, as primary, it loses a data peer (`fencing`).
    pub fencing: Fencing,
}

/// The `fencing` setting (DRBD's names): what a primary does when it loses the link to a data
/// peer whose disk it does not know to be Outdated or Inconsistent. With anything but
/// `dont-care` it runs the `fence-peer` handler, which must keep that peer from being promoted
/// (or say why it need not); see docs/OPERATIONS.md, "Fencing".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fencing {
    /// No handler runs.
    #[default]
    DontCare,
    /// The handler runs; I/O goes on meanwhile.
    ResourceOnly,
    /// The handler runs and writes are held until it answers; a handler that fails or times
    /// out fails them (the peer may have been promoted), until the peer is back or `resume-io`.
    ResourceAndStonith,
}

impl Fencing {
    pub fn as_str(self) -> &'static str {
        match self {
            Fencing::DontCare => "dont-care",
            Fencing::ResourceOnly => "resource-only",
            Fencing::ResourceAndStonith => "resource-and-stonith",
        }
    }
}

impl std::fmt::Display for Fencing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `transport` setting: what the frames between the nodes are protected with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The default with a secret: a TLS 1.3 handshake, then every frame encrypted and
    /// authenticated (docs/DESIGN.md, "Security").
    Tls,
    /// Frames in clear; with a secret each carries a MAC (integrity, no confidentiality), on a
    /// trusted network nothing.
    Plain,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tls => "tls",
            Transport::Plain => "plain",
        }
    }
}

/// The `[handlers]` section: commands (run with `/bin/sh -c`) the daemon runs when something
/// an operator must know about happens, as DRBD's handlers (docs/OPERATIONS.md, "Handlers").
/// `None`: nothing runs for that event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlersConfig {
    pub split_brain: Option<String>,
    pub quorum_lost: Option<String>,
    pub before_resync_target: Option<String>,
    pub after_resync_target: Option<String>,
    pub peer_unreachable: Option<String>,
    /// Run by the replica's fencing rule, not by the status watch (see `handlers::fence`).
    pub fence_peer: Option<String>,
    /// A peer not connected this long is unreachable (`peer_unreachable_after_s`).
    pub peer_unreachable_after: Duration,
    /// A handler still running this long is killed, with its process group (`handler_timeout_s`).
    pub timeout: Duration,
}

pub const DEFAULT_PEER_UNREACHABLE_AFTER_S: u64 = 600;
pub const DEFAULT_HANDLER_TIMEOUT_S: u64 = 30;
/// Bounds that catch a unit mistake (milliseconds given as seconds) rather than limit anyone.
const MAX_PEER_UNREACHABLE_AFTER_S: u64 = 7 * 86_400;
const MAX_HANDLER_TIMEOUT_S: u64 = 3_600;

/// The `[promoter]` section of a resource file (docs/OPERATIONS.md, "Running with the
/// promoter").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromoterConfig {
    /// Shell commands run in order once this node is primary, each with the command that
    /// undoes it (`start[i]` and `stop[i]`), so a start that fails half-way stops exactly what
    /// it had started.
    pub commands: Vec<ServiceCommands>,
    /// systemd units started after the commands (`systemctl start`), stopped before them.
    pub units: Vec<String>,
    /// The `systemctl` that starts and stops `units` (another program in tests).
    pub systemctl: PathBuf,
    /// How long one start may take before it counts as failed (and is killed).
    pub start_timeout: Duration,
    /// How long one stop may take.
    pub stop_timeout: Duration,
    /// The unit of the wait before a promotion: the best-placed node waits least, and the others
    /// see its promotion before their own turn comes.
    pub promote_delay: Duration,
    pub on_stop_failure: OnStopFailure,
}

/// One `start` command and the `stop` command that undoes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCommands {
    pub start: String,
    pub stop: String,
}

/// What the promoter does when a service does not stop (its process fails or times out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStopFailure {
    /// Log it, demote anyway (refused while the device is still in use) and retry both.
    Log,
    /// Log it and exit with status 1, leaving the node primary: for systemd to escalate
    /// (`FailureAction=reboot`); the daemon's quorum rules still hold its writes.
    Exit,
}

pub const DEFAULT_PROMOTER_TIMEOUT_S: u64 = 60;
pub const DEFAULT_PROMOTE_DELAY_MS: u64 = 1000;

/// The `on_suspended_primary_outdated` setting (DRBD 9's name): what a primary without quorum
/// does once a connected node reports that another node was promoted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnSuperseded {
    /// Fail what it holds, become Secondary and Outdated, drop the export, and resync from the
    /// new primary: a healed partition needs no operator.
    ForceSecondary,
    /// Fail what it holds and stay primary, refusing to connect to the new primary, until an
    /// operator demotes it.
    Disconnect,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read resource file {path}: {source} (create it, or pass --config-dir)")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: key `{key}`: {problem}")]
    Invalid { path: PathBuf, key: String, problem: String },
    #[error("{path}: node `{node}` is not configured (configured: {known}); check --node or BLKREPL_NODE")]
    UnknownNode { path: PathBuf, node: String, known: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    name: String,
    #[serde(default = "default_protocol")]
    protocol: String,
    quorum: Option<RawQuorum>,
    on_no_quorum: Option<String>,
    after_sb_0pri: Option<String>,
    after_sb_1pri: Option<String>,
    after_sb_2pri: Option<String>,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    #[serde(default)]
    trusted_network: bool,
    transport: Option<String>,
    tls_ca: Option<PathBuf>,
    #[serde(default)]
    nbd_tls: bool,
    bitmap_block_size: Option<u32>,
    al_extents: Option<u32>,
    resync_rate_max_kib: Option<u64>,
    frontend: Option<String>,
    logical_block_size: Option<u32>,
    resync_rate_min_kib: Option<u64>,
    #[serde(default)]
    csums_resync: bool,
    on_congestion: Option<String>,
    congestion_fill_kib: Option<u64>,
    on_suspended_primary_outdated: Option<String>,
    fencing: Option<String>,
    ping_interval_ms: Option<u64>,
    ping_timeout_ms: Option<u64>,
    peer_stall_timeout_ms: Option<u64>,
    #[serde(default)]
    handlers: RawHandlers,
    #[serde(default)]
    node: Vec<RawNode>,
    promoter: Option<RawPromoter>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPromoter {
    #[serde(default)]
    start: Vec<String>,
    #[serde(default)]
    stop: Vec<String>,
    #[serde(default)]
    units: Vec<String>,
    systemctl: Option<PathBuf>,
    start_timeout_s: Option<u64>,
    stop_timeout_s: Option<u64>,
    promote_delay_ms: Option<u64>,
    on_stop_failure: Option<String>,
}

/// `[handlers]` as written: DRBD's handler names (with `-`), then the two timings.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHandlers {
    #[serde(rename = "split-brain")]
    split_brain: Option<String>,
    #[serde(rename = "quorum-lost")]
    quorum_lost: Option<String>,
    #[serde(rename = "before-resync-target")]
    before_resync_target: Option<String>,
    #[serde(rename = "after-resync-target")]
    after_resync_target: Option<String>,
    #[serde(rename = "peer-unreachable")]
    peer_unreachable: Option<String>,
    #[serde(rename = "fence-peer")]
    fence_peer: Option<String>,
    peer_unreachable_after_s: Option<u64>,
    handler_timeout_s: Option<u64>,
}

/// `quorum = "majority"`, `quorum = "off"` or `quorum = 2`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawQuorum {
    Word(String),
    Votes(i64),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: Option<u8>,
    name: String,
    address: String,
    disk: PathBuf,
    meta_disk: Option<PathBuf>,
    nbd: Option<String>,
    nbd_socket_mode: Option<String>,
    frontend: Option<String>,
    ublk_id: Option<u32>,
    ublk_queues: Option<u16>,
    ublk_depth: Option<u16>,
    metrics_address: Option<String>,
    certificate: Option<PathBuf>,
    certificate_key: Option<PathBuf>,
}

fn default_protocol() -> String {
    "C".to_owned()
}

pub const DEFAULT_BITMAP_BLOCK_SIZE: u32 = 4096;
pub const DEFAULT_AL_EXTENTS: u32 = 1237;
pub const DEFAULT_RESYNC_RATE_MAX_KIB: u64 = 100 * 1024;
pub const DEFAULT_RESYNC_RATE_MIN_KIB: u64 = 250;
pub use crate::meta::superblock::MAX_NODE_ID;
use crate::meta::layout::{MAX_AL_EXTENTS, MAX_BITMAP_BLOCK_SIZE, MIN_AL_EXTENTS, MIN_BITMAP_BLOCK_SIZE};

impl ResourceConfig {
    /// The resync rate's bounds in bytes per second.
    pub fn resync_rate(&self) -> crate::core::resync_rate::RateLimits {
        crate::core::resync_rate::RateLimits {
            max_bytes_per_s: self.resync_rate_max_kib * 1024,
            min_bytes_per_s: self.resync_rate_min_kib * 1024,
        }
    }

    /// The file of `resource` in `dir`.
    pub fn path_in(dir: &Path, resource: &str) -> PathBuf {
        dir.join(format!("{resource}.toml"))
    }

    /// Loads `DIR/<resource>.toml`.
    pub fn load(dir: &Path, resource: &str) -> Result<Self, ConfigError> {
        let path = Self::path_in(dir, resource);
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        let config = Self::parse(&path, &text)?;
        if config.name != resource {
            return Err(invalid(&path, "name", format!("is \"{}\" but the file is named for \"{resource}\"", config.name)));
        }
        Ok(config)
    }

    /// Parses and validates the text of a resource file; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawResource =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?;
        validate(path, raw)
    }

    pub fn node(&self, name: &str) -> Result<&NodeConfig, ConfigError> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| ConfigError::UnknownNode {
            path: self.path.clone(),
            node: name.to_owned(),
            known: self.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", "),
        })
    }

    pub fn node_by_id(&self, id: u8) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Whether `node` is a diskless witness.
    pub fn is_witness(&self, node_id: u8) -> bool {
        self.node_by_id(node_id).is_some_and(|n| n.disk.is_none())
    }

    /// Nodes that hold data (not witnesses).
    pub fn data_nodes(&self) -> impl Iterator<Item = &NodeConfig> + '_ {
        self.nodes.iter().filter(|n| n.disk.is_some())
    }

    /// Sound but risky settings, printed by `up` and logged by the daemon.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let witnesses = self.nodes.len() - self.data_nodes().count();
        if self.quorum == QuorumPolicy::Majority && self.nodes.len() == 2 && witnesses == 0 {
            warnings.push(format!(
                "{}: two nodes and no witness under quorum \"majority\": if one node fails, the survivor cannot \
                 become primary (it cannot tell a dead peer from a partition). Add a diskless witness node \
                 (disk = \"none\"), or set quorum = \"off\" and configure fencing.",
                self.path.display()
            ));
        }
        for witness in self.nodes.iter().filter(|n| n.disk.is_none() && n.meta_disk.is_none()) {
            warnings.push(format!(
                "{}: witness {} has no meta_disk: the newest primary generation it saw is kept in memory and forgotten when its daemon restarts; give it a small metadata file (meta_disk = \"/var/lib/blkrepl/{}-{}.meta\", then `blkrepl create-md`)",
                self.path.display(),
                witness.name,
                self.name,
                witness.name
            ));
        }
        if self.quorum == QuorumPolicy::Off {
            warnings.push(format!(
                "{}: quorum is off: two partitioned nodes can both be promoted (split brain); use fencing",
                self.path.display()
            ));
        }
        if self.fencing == Fencing::DontCare && self.handlers.fence_peer.is_some() {
            warnings.push(format!(
                "{}: [handlers] has a `fence-peer` but fencing is \"dont-care\": the handler is never called; set fencing = \"resource-only\" or \"resource-and-stonith\", or remove it",
                self.path.display()
            ));
        }
        let exposed = self.nodes.iter().filter_map(|n| match n.frontend {
            Frontend::Nbd(NbdAddress::Tcp(address)) if !address.ip().is_loopback() && !self.nbd_tls => Some((n, address)),
            _ => None,
        });
        for (node, address) in exposed {
            warnings.push(format!(
                "{}: node {} exports NBD on {address}, which other hosts can reach: NBD clients are neither \
                 authenticated nor encrypted, so anyone who reaches it reads and writes the device; set \
                 nbd_tls = true (clients then need a certificate from `tls_ca`), bind it to 127.0.0.1 (or a \
                 host-only address), or firewall it",
                self.path.display(),
                node.name
            ));
        }
        warnings
    }

    /// Whether a daemon may start: peers authenticate with a secret or certificates, or the
    /// resource file says on purpose that the network between the nodes is trusted.
    pub fn check_authenticates(&self) -> Result<(), ConfigError> {
        if self.secret.is_none() && self.tls_ca.is_none() && !self.trusted_network {
            return Err(invalid(
                &self.path,
                "secret",
                "is missing: any host that reaches the replication port could connect as a peer. Give the resource a shared \
                 secret of at least 16 bytes (`secret` or `secret_file`), or certificates (`tls_ca`, and each node's \
                 `certificate` and `certificate_key`), or, if the network between the nodes is trusted on purpose, set \
                 `trusted_network = true`",
            ));
        }
        Ok(())
    }

    /// Every node but `me`.
    pub fn peers_of<'a>(&'a self, me: &'a NodeConfig) -> impl Iterator<Item = &'a NodeConfig> + 'a {
        self.nodes.iter().filter(move |n| n.id != me.id)
    }
}

fn invalid(path: &Path, key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { path: path.to_owned(), key: key.into(), problem: problem.into() }
}

fn validate(path: &Path, raw: RawResource) -> Result<ResourceConfig, ConfigError> {
    if raw.name.is_empty()
        || raw.name.len() > 63
        || !raw.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(invalid(path, "name", "must be 1-63 characters of letters, digits, '-' or '_'"));
    }
    let protocol = match raw.protocol.as_str() {
        "A" => Protocol::A,
        "B" => Protocol::B,
        "C" => Protocol::C,
        other => return Err(invalid(path, "protocol", format!("\"{other}\" is not one of \"A\", \"B\", \"C\""))),
    };
    let quorum = match raw.quorum {
        None => QuorumPolicy::Majority,
        Some(RawQuorum::Word(word)) => match word.as_str() {
            "majority" => QuorumPolicy::Majority,
            "off" => QuorumPolicy::Off,
            other => match other.parse::<i64>() {
                Ok(n) => quorum_votes(path, n, raw.node.len())?,
                Err(_) => {
                    return Err(invalid(path, "quorum", format!("\"{other}\" is not \"majority\", \"off\" or a number of votes")))
                }
            },
        },
        Some(RawQuorum::Votes(n)) => quorum_votes(path, n, raw.node.len())?,
    };
    let on_no_quorum = match raw.on_no_quorum.as_deref() {
        None | Some("suspend-io") => OnNoQuorum::SuspendIo,
        Some("io-error") => OnNoQuorum::IoError,
        Some(other) => {
            return Err(invalid(path, "on_no_quorum", format!("\"{other}\" is not \"suspend-io\" or \"io-error\"")))
        }
    };
    let split_brain = SplitBrainPolicies {
        zero_primaries: parse_choice(path, "after_sb_0pri", raw.after_sb_0pri.as_deref(), AfterSb0Pri::parse)?,
        one_primary: parse_choice(path, "after_sb_1pri", raw.after_sb_1pri.as_deref(), AfterSb1Pri::parse)?,
        two_primaries: parse_choice(path, "after_sb_2pri", raw.after_sb_2pri.as_deref(), AfterSb2Pri::parse)?,
    };
    if let (true, Some((key, value))) = (quorum != QuorumPolicy::Off, split_brain.discarding_changes()) {
        return Err(invalid(
            path,
            key,
            format!(
                "\"{value}\" is refused while quorum is on: under quorum a split brain only follows an operator's override, and either side may hold writes acknowledged under quorum, which this policy would discard. Keep \"disconnect\" (or \"discard-zero-changes\", which discards nothing) and choose the victim with `connect --discard-my-data`, or set quorum = \"off\" (with fencing)"
            ),
        ));
    }
    let raw_secret_file = raw.secret_file.is_some();
    let secret = match (raw.secret, raw.secret_file) {
        (Some(_), Some(_)) => return Err(invalid(path, "secret_file", "set either `secret` or `secret_file`, not both")),
        (Some(s), None) => Some(s.into_bytes()),
        (None, Some(file)) => {
            let bytes = std::fs::read(&file)
                .map_err(|e| invalid(path, "secret_file", format!("cannot read {}: {e}", file.display())))?;
            let mode = std::fs::metadata(&file).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions())).unwrap_or(0);
            if mode & 0o077 != 0 {
                return Err(invalid(
                    path,
                    "secret_file",
                    format!("{} is readable by other users (mode {:o}): `chmod 600` it", file.display(), mode & 0o777),
                ));
            }
            Some(trim_newline(bytes))
        }
        (None, None) => None,
    };
    if raw.trusted_network && secret.is_some() {
        return Err(invalid(path, "trusted_network", "is set beside a secret: peers authenticate with the secret; remove one of them"));
    }
    if raw.trusted_network && raw.tls_ca.is_some() {
        return Err(invalid(path, "trusted_network", "is set beside `tls_ca`: peers authenticate with their certificates; remove one of them"));
    }
    let min = crate::wire::auth::MIN_SECRET_LEN;
    if let Some(short) = secret.as_ref().filter(|s| s.len() < min) {
        let key = if raw_secret_file { "secret_file" } else { "secret" };
        return Err(invalid(path, key, format!("is {} bytes; a shared secret needs at least {min} (a short one can be guessed from one handshake)", short.len())));
    }
    if raw.nbd_tls && raw.tls_ca.is_none() {
        return Err(invalid(
            path,
            "nbd_tls",
            "needs `tls_ca` and each node's `certificate`: an NBD client checks the node's certificate and shows one the CA signed",
        ));
    }
    let authenticated = secret.is_some() || raw.tls_ca.is_some();
    let transport = match (raw.transport.as_deref(), authenticated) {
        (None, true) | (Some("tls"), true) => Transport::Tls,
        (Some("plain"), _) if raw.tls_ca.is_some() => {
            return Err(invalid(path, "transport", "is \"plain\" beside `tls_ca`: certificates are used on TLS links only; remove one of them"))
        }
        (None, false) | (Some("plain"), _) => Transport::Plain,
        (Some("tls"), false) => {
            return Err(invalid(
                path,
                "transport",
                "is \"tls\" without a `secret` or `tls_ca`: TLS authenticates the peers with the shared secret or with certificates; set one, or remove `transport` on a trusted network",
            ))
        }
        (Some(other), _) => return Err(invalid(path, "transport", format!("\"{other}\" is not \"tls\" or \"plain\""))),
    };
    let bitmap_block_size = raw.bitmap_block_size.unwrap_or(DEFAULT_BITMAP_BLOCK_SIZE);
    if !bitmap_block_size.is_power_of_two()
        || !(MIN_BITMAP_BLOCK_SIZE..=MAX_BITMAP_BLOCK_SIZE).contains(&bitmap_block_size)
    {
        return Err(invalid(
            path,
            "bitmap_block_size",
            format!("must be a power of two from {MIN_BITMAP_BLOCK_SIZE} to {MAX_BITMAP_BLOCK_SIZE}"),
        ));
    }
    let al_extents = raw.al_extents.unwrap_or(DEFAULT_AL_EXTENTS);
    if !(MIN_AL_EXTENTS..=MAX_AL_EXTENTS).contains(&al_extents) {
        return Err(invalid(path, "al_extents", format!("must be from {MIN_AL_EXTENTS} to {MAX_AL_EXTENTS}")));
    }
    let resync_rate_max_kib = raw.resync_rate_max_kib.unwrap_or(DEFAULT_RESYNC_RATE_MAX_KIB);
    if resync_rate_max_kib < 250 {
        return Err(invalid(path, "resync_rate_max_kib", "must be at least 250"));
    }
    let logical_block_size = raw.logical_block_size.unwrap_or(512);
    if !matches!(logical_block_size, 512 | 4096) {
        return Err(invalid(path, "logical_block_size", format!("{logical_block_size} is not 512 or 4096")));
    }
    let frontend = raw.frontend.as_deref().map(parse_frontend).transpose().map_err(|p| invalid(path, "frontend", p))?;
    let resync_rate_min_kib = raw.resync_rate_min_kib.unwrap_or(DEFAULT_RESYNC_RATE_MIN_KIB.min(resync_rate_max_kib));
    if resync_rate_min_kib == 0 || resync_rate_min_kib > resync_rate_max_kib {
        return Err(invalid(
            path,
            "resync_rate_min_kib",
            format!("must be from 1 to resync_rate_max_kib ({resync_rate_max_kib}): a resync must always move"),
        ));
    }
    let on_congestion = on_congestion(path, protocol, raw.on_congestion.as_deref(), raw.congestion_fill_kib)?;
    let on_superseded = match raw.on_suspended_primary_outdated.as_deref() {
        None | Some("force-secondary") => OnSuperseded::ForceSecondary,
        Some("disconnect") => OnSuperseded::Disconnect,
        Some(other) => {
            return Err(invalid(
                path,
                "on_suspended_primary_outdated",
                format!("\"{other}\" is not \"force-secondary\" or \"disconnect\""),
            ))
        }
    };
    let timing = link_timing(path, raw.ping_interval_ms, raw.ping_timeout_ms, raw.peer_stall_timeout_ms)?;
    let promoter = raw.promoter.map(|p| promoter(path, p)).transpose()?;
    let handlers = handlers(path, raw.handlers)?;
    let fencing = match raw.fencing.as_deref() {
        None | Some("dont-care") => Fencing::DontCare,
        Some("resource-only") => Fencing::ResourceOnly,
        Some("resource-and-stonith") => Fencing::ResourceAndStonith,
        Some(other) => {
            return Err(invalid(
                path,
                "fencing",
                format!("\"{other}\" is not \"dont-care\", \"resource-only\" or \"resource-and-stonith\""),
            ))
        }
    };
    if fencing != Fencing::DontCare && handlers.fence_peer.is_none() {
        return Err(invalid(
            path,
            "fencing",
            format!("is \"{fencing}\" but [handlers] has no `fence-peer`: give the command that fences a lost peer, or set fencing = \"dont-care\""),
        ));
    }

    if raw.node.len() < 2 {
        return Err(invalid(path, "node", "a resource needs at least two [[node]] tables"));
    }
    let mut nodes: Vec<NodeConfig> = Vec::with_capacity(raw.node.len());
    for (index, node) in raw.node.into_iter().enumerate() {
        let key = |field: &str| format!("node[{index}].{field}");
        let id = match node.id {
            Some(id) => id,
            None => u8::try_from(index).map_err(|_| invalid(path, key("id"), "too many nodes"))?,
        };
        if id > MAX_NODE_ID {
            return Err(invalid(path, key("id"), format!("{id} is above the maximum {MAX_NODE_ID}")));
        }
        if node.name.is_empty() {
            return Err(invalid(path, key("name"), "is empty"));
        }
        let address = parse_addr(&node.address).map_err(|p| invalid(path, key("address"), p))?;
        let nbd = node.nbd.as_deref().map(parse_nbd).transpose().map_err(|p| invalid(path, key("nbd"), p))?;
        let nbd = match (nbd, node.nbd_socket_mode) {
            (Some(NbdAddress::Unix { path: socket, .. }), Some(mode)) => {
                let mode = u32::from_str_radix(&mode, 8)
                    .ok()
                    .filter(|m| *m & !0o777 == 0 && *m & 0o200 != 0)
                    .ok_or_else(|| invalid(path, key("nbd_socket_mode"), format!("\"{mode}\" is not an octal mode like \"660\" that lets its owner write")))?;
                Some(NbdAddress::Unix { path: socket, mode })
            }
            (_, Some(_)) => return Err(invalid(path, key("nbd_socket_mode"), "only applies to an NBD export on a Unix socket (nbd = \"unix:/PATH\")")),
            (nbd, None) => nbd,
        };
        let metrics_address = node.metrics_address.as_deref().map(parse_addr).transpose().map_err(|p| invalid(path, key("metrics_address"), p))?;
        if let Some(taken) = metrics_address.filter(|m| *m == address || Some(*m) == nbd.as_ref().and_then(NbdAddress::tcp)) {
            let by = if taken == address { "address" } else { "nbd" };
            return Err(invalid(path, key("metrics_address"), format!("{taken} is this node's `{by}` already: give the metrics endpoint a port of its own")));
        }
        if node.disk.as_os_str().is_empty() {
            return Err(invalid(path, key("disk"), "is empty (a diskless witness says disk = \"none\")"));
        }
        let disk = (node.disk.as_os_str() != "none").then_some(node.disk);
        let exports = nbd.is_some() || node.frontend.is_some() || node.ublk_id.is_some() || node.ublk_queues.is_some() || node.ublk_depth.is_some();
        if disk.is_none() && exports {
            return Err(invalid(path, key("disk"), "a witness (disk = \"none\") holds no data: it takes no nbd, frontend or ublk_* key"));
        }
        let kind = node.frontend.as_deref().map(parse_frontend).transpose().map_err(|p| invalid(path, key("frontend"), p))?;
        // A witness is never primary: it exports nothing whatever the resource's frontend.
        let kind = kind.or(frontend).filter(|_| disk.is_some());
        let frontend = match (kind, nbd) {
            (None, None) => Frontend::None,
            (None | Some(FrontendKind::Nbd), Some(address)) => Frontend::Nbd(address),
            (Some(FrontendKind::Nbd), None) => {
                return Err(invalid(path, key("nbd"), "is missing: this node's frontend is \"nbd\", give it `nbd = \"IP:PORT\"`"))
            }
            (Some(FrontendKind::Ublk), Some(_)) => {
                return Err(invalid(path, key("nbd"), "is set but this node's frontend is \"ublk\": remove it, or set `frontend = \"nbd\"` for this node"))
            }
            (Some(FrontendKind::Ublk), None) => Frontend::Ublk(UblkSettings {
                id: node.ublk_id,
                queues: node.ublk_queues,
                depth: node.ublk_depth.unwrap_or(DEFAULT_UBLK_DEPTH),
            }),
        };
        let ublk_keys = [("ublk_id", node.ublk_id.is_some()), ("ublk_queues", node.ublk_queues.is_some()), ("ublk_depth", node.ublk_depth.is_some())];
        if let Some((name, _)) = ublk_keys.iter().find(|(_, set)| *set).filter(|_| !matches!(frontend, Frontend::Ublk(_))) {
            return Err(invalid(path, key(name), "only applies to the ublk frontend: set `frontend = \"ublk\"` or remove it"));
        }
        if let Frontend::Ublk(ublk) = &frontend {
            if ublk.id.is_some_and(|id| id > MAX_UBLK_ID) {
                return Err(invalid(path, key("ublk_id"), format!("must be at most {MAX_UBLK_ID}")));
            }
            if ublk.queues.is_some_and(|q| !(1..=MAX_UBLK_QUEUES).contains(&q)) {
                return Err(invalid(path, key("ublk_queues"), format!("must be from 1 to {MAX_UBLK_QUEUES}")));
            }
            if !(1..=MAX_UBLK_DEPTH).contains(&ublk.depth) {
                return Err(invalid(path, key("ublk_depth"), format!("must be from 1 to {MAX_UBLK_DEPTH}")));
            }
        }
        let certificate = match (&raw.tls_ca, node.certificate, node.certificate_key) {
            (Some(_), Some(certificate), Some(certificate_key)) => {
                if rustls::pki_types::DnsName::try_from(node.name.as_str()).is_err() {
                    return Err(invalid(path, key("name"), format!("\"{}\" is not a DNS name, which a certificate must carry to name the node (with `tls_ca`)", node.name)));
                }
                Some(NodeCertificate { certificate, key: certificate_key })
            }
            (Some(_), None, _) => {
                return Err(invalid(path, key("certificate"), "is missing: with `tls_ca` every node presents a certificate signed by it that names the node"))
            }
            (Some(_), Some(_), None) => return Err(invalid(path, key("certificate_key"), "is missing: the private key of this node's certificate")),
            (None, None, None) => None,
            (None, certificate, _) => {
                let which = if certificate.is_some() { "certificate" } else { "certificate_key" };
                return Err(invalid(path, key(which), "is set but the resource has no `tls_ca` to check it against: set `tls_ca`, or remove it"));
            }
        };
        if let Some(other) = nodes.iter().find(|n| n.name == node.name) {
            return Err(invalid(path, key("name"), format!("\"{}\" is used twice (node id {})", node.name, other.id)));
        }
        if let Some(other) = nodes.iter().find(|n| n.id == id) {
            return Err(invalid(path, key("id"), format!("{id} is already node \"{}\"'s", other.name)));
        }
        if let Some(other) = nodes.iter().find(|n| n.address == address) {
            return Err(invalid(path, key("address"), format!("{address} is already node \"{}\"'s", other.name)));
        }
        nodes.push(NodeConfig { id, name: node.name, address, disk, meta_disk: node.meta_disk, frontend, metrics_address, certificate });
    }
    if nodes.iter().filter(|n| n.disk.is_some()).count() < 2 {
        return Err(invalid(path, "node", "a resource needs at least two nodes with a disk (witnesses only vote)"));
    }
    Ok(ResourceConfig {
        name: raw.name,
        path: path.to_owned(),
        protocol,
        quorum,
        on_no_quorum,
        split_brain,
        secret,
        trusted_network: raw.trusted_network,
        transport,
        tls_ca: raw.tls_ca,
        nbd_tls: raw.nbd_tls,
        bitmap_block_size,
        al_extents,
        resync_rate_max_kib,
        logical_block_size,
        resync_rate_min_kib,
        csums_resync: raw.csums_resync,
        on_congestion,
        on_superseded,
        timing,
        nodes,
        promoter,
        handlers,
        fencing,
    })
}

/// The `[promoter]` section: every command non-empty and paired with its stop, units named
/// with their suffix (and never like an option of systemctl), timeouts and delay bounded.
fn promoter(path: &Path, raw: RawPromoter) -> Result<PromoterConfig, ConfigError> {
    for (key, commands) in [("start", &raw.start), ("stop", &raw.stop)] {
        if let Some(i) = commands.iter().position(|c| c.trim().is_empty()) {
            return Err(invalid(path, format!("promoter.{key}[{i}]"), "is empty"));
        }
    }
    if raw.start.len() != raw.stop.len() {
        return Err(invalid(
            path,
            "promoter.stop",
            format!(
                "has {} command(s) for {} in `start`: stop[i] undoes start[i] (give a start that leaves nothing to undo the stop \"true\")",
                raw.stop.len(),
                raw.start.len()
            ),
        ));
    }
    for (i, unit) in raw.units.iter().enumerate() {
        let named = !unit.starts_with('-') && !unit.contains(char::is_whitespace) && unit.rsplit_once('.').is_some_and(|(name, kind)| !name.is_empty() && !kind.is_empty());
        if !named {
            return Err(invalid(path, format!("promoter.units[{i}]"), format!("\"{unit}\" is not a unit name with its suffix, like \"srv.mount\" or \"app.service\"")));
        }
    }
    if raw.systemctl.is_some() && raw.units.is_empty() {
        return Err(invalid(path, "promoter.systemctl", "applies only with `units`"));
    }
    let seconds = |key: &str, value: Option<u64>| match value.unwrap_or(DEFAULT_PROMOTER_TIMEOUT_S) {
        s @ 1..=3600 => Ok(Duration::from_secs(s)),
        s => Err(invalid(path, format!("promoter.{key}"), format!("{s} is not from 1 to 3600 seconds"))),
    };
    // Below 100 ms the next node's turn could come before the events (sampled every 100 ms)
    // show it the first one's promotion.
    let promote_delay = match raw.promote_delay_ms.unwrap_or(DEFAULT_PROMOTE_DELAY_MS) {
        ms @ 100..=60_000 => Duration::from_millis(ms),
        ms => return Err(invalid(path, "promoter.promote_delay_ms", format!("{ms} is not from 100 to 60000"))),
    };
    let on_stop_failure = match raw.on_stop_failure.as_deref() {
        None | Some("log") => OnStopFailure::Log,
        Some("exit") => OnStopFailure::Exit,
        Some(other) => return Err(invalid(path, "promoter.on_stop_failure", format!("\"{other}\" is not \"log\" or \"exit\""))),
    };
    Ok(PromoterConfig {
        commands: raw.start.into_iter().zip(raw.stop).map(|(start, stop)| ServiceCommands { start, stop }).collect(),
        units: raw.units,
        systemctl: raw.systemctl.unwrap_or_else(|| PathBuf::from("systemctl")),
        start_timeout: seconds("start_timeout_s", raw.start_timeout_s)?,
        stop_timeout: seconds("stop_timeout_s", raw.stop_timeout_s)?,
        promote_delay,
        on_stop_failure,
    })
}

/// `[handlers]`: every command non-empty; each timing within bounds, and only where it applies.
fn handlers(path: &Path, raw: RawHandlers) -> Result<HandlersConfig, ConfigError> {
    let commands = [
        ("split-brain", raw.split_brain),
        ("quorum-lost", raw.quorum_lost),
        ("before-resync-target", raw.before_resync_target),
        ("after-resync-target", raw.after_resync_target),
        ("peer-unreachable", raw.peer_unreachable),
        ("fence-peer", raw.fence_peer),
    ];
    if let Some((name, _)) = commands.iter().find(|(_, command)| command.as_ref().is_some_and(|c| c.trim().is_empty())) {
        return Err(invalid(path, format!("handlers.{name}"), "is empty: give a command (run with /bin/sh -c), or remove the key"));
    }
    let any_handler = commands.iter().any(|(_, command)| command.is_some());
    let [(_, split_brain), (_, quorum_lost), (_, before_resync_target), (_, after_resync_target), (_, peer_unreachable), (_, fence_peer)] =
        commands;
    let seconds = |key: &str, value: Option<u64>, default: u64, max: u64| match value {
        None => Ok(Duration::from_secs(default)),
        Some(s @ 1..) if s <= max => Ok(Duration::from_secs(s)),
        Some(s) => Err(invalid(path, format!("handlers.{key}"), format!("{s} is not from 1 to {max} seconds"))),
    };
    if raw.peer_unreachable_after_s.is_some() && peer_unreachable.is_none() {
        return Err(invalid(path, "handlers.peer_unreachable_after_s", "applies only with a `peer-unreachable` handler"));
    }
    if raw.handler_timeout_s.is_some() && !any_handler {
        return Err(invalid(path, "handlers.handler_timeout_s", "applies only when a handler is configured"));
    }
    Ok(HandlersConfig {
        split_brain,
        quorum_lost,
        before_resync_target,
        after_resync_target,
        peer_unreachable,
        fence_peer,
        peer_unreachable_after: seconds(
            "peer_unreachable_after_s",
            raw.peer_unreachable_after_s,
            DEFAULT_PEER_UNREACHABLE_AFTER_S,
            MAX_PEER_UNREACHABLE_AFTER_S,
        )?,
        timeout: seconds("handler_timeout_s", raw.handler_timeout_s, DEFAULT_HANDLER_TIMEOUT_S, MAX_HANDLER_TIMEOUT_S)?,
    })
}

/// `ping_interval_ms` and `ping_timeout_ms`: the timeout must span enough pings for the quorum
/// lease (half the timeout) to outlive one late answer; see `LinkTiming::lease`.
/// `peer_stall_timeout_ms`: no shorter than the ping timeout (a peer that stops answering at
/// all is dropped by that one first).
fn link_timing(path: &Path, interval_ms: Option<u64>, timeout_ms: Option<u64>, stall_ms: Option<u64>) -> Result<LinkTiming, ConfigError> {
    const MIN_INTERVAL_MS: u64 = 50;
    const MAX_TIMEOUT_MS: u64 = 600_000;
    let default = LinkTiming::DEFAULT;
    let interval = interval_ms.unwrap_or(default.ping_interval.as_millis() as u64);
    if interval < MIN_INTERVAL_MS {
        return Err(invalid(path, "ping_interval_ms", format!("{interval} is below the minimum of {MIN_INTERVAL_MS}")));
    }
    let per = u64::from(LinkTiming::TIMEOUT_PER_INTERVAL);
    let timeout = timeout_ms.unwrap_or((default.ping_timeout.as_millis() as u64).max(interval * per));
    if timeout < interval * per || timeout > MAX_TIMEOUT_MS {
        return Err(invalid(
            path,
            "ping_timeout_ms",
            format!("{timeout} must lie between {per} x ping_interval_ms ({}) and {MAX_TIMEOUT_MS}", interval * per),
        ));
    }
    let stall = stall_ms.unwrap_or((default.stall_timeout.as_millis() as u64).max(timeout));
    if stall < timeout || stall > MAX_TIMEOUT_MS {
        return Err(invalid(
            path,
            "peer_stall_timeout_ms",
            format!("{stall} must lie between ping_timeout_ms ({timeout}) and {MAX_TIMEOUT_MS}"),
        ));
    }
    Ok(LinkTiming {
        ping_interval: Duration::from_millis(interval),
        ping_timeout: Duration::from_millis(timeout),
        stall_timeout: Duration::from_millis(stall),
    })
}

/// The `frontend` key's values.
#[derive(Clone, Copy)]
enum FrontendKind {
    Nbd,
    Ublk,
}

fn parse_frontend(text: &str) -> Result<FrontendKind, String> {
    match text {
        "nbd" => Ok(FrontendKind::Nbd),
        "ublk" => Ok(FrontendKind::Ublk),
        other => Err(format!("\"{other}\" is not one of \"nbd\", \"ublk\"")),
    }
}

fn on_congestion(path: &Path, protocol: Protocol, mode: Option<&str>, fill_kib: Option<u64>) -> Result<OnCongestion, ConfigError> {
    match mode {
        None | Some("block") => match fill_kib {
            None => Ok(OnCongestion::Block),
            Some(_) => Err(invalid(path, "congestion_fill_kib", "applies only with on_congestion = \"pull-ahead\"")),
        },
        Some("pull-ahead") if protocol != Protocol::A => Err(invalid(
            path,
            "on_congestion",
            format!("\"pull-ahead\" needs protocol = \"A\" (under {protocol} every write waits for the peer anyway)"),
        )),
        Some("pull-ahead") => match fill_kib.unwrap_or(DEFAULT_CONGESTION_FILL_KIB) {
            fill @ 1..SEND_QUEUE_KIB => Ok(OnCongestion::PullAhead { fill_bytes: fill * 1024 }),
            _ => Err(invalid(
                path,
                "congestion_fill_kib",
                format!("must be from 1 to {}: the send queue holds {SEND_QUEUE_KIB} KiB", SEND_QUEUE_KIB - 1),
            )),
        },
        Some(other) => Err(invalid(path, "on_congestion", format!("\"{other}\" is not one of \"block\", \"pull-ahead\""))),
    }
}

fn quorum_votes(path: &Path, n: i64, nodes: usize) -> Result<QuorumPolicy, ConfigError> {
    match u8::try_from(n) {
        Ok(votes) if votes >= 1 && usize::from(votes) <= nodes => Ok(QuorumPolicy::Votes(votes)),
        _ => Err(invalid(path, "quorum", format!("{n} votes: must be from 1 to the number of nodes ({nodes})"))),
    }
}

/// A keyword setting: the default when absent, otherwise one of the words `parse` knows.
fn parse_choice<T: Default>(
    path: &Path,
    key: &str,
    value: Option<&str>,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, ConfigError> {
    value.map_or(Ok(T::default()), |v| parse(v).map_err(|problem| invalid(path, key, problem)))
}

/// `nbd`: `"IP:PORT"` or `"unix:/ABSOLUTE/PATH"`.
fn parse_nbd(text: &str) -> Result<NbdAddress, String> {
    match text.strip_prefix("unix:") {
        Some(socket) if socket.starts_with('/') && socket.len() > 1 => {
            Ok(NbdAddress::Unix { path: PathBuf::from(socket), mode: DEFAULT_NBD_SOCKET_MODE })
        }
        Some(_) => Err(format!("\"{text}\" does not name an absolute path, like \"unix:/run/blkrepl/r0.nbd\"")),
        None => parse_addr(text).map(NbdAddress::Tcp),
    }
}

fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| format!("\"{text}\" is not an address like \"127.0.0.1:7789\" or \"[::1]:7789\""))
}

fn trim_newline(mut bytes: Vec<u8>) -> Vec<u8> {
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "r0"
protocol = "C"
quorum = "off"
[[node]]
name = "alpha"
address = "127.0.0.1:7789"
disk = "/var/lib/blkrepl/alpha.img"
nbd = "127.0.0.1:10809"
[[node]]
name = "beta"
address = "127.0.0.1:7790"
disk = "/var/lib/blkrepl/beta.img"
"#;

    fn parse(text: &str) -> Result<ResourceConfig, ConfigError> {
        ResourceConfig::parse(Path::new("/etc/blkrepl/r0.toml"), text)
    }

    fn error_of(text: &str) -> String {
        parse(text).expect_err("config must be refused").to_string()
    }

    #[test]
    fn an_nbd_export_may_listen_on_a_unix_socket_with_a_mode() {
        let unix = |line: &str| GOOD.replace("nbd = \"127.0.0.1:10809\"", line);
        let config = parse(&unix("nbd = \"unix:/run/blkrepl/r0.nbd\"")).unwrap();
        let socket = NbdAddress::Unix { path: "/run/blkrepl/r0.nbd".into(), mode: DEFAULT_NBD_SOCKET_MODE };
        assert_eq!(config.nodes[0].frontend, Frontend::Nbd(socket.clone()));
        assert_eq!(socket.url("r0"), "nbd+unix:///r0?socket=/run/blkrepl/r0.nbd");
        assert!(config.warnings().iter().all(|w| !w.contains("exports NBD")), "a Unix socket is not reachable from other hosts");
        let config = parse(&unix("nbd = \"unix:/run/r0.nbd\"\nnbd_socket_mode = \"660\"")).unwrap();
        assert_eq!(config.nodes[0].frontend, Frontend::Nbd(NbdAddress::Unix { path: "/run/r0.nbd".into(), mode: 0o660 }));
        for (line, key, why) in [
            ("nbd = \"unix:run/r0.nbd\"", "node[0].nbd", "absolute path"),
            ("nbd = \"unix:/r0\"\nnbd_socket_mode = \"999\"", "node[0].nbd_socket_mode", "octal mode"),
            ("nbd = \"unix:/r0\"\nnbd_socket_mode = \"066\"", "node[0].nbd_socket_mode", "lets its owner write"),
            ("nbd = \"127.0.0.1:10809\"\nnbd_socket_mode = \"660\"", "node[0].nbd_socket_mode", "only applies"),
        ] {
            let err = error_of(&unix(line));
            assert!(err.contains(&format!("`{key}`")) && err.contains(why), "{line}: {err}");
        }
    }

    #[test]
    fn an_nbd_export_other_hosts_reach_is_warned_about() {
        let quiet = |config: &ResourceConfig| config.warnings().iter().all(|w| !w.contains("exports NBD"));
        assert!(quiet(&parse(GOOD).unwrap()), "loopback is fine");
        let exposed = parse(&GOOD.replace("nbd = \"127.0.0.1:10809\"", "nbd = \"0.0.0.0:10809\"")).unwrap();
        let warning = exposed.warnings().into_iter().find(|w| w.contains("exports NBD")).expect("a warning");
        assert!(warning.contains("alpha") && warning.contains("0.0.0.0:10809") && warning.contains("neither authenticated"), "{warning}");
    }

    #[test]
    fn parses_the_documented_example() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.protocol, Protocol::C);
        assert_eq!(config.nodes.len(), 2);
        assert_eq!(config.nodes[1].id, 1);
        assert_eq!(config.nodes[0].frontend, Frontend::Nbd(NbdAddress::Tcp("127.0.0.1:10809".parse().unwrap())));
        assert_eq!(config.nodes[1].frontend, Frontend::None);
        assert_eq!(config.nodes[0].metrics_address, None, "metrics are off by default");
        assert_eq!(config.logical_block_size, 512);
        assert_eq!(config.node("beta").unwrap().address.port(), 7790);
        assert_eq!(config.bitmap_block_size, DEFAULT_BITMAP_BLOCK_SIZE);
        assert_eq!((config.resync_rate_min_kib, config.csums_resync), (DEFAULT_RESYNC_RATE_MIN_KIB, false));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = error_of(&GOOD.replace("quorum = \"off\"", "quorom = \"off\""));
        assert!(err.contains("quorom"), "{err}");
        assert!(err.contains("r0.toml"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (from, to, key) in [
            ("protocol = \"C\"", "protocol = \"D\"", "protocol"),
            ("quorum = \"off\"", "quorum = \"sometimes\"", "quorum"),
            ("127.0.0.1:7790", "localhost", "node[1].address"),
            ("127.0.0.1:10809", "nowhere", "node[0].nbd"),
            ("name = \"beta\"", "name = \"alpha\"", "node[1].name"),
            ("127.0.0.1:7790", "127.0.0.1:7789", "node[1].address"),
            ("name = \"r0\"", "name = \"r 0\"", "name"),
            ("quorum = \"off\"", "quorum = \"off\"\nresync_rate_min_kib = 0", "resync_rate_min_kib"),
            ("quorum = \"off\"", "quorum = \"off\"\nresync_rate_max_kib = 1000\nresync_rate_min_kib = 1001", "resync_rate_min_kib"),
            ("quorum = \"off\"", "quorum = \"off\"\non_congestion = \"pull-ahead\"", "on_congestion"),
            ("quorum = \"off\"", "quorum = \"off\"\non_congestion = \"drop\"", "on_congestion"),
            ("quorum = \"off\"", "quorum = \"off\"\ncongestion_fill_kib = 100", "congestion_fill_kib"),
            ("protocol = \"C\"", "protocol = \"A\"\non_congestion = \"pull-ahead\"\ncongestion_fill_kib = 8192", "congestion_fill_kib"),
            ("protocol = \"C\"", "protocol = \"A\"\non_congestion = \"pull-ahead\"\ncongestion_fill_kib = 0", "congestion_fill_kib"),
            ("quorum = \"off\"", "quorum = \"off\"\non_suspended_primary_outdated = \"stay\"", "on_suspended_primary_outdated"),
            ("quorum = \"off\"", "quorum = \"off\"\nping_interval_ms = 10", "ping_interval_ms"),
            ("quorum = \"off\"", "quorum = \"off\"\nping_timeout_ms = 1000", "ping_timeout_ms"),
            ("quorum = \"off\"", "quorum = \"off\"\nping_interval_ms = 1000\nping_timeout_ms = 3000", "ping_timeout_ms"),
            ("quorum = \"off\"", "quorum = \"off\"\nping_timeout_ms = 700000", "ping_timeout_ms"),
            ("quorum = \"off\"", "quorum = \"off\"\npeer_stall_timeout_ms = 1500", "peer_stall_timeout_ms"),
            ("quorum = \"off\"", "quorum = \"majority\"\nafter_sb_0pri = \"discard-younger-primary\"", "after_sb_0pri"),
            ("quorum = \"off\"", "quorum = 2\nafter_sb_0pri = \"discard-least-changes\"", "after_sb_0pri"),
            ("quorum = \"off\"", "quorum = \"majority\"\nafter_sb_1pri = \"discard-secondary\"", "after_sb_1pri"),
            ("nbd = \"127.0.0.1:10809\"", "nbd = \"127.0.0.1:10809\"\nmetrics_address = \"9942\"", "node[0].metrics_address"),
            ("nbd = \"127.0.0.1:10809\"", "nbd = \"127.0.0.1:10809\"\nmetrics_address = \"127.0.0.1:10809\"", "node[0].metrics_address"),
            ("nbd = \"127.0.0.1:10809\"", "nbd = \"127.0.0.1:10809\"\nmetrics_address = \"127.0.0.1:7789\"", "node[0].metrics_address"),
        ] {
            let err = error_of(&GOOD.replacen(from, to, 1));
            assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
        }
    }

    #[test]
    fn handlers_are_parsed_with_their_defaults() {
        let none = parse(GOOD).unwrap().handlers;
        let commands = [none.split_brain, none.quorum_lost, none.before_resync_target, none.after_resync_target, none.peer_unreachable];
        assert!(commands.iter().all(Option::is_none), "no handlers by default");
        assert_eq!((none.peer_unreachable_after.as_secs(), none.timeout.as_secs()), (DEFAULT_PEER_UNREACHABLE_AFTER_S, DEFAULT_HANDLER_TIMEOUT_S));
        let text = format!(
            "{GOOD}[handlers]\nsplit-brain = \"/usr/lib/blkrepl/notify split-brain\"\npeer-unreachable = \"logger peer\"\npeer_unreachable_after_s = 5\n"
        );
        let handlers = parse(&text).unwrap().handlers;
        assert_eq!(handlers.split_brain.as_deref(), Some("/usr/lib/blkrepl/notify split-brain"));
        assert_eq!((handlers.quorum_lost, handlers.before_resync_target, handlers.after_resync_target), (None, None, None));
        assert_eq!(handlers.peer_unreachable.as_deref(), Some("logger peer"));
        assert_eq!(handlers.peer_unreachable_after, Duration::from_secs(5));
        assert_eq!(handlers.timeout, Duration::from_secs(DEFAULT_HANDLER_TIMEOUT_S));
        let timed = parse(&format!("{GOOD}[handlers]\nquorum-lost = \"true\"\nhandler_timeout_s = 2\n")).unwrap().handlers;
        assert_eq!((timed.timeout, timed.peer_unreachable_after), (Duration::from_secs(2), Duration::from_secs(DEFAULT_PEER_UNREACHABLE_AFTER_S)));
    }

    #[test]
    fn fencing_needs_a_fence_peer_handler_and_a_handler_without_fencing_is_a_warning() {
        assert_eq!(parse(GOOD).unwrap().fencing, Fencing::DontCare);
        let handler = "[handlers]\nfence-peer = \"/usr/lib/blkrepl/fence\"\n";
        for (word, fencing) in [("resource-only", Fencing::ResourceOnly), ("resource-and-stonith", Fencing::ResourceAndStonith)] {
            let config = parse(&format!("fencing = \"{word}\"\n{GOOD}{handler}")).unwrap();
            assert_eq!((config.fencing, config.handlers.fence_peer.as_deref()), (fencing, Some("/usr/lib/blkrepl/fence")));
            assert!(config.warnings().iter().all(|w| !w.contains("fence-peer")), "{:?}", config.warnings());
            let err = error_of(&format!("fencing = \"{word}\"\n{GOOD}"));
            assert!(err.contains("`fencing`") && err.contains("no `fence-peer`"), "{err}");
        }
        let err = error_of(&format!("fencing = \"stonith\"\n{GOOD}"));
        assert!(err.contains("`fencing`") && err.contains("\"stonith\" is not"), "{err}");
        let unused = parse(&format!("{GOOD}{handler}")).unwrap();
        assert!(unused.warnings().iter().any(|w| w.contains("`fence-peer`") && w.contains("never called")), "{:?}", unused.warnings());
    }

    #[test]
    fn bad_handlers_name_their_key() {
        for (section, key, says) in [
            ("quorum-lots = \"true\"", "quorum-lots", "unknown field"),
            ("fence-peer = \"\"", "handlers.fence-peer", "is empty"),
            ("split-brain = \" \"", "handlers.split-brain", "is empty"),
            ("split-brain = 1", "split-brain", "invalid type"),
            ("peer-unreachable = \"true\"\npeer_unreachable_after_s = 0", "handlers.peer_unreachable_after_s", "from 1 to"),
            ("peer_unreachable_after_s = 60", "handlers.peer_unreachable_after_s", "only with a `peer-unreachable`"),
            ("quorum-lost = \"true\"\nhandler_timeout_s = 7200", "handlers.handler_timeout_s", "from 1 to 3600"),
            ("handler_timeout_s = 5", "handlers.handler_timeout_s", "only when a handler"),
        ] {
            let err = error_of(&format!("{GOOD}[handlers]\n{section}\n"));
            assert!(err.contains(key) && err.contains(says), "{key}: {err}");
        }
    }

    #[test]
    fn metrics_address_is_per_node() {
        let text = GOOD.replace("nbd = \"127.0.0.1:10809\"", "nbd = \"127.0.0.1:10809\"\nmetrics_address = \"127.0.0.1:9942\"");
        let config = parse(&text).unwrap();
        assert_eq!(config.nodes[0].metrics_address, Some("127.0.0.1:9942".parse().unwrap()));
        assert_eq!(config.nodes[1].metrics_address, None);
    }

    #[test]
    fn policies_that_discard_nothing_stay_allowed_under_quorum() {
        let safe = "quorum = \"majority\"\nafter_sb_0pri = \"discard-zero-changes\"\nafter_sb_1pri = \"consensus\"";
        let config = parse(&GOOD.replacen("quorum = \"off\"", safe, 1)).unwrap();
        assert_eq!(config.split_brain.zero_primaries, AfterSb0Pri::DiscardZeroChanges);
        let off = "quorum = \"off\"\nafter_sb_0pri = \"discard-younger-primary\"\nafter_sb_1pri = \"discard-secondary\"";
        assert!(parse(&GOOD.replacen("quorum = \"off\"", off, 1)).is_ok(), "without quorum the operator's choice stands");
    }

    #[test]
    fn link_timing_defaults_and_a_longer_interval_stretch_the_timeout() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.timing, LinkTiming::DEFAULT);
        assert_eq!(config.timing.lease(), Duration::from_secs(1));
        assert_eq!(config.on_superseded, OnSuperseded::ForceSecondary);
        let slow = parse(&GOOD.replacen("quorum = \"off\"", "quorum = \"off\"\nping_interval_ms = 1000", 1)).unwrap();
        assert_eq!(slow.timing.ping_timeout, Duration::from_secs(4), "the default timeout grows to 4 intervals");
        let off = parse(&GOOD.replacen("quorum = \"off\"", "quorum = \"off\"\non_suspended_primary_outdated = \"disconnect\"", 1)).unwrap();
        assert_eq!(off.on_superseded, OnSuperseded::Disconnect);
    }

    #[test]
    fn frontends_are_chosen_per_resource_and_node() {
        let ublk = GOOD.replace("quorum = \"off\"", "quorum = \"off\"\nfrontend = \"ublk\"\nlogical_block_size = 4096")
            .replace("nbd = \"127.0.0.1:10809\"", "frontend = \"nbd\"\nnbd = \"127.0.0.1:10809\"")
            .replace("disk = \"/var/lib/blkrepl/beta.img\"", "disk = \"/var/lib/blkrepl/beta.img\"\nublk_id = 7\nublk_queues = 2");
        let config = parse(&ublk).unwrap();
        assert_eq!(config.logical_block_size, 4096);
        assert_eq!(config.nodes[0].frontend, Frontend::Nbd(NbdAddress::Tcp("127.0.0.1:10809".parse().unwrap())));
        assert_eq!(
            config.nodes[1].frontend,
            Frontend::Ublk(UblkSettings { id: Some(7), queues: Some(2), depth: DEFAULT_UBLK_DEPTH })
        );
    }

    #[test]
    fn frontend_keys_that_do_not_fit_the_node_are_refused() {
        let ublk_resource = GOOD.replace("quorum = \"off\"", "quorum = \"off\"\nfrontend = \"ublk\"");
        for (text, key, says) in [
            (GOOD.replace("quorum = \"off\"", "frontend = \"iscsi\""), "frontend", "not one of"),
            (GOOD.replace("quorum = \"off\"", "logical_block_size = 1024"), "logical_block_size", "not 512 or 4096"),
            (ublk_resource.clone(), "node[0].nbd", "frontend is \"ublk\""),
            (GOOD.replace("quorum = \"off\"", "frontend = \"nbd\""), "node[1].nbd", "is missing"),
            (GOOD.replace("nbd = \"127.0.0.1:10809\"", "nbd = \"127.0.0.1:10809\"\nublk_depth = 64"), "node[0].ublk_depth", "only applies"),
            (ublk_resource.replace("nbd = \"127.0.0.1:10809\"", "ublk_queues = 0"), "node[0].ublk_queues", "from 1 to"),
            (ublk_resource.replace("nbd = \"127.0.0.1:10809\"", "ublk_id = 2000000"), "node[0].ublk_id", "at most"),
        ] {
            let err = error_of(&text);
            assert!(err.contains(&format!("`{key}`")) && err.contains(says), "{key}: {err}");
        }
    }

    #[test]
    fn pull_ahead_under_protocol_a() {
        let config = parse(&GOOD.replace("protocol = \"C\"", "protocol = \"A\"\non_congestion = \"pull-ahead\"")).unwrap();
        assert_eq!(config.on_congestion, OnCongestion::PullAhead { fill_bytes: DEFAULT_CONGESTION_FILL_KIB * 1024 });
        assert_eq!(parse(GOOD).unwrap().on_congestion, OnCongestion::Block);
        let err = error_of(&GOOD.replace("quorum = \"off\"", "on_congestion = \"pull-ahead\""));
        assert!(err.contains("needs protocol = \"A\""), "{err}");
    }

    #[test]
    fn a_value_of_the_wrong_type_shows_its_line() {
        let err = error_of(&GOOD.replace("quorum = \"off\"", "csums_resync = \"yes\""));
        assert!(err.contains("csums_resync = \"yes\"") && err.contains("boolean"), "{err}");
    }

    #[test]
    fn one_node_is_not_a_resource() {
        let one = GOOD.split("[[node]]").take(2).collect::<Vec<_>>().join("[[node]]");
        assert!(error_of(&one).contains("at least two"));
    }

    #[test]
    fn malformed_toml_reports_position() {
        let err = error_of("name = \"r0\"\nprotocol = ");
        assert!(err.contains("r0.toml"), "{err}");
        assert!(err.contains("line 2") || err.contains("2:"), "{err}");
    }

    #[test]
    fn unknown_node_lists_the_configured_ones() {
        let config = parse(GOOD).unwrap();
        let err = config.node("gamma").unwrap_err().to_string();
        assert!(err.contains("alpha, beta"), "{err}");
    }

    #[test]
    fn secret_and_secret_file_are_exclusive() {
        let text = GOOD.replace("quorum = \"off\"", "secret = \"s\"\nsecret_file = \"/x\"");
        assert!(error_of(&text).contains("`secret_file`"));
    }

    /// GOOD with a `[promoter]` section holding `body` (top-level keys must come before it).
    fn with_promoter(body: &str) -> String {
        GOOD.replacen("[[node]]", &format!("[promoter]\n{body}\n[[node]]"), 1)
    }

    #[test]
    fn a_promoter_section_pairs_starts_with_stops_and_has_defaults() {
        assert_eq!(parse(GOOD).unwrap().promoter, None, "no section, no promoter");
        let config = parse(&with_promoter("start = [\"mount /dev/ublkb0 /srv\", \"true\"]\nstop = [\"umount /srv\", \"true\"]\nunits = [\"app.service\"]")).unwrap();
        let promoter = config.promoter.unwrap();
        assert_eq!(promoter.commands[0], ServiceCommands { start: "mount /dev/ublkb0 /srv".into(), stop: "umount /srv".into() });
        assert_eq!(promoter.units, ["app.service"]);
        assert_eq!(promoter.systemctl, Path::new("systemctl"));
        assert_eq!((promoter.start_timeout, promoter.stop_timeout), (Duration::from_secs(60), Duration::from_secs(60)));
        assert_eq!(promoter.promote_delay, Duration::from_millis(DEFAULT_PROMOTE_DELAY_MS));
        assert_eq!(promoter.on_stop_failure, OnStopFailure::Log);
        let empty = parse(&with_promoter("")).unwrap().promoter.unwrap();
        assert!(empty.commands.is_empty() && empty.units.is_empty(), "a promoter may only promote and demote");
        let exit = parse(&with_promoter("on_stop_failure = \"exit\"\npromote_delay_ms = 250")).unwrap().promoter.unwrap();
        assert_eq!((exit.on_stop_failure, exit.promote_delay), (OnStopFailure::Exit, Duration::from_millis(250)));
    }

    #[test]
    fn bad_promoter_keys_name_their_key() {
        for (body, key, says) in [
            ("start = [\"a\"]", "promoter.stop", "undoes"),
            ("start = [\"a\", \" \"]\nstop = [\"b\", \"c\"]", "promoter.start[1]", "empty"),
            ("units = [\"app\"]", "promoter.units[0]", "suffix"),
            ("units = [\"--now.service\"]", "promoter.units[0]", "suffix"),
            ("systemctl = \"/bin/true\"", "promoter.systemctl", "only with"),
            ("start_timeout_s = 0", "promoter.start_timeout_s", "from 1"),
            ("stop_timeout_s = 4000", "promoter.stop_timeout_s", "from 1"),
            ("promote_delay_ms = 10", "promoter.promote_delay_ms", "from 100"),
            ("on_stop_failure = \"reboot\"", "promoter.on_stop_failure", "\"log\" or \"exit\""),
        ] {
            let err = error_of(&with_promoter(body));
            assert!(err.contains(&format!("`{key}`")) && err.contains(says), "{key}: {err}");
        }
        let err = error_of(&with_promoter("stat = [\"a\"]"));
        assert!(err.contains("stat"), "unknown keys are refused: {err}");
    }

    #[test]
    fn transport_is_tls_with_a_secret_unless_plain_is_asked_for() {
        let secret = |extra: &str| GOOD.replace("quorum = \"off\"", &format!("quorum = \"off\"\nsecret = \"sixteen bytes ok\"\n{extra}"));
        assert_eq!(parse(&secret("")).unwrap().transport, Transport::Tls);
        assert_eq!(parse(&secret("transport = \"tls\"")).unwrap().transport, Transport::Tls);
        assert_eq!(parse(&secret("transport = \"plain\"")).unwrap().transport, Transport::Plain);
        let err = error_of(&secret("transport = \"tsl\""));
        assert!(err.contains("`transport`") && err.contains("\"tsl\" is not \"tls\" or \"plain\""), "{err}");
        let trusted = |extra: &str| GOOD.replace("quorum = \"off\"", &format!("quorum = \"off\"\n{extra}"));
        assert_eq!(parse(&trusted("")).unwrap().transport, Transport::Plain);
        let err = error_of(&trusted("transport = \"tls\""));
        assert!(err.contains("`transport`") && err.contains("without a `secret`"), "{err}");
    }

    #[test]
    fn certificates_need_a_ca_a_certificate_and_key_for_every_node_and_tls() {
        let with = |resource: &str, alpha: &str, beta: &str| {
            GOOD.replace("quorum = \"off\"", &format!("quorum = \"off\"\n{resource}"))
                .replace("name = \"alpha\"\n", &format!("name = \"alpha\"\n{alpha}"))
                .replace("name = \"beta\"\n", &format!("name = \"beta\"\n{beta}"))
        };
        let own = |node: &str| format!("certificate = \"/etc/blkrepl/{node}.crt\"\ncertificate_key = \"/etc/blkrepl/{node}.key\"\n");
        let ca = "tls_ca = \"/etc/blkrepl/ca.pem\"";
        let config = parse(&with(ca, &own("alpha"), &own("beta"))).unwrap();
        assert_eq!(config.transport, Transport::Tls, "certificates without a secret authenticate");
        assert_eq!(config.tls_ca.as_deref(), Some(Path::new("/etc/blkrepl/ca.pem")));
        assert_eq!(
            config.nodes[1].certificate,
            Some(NodeCertificate { certificate: "/etc/blkrepl/beta.crt".into(), key: "/etc/blkrepl/beta.key".into() })
        );
        assert!(config.check_authenticates().is_ok());
        let refused = [
            (with(ca, &own("alpha"), ""), "node[1].certificate", "is missing"),
            (with(ca, &own("alpha"), "certificate = \"/b.crt\"\n"), "node[1].certificate_key", "is missing"),
            (with("", &own("alpha"), ""), "node[0].certificate", "no `tls_ca`"),
            (with("", "certificate_key = \"/a.key\"\n", ""), "node[0].certificate_key", "no `tls_ca`"),
            (with(&format!("{ca}\ntransport = \"plain\""), &own("alpha"), &own("beta")), "transport", "beside `tls_ca`"),
            (with(&format!("{ca}\ntrusted_network = true"), &own("alpha"), &own("beta")), "trusted_network", "beside `tls_ca`"),
        ];
        for (text, key, why) in refused {
            let err = error_of(&text);
            assert!(err.contains(&format!("`{key}`")) && err.contains(why), "{key}: {err}");
        }
        let err = error_of(&with("nbd_tls = true", "", ""));
        assert!(err.contains("`nbd_tls`") && err.contains("needs `tls_ca`"), "{err}");
        let exported = with(&format!("{ca}\nnbd_tls = true"), &own("alpha"), &own("beta")).replace("127.0.0.1:10809", "0.0.0.0:10809");
        let exported = parse(&exported).unwrap();
        assert!(exported.nbd_tls && exported.warnings().iter().all(|w| !w.contains("exports NBD")), "TLS-only NBD is not warned about");
        let odd_name = with(ca, &own("alpha"), &own("beta")).replace("name = \"beta\"", "name = \"beta 2\"");
        let err = error_of(&odd_name);
        assert!(err.contains("`node[1].name`") && err.contains("not a DNS name"), "{err}");
    }

    #[test]
    fn a_secret_short_enough_to_guess_is_refused() {
        let short = GOOD.replace("quorum = \"off\"", "quorum = \"off\"\nsecret = \"hunter2\"");
        let err = error_of(&short);
        assert!(err.contains("`secret`") && err.contains("7 bytes") && err.contains("at least 16"), "{err}");
        let long = GOOD.replace("quorum = \"off\"", "quorum = \"off\"\nsecret = \"sixteen bytes ok\"");
        assert_eq!(parse(&long).unwrap().secret.as_deref(), Some(&b"sixteen bytes ok"[..]));
    }

    #[test]
    fn load_checks_the_file_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("r1.toml"), GOOD).unwrap();
        let err = ResourceConfig::load(dir.path(), "r1").unwrap_err().to_string();
        assert!(err.contains("`name`"), "{err}");
        let missing = ResourceConfig::load(dir.path(), "r9").unwrap_err().to_string();
        assert!(missing.contains("r9.toml"), "{missing}");
    }
}
