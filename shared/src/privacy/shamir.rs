//! Shamir t-of-n secret sharing of 32-byte secrets (mask seeds and X25519 secret keys) over the
//! prime field of the Mersenne prime p = 2^61 − 1.
//!
//! Why our own: the maintained Rust crates either share over GF(2^8), which caps a secret at 255
//! shares (a SecAgg neighbourhood can be larger), or sit on an elliptic-curve stack the build does
//! not otherwise need. Sharing is short and standard: a secret is cut into five 7-byte limbs
//! (each below 2^56 < p), every limb is the constant term of its own random polynomial of degree
//! t − 1, and party `x` (a non-zero field element) receives the five polynomials' values at `x`.
//! Any t shares recover every limb by Lagrange interpolation at 0; fewer reveal nothing, since
//! for any candidate secret exactly one polynomial of degree t − 1 fits t − 1 points and it.
//! Reduction modulo a Mersenne prime is two shifts and an add, so no big-integer code is needed.

use rand::CryptoRng;
use serde::{Deserialize, Serialize};

/// The field's prime, 2^61 − 1.
pub const PRIME: u64 = (1 << 61) - 1;
/// Bytes of a shared secret.
pub const SECRET_BYTES: usize = 32;
/// Bytes per limb: 7 bytes (56 bits) always fit below [`PRIME`].
const LIMB_BYTES: usize = 7;
/// Limbs per secret: ⌈32 / 7⌉.
pub const LIMBS: usize = SECRET_BYTES.div_ceil(LIMB_BYTES);

/// One party's share of one secret: the point `x` and the five polynomial values there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// The party's evaluation point (non-zero).
    pub x: u64,
    /// The value of each limb's polynomial at `x`.
    pub y: [u64; LIMBS],
}

impl Share {
    /// Bytes of [`Self::to_bytes`].
    pub const BYTES: usize = 8 * (1 + LIMBS);

    /// Fixed little-endian layout: `x`, then the limbs.
    pub fn to_bytes(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..8].copy_from_slice(&self.x.to_le_bytes());
        for (chunk, y) in out[8..].chunks_exact_mut(8).zip(self.y) {
            chunk.copy_from_slice(&y.to_le_bytes());
        }
        out
    }

    /// Reads [`Self::to_bytes`]'s layout; `None` for a wrong length or values outside the field.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::BYTES {
            return None;
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i * 8..(i + 1) * 8]);
            u64::from_le_bytes(w)
        };
        let mut y = [0u64; LIMBS];
        for (l, v) in y.iter_mut().enumerate() {
            *v = word(l + 1);
        }
        let share = Self { x: word(0), y };
        (share.x != 0 && share.x < PRIME && y.iter().all(|&v| v < PRIME)).then_some(share)
    }
}

/// Why shares could not be made or combined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShamirError {
    /// A threshold of zero or above the number of parties.
    #[error("threshold {threshold} is not in 1..={parties}")]
    InvalidThreshold {
        /// The threshold.
        threshold: usize,
        /// The parties.
        parties: usize,
    },
    /// An evaluation point of zero, outside the field, or repeated.
    #[error("evaluation point {0} is zero, outside the field or repeated")]
    InvalidPoint(u64),
    /// Fewer shares than the threshold.
    #[error("{got} shares, {needed} needed")]
    TooFewShares {
        /// Shares given.
        got: usize,
        /// The threshold.
        needed: usize,
    },
    /// The shares interpolate to something that is no secret (inconsistent or forged shares).
    #[error("shares are inconsistent")]
    Inconsistent,
}

fn reduce(x: u128) -> u64 {
    // x = hi·2^61 + lo ≡ hi + lo (mod 2^61 − 1); two folds bring any product below 2p.
    let p = u128::from(PRIME);
    let folded = (x & p) + (x >> 61);
    let folded = (folded & p) + (folded >> 61);
    let r = folded as u64;
    if r >= PRIME { r - PRIME } else { r }
}

fn add(a: u64, b: u64) -> u64 {
    let s = a + b;
    if s >= PRIME { s - PRIME } else { s }
}

fn sub(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + PRIME - b }
}

fn mul(a: u64, b: u64) -> u64 {
    reduce(u128::from(a) * u128::from(b))
}

/// `a^(p-2)`: the inverse of a non-zero `a` by Fermat's little theorem.
fn inv(a: u64) -> u64 {
    let (mut base, mut exp, mut acc) = (a, PRIME - 2, 1u64);
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul(acc, base);
        }
        base = mul(base, base);
        exp >>= 1;
    }
    acc
}

/// A uniform field element: 61 random bits, redrawn in the rare case they equal p.
fn random_element(rng: &mut impl CryptoRng) -> u64 {
    loop {
        let v = rng.next_u64() >> 3;
        if v < PRIME {
            return v;
        }
    }
}

/// Splits `secret` into one share per point in `points` so that any `threshold` of them recover
/// it.
///
/// # Errors
///
/// [`ShamirError::InvalidThreshold`] or [`ShamirError::InvalidPoint`] (zero, ≥ p or repeated).
pub fn split(
    secret: &[u8; SECRET_BYTES],
    threshold: usize,
    points: &[u64],
    rng: &mut impl CryptoRng,
) -> Result<Vec<Share>, ShamirError> {
    if threshold == 0 || threshold > points.len() {
        return Err(ShamirError::InvalidThreshold {
            threshold,
            parties: points.len(),
        });
    }
    check_points(points.iter().copied())?;
    let mut coefficients = vec![[0u64; LIMBS]; threshold];
    for (l, chunk) in secret.chunks(LIMB_BYTES).enumerate() {
        let mut limb = [0u8; 8];
        limb[..chunk.len()].copy_from_slice(chunk);
        coefficients[0][l] = u64::from_le_bytes(limb);
        for c in coefficients.iter_mut().skip(1) {
            c[l] = random_element(rng);
        }
    }
    Ok(points
        .iter()
        .map(|&x| {
            let mut y = [0u64; LIMBS];
            for (l, v) in y.iter_mut().enumerate() {
                // Horner's rule from the highest coefficient down.
                *v = coefficients
                    .iter()
                    .rev()
                    .fold(0, |acc, c| add(mul(acc, x), c[l]));
            }
            Share { x, y }
        })
        .collect())
}

fn check_points(points: impl Iterator<Item = u64>) -> Result<(), ShamirError> {
    let mut seen = std::collections::BTreeSet::new();
    for x in points {
        if x == 0 || x >= PRIME || !seen.insert(x) {
            return Err(ShamirError::InvalidPoint(x));
        }
    }
    Ok(())
}

/// Recovers the secret from at least `threshold` shares (the first `threshold` are used).
///
/// # Errors
///
/// [`ShamirError::TooFewShares`], [`ShamirError::InvalidPoint`] for repeated points, and
/// [`ShamirError::Inconsistent`] when a limb comes out above 56 bits (shares of different
/// secrets or altered shares, detected with high probability).
pub fn combine(shares: &[Share], threshold: usize) -> Result<[u8; SECRET_BYTES], ShamirError> {
    if threshold == 0 || shares.len() < threshold {
        return Err(ShamirError::TooFewShares {
            got: shares.len(),
            needed: threshold.max(1),
        });
    }
    let used = &shares[..threshold];
    check_points(used.iter().map(|s| s.x))?;
    // Lagrange basis at 0: λ_i = Π_{j≠i} x_j / (x_j − x_i).
    let lambdas: Vec<u64> = used
        .iter()
        .enumerate()
        .map(|(i, si)| {
            let (mut num, mut den) = (1u64, 1u64);
            for (j, sj) in used.iter().enumerate() {
                if i != j {
                    num = mul(num, sj.x);
                    den = mul(den, sub(sj.x, si.x));
                }
            }
            mul(num, inv(den))
        })
        .collect();
    let mut secret = [0u8; SECRET_BYTES];
    for (l, chunk) in secret.chunks_mut(LIMB_BYTES).enumerate() {
        let limb = used
            .iter()
            .zip(&lambdas)
            .fold(0, |acc, (s, &lambda)| add(acc, mul(s.y[l], lambda)));
        if limb >> (8 * chunk.len()) != 0 {
            return Err(ShamirError::Inconsistent);
        }
        chunk.copy_from_slice(&limb.to_le_bytes()[..chunk.len()]);
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn any_threshold_subset_recovers_the_secret() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        secret[31] = 0xff;
        let points: Vec<u64> = (1..=10).collect();
        let shares = split(&secret, 4, &points, &mut rng).expect("split");
        for subset in [[0usize, 1, 2, 3], [9, 5, 2, 7], [3, 4, 8, 6]] {
            let picked: Vec<Share> = subset.iter().map(|&i| shares[i]).collect();
            assert_eq!(combine(&picked, 4).expect("combine"), secret);
        }
        assert_eq!(
            combine(&shares[..3], 4),
            Err(ShamirError::TooFewShares { got: 3, needed: 4 })
        );
    }

    #[test]
    fn shares_round_trip_and_altered_shares_do_not_recover_the_secret() {
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let secret = [42u8; 32];
        let shares = split(&secret, 3, &[1, 2, 3, 4], &mut rng).expect("split");
        let bytes = shares[0].to_bytes();
        assert_eq!(Share::from_bytes(&bytes), Some(shares[0]));
        assert_eq!(Share::from_bytes(&bytes[1..]), None);
        let mut forged = shares[2];
        forged.y[0] = add(forged.y[0], 1);
        let out = combine(&[shares[0], shares[1], forged], 3);
        assert_ne!(out, Ok(secret));
    }

    #[test]
    fn bad_parameters_are_errors() {
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let s = [1u8; 32];
        assert!(split(&s, 0, &[1, 2], &mut rng).is_err());
        assert!(split(&s, 3, &[1, 2], &mut rng).is_err());
        assert_eq!(
            split(&s, 2, &[1, 1], &mut rng),
            Err(ShamirError::InvalidPoint(1))
        );
        assert_eq!(
            split(&s, 2, &[0, 1], &mut rng),
            Err(ShamirError::InvalidPoint(0))
        );
        assert_eq!(mul(inv(12345), 12345), 1);
    }
}
