//! Generation UUIDs: which history of writes a disk's data belongs to.
//!
//! The decisions made with them (resync direction, split brain) live in `core`; this module only
//! defines the values and how they compare. See `/work/shared/SEMANTICS.md`.

/// The current UUID of freshly created metadata. Two just-created disks hold no data anyone
/// relies on, which lets the connect logic recognise them.
pub const UUID_JUST_CREATED: u64 = 4;

/// Bit 0 of a UUID: the node was primary when it generated the UUID. It tells split-brain
/// recovery who wrote, and is not part of the UUID's identity.
pub const UUID_PRIMARY_BIT: u64 = 1;

/// Whether two UUIDs name the same generation (the primary bit is ignored).
pub fn same(a: u64, b: u64) -> bool {
    (a ^ b) & !UUID_PRIMARY_BIT == 0
}

/// Where generation `uuid` is in `history` (older current UUIDs, most recent first, 0 = empty):
/// 0 for the generation left last. Never for 0, which names no generation.
pub fn history_position(history: &[u64; 4], uuid: u64) -> Option<usize> {
    history.iter().position(|h| *h != 0 && uuid != 0 && same(*h, uuid))
}

/// The node's own generations: the current one and the most recent older ones.
///
/// Per-peer bitmap UUIDs live in the superblock's peer slots, next to the bitmaps they describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationUuids {
    pub current: u64,
    /// Older current UUIDs, most recent first; 0 = empty.
    pub history: [u64; 4],
}

impl GenerationUuids {
    /// The UUIDs of freshly created metadata.
    pub fn just_created() -> GenerationUuids {
        GenerationUuids { current: UUID_JUST_CREATED, history: [0; 4] }
    }

    pub fn is_just_created(&self) -> bool {
        same(self.current, UUID_JUST_CREATED)
    }

    /// Whether `uuid` is one of this node's past generations (not its current one).
    pub fn left(&self, uuid: u64) -> bool {
        history_position(&self.history, uuid).is_some()
    }

    /// Whether this node held generation `uuid`: its current one or one it left.
    pub fn held(&self, uuid: u64) -> bool {
        same(uuid, self.current) || self.left(uuid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generation_is_found_in_history_by_identity_and_never_as_zero() {
        let history = [0x20, 0x11, 0, 0x40];
        assert_eq!(history_position(&history, 0x21), Some(0), "the primary bit is no part of it");
        assert_eq!(history_position(&history, 0x10), Some(1));
        assert_eq!(history_position(&history, 0x40), Some(3));
        assert_eq!(history_position(&history, 0), None, "an empty entry names nothing");
        assert_eq!(history_position(&history, 0x30), None);
        let uuids = GenerationUuids { current: 0x50, history };
        assert!(uuids.left(0x10) && !uuids.left(0x50) && uuids.held(0x50) && !uuids.held(0x30));
    }

    #[test]
    fn same_ignores_primary_bit_only() {
        assert!(same(0x1234_5670, 0x1234_5671));
        assert!(same(7, 7));
        assert!(!same(0x1234_5670, 0x1234_5672));
        assert!(
            GenerationUuids { current: UUID_JUST_CREATED | 1, history: [0; 4] }.is_just_created()
        );
        assert!(!GenerationUuids { current: 8, history: [0; 4] }.is_just_created());
    }
}
