//! Who is talking: device ids and keys, the proof a device gives on every connection, and the
//! server's signatures on what a device must trust.
//!
//! - A device holds an Ed25519 key pair (ring). Its id is the first 16 bytes of SHA-256 of its
//!   public key, so an id cannot be claimed without the key.
//! - On every connection the device signs [`connection_proof_message`]: a domain label followed
//!   by keying material exported from the TLS 1.3 session (RFC 5705/8446 exporter). The material
//!   is unique to that TLS session, so a recorded proof is worthless on any other connection, and
//!   a man in the middle (who would hold a different session) cannot forward it.
//! - The server signs plans with its own Ed25519 key ([`Signed`]); the client pins that key next
//!   to the server's TLS certificate and checks every plan before acting on it. Each signature
//!   covers a domain label as well, so a signature made for one purpose can't be reused for another.

use std::fmt;

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::frame::{FrameError, decode_body};

/// Bytes of an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Bytes of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Bytes of keying material a connection proof signs.
pub const EXPORTER_LEN: usize = 32;
/// The TLS exporter label of connection proofs.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-fedtune-device-auth";

/// Why a key or signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The key bytes are not a valid key.
    #[error("invalid key: {0}")]
    InvalidKey(&'static str),
    /// A signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// The signed bytes are not the expected message.
    #[error("signed message is malformed: {0}")]
    Malformed(#[from] FrameError),
}

/// A device's identity: 16 bytes derived from its public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeviceId(pub [u8; 16]);

impl DeviceId {
    /// The id of the device holding `public_key`.
    pub fn of_key(public_key: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, public_key);
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest.as_ref()[..16]);
        Self(id)
    }

    /// Parses the 32-hex-digit form [`fmt::Display`] writes.
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = hex_decode(text)?;
        Some(Self(bytes.try_into().ok()?))
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex_encode(&self.0))
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({self})")
    }
}

/// An Ed25519 signing key (a device's or the server's), kept as its PKCS#8 document so it can be
/// stored and reloaded.
pub struct SigningKey {
    pkcs8: Vec<u8>,
    pair: Ed25519KeyPair,
}

impl SigningKey {
    /// A fresh key from the system's secure random source.
    pub fn generate() -> Result<Self, AuthError> {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| AuthError::InvalidKey("key generation failed"))?;
        Self::from_pkcs8(pkcs8.as_ref())
    }

    /// The key whose 32-byte Ed25519 seed is `seed`. For simulations and tests that need the
    /// same device ids on every run; a real device uses [`Self::generate`].
    pub fn from_seed(seed: &[u8; 32]) -> Result<Self, AuthError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| AuthError::InvalidKey("not an Ed25519 seed"))?;
        // The PKCS#8 v2 document ring itself writes (RFC 8410: OneAsymmetricKey with the
        // public key), so the key stores and reloads like a generated one.
        const PREFIX: [u8; 16] = [
            0x30, 0x53, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        const MIDDLE: [u8; 5] = [0xa1, 0x23, 0x03, 0x21, 0x00];
        let mut pkcs8 = PREFIX.to_vec();
        pkcs8.extend_from_slice(seed);
        pkcs8.extend_from_slice(&MIDDLE);
        pkcs8.extend_from_slice(pair.public_key().as_ref());
        Self::from_pkcs8(&pkcs8)
    }

    /// Loads a key from its PKCS#8 document.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, AuthError> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8)
            .map_err(|_| AuthError::InvalidKey("not an Ed25519 PKCS#8 key"))?;
        Ok(Self {
            pkcs8: pkcs8.to_vec(),
            pair,
        })
    }

    /// The PKCS#8 document, to store.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public key.
    pub fn public_key(&self) -> PublicKey {
        let mut key = [0u8; PUBLIC_KEY_LEN];
        key.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(key)
    }

    /// Signs `message` under the domain `label`.
    pub fn sign(&self, label: &[u8], message: &[u8]) -> Vec<u8> {
        self.pair.sign(&labelled(label, message)).as_ref().to_vec()
    }

    /// Signs a serialisable value: the signature covers its encoded bytes.
    pub fn sign_value<T: Serialize>(
        &self,
        label: &'static [u8],
        value: &T,
    ) -> Result<Signed<T>, FrameError> {
        let body = bincode::serde::encode_to_vec(value, bincode::config::standard())
            .map_err(|e| FrameError::Encode(e.to_string()))?;
        let signature = self.sign(label, &body);
        Ok(Signed {
            body,
            signature,
            _value: std::marker::PhantomData,
        })
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(public {})", hex_encode(&self.public_key().0))
    }
}

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; PUBLIC_KEY_LEN]);

impl PublicKey {
    /// Parses 64 hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        Some(Self(hex_decode(text)?.try_into().ok()?))
    }

    /// Checks `signature` on `message` under `label`.
    pub fn verify(&self, label: &[u8], message: &[u8], signature: &[u8]) -> Result<(), AuthError> {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(&labelled(label, message), signature)
            .map_err(|_| AuthError::BadSignature)
    }

    /// The device id of this key.
    pub fn device_id(&self) -> DeviceId {
        DeviceId::of_key(&self.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex_encode(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A value with the server's signature over its encoded bytes. The receiver decodes the value
/// only after the signature verifies ([`Signed::verify`]).
#[derive(Serialize, Deserialize)]
pub struct Signed<T> {
    body: Vec<u8>,
    signature: Vec<u8>,
    #[serde(skip)]
    _value: std::marker::PhantomData<fn() -> T>,
}

impl<T> Clone for Signed<T> {
    fn clone(&self) -> Self {
        Self {
            body: self.body.clone(),
            signature: self.signature.clone(),
            _value: std::marker::PhantomData,
        }
    }
}

impl<T> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signed({} bytes)", self.body.len())
    }
}

impl<T: DeserializeOwned> Signed<T> {
    /// Verifies the signature with the pinned `key` under `label`, then decodes the value.
    pub fn verify(&self, key: &PublicKey, label: &[u8]) -> Result<T, AuthError> {
        key.verify(label, &self.body, &self.signature)?;
        Ok(decode_body(&self.body)?)
    }

    /// The signed bytes (for tests that tamper with them).
    pub fn body_mut(&mut self) -> &mut Vec<u8> {
        &mut self.body
    }
}

/// Domain label of round plans.
pub const PLAN_LABEL: &[u8] = b"fedtune plan v1";
/// Domain label of connection proofs.
pub const CONNECTION_LABEL: &[u8] = b"fedtune connection v1";

/// The bytes a device signs to prove its key on one connection: the TLS exporter output of that
/// connection. (The label is added by [`SigningKey::sign`].)
pub fn connection_proof_message(exporter: &[u8; EXPORTER_LEN]) -> Vec<u8> {
    exporter.to_vec()
}

fn labelled(label: &[u8], message: &[u8]) -> Vec<u8> {
    // Length-prefixing the label keeps (label, message) pairs unambiguous.
    let mut out = Vec::with_capacity(8 + label.len() + message.len());
    out.extend_from_slice(&(label.len() as u64).to_le_bytes());
    out.extend_from_slice(label);
    out.extend_from_slice(message);
    out
}

/// Lower-case hex of `bytes`.
pub fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses lower- or upper-case hex; `None` on odd length or a non-hex digit.
pub fn hex_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_keys_are_stable_and_reload() {
        let a = SigningKey::from_seed(&[7; 32]).unwrap();
        let b = SigningKey::from_seed(&[7; 32]).unwrap();
        let c = SigningKey::from_seed(&[8; 32]).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        assert_ne!(a.public_key(), c.public_key());
        let reloaded = SigningKey::from_pkcs8(a.pkcs8()).unwrap();
        assert_eq!(reloaded.public_key(), a.public_key());
        let sig = reloaded.sign(PLAN_LABEL, b"x");
        a.public_key().verify(PLAN_LABEL, b"x", &sig).unwrap();
    }

    #[test]
    fn signatures_bind_label_and_bytes() {
        let key = SigningKey::generate().unwrap();
        let public = key.public_key();
        let sig = key.sign(PLAN_LABEL, b"hello");
        public.verify(PLAN_LABEL, b"hello", &sig).unwrap();
        assert_eq!(
            public.verify(CONNECTION_LABEL, b"hello", &sig),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            public.verify(PLAN_LABEL, b"hellO", &sig),
            Err(AuthError::BadSignature)
        );
        let reloaded = SigningKey::from_pkcs8(key.pkcs8()).unwrap();
        assert_eq!(reloaded.public_key(), public);
    }

    #[test]
    fn signed_values_verify_or_refuse() {
        let key = SigningKey::generate().unwrap();
        let mut signed = key
            .sign_value(PLAN_LABEL, &(7u64, "plan".to_string()))
            .unwrap();
        assert_eq!(
            signed.verify(&key.public_key(), PLAN_LABEL).unwrap(),
            (7, "plan".into())
        );
        let other = SigningKey::generate().unwrap();
        assert!(signed.verify(&other.public_key(), PLAN_LABEL).is_err());
        signed.body_mut()[0] ^= 1;
        assert_eq!(
            signed.verify(&key.public_key(), PLAN_LABEL).unwrap_err(),
            AuthError::BadSignature
        );
    }

    #[test]
    fn ids_and_hex() {
        let key = SigningKey::generate().unwrap().public_key();
        let id = key.device_id();
        assert_eq!(DeviceId::parse(&id.to_string()), Some(id));
        assert_eq!(PublicKey::parse(&key.to_string()), Some(key));
        assert_eq!(hex_decode("0g"), None);
        assert_eq!(hex_decode("abc"), None);
    }
}
