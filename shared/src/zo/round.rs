//! FedKSeed rounds as data: the plan the server sends, the report a client returns, the
//! server's cumulative seed history `H`, and the replay that turns history into weights.
//!
//! The global model after round `r` is `w_r = w_{r-1} - lr · Σ_s ΔH_r[s] · z_s`, applied
//! round by round with the seeds of each round in ascending order ([`replay`]). Every party
//! applies the same rounds in the same order with the same arithmetic, so a client that missed
//! rounds and replays their deltas one after another holds the server's weights bit for bit.
//! Its cost is the number of seeds each missed round touched, never K per round.

use std::collections::BTreeMap;

use burn::module::Module;
use serde::{Deserialize, Serialize};

use super::perturb::add_noise;
use super::seed_pool::{PRO_CLIP, SeedPool, SeedSampling, pro_probabilities};
use crate::noise::{NoiseDistribution, SeedNoise};

/// A run's fixed settings, shared by server and clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ZoRunConfig {
    /// Seed the candidate seeds derive from.
    pub run_seed: u64,
    /// Number of candidate seeds K.
    pub k: u32,
    /// Perturbation scale ε.
    pub eps: f32,
    /// Learning rate.
    pub lr: f32,
    /// Local steps per round τ.
    pub tau: u32,
    /// Noise distribution.
    pub distribution: NoiseDistribution,
    /// Sample seeds by FedKSeed-Pro importance instead of uniformly.
    pub pro: bool,
}

impl Default for ZoRunConfig {
    /// The paper's defaults: K = 4096, ε = 5e-4, lr = 3e-7, τ = 200, uniform sampling.
    fn default() -> Self {
        Self {
            run_seed: 42,
            k: 4096,
            eps: 5e-4,
            lr: 3e-7,
            tau: 200,
            distribution: NoiseDistribution::Binomial16,
            pro: false,
        }
    }
}

/// The change of `H` made by one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryDelta {
    /// The round that produced it.
    pub round: u64,
    /// The changed entries.
    pub entries: DeltaEntries,
}

/// A change of `H`, encoded densely or sparsely, whichever is smaller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeltaEntries {
    /// `(seed index, change)` for the touched seeds, ascending.
    Sparse(Vec<(u32, f32)>),
    /// One change per seed (zero for untouched ones).
    Dense(Vec<f32>),
}

impl DeltaEntries {
    /// Encodes `changes` (seed index → change), picking the smaller form: a sparse entry costs
    /// 8 bytes, a dense one 4.
    pub fn encode(changes: &BTreeMap<u32, f32>, k: u32) -> Self {
        if changes.len() * 2 < k as usize {
            Self::Sparse(changes.iter().map(|(&s, &v)| (s, v)).collect())
        } else {
            let mut dense = vec![0.0; k as usize];
            for (&s, &v) in changes {
                dense[s as usize] = v;
            }
            Self::Dense(dense)
        }
    }

    /// The non-zero changes in ascending seed order.
    pub fn nonzero(&self) -> Vec<(u32, f32)> {
        match self {
            Self::Sparse(v) => v.iter().copied().filter(|&(_, c)| c != 0.0).collect(),
            Self::Dense(v) => v
                .iter()
                .enumerate()
                .filter(|&(_, &c)| c != 0.0)
                .map(|(s, &c)| (s as u32, c))
                .collect(),
        }
    }
}

/// What the server sends a client for one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundPlan {
    /// The round the client trains in.
    pub round: u64,
    /// Run settings.
    pub config: ZoRunConfig,
    /// How to sample seeds this round.
    pub sampling: SeedSampling,
    /// The deltas of every round since the one the client last saw, oldest first.
    pub catch_up: Vec<HistoryDelta>,
}

impl RoundPlan {
    /// The last round reflected in a client's model once it has replayed `catch_up`: the
    /// round before this one. A client remembers it and asks for the deltas after it next time.
    pub fn base_round(&self) -> u64 {
        self.round - 1
    }
}

/// What a client returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientReport {
    /// The round trained in.
    pub round: u64,
    /// `(seed index, accumulated g)` for every seed with a non-zero sum, ascending.
    pub seed_grads: Vec<(u32, f32)>,
    /// Raw per-step `(seed index, g)` values, for FedKSeed-Pro's importance (empty otherwise).
    pub step_grads: Vec<(u32, f32)>,
    /// Training samples the client used (its aggregation weight).
    pub samples: u64,
}

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// The report is for another round.
    #[error("report is for round {got}, the server is in round {expected}")]
    WrongRound {
        /// The server's round.
        expected: u64,
        /// The report's round.
        got: u64,
    },
    /// A seed index is outside `0..K`.
    #[error("seed index {index} is outside 0..{k}")]
    SeedOutOfRange {
        /// The index.
        index: u32,
        /// K.
        k: u32,
    },
    /// A gradient is NaN or infinite.
    #[error("gradient for seed {index} is not finite")]
    NotFinite {
        /// The seed index.
        index: u32,
    },
    /// The report claims no samples.
    #[error("report claims zero samples")]
    NoSamples,
}

impl ClientReport {
    /// Checks the report against the server's round and K.
    pub fn validate(&self, round: u64, k: u32) -> Result<(), ReportError> {
        if self.round != round {
            return Err(ReportError::WrongRound {
                expected: round,
                got: self.round,
            });
        }
        if self.samples == 0 {
            return Err(ReportError::NoSamples);
        }
        for &(index, g) in self.seed_grads.iter().chain(&self.step_grads) {
            if index >= k {
                return Err(ReportError::SeedOutOfRange { index, k });
            }
            if !g.is_finite() {
                return Err(ReportError::NotFinite { index });
            }
        }
        Ok(())
    }
}

/// FedKSeed-Pro under secure aggregation: one device's importance statistics, which it masks
/// after its update so that the server learns only their sum over the round's devices. `2K`
/// values: for each seed the summed `|g|` of its per-step values (clamped to `±PRO_CLIP`, as
/// the importance clamps them), then for each seed how many per-step values it has; both scaled
/// into `[0, clip]` (by `clip / (τ · PRO_CLIP)` and `clip / τ`: a device has at most τ
/// per-step values), the secure sum's range. [`ZoServer::apply_secure_mean`] undoes the scaling.
pub fn pro_statistics(report: &ClientReport, config: &ZoRunConfig, clip: f32) -> Vec<f32> {
    let k = config.k as usize;
    let (abs_scale, count_scale) = pro_scales(config, clip);
    let mut sums = vec![0.0f64; k];
    let mut counts = vec![0.0f64; k];
    for &(s, g) in &report.step_grads {
        let s = s as usize;
        if s < k {
            sums[s] += f64::from(g.clamp(-PRO_CLIP, PRO_CLIP).abs());
            counts[s] += 1.0;
        }
    }
    sums.iter()
        .map(|v| (v * abs_scale) as f32)
        .chain(counts.iter().map(|c| (c * count_scale) as f32))
        .collect()
}

/// The scales of [`pro_statistics`]: summed `|g|` and counts to `[0, clip]`.
fn pro_scales(config: &ZoRunConfig, clip: f32) -> (f64, f64) {
    let tau = f64::from(config.tau.max(1));
    let clip = f64::from(clip);
    (clip / (tau * f64::from(PRO_CLIP)), clip / tau)
}

/// The server's side of FedKSeed: the history and the rounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ZoServer {
    config: ZoRunConfig,
    /// Cumulative `H[s]`.
    history: Vec<f32>,
    /// Every round's delta, in order (`deltas[r - 1]` is round `r`'s).
    deltas: Vec<HistoryDelta>,
    /// FedKSeed-Pro: each seed's raw g values, starting with one 0.0.
    pro_history: Vec<Vec<f32>>,
    /// The round being trained (1-based).
    round: u64,
}

impl ZoServer {
    /// A run before its first round.
    pub fn new(config: ZoRunConfig) -> Self {
        let k = config.k as usize;
        Self {
            config,
            history: vec![0.0; k],
            deltas: Vec::new(),
            pro_history: vec![vec![0.0]; k],
            round: 1,
        }
    }

    /// The round being trained.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The run settings.
    pub fn config(&self) -> &ZoRunConfig {
        &self.config
    }

    /// The cumulative history `H`.
    pub fn history(&self) -> &[f32] {
        &self.history
    }

    /// The plan for a client whose model reflects every round up to `last_seen` (0: the
    /// initial model).
    pub fn plan(&self, last_seen: u64) -> RoundPlan {
        let sampling = if self.config.pro {
            SeedSampling::Probabilities(pro_probabilities(&self.pro_history))
        } else {
            SeedSampling::Uniform
        };
        RoundPlan {
            round: self.round,
            config: self.config.clone(),
            sampling,
            catch_up: self
                .deltas
                .iter()
                .skip(last_seen as usize)
                .cloned()
                .collect(),
        }
    }

    /// Validates and combines this round's reports: `ΔH[s] = Σ_c (n_c / Σ n) g_c[s]`. Advances
    /// to the next round and returns the delta. Reports that fail validation are returned with
    /// their error and left out.
    pub fn aggregate(
        &mut self,
        reports: &[ClientReport],
    ) -> (HistoryDelta, Vec<(usize, ReportError)>) {
        let mut rejected = Vec::new();
        let mut accepted = Vec::new();
        for (i, report) in reports.iter().enumerate() {
            match report.validate(self.round, self.config.k) {
                Ok(()) => accepted.push(report),
                Err(e) => rejected.push((i, e)),
            }
        }
        let total: f64 = accepted.iter().map(|r| r.samples as f64).sum();
        let mut changes: BTreeMap<u32, f64> = BTreeMap::new();
        for report in &accepted {
            let weight = report.samples as f64 / total;
            for &(s, g) in &report.seed_grads {
                *changes.entry(s).or_default() += weight * g as f64;
            }
            for &(s, g) in &report.step_grads {
                self.pro_history[s as usize].push(g);
            }
        }
        let changes: BTreeMap<u32, f32> = changes.into_iter().map(|(s, v)| (s, v as f32)).collect();
        (self.close_round(changes), rejected)
    }

    /// Closes the round with a combined update computed elsewhere (a robust rule, a DP mean or
    /// a secure sum over the dense K-vectors of `reports`): `mean[s]` is `ΔH[s]`. `reports`
    /// (validated by the caller) only feed FedKSeed-Pro's per-seed history. Entries beyond K
    /// are ignored.
    pub fn apply_mean(&mut self, reports: &[ClientReport], mean: &[f32]) -> HistoryDelta {
        for report in reports {
            for &(s, g) in &report.step_grads {
                if let Some(h) = self.pro_history.get_mut(s as usize) {
                    h.push(g);
                }
            }
        }
        let changes: BTreeMap<u32, f32> = mean
            .iter()
            .take(self.config.k as usize)
            .enumerate()
            .filter(|&(_, &v)| v != 0.0 && v.is_finite())
            .map(|(s, &v)| (s as u32, v))
            .collect();
        self.close_round(changes)
    }

    /// Closes a secure round: `mean` (the first K values of the unmasked sum, divided by the
    /// devices' weight) is `ΔH`. Under FedKSeed-Pro, `statistics` (the sum's remaining 2K
    /// values, not divided: the summed [`pro_statistics`] of the round's `clients` devices,
    /// `clip` the range they were scaled into) feed the importance as [`Self::aggregate`] feeds it every
    /// per-step value: `count` entries of their mean `|g|` per seed, so the importance (a mean
    /// over entries) is the clear run's up to the sum's quantization error (counts are rounded
    /// to integers, exact while that error is below ½). Without statistics (under DP, whose
    /// noise they would need too), each seed's value of `mean` stands for the round's values of
    /// that seed: post-processing of the noised mean, at no further privacy cost.
    pub fn apply_secure_mean(
        &mut self,
        mean: &[f32],
        statistics: Option<&[f32]>,
        clients: usize,
        clip: f32,
    ) -> HistoryDelta {
        if self.config.pro {
            match statistics.and_then(|s| self.secure_importance(s, clients, clip)) {
                Some(entries) => {
                    for (history, (entry, count)) in self.pro_history.iter_mut().zip(entries) {
                        history.extend(std::iter::repeat_n(entry, count));
                    }
                }
                None => {
                    for (history, &v) in self.pro_history.iter_mut().zip(mean) {
                        if v != 0.0 && v.is_finite() {
                            history.push(v);
                        }
                    }
                }
            }
        }
        self.apply_mean(&[], mean)
    }

    /// Each seed's (mean `|g|`, count) from the summed statistics of `clients` devices; `None`
    /// when they do not add up: more per-step values than `clients · τ` (honest devices have at
    /// most τ each; a larger count would only grow the importance history).
    fn secure_importance(
        &self,
        stats: &[f32],
        clients: usize,
        clip: f32,
    ) -> Option<Vec<(f32, usize)>> {
        let k = self.config.k as usize;
        if stats.len() != 2 * k {
            return None;
        }
        let (abs_scale, count_scale) = pro_scales(&self.config, clip);
        let entries: Vec<(f32, usize)> = (0..k)
            .map(|s| {
                let count = (f64::from(stats[k + s]) / count_scale).round();
                let count = if count.is_finite() {
                    count.max(0.0)
                } else {
                    0.0
                };
                let sum = (f64::from(stats[s]) / abs_scale).max(0.0);
                let entry = if count >= 1.0 {
                    ((sum / count) as f32).min(PRO_CLIP)
                } else {
                    0.0
                };
                (entry, count as usize)
            })
            .collect();
        let total: usize = entries.iter().map(|&(_, c)| c).sum();
        let most = clients.saturating_mul(self.config.tau as usize);
        if total > most {
            tracing::warn!(
                total,
                most,
                "FedKSeed-Pro statistics count more per-step values than the devices can have; \
                 the importance sees the round's mean instead"
            );
            return None;
        }
        Some(entries)
    }

    /// Applies a round's changes to `H`, records the delta and advances.
    fn close_round(&mut self, changes: BTreeMap<u32, f32>) -> HistoryDelta {
        for (&s, &v) in &changes {
            self.history[s as usize] += v;
        }
        let delta = HistoryDelta {
            round: self.round,
            entries: DeltaEntries::encode(&changes, self.config.k),
        };
        self.deltas.push(delta.clone());
        self.round += 1;
        delta
    }
}

/// Applies one round's delta to a model: `w ← w - lr · Σ_s ΔH[s] · z_s`, seeds ascending.
pub fn replay<M: Module>(
    model: M,
    config: &ZoRunConfig,
    pool: &SeedPool,
    delta: &HistoryDelta,
) -> M {
    let terms: Vec<(SeedNoise, f32)> = delta
        .entries
        .nonzero()
        .into_iter()
        .filter_map(|(s, change)| {
            let seed = pool.seed(s as usize)?;
            Some((
                SeedNoise::new(seed, config.distribution),
                -config.lr * change,
            ))
        })
        .collect();
    add_noise(model, &terms)
}

/// Encoded size in bytes of a message, as the wire format (bincode, standard configuration)
/// writes it before transport framing.
pub fn wire_size<T: Serialize>(message: &T) -> usize {
    bincode::serde::encode_to_vec(message, bincode::config::standard())
        .map(|v| v.len())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(round: u64, seed_grads: Vec<(u32, f32)>, samples: u64) -> ClientReport {
        ClientReport {
            round,
            seed_grads,
            step_grads: Vec::new(),
            samples,
        }
    }

    #[test]
    fn aggregation_weights_by_samples_and_rejects_bad_reports() {
        let config = ZoRunConfig {
            k: 8,
            ..ZoRunConfig::default()
        };
        let mut server = ZoServer::new(config);
        let reports = vec![
            report(1, vec![(0, 1.0), (3, 2.0)], 1),
            report(1, vec![(3, 4.0)], 3),
            report(1, vec![(9, 1.0)], 1),
            report(2, vec![(1, 1.0)], 1),
            report(1, vec![(1, f32::NAN)], 1),
        ];
        let (delta, rejected) = server.aggregate(&reports);
        assert_eq!(
            rejected.iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert_eq!(delta.entries.nonzero(), vec![(0, 0.25), (3, 0.5 + 3.0)]);
        assert_eq!(server.round(), 2);
        assert_eq!(server.plan(0).catch_up.len(), 1);
        assert!(server.plan(1).catch_up.is_empty());
    }

    #[test]
    fn pro_importance_from_summed_statistics_is_the_clear_importance() {
        let config = ZoRunConfig {
            k: 8,
            tau: 4,
            pro: true,
            ..ZoRunConfig::default()
        };
        let pro = |seed_grads: Vec<(u32, f32)>, step_grads: Vec<(u32, f32)>| ClientReport {
            round: 1,
            seed_grads,
            step_grads,
            samples: 4,
        };
        let reports = vec![
            pro(
                vec![(1, 3.0), (5, -2.0)],
                vec![(1, 1.0), (1, 2.0), (5, -2.0)],
            ),
            pro(vec![(1, -0.5), (6, 3.0)], vec![(1, -0.5), (6, 3.0)]),
        ];
        let mut clear = ZoServer::new(config.clone());
        let (_, rejected) = clear.aggregate(&reports);
        assert!(rejected.is_empty());
        // The secure round: the devices' dense updates and statistics summed (equal weights).
        let clip = 10.0;
        let mut stats = vec![0.0f32; 16];
        let mut mean = vec![0.0f32; 8];
        for r in &reports {
            stats
                .iter_mut()
                .zip(pro_statistics(r, &config, clip))
                .for_each(|(s, v)| *s += v);
            assert!(stats.iter().all(|v| (0.0..=2.0 * clip).contains(v)));
            for &(s, g) in &r.seed_grads {
                mean[s as usize] += g / 2.0;
            }
        }
        let mut secure = ZoServer::new(config.clone());
        secure.apply_secure_mean(&mean, Some(&stats), 2, clip);
        let probabilities = |server: &ZoServer| match server.plan(1).sampling {
            SeedSampling::Probabilities(p) => p,
            SeedSampling::Uniform => panic!("Pro samples by importance"),
        };
        let (a, b) = (probabilities(&clear), probabilities(&secure));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
        assert!(a[6] > a[1] && a[1] > a[0], "{a:?}");
        assert_eq!(clear.history(), secure.history());
        // Statistics counting more per-step values than two devices can have are not used:
        // the importance falls back to the round's mean.
        let mut bloated = ZoServer::new(config.clone());
        let mut inflated = stats.clone();
        inflated[8..].iter_mut().for_each(|c| *c = clip);
        bloated.apply_secure_mean(&mean, Some(&inflated), 2, clip);
        let mut fallback = ZoServer::new(config);
        fallback.apply_secure_mean(&mean, None, 2, clip);
        assert_eq!(probabilities(&bloated), probabilities(&fallback));
        // That fallback (the importance of round means, what the secure path did before the
        // statistics) is not the clear run's importance.
        let off = a
            .iter()
            .zip(probabilities(&fallback))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(off > 1e-3, "{off}");
    }

    #[test]
    fn traffic_fits_the_paper_budget() {
        // K = 4096, τ = 200: a report of 200 distinct seeds, a plan with one dense delta.
        let config = ZoRunConfig::default();
        let full = report(1, (0..200).map(|s| (s * 20, 0.123)).collect(), 10);
        let report_bytes = wire_size(&full);
        assert!(report_bytes <= 1700, "report {report_bytes} B");
        let dense: BTreeMap<u32, f32> = (0..4096).map(|s| (s, 0.5)).collect();
        let plan = RoundPlan {
            round: 2,
            config: config.clone(),
            sampling: SeedSampling::Uniform,
            catch_up: vec![HistoryDelta {
                round: 1,
                entries: DeltaEntries::encode(&dense, 4096),
            }],
        };
        let plan_bytes = wire_size(&plan);
        assert!(plan_bytes <= 16_500, "plan {plan_bytes} B");
        let sparse: BTreeMap<u32, f32> = (0..600).map(|s| (s * 3, 0.5)).collect();
        let sparse_plan = RoundPlan {
            catch_up: vec![HistoryDelta {
                round: 1,
                entries: DeltaEntries::encode(&sparse, 4096),
            }],
            ..plan
        };
        assert!(
            wire_size(&sparse_plan) < plan_bytes / 2,
            "sparse deltas are encoded sparsely"
        );
    }
}
