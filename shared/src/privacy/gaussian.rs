//! The Gaussian mechanism's noise: added once by the server (central DP) or in shares by every
//! client before secure aggregation (distributed DP), so that the sum carries noise of standard
//! deviation `σ = z · C` for noise multiplier `z` and clipping norm `C` either way.

use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};

/// Who adds the noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseMode {
    /// The server adds `N(0, σ²)` to the sum it sees: it must be trusted with the raw sum.
    #[default]
    Central,
    /// Each client adds `N(0, σ² / n_min)`, so that any `n_min` or more surviving clients
    /// give a sum with at least `σ²` of noise: for use with secure aggregation, where the
    /// server never sees a noiseless sum.
    Distributed,
}

/// The standard deviation one client adds in [`NoiseMode::Distributed`] so that at least
/// `min_clients` of them together reach `std` (a sum of independent Gaussians adds variances).
pub fn distributed_share_std(std: f64, min_clients: usize) -> f64 {
    std / (min_clients.max(1) as f64).sqrt()
}

/// One standard normal value (Box–Muller, from two uniform values in (0, 1]).
pub fn standard_normal(rng: &mut impl RngCore) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Adds `N(0, std²)` to every value of `x`.
pub fn add_gaussian_noise(x: &mut [f32], std: f64, rng: &mut impl RngCore) {
    if std <= 0.0 {
        return;
    }
    for v in x {
        *v = (f64::from(*v) + std * standard_normal(rng)) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn noise_has_the_requested_moments() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let mut x = vec![1.0f32; 100_000];
        add_gaussian_noise(&mut x, 2.0, &mut rng);
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = x
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!((mean - 1.0).abs() < 0.03, "mean {mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.03, "std {}", var.sqrt());
        // Ten clients' shares add up to the central standard deviation.
        let share = distributed_share_std(2.0, 10);
        assert!(((share * share * 10.0).sqrt() - 2.0).abs() < 1e-12);
    }
}
