//! The superblock: identity, geometry, generation UUIDs and flags of the local disk.
//!
//! It lives in two 4 KiB slots written alternately, each with a sequence number and a crc32c
//! over the whole block. An update overwrites the older slot only, so a torn write leaves the
//! other slot, the previous version, intact. Reading takes the checksummed slot with the highest
//! sequence number.
//!
//! The magic, version, checksum and sequence number sit at the same place in every format
//! version, so even a version we cannot parse can be recognised as intact (and refused) rather
//! than mistaken for a torn block.
//!
//! ```text
//!   0 magic "BLKRPLMD"  8 version u32  12 crc32c u32 (of the block, this field as 0)
//!  16 seq u64          24 flags u32   28 node id u8, internal u8, max peers u8, peer count u8
//!  32 data size u64    40 bitmap block size u32  44 al extents u32
//!  48 current uuid u64 56 history 4 x u64
//!  88 resource name: length u8, 63 bytes
//! 152 peer slots: 31 x (node id u8, has crc u8, zero u16, bitmap crc u32, bitmap uuid u64)
//! 648 highest election term u64  656 term of the data's generation u64
//! 664 last barrier epoch of that term's primary held durably u64
//! 672 boot id of the machine at the last attach, 16 bytes (zero: unknown)
//! 688 id of the last FUA write of the next epoch held durably u64 (zero: none)
//! 696 zero to the end
//! ```

use super::layout::{MetaParams, MAX_PEERS};
use super::uuids::GenerationUuids;
use super::{block_crc, le, Block, MetaError, BLOCK_SIZE, SEQ_LIMIT};

pub(super) const MAGIC: &[u8; 8] = b"BLKRPLMD";
/// 2: bitmap pages carry a checksum and their index (511 words of bits each, not 512).
pub const FORMAT_VERSION: u32 = 2;
pub(super) const CRC_OFFSET: usize = 12;
const NAME_OFFSET: usize = 88;
const PEERS_OFFSET: usize = 152;
const PEER_SIZE: usize = 16;
const TERMS_OFFSET: usize = 648;
const BOOT_ID_OFFSET: usize = 672;
const FUA_OF_DATA_OFFSET: usize = 688;
/// Longest resource name, in bytes.
pub const MAX_RESOURCE_NAME: usize = 63;
/// Node ids are 0..32: up to 32 nodes per resource.
pub const MAX_NODE_ID: u8 = 31;

/// Persistent state flags.
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct MetaFlags(u32);

impl MetaFlags {
    /// The data is a consistent image (possibly old): not in the middle of a resync.
    pub const CONSISTENT: MetaFlags = MetaFlags(1 << 0);
    /// The data was UpToDate when last known.
    pub const WAS_UP_TO_DATE: MetaFlags = MetaFlags(1 << 1);
    /// Set while primary; found set at attach, it means the node crashed as primary.
    pub const PRIMARY_IND: MetaFlags = MetaFlags(1 << 2);
    /// The activity log holds nothing that needs a resync.
    pub const AL_CLEAN: MetaFlags = MetaFlags(1 << 3);
    /// A full sync must run (or resume) at the next connect.
    pub const FULL_SYNC_PENDING: MetaFlags = MetaFlags(1 << 4);
    /// The peer was marked outdated (fencing), so we may promote without it.
    pub const PEER_OUTDATED: MetaFlags = MetaFlags(1 << 5);
    /// An online verify found blocks of this node that differ from a peer's: the data stays
    /// Outdated (an in-sync connection does not make it UpToDate) until a resync or a forced
    /// promotion settles which copy is right.
    pub const VERIFY_DIFFERS: MetaFlags = MetaFlags(1 << 6);
    /// This node stopped without a clean shutdown as a secondary: writes in its activity log's
    /// extents may have been lost with its disk's cache, so it is resynced there from every
    /// data peer before the flag clears.
    pub const CACHE_LOST: MetaFlags = MetaFlags(1 << 7);
    /// The data's term (`Terms::of_data`) is this node's own election's, and its data holds
    /// every write of that term's stream it made: set with PRIMARY_IND at a promotion, dropped
    /// with the write that gives the data another term, by a resync into this node, and by a
    /// failed flush (the page cache may have dropped writes). A primary whose process died with
    /// the machine up then holds its whole stream (see `Replica::position_after_crash`).
    pub const OWN_STREAM: MetaFlags = MetaFlags(1 << 8);

    const NAMES: [(MetaFlags, &'static str); 9] = [
        (MetaFlags::CONSISTENT, "CONSISTENT"),
        (MetaFlags::WAS_UP_TO_DATE, "WAS_UP_TO_DATE"),
        (MetaFlags::PRIMARY_IND, "PRIMARY_IND"),
        (MetaFlags::AL_CLEAN, "AL_CLEAN"),
        (MetaFlags::FULL_SYNC_PENDING, "FULL_SYNC_PENDING"),
        (MetaFlags::PEER_OUTDATED, "PEER_OUTDATED"),
        (MetaFlags::VERIFY_DIFFERS, "VERIFY_DIFFERS"),
        (MetaFlags::CACHE_LOST, "CACHE_LOST"),
        (MetaFlags::OWN_STREAM, "OWN_STREAM"),
    ];

    pub const fn empty() -> MetaFlags {
        MetaFlags(0)
    }

    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Unknown bits are kept, so an older release does not silently drop a newer one's flags.
    pub const fn from_bits_retain(bits: u32) -> MetaFlags {
        MetaFlags(bits)
    }

    pub const fn contains(self, other: MetaFlags) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn insert(&mut self, other: MetaFlags) {
        self.0 |= other.0;
    }

    pub fn remove(&mut self, other: MetaFlags) {
        self.0 &= !other.0;
    }

    pub fn set(&mut self, other: MetaFlags, on: bool) {
        if on {
            self.insert(other);
        } else {
            self.remove(other);
        }
    }
}

impl std::ops::BitOr for MetaFlags {
    type Output = MetaFlags;
    fn bitor(self, rhs: MetaFlags) -> MetaFlags {
        MetaFlags(self.0 | rhs.0)
    }
}

impl std::fmt::Debug for MetaFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut rest = self.0;
        let mut set = f.debug_set();
        for (flag, name) in MetaFlags::NAMES {
            if self.contains(flag) {
                set.entry(&format_args!("{name}"));
                rest &= !flag.0;
            }
        }
        if rest != 0 {
            set.entry(&format_args!("{rest:#x}"));
        }
        set.finish()
    }
}

/// What this node remembers about one peer. Slot `i` owns bitmap area `i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSlot {
    pub node_id: u8,
    /// Our current UUID when the bitmap for this peer started collecting changes; 0 if none.
    pub bitmap_uuid: u64,
    /// crc32c of the peer's whole on-disk bitmap, written at clean shutdown and cleared before
    /// the on-disk bitmap changes again: lets attach detect a damaged bitmap.
    pub bitmap_crc: Option<u32>,
    /// The peer left cleanly (it said so before going down) and has not been connected since:
    /// not counted as a quorum voter while every other voter is reachable. Kept here so a
    /// restart does not forget it (an older release ignores the byte: stricter, never looser).
    pub departed: bool,
}

/// Bit of a peer slot's flags byte: see [`PeerSlot::departed`].
const PEER_DEPARTED: u8 = 1;

/// The logical content of the superblock (the slot's sequence number is the store's business).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub resource: String,
    pub node_id: u8,
    pub internal: bool,
    pub data_size: u64,
    pub params: MetaParams,
    /// At most `params.max_peers`.
    pub peers: Vec<PeerSlot>,
    pub uuids: GenerationUuids,
    pub terms: Terms,
    /// The machine's boot id (`/proc/sys/kernel/random/boot_id`) when this metadata was last
    /// attached, zero if unknown: after an unclean stop, the same id means only the process
    /// died and the disk's volatile cache kept what it had completed; another means the
    /// machine restarted and the cache may have dropped it.
    pub boot_id: [u8; 16],
    pub flags: MetaFlags,
}

/// Election terms (see `replica/election.rs`). Metadata written before terms existed reads as
/// term 0 for both, which every election and comparison treats as the oldest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Terms {
    /// The highest election term this node voted in, won or heard of: it gives no vote in an
    /// election of that term or lower.
    pub highest: u64,
    /// The term of the election that made the primary whose generation this node's data
    /// carries: of two diverged copies, the one of the later election is kept.
    pub of_data: u64,
    /// How far into that primary's stream this node's data is durable: the last barrier epoch
    /// it acknowledged (a secondary). Of two copies of the same term, the one further in holds
    /// every flushed write the other holds.
    pub epoch_of_data: u64,
    /// Then the id of the last FUA write of the next epoch it holds durably with every FUA
    /// write before it (0: none; see `wire::DataPosition`).
    pub fua_of_data: u64,
}

impl Superblock {
    /// Checks what the format cannot represent or what makes no sense.
    pub fn validate(&self) -> Result<(), MetaError> {
        let invalid = |what: String| Err(MetaError::InvalidParams(what));
        let name = &self.resource;
        if name.is_empty() || name.len() > MAX_RESOURCE_NAME || name.contains('\0') {
            return invalid(format!(
                "resource name {name:?} must be 1..={MAX_RESOURCE_NAME} bytes without NUL"
            ));
        }
        self.params.validate()?;
        if self.node_id > MAX_NODE_ID {
            return invalid(format!("node id {} is above {MAX_NODE_ID}", self.node_id));
        }
        if self.peers.len() > usize::from(self.params.max_peers) {
            return invalid(format!(
                "{} peers, but the metadata has room for {}",
                self.peers.len(),
                self.params.max_peers
            ));
        }
        for (i, peer) in self.peers.iter().enumerate() {
            if peer.node_id > MAX_NODE_ID
                || peer.node_id == self.node_id
                || self.peers[..i].iter().any(|p| p.node_id == peer.node_id)
            {
                return invalid(format!(
                    "peer node id {} is out of range, this node's own, or listed twice",
                    peer.node_id
                ));
            }
        }
        if self.data_size == 0 || self.data_size % BLOCK_SIZE as u64 != 0 {
            return invalid(format!(
                "data size {} is not a positive multiple of 4 KiB",
                self.data_size
            ));
        }
        Ok(())
    }

    /// The peer slot for node `node_id`, if this node keeps one.
    pub fn peer_slot(&self, node_id: u8) -> Option<usize> {
        self.peers.iter().position(|p| p.node_id == node_id)
    }

    /// The block written to a slot with sequence number `seq`.
    pub fn encode(&self, seq: u64) -> Result<Block, MetaError> {
        self.validate()?;
        let mut b = [0u8; BLOCK_SIZE];
        b[..8].copy_from_slice(MAGIC);
        le::put_u32(&mut b, 8, FORMAT_VERSION);
        le::put_u64(&mut b, 16, seq);
        le::put_u32(&mut b, 24, self.flags.bits());
        b[28] = self.node_id;
        b[29] = u8::from(self.internal);
        b[30] = self.params.max_peers;
        b[31] = self.peers.len() as u8;
        le::put_u64(&mut b, 32, self.data_size);
        le::put_u32(&mut b, 40, self.params.bitmap_block_size);
        le::put_u32(&mut b, 44, self.params.al_extents);
        le::put_u64(&mut b, 48, self.uuids.current);
        for (i, h) in self.uuids.history.iter().enumerate() {
            le::put_u64(&mut b, 56 + i * 8, *h);
        }
        b[NAME_OFFSET] = self.resource.len() as u8;
        b[NAME_OFFSET + 1..][..self.resource.len()].copy_from_slice(self.resource.as_bytes());
        for (i, peer) in self.peers.iter().enumerate() {
            let at = PEERS_OFFSET + i * PEER_SIZE;
            b[at] = peer.node_id;
            b[at + 1] = u8::from(peer.bitmap_crc.is_some());
            b[at + 2] = if peer.departed { PEER_DEPARTED } else { 0 };
            le::put_u32(&mut b, at + 4, peer.bitmap_crc.unwrap_or(0));
            le::put_u64(&mut b, at + 8, peer.bitmap_uuid);
        }
        le::put_u64(&mut b, TERMS_OFFSET, self.terms.highest);
        le::put_u64(&mut b, TERMS_OFFSET + 8, self.terms.of_data);
        le::put_u64(&mut b, TERMS_OFFSET + 16, self.terms.epoch_of_data);
        le::put_u64(&mut b, FUA_OF_DATA_OFFSET, self.terms.fua_of_data);
        b[BOOT_ID_OFFSET..][..16].copy_from_slice(&self.boot_id);
        let crc = block_crc(&b, CRC_OFFSET);
        le::put_u32(&mut b, CRC_OFFSET, crc);
        Ok(b)
    }
}

/// What one slot holds.
#[derive(Debug)]
enum Slot {
    /// No magic: never written (or not ours).
    Empty,
    /// Magic but a bad checksum: a torn or damaged write.
    Torn,
    /// Intact, but a format this release does not know.
    Unsupported {
        version: u32,
        seq: u64,
    },
    /// Intact and in our format, yet nonsensical. Never a crash artifact.
    Invalid {
        seq: u64,
        detail: String,
    },
    Valid {
        superblock: Superblock,
        seq: u64,
    },
}

impl Slot {
    fn read(b: &Block) -> Slot {
        if &b[..8] != MAGIC {
            return Slot::Empty;
        }
        if le::u32_at(b, CRC_OFFSET) != block_crc(b, CRC_OFFSET) {
            return Slot::Torn;
        }
        let seq = le::u64_at(b, 16);
        let version = le::u32_at(b, 8);
        if version != FORMAT_VERSION {
            return Slot::Unsupported { version, seq };
        }
        if seq >= SEQ_LIMIT {
            return Slot::Invalid { seq, detail: format!("sequence number {seq}, beyond 2^63 updates") };
        }
        match decode(b) {
            Ok(superblock) => Slot::Valid { superblock, seq },
            Err(detail) => Slot::Invalid { seq, detail },
        }
    }

    /// The sequence number of an intact slot.
    fn seq(&self) -> Option<u64> {
        match self {
            Slot::Empty | Slot::Torn => None,
            Slot::Unsupported { seq, .. } | Slot::Invalid { seq, .. } | Slot::Valid { seq, .. } => {
                Some(*seq)
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Slot::Empty => "no superblock".into(),
            Slot::Torn => "a torn or damaged superblock (bad checksum)".into(),
            Slot::Unsupported { version, .. } => format!("format version {version}"),
            Slot::Invalid { detail, .. } => detail.clone(),
            Slot::Valid { .. } => "a valid superblock".into(),
        }
    }
}

/// Parses a checksummed version-1 block.
fn decode(b: &Block) -> Result<Superblock, String> {
    let name_len = usize::from(b[NAME_OFFSET]);
    if name_len > MAX_RESOURCE_NAME {
        return Err(format!("resource name length {name_len}"));
    }
    let resource = std::str::from_utf8(&b[NAME_OFFSET + 1..][..name_len])
        .map_err(|_| "resource name is not UTF-8".to_string())?
        .to_string();
    let n_peers = usize::from(b[31]);
    if n_peers > usize::from(MAX_PEERS) {
        return Err(format!("{n_peers} peer slots"));
    }
    let peers = (0..n_peers)
        .map(|i| {
            let at = PEERS_OFFSET + i * PEER_SIZE;
            PeerSlot {
                node_id: b[at],
                bitmap_uuid: le::u64_at(b, at + 8),
                bitmap_crc: (b[at + 1] != 0).then(|| le::u32_at(b, at + 4)),
                departed: b[at + 2] & PEER_DEPARTED != 0,
            }
        })
        .collect();
    let mut history = [0; 4];
    for (i, h) in history.iter_mut().enumerate() {
        *h = le::u64_at(b, 56 + i * 8);
    }
    let superblock = Superblock {
        resource,
        node_id: b[28],
        internal: b[29] != 0,
        data_size: le::u64_at(b, 32),
        params: MetaParams {
            max_peers: b[30],
            bitmap_block_size: le::u32_at(b, 40),
            al_extents: le::u32_at(b, 44),
        },
        peers,
        uuids: GenerationUuids { current: le::u64_at(b, 48), history },
        terms: Terms {
            highest: le::u64_at(b, TERMS_OFFSET),
            of_data: le::u64_at(b, TERMS_OFFSET + 8),
            epoch_of_data: le::u64_at(b, TERMS_OFFSET + 16),
            fua_of_data: le::u64_at(b, FUA_OF_DATA_OFFSET),
        },
        boot_id: b[BOOT_ID_OFFSET..][..16].try_into().expect("16 bytes"),
        flags: MetaFlags::from_bits_retain(le::u32_at(b, 24)),
    };
    superblock.validate().map_err(|e| e.to_string())?;
    Ok(superblock)
}

/// The current superblock among the two slots: `(superblock, seq, slot index)`.
///
/// The intact slot with the highest sequence number decides; if it is unusable, falling back to
/// the older slot would silently undo a durable update, so that is an error. Only when no slot is
/// intact does the content of the slots decide between "nothing here" and "damaged".
pub(crate) fn pick(blocks: [&Block; 2]) -> Result<(Superblock, u64, usize), MetaError> {
    let slots = blocks.map(Slot::read);
    let Some(i) = newest_of(&slots) else {
        return match (&slots[0], &slots[1]) {
            (Slot::Empty, Slot::Empty) => Err(MetaError::NoMetadata),
            (Slot::Torn, Slot::Empty) | (Slot::Empty, Slot::Torn) => Err(MetaError::corrupt(
                "the only superblock is torn: metadata creation was interrupted? run \
                 `blkrepl create-md` again",
            )),
            _ => Err(MetaError::corrupt(
                "both superblock slots are damaged; the metadata must be recreated \
                 (`blkrepl create-md --force`, then a full sync)",
            )),
        };
    };
    match &slots[i] {
        Slot::Valid { superblock, seq } => Ok((superblock.clone(), *seq, i)),
        Slot::Unsupported { version, .. } => {
            Err(MetaError::UnsupportedVersion { found: *version, supported: FORMAT_VERSION })
        }
        other => Err(MetaError::corrupt(format!(
            "superblock slot {i} holds {} (the other slot holds {})",
            other.describe(),
            slots[1 - i].describe()
        ))),
    }
}

/// The intact slot with the highest sequence number, whether usable or not: the one an update
/// or an invalidation must overwrite last.
pub(crate) fn newest_intact(blocks: [&Block; 2]) -> Option<usize> {
    newest_of(&blocks.map(Slot::read))
}

fn newest_of(slots: &[Slot; 2]) -> Option<usize> {
    (0..2).filter(|&i| slots[i].seq().is_some()).max_by_key(|&i| slots[i].seq())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Superblock {
        Superblock {
            resource: "r0".into(),
            node_id: 1,
            internal: true,
            data_size: 1 << 30,
            params: MetaParams { max_peers: 3, ..MetaParams::default() },
            peers: vec![
                PeerSlot { node_id: 2, bitmap_uuid: 0xabc, bitmap_crc: Some(0), departed: true },
                PeerSlot { node_id: 0, bitmap_uuid: 0, bitmap_crc: None, departed: false },
            ],
            uuids: GenerationUuids { current: 0x1234_5679, history: [5, 6, 0, 0] },
            terms: Terms { highest: 7, of_data: 6, epoch_of_data: 5, fua_of_data: 4 },
            boot_id: [0; 16],
            flags: MetaFlags::CONSISTENT | MetaFlags::PRIMARY_IND,
        }
    }

    #[test]
    fn newest_intact_slot_wins_and_torn_falls_back() {
        let a = sample().encode(7).unwrap();
        let mut newer = sample();
        newer.flags = MetaFlags::empty();
        let b = newer.encode(8).unwrap();
        assert_eq!(pick([&a, &b]).unwrap(), (newer.clone(), 8, 1));
        assert_eq!(pick([&b, &a]).unwrap(), (newer, 8, 0));
        let mut torn = b;
        torn[1000] ^= 1;
        assert_eq!(pick([&a, &torn]).unwrap(), (sample(), 7, 0));
    }

    /// The `meta_load` fuzz target's input `regression_superblock_seq_max` (the current slot's
    /// sequence number set to u64::MAX, checksum recomputed): the store's next update
    /// overflowed it (a panic with overflow checks, a wrap to 0 without, after which the older
    /// slot won and the update was undone).
    #[test]
    fn a_sequence_number_beyond_2_63_is_corruption() {
        let zero = [0; BLOCK_SIZE];
        let older = sample().encode(3).unwrap();
        for seq in [u64::MAX, SEQ_LIMIT] {
            let exhausted = sample().encode(seq).unwrap();
            let err = pick([&exhausted, &zero]).unwrap_err();
            assert!(matches!(&err, MetaError::Corrupt { .. }) && err.to_string().contains("2^63"), "{err}");
            assert!(matches!(pick([&older, &exhausted]), Err(MetaError::Corrupt { .. })), "no fallback");
        }
        assert_eq!(pick([&sample().encode(SEQ_LIMIT - 1).unwrap(), &zero]).unwrap().1, SEQ_LIMIT - 1);
    }

    #[test]
    fn empty_torn_and_unknown_slots_give_clear_errors() {
        let zero = [0; BLOCK_SIZE];
        assert!(matches!(pick([&zero, &zero]), Err(MetaError::NoMetadata)));
        let mut torn = sample().encode(1).unwrap();
        torn[4095] = 1;
        let err = pick([&torn, &zero]).unwrap_err();
        assert!(err.to_string().contains("create-md"), "{err}");
        assert!(matches!(pick([&torn, &torn]), Err(MetaError::Corrupt { .. })));
        let mut future = sample().encode(9).unwrap();
        le::put_u32(&mut future, 8, FORMAT_VERSION + 1);
        let crc = block_crc(&future, CRC_OFFSET);
        le::put_u32(&mut future, CRC_OFFSET, crc);
        let old = sample().encode(8).unwrap();
        assert!(matches!(
            pick([&old, &future]),
            Err(MetaError::UnsupportedVersion { found, supported: FORMAT_VERSION }) if found == FORMAT_VERSION + 1
        ));
        let mut nonsense = sample().encode(10).unwrap();
        nonsense[30] = 0; // max peers 0
        let crc = block_crc(&nonsense, CRC_OFFSET);
        le::put_u32(&mut nonsense, CRC_OFFSET, crc);
        assert!(matches!(pick([&old, &nonsense]), Err(MetaError::Corrupt { .. })));
    }

    #[test]
    fn validation_refuses_what_cannot_be_stored() {
        let mut sb = sample();
        sb.resource = "x".repeat(64);
        assert!(sb.encode(1).is_err());
        let mut sb = sample();
        sb.peers.push(PeerSlot { node_id: 2, bitmap_uuid: 0, bitmap_crc: None, departed: false });
        assert!(sb.encode(1).is_err(), "duplicate peer");
        let mut sb = sample();
        sb.peers[0].node_id = 1;
        assert!(sb.encode(1).is_err(), "own node id as peer");
        let mut sb = sample();
        sb.peers.push(PeerSlot { node_id: 3, bitmap_uuid: 0, bitmap_crc: None, departed: false });
        sb.peers.push(PeerSlot { node_id: 4, bitmap_uuid: 0, bitmap_crc: None, departed: false });
        assert!(sb.encode(1).is_err(), "more peers than max_peers");
        let mut sb = sample();
        sb.data_size = 4097;
        assert!(sb.encode(1).is_err());
    }

    #[test]
    fn flags_debug_names_known_and_unknown_bits() {
        let flags = MetaFlags::AL_CLEAN | MetaFlags::from_bits_retain(1 << 20);
        assert_eq!(format!("{flags:?}"), "{AL_CLEAN, 0x100000}");
        let mut f = MetaFlags::empty();
        f.set(MetaFlags::PEER_OUTDATED, true);
        assert!(f.contains(MetaFlags::PEER_OUTDATED));
        f.set(MetaFlags::PEER_OUTDATED, false);
        assert_eq!(f, MetaFlags::empty());
    }

    prop_compose! {
        fn superblock()(
            resource in "[a-z0-9_.-]{1,63}",
            node_id in 0..=MAX_NODE_ID,
            internal in any::<bool>(),
            blocks in 1..(1u64 << 40),
            max_peers in 1..=MAX_PEERS,
            shift in 12..=20u32,
            al_extents in 7..=6433u32,
            peer_ids in prop::collection::btree_set(0..=MAX_NODE_ID, 0..=31),
            uuids in any::<(u64, [u64; 4])>(),
            terms in any::<(u64, u64, u64, u64)>(),
            boot_id in any::<[u8; 16]>(),
            flags in any::<u32>(),
            crcs in prop::collection::vec(any::<(u64, Option<u32>, bool)>(), 31),
        ) -> Superblock {
            let peers: Vec<PeerSlot> = peer_ids
                .into_iter()
                .filter(|&id| id != node_id)
                .take(usize::from(max_peers))
                .zip(crcs)
                .map(|(node_id, (bitmap_uuid, bitmap_crc, departed))| {
                    PeerSlot { node_id, bitmap_uuid, bitmap_crc, departed }
                })
                .collect();
            Superblock {
                resource,
                node_id,
                internal,
                data_size: blocks * 4096,
                params: MetaParams { max_peers, bitmap_block_size: 1 << shift, al_extents },
                peers,
                uuids: GenerationUuids { current: uuids.0, history: uuids.1 },
                terms: Terms { highest: terms.0, of_data: terms.1, epoch_of_data: terms.2, fua_of_data: terms.3 },
                boot_id,
                flags: MetaFlags::from_bits_retain(flags),
            }
        }
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(sb in superblock(), seq in 0..SEQ_LIMIT) {
            let block = sb.encode(seq).unwrap();
            let zero = [0; BLOCK_SIZE];
            prop_assert_eq!(pick([&zero, &block]).unwrap(), (sb, seq, 1));
        }

        #[test]
        fn any_single_byte_damage_is_detected(
            sb in superblock(),
            at in 0..BLOCK_SIZE,
            flip in 1..=255u8,
        ) {
            let good = sb.encode(5).unwrap();
            let mut bad = good;
            bad[at] ^= flip;
            prop_assert!(matches!(Slot::read(&bad), Slot::Empty | Slot::Torn));
            let older = sb.encode(4).unwrap();
            prop_assert_eq!(pick([&older, &bad]).unwrap(), (sb, 4, 0));
        }
    }
}
