//! The K candidate seeds of a FedKSeed run and how a client samples among them: uniformly, or
//! by FedKSeed-Pro's importance probabilities.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// FedKSeed-Pro's clipping bound `B` on recorded scalar gradients.
pub const PRO_CLIP: f32 = 1000.0;

/// The candidate seeds, derived from one run seed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedPool {
    seeds: Vec<u64>,
}

impl SeedPool {
    /// `k` seeds: the first `k` 64-bit outputs of ChaCha8 keyed with `run_seed` (little-endian,
    /// zero-padded), stream 0. Everyone who knows the run seed knows the pool.
    pub fn new(run_seed: u64, k: usize) -> Self {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&run_seed.to_le_bytes());
        let mut rng = ChaCha8Rng::from_seed(key);
        Self {
            seeds: (0..k).map(|_| rng.random()).collect(),
        }
    }

    /// K.
    pub fn len(&self) -> usize {
        self.seeds.len()
    }

    /// Whether the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.seeds.is_empty()
    }

    /// The seed at `index`.
    pub fn seed(&self, index: usize) -> Option<u64> {
        self.seeds.get(index).copied()
    }
}

/// How a client picks the seed of each local step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SeedSampling {
    /// Every seed equally likely (FedKSeed).
    Uniform,
    /// One probability per seed (FedKSeed-Pro).
    Probabilities(Vec<f32>),
}

impl SeedSampling {
    /// Draws a seed index in `0..k`.
    pub fn sample(&self, k: usize, rng: &mut impl Rng) -> usize {
        match self {
            Self::Uniform => rng.random_range(0..k),
            Self::Probabilities(p) => {
                let total: f32 = p.iter().sum();
                let mut target = rng.random::<f32>() * total;
                for (i, &pi) in p.iter().enumerate() {
                    if target < pi {
                        return i;
                    }
                    target -= pi;
                }
                p.len().saturating_sub(1)
            }
        }
    }
}

/// FedKSeed-Pro's sampling probabilities from each seed's history of raw scalar gradients.
///
/// `ψ_s = mean(|clip(history_s, -B, B)|)`, min-max normalised (`(ψ - min) / (max - min +
/// 1e-10)`), then `p = softmax(ψ_norm)`. Each history starts with one `0.0` (Qin et al., 2024).
pub fn pro_probabilities(histories: &[Vec<f32>]) -> Vec<f32> {
    let psi: Vec<f64> = histories
        .iter()
        .map(|h| {
            let n = h.len().max(1) as f64;
            h.iter()
                .map(|g| g.clamp(-PRO_CLIP, PRO_CLIP).abs() as f64)
                .sum::<f64>()
                / n
        })
        .collect();
    let min = psi.iter().copied().fold(f64::INFINITY, f64::min);
    let max = psi.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let normalised: Vec<f64> = psi
        .iter()
        .map(|p| (p - min) / (max - min + 1e-10))
        .collect();
    let top = normalised.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = normalised.iter().map(|v| (v - top).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|e| (e / sum) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_is_a_function_of_the_run_seed() {
        assert_eq!(SeedPool::new(5, 16), SeedPool::new(5, 16));
        assert_ne!(SeedPool::new(5, 16), SeedPool::new(6, 16));
        assert_eq!(SeedPool::new(5, 4096).len(), 4096);
    }

    #[test]
    fn pro_probabilities_favour_seeds_with_large_gradients() {
        let histories = vec![
            vec![0.0],
            vec![0.0, 5.0],
            vec![0.0, -2000.0],
            vec![0.0, 1.0],
        ];
        let p = pro_probabilities(&histories);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        // Seed 2's -2000 is clipped to -1000: mean |g| = 500, the largest.
        assert!(p[2] > p[1] && p[1] > p[3] && p[3] > p[0]);
        // softmax of min-max normalised scores: ratio of extremes is e^1.
        assert!((p[2] / p[0] - std::f32::consts::E).abs() < 1e-4);
    }

    #[test]
    fn sampling_by_probabilities_follows_them() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let sampling = SeedSampling::Probabilities(vec![0.0, 0.9, 0.1]);
        let mut counts = [0usize; 3];
        for _ in 0..10_000 {
            counts[sampling.sample(3, &mut rng)] += 1;
        }
        assert_eq!(counts[0], 0);
        assert!(counts[1] > 8700 && counts[2] > 800, "{counts:?}");
    }
}
