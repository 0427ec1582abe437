//! An in-process federated LoRA run: N clients with their own data and their own (simulated)
//! speed, M sampled per round, each training at the rank its bandit picks, the server
//! aggregating the heterogeneous ranks; no network. The reference the networked daemon and the
//! simulator must agree with.

use std::collections::BTreeMap;

use burn::module::Module;
use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;

use super::adapter::AdapterWeights;
use super::aggregation::{
    AggregationError, AggregationStrategy, Aggregator, ClientAdapter, FlexLora, aggregate,
};
use super::attach::{adapter_weights, attach_fresh, attach_weights};
use super::config::LoraConfig;
use super::train::{LoraTrainer, TrainConfig, TrainExample, response_loss};
use crate::bandit::reward::{RewardModel, RoundObservation, ThroughputReward, median_round_time_s};
use crate::bandit::{Arm, BanditError, BanditPolicy, DeviceBandit};
use crate::model::Llama;
use crate::progress::Silent;
use crate::zo::round::wire_size;

/// One client of an in-process run.
#[derive(Debug, Clone)]
pub struct LoraClient {
    /// Its training data.
    pub data: Vec<TrainExample>,
    /// How much slower than this machine the simulated device is: its measured round time is
    /// multiplied by this before the bandit sees it (1.0: as fast as this machine).
    pub slowdown: f64,
}

/// Settings of an in-process run.
#[derive(Debug, Clone)]
pub struct LoraFederationConfig {
    /// Rounds to train.
    pub rounds: u64,
    /// Clients sampled per round (M).
    pub clients_per_round: usize,
    /// Optimiser steps per client per round.
    pub local_steps: usize,
    /// Adapter settings; `rank` is the largest rank and the fresh adapter's, each client's rank
    /// comes from its bandit.
    pub lora: LoraConfig,
    /// The ranks a bandit chooses from (all equal to `lora.rank` for FedAvg).
    pub ranks: Vec<usize>,
    /// The bandit policy of every device.
    pub bandit: BanditPolicy,
    /// Local optimiser settings.
    pub train: TrainConfig,
    /// How the server combines adapters.
    pub strategy: AggregationStrategy,
    /// Seed of sampling, data order, adapter initialisation and bandits.
    pub seed: u64,
}

/// What one round did.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraRoundStats {
    /// The round (1-based).
    pub round: u64,
    /// `(client, rank)` of every client that trained.
    pub ranks: Vec<(usize, usize)>,
    /// Mean local training loss.
    pub train_loss: f32,
    /// Held-out loss of the global adapter at the largest rank.
    pub heldout_loss: f32,
    /// Mean encoded size of an adapter sent to a client.
    pub download_bytes: usize,
    /// Mean encoded size of an adapter a client sent back.
    pub upload_bytes: usize,
    /// Mean wall time of a local round on this machine.
    pub local_round_s: f64,
    /// Highest peak resident memory of a local round, where the OS reports it.
    pub peak_rss_bytes: Option<u64>,
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum LoraFederationError {
    /// The server could not aggregate.
    #[error("aggregation failed: {0}")]
    Aggregation(#[from] AggregationError),
    /// A bandit refused its configuration or a reward.
    #[error("bandit: {0}")]
    Bandit(#[from] BanditError),
    /// A configuration that cannot run.
    #[error("invalid run: {0}")]
    Invalid(String),
}

/// Mean held-out loss of `model` (inference copy) over `data`, 8 sequences at a time.
pub fn heldout_loss(model: &Llama, data: &[TrainExample], pad_id: u32) -> f32 {
    let mut total = 0.0f64;
    let mut count = 0usize;
    for chunk in data.chunks(8) {
        let n: usize = chunk.iter().map(TrainExample::targets).sum();
        if let Some(loss) = response_loss(model, chunk, pad_id) {
            total += f64::from(loss.into_scalar::<f32>()) * n as f64;
            count += n;
        }
    }
    (total / count.max(1) as f64) as f32
}

/// Runs `config.rounds` rounds from `base` (on an autodiff device) and returns the last global
/// adapter at the largest rank, calling `on_round` after each round.
pub fn run_lora_federation(
    base: Llama,
    clients: &[LoraClient],
    heldout: &[TrainExample],
    config: &LoraFederationConfig,
    mut on_round: impl FnMut(&LoraRoundStats),
) -> Result<AdapterWeights, LoraFederationError> {
    if clients.len() < config.clients_per_round || config.clients_per_round == 0 {
        return Err(LoraFederationError::Invalid(format!(
            "{} clients, {} per round",
            clients.len(),
            config.clients_per_round
        )));
    }
    if clients.iter().any(|c| c.data.is_empty()) {
        return Err(LoraFederationError::Invalid("a client has no data".into()));
    }
    let max_rank = config
        .ranks
        .iter()
        .copied()
        .max()
        .unwrap_or(config.lora.rank);
    let arms: Vec<Arm> = config.ranks.iter().map(|&r| Arm::lora(r)).collect();
    let mut bandits = clients
        .iter()
        .enumerate()
        .map(|(i, _)| DeviceBandit::new(arms.clone(), config.bandit, config.seed ^ i as u64))
        .collect::<Result<Vec<_>, _>>()?;
    let pad_id = config.train.pad_id;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    // The global adapter lives at the largest rank from the start (A random, B zero), so every
    // client's first adapter is the same model of its rank.
    let mut fresh = config.lora.clone();
    fresh.rank = max_rank;
    let mut global = adapter_weights(
        &attach_fresh(base.clone(), &fresh, config.seed),
        fresh.scaling,
    )
    .ok_or_else(|| LoraFederationError::Invalid("no target modules".into()))?;
    let mut client_steps = vec![0usize; clients.len()];
    let reward = ThroughputReward;

    for round in 1..=config.rounds {
        let chosen = sample(&mut rng, clients.len(), config.clients_per_round).into_vec();
        let mut uploads = Vec::new();
        let mut observations = Vec::new();
        let mut stats = LoraRoundStats {
            round,
            ranks: Vec::new(),
            train_loss: 0.0,
            heldout_loss: f32::NAN,
            download_bytes: 0,
            upload_bytes: 0,
            local_round_s: 0.0,
            peak_rss_bytes: None,
        };
        for &c in &chosen {
            let arm = bandits[c].select();
            let rank = bandits[c].arms()[arm].lora_rank;
            let mut lora = config.lora.clone();
            lora.rank = rank;
            let sent = adapter_for_rank(&global, rank, config.strategy)?;
            stats.download_bytes += wire_size(&sent);
            let model = attach_weights(base.clone(), &sent, lora.dropout)
                .map_err(|e| LoraFederationError::Invalid(e.to_string()))?;
            // A fixed probe of the client's data measures its progress for the bandit.
            let probe = &clients[c].data[..clients[c].data.len().min(4)];
            let loss_before = heldout_loss(&model.valid(), probe, pad_id);
            let mut trainer = LoraTrainer::new(config.train.clone(), client_steps[c]);
            let mut client_rng = ChaCha8Rng::seed_from_u64(config.seed ^ (round << 20) ^ c as u64);
            let (trained, report) = trainer.train_round(
                model,
                &clients[c].data,
                config.local_steps,
                &mut client_rng,
                &mut Silent,
            );
            client_steps[c] = trainer.next_step();
            let loss_after = heldout_loss(&trained.valid(), probe, pad_id);
            let weights = adapter_weights(&trained, lora.scaling)
                .ok_or_else(|| LoraFederationError::Invalid("training lost the adapters".into()))?;
            stats.upload_bytes += wire_size(&weights);
            stats.train_loss += report.mean_loss;
            stats.local_round_s += report.wall_s;
            stats.peak_rss_bytes = stats.peak_rss_bytes.max(report.peak_rss_bytes);
            stats.ranks.push((c, rank));
            observations.push((
                c,
                arm,
                RoundObservation {
                    loss_before,
                    loss_after,
                    round_time_s: report.wall_s * clients[c].slowdown,
                },
            ));
            uploads.push(ClientAdapter {
                weights,
                samples: report.samples.max(1),
            });
        }
        let global_adapter = aggregate_to_rank(config.strategy, &uploads, max_rank, &global)?;

        let times: Vec<f64> = observations
            .iter()
            .map(|(_, _, o)| o.round_time_s)
            .collect();
        let median = median_round_time_s(&times)
            .map_err(|e| LoraFederationError::Bandit(BanditError::from(e)))?;
        for (c, arm, observation) in &observations {
            match reward.reward(observation, median) {
                Ok(r) => bandits[*c].update(*arm, r)?,
                Err(e) => tracing::warn!(client = c, error = %e, "no reward this round"),
            }
        }

        let n = chosen.len();
        stats.train_loss /= n as f32;
        stats.local_round_s /= n as f64;
        stats.upload_bytes /= n;
        stats.download_bytes /= n;
        let evaluated = attach_weights(base.clone(), &global_adapter, 0.0)
            .map_err(|e| LoraFederationError::Invalid(e.to_string()))?;
        stats.heldout_loss = heldout_loss(&evaluated.valid(), heldout, pad_id);
        tracing::info!(?stats, "round finished");
        on_round(&stats);
        global = global_adapter;
    }
    Ok(global)
}

/// Aggregates the round's uploads into a global adapter of rank `max_rank`.
///
/// FlexLoRA keeps `max_rank` singular directions however small the round's ranks. HetLoRA's
/// global rank is the round's largest client rank; the directions above it, which no client
/// trained this round, keep their values from `previous` (rescaled to the new rank's scale).
pub fn aggregate_to_rank(
    strategy: AggregationStrategy,
    uploads: &[ClientAdapter],
    max_rank: usize,
    previous: &AdapterWeights,
) -> Result<AdapterWeights, LoraFederationError> {
    let merged = match (strategy, std::num::NonZeroUsize::new(max_rank)) {
        (AggregationStrategy::FlexLora, Some(max)) => {
            FlexLora::new().with_max_rank(max).aggregate(uploads)?
        }
        _ => aggregate(strategy, uploads)?,
    };
    let top = *merged.ranks().end();
    let mut global = merged.for_rank(top.min(max_rank))?;
    if global.rank < previous.rank && strategy == AggregationStrategy::HetLora {
        global = extend_with(global, previous);
    }
    Ok(global)
}

/// `low` (rank r) extended to `high`'s rank R with `high`'s directions r..R, all expressed at
/// rank R's scale so that `ΔW = s_R B A` keeps both parts' contributions.
fn extend_with(low: AdapterWeights, high: &AdapterWeights) -> AdapterWeights {
    let (r, big) = (low.rank, high.rank);
    let rescale = low.scale() / high.scale();
    let mut out = high.clone();
    for (at, f) in out.layers.iter_mut() {
        let Some(l) = low.layers.get(at) else {
            continue;
        };
        f.a[..r * f.d_in].copy_from_slice(&l.a);
        for o in 0..f.d_out {
            for k in 0..r {
                f.b[o * big + k] = l.b[o * r + k] * rescale;
            }
        }
    }
    out
}

/// The adapter a client of rank `rank` receives from the last global adapter (kept at the
/// largest rank): re-aggregating one "client" of that adapter with the run's strategy gives
/// every strategy's own rule for changing rank (truncation for HetLoRA, the SVD for FlexLoRA).
pub fn adapter_for_rank(
    global: &AdapterWeights,
    rank: usize,
    strategy: AggregationStrategy,
) -> Result<AdapterWeights, LoraFederationError> {
    if global.rank == rank {
        return Ok(global.clone());
    }
    let one = [ClientAdapter {
        weights: global.clone(),
        samples: 1,
    }];
    Ok(aggregate(strategy, &one)?.for_rank(rank)?)
}

/// Ranks clients trained at, counted.
pub fn rank_histogram(rounds: &[LoraRoundStats]) -> BTreeMap<usize, usize> {
    let mut counts = BTreeMap::new();
    for s in rounds {
        for &(_, r) in &s.ranks {
            *counts.entry(r).or_default() += 1;
        }
    }
    counts
}
