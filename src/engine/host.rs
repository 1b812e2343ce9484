//! What the engine asks of the machine it runs on: fresh randomness and the boot id. Kept out of
//! the replica, which takes both as inputs so a simulated run replays.

use std::io::Read;

/// The machine's boot id, zero if the kernel does not say (the replica then assumes a restart:
/// see `Attached::boot_id`).
pub(super) fn machine_boot_id() -> [u8; 16] {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let hex: String = text.trim().chars().filter(|c| *c != '-').collect();
    let mut id = [0u8; 16];
    if hex.len() != 32 {
        tracing::warn!("no boot id from the kernel: an unclean stop counts as a machine restart (its disk cache lost)");
        return id;
    }
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0);
    }
    id
}

/// A fresh random value for generation UUIDs.
pub(crate) fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    random_bytes(&mut bytes);
    u64::from_le_bytes(bytes)
}

/// Fresh random bytes (the handshake's nonces).
pub(crate) fn random_bytes(buf: &mut [u8]) {
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("the kernel's random source /dev/urandom must be readable");
}
