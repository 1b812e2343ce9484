//! How far a node's data goes into a primary's stream: what elections and same-generation
//! decisions compare (see `replica/election.rs` and `core::leftover_bits`).

/// A point in one primary's stream up to which a copy holds every write the stream made
/// durable: every write of the epochs its barriers closed, then the stream's FUA writes of the
/// next epoch. Ordered field by field: a further position holds every durable write of a
/// nearer one of the same term, and a later term's stream supersedes an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct DataPosition {
    /// The election term of the primary whose stream this is (0: before terms existed).
    pub term: u64,
    /// The last barrier epoch of that stream held durably; for a primary, its own open epoch
    /// (it holds everything it wrote).
    pub epoch: u64,
    /// The id of the last FUA write of epoch `epoch + 1` held durably together with every FUA
    /// write before it in the stream, 0 for none: a FUA write is acknowledged before any
    /// barrier covers it, so without it two copies that differ by an acknowledged FUA write
    /// would tie. Write ids grow along a primary's stream.
    pub fua: u64,
}
