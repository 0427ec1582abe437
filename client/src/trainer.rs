//! The device's model and the local work a plan asks for. Plain synchronous code over the
//! shared algorithms; the SDK runs it on a blocking thread.

use burn::module::Module;
use fedtune_shared::lora::adapter::AdapterWeights;
use fedtune_shared::lora::aggregation::masked::overlay_adapter;
use fedtune_shared::lora::attach::{adapter_weights, attach_weights};
use fedtune_shared::lora::federation::heldout_loss;
use fedtune_shared::lora::train::{LoraTrainer, TrainExample};
use fedtune_shared::model::Llama;
use fedtune_shared::progress::Progress;
use fedtune_shared::protocol::LocalStats;
use fedtune_shared::protocol::{FedSpineTask, LoraTask};
use fedtune_shared::prune::kept::KeptUnits;
use fedtune_shared::prune::prune_tune::{LocalTuning, prune_and_tune};
use fedtune_shared::prune::units::LayerShape;
use fedtune_shared::zo::federation::local_round;
use fedtune_shared::zo::round::{ClientReport, HistoryDelta, RoundPlan, ZoRunConfig, replay};
use fedtune_shared::zo::seed_pool::SeedPool;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The device's training data, already tokenized.
#[derive(Debug, Clone, Default)]
pub struct TrainingData {
    /// Token sequences (FedKSeed trains next-token prediction on them; LoRA too when
    /// `examples` is empty).
    pub sequences: Vec<Vec<u32>>,
    /// Instruction examples with their prompt lengths (LoRA's loss covers responses only).
    pub examples: Vec<TrainExample>,
    /// Padding token of batches.
    pub pad_id: u32,
}

/// Why local work failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// The device has no data to train on.
    #[error("no training data")]
    NoData,
    /// The plan's catch-up does not continue the device's history.
    #[error("history gap: the device holds round {held}, the plan's catch-up starts at {starts}")]
    HistoryGap {
        /// Last round the device holds.
        held: u64,
        /// First round the plan carries.
        starts: u64,
    },
    /// The adapter the server sent does not fit the model or the task.
    #[error("bad adapter: {0}")]
    Adapter(String),
    /// Pruning during tuning failed.
    #[error("pruning: {0}")]
    Prune(String),
    /// The run's settings changed under the device.
    #[error("the plan's FedKSeed settings differ from those the device's history was made with")]
    SettingsChanged,
}

/// A device's copy of the global model under FedKSeed: the base model plus the history deltas
/// it has replayed.
#[derive(Clone)]
pub struct FedKSeedModel {
    base: Llama,
    current: Llama,
    held_round: u64,
    settings: Option<(ZoRunConfig, SeedPool)>,
}

impl FedKSeedModel {
    /// The base model, no history applied.
    pub fn new(base: Llama) -> Self {
        Self {
            current: base.clone(),
            base,
            held_round: 0,
            settings: None,
        }
    }

    /// Back to the base model (a new run).
    pub fn reset(&mut self) {
        self.current = self.base.clone();
        self.held_round = 0;
        self.settings = None;
    }

    /// The base model.
    pub fn base(&self) -> &Llama {
        &self.base
    }

    /// The last round applied.
    pub fn held_round(&self) -> u64 {
        self.held_round
    }

    /// The current weights.
    pub fn model(&self) -> &Llama {
        &self.current
    }

    /// Replays deltas (oldest first) that are newer than what the model holds; returns those
    /// it applied, for the device to store.
    pub fn catch_up(
        &mut self,
        config: &ZoRunConfig,
        deltas: &[HistoryDelta],
    ) -> Result<Vec<HistoryDelta>, TrainError> {
        match &self.settings {
            Some((held, _)) if held != config => return Err(TrainError::SettingsChanged),
            Some(_) => {}
            None => {
                self.settings = Some((
                    config.clone(),
                    SeedPool::new(config.run_seed, config.k as usize),
                ))
            }
        }
        let mut applied = Vec::new();
        for delta in deltas {
            if delta.round <= self.held_round {
                continue;
            }
            if delta.round != self.held_round + 1 {
                return Err(TrainError::HistoryGap {
                    held: self.held_round,
                    starts: delta.round,
                });
            }
            if let Some((config, pool)) = &self.settings {
                self.current = replay(self.current.clone(), config, pool, delta);
            }
            self.held_round = delta.round;
            applied.push(delta.clone());
        }
        Ok(applied)
    }

    /// Catches up with the plan, then runs its τ local steps with the plan's local seed.
    pub fn train(
        &mut self,
        plan: &RoundPlan,
        batch_size: usize,
        local_seed: u64,
        data: &TrainingData,
        progress: &mut impl Progress,
    ) -> Result<(Vec<HistoryDelta>, ClientReport, LocalStats), TrainError> {
        if data.sequences.is_empty() {
            return Err(TrainError::NoData);
        }
        let applied = self.catch_up(&plan.config, &plan.catch_up)?;
        if self.held_round + 1 != plan.round {
            return Err(TrainError::HistoryGap {
                held: self.held_round,
                starts: plan.round,
            });
        }
        let pool = match &self.settings {
            Some((_, pool)) => pool.clone(),
            None => SeedPool::new(plan.config.run_seed, plan.config.k as usize),
        };
        fedtune_shared::peak_memory::reset_peak_rss();
        let start = std::time::Instant::now();
        let mut rng = ChaCha8Rng::seed_from_u64(local_seed);
        let (report, mean_loss) = local_round(
            &self.current,
            plan,
            &pool,
            &data.sequences,
            batch_size,
            data.pad_id,
            &mut rng,
            progress,
        );
        let stats = LocalStats {
            samples: report.samples,
            mean_loss,
            first_loss: mean_loss,
            loss_after: mean_loss,
            wall_s: start.elapsed().as_secs_f64(),
            peak_rss_bytes: fedtune_shared::peak_memory::peak_rss_bytes(),
        };
        Ok((applied, report, stats))
    }
}

impl TrainingData {
    /// The examples LoRA trains on.
    pub fn lora_examples(&self) -> Vec<TrainExample> {
        if self.examples.is_empty() {
            self.sequences
                .iter()
                .cloned()
                .map(TrainExample::text)
                .collect()
        } else {
            self.examples.clone()
        }
    }
}

/// Sequences of the fixed probe on which a LoRA device measures its progress for the bandit
/// (the loss before and after its round).
pub const PROBE_EXAMPLES: usize = 4;

/// One LoRA round: the global adapter at the device's rank installed on the frozen base, the
/// task's optimiser steps with the plan's local seed, the trained adapter back. The same steps
/// as the in-process run, so both give the same adapter.
pub fn train_lora(
    base: &Llama,
    task: &LoraTask,
    global: &AdapterWeights,
    data: &TrainingData,
    local_seed: u64,
    progress: &mut impl Progress,
) -> Result<(AdapterWeights, LocalStats), TrainError> {
    let (examples, model, loss_before) = start_lora_round(base, task, global, data)?;
    let pad_id = task.train.pad_id;
    let probe = &examples[..examples.len().min(PROBE_EXAMPLES)];
    let mut trainer = LoraTrainer::new(task.train.clone(), task.first_step);
    let mut rng = ChaCha8Rng::seed_from_u64(local_seed);
    let (trained, report) =
        trainer.train_round(model, &examples, task.local_steps, &mut rng, progress);
    let loss_after = heldout_loss(&trained.valid(), probe, pad_id);
    let weights = adapter_weights(&trained, task.lora.scaling)
        .ok_or_else(|| TrainError::Adapter("training lost the adapters".into()))?;
    let stats = LocalStats {
        samples: report.samples,
        mean_loss: report.mean_loss,
        first_loss: loss_before,
        loss_after,
        wall_s: report.wall_s,
        peak_rss_bytes: report.peak_rss_bytes,
    };
    Ok((weights, stats))
}

/// The common start of a LoRA or FedSpine round: the examples, the global adapter installed on
/// the frozen base (on the training device), and the probe loss before training.
fn start_lora_round(
    base: &Llama,
    task: &LoraTask,
    global: &AdapterWeights,
    data: &TrainingData,
) -> Result<(Vec<TrainExample>, Llama, f32), TrainError> {
    let examples = data.lora_examples();
    if examples.is_empty() {
        return Err(TrainError::NoData);
    }
    if global.rank != task.lora.rank || global.scaling != task.lora.scaling {
        return Err(TrainError::Adapter(format!(
            "the adapter has rank {}, the task asks for {}",
            global.rank, task.lora.rank
        )));
    }
    // The base stays as the app loaded it; `train` switches the module to autodiff, with the
    // base frozen by `attach_weights` and only the adapters tracked.
    let model = attach_weights(base.clone(), global, task.lora.dropout)
        .map_err(|e| TrainError::Adapter(e.to_string()))?
        .train();
    let probe = &examples[..examples.len().min(PROBE_EXAMPLES)];
    let loss_before = heldout_loss(&model.valid(), probe, task.train.pad_id);
    Ok((examples, model, loss_before))
}

/// What a FedSpine round produced on the device.
#[derive(Debug, Clone, PartialEq)]
pub struct FedSpineOutcome {
    /// The tuned adapter, in the kept coordinates (it fits the pruned model).
    pub adapter: AdapterWeights,
    /// Per layer, the units kept (the full model's numbering).
    pub kept: Vec<KeptUnits>,
    /// What the device measured (see [`train_fedspine`] for the losses).
    pub stats: LocalStats,
    /// The round's work: the prunable weights of the model each iteration ran on, summed.
    pub param_steps: u64,
    /// The fraction of prunable weights removed.
    pub removed_ratio: f64,
}

/// One FedSpine round: the global adapter at the device's rank installed on the full base, then
/// the task's steps of LoRA tuning with pruning steps toward the assigned ratio
/// ([`prune_and_tune`]), with the plan's local seed. The probe loss before is the full model's
/// with the global adapter, the one after the full model's with the device's tuned
/// coordinates written over the global adapter ([`overlay_adapter`]): the progress the
/// bandit is rewarded by is what the round contributes, and an update trained on a heavily
/// pruned model contributes less.
pub fn train_fedspine(
    base: &Llama,
    task: &FedSpineTask,
    global: &AdapterWeights,
    data: &TrainingData,
    local_seed: u64,
    progress: &mut impl Progress,
) -> Result<FedSpineOutcome, TrainError> {
    let lora = &task.lora;
    let (examples, model, loss_before) = start_lora_round(base, lora, global, data)?;
    let mut rng = ChaCha8Rng::seed_from_u64(local_seed);
    let tuning = LocalTuning {
        lora: &lora.lora,
        train: &lora.train,
        first_step: lora.first_step,
        local_steps: lora.local_steps,
    };
    let round = prune_and_tune(
        model,
        &tuning,
        &task.schedule,
        &examples,
        &mut rng,
        progress,
    )
    .map_err(|e| TrainError::Prune(e.to_string()))?;
    let adapter = adapter_weights(&round.model, lora.lora.scaling)
        .ok_or_else(|| TrainError::Adapter("training lost the adapters".into()))?;
    // Progress is measured on the full model with the device's coordinates written into the
    // global adapter: what this round adds to the model everyone shares. Measured on the pruned
    // model instead, every round would be charged again for pruning units the global model
    // still has, and the bandit would learn that pruning never pays.
    let shapes: Vec<LayerShape> = base.layers.iter().map(LayerShape::of).collect();
    let overlaid = overlay_adapter(global, &adapter, &round.kept, &shapes)
        .map_err(|e| TrainError::Adapter(e.to_string()))?;
    let contributed = attach_weights(base.clone(), &overlaid, 0.0)
        .map_err(|e| TrainError::Adapter(e.to_string()))?;
    let probe = &examples[..examples.len().min(PROBE_EXAMPLES)];
    let loss_after = heldout_loss(&contributed, probe, lora.train.pad_id);
    let report = &round.report;
    let stats = LocalStats {
        samples: report.samples,
        mean_loss: report.mean_loss,
        first_loss: loss_before,
        loss_after,
        wall_s: report.wall_s,
        peak_rss_bytes: report.peak_rss_bytes,
    };
    Ok(FedSpineOutcome {
        adapter,
        kept: round.kept,
        stats,
        param_steps: round.param_steps,
        removed_ratio: round.removed_ratio,
    })
}
