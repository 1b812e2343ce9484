//! The messages peers exchange and the codecs of their payloads (the bytes after the frame
//! header). Layouts are in `docs/PROTOCOL.md`; every integer is big-endian.

use bytes::{BufMut, Bytes, BytesMut};

use super::position::DataPosition;

/// Longest resource name a `Hello` carries; the name travels in a fixed 64-byte field.
pub const MAX_RESOURCE_BYTES: usize = 63;
/// Longest `Disconnect` reason: enough for a sentence in a log line, small enough that a
/// hostile peer cannot make the receiver log megabytes.
pub const MAX_REASON_BYTES: usize = 1024;
/// Most data one `Data` or `ResyncData` frame carries; the engine splits larger requests.
pub const MAX_DATA_BYTES: usize = 1 << 20;

/// The content of a [`Message::ResyncZeroes`] (offset and length), counted as the data it
/// carries by both ends.
pub const RESYNC_ZEROES_BYTES: usize = 12;

/// Zeroes for [`zero_bytes`]; in the zero-filled data segment, so it costs no file size, and no
/// memory until read.
static ZEROES: [u8; MAX_DATA_BYTES] = [0; MAX_DATA_BYTES];

/// `len` zero bytes (at most [`MAX_DATA_BYTES`]) without an allocation: what a
/// [`Message::ResyncZeroes`] stands for, written like received data.
pub fn zero_bytes(len: usize) -> Bytes {
    Bytes::from_static(&ZEROES[..len])
}
/// Most runs one `BitmapRuns` frame carries (16 bytes each, so 1 MiB of runs); a longer
/// bitmap is sent as several frames, the final one marked `last`.
pub const MAX_BITMAP_RUNS: usize = 65_536;
/// Most block digests one `DigestRequest` carries (and so most blocks one `DigestReply`
/// answers for): 128 KiB of digests, 16 MiB of data at 4 KiB blocks.
pub const MAX_DIGESTS: usize = 4096;
/// Bytes in one block digest (SHA-256).
pub const DIGEST_BYTES: usize = 32;

/// Size of the fixed resource-name field of `Hello`: a length byte, then the name padded with
/// zeroes.
const RESOURCE_FIELD_BYTES: usize = 1 + MAX_RESOURCE_BYTES;
/// A node-id field that names no node.
const NO_NODE: u8 = u8::MAX;
/// Size of one `(start, count)` run in `BitmapRuns`.
const RUN_BYTES: usize = 16;
/// Size of one `(first, count)` run of differing blocks in `DigestReply`.
const BLOCK_RUN_BYTES: usize = 8;

/// What a `DigestRequest` asks the receiver to do with the digests, and what its
/// `DigestReply` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DigestPurpose {
    /// Online verify: compare, report the blocks that differ (nothing is written).
    Verify = 1,
    /// Checksum-based resync: blocks that match need no data; the source sends the others.
    Resync = 2,
}

impl DigestPurpose {
    fn from_byte(byte: u8) -> Option<DigestPurpose> {
        [DigestPurpose::Verify, DigestPurpose::Resync]
            .into_iter()
            .find(|p| *p as u8 == byte)
    }
}

/// The first frame each side sends: who it is, what it speaks, and what it replicates, so the
/// peer can refuse a connection to the wrong node, resource or size before any data flows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The sender's protocol version ([`super::PROTOCOL_VERSION`]); v1 requires equality.
    pub version: u32,
    /// Optional features the sender supports; the peer ignores bits it does not know, and a
    /// feature is in use only when both sides set its bit. No bits are defined in v1; bit 0 is
    /// reserved for an upgrade of the connection to TLS.
    pub features: u64,
    /// The resource (replicated device) this connection is for; at most 63 bytes of UTF-8.
    pub resource: String,
    /// The sender's node id.
    pub from_node: u8,
    /// The node id the sender believes it is talking to; a mismatch means a misconfiguration.
    pub to_node: u8,
    /// Usable size of the sender's replicated data area, in bytes.
    pub data_size_bytes: u64,
    /// Bytes covered by one bit of the sender's dirty bitmaps; both sides must agree for
    /// `BitmapRuns` to mean the same blocks.
    pub bitmap_block_size: u32,
    /// The replication protocol the sender is configured for: `b'A'`, `b'B'` or `b'C'`.
    pub protocol: u8,
}

/// The sender's view of itself, from which the receiver decides sync direction and split
/// brain (the generation-UUID rules of `core`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerState {
    /// The sender's role (primary/secondary), as numbered by `core`.
    pub role: u8,
    /// The sender's disk state (diskless, inconsistent, up to date, ...), as numbered by `core`.
    pub disk: u8,
    /// State flags defined by `core` (for example: a `--discard-my-data` connect).
    pub flags: u32,
    /// The sender's current generation UUID.
    pub current_uuid: u64,
    /// The sender's bitmap UUID for the receiver: the current UUID at the moment the sender
    /// started recording changes the receiver lacks; 0 when it records none.
    pub bitmap_uuid: u64,
    /// The sender's most recent earlier generation UUIDs, newest first.
    pub history: [u64; 4],
    /// Number of set bits in the sender's bitmap for the receiver (blocks it changed since).
    pub bitmap_weight: u64,
    /// The nodes the sender sees as primary (itself included), one bit per node id: lets a
    /// node see a primary through a third node whose link to it still works.
    pub primaries: u32,
    /// The highest election term the sender voted in, won or heard of.
    pub term: u64,
    /// How far into the stream of the primary whose generation it carries the sender's data
    /// is durable.
    pub data_position: DataPosition,
    /// The node resyncing the sender (its source), or about to: decisions with the sender
    /// wait for that resync to end, unless the receiver is that source.
    pub resynced_by: Option<u8>,
    /// The data peers a primary does not keep in step with its writes, one bit per node id:
    /// it records writes for them in its bitmap, or has no established stream to them. Its
    /// followers must not take such a peer for one holding the primary's data, however
    /// recently that peer said it follows. A secondary reports none.
    pub lagging: u32,
}

/// One frame's worth of meaning. The doc comment of each variant says what it asks of the
/// receiver; `docs/PROTOCOL.md` says when it may be sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// First frame each side sends.
    Hello(Hello),
    /// Sent after `Hello` when the resource has a shared secret: the peer must answer with
    /// an HMAC over this fresh random nonce (see [`super::auth`]).
    AuthChallenge { nonce: [u8; 32] },
    /// The answer to the peer's `AuthChallenge`; nothing else flows until it verifies.
    AuthResponse { mac: [u8; 32] },
    /// The sender's state; sent after the handshake and whenever role/disk/uuids change.
    State(PeerState),
    /// One chunk of the sender's dirty bitmap for the receiver, as runs of set blocks:
    /// `(first block, block count)` in units of the negotiated bitmap block size. `last`
    /// marks the final chunk, after which the receiver knows the whole bitmap.
    BitmapRuns { last: bool, runs: Vec<(u64, u64)> },
    /// An application write to replicate: write `payload` at byte `offset`. `id` names the
    /// write in its acks; `epoch` is the write epoch it belongs to (closed by a `Barrier`);
    /// `fua` asks that it be durable before it is acknowledged.
    Data {
        id: u64,
        epoch: u64,
        offset: u64,
        fua: bool,
        payload: Bytes,
    },
    /// A write of `len` zero bytes at `offset`, sent without the zeroes; with `discard` the
    /// receiver may deallocate the range instead (it must still read back as zeroes).
    /// Acked and ordered like `Data`.
    Zeroes {
        id: u64,
        epoch: u64,
        offset: u64,
        len: u32,
        fua: bool,
        discard: bool,
    },
    /// Protocol B: write `id` has arrived at the peer (not necessarily on its disk).
    RecvAck { id: u64 },
    /// Write `id` is done on the peer's disk: the ack of protocol C, and of a FUA write under
    /// any protocol (then it also means durable).
    WriteAck { id: u64 },
    /// Write `id` failed on the peer with this errno; the sender marks the blocks out of sync
    /// for that peer rather than failing the application write.
    NegAck { id: u64, errno: u32 },
    /// Closes write epoch `epoch`: the receiver acks it once every write it received before
    /// the barrier is done and its disk has been flushed.
    Barrier { epoch: u64 },
    /// Epoch `epoch` is durable on the peer; `writes` is how many writes it held, which the
    /// sender checks against its own count (a mismatch is a protocol error).
    BarrierAck { epoch: u64, writes: u32 },
    /// Resync: the source's current content of the blocks at byte `offset`.
    ResyncData { offset: u64, payload: Bytes },
    /// Resync: the source's `len` bytes at `offset` are all zeroes (space never written on a
    /// thin or fresh device, a filesystem's freed space): the target writes zeroes there
    /// without the bytes crossing the wire.
    ResyncZeroes { offset: u64, len: u32 },
    /// Source -> target: every block is sent and covered by a barrier ack; adopt these uuids
    /// and this position of the data (a primary source's last closed epoch: the target holds
    /// its open epoch's writes only so far).
    ResyncDone {
        current_uuid: u64,
        history: [u64; 4],
        position: DataPosition,
    },
    /// Source -> target, just before `ResyncDone`: the sender's out-of-sync bits for a third
    /// data node, `node`, as runs like `BitmapRuns` (several frames for a long list). Where the
    /// resync rewrote the target, the target now holds the sender's data and differs from
    /// `node` where the sender does: it records those blocks for `node`.
    ThirdPeerBits { node: u8, runs: Vec<(u64, u64)> },
    /// The sender's SHA-256 of each bitmap block from byte `offset` (the last block of the
    /// device may be short); the receiver compares its own blocks and answers `DigestReply`.
    DigestRequest {
        purpose: DigestPurpose,
        offset: u64,
        digests: Vec<[u8; DIGEST_BYTES]>,
    },
    /// The answer to the `DigestRequest` at `offset` for `blocks` blocks: the runs of blocks,
    /// `(first, count)` counted from the request's first block, whose digests differed.
    DigestReply {
        purpose: DigestPurpose,
        offset: u64,
        blocks: u32,
        differing: Vec<(u32, u32)>,
    },
    /// Liveness probe; answered with `PingAck`.
    Ping,
    /// The answer to `Ping`.
    PingAck,
    /// The sender wants to become primary in election `term`, its data at `position`: the
    /// receiver answers with `Vote` for this `ballot` (see `replica/election.rs`).
    VoteRequest { ballot: u64, term: u64, position: DataPosition },
    /// The answer to `VoteRequest` `ballot`: whether the sender lets the candidate count its
    /// vote (and then promotes nobody else, itself included, for a while).
    Vote { ballot: u64, granted: bool },
    /// Orderly close with a human-readable reason (logged by the receiver).
    Disconnect { reason: String },
}

/// The message type: the `u16` in the frame header that says how to read the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub(super) enum Kind {
    Hello = 0x0001,
    AuthChallenge = 0x0002,
    AuthResponse = 0x0003,
    State = 0x0004,
    BitmapRuns = 0x0005,
    Data = 0x0010,
    Zeroes = 0x0011,
    Barrier = 0x0012,
    RecvAck = 0x0013,
    WriteAck = 0x0014,
    NegAck = 0x0015,
    BarrierAck = 0x0016,
    ResyncData = 0x0020,
    ResyncDone = 0x0022,
    ThirdPeerBits = 0x0025,
    ResyncZeroes = 0x0026,
    DigestRequest = 0x0023,
    DigestReply = 0x0024,
    Ping = 0x0030,
    PingAck = 0x0031,
    Disconnect = 0x0032,
    VoteRequest = 0x0033,
    Vote = 0x0034,
}

impl Kind {
    const ALL: [Kind; 23] = [
        Kind::Hello,
        Kind::AuthChallenge,
        Kind::AuthResponse,
        Kind::State,
        Kind::BitmapRuns,
        Kind::Data,
        Kind::Zeroes,
        Kind::Barrier,
        Kind::RecvAck,
        Kind::WriteAck,
        Kind::NegAck,
        Kind::BarrierAck,
        Kind::ResyncData,
        Kind::ResyncZeroes,
        Kind::ResyncDone,
        Kind::ThirdPeerBits,
        Kind::DigestRequest,
        Kind::DigestReply,
        Kind::Ping,
        Kind::PingAck,
        Kind::Disconnect,
        Kind::VoteRequest,
        Kind::Vote,
    ];

    pub(super) fn code(self) -> u16 {
        self as u16
    }

    pub(super) fn from_code(code: u16) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.code() == code)
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Hello => "Hello",
            Kind::AuthChallenge => "AuthChallenge",
            Kind::AuthResponse => "AuthResponse",
            Kind::State => "State",
            Kind::BitmapRuns => "BitmapRuns",
            Kind::Data => "Data",
            Kind::Zeroes => "Zeroes",
            Kind::Barrier => "Barrier",
            Kind::RecvAck => "RecvAck",
            Kind::WriteAck => "WriteAck",
            Kind::NegAck => "NegAck",
            Kind::BarrierAck => "BarrierAck",
            Kind::ResyncData => "ResyncData",
            Kind::ResyncZeroes => "ResyncZeroes",
            Kind::ResyncDone => "ResyncDone",
            Kind::ThirdPeerBits => "ThirdPeerBits",
            Kind::DigestRequest => "DigestRequest",
            Kind::DigestReply => "DigestReply",
            Kind::Ping => "Ping",
            Kind::PingAck => "PingAck",
            Kind::Disconnect => "Disconnect",
            Kind::VoteRequest => "VoteRequest",
            Kind::Vote => "Vote",
        }
    }
}

impl Message {
    /// The bytes of bulk content it carries (what a send queue's fill is counted in).
    pub fn payload_len(&self) -> usize {
        match self {
            Message::Data { payload, .. } | Message::ResyncData { payload, .. } => payload.len(),
            Message::DigestRequest { digests, .. } => digests.len() * DIGEST_BYTES,
            // What stands for the zeroes on the wire: their offset and length.
            Message::ResyncZeroes { .. } => RESYNC_ZEROES_BYTES,
            _ => 0,
        }
    }

    /// The variant's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// Acks, digest replies, pings and barrier acks: small frames the engine sends ahead of
    /// queued bulk data, so that a large transfer never delays the completion of a write (or a
    /// verify's progress) or trips a ping timeout.
    pub fn is_control(&self) -> bool {
        matches!(
            self,
            Message::RecvAck { .. }
                | Message::WriteAck { .. }
                | Message::NegAck { .. }
                | Message::BarrierAck { .. }
                | Message::DigestReply { .. }
                | Message::Ping
                | Message::PingAck
                | Message::VoteRequest { .. }
                | Message::Vote { .. }
        )
    }

    pub(super) fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::AuthChallenge { .. } => Kind::AuthChallenge,
            Message::AuthResponse { .. } => Kind::AuthResponse,
            Message::State(_) => Kind::State,
            Message::BitmapRuns { .. } => Kind::BitmapRuns,
            Message::Data { .. } => Kind::Data,
            Message::Zeroes { .. } => Kind::Zeroes,
            Message::Barrier { .. } => Kind::Barrier,
            Message::RecvAck { .. } => Kind::RecvAck,
            Message::WriteAck { .. } => Kind::WriteAck,
            Message::NegAck { .. } => Kind::NegAck,
            Message::BarrierAck { .. } => Kind::BarrierAck,
            Message::ResyncData { .. } => Kind::ResyncData,
            Message::ResyncZeroes { .. } => Kind::ResyncZeroes,
            Message::ResyncDone { .. } => Kind::ResyncDone,
            Message::ThirdPeerBits { .. } => Kind::ThirdPeerBits,
            Message::DigestRequest { .. } => Kind::DigestRequest,
            Message::DigestReply { .. } => Kind::DigestReply,
            Message::Ping => Kind::Ping,
            Message::PingAck => Kind::PingAck,
            Message::Disconnect { .. } => Kind::Disconnect,
            Message::VoteRequest { .. } => Kind::VoteRequest,
            Message::Vote { .. } => Kind::Vote,
        }
    }

    /// The bounds a receiver enforces, checked by the sender too so that a message the peer
    /// would reject is refused locally with the same reason. Every bound here also keeps the
    /// payload within the frame limit.
    pub(super) fn check_limits(&self) -> Result<(), &'static str> {
        match self {
            Message::Hello(hello) if hello.resource.len() > MAX_RESOURCE_BYTES => {
                Err("resource name longer than 63 bytes")
            }
            Message::Hello(hello) if !matches!(hello.protocol, b'A' | b'B' | b'C') => {
                Err("protocol is not A, B or C")
            }
            Message::BitmapRuns { runs, .. } | Message::ThirdPeerBits { runs, .. } if runs.len() > MAX_BITMAP_RUNS => {
                Err("more than 65536 runs")
            }
            Message::Data { payload, .. } | Message::ResyncData { payload, .. }
                if payload.len() > MAX_DATA_BYTES =>
            {
                Err("data longer than 1 MiB")
            }
            Message::ResyncZeroes { len, .. } if *len == 0 || *len as usize > MAX_DATA_BYTES => {
                Err("zeroes of no bytes or longer than 1 MiB")
            }
            Message::Disconnect { reason } if reason.len() > MAX_REASON_BYTES => {
                Err("reason longer than 1024 bytes")
            }
            Message::DigestRequest { digests, .. }
                if digests.is_empty() || digests.len() > MAX_DIGESTS =>
            {
                Err("digest count is not 1 to 4096")
            }
            Message::DigestReply { blocks, .. }
                if *blocks == 0 || *blocks as usize > MAX_DIGESTS =>
            {
                Err("block count is not 1 to 4096")
            }
            Message::DigestReply {
                blocks, differing, ..
            } => check_block_runs(*blocks, differing),
            _ => Ok(()),
        }
    }

    /// Appends the payload's fixed fields to `out` and returns the bytes that follow them
    /// (the data of `Data`/`ResyncData`, the text of `Disconnect`), kept apart so that
    /// `write_message` can send a megabyte of data without copying it.
    pub(super) fn put_fields<'m>(&'m self, out: &mut BytesMut) -> &'m [u8] {
        match self {
            Message::Hello(hello) => {
                out.put_u32(hello.version);
                out.put_u64(hello.features);
                put_resource(out, &hello.resource);
                out.put_u8(hello.from_node);
                out.put_u8(hello.to_node);
                out.put_u64(hello.data_size_bytes);
                out.put_u32(hello.bitmap_block_size);
                out.put_u8(hello.protocol);
            }
            Message::AuthChallenge { nonce } => out.put_slice(nonce),
            Message::AuthResponse { mac } => out.put_slice(mac),
            Message::State(state) => {
                out.put_u8(state.role);
                out.put_u8(state.disk);
                out.put_u32(state.flags);
                out.put_u64(state.current_uuid);
                out.put_u64(state.bitmap_uuid);
                state.history.iter().for_each(|uuid| out.put_u64(*uuid));
                out.put_u64(state.bitmap_weight);
                out.put_u32(state.primaries);
                out.put_u64(state.term);
                put_position(out, &state.data_position);
                out.put_u8(state.resynced_by.unwrap_or(NO_NODE));
                out.put_u32(state.lagging);
            }
            Message::BitmapRuns { last, runs } => {
                out.put_u8(u8::from(*last));
                put_runs(out, runs);
            }
            Message::ThirdPeerBits { node, runs } => {
                out.put_u8(*node);
                put_runs(out, runs);
            }
            Message::Data {
                id,
                epoch,
                offset,
                fua,
                payload,
            } => {
                out.put_u64(*id);
                out.put_u64(*epoch);
                out.put_u64(*offset);
                out.put_u8(u8::from(*fua));
                return payload;
            }
            Message::Zeroes {
                id,
                epoch,
                offset,
                len,
                fua,
                discard,
            } => {
                out.put_u64(*id);
                out.put_u64(*epoch);
                out.put_u64(*offset);
                out.put_u32(*len);
                out.put_u8(u8::from(*fua));
                out.put_u8(u8::from(*discard));
            }
            Message::RecvAck { id } | Message::WriteAck { id } => out.put_u64(*id),
            Message::NegAck { id, errno } => {
                out.put_u64(*id);
                out.put_u32(*errno);
            }
            Message::Barrier { epoch } => out.put_u64(*epoch),
            Message::BarrierAck { epoch, writes } => {
                out.put_u64(*epoch);
                out.put_u32(*writes);
            }
            Message::ResyncData { offset, payload } => {
                out.put_u64(*offset);
                return payload;
            }
            Message::ResyncZeroes { offset, len } => {
                out.put_u64(*offset);
                out.put_u32(*len);
            }
            Message::ResyncDone {
                current_uuid,
                history,
                position,
            } => {
                out.put_u64(*current_uuid);
                history.iter().for_each(|uuid| out.put_u64(*uuid));
                put_position(out, position);
            }
            Message::DigestRequest {
                purpose,
                offset,
                digests,
            } => {
                out.put_u8(*purpose as u8);
                out.put_u64(*offset);
                out.reserve(digests.len() * DIGEST_BYTES);
                digests.iter().for_each(|digest| out.put_slice(digest));
            }
            Message::DigestReply {
                purpose,
                offset,
                blocks,
                differing,
            } => {
                out.put_u8(*purpose as u8);
                out.put_u64(*offset);
                out.put_u32(*blocks);
                // check_limits bounds the runs by the block count, so the count fits.
                out.put_u32(differing.len() as u32);
                for (first, count) in differing {
                    out.put_u32(*first);
                    out.put_u32(*count);
                }
            }
            Message::Ping | Message::PingAck => {}
            Message::VoteRequest { ballot, term, position } => {
                out.put_u64(*ballot);
                out.put_u64(*term);
                put_position(out, position);
            }
            Message::Vote { ballot, granted } => {
                out.put_u64(*ballot);
                out.put_u8(u8::from(*granted));
            }
            Message::Disconnect { reason } => return reason.as_bytes(),
        }
        &[]
    }

    /// Reads a `kind` payload. Takes the payload as `Bytes` so that data is sliced out of the
    /// receive buffer, not copied.
    pub(super) fn decode_fields(kind: Kind, payload: Bytes) -> Result<Message, Malformed> {
        let mut fields = Fields {
            payload,
            pos: 0,
            kind,
        };
        let msg = match kind {
            Kind::Hello => {
                let hello = Hello {
                    version: fields.u32()?,
                    features: fields.u64()?,
                    resource: fields.resource()?,
                    from_node: fields.u8()?,
                    to_node: fields.u8()?,
                    data_size_bytes: fields.u64()?,
                    bitmap_block_size: fields.u32()?,
                    protocol: fields.u8()?,
                };
                // A later version may append fields to Hello; skipping them lets this node
                // read far enough to report a version mismatch instead of a malformed frame.
                let _later_fields = fields.rest();
                Message::Hello(hello)
            }
            Kind::AuthChallenge => Message::AuthChallenge {
                nonce: fields.array()?,
            },
            Kind::AuthResponse => Message::AuthResponse {
                mac: fields.array()?,
            },
            Kind::State => Message::State(PeerState {
                role: fields.u8()?,
                disk: fields.u8()?,
                flags: fields.u32()?,
                current_uuid: fields.u64()?,
                bitmap_uuid: fields.u64()?,
                history: fields.uuids()?,
                bitmap_weight: fields.u64()?,
                primaries: fields.u32()?,
                term: fields.u64()?,
                data_position: fields.position()?,
                resynced_by: Some(fields.u8()?).filter(|id| *id != NO_NODE),
                lagging: fields.u32()?,
            }),
            Kind::BitmapRuns => Message::BitmapRuns {
                last: fields.bool()?,
                runs: fields.runs()?,
            },
            Kind::Data => Message::Data {
                id: fields.u64()?,
                epoch: fields.u64()?,
                offset: fields.u64()?,
                fua: fields.bool()?,
                payload: fields.rest(),
            },
            Kind::Zeroes => Message::Zeroes {
                id: fields.u64()?,
                epoch: fields.u64()?,
                offset: fields.u64()?,
                len: fields.u32()?,
                fua: fields.bool()?,
                discard: fields.bool()?,
            },
            Kind::Barrier => Message::Barrier {
                epoch: fields.u64()?,
            },
            Kind::RecvAck => Message::RecvAck { id: fields.u64()? },
            Kind::WriteAck => Message::WriteAck { id: fields.u64()? },
            Kind::NegAck => Message::NegAck {
                id: fields.u64()?,
                errno: fields.u32()?,
            },
            Kind::BarrierAck => Message::BarrierAck {
                epoch: fields.u64()?,
                writes: fields.u32()?,
            },
            Kind::ResyncData => Message::ResyncData {
                offset: fields.u64()?,
                payload: fields.rest(),
            },
            Kind::ResyncZeroes => Message::ResyncZeroes {
                offset: fields.u64()?,
                len: fields.u32()?,
            },
            Kind::ResyncDone => Message::ResyncDone {
                current_uuid: fields.u64()?,
                history: fields.uuids()?,
                position: fields.position()?,
            },
            Kind::ThirdPeerBits => Message::ThirdPeerBits {
                node: fields.u8()?,
                runs: fields.runs()?,
            },
            Kind::DigestRequest => Message::DigestRequest {
                purpose: fields.purpose()?,
                offset: fields.u64()?,
                digests: fields.digests()?,
            },
            Kind::DigestReply => Message::DigestReply {
                purpose: fields.purpose()?,
                offset: fields.u64()?,
                blocks: fields.u32()?,
                differing: fields.block_runs()?,
            },
            Kind::Ping => Message::Ping,
            Kind::PingAck => Message::PingAck,
            Kind::VoteRequest => Message::VoteRequest {
                ballot: fields.u64()?,
                term: fields.u64()?,
                position: fields.position()?,
            },
            Kind::Vote => Message::Vote {
                ballot: fields.u64()?,
                granted: fields.bool()?,
            },
            Kind::Disconnect => Message::Disconnect {
                reason: fields.text()?,
            },
        };
        fields.finish()?;
        msg.check_limits()
            .map_err(|reason| fields.malformed(reason))?;
        Ok(msg)
    }
}

/// Runs of differing blocks must lie within the request's blocks, in order, without overlap, so
/// the receiver can mark (and count) them without checking again.
fn check_block_runs(blocks: u32, runs: &[(u32, u32)]) -> Result<(), &'static str> {
    let mut next = 0u64;
    for &(first, count) in runs {
        let end = u64::from(first) + u64::from(count);
        if count == 0 || u64::from(first) < next || end > u64::from(blocks) {
            return Err(
                "differing runs are empty, overlap, are out of order or pass the block count",
            );
        }
        next = end;
    }
    Ok(())
}

/// Writes the fixed 64-byte resource field. `check_limits` has bounded the name to 63 bytes.
/// `(first block, block count)` runs with their count ahead (check_limits bounds the count to
/// `MAX_BITMAP_RUNS`, so it fits a u32).
fn put_runs(out: &mut BytesMut, runs: &[(u64, u64)]) {
    out.put_u32(runs.len() as u32);
    out.reserve(runs.len() * RUN_BYTES);
    for (start, count) in runs {
        out.put_u64(*start);
        out.put_u64(*count);
    }
}

fn put_position(out: &mut BytesMut, position: &DataPosition) {
    out.put_u64(position.term);
    out.put_u64(position.epoch);
    out.put_u64(position.fua);
}

fn put_resource(out: &mut BytesMut, resource: &str) {
    out.put_u8(resource.len() as u8);
    out.put_slice(resource.as_bytes());
    out.put_bytes(0, MAX_RESOURCE_BYTES - resource.len());
}

/// A cursor over a payload that turns every shortfall into `Malformed` instead of a panic.
/// A message whose fields do not decode: which message, and what is wrong with it (the frame
/// around it was whole; see `WireError::Malformed`).
#[derive(Debug, thiserror::Error)]
#[error("malformed {msg_type} frame: {reason}")]
pub struct Malformed {
    pub msg_type: &'static str,
    pub reason: &'static str,
}

struct Fields {
    payload: Bytes,
    pos: usize,
    kind: Kind,
}

impl Fields {
    fn malformed(&self, reason: &'static str) -> Malformed {
        Malformed { msg_type: self.kind.name(), reason }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        let field = self.payload[self.pos..]
            .first_chunk::<N>()
            .copied()
            .ok_or_else(|| self.malformed("payload too short"))?;
        self.pos += N;
        Ok(field)
    }

    fn u8(&mut self) -> Result<u8, Malformed> {
        self.array().map(u8::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, Malformed> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, Malformed> {
        self.array().map(u64::from_be_bytes)
    }

    /// A bool is one byte, 0 or 1; anything else means the sender and receiver disagree about
    /// the layout, which is better caught than guessed at.
    fn bool(&mut self) -> Result<bool, Malformed> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.malformed("bool is neither 0 nor 1")),
        }
    }

    fn uuids(&mut self) -> Result<[u64; 4], Malformed> {
        Ok([self.u64()?, self.u64()?, self.u64()?, self.u64()?])
    }

    fn position(&mut self) -> Result<DataPosition, Malformed> {
        Ok(DataPosition { term: self.u64()?, epoch: self.u64()?, fua: self.u64()? })
    }

    /// The fixed resource field: a length byte, the name, zero padding to 64 bytes.
    fn resource(&mut self) -> Result<String, Malformed> {
        let field: [u8; RESOURCE_FIELD_BYTES] = self.array()?;
        let (len, name_and_padding) = (usize::from(field[0]), &field[1..]);
        let name = name_and_padding
            .get(..len)
            .ok_or_else(|| self.malformed("resource name longer than 63 bytes"))?;
        if name_and_padding[len..].iter().any(|byte| *byte != 0) {
            return Err(self.malformed("resource padding is not zero"));
        }
        String::from_utf8(name.to_vec()).map_err(|_| self.malformed("resource name is not UTF-8"))
    }

    /// Runs of `BitmapRuns`: `(first block, block count)`, 16 bytes each.
    fn runs(&mut self) -> Result<Vec<(u64, u64)>, Malformed> {
        self.counted(RUN_BYTES, |f| Ok((f.u64()?, f.u64()?)))
    }

    fn purpose(&mut self) -> Result<DigestPurpose, Malformed> {
        DigestPurpose::from_byte(self.u8()?).ok_or_else(|| self.malformed("unknown digest purpose"))
    }

    /// The rest of the payload as whole digests (their count is bounded by `check_limits`).
    fn digests(&mut self) -> Result<Vec<[u8; DIGEST_BYTES]>, Malformed> {
        let bytes = self.rest();
        if bytes.len() % DIGEST_BYTES != 0 {
            return Err(self.malformed("digest bytes are not a multiple of 32"));
        }
        Ok(bytes
            .chunks_exact(DIGEST_BYTES)
            .map(|d| d.try_into().expect("exact chunk"))
            .collect())
    }

    /// Runs of differing blocks of `DigestReply`: `(first, count)`, 8 bytes each.
    fn block_runs(&mut self) -> Result<Vec<(u32, u32)>, Malformed> {
        self.counted(BLOCK_RUN_BYTES, |f| Ok((f.u32()?, f.u32()?)))
    }

    /// A u32 count followed by exactly that many items of `item_bytes` each. The count is
    /// checked against the payload length before anything is allocated, so it cannot inflate
    /// an allocation.
    fn counted<T>(
        &mut self,
        item_bytes: usize,
        mut item: impl FnMut(&mut Self) -> Result<T, Malformed>,
    ) -> Result<Vec<T>, Malformed> {
        let count = self.u32()? as usize;
        let remaining = self.payload.len() - self.pos;
        if remaining % item_bytes != 0 || remaining / item_bytes != count {
            return Err(self.malformed("run count does not match payload length"));
        }
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            items.push(item(self)?);
        }
        Ok(items)
    }

    /// The rest of the payload as UTF-8 (its length is bounded by the frame limit and then by
    /// `check_limits`).
    fn text(&mut self) -> Result<String, Malformed> {
        let bytes = self.rest();
        String::from_utf8(bytes.to_vec()).map_err(|_| self.malformed("text is not UTF-8"))
    }

    /// The rest of the payload, sliced without a copy.
    fn rest(&mut self) -> Bytes {
        let rest = self.payload.slice(self.pos..);
        self.pos = self.payload.len();
        rest
    }

    /// Trailing bytes mean the peer's idea of the layout differs from ours.
    fn finish(&self) -> Result<(), Malformed> {
        if self.pos == self.payload.len() {
            Ok(())
        } else {
            Err(self.malformed("trailing bytes after the payload"))
        }
    }
}
