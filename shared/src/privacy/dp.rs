//! Differential privacy of one run as the server applies it each round: clip every client's
//! update ([`super::clipping`]), average with equal weights, add Gaussian noise to the sum
//! ([`super::gaussian`]) and record the round in the [`super::accountant`], which reports the
//! run's ε for the configured δ after every round.
//!
//! Equal weights because the noise is calibrated to one client's largest influence on the sum,
//! the clipping norm; sample-count weights would let one client's weight, and so its influence,
//! grow without bound.

use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::accountant::{Conversion, RdpAccountant};
use super::clipping::{ClipNorm, Clipper};
use super::gaussian::{NoiseMode, add_gaussian_noise, distributed_share_std};

/// Differential-privacy settings, as written in a server or simulation configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpConfig {
    /// The clipping norm, fixed or adaptive.
    pub clip: ClipNorm,
    /// `z`: the noise's standard deviation on the sum is `z · C`.
    pub noise_multiplier: f64,
    /// Who adds the noise.
    #[serde(default)]
    pub mode: NoiseMode,
    /// The δ that ε is reported for (commonly below 1 / population).
    pub delta: f64,
    /// The clients a round samples from; a round's sampling rate is
    /// `clients per round / population` (1 when the population is not larger).
    pub population: u64,
}

/// Why DP settings were refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DpError {
    /// A value out of range.
    #[error("invalid differential-privacy setting: {0}")]
    Invalid(String),
}

impl DpConfig {
    /// Checks ranges.
    ///
    /// # Errors
    ///
    /// [`DpError::Invalid`] for a non-positive norm or multiplier, δ outside (0, 1), a zero
    /// population, or an adaptive quantile outside [0, 1].
    pub fn validate(&self) -> Result<(), DpError> {
        let norm_ok = self.clip.norm.is_finite()
            && self.clip.norm > 0.0
            && self.clip.adaptive.is_none_or(|a| {
                (0.0..=1.0).contains(&a.target_quantile) && a.lr.is_finite() && a.lr >= 0.0
            });
        if !norm_ok {
            return Err(DpError::Invalid("clipping norm".into()));
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return Err(DpError::Invalid("noise multiplier must be positive".into()));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(DpError::Invalid("delta must be in (0, 1)".into()));
        }
        if self.population == 0 {
            return Err(DpError::Invalid("population must be positive".into()));
        }
        Ok(())
    }
}

/// What DP did in one round, kept with the round's summary.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoundPrivacy {
    /// The norm updates were clipped to.
    pub clip_norm: f64,
    /// Standard deviation of the noise on the sum.
    pub noise_std: f64,
    /// Clients whose updates were clipped.
    pub clipped: usize,
    /// ε of the run so far, for [`Self::delta`].
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
}

/// A run's DP state: the clipping norm and the accountant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpMechanism {
    config: DpConfig,
    clipper: Clipper,
    accountant: RdpAccountant,
}

impl DpMechanism {
    /// A run's mechanism with nothing spent.
    ///
    /// # Errors
    ///
    /// See [`DpConfig::validate`].
    pub fn new(config: DpConfig) -> Result<Self, DpError> {
        config.validate()?;
        Ok(Self {
            config,
            clipper: Clipper::new(config.clip),
            accountant: RdpAccountant::default(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &DpConfig {
        &self.config
    }

    /// The standard deviation each of at least `min_clients` clients adds in
    /// [`NoiseMode::Distributed`] at the current clipping norm.
    pub fn client_noise_std(&self, min_clients: usize) -> f64 {
        distributed_share_std(
            self.config.noise_multiplier * self.clipper.norm(),
            min_clients,
        )
    }

    /// The round's private mean of `updates`: each clipped, summed, noised (in
    /// [`NoiseMode::Central`]; in distributed mode the clients added theirs) and divided by
    /// the number of clients. Records the round; returns the mean and what was spent.
    pub fn private_mean(
        &mut self,
        mut updates: Vec<Vec<f32>>,
        rng: &mut impl RngCore,
    ) -> (Vec<f32>, RoundPrivacy) {
        let n = updates.len();
        let clip_norm = self.clipper.norm();
        let norms = self.clipper.clip_round(&mut updates);
        let len = updates.first().map_or(0, Vec::len);
        let mut sum = vec![0.0f64; len];
        for u in &updates {
            sum.iter_mut().zip(u).for_each(|(s, &v)| *s += f64::from(v));
        }
        let mut mean: Vec<f32> = sum.iter().map(|&s| s as f32).collect();
        let noise_std = self.config.noise_multiplier * clip_norm;
        if self.config.mode == NoiseMode::Central {
            add_gaussian_noise(&mut mean, noise_std, rng);
        }
        let scale = 1.0 / n.max(1) as f32;
        mean.iter_mut().for_each(|v| *v *= scale);
        let privacy = self.record_round(n, clip_norm);
        (
            mean,
            RoundPrivacy {
                clipped: norms.iter().filter(|&&x| x > clip_norm).count(),
                ..privacy
            },
        )
    }

    /// Records one round of `sampled` clients at `clip_norm` in the accountant (for drivers
    /// that clip and noise elsewhere, e.g. under secure aggregation) and reports ε so far.
    pub fn record_round(&mut self, sampled: usize, clip_norm: f64) -> RoundPrivacy {
        let q = (sampled as f64 / self.config.population as f64).min(1.0);
        self.accountant.compose(q, self.config.noise_multiplier, 1);
        let (epsilon, _) = self
            .accountant
            .epsilon(self.config.delta, Conversion::Improved);
        tracing::info!(
            epsilon,
            delta = self.config.delta,
            rounds = self.accountant.steps(),
            "differential privacy spent"
        );
        RoundPrivacy {
            clip_norm,
            noise_std: self.config.noise_multiplier * clip_norm,
            clipped: 0,
            epsilon,
            delta: self.config.delta,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn private_mean_clips_noises_and_accounts() {
        let config = DpConfig {
            clip: ClipNorm::fixed(1.0),
            noise_multiplier: 1.0,
            mode: NoiseMode::Central,
            delta: 1e-5,
            population: 1000,
        };
        let mut dp = DpMechanism::new(config).expect("valid");
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let updates = vec![vec![10.0f32, 0.0], vec![0.0, 0.5], vec![0.0, 0.5]];
        let (mean, first) = dp.private_mean(updates, &mut rng);
        assert_eq!(first.clipped, 1);
        assert_eq!(mean.len(), 2);
        let (_, second) = dp.private_mean(vec![vec![0.0, 0.0]; 3], &mut rng);
        assert!(second.epsilon > first.epsilon && first.epsilon > 0.0);
        // Without noise the mean would be (1/3, 1/3); noise of std 1/3 on each.
        assert!(mean.iter().all(|m| m.is_finite()));
        let bad = DpConfig {
            delta: 0.0,
            ..config
        };
        assert!(DpMechanism::new(bad).is_err());
    }
}
