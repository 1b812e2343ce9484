//! Encryption of every frame on a TLS link: AES-256-GCM per frame under a key per direction.
//!
//! A TLS link runs the TLS 1.3 handshake (rustls, see `crate::tls`) for the key agreement and
//! then protects each blkrepl frame itself, as QUIC protects its packets: the header stays in
//! clear (the receiver needs its length) and is authenticated as associated data, the payload
//! is encrypted, a 16-byte tag follows. The nonce is the frame's sequence number in its
//! direction (counted, never sent), so a frame changed, injected, dropped, replayed or
//! reordered on the path fails the next open, and no nonce is ever used twice under one key.
//!
//! Why not TLS records: a link has one thread sending and one receiving, and a rustls
//! connection is one object that both would have to lock around every record; sealing frames
//! per direction keeps the two halves independent, and seals each frame in the one buffer it is
//! sent from (a 1 MiB frame is one AEAD call, not 64 records).
//!
//! AES-GCM must not encrypt too much under one key: after [`RATCHET_BYTES`] a direction's key
//! is replaced by one derived from it (both sides count the same bytes, so no message says
//! when), far below the amount at which GCM's confidentiality bound weakens (about 2^40 bytes
//! per key for a 2^-57 margin).

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

use super::mac::FrameMac;

/// Bytes of the tag after every sealed frame.
pub const SEAL_TAG_LEN: usize = 16;

/// Payload bytes a direction encrypts under one key before it moves to the next.
pub const RATCHET_BYTES: u64 = 1 << 34;

/// What protects the frames of one direction of a link after its handshake.
// Both variants are large (a keyed BLAKE3 state, an AES key schedule); there is one per
// direction of a link, made once at its handshake, so their size matters nowhere.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Protection {
    /// `transport = "plain"` with a secret: frames in clear, each with a MAC.
    Mac(FrameMac),
    /// A TLS link: frames encrypted and authenticated.
    Sealed(FrameSeal),
}

/// One direction's AEAD state: the key, the next sequence number, and what is encrypted under
/// the key so far.
pub struct FrameSeal {
    material: [u8; 32],
    key: LessSafeKey,
    seq: u64,
    under_key: u64,
}

impl Clone for FrameSeal {
    fn clone(&self) -> FrameSeal {
        FrameSeal { key: Self::key(&self.material), ..*self }
    }
}

impl std::fmt::Debug for FrameSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameSeal").field("seq", &self.seq).finish_non_exhaustive()
    }
}

impl FrameSeal {
    /// The direction keyed with `material` (32 bytes no one else holds, derived per link and
    /// direction).
    pub fn new(material: [u8; 32]) -> FrameSeal {
        FrameSeal { key: Self::key(&material), material, seq: 0, under_key: 0 }
    }

    fn key(material: &[u8; 32]) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, material).expect("32 bytes is AES-256's key length"))
    }

    /// Encrypts `payload` in place as the next frame, with `header` authenticated beside it;
    /// returns the tag that follows it on the wire.
    pub fn seal(&mut self, header: &[u8], payload: &mut [u8]) -> [u8; SEAL_TAG_LEN] {
        let nonce = self.next_nonce(payload.len());
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), payload)
            .expect("a frame is far below AES-GCM's limit per message");
        self.ratchet_if_due();
        tag.as_ref().try_into().expect("AES-GCM tags are 16 bytes")
    }

    /// Decrypts the next frame in place: `sealed` is its encrypted payload followed by the tag.
    /// Returns the payload's length, or `None` when it does not open (changed, injected,
    /// dropped, replayed, or sealed under another key); `sealed` then holds nothing usable.
    pub fn open(&mut self, header: &[u8], sealed: &mut [u8]) -> Option<usize> {
        let len = sealed.len().checked_sub(SEAL_TAG_LEN)?;
        let nonce = self.next_nonce(len);
        let opened = self.key.open_in_place(nonce, Aad::from(header), sealed).ok().map(|plain| plain.len());
        self.ratchet_if_due();
        opened
    }

    fn next_nonce(&mut self, len: usize) -> Nonce {
        let mut nonce = [0; NONCE_LEN];
        nonce[NONCE_LEN - 8..].copy_from_slice(&self.seq.to_be_bytes());
        self.seq += 1;
        self.under_key += len as u64;
        Nonce::assume_unique_for_key(nonce)
    }

    fn ratchet_if_due(&mut self) {
        if self.under_key >= RATCHET_BYTES {
            self.material = blake3::keyed_hash(&self.material, b"blkrepl/2 next frame key").into();
            self.key = Self::key(&self.material);
            self.under_key = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_opens_once_in_order_under_its_key_and_header_only() {
        let (mut tx, mut rx) = (FrameSeal::new([3; 32]), FrameSeal::new([3; 32]));
        let header = b"header";
        let mut first = b"first payload".to_vec();
        let tag = tx.seal(header, &mut first);
        assert_ne!(&first[..], b"first payload", "encrypted");
        first.extend_from_slice(&tag);
        let mut second = b"second".to_vec();
        let tag2 = tx.seal(header, &mut second);
        second.extend_from_slice(&tag2);

        // Each failed open on a clone: a receiver drops the link at the first one.
        assert_eq!(rx.clone().open(b"headeR", &mut first.clone()), None, "the header is authenticated");
        let mut other_key = FrameSeal::new([4; 32]);
        assert_eq!(other_key.open(header, &mut first.clone()), None, "another key");
        let mut skipped = FrameSeal::new([3; 32]);
        assert_eq!(skipped.open(header, &mut second.clone()), None, "the frame before it dropped");
        let mut flipped = first.clone();
        flipped[0] ^= 1;
        assert_eq!(FrameSeal::new([3; 32]).open(header, &mut flipped), None, "a flipped bit");

        let mut opened = first.clone();
        assert_eq!(rx.open(header, &mut opened), Some(13));
        assert_eq!(&opened[..13], b"first payload");
        assert_eq!(rx.open(header, &mut first.clone()), None, "replayed");
        assert_eq!(rx.open(b"x", &mut [0u8; 3]), None, "shorter than a tag");
    }

    #[test]
    fn both_sides_move_to_the_next_key_after_the_same_frame() {
        let (mut tx, mut rx) = (FrameSeal::new([5; 32]), FrameSeal::new([5; 32]));
        let first_key = tx.material;
        // Pretend most of a key's budget is spent on both sides, as a long-lived link does.
        tx.under_key = RATCHET_BYTES - 10;
        rx.under_key = RATCHET_BYTES - 10;
        for round in 0..3 {
            let mut payload = vec![round; 16];
            let tag = tx.seal(b"h", &mut payload);
            payload.extend_from_slice(&tag);
            assert_eq!(rx.open(b"h", &mut payload), Some(16), "round {round}");
            assert_eq!(&payload[..16], &[round; 16]);
        }
        assert_ne!(tx.material, first_key, "the key moved on");
        assert_eq!(tx.material, rx.material);
        assert_eq!(tx.under_key, 32);
    }
}
