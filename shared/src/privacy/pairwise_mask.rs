//! The masks of secure aggregation: X25519 key agreement between two clients, HKDF-SHA256 of the
//! shared secret into a 32-byte seed, and ChaCha20 expanding a seed into a vector of `u32`
//! masks added or subtracted modulo 2^32.
//!
//! Two clients `u < v` derive the same seed `s_uv`; `u` adds `PRG(s_uv)` and `v` subtracts it,
//! so the pair's masks cancel in the sum. A client's self mask `PRG(b_u)` comes from a random
//! seed of its own. X25519 secrets are static (x25519-dalek's `StaticSecret`) because a dropped
//! client's masking key must be rebuilt by the server from Shamir shares and used again with
//! each surviving neighbour's public key; ring only offers single-use ephemeral keys.

use rand::{CryptoRng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use ring::hkdf;
use x25519_dalek::{PublicKey, StaticSecret};

/// A 32-byte seed of a mask.
pub type MaskSeed = [u8; 32];

/// An X25519 key pair whose secret can be shared and used again.
#[derive(Clone)]
pub struct KeyPair {
    secret: StaticSecret,
    public: [u8; 32],
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("KeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A fresh key pair from `rng`.
    pub fn generate(rng: &mut impl CryptoRng) -> Self {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        Self::from_secret_bytes(bytes)
    }

    /// The key pair of a secret (clamped by X25519 as usual), e.g. one rebuilt from shares.
    pub fn from_secret_bytes(bytes: [u8; 32]) -> Self {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret).to_bytes();
        Self { secret, public }
    }

    /// The secret's bytes, to be Shamir-shared.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// The 32-byte key both sides derive: HKDF-SHA256 of the X25519 shared secret, salted with
    /// `session` and bound to `purpose` and the unordered pair `(a, b)`. `None` when the peer's
    /// key is a low-order point (the shared secret would be all zeros and known to anyone).
    pub fn agree(
        &self,
        peer_public: &[u8; 32],
        session: u64,
        purpose: &[u8],
        a: u32,
        b: u32,
    ) -> Option<[u8; 32]> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer_public));
        if !shared.was_contributory() {
            return None;
        }
        let (lo, hi) = (a.min(b), a.max(b));
        let mut info = Vec::with_capacity(purpose.len() + 8);
        info.extend_from_slice(purpose);
        info.extend_from_slice(&lo.to_le_bytes());
        info.extend_from_slice(&hi.to_le_bytes());
        Some(hkdf_32(shared.as_bytes(), session, &info))
    }
}

/// HKDF-SHA256 (RFC 5869) of `ikm` into 32 bytes, salted with the session.
pub fn hkdf_32(ikm: &[u8], session: u64, info: &[u8]) -> [u8; 32] {
    let mut salt_bytes = b"fedtune secagg v1".to_vec();
    salt_bytes.extend_from_slice(&session.to_le_bytes());
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt_bytes);
    let info = [info];
    let mut out = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's 255·32-byte limit, so expand and fill cannot fail.
    if let Ok(okm) = salt.extract(ikm).expand(&info, hkdf::HKDF_SHA256) {
        let _ = okm.fill(&mut out);
    }
    out
}

/// Whether a mask is added or subtracted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskSign {
    /// `target += PRG(seed)`.
    Add,
    /// `target -= PRG(seed)`.
    Subtract,
}

impl MaskSign {
    /// The sign client `me` gives the pairwise mask shared with `peer`: the smaller id adds.
    pub fn pairwise(me: u32, peer: u32) -> Self {
        if me < peer { Self::Add } else { Self::Subtract }
    }

    /// The opposite sign.
    pub fn flip(self) -> Self {
        match self {
            Self::Add => Self::Subtract,
            Self::Subtract => Self::Add,
        }
    }
}

/// Adds or subtracts `PRG(seed)` into `target` modulo 2^32, expanding the seed with ChaCha20
/// block by block (no allocation of the whole mask).
pub fn apply_mask(target: &mut [u32], seed: &MaskSeed, sign: MaskSign) {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    // Little-endian words from the key stream, so every platform expands the same mask.
    let mut bytes = [0u8; 256];
    for chunk in target.chunks_mut(bytes.len() / 4) {
        let bytes = &mut bytes[..chunk.len() * 4];
        rng.fill_bytes(bytes);
        let words = bytes
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        match sign {
            MaskSign::Add => chunk
                .iter_mut()
                .zip(words)
                .for_each(|(t, m)| *t = t.wrapping_add(m)),
            MaskSign::Subtract => chunk
                .iter_mut()
                .zip(words)
                .for_each(|(t, m)| *t = t.wrapping_sub(m)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_derive_the_same_seed_and_masks_cancel() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let (u, v) = (KeyPair::generate(&mut rng), KeyPair::generate(&mut rng));
        let s_uv = u.agree(&v.public(), 9, b"mask", 3, 7).expect("agree");
        let s_vu = v.agree(&u.public(), 9, b"mask", 7, 3).expect("agree");
        assert_eq!(s_uv, s_vu);
        assert_ne!(u.agree(&v.public(), 10, b"mask", 3, 7), Some(s_uv));
        let rebuilt = KeyPair::from_secret_bytes(u.secret_bytes());
        assert_eq!(rebuilt.agree(&v.public(), 9, b"mask", 3, 7), Some(s_uv));

        let x: Vec<u32> = (0..1000).collect();
        let mut masked = x.clone();
        apply_mask(&mut masked, &s_uv, MaskSign::pairwise(3, 7));
        assert_ne!(masked, x);
        apply_mask(&mut masked, &s_vu, MaskSign::pairwise(7, 3));
        assert_eq!(masked, x);
    }

    #[test]
    fn low_order_peer_keys_are_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let u = KeyPair::generate(&mut rng);
        assert_eq!(u.agree(&[0u8; 32], 1, b"mask", 0, 1), None);
    }
}
