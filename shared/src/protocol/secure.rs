//! The SecAgg+ messages of the daemon's protocol: what a plan says about a secure round
//! ([`SecureRound`]), what a device sends in each phase ([`SecAggUpload`]) and what it fetches
//! ([`SecAggDownload`]), and how a device turns its update into the vector it masks
//! ([`secure_input`]: sample-weighted, or clipped and noised with equal weights under
//! distributed differential privacy).
//!
//! ```text
//! device                                              server
//!   | <-- Plan(signed, secure = {config, id, n_max, dp}) |  round r is secure; SecAgg id u
//!   |        … local training …                          |
//!   | -- SecAgg{r, Advertise(keys)} ------------------>  |  phase 1 (counts as the report)
//!   | -- SecAggPoll{r} ------------------------------->  |  Wait until every selected device
//!   | <--------- SecAgg(NeighbourKeys) | Wait ---------  |  advertised, or the deadline
//!   | -- SecAgg{r, Shares(bundle)} ------------------->  |  phase 2
//!   | -- SecAggPoll{r} -> SecAgg(ForwardedShares) ---->  |
//!   | -- SecAgg{r, Masked(input, stats)} ------------->  |  phase 3: masked update, public stats
//!   | -- SecAggPoll{r} -> SecAgg(UnmaskRequest) ------>  |
//!   | -- SecAgg{r, Unmask(shares)} ------------------->  |  phase 4; the server unmasks the sum
//! ```
//!
//! A phase closes when every device still in the session has answered, or at the phase
//! deadline: devices that vanish are SecAgg drop-outs, tolerated up to the session's
//! threshold. Every upload is acknowledged with [`super::Response::SecAggAccepted`].

use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::message::LocalStats;
use crate::privacy::dp::DistributedNoise;
use crate::privacy::secagg::{
    ClientId, ForwardedShares, KeyAdvertisement, MaskedInput, NeighbourKeys, SecAggConfig,
    ShareBundle, UnmaskRequest, UnmaskResponse,
};
use crate::zo::round::{ClientReport, ZoRunConfig, pro_statistics};

/// The part of a plan that makes a round secure.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SecureRound {
    /// The session's settings (session = round, vector length, quantizer, degree, drop-outs).
    pub config: SecAggConfig,
    /// This device's id in the session (a device may speak only for its own).
    pub id: ClientId,
    /// The most samples a device can train on this round: a device multiplies its update by
    /// `samples / max_samples` before masking (see [`weighted_input`]).
    pub max_samples: u64,
    /// Distributed differential privacy (`[privacy.dp] mode = "distributed"`; `None`: off):
    /// the device clips its update, adds its share of the noise and masks it with weight 1
    /// instead of its sample weight (see [`secure_input`]).
    pub dp: Option<DistributedNoise>,
}

/// What a device sends in a phase, for the round's session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SecAggUpload {
    /// Phase 1: the device's public keys (sent once it has trained).
    Advertise(KeyAdvertisement),
    /// Phase 2: its secrets' shares, sealed for each neighbour.
    Shares(ShareBundle),
    /// Phase 3: its masked, weighted, quantized update, and its public measurements.
    Masked {
        /// The masked input.
        input: MaskedInput,
        /// Samples, losses and times, in the clear as in a plain report.
        stats: LocalStats,
    },
    /// Phase 4: the shares the server asked for.
    Unmask(UnmaskResponse),
}

impl SecAggUpload {
    /// The SecAgg id the message speaks for.
    pub fn sender(&self) -> ClientId {
        match self {
            Self::Advertise(m) => m.id,
            Self::Shares(m) => m.from,
            Self::Masked { input, .. } => input.from,
            Self::Unmask(m) => m.from,
        }
    }

    /// The phase's name, for logs and errors.
    pub fn phase(&self) -> &'static str {
        match self {
            Self::Advertise(_) => "advertise keys",
            Self::Shares(_) => "share keys",
            Self::Masked { .. } => "masked input",
            Self::Unmask(_) => "unmask",
        }
    }
}

/// What the server gives a polling device once a phase has closed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SecAggDownload {
    /// After phase 1: the neighbours' keys and the threshold.
    NeighbourKeys(NeighbourKeys),
    /// After phase 2: the sealed shares the neighbours addressed to this device.
    ForwardedShares(ForwardedShares),
    /// After phase 3: which neighbours survived and which dropped.
    UnmaskRequest(UnmaskRequest),
    /// After phase 4: the session is over for this device (its update is in the sum).
    Done,
}

/// The vector a device masks, and (under DP) its update's norm before clipping.
///
/// - Without DP: `update` times its sample weight ([`weighted_input`]), then `statistics` as
///   they are (FedKSeed-Pro's importance, [`fedkseed_parts`]; sums, not means, so unweighted).
/// - With distributed DP (`dp`): `update` clipped to `dp.clip_norm` with a noise share added
///   from `rng` ([`DistributedNoise::apply`]; a device passes OS randomness: noise the server
///   could predict would protect nothing), with **weight 1**: the noise is calibrated to one
///   device's largest influence on the sum, the clipping norm, and a sample weight would change
///   that influence per device; the server divides the sum by the number of devices in it.
///   `statistics` are left out (the server's vector has no room for them under DP: they would
///   need clipping and noise of their own).
pub fn secure_input(
    update: &[f32],
    statistics: &[f32],
    samples: u64,
    max_samples: u64,
    dp: Option<&DistributedNoise>,
    rng: &mut impl RngCore,
) -> (Vec<f32>, Option<f64>) {
    match dp {
        Some(noise) => {
            let mut input = update.to_vec();
            let norm = noise.apply(&mut input, rng);
            (input, Some(norm))
        }
        None => {
            let mut input = weighted_input(update, samples, max_samples);
            input.extend_from_slice(statistics);
            (input, None)
        }
    }
}

/// A FedKSeed device's parts of its secure input: its dense K-vector of accumulated scalar
/// gradients, and under FedKSeed-Pro without DP its importance statistics
/// ([`pro_statistics`], scaled into the sum's range `clip`) so the server can update Pro's
/// importance exactly as in the clear. [`fedkseed_secure_len`] is the total length.
pub fn fedkseed_parts(
    report: &ClientReport,
    config: &ZoRunConfig,
    dp: bool,
    clip: f32,
) -> (Vec<f32>, Vec<f32>) {
    let update = crate::robust::flat::dense_seed_grads(report, config.k);
    let statistics = if config.pro && !dp {
        pro_statistics(report, config, clip)
    } else {
        Vec::new()
    };
    (update, statistics)
}

/// The length of a FedKSeed secure input: K, and 2K more for FedKSeed-Pro's importance
/// statistics without DP.
pub fn fedkseed_secure_len(config: &ZoRunConfig, dp: bool) -> usize {
    let k = config.k as usize;
    if config.pro && !dp { 3 * k } else { k }
}

/// The vector a device masks without DP: its update times `samples / max_samples`, so the server's sum
/// divided by the (public) sum of the weights is the sample-weighted mean, and no per-device
/// weighted vector is ever seen. The weight is at most 1, so the clipping range of the update
/// also bounds the weighted values.
pub fn weighted_input(update: &[f32], samples: u64, max_samples: u64) -> Vec<f32> {
    let w = input_weight(samples, max_samples);
    update.iter().map(|v| v * w).collect()
}

/// The weight [`weighted_input`] applies: `samples / max_samples`, at most 1 (0 when
/// `max_samples` is 0).
pub fn input_weight(samples: u64, max_samples: u64) -> f32 {
    if max_samples == 0 {
        return 0.0;
    }
    (samples.min(max_samples) as f64 / max_samples as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn a_device_weights_by_samples_or_clips_and_noises_with_weight_one() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let update = [3.0f32, 4.0];
        // Without DP: half the samples, half the weight; statistics follow unweighted.
        let (input, norm) = secure_input(&update, &[7.0], 2, 4, None, &mut rng);
        assert_eq!((input, norm), (vec![1.5, 2.0, 7.0], None));
        // With DP: clipped to norm 1 whatever the samples, noised, statistics left out.
        let noise = DistributedNoise {
            clip_norm: 1.0,
            noise_std: 1e-3,
            min_clients: 4,
        };
        let (input, norm) = secure_input(&update, &[7.0], 2, 4, Some(&noise), &mut rng);
        assert_eq!(norm, Some(5.0));
        assert_eq!(input.len(), 2);
        assert!(
            (input[0] - 0.6).abs() < 0.01 && (input[1] - 0.8).abs() < 0.01,
            "{input:?}"
        );
        assert!(input[0] != 0.6 || input[1] != 0.8, "no noise was added");
    }

    #[test]
    fn fedkseed_pro_masks_its_statistics_without_dp_only() {
        let pro = ZoRunConfig {
            k: 4,
            tau: 2,
            pro: true,
            ..ZoRunConfig::default()
        };
        let report = ClientReport {
            round: 1,
            seed_grads: vec![(1, 3.0)],
            step_grads: vec![(1, 1.0), (1, 2.0)],
            samples: 2,
        };
        let (update, statistics) = fedkseed_parts(&report, &pro, false, 10.0);
        assert_eq!(update, vec![0.0, 3.0, 0.0, 0.0]);
        assert_eq!(statistics.len(), 8);
        assert_eq!(
            update.len() + statistics.len(),
            fedkseed_secure_len(&pro, false)
        );
        let (_, none) = fedkseed_parts(&report, &pro, true, 10.0);
        assert!(none.is_empty());
        assert_eq!(fedkseed_secure_len(&pro, true), 4);
        let plain = ZoRunConfig { pro: false, ..pro };
        assert_eq!(fedkseed_secure_len(&plain, false), 4);
    }
}
