//! Generation UUIDs. Randomness is an input of the replica: the driver gives a seed at attach
//! (from the kernel's random source; the simulator from its seed), and the UUIDs follow from it
//! (splitmix64), so a simulated run replays exactly.

#[derive(Debug)]
pub struct UuidSource(u64);

impl UuidSource {
    pub fn new(seed: u64) -> UuidSource {
        UuidSource(seed)
    }

    /// The next UUID: never 0 (the "none" UUID), and the low bit clear (generation UUIDs keep
    /// it for flags, see `core::generation`).
    pub fn next(&mut self) -> u64 {
        loop {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let uuid = (z ^ (z >> 31)) & !1;
            if uuid != 0 {
                return uuid;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::UuidSource;

    #[test]
    fn uuids_differ_and_replay_from_the_seed() {
        let (mut a, mut b) = (UuidSource::new(7), UuidSource::new(7));
        let first: Vec<u64> = (0..100).map(|_| a.next()).collect();
        let again: Vec<u64> = (0..100).map(|_| b.next()).collect();
        assert_eq!(first, again);
        let mut sorted = first.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 100);
        assert!(first.iter().all(|u| *u != 0 && u & 1 == 0));
    }
}
