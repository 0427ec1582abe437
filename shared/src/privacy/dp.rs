//! Differential privacy of one run as the server applies it each round: clip every client's
//! update ([`super::clipping`]), average with equal weights, add Gaussian noise to the sum
//! ([`super::gaussian`]) and record the round in the [`super::accountant`], which reports the
//! run's ε for the configured δ after every round.
//!
//! Equal weights because the noise is calibrated to one client's largest influence on the sum,
//! the clipping norm; sample-count weights would let one client's weight, and so its influence,
//! grow without bound.
//!
//! In [`NoiseMode::Distributed`] (under secure aggregation, where the server never sees one
//! update) the clipping and the noise move to the devices: each applies [`DistributedNoise`]
//! to its own update before masking it, and the server only divides the unmasked sum by the
//! number of devices in it and records the round ([`DpMechanism::record_round`]).

use std::time::Instant;

use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::accountant::{Conversion, RdpAccountant};
use super::clipping::{ClipNorm, Clipper, clip_l2};
use super::gaussian::{NoiseMode, add_gaussian_noise, distributed_share_std};

/// How many of its noise share's standard deviations a device's value may stray beyond the
/// clipping norm before the secure sum's quantizer would cut it: `P(|N(0, 1)| > 8)` is about
/// 1.2e-15, so no value of any device in any round is cut in practice (a cut value would shrink
/// the noise the guarantee counts on). Configurations must give the quantizer that much room
/// ([`DistributedNoise::value_bound`]).
pub const NOISE_TAIL_STDS: f64 = 8.0;

/// How a round's devices are chosen, which decides the sampling amplification the accountant
/// may count on. Amplification by subsampling holds only when every device's presence in a
/// round is random and independent of what it holds; devices taken in the order they ask are
/// not a random sample, so they earn none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// The first devices to ask get the round: each round is accounted as if it held every
    /// device of the population (sampling rate 1).
    #[default]
    FirstCome,
    /// Every device is in a round independently with probability `q = cohort / population`
    /// (Poisson sampling, decided by a keyed hash devices cannot predict or retry against); the
    /// accountant composes at rate `q`. The cohort cap can only leave devices out, never add
    /// one, so no device is in a round with probability above `q`.
    Poisson,
}

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
    /// How rounds pick their devices (the daemon's first-come order by default).
    #[serde(default)]
    pub selection: Selection,
    /// The clients a round samples from; with [`Selection::Poisson`] a round's sampling rate
    /// is `cohort / population` (1 when the population is not larger).
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
    /// The rate at which [`Selection::Poisson`] samples each device to fill `cohort` places in
    /// expectation: `cohort / population`, at most 1.
    pub fn poisson_rate(&self, cohort: usize) -> f64 {
        (cohort as f64 / self.population as f64).min(1.0)
    }

    /// What each device adds in [`NoiseMode::Distributed`] when at least `min_clients` devices'
    /// shares are in every sum the server can unmask, at the configured (first round's) norm.
    pub fn distributed_noise(&self, min_clients: usize) -> DistributedNoise {
        DistributedNoise::new(self.clip.norm, self.noise_multiplier, min_clients)
    }

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

/// What one device does to its update in [`NoiseMode::Distributed`], as a secure plan carries
/// it: clip the whole update vector to L2 norm `clip_norm`, then add `N(0, noise_std²)` to every
/// value, drawn from randomness the server cannot know ([`Self::apply`]).
///
/// `noise_std = z · clip_norm / √min_clients`: any `n ≥ min_clients` devices' shares add up to a
/// standard deviation `z · clip_norm · √(n / min_clients) ≥ z · clip_norm` on the sum, the
/// central mechanism's. The guarantee assumes the devices in the sum add their shares (a device
/// that skips its own weakens it by its share).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DistributedNoise {
    /// `C`: the L2 norm a device's update is clipped to.
    pub clip_norm: f64,
    /// Standard deviation of the noise each device adds to every value.
    pub noise_std: f64,
    /// The fewest devices whose shares are in any sum the server can unmask (what `noise_std`
    /// is calibrated to; the server refuses a sum of fewer).
    pub min_clients: usize,
}

impl DistributedNoise {
    /// The shares for noise multiplier `z` at norm `clip_norm` when at least `min_clients`
    /// (at least 1) devices are in every sum.
    pub fn new(clip_norm: f64, noise_multiplier: f64, min_clients: usize) -> Self {
        let min_clients = min_clients.max(1);
        Self {
            clip_norm,
            noise_std: distributed_share_std(noise_multiplier * clip_norm, min_clients),
            min_clients,
        }
    }

    /// Checks what a device is asked to do (it comes from the server): a positive, finite norm
    /// and noise, and at least one device.
    ///
    /// # Errors
    ///
    /// [`DpError::Invalid`] otherwise.
    pub fn validate(&self) -> Result<(), DpError> {
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !(positive(self.clip_norm) && positive(self.noise_std) && self.min_clients > 0) {
            return Err(DpError::Invalid(format!(
                "distributed noise: clip norm {}, noise std {}, {} clients",
                self.clip_norm, self.noise_std, self.min_clients
            )));
        }
        Ok(())
    }

    /// The standard deviation on a sum of `clients` devices' shares.
    pub fn sum_std(&self, clients: usize) -> f64 {
        self.noise_std * (clients as f64).sqrt()
    }

    /// How far from zero a device's clipped and noised value may go before it counts as an
    /// outlier: `clip_norm + NOISE_TAIL_STDS · noise_std` (every value of a vector of norm
    /// `C` is within `[-C, C]`). The secure sum's clipping range must be at least this.
    pub fn value_bound(&self) -> f64 {
        self.clip_norm + NOISE_TAIL_STDS * self.noise_std
    }

    /// Clips `update` to [`Self::clip_norm`] and adds this device's noise share; returns the
    /// update's norm before clipping (non-finite values count as 0, see [`clip_l2`]).
    pub fn apply(&self, update: &mut [f32], rng: &mut impl RngCore) -> f64 {
        let norm = clip_l2(update, self.clip_norm);
        add_gaussian_noise(update, self.noise_std, rng);
        norm
    }
}

/// What DP did in one round, kept with the round's summary.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoundPrivacy {
    /// The norm updates were clipped to.
    pub clip_norm: f64,
    /// Standard deviation of the noise on the sum, `z · C` (in distributed mode the least the
    /// devices' shares add up to: `device_noise_std · √n` for `n` devices in the sum).
    pub noise_std: f64,
    /// With distributed noise: the standard deviation each device added (`None`: central).
    pub device_noise_std: Option<f64>,
    /// Clients whose updates were clipped (0 in distributed mode: the server never sees an
    /// update's norm).
    pub clipped: usize,
    /// ε of the run so far, for [`Self::delta`].
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
    /// Seconds the server spent on DP this round: clipping, noise and the accountant in
    /// central mode, the accountant alone in distributed mode (no extra bytes either way).
    pub server_s: f64,
}

/// A run's DP state: the clipping norm and the accountant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpMechanism {
    config: DpConfig,
    clipper: Clipper,
    accountant: RdpAccountant,
    /// The expected cohort of a Poisson-sampled round (the daemon's plans per round); `None`
    /// where each round's sample count is its rate's numerator (the harness's uniform draw).
    cohort: Option<usize>,
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
            cohort: None,
        })
    }

    /// Accounts [`Selection::Poisson`] rounds at `cohort / population` whatever number a round
    /// ends up with: the daemon samples every device at that rate.
    pub fn with_cohort(mut self, cohort: usize) -> Self {
        self.cohort = Some(cohort);
        self
    }

    /// The sampling rate a round of `sampled` devices is accounted at (see [`Selection`]).
    pub fn sampling_rate(&self, sampled: usize) -> f64 {
        match self.config.selection {
            Selection::FirstCome => 1.0,
            Selection::Poisson => self.config.poisson_rate(self.cohort.unwrap_or(sampled)),
        }
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

    /// What each device does in [`NoiseMode::Distributed`] at the current clipping norm, when
    /// at least `min_clients` devices' shares are in every sum; `None` in central mode.
    pub fn distributed_noise(&self, min_clients: usize) -> Option<DistributedNoise> {
        (self.config.mode == NoiseMode::Distributed).then(|| {
            DistributedNoise::new(
                self.clipper.norm(),
                self.config.noise_multiplier,
                min_clients,
            )
        })
    }

    /// The round's private mean of `updates`: each clipped, summed, noised (in
    /// [`NoiseMode::Central`]; in distributed mode the clients added theirs) and divided by
    /// the number of clients. Records the round; returns the mean and what was spent.
    pub fn private_mean(
        &mut self,
        mut updates: Vec<Vec<f32>>,
        rng: &mut impl RngCore,
    ) -> (Vec<f32>, RoundPrivacy) {
        let started = Instant::now();
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
                server_s: started.elapsed().as_secs_f64(),
                ..privacy
            },
        )
    }

    /// Records one round of `sampled` clients at `clip_norm` in the accountant (for drivers
    /// that clip and noise elsewhere, e.g. under secure aggregation) and reports ε so far.
    pub fn record_round(&mut self, sampled: usize, clip_norm: f64) -> RoundPrivacy {
        let started = Instant::now();
        let q = self.sampling_rate(sampled);
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
            device_noise_std: None,
            clipped: 0,
            epsilon,
            delta: self.config.delta,
            server_s: started.elapsed().as_secs_f64(),
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
            selection: Selection::Poisson,
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

    /// Mean and standard deviation of `x`.
    fn moments(x: &[f32]) -> (f64, f64) {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = x
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        (mean, var.sqrt())
    }

    #[test]
    fn a_device_share_is_clipped_then_noised_at_the_calibrated_std() {
        // z = 1.5, C = 2, at least 9 devices: each adds std 1.5 · 2 / 3 = 1.
        let noise = DistributedNoise::new(2.0, 1.5, 9);
        assert!((noise.noise_std - 1.0).abs() < 1e-12);
        assert!((noise.sum_std(9) - 3.0).abs() < 1e-12);
        assert!((noise.value_bound() - (2.0 + NOISE_TAIL_STDS)).abs() < 1e-12);
        noise.validate().expect("valid");
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        // A long update of norm 2000, every value 2000 / √n: clipped to norm 2 first.
        let n = 40_000;
        let big = 2000.0 / (n as f32).sqrt();
        let mut update = vec![big; n];
        let norm = noise.apply(&mut update, &mut rng);
        assert!((norm - 2000.0).abs() < 1e-2, "{norm}");
        // What is left is the clipped value (2 / √n = 0.01) plus N(0, 1) noise.
        let (mean, std) = moments(&update);
        assert!((mean - 0.01).abs() < 0.02, "mean {mean}");
        assert!((std - 1.0).abs() < 0.02, "std {std}");
        // Without noise the clipped vector has exactly the clipping norm; a short update is not
        // scaled, and non-finite values count as 0.
        let exact = DistributedNoise {
            noise_std: 0.0,
            ..noise
        };
        let mut update = vec![3.0f32, 4.0, f32::NAN];
        assert_eq!(exact.apply(&mut update, &mut rng), 5.0);
        assert!((super::super::clipping::l2_norm(&update) - 2.0).abs() < 1e-6);
        let mut small = vec![0.5f32, -0.5];
        exact.apply(&mut small, &mut rng);
        assert_eq!(small, vec![0.5, -0.5]);
        assert!(exact.validate().is_err(), "a plan without noise is refused");
    }

    #[test]
    fn distributed_shares_of_enough_devices_reach_the_central_std() {
        let config = DpConfig {
            clip: ClipNorm::fixed(0.5),
            noise_multiplier: 2.0,
            mode: NoiseMode::Distributed,
            delta: 1e-5,
            selection: Selection::Poisson,
            population: 100,
        };
        let mut dp = DpMechanism::new(config).expect("valid");
        let noise = dp.distributed_noise(4).expect("distributed");
        assert_eq!(noise, config.distributed_noise(4));
        // Four devices with zero updates: the sum's noise has the central std z · C = 1.
        let mut rng = ChaCha20Rng::seed_from_u64(12);
        let mut sum = vec![0.0f32; 50_000];
        for _ in 0..4 {
            let mut share = vec![0.0f32; sum.len()];
            noise.apply(&mut share, &mut rng);
            sum.iter_mut().zip(&share).for_each(|(s, v)| *s += v);
        }
        let (_, std) = moments(&sum);
        assert!((std - 1.0).abs() < 0.02, "std {std}");
        let spent = dp.record_round(4, noise.clip_norm);
        assert!(spent.epsilon > 0.0 && spent.noise_std == 1.0);
        let central = DpMechanism::new(DpConfig {
            mode: NoiseMode::Central,
            ..config
        })
        .expect("valid");
        assert_eq!(central.distributed_noise(4), None);
    }

    #[test]
    fn first_come_rounds_earn_no_amplification_and_poisson_rounds_their_rate() {
        let config = DpConfig {
            clip: ClipNorm::fixed(1.0),
            noise_multiplier: 1.0,
            mode: NoiseMode::Central,
            selection: Selection::FirstCome,
            delta: 1e-5,
            population: 1000,
        };
        let first_come = DpMechanism::new(config).expect("valid");
        assert_eq!(first_come.sampling_rate(10), 1.0);
        let poisson = DpMechanism::new(DpConfig {
            selection: Selection::Poisson,
            ..config
        })
        .expect("valid");
        assert_eq!(poisson.sampling_rate(10), 0.01);
        // The daemon's rate is its cohort's, whatever a round ended up with.
        let daemon = poisson.clone().with_cohort(50);
        assert_eq!(daemon.sampling_rate(10), 0.05);
        assert_eq!(poisson.sampling_rate(5000), 1.0);
        // The same rounds cost more ε without amplification.
        let (mut a, mut b) = (first_come, poisson);
        for _ in 0..5 {
            a.record_round(10, 1.0);
            b.record_round(10, 1.0);
        }
        assert!(a.record_round(10, 1.0).epsilon > 10.0 * b.record_round(10, 1.0).epsilon);
    }
}
