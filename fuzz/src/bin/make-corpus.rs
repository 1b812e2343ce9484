//! Writes the seed corpus of every fuzz target into `fuzz/corpus/<target>/`, from the real
//! encoders: frames from `wire::encode`, metadata from `MetaStore` writing on an in-memory
//! disk, requests from `serde_json`, the resource file of the README. Run it again when a
//! format changes (`scripts/fuzz.sh --seeds`), and commit what changed.
//!
//! NBD sessions are spelled out here from the protocol's numbers: the crate has a server, not
//! a client.

use std::fs;
use std::path::{Path, PathBuf};

use blkrepl::config::ResourceConfig;
use blkrepl::control::Request;
use blkrepl::disk::MemDisk;
use blkrepl::meta::{
    extents_for, ActivityLog, AlPrepared, DirtyBitmap, MetaFlags, MetaParams, BLOCK_SIZE,
};
use blkrepl::wire::{self, DataPosition, DigestPurpose, Hello, Message, PeerState, HEADER_LEN};
use blkrepl_fuzz::meta_input::{MetaInput, Patch};
use bytes::{Bytes, BytesMut};

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let messages = messages();
    let frames: Vec<Vec<u8>> = messages.iter().map(|(_, msg)| frame(msg)).collect();
    // The frame stream target's input: a mode byte (1: the link's frames carry MACs, 2: they
    // are sealed), then the stream. The handshake travels unprotected, everything after it
    // protected.
    let (handshake, rest) = frames.split_at(4);
    write(&root, "frame_stream", "handshake", [&[0][..], &handshake.concat()].concat());
    write(&root, "frame_stream", "replication", [&[0][..], &rest.concat()].concat());
    for (mode, name) in [(1u8, "authenticated"), (2, "sealed")] {
        let (mut protection, _) = blkrepl_fuzz::link_protection(mode == 2);
        let mut stream = vec![mode];
        for (_, msg) in &messages[4..] {
            wire::write_message_with(&mut stream, msg, Some(&mut protection)).expect("in memory");
        }
        write(&root, "frame_stream", name, stream);
    }
    // The dispatch target's input: a setup byte (which replica, I/O failing or not, time
    // between frames), then frames: each message alone, and all of them in a row, for each
    // replica.
    for setup in [0u8, 1, 2, 3, 4 | 1 | (5 << 3)] {
        for ((name, _), frame) in messages.iter().zip(&frames) {
            write(&root, "peer_dispatch", &format!("{setup}-{name}"), [&[setup][..], frame].concat());
        }
        write(&root, "peer_dispatch", &format!("{setup}-all"), [&[setup][..], &frames.concat()].concat());
    }
    for ((name, _), frame) in messages.iter().zip(&frames) {
        // The roundtrip target's input: the message type, then the payload.
        let seed = [&frame[4..6], &frame[HEADER_LEN..]].concat();
        write(&root, "message_roundtrip", name, seed);
    }
    for (name, seed) in meta_seeds() {
        write(&root, "meta_load", &name, seed);
    }
    for (name, text) in resource_files() {
        ResourceConfig::parse(Path::new("/etc/blkrepl/r0.toml"), &text)
            .unwrap_or_else(|e| panic!("seed {name} does not parse: {e}"));
        write(&root, "resource_config", &name, text.into_bytes());
    }
    for request in requests() {
        let line = serde_json::to_string(&request).expect("a request encodes");
        let name = format!("{request:?}").split([' ', '{']).next().expect("a name").to_lowercase();
        write(&root, "control_request", &name, line.into_bytes());
    }
    for (name, session) in nbd_sessions() {
        write(&root, "nbd_session", name, session);
    }
}

fn write(root: &Path, target: &str, name: &str, bytes: Vec<u8>) {
    let dir = root.join(target);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

fn frame(msg: &Message) -> Vec<u8> {
    let mut out = BytesMut::new();
    wire::encode(msg, &mut out);
    out.to_vec()
}

/// One message of each type, named for its seed file; the first four are a handshake.
fn messages() -> Vec<(&'static str, Message)> {
    let position = DataPosition { term: 3, epoch: 41, fua: 7 };
    let state = PeerState {
        role: 1,
        disk: 4,
        flags: 1 << 5,
        current_uuid: 0x1234_5678_9abc_def1,
        bitmap_uuid: 0x0fed_cba9_8765_4321,
        history: [0x1111, 0x2222, 0, 0],
        bitmap_weight: 12,
        primaries: 1,
        term: 3,
        data_position: position,
        resynced_by: Some(2),
        lagging: 1 << 3,
    };
    vec![
        (
            "hello",
            Message::Hello(Hello {
                version: wire::PROTOCOL_VERSION,
                features: 0,
                resource: "r0".into(),
                from_node: 0,
                to_node: 1,
                data_size_bytes: 1 << 30,
                bitmap_block_size: 4096,
                protocol: b'C',
            }),
        ),
        ("auth_challenge", Message::AuthChallenge { nonce: [0x5a; 32] }),
        ("auth_response", Message::AuthResponse { mac: [0xa5; 32] }),
        ("state", Message::State(state)),
        ("bitmap_runs", Message::BitmapRuns { last: true, runs: vec![(0, 8), (100, 1)] }),
        (
            "data",
            Message::Data {
                id: 1,
                epoch: 41,
                offset: 8192,
                fua: true,
                payload: Bytes::from(vec![0xab; 512]),
            },
        ),
        (
            "zeroes",
            Message::Zeroes { id: 2, epoch: 41, offset: 0, len: 4096, fua: false, discard: true },
        ),
        ("barrier", Message::Barrier { epoch: 41 }),
        ("recv_ack", Message::RecvAck { id: 1 }),
        ("write_ack", Message::WriteAck { id: 1 }),
        ("neg_ack", Message::NegAck { id: 2, errno: 5 }),
        ("barrier_ack", Message::BarrierAck { epoch: 41, writes: 2 }),
        ("resync_data", Message::ResyncData { offset: 4096, payload: Bytes::from(vec![7; 512]) }),
        ("resync_zeroes", Message::ResyncZeroes { offset: 8192, len: 65536 }),
        (
            "resync_done",
            Message::ResyncDone { current_uuid: 0x77, history: [0x66, 0x55, 0, 0], position },
        ),
        ("third_peer_bits", Message::ThirdPeerBits { node: 2, runs: vec![(3, 4)] }),
        (
            "digest_request",
            Message::DigestRequest {
                purpose: DigestPurpose::Verify,
                offset: 0,
                digests: vec![[1; 32], [2; 32]],
            },
        ),
        (
            "digest_reply",
            Message::DigestReply {
                purpose: DigestPurpose::Resync,
                offset: 0,
                blocks: 8,
                differing: vec![(1, 2), (5, 1)],
            },
        ),
        ("ping", Message::Ping),
        ("ping_ack", Message::PingAck),
        ("vote_request", Message::VoteRequest { ballot: 9, term: 4, position }),
        ("vote", Message::Vote { ballot: 9, granted: true }),
        ("disconnect", Message::Disconnect { reason: "going down".into() }),
    ]
}

/// Fresh metadata of a few geometries, and metadata as a primary leaves it when it dies with
/// writes in flight (hot extents, dirty bitmaps, PRIMARY_IND) and after a clean stop: the
/// latter as patches over the fresh area, written by `MetaStore` itself.
fn meta_seeds() -> Vec<(String, Vec<u8>)> {
    let fresh =
        |internal, peers: usize, bitmap_block_size, al_extents, data_blocks: u64| MetaInput {
            internal,
            peers,
            params: MetaParams {
                max_peers: u8::try_from(peers.max(1)).expect("at most 3"),
                bitmap_block_size,
                al_extents,
            },
            data_disk_len: data_blocks * BLOCK_SIZE as u64,
            patches: Vec::new(),
        };
    let mut seeds = vec![
        ("fresh_internal".to_string(), fresh(true, 1, 4096, 1237, 64)),
        ("fresh_external_3_peers".to_string(), fresh(false, 3, 65536, 7, 65536)),
        ("fresh_no_peer".to_string(), fresh(true, 0, 1 << 20, 6433, 300)),
    ];
    let base = fresh(true, 2, 4096, 61, 40_000);
    let (crashed, stopped) = primary_history(&base);
    seeds.push(("crashed_primary".to_string(), crashed));
    seeds.push(("clean_stop".to_string(), stopped));
    seeds
        .into_iter()
        .map(|(name, input)| {
            let bytes = input.encode();
            assert_eq!(MetaInput::parse(&bytes).as_ref(), Some(&input), "seed {name} reads back");
            (name, bytes)
        })
        .collect()
}

/// `base` after a primary's writes (crashed before a clean stop), and after its clean stop.
fn primary_history(base: &MetaInput) -> (MetaInput, MetaInput) {
    let (disk, mut store, _) = base.create().expect("the base geometry is valid");
    let fresh = disk.snapshot();
    let data_size = store.layout().data_size;
    let mut superblock = store.superblock().clone();
    superblock.flags.insert(MetaFlags::PRIMARY_IND | MetaFlags::CONSISTENT);
    superblock.uuids.current = 0x1234_5678_9abc_def1;
    superblock.uuids.history[0] = 0x4;
    superblock.peers[0].bitmap_uuid = 0x4;
    store.write_superblock(&superblock).expect("write the superblock");

    let mut bitmaps = vec![DirtyBitmap::new(data_size, base.params.bitmap_block_size); 2];
    let mut log = ActivityLog::new(base.params.al_extents);
    for (offset, len) in [(0, 8 << 20), (20 << 20, 4096), (100 << 20, 1 << 20)] {
        let extents = extents_for(offset, len).expect("a non-empty range");
        if let AlPrepared::Transaction(update) = log.prepare(extents.clone()).expect("room") {
            store.write_al_update(&update, &bitmaps).expect("write the transaction");
            log.commit(update);
        }
        bitmaps[0].set_range(offset, len);
        store.write_bitmap(0, &bitmaps[0]).expect("write the bitmap");
        log.release(extents);
    }
    let crashed = MetaInput { patches: patches(&fresh, &disk), ..base.clone() };
    store.clean_shutdown(&superblock, &mut bitmaps, &mut log).expect("a clean stop");
    let stopped = MetaInput { patches: patches(&fresh, &disk), ..base.clone() };
    (crashed, stopped)
}

/// The patches that turn `before` into what `disk` holds now: per changed block, the bytes from
/// its first to its last change.
fn patches(before: &[u8], disk: &MemDisk) -> Vec<Patch> {
    let after = disk.snapshot();
    let blocks = after.len() / BLOCK_SIZE;
    (0..blocks)
        .filter_map(|index| {
            let range = index * BLOCK_SIZE..(index + 1) * BLOCK_SIZE;
            let (old, new) = (&before[range.clone()], &after[range]);
            let first = (0..BLOCK_SIZE).find(|&i| old[i] != new[i])?;
            let last = (0..BLOCK_SIZE).rev().find(|&i| old[i] != new[i])?;
            Some(Patch {
                block_from_end: u16::try_from(blocks - 1 - index)
                    .expect("metadata is near the end"),
                offset: u16::try_from(first).expect("within a block"),
                seal: true,
                bytes: new[first..=last].to_vec(),
            })
        })
        .collect()
}

/// The README's resource file, and one that sets every key.
fn resource_files() -> Vec<(String, String)> {
    let readme = include_str!("../../../README.md");
    let start = readme.find("```toml\n").expect("the README has a resource file") + 8;
    let end = start + readme[start..].find("```").expect("a closed block");
    let every_key = r#"name = "r0"
protocol = "A"
quorum = "off"
on_no_quorum = "io-error"
on_suspended_primary_outdated = "force-secondary"
ping_interval_ms = 100
ping_timeout_ms = 1000
peer_stall_timeout_ms = 5000
after_sb_0pri = "discard-least-changes"
after_sb_1pri = "consensus"
after_sb_2pri = "disconnect"
secret = "a long shared secret"
bitmap_block_size = 65536
al_extents = 7
resync_rate_max_kib = 4096
resync_rate_min_kib = 100
on_congestion = "pull-ahead"
congestion_fill_kib = 1024
csums_resync = true
frontend = "nbd"
logical_block_size = 4096
[[node]]
name = "alpha"
id = 3
address = "127.0.0.1:7789"
disk = "/var/lib/blkrepl/alpha.img"
meta_disk = "/var/lib/blkrepl/alpha.meta"
nbd = "127.0.0.1:10809"
metrics_address = "127.0.0.1:9942"
[[node]]
name = "beta"
id = 0
address = "[::1]:7790"
disk = "/dev/vdb"
frontend = "ublk"
ublk_id = 7
ublk_queues = 2
ublk_depth = 64
"#;
    vec![("readme".into(), readme[start..end].to_string()), ("every_key".into(), every_key.into())]
}

fn requests() -> Vec<Request> {
    vec![
        Request::Status,
        Request::Primary { force: true },
        Request::Secondary,
        Request::Connect { discard_my_data: false },
        Request::Disconnect,
        Request::Down,
        Request::Adjust,
        Request::NewCurrentUuid { clear_bitmap: true },
        Request::Verify,
        Request::Invalidate,
        Request::Events { statistics: false },
    ]
}

/// NBD protocol numbers (the NBD project's proto.md).
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const FIXED_NEWSTYLE_NO_ZEROES: u32 = 3;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const FLAG_FUA: u16 = 1;
const FLAG_NO_HOLE: u16 = 2;

fn option(out: &mut Vec<u8>, option: u32, payload: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&u32::try_from(payload.len()).expect("short").to_be_bytes());
    out.extend_from_slice(payload);
}

/// The payload of `OPT_INFO`/`OPT_GO`: the export name, then the information items asked for
/// (export size and flags, block sizes).
fn info_request(name: &[u8]) -> Vec<u8> {
    let mut payload = u32::try_from(name.len()).expect("short").to_be_bytes().to_vec();
    payload.extend_from_slice(name);
    payload.extend_from_slice(&[0, 2, 0, 0, 0, 3]);
    payload
}

fn request(out: &mut Vec<u8>, kind: u16, flags: u16, offset: u64, len: u32) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&0x1000_u64.wrapping_add(out.len() as u64).to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    if kind == CMD_WRITE {
        out.extend(std::iter::repeat_n(0xcd, len as usize));
    }
}

/// Client sessions: a modern client's (GO, then every command), an old one's (LIST, INFO, an
/// unsupported option, EXPORT_NAME), an aborted handshake, and requests the server refuses.
fn nbd_sessions() -> Vec<(&'static str, Vec<u8>)> {
    let flags = FIXED_NEWSTYLE_NO_ZEROES.to_be_bytes().to_vec();

    let mut go = flags.clone();
    option(&mut go, OPT_GO, &info_request(b"disk"));
    request(&mut go, CMD_WRITE, 0, 0, 4096);
    request(&mut go, CMD_READ, 0, 0, 4096);
    request(&mut go, CMD_WRITE, FLAG_FUA, 8192, 512);
    request(&mut go, CMD_FLUSH, 0, 0, 0);
    request(&mut go, CMD_TRIM, 0, 4096, 4096);
    request(&mut go, CMD_WRITE_ZEROES, FLAG_NO_HOLE, 0, 65536);
    request(&mut go, CMD_DISC, 0, 0, 0);

    let mut old = 1u32.to_be_bytes().to_vec();
    option(&mut old, OPT_LIST, &[]);
    option(&mut old, OPT_INFO, &info_request(b""));
    option(&mut old, OPT_STRUCTURED_REPLY, &[]);
    option(&mut old, OPT_EXPORT_NAME, b"disk");
    request(&mut old, CMD_READ, 0, 512, 1024);
    request(&mut old, CMD_DISC, 0, 0, 0);

    let mut abort = flags.clone();
    option(&mut abort, OPT_ABORT, &[]);

    let mut refused = flags;
    option(&mut refused, OPT_GO, &info_request(b"other"));
    option(&mut refused, OPT_GO, &info_request(b"disk"));
    request(&mut refused, CMD_READ, 0, 1, 512);
    request(&mut refused, CMD_WRITE, 0, 1 << 20, 512);
    request(&mut refused, 7, 0, 0, 512);
    request(&mut refused, CMD_WRITE, 4, 0, 512);
    request(&mut refused, CMD_DISC, 0, 0, 0);

    vec![("go", go), ("export_name", old), ("abort", abort), ("refused", refused)]
}
