//! `z(seed, tensor, offset)`: the noise value for element `offset` of parameter tensor `tensor`
//! under `seed`, defined bit-exactly so that a phone, a server and a GPU all produce the same
//! float bits.
//!
//! # Definition
//!
//! 1. A ChaCha8 keystream (`rand_chacha::ChaCha8Rng`) keyed with the 32-byte key
//!    `seed.to_le_bytes() ‖ [0; 24]`, stream (nonce) = `tensor`. Its 32-bit words `w_0, w_1, …`
//!    are addressable directly (block counter and word position), so any chunk of any tensor
//!    is generated independently, in parallel and in any order.
//! 2. Each word yields values by integer arithmetic only, never through `exp`/`log`/`sqrt`,
//!    whose last bit differs between libm versions and GPU drivers:
//!    - [`NoiseDistribution::Binomial16`] (default): two values per word, the low half first:
//!      `z = (popcount(half) - 8) * 0.5`, a centred binomial `B(16, 1/2)` scaled to mean 0 and
//!      variance exactly 1 (`16 · 1/4 · 0.5² = 1`). The product is exact in `f32`, so no
//!      rounding happens anywhere. Its 17 levels approximate a standard normal closely enough
//!      for zeroth-order estimates, whose variance only needs `E[z zᵀ] = I`.
//!    - [`NoiseDistribution::Rademacher`]: 32 values per word, bit `i` (least significant first)
//!      gives `+1` when set, `-1` when clear.
//!
//! So element `offset` reads word `offset / values_per_word` and its part `offset %
//! values_per_word`.
//! 3. An update `w += c_1 z_1 + c_2 z_2 + …` applies its terms one after the other, each an
//!    exact product (see [`exact_coefficient`]) and one correctly rounded add ([`add_terms`]).
//!    The GPU kernel computes the same sequence, so the host and every device agree bit for bit.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Values generated per parallel task: large enough to amortise seeking the keystream, small
/// enough to balance work across cores.
const PARALLEL_CHUNK: usize = 1 << 16;

/// `(popcount(h) - 8) * 0.5` for every 16-bit `h`, computed at compile time.
static BINOMIAL16: [f32; 1 << 16] = {
    let mut table = [0.0f32; 1 << 16];
    let mut h = 0;
    while h < table.len() {
        table[h] = (h.count_ones() as i32 - 8) as f32 * 0.5;
        h += 1;
    }
    table
};

/// How keystream words become noise values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseDistribution {
    /// `(popcount(16 bits) - 8) / 2`: mean 0, variance 1, 17 levels.
    #[default]
    Binomial16,
    /// `±1` with equal probability.
    Rademacher,
}

impl NoiseDistribution {
    /// Values drawn from one 32-bit keystream word.
    pub const fn values_per_word(self) -> usize {
        match self {
            Self::Binomial16 => 2,
            Self::Rademacher => 32,
        }
    }

    /// Expands whole words: `out.len() == words.len() * values_per_word`.
    ///
    /// Binomial values come from a 256 KiB table indexed by the 16-bit half (it stays in L2):
    /// `count_ones` is a dozen instructions on x86-64 targets without POPCNT, and a table load
    /// is one.
    #[inline]
    fn expand_words(self, words: &[u32], out: &mut [f32]) {
        match self {
            Self::Binomial16 => {
                for (pair, &w) in out.chunks_exact_mut(2).zip(words) {
                    pair[0] = BINOMIAL16[(w & 0xFFFF) as usize];
                    pair[1] = BINOMIAL16[(w >> 16) as usize];
                }
            }
            Self::Rademacher => {
                for (block, &w) in out.chunks_exact_mut(32).zip(words) {
                    for (i, slot) in block.iter_mut().enumerate() {
                        // Bit set: +1, clear: -1, computed as 2·bit - 1.
                        *slot = (((w >> i) & 1) as i32 * 2 - 1) as f32;
                    }
                }
            }
        }
    }

    /// Writes the values of `word`, skipping the first `skip`, into `out` (at most
    /// `values_per_word - skip`); returns how many were written.
    #[inline(always)]
    fn expand(self, word: u32, skip: usize, out: &mut [f32]) -> usize {
        match self {
            Self::Binomial16 => {
                let halves = [word & 0xFFFF, word >> 16];
                let n = (2 - skip).min(out.len());
                for (slot, half) in out[..n].iter_mut().zip(&halves[skip..]) {
                    *slot = (half.count_ones() as i32 - 8) as f32 * 0.5;
                }
                n
            }
            Self::Rademacher => {
                let n = (32 - skip).min(out.len());
                for (i, slot) in out[..n].iter_mut().enumerate() {
                    *slot = if (word >> (skip + i)) & 1 == 1 {
                        1.0
                    } else {
                        -1.0
                    };
                }
                n
            }
        }
    }
}

/// The noise generator of one seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedNoise {
    seed: u64,
    distribution: NoiseDistribution,
}

impl SeedNoise {
    /// The generator for `seed`.
    pub fn new(seed: u64, distribution: NoiseDistribution) -> Self {
        Self { seed, distribution }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The distribution.
    pub fn distribution(&self) -> NoiseDistribution {
        self.distribution
    }

    /// The keystream of `tensor`, positioned at the word holding element `offset`.
    fn keystream(&self, tensor: u64, offset: u64) -> ChaCha8Rng {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&self.seed.to_le_bytes());
        let mut rng = ChaCha8Rng::from_seed(key);
        rng.set_stream(tensor);
        rng.set_word_pos(u128::from(
            offset / self.distribution.values_per_word() as u64,
        ));
        rng
    }

    /// Writes `z(seed, tensor, offset + i)` into `out[i]`, on the calling thread.
    pub fn fill(&self, tensor: u64, offset: u64, out: &mut [f32]) {
        let per_word = self.distribution.values_per_word();
        let mut rng = self.keystream(tensor, offset);
        let mut words = [0u32; 1024];

        // A start inside a word: finish that word first, so the rest is whole words.
        let skip = (offset % per_word as u64) as usize;
        let mut out = out;
        if skip != 0 && !out.is_empty() {
            let word: u32 = rng.random();
            let n = self.distribution.expand(word, skip, out);
            out = &mut out[n..];
        }
        let mut chunks = out.chunks_exact_mut(words.len() * per_word);
        for chunk in &mut chunks {
            rng.fill(&mut words[..]);
            self.distribution.expand_words(&words, chunk);
        }
        let rest = chunks.into_remainder();
        let whole = rest.len() / per_word;
        rng.fill(&mut words[..whole + 1]);
        let (body, tail) = rest.split_at_mut(whole * per_word);
        self.distribution.expand_words(&words[..whole], body);
        if !tail.is_empty() {
            self.distribution.expand(words[whole], 0, tail);
        }
    }

    /// [`fill`](Self::fill) split across every core. Bit-identical to it: each chunk seeks the
    /// keystream to its own start.
    pub fn fill_parallel(&self, tensor: u64, offset: u64, out: &mut [f32]) {
        out.par_chunks_mut(PARALLEL_CHUNK)
            .enumerate()
            .for_each(|(i, chunk)| {
                self.fill(tensor, offset + (i * PARALLEL_CHUNK) as u64, chunk);
            });
    }
}

/// `c` truncated to 21 significant bits (the low 3 bits of the `f32` significand cleared).
///
/// Every noise value is `k · 0.5` or `±1` with `|k| ≤ 8`, at most 3 significant bits, so the
/// product `c · z` of a truncated coefficient is exact in `f32`. That is what makes an update
/// the same bits everywhere: with nothing to round in the product, a fused multiply-add (which
/// GPU shader compilers may form without being asked) gives the same result as a multiply
/// followed by an add. The relative change of the coefficient, at most 2⁻²¹, is far below
/// anything a learning rate or perturbation scale expresses.
pub fn exact_coefficient(c: f32) -> f32 {
    f32::from_bits(c.to_bits() & !0b111)
}

/// `out[i] ← out[i] + c_k · z(seed_k, tensor, offset + i)` for each term `(seed_k, c_k)` in
/// order, with `c_k` first passed through [`exact_coefficient`], on every core.
///
/// Each term is one exact product and one correctly rounded add, so the result is defined
/// bit for bit by the terms and their order; the GPU kernel (`noise_kernel`) computes the same
/// sequence. Work goes chunk by chunk: a chunk of `out` stays in cache while every term is added
/// to it, and the noise goes through a small per-task buffer, never an array the size of `out`.
pub fn add_terms(
    distribution: NoiseDistribution,
    tensor: u64,
    offset: u64,
    terms: &[(u64, f32)],
    out: &mut [f32],
) {
    if terms.is_empty() {
        return;
    }
    out.par_chunks_mut(PARALLEL_CHUNK)
        .enumerate()
        .for_each_init(
            || vec![0.0f32; PARALLEL_CHUNK],
            |buffer, (i, chunk)| {
                let noise = &mut buffer[..chunk.len()];
                let start = offset + (i * PARALLEL_CHUNK) as u64;
                for &(seed, coefficient) in terms {
                    SeedNoise::new(seed, distribution).fill(tensor, start, noise);
                    let c = exact_coefficient(coefficient);
                    chunk
                        .iter_mut()
                        .zip(noise.iter())
                        .for_each(|(o, z)| *o += c * z);
                }
            },
        );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(noise: &SeedNoise, tensor: u64, n: usize) -> Vec<f32> {
        let mut out = vec![0.0; n];
        noise.fill(tensor, 0, &mut out);
        out
    }

    #[test]
    fn chunks_in_any_split_and_order_equal_the_whole() {
        for distribution in [NoiseDistribution::Binomial16, NoiseDistribution::Rademacher] {
            let noise = SeedNoise::new(0xFED7_u64, distribution);
            let reference = whole(&noise, 3, 10_007);
            // Odd split points land inside keystream words and ChaCha blocks.
            let cuts = [0usize, 1, 2, 31, 33, 64, 65, 1000, 4097, 9999, 10_007];
            let mut pieces: Vec<(usize, usize)> = cuts.windows(2).map(|w| (w[0], w[1])).collect();
            pieces.reverse();
            let mut assembled = vec![f32::NAN; reference.len()];
            for (start, end) in pieces {
                noise.fill(3, start as u64, &mut assembled[start..end]);
            }
            assert_eq!(
                assembled.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                reference.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{distribution:?}"
            );

            let mut parallel = vec![0.0; 300_001];
            noise.fill_parallel(3, 17, &mut parallel);
            let mut serial = vec![0.0; 300_001];
            noise.fill(3, 17, &mut serial);
            assert_eq!(parallel, serial, "{distribution:?}: parallel equals serial");
        }
    }

    #[test]
    fn values_follow_the_definition() {
        // The first keystream word of (seed 7, tensor 2), computed with rand_chacha directly.
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&7u64.to_le_bytes());
        let mut rng = ChaCha8Rng::from_seed(key);
        rng.set_stream(2);
        let word: u32 = rng.random();
        let lo = ((word & 0xFFFF).count_ones() as f32 - 8.0) / 2.0;
        let hi = ((word >> 16).count_ones() as f32 - 8.0) / 2.0;
        let z = whole(&SeedNoise::new(7, NoiseDistribution::Binomial16), 2, 2);
        assert_eq!(z, vec![lo, hi]);
        let r = whole(&SeedNoise::new(7, NoiseDistribution::Rademacher), 2, 3);
        let bit = |i: u32| if (word >> i) & 1 == 1 { 1.0 } else { -1.0 };
        assert_eq!(r, vec![bit(0), bit(1), bit(2)]);
    }

    #[test]
    fn mean_zero_variance_one_and_streams_differ() {
        let noise = SeedNoise::new(1, NoiseDistribution::Binomial16);
        let z = whole(&noise, 0, 1 << 20);
        let n = z.len() as f64;
        let mean = z.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = z.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.005, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
        assert_ne!(
            whole(&noise, 1, 64),
            whole(&noise, 0, 64),
            "tensors get their own streams"
        );
        let other = SeedNoise::new(2, NoiseDistribution::Binomial16);
        assert_ne!(whole(&other, 0, 64), whole(&noise, 0, 64), "seeds differ");
    }

    #[test]
    fn truncated_coefficients_make_every_product_exact() {
        let levels: Vec<f32> = (-8..=8).map(|k| k as f32 * 0.5).collect();
        for raw in [3e-7f32, -1.234_567e-3, 0.1, 7.77e-7, 1.0 / 3.0] {
            let c = exact_coefficient(raw);
            assert!(((c - raw) / raw).abs() <= 2f32.powi(-21));
            for &z in &levels {
                // The product in f64 is exact; it must survive the round to f32 unchanged.
                assert_eq!(f64::from(c * z), f64::from(c) * f64::from(z), "{c} * {z}");
                assert_eq!(c.mul_add(z, 0.25), c * z + 0.25, "fused equals unfused");
            }
        }
    }

    #[test]
    fn terms_apply_in_order_and_chunks_agree() {
        let terms = [(3u64, 1e-3f32), (9, -2.5e-4), (3, 7e-6)];
        for distribution in [NoiseDistribution::Binomial16, NoiseDistribution::Rademacher] {
            let base: Vec<f32> = (0..200_003).map(|i| (i % 97) as f32 * 0.01).collect();
            let mut whole = base.clone();
            add_terms(distribution, 4, 0, &terms, &mut whole);

            // By hand: one term after the other, each an exact product and a rounded add.
            let mut expected = base.clone();
            let mut z = vec![0.0f32; base.len()];
            for &(seed, c) in &terms {
                SeedNoise::new(seed, distribution).fill(4, 0, &mut z);
                let c = exact_coefficient(c);
                expected.iter_mut().zip(&z).for_each(|(w, z)| *w += c * z);
            }
            assert_eq!(whole, expected, "{distribution:?}");

            // A piece starting mid-tensor addresses the same noise.
            let mut piece = base[1000..5001].to_vec();
            add_terms(distribution, 4, 1000, &terms, &mut piece);
            assert_eq!(piece, whole[1000..5001], "{distribution:?}: offset");
        }
    }
}
