//! The daemon's configuration (`server.toml`): where it listens and keeps state, how rounds
//! run, and which algorithm with which settings. Every field has a default named beside its
//! reason, so a minimal file names only the model and the algorithm.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedtune_shared::lora::adapter::TargetModule;
use fedtune_shared::lora::aggregation::AggregationStrategy;
use fedtune_shared::lora::config::LoraConfig;
use fedtune_shared::prune::schedule::PruneSchedule;

use crate::algorithm::fedspine::{DEFAULT_RANKS, DEFAULT_RATIOS};
use fedtune_shared::lora::train::TrainConfig;
use fedtune_shared::privacy::dp::{DistributedNoise, DpConfig, NOISE_TAIL_STDS};
use fedtune_shared::privacy::gaussian::NoiseMode;
use fedtune_shared::robust::RobustRule;
use fedtune_shared::zo::round::ZoRunConfig;
use serde::{Deserialize, Serialize};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// QUIC address to listen on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address the identity file tells devices to connect to (default: `listen`).
    #[serde(default)]
    pub public_address: Option<SocketAddr>,
    /// Local address of the Prometheus metrics endpoint (`None`: no endpoint).
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// Folder of the durable store, keys and checkpoints.
    pub state_dir: PathBuf,
    /// The base model every device holds (GGUF file or Hugging Face folder).
    pub model: PathBuf,
    /// How rounds run.
    #[serde(default)]
    pub rounds: RoundSettings,
    /// Validation of reports.
    #[serde(default)]
    pub validation: ValidationSettings,
    /// The algorithm.
    pub algorithm: AlgorithmConfig,
    /// How a round's updates are combined when some devices may be broken or malicious
    /// (`[robust]`, `rule = "median"`, …; default: the algorithm's own mean).
    #[serde(default)]
    pub robust: RobustRule,
    /// Differential privacy and secure aggregation (`[privacy]`).
    #[serde(default)]
    pub privacy: PrivacySettings,
}

/// `[privacy]`: differential privacy and secure aggregation.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacySettings {
    /// Differential privacy (`[privacy.dp]`). `mode = "central"` (the default, without secure
    /// aggregation): the server clips every update, adds Gaussian noise to the sum and logs ε
    /// after each round. `mode = "distributed"` (with secure aggregation only): every device
    /// clips its own update to `clip.norm` (a fixed norm) and adds its share of the noise
    /// before masking it, weights are equal, and the server divides the unmasked sum by the
    /// devices in it and logs ε.
    pub dp: Option<DpConfig>,
    /// SecAgg+ (the server sees only the sum of the round's updates): after training, the
    /// selected devices run the four phases of `fedtune_shared::privacy::secagg` by polling, and
    /// the algorithm updates the global model from the sum. FedKSeed (and Pro) and LoRA with
    /// FedAvg and a single rank only; not with `[robust]` or central DP.
    pub secure_aggregation: bool,
    /// SecAgg+ settings (`[privacy.secagg]`), used when `secure_aggregation` is on.
    pub secagg: SecAggSettings,
}

/// `[privacy.secagg]`: how the daemon runs SecAgg+.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecAggSettings {
    /// Neighbours per device in the sparse graph (rounded down to even); a round with at most
    /// `degree + 1` devices uses the full graph.
    pub degree: usize,
    /// Every value of a device's (sample-weighted) update is clipped to `[-clip, clip]` before
    /// quantization. Pick it above the largest value an update holds (FedKSeed: an accumulated
    /// scalar gradient; LoRA: a change of one adapter weight in one round); the error of a
    /// round's sum of `n` updates is at most `n · clip / ⌊(2^32 − 1) / slots⌋`.
    pub clip: f32,
    /// The largest fraction of a device's neighbourhood that may drop out after sharing keys,
    /// in `[0, 0.5)`; more drop-outs fail the round, which is then run again.
    pub max_dropout: f64,
    /// Seconds each of the four phases waits for the devices still in the session before it
    /// closes with those that answered.
    pub phase_timeout_s: f64,
}

impl Default for SecAggSettings {
    fn default() -> Self {
        Self {
            // log2 of 65 536 devices: Bell et al. show O(log n) neighbours keep the sum
            // private and correct; small rounds use the full graph anyway.
            degree: 16,
            // FedKSeed's accumulated scalar gradients and LoRA's per-round changes are far
            // below this; with 100 devices a sum is still exact to 2.3e-5 per value.
            clip: 10.0,
            // Bonawitz et al. plan for up to a third of devices vanishing in a round.
            max_dropout: 0.3,
            // A phase is one small message per device: a minute covers a slow mobile link.
            phase_timeout_s: 60.0,
        }
    }
}

impl SecAggSettings {
    /// The phase timeout as a duration.
    pub fn phase_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.phase_timeout_s.max(0.0))
    }

    /// The fewest devices whose masked updates are in any sum the daemon can unmask when a
    /// round closes its key advertisements with at least `min_reports` devices (see
    /// `fedtune_shared::privacy::secagg::min_survivors`): what distributed noise is calibrated
    /// to, so that the guarantee holds whenever a round's sum is unmasked at all.
    pub fn min_survivors(&self, min_reports: usize) -> usize {
        fedtune_shared::privacy::secagg::min_survivors(self.degree, self.max_dropout, min_reports)
    }
}

impl PrivacySettings {
    /// What each device adds under distributed DP (secure aggregation with
    /// `[privacy.dp] mode = "distributed"`) when rounds close with at least `min_reports`
    /// devices; `None` otherwise.
    pub fn distributed_noise(&self, min_reports: usize) -> Option<DistributedNoise> {
        let dp = self.dp.as_ref()?;
        (self.secure_aggregation && dp.mode == NoiseMode::Distributed)
            .then(|| dp.distributed_noise(self.secagg.min_survivors(min_reports)))
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 4433))
}

/// Round orchestration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoundSettings {
    /// Rounds to run; then devices are told the run is finished.
    pub total_rounds: u64,
    /// Reports that close a round (the quorum).
    pub clients_per_round: usize,
    /// Plans handed out per round as a multiple of `clients_per_round`, so that stragglers and
    /// drop-outs do not stall the round (Bonawitz et al. 2019 over-select by 30%).
    pub over_selection: f64,
    /// Seconds after a round opens when it closes with what it has (if at least `min_reports`).
    pub deadline_s: f64,
    /// The fewest reports a round may close with at its deadline; below it the deadline is
    /// extended and more devices are invited.
    pub min_reports: usize,
    /// Finished rounds whose individual reports stay in the store (for audits and re-runs).
    pub keep_report_rounds: u64,
    /// Global checkpoints kept on disk.
    pub keep_checkpoints: usize,
    /// Seed of everything the server draws (local seeds of plans, fresh adapters, bandits).
    pub seed: u64,
}

impl Default for RoundSettings {
    fn default() -> Self {
        Self {
            total_rounds: 10,
            clients_per_round: 2,
            over_selection: 1.3,
            deadline_s: 600.0,
            min_reports: 1,
            keep_report_rounds: 2,
            keep_checkpoints: 3,
            seed: 42,
        }
    }
}

impl RoundSettings {
    /// The deadline as a duration.
    pub fn deadline(&self) -> Duration {
        Duration::from_secs_f64(self.deadline_s.max(0.0))
    }

    /// Rounds that wait for every one of `devices` devices: no over-selection, the quorum and
    /// the minimum both `devices` (how the tests and the load benchmark make runs exact).
    pub fn everyone(devices: usize, total_rounds: u64, deadline_s: f64) -> Self {
        Self {
            total_rounds,
            clients_per_round: devices,
            over_selection: 1.0,
            min_reports: devices,
            deadline_s,
            ..Self::default()
        }
    }

    /// Plans handed out per round.
    pub fn slots(&self) -> usize {
        ((self.clients_per_round as f64 * self.over_selection).ceil() as usize)
            .max(self.clients_per_round)
    }
}

/// How reports are checked beyond their shapes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationSettings {
    /// A report whose update norm exceeds this is refused (`None`: no bound). FedKSeed: the L2
    /// norm of its accumulated scalar gradients; LoRA: the Frobenius norm of `s·B·A` summed over
    /// layers.
    pub max_update_norm: Option<f64>,
    /// Largest adapter blob a device may upload, bytes.
    pub max_upload_bytes: u64,
}

impl Default for ValidationSettings {
    fn default() -> Self {
        Self {
            max_update_norm: None,
            // Rank 64 on every projection of a 1B model is under 200 MB.
            max_upload_bytes: 256 << 20,
        }
    }
}

/// The algorithm and its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum AlgorithmConfig {
    /// FedKSeed (or FedKSeed-Pro with `run.pro = true`).
    Fedkseed {
        /// Run settings (K, ε, lr, τ, distribution, run seed).
        #[serde(default)]
        run: ZoRunConfig,
        /// Sequences per local step.
        #[serde(default = "one")]
        batch_size: usize,
    },
    /// LoRA with per-device ranks.
    Lora {
        /// Adapter settings; `rank` is the largest.
        #[serde(default)]
        lora: LoraConfig,
        /// Ranks a device's bandit picks from.
        #[serde(default = "default_ranks")]
        ranks: Vec<usize>,
        /// Optimiser settings.
        #[serde(default)]
        train: TrainConfig,
        /// Optimiser steps per round.
        #[serde(default = "default_local_steps")]
        local_steps: usize,
        /// How adapters are combined.
        #[serde(default)]
        strategy: AggregationStrategy,
    },
    /// FedSpine: LoRA tuning with structured pruning on the devices, each device's bandit
    /// choosing its (pruning ratio, rank).
    FedSpine {
        /// Adapter settings; `rank` is ignored (the bandit's). By default every projection is
        /// adapted, so that the LoRA-gradient importance scores every unit.
        #[serde(default = "fedspine_lora")]
        lora: LoraConfig,
        /// Ranks a device's bandit picks from.
        #[serde(default = "fedspine_ranks")]
        ranks: Vec<usize>,
        /// Pruning ratios a device's bandit picks from, each in `[0, 1)`.
        #[serde(default = "fedspine_ratios")]
        ratios: Vec<f64>,
        /// How devices prune (interval `every`, protected layers, importance); `target` is
        /// ignored (the bandit's ratio).
        #[serde(default)]
        schedule: PruneSchedule,
        /// Optimiser settings.
        #[serde(default)]
        train: TrainConfig,
        /// Optimiser steps per round.
        #[serde(default = "fedspine_local_steps")]
        local_steps: usize,
    },
}

fn fedspine_lora() -> LoraConfig {
    LoraConfig {
        targets: TargetModule::ALL.to_vec(),
        ..LoraConfig::default()
    }
}
fn fedspine_ranks() -> Vec<usize> {
    DEFAULT_RANKS.to_vec()
}
fn fedspine_ratios() -> Vec<f64> {
    DEFAULT_RATIOS.to_vec()
}
fn fedspine_local_steps() -> usize {
    // Pruning steps every `P = 20` iterations need rounds longer than a few `P`.
    100
}

fn one() -> usize {
    1
}
fn default_ranks() -> Vec<usize> {
    vec![2, 4, 8]
}
fn default_local_steps() -> usize {
    10
}

impl AlgorithmConfig {
    /// The LoRA settings of a LoRA or FedSpine run (FedSpine aggregates with FlexLoRA under its
    /// masks, whatever `strategy` says); `None` for FedKSeed. `seed` seeds bandits and the first
    /// adapter; `max_norm` bounds each update.
    pub fn lora_settings(
        &self,
        seed: u64,
        max_norm: Option<f64>,
    ) -> Option<crate::algorithm::lora::LoraSettings> {
        let (lora, ranks, train, local_steps, strategy) = match self {
            Self::Fedkseed { .. } => return None,
            Self::Lora {
                lora,
                ranks,
                train,
                local_steps,
                strategy,
            } => (lora, ranks, train, local_steps, *strategy),
            Self::FedSpine {
                lora,
                ranks,
                train,
                local_steps,
                ..
            } => (
                lora,
                ranks,
                train,
                local_steps,
                AggregationStrategy::FlexLora,
            ),
        };
        Some(crate::algorithm::lora::LoraSettings {
            lora: lora.clone(),
            ranks: ranks.clone(),
            train: train.clone(),
            local_steps: *local_steps,
            strategy,
            seed,
            max_norm,
        })
    }
}

impl ServerConfig {
    /// A daemon with its state in `state_dir`, on `model`, running `algorithm`, with every other
    /// setting at its default (listening on 0.0.0.0:4433, no metrics endpoint).
    pub fn new(state_dir: &Path, model: &Path, algorithm: AlgorithmConfig) -> Self {
        Self {
            listen: default_listen(),
            public_address: None,
            metrics: None,
            state_dir: state_dir.to_path_buf(),
            model: model.to_path_buf(),
            rounds: RoundSettings::default(),
            validation: ValidationSettings::default(),
            algorithm,
            robust: RobustRule::default(),
            privacy: PrivacySettings::default(),
        }
    }

    /// Reads and checks a configuration file. Relative paths in it are taken relative to the
    /// file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut config.state_dir, &mut config.model] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        config.check()?;
        Ok(config)
    }

    /// Checks ranges a type cannot express.
    pub fn check(&self) -> Result<(), ConfigError> {
        let r = &self.rounds;
        if r.clients_per_round == 0 {
            return Err(ConfigError::Invalid(
                "rounds.clients_per_round must be at least 1".into(),
            ));
        }
        if !(r.over_selection >= 1.0 && r.over_selection <= 10.0) {
            return Err(ConfigError::Invalid(
                "rounds.over_selection must be in 1..=10".into(),
            ));
        }
        if r.min_reports == 0 || r.min_reports > r.clients_per_round {
            return Err(ConfigError::Invalid(
                "rounds.min_reports must be in 1..=clients_per_round".into(),
            ));
        }
        if !(r.deadline_s.is_finite() && r.deadline_s > 0.0) {
            return Err(ConfigError::Invalid(
                "rounds.deadline_s must be positive".into(),
            ));
        }
        if let Some(n) = self.validation.max_update_norm
            && !(n.is_finite() && n > 0.0)
        {
            return Err(ConfigError::Invalid(
                "validation.max_update_norm must be positive".into(),
            ));
        }
        self.check_privacy()?;
        match &self.algorithm {
            AlgorithmConfig::Fedkseed { run, batch_size } => {
                if run.k == 0 || run.tau == 0 || *batch_size == 0 {
                    return Err(ConfigError::Invalid(
                        "fedkseed: k, tau and batch_size must be positive".into(),
                    ));
                }
                if !(run.eps.is_finite() && run.eps > 0.0 && run.lr.is_finite()) {
                    return Err(ConfigError::Invalid(
                        "fedkseed: eps must be positive, lr finite".into(),
                    ));
                }
            }
            AlgorithmConfig::Lora {
                lora,
                ranks,
                local_steps,
                ..
            } => {
                if ranks.is_empty()
                    || ranks.contains(&0)
                    || lora.targets.is_empty()
                    || *local_steps == 0
                {
                    return Err(ConfigError::Invalid(
                        "lora: ranks must be positive and non-empty, targets non-empty, local_steps positive".into(),
                    ));
                }
            }
            AlgorithmConfig::FedSpine {
                lora,
                ranks,
                ratios,
                schedule,
                local_steps,
                ..
            } => {
                let ratios_valid =
                    !ratios.is_empty() && ratios.iter().all(|r| (0.0..1.0).contains(r));
                if ranks.is_empty()
                    || ranks.contains(&0)
                    || lora.targets.is_empty()
                    || *local_steps == 0
                    || schedule.every == 0
                    || !ratios_valid
                {
                    return Err(ConfigError::Invalid(
                        "fedspine: ranks positive and non-empty, ratios non-empty in [0, 1), targets non-empty, local_steps and schedule.every positive".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks `[robust]` and `[privacy]` against each other and the algorithm.
    fn check_privacy(&self) -> Result<(), ConfigError> {
        check_privacy_settings(
            &self.privacy,
            self.robust,
            &self.algorithm,
            self.rounds.min_reports,
        )?;
        let rule_ok = match self.robust {
            RobustRule::Mean | RobustRule::Median => true,
            RobustRule::TrimmedMean { trim } => (0.0..0.5).contains(&trim),
            RobustRule::NormBound { max_norm } => max_norm.is_finite() && max_norm > 0.0,
            RobustRule::Krum { byzantine, multi } => {
                self.rounds.min_reports > 2 * byzantine + 2 && multi >= 1
            }
        };
        if !rule_ok {
            return Err(ConfigError::Invalid(format!(
                "robust: {} settings out of range (krum needs rounds.min_reports > 2f + 2)",
                self.robust.name()
            )));
        }
        let needs_flat = self.robust != RobustRule::Mean || self.privacy.dp.is_some();
        if let AlgorithmConfig::Lora { ranks, .. } = &self.algorithm
            && needs_flat
            && ranks.iter().any(|&r| Some(&r) != ranks.iter().max())
        {
            // Robust rules and DP compare updates coordinate by coordinate: one shape.
            return Err(ConfigError::Invalid(
                "lora: robust aggregation and DP need a single rank (ranks = [r])".into(),
            ));
        }
        Ok(())
    }

    /// The address devices are told to use.
    pub fn public_address(&self) -> SocketAddr {
        self.public_address.unwrap_or(self.listen)
    }
}

/// Checks `[privacy]` (differential privacy and secure aggregation) against `[robust]` and the
/// algorithm: the daemon's configuration, or a simulated run's with `min_reports` its clients
/// per round.
///
/// # Errors
///
/// [`ConfigError::Invalid`], naming the conflict.
pub fn check_privacy_settings(
    privacy: &PrivacySettings,
    robust: RobustRule,
    algorithm: &AlgorithmConfig,
    min_reports: usize,
) -> Result<(), ConfigError> {
    if let Some(dp) = &privacy.dp {
        dp.validate()
            .map_err(|e| ConfigError::Invalid(format!("privacy.dp: {e}")))?;
        if dp.mode == NoiseMode::Distributed && !privacy.secure_aggregation {
            return Err(ConfigError::Invalid(
                "privacy.dp.mode = \"distributed\" needs [privacy] secure_aggregation = true: \
                 devices add the noise only to what they mask; without secure aggregation the \
                 server sees each update and adds the noise itself (mode = \"central\")"
                    .into(),
            ));
        }
        if robust != RobustRule::Mean {
            // The noise is calibrated to one client's influence on a mean, not a median.
            return Err(ConfigError::Invalid(
                "privacy.dp and a robust rule cannot be combined".into(),
            ));
        }
    }
    if privacy.secure_aggregation {
        check_secure_aggregation(privacy, robust, algorithm, min_reports)?;
    }
    Ok(())
}

/// Checks that secure aggregation can run with the rest of a configuration (the daemon's, or a
/// simulated run's with `min_reports` its clients per round): the server sees only a sum, so
/// whatever needs one device's update is refused, and distributed DP's noise must fit the
/// quantizer's range.
///
/// # Errors
///
/// [`ConfigError::Invalid`], naming the conflict.
pub fn check_secure_aggregation(
    privacy: &PrivacySettings,
    robust: RobustRule,
    algorithm: &AlgorithmConfig,
    min_reports: usize,
) -> Result<(), ConfigError> {
    let s = &privacy.secagg;
    let refuse = |m: &str| {
        Err(ConfigError::Invalid(format!(
            "privacy.secure_aggregation: {m}"
        )))
    };
    if let Some(dp) = &privacy.dp {
        if dp.mode == NoiseMode::Central {
            // The server would have to see the noiseless sum (or each update) to add the noise
            // itself, which is what secure aggregation keeps from it; distributed noise gives
            // the same ε for the same z without trusting the server.
            return refuse(
                "central DP adds noise to a sum the server would see without it; \
                 use [privacy.dp] mode = \"distributed\" (each device clips its update and \
                 adds its share of the noise before masking)",
            );
        }
        if dp.clip.adaptive.is_some() {
            return refuse(
                "adaptive clipping needs the fraction of devices whose update exceeded the norm, \
                 which secure aggregation hides (a private estimate needs a secure, noised \
                 count of its own, not implemented); use a fixed [privacy.dp.clip] norm",
            );
        }
    }
    if robust != RobustRule::Mean {
        return refuse(
            "robust rules compare devices' updates, which the server never sees; \
             turn off [robust]",
        );
    }
    match algorithm {
        AlgorithmConfig::Fedkseed { .. } => {}
        AlgorithmConfig::Lora {
            ranks, strategy, ..
        } => {
            if *strategy != AggregationStrategy::FedAvg {
                return refuse(
                    "HetLoRA and FlexLoRA need each device's adapter; use strategy = \"fed_avg\"",
                );
            }
            if ranks.len() != 1 {
                return refuse("LoRA needs a single rank (ranks = [r]): the sum is over one shape");
            }
        }
        AlgorithmConfig::FedSpine { .. } => {
            return refuse("FedSpine aggregates each device's kept coordinates separately");
        }
    }
    if !(s.clip.is_finite() && s.clip > 0.0) {
        return refuse("secagg.clip must be positive");
    }
    if !(0.0..0.5).contains(&s.max_dropout) {
        return refuse("secagg.max_dropout must be in [0, 0.5)");
    }
    if s.degree < 2 {
        return refuse("secagg.degree must be at least 2");
    }
    if !(s.phase_timeout_s.is_finite() && s.phase_timeout_s > 0.0) {
        return refuse("secagg.phase_timeout_s must be positive");
    }
    if min_reports < 3 {
        // Two devices could unmask each other's update from the sum.
        return refuse("rounds.min_reports must be at least 3");
    }
    if let Some(noise) = privacy.distributed_noise(min_reports) {
        // A value the quantizer cut would carry less noise than the guarantee counts on.
        let bound = noise.value_bound();
        if f64::from(s.clip) < bound {
            return refuse(&format!(
                "secagg.clip = {} is below {bound:.3}: a device's clipped and noised values \
                 (DP clip norm {} plus {NOISE_TAIL_STDS} standard deviations of its noise share \
                 {:.4}, for at least {} devices in a sum) must fit the secure sum's range",
                s.clip, noise.clip_norm, noise.noise_std, noise.min_clients
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_file_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(
            &path,
            "state_dir = \"state\"\nmodel = \"m.gguf\"\n[algorithm]\nname = \"fedkseed\"\n[algorithm.run]\nk = 64\n",
        )
        .unwrap();
        let config = ServerConfig::load(&path).unwrap();
        assert_eq!(config.state_dir, dir.path().join("state"));
        assert!(
            matches!(config.algorithm, AlgorithmConfig::Fedkseed { ref run, .. } if run.k == 64)
        );

        std::fs::write(&path, "state_dir = 3\n").unwrap();
        let err = ServerConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("server.toml"), "{err}");

        std::fs::write(
            &path,
            "state_dir = \"s\"\nmodel = \"m\"\n[rounds]\nclients_per_round = 0\n[algorithm]\nname = \"fedkseed\"\n",
        )
        .unwrap();
        assert!(matches!(
            ServerConfig::load(&path),
            Err(ConfigError::Invalid(_))
        ));
    }

    #[test]
    fn robust_and_privacy_sections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        let base = "state_dir = \"s\"\nmodel = \"m\"\n[rounds]\nclients_per_round = 10\nmin_reports = 8\n[algorithm]\nname = \"fedkseed\"\n";
        std::fs::write(
            &path,
            format!("{base}[robust]\nrule = \"krum\"\nbyzantine = 2\n"),
        )
        .unwrap();
        let config = ServerConfig::load(&path).unwrap();
        assert_eq!(
            config.robust,
            RobustRule::Krum {
                byzantine: 2,
                multi: 1
            }
        );
        std::fs::write(
            &path,
            format!(
                "{base}[privacy.dp]\nnoise_multiplier = 1.1\ndelta = 1e-5\npopulation = 1000\n[privacy.dp.clip]\nnorm = 1.0\n[privacy.dp.clip.adaptive]\ntarget_quantile = 0.5\nlr = 0.2\n"
            ),
        )
        .unwrap();
        let config = ServerConfig::load(&path).unwrap();
        assert_eq!(config.privacy.dp.map(|d| d.noise_multiplier), Some(1.1));
        // Secure aggregation with FedKSeed, its settings defaulted or given.
        std::fs::write(
            &path,
            format!("{base}[privacy]\nsecure_aggregation = true\n[privacy.secagg]\nclip = 4.0\n"),
        )
        .unwrap();
        let config = ServerConfig::load(&path).unwrap();
        assert!(config.privacy.secure_aggregation);
        assert_eq!(config.privacy.secagg.clip, 4.0);
        assert_eq!(
            config.privacy.secagg.degree,
            SecAggSettings::default().degree
        );
        // Krum with too few reports, DP together with a robust rule, and secure aggregation with
        // a robust rule or a bad drop-out fraction are refused.
        for extra in [
            "[robust]\nrule = \"krum\"\nbyzantine = 4\n",
            "[robust]\nrule = \"median\"\n[privacy.dp]\nnoise_multiplier = 1.0\ndelta = 1e-5\npopulation = 10\n[privacy.dp.clip]\nnorm = 1.0\n[privacy.dp.clip.adaptive]\ntarget_quantile = 0.5\nlr = 0.2\n",
            "[robust]\nrule = \"median\"\n[privacy]\nsecure_aggregation = true\n",
            "[privacy]\nsecure_aggregation = true\n[privacy.secagg]\nmax_dropout = 0.5\n",
        ] {
            std::fs::write(&path, format!("{base}{extra}")).unwrap();
            assert!(
                matches!(ServerConfig::load(&path), Err(ConfigError::Invalid(_))),
                "{extra}"
            );
        }
    }

    #[test]
    fn secure_aggregation_refuses_what_needs_one_devices_update() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        let head = "state_dir = \"s\"\nmodel = \"m\"\n[rounds]\nclients_per_round = 5\nmin_reports = 4\n[privacy]\nsecure_aggregation = true\n";
        let check = |algorithm: &str| {
            std::fs::write(&path, format!("{head}[algorithm]\n{algorithm}")).unwrap();
            ServerConfig::load(&path).map_err(|e| e.to_string())
        };
        check("name = \"lora\"\nstrategy = \"fed_avg\"\nranks = [4]\n").expect("FedAvg, one rank");
        for (algorithm, says) in [
            (
                "name = \"lora\"\nstrategy = \"flex_lora\"\nranks = [4]\n",
                "fed_avg",
            ),
            (
                "name = \"lora\"\nstrategy = \"het_lora\"\nranks = [4]\n",
                "fed_avg",
            ),
            (
                "name = \"lora\"\nstrategy = \"fed_avg\"\nranks = [2, 4]\n",
                "single rank",
            ),
            ("name = \"fed_spine\"\n", "FedSpine"),
        ] {
            let err = check(algorithm).expect_err(algorithm);
            assert!(err.contains(says), "{algorithm}: {err}");
        }
    }

    #[test]
    fn distributed_dp_needs_secure_aggregation_a_fixed_norm_and_room_for_its_noise() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        let head = "state_dir = \"s\"\nmodel = \"m\"\n[rounds]\nclients_per_round = 6\nmin_reports = 5\n[algorithm]\nname = \"fedkseed\"\n";
        let dp = "[privacy.dp]\nnoise_multiplier = 1.0\ndelta = 1e-5\npopulation = 1000\n[privacy.dp.clip]\nnorm = 1.0\n";
        let distributed = dp.replace("[privacy.dp]\n", "[privacy.dp]\nmode = \"distributed\"\n");
        let secure = "[privacy]\nsecure_aggregation = true\n";
        let load = |body: &str| {
            std::fs::write(&path, format!("{head}{body}")).unwrap();
            ServerConfig::load(&path).map_err(|e| e.to_string())
        };
        let config = load(&format!("{secure}{distributed}")).expect("distributed DP with SecAgg+");
        // Rounds close with at least 5 devices; δ = 0.3 lets 1 of 5 drop: 4 in any sum, each
        // adding z · C / √4 = 0.5.
        let noise = config
            .privacy
            .distributed_noise(5)
            .expect("distributed noise");
        assert_eq!((noise.min_clients, noise.noise_std), (4, 0.5));
        assert_eq!(config.privacy.secagg.min_survivors(5), 4);
        for (body, says) in [
            // Distributed noise without secure aggregation: nobody would add it.
            (
                distributed.clone(),
                "needs [privacy] secure_aggregation = true",
            ),
            // Central DP under secure aggregation: the server never sees what it would noise.
            (format!("{secure}{dp}"), "mode = \"distributed\""),
            (
                format!(
                    "{secure}{distributed}[privacy.dp.clip.adaptive]\ntarget_quantile = 0.5\nlr = 0.2\n"
                ),
                "adaptive clipping",
            ),
            // The quantizer's range must hold C + 8 · 0.5 = 5.
            (
                format!("{secure}{distributed}[privacy.secagg]\nclip = 4.0\n"),
                "secagg.clip = 4 is below 5.000",
            ),
            (
                format!("{secure}{distributed}[robust]\nrule = \"median\"\n"),
                "robust rule",
            ),
        ] {
            let err = load(&body).expect_err(&body);
            assert!(err.contains(says), "{body}: {err}");
        }
        load(&format!(
            "{secure}{distributed}[privacy.secagg]\nclip = 5.0\n"
        ))
        .expect("exactly enough room");
        // LoRA FedAvg at one rank takes it too.
        std::fs::write(
            &path,
            format!(
                "{}{secure}{distributed}",
                head.replace(
                    "name = \"fedkseed\"\n",
                    "name = \"lora\"\nstrategy = \"fed_avg\"\nranks = [4]\n"
                )
            ),
        )
        .unwrap();
        ServerConfig::load(&path).expect("LoRA with distributed DP");
    }

    #[test]
    fn example_configs_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/configs");
        for name in [
            "server.toml",
            "server-lora.toml",
            "server-fedspine.toml",
            "server-secagg.toml",
            "server-secagg-dp.toml",
        ] {
            let config =
                ServerConfig::load(&dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(config.metrics.is_some(), "{name}");
        }
    }
}
