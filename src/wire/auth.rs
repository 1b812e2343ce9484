//! Shared-secret peer authentication (HMAC-SHA256) and the frame MACs that follow it (keyed
//! BLAKE3).
//!
//! The handshake (PROTOCOL.md, "Handshake"): the dialer sends a fresh nonce, the acceptor
//! answers with its own, the dialer proves it knows the secret, and only then does the acceptor
//! prove it too. Both proofs cover a label naming the role, both nonces, the resource and both
//! node ids, so:
//! - an acceptor reveals nothing computed from the secret to anyone who has not proven it
//!   first (no MAC over an attacker's nonce to guess the secret from offline);
//! - a proof made for one connection verifies on no other: a dialer's proof names the node it
//!   dialed, so an attacker who relays a real node's dial to a third node gets a proof that
//!   node rejects; a proof cannot be reflected either (the roles' labels differ).
//!
//! Both sides then derive one key per direction from the same transcript, and every later
//! frame carries a MAC under it over its sequence number and bytes ([`super::mac::FrameMac`], keyed
//! BLAKE3), or on a TLS link is encrypted under it ([`super::seal::FrameSeal`]): a frame
//! changed, injected, dropped, replayed or reordered on the path fails the next check.
//!
//! On a TLS link the transcript also holds a value exported from the TLS session (its
//! channel binding), so the proofs and keys belong to that one TLS session: a man in the middle
//! who ends one TLS session with each side has two different bindings, and neither side's
//! proof verifies on the other.
//!
//! The nonces must come from a CSPRNG and never repeat; that is the caller's job (this module
//! has no randomness, so it stays testable).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::mac::FrameMac;
use super::seal::{FrameSeal, Protection};

type HmacSha256 = Hmac<Sha256>;


/// Fewest bytes a shared secret may have: a secret short enough to guess makes every proof
/// above worthless.
pub const MIN_SECRET_LEN: usize = 16;

/// Which side of the connection made a proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Dialer,
    Acceptor,
}

impl Role {
    fn proof_label(self) -> &'static [u8] {
        match self {
            Role::Dialer => b"blkrepl/2 dialer proof",
            Role::Acceptor => b"blkrepl/2 acceptor proof",
        }
    }
}

/// What both sides of one handshake know once the nonces are exchanged.
#[derive(Debug, Clone, Copy)]
pub struct Transcript<'a> {
    pub resource: &'a str,
    pub dialer_nonce: [u8; 32],
    pub acceptor_nonce: [u8; 32],
    pub dialer: u8,
    pub acceptor: u8,
    /// On a TLS link, the value both ends exported from their TLS session.
    pub channel: Option<[u8; 32]>,
}

impl Transcript<'_> {
    /// The MAC state keyed with `secret` after `label` and the transcript. Every field is
    /// fixed-size or length-prefixed, so the input decodes one way only.
    fn keyed(&self, secret: &[u8], label: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
        mac.update(&[label.len() as u8]);
        mac.update(label);
        mac.update(&self.dialer_nonce);
        mac.update(&self.acceptor_nonce);
        mac.update(&[self.resource.len() as u8]);
        mac.update(self.resource.as_bytes());
        mac.update(&[self.dialer, self.acceptor]);
        if let Some(channel) = &self.channel {
            mac.update(&[1]);
            mac.update(channel);
        }
        mac
    }

    /// The proof `role` sends on this connection.
    pub fn proof(&self, secret: &[u8], role: Role) -> [u8; 32] {
        self.keyed(secret, role.proof_label()).finalize().into_bytes().into()
    }

    /// Whether `mac` is the proof `role` must send on this connection. Compares in constant
    /// time, so timing leaks nothing about the expected proof.
    pub fn verify(&self, secret: &[u8], role: Role, mac: &[u8; 32]) -> bool {
        self.keyed(secret, role.proof_label()).verify_slice(mac).is_ok()
    }

    /// What protects the frames of this connection once both proofs verified: (what this side
    /// sends with, what it receives with), for a side in `role`. Frames are encrypted on a TLS
    /// link (one with a channel binding), MACed on a plain one.
    pub fn protection(&self, secret: &[u8], role: Role) -> (Protection, Protection) {
        let key = |label: &[u8]| -> [u8; 32] { self.keyed(secret, label).finalize().into_bytes().into() };
        let [from_dialer, from_acceptor] = match self.channel {
            Some(_) => [&b"blkrepl/2 sealed frames from the dialer"[..], b"blkrepl/2 sealed frames from the acceptor"]
                .map(|label| Protection::Sealed(FrameSeal::new(key(label)))),
            None => [&b"blkrepl/2 frames from the dialer"[..], b"blkrepl/2 frames from the acceptor"]
                .map(|label| Protection::Mac(FrameMac::new(&key(label)))),
        };
        match role {
            Role::Dialer => (from_dialer, from_acceptor),
            Role::Acceptor => (from_acceptor, from_dialer),
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"correct horse battery staple";

    fn transcript() -> Transcript<'static> {
        Transcript { resource: "r0", dialer_nonce: [7; 32], acceptor_nonce: [9; 32], dialer: 2, acceptor: 0, channel: None }
    }

    fn macs(t: &Transcript, role: Role) -> (FrameMac, FrameMac) {
        match t.protection(SECRET, role) {
            (Protection::Mac(tx), Protection::Mac(rx)) => (tx, rx),
            other => panic!("a plain link's frames are MACed: {other:?}"),
        }
    }

    #[test]
    fn a_proof_verifies_for_its_role_and_connection_only() {
        let t = transcript();
        let proof = t.proof(SECRET, Role::Dialer);
        assert!(t.verify(SECRET, Role::Dialer, &proof));
        assert!(!t.verify(SECRET, Role::Acceptor, &proof), "reflected as the other role");
        assert!(!t.verify(b"another secret of some length", Role::Dialer, &proof), "secret");
        let changed = [
            Transcript { dialer_nonce: [8; 32], ..t },
            Transcript { acceptor_nonce: [8; 32], ..t },
            Transcript { resource: "r1", ..t },
            Transcript { dialer: 1, ..t },
            // A relayed dial: the real node dialed node 1, the attacker shows it to node 0.
            Transcript { acceptor: 1, ..t },
            // A man in the middle: each side's TLS session is with the attacker.
            Transcript { channel: Some([1; 32]), ..t },
        ];
        for other in changed {
            assert!(!other.verify(SECRET, Role::Dialer, &proof), "{other:?}");
        }
        let mut flipped = proof;
        flipped[0] ^= 0x80;
        assert!(!t.verify(SECRET, Role::Dialer, &flipped));
    }

    #[test]
    fn frames_verify_in_order_once_and_in_their_direction_only() {
        let t = transcript();
        let (mut dialer_tx, mut dialer_rx) = macs(&t, Role::Dialer);
        let (mut acceptor_tx, mut acceptor_rx) = macs(&t, Role::Acceptor);
        let first = dialer_tx.seal(&[b"header", b"payload"]);
        let second = dialer_tx.seal(&[b"header", b"payload"]);
        assert_ne!(first, second, "the sequence number is in every MAC");
        let mut replayed = acceptor_rx.clone();
        assert!(acceptor_rx.open(&[b"header", b"payload"], &first));
        assert!(!acceptor_rx.clone().open(&[b"header", b"payload"], &first), "replayed");
        assert!(!acceptor_rx.clone().open(&[b"header", b"payloaD"], &second), "changed");
        assert!(acceptor_rx.open(&[b"header", b"payload"], &second));
        assert!(!replayed.open(&[b"header", b"payload"], &second), "dropped the frame before it");
        let back = acceptor_tx.seal(&[b"x"]);
        assert!(!dialer_tx.clone().open(&[b"x"], &back), "a frame sent back in the other direction");
        assert!(dialer_rx.open(&[b"x"], &back));
    }

    #[test]
    fn a_tls_link_seals_its_frames_under_keys_of_its_own_session() {
        let tls = Transcript { channel: Some([1; 32]), ..transcript() };
        let (Protection::Sealed(mut tx), Protection::Sealed(mut rx)) = tls.protection(SECRET, Role::Dialer) else {
            panic!("a TLS link's frames are sealed");
        };
        let (_, Protection::Sealed(mut acceptor_rx_of_another_session)) =
            Transcript { channel: Some([2; 32]), ..tls }.protection(SECRET, Role::Acceptor)
        else {
            unreachable!()
        };
        let mut frame = b"payload".to_vec();
        let tag = tx.seal(b"h", &mut frame);
        frame.extend_from_slice(&tag);
        assert_eq!(acceptor_rx_of_another_session.open(b"h", &mut frame.clone()), None, "another TLS session");
        assert_eq!(rx.open(b"h", &mut frame.clone()), None, "sent back the other way");
        let (_, Protection::Sealed(mut acceptor_rx)) = tls.protection(SECRET, Role::Acceptor) else { unreachable!() };
        assert_eq!(acceptor_rx.open(b"h", &mut frame), Some(7));
        assert_eq!(&frame[..7], b"payload");
    }

    /// A known answer computed independently (Python's `hmac` over the documented encoding)
    /// pins the construction, so a change that breaks interoperability cannot slip in.
    #[test]
    fn known_answer() {
        let proof = transcript().proof(SECRET, Role::Dialer);
        let hex: String = proof.iter().map(|byte| format!("{byte:02x}")).collect();
        assert_eq!(hex, KNOWN_DIALER_PROOF);
    }

    const KNOWN_DIALER_PROOF: &str = "548b8de09676a3896881d1e0ef1c0fb57d14066d6239e0409f59f28258bdb32f";
}
