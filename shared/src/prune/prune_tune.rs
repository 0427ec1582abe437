//! FedSpine's local round: LoRA tuning with structured pruning steps interleaved, so the model
//! a weak device trains on shrinks toward the ratio the server gave it while the adapters
//! recover what each step removed.
//!
//! ```text
//! for t in 1..=local_steps:
//!     one AdamW step on the adapters (its gradients also update the LoRA importance, EMA 0.9)
//!     if t is a pruning point (every P iterations, schedule::pruning_points):
//!         remove units until R·(1 − (1 − k/n)³) of the full model's prunable weights are gone
//!         (the k-th of n points; one global ranking, protected layers never cut)
//!         the removed units' adapter rows/columns go with them; tuning goes on
//! ```
//!
//! After each pruning step the optimiser starts afresh (AdamW's moments have the old shapes);
//! the learning-rate schedule continues. Given the same model, data, seed and schedule, the
//! same units are pruned: batches come from the caller's seeded generator and every choice is a
//! deterministic function of them.

use std::time::Instant;

use burn::module::Module;
use rand::Rng;

use super::calibration::calibrate;
use super::kept::KeptUnits;
use super::lora_importance::{DEFAULT_EMA, LoraImportance};
use super::plan::{PlanError, PruneOptions, PrunePlan, plan_flap, select};
use super::schedule::{ImportanceKind, PruneSchedule, cubic_ratio, pruning_points};
use super::structural::prune_model;
use super::units::{LayerShape, prunable_params};
use crate::lora::aggregation::masked::{MaskedError, restrict_adapter};
use crate::lora::attach::{AttachError, adapter_weights, attach_weights, detach, reseed_dropout};
use crate::lora::config::LoraConfig;
use crate::lora::train::{LoraTrainer, RoundReport, TrainConfig, TrainExample};
use crate::model::Llama;
use crate::peak_memory;
use crate::progress::{Progress, StepProgress};

/// Calibration sequences a FLAP-scored pruning step takes from the client's data.
pub const FLAP_CALIBRATION_SEQUENCES: usize = 32;

/// Why a local prune-and-tune round failed.
#[derive(Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PruneTuneError {
    /// The round needs training data.
    #[error("no training data")]
    NoData,
    /// The target ratio is not in `[0, 1)`.
    #[error("pruning ratio {0} is not in [0, 1)")]
    Ratio(f64),
    /// The model carries no adapters to tune.
    #[error("the model has no LoRA adapters")]
    NoAdapters,
    /// A pruning step could not be planned.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The adapters could not follow the pruned model.
    #[error(transparent)]
    Masked(#[from] MaskedError),
    /// The restricted adapters did not fit the pruned model (a bug).
    #[error(transparent)]
    Attach(#[from] AttachError),
}

/// What a local prune-and-tune round produced.
#[derive(Debug)]
pub struct PruneTuneRound {
    /// The pruned model with its tuned adapters (on the training device).
    pub model: Llama,
    /// Per layer, the units kept, in the numbering of the model the round started from.
    pub kept: Vec<KeptUnits>,
    /// Losses, steps, samples, time and memory of the round.
    pub report: RoundReport,
    /// The learning-rate schedule's next step.
    pub next_step: usize,
    /// `Σ` over the round's iterations of the prunable weights of the model that iteration ran
    /// on: the round's work, which pruning reduces.
    pub param_steps: u64,
    /// The fraction of the starting model's prunable weights removed.
    pub removed_ratio: f64,
}

/// The tuning half of a local round: adapters, optimiser, schedule position, length.
#[derive(Debug, Clone, Copy)]
pub struct LocalTuning<'a> {
    /// The adapters' scaling and dropout, for re-attaching them after each pruning step.
    pub lora: &'a LoraConfig,
    /// Optimiser settings.
    pub train: &'a TrainConfig,
    /// The learning-rate schedule's step at the start of the round.
    pub first_step: usize,
    /// AdamW steps in the round.
    pub local_steps: usize,
}

/// Tunes `model`'s adapters for `tuning.local_steps` AdamW steps on batches drawn from `data`
/// with `rng`, pruning as `schedule` says (see the [module docs](self)).
///
/// `model` lives on an autodiff device with its base frozen and adapters attached (as
/// [`attach_weights`] followed by `.train()` leaves it).
///
/// # Errors
/// [`PruneTuneError`] for a ratio outside `[0, 1)`, no data, no adapters, or a plan the
/// options cannot meet even at the reachable ratio.
pub fn prune_and_tune(
    mut model: Llama,
    tuning: &LocalTuning<'_>,
    schedule: &PruneSchedule,
    data: &[TrainExample],
    rng: &mut impl Rng,
    progress: &mut impl Progress,
) -> Result<PruneTuneRound, PruneTuneError> {
    let LocalTuning {
        lora,
        train,
        first_step,
        local_steps,
    } = *tuning;
    if data.is_empty() {
        return Err(PruneTuneError::NoData);
    }
    if !(0.0..1.0).contains(&schedule.target) {
        return Err(PruneTuneError::Ratio(schedule.target));
    }
    peak_memory::reset_peak_rss();
    let start = Instant::now();
    let full = prunable_params(&model);
    let mut kept: Vec<KeptUnits> = model
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| KeptUnits::all(i, &LayerShape::of(l)))
        .collect();
    let points = if schedule.target > 0.0 {
        pruning_points(local_steps, schedule.every)
    } else {
        Vec::new()
    };
    let options = PruneOptions {
        protect_first: schedule.protect_first,
        protect_last: schedule.protect_last,
        bias_compensation: schedule.importance == ImportanceKind::Flap,
        ..PruneOptions::default()
    };
    let mut importance = LoraImportance::new(&model, DEFAULT_EMA);
    let mut trainer = LoraTrainer::new(train.clone(), first_step);
    // Dropout masks from the round's generator, as in `LoraTrainer::train_round`.
    reseed_dropout(&model, rng);
    let mut losses = Vec::with_capacity(local_steps);
    let mut samples = 0u64;
    let mut param_steps = 0u64;
    let mut point = 0;
    for t in 1..=local_steps.max(1) {
        if t <= local_steps {
            let batch: Vec<TrainExample> = (0..train.batch_size.max(1))
                .map(|_| data[rng.random_range(0..data.len())].clone())
                .collect();
            param_steps += prunable_params(&model) as u64;
            let loss;
            (model, loss) = trainer.step_observed(model, &batch, |m, grads| {
                if schedule.importance == ImportanceKind::LoraGradient {
                    importance.observe(m, grads);
                }
            });
            if let Some(loss) = loss {
                losses.push(loss);
                samples += batch.len() as u64;
            }
            progress.step_done(StepProgress {
                step: t,
                steps: local_steps,
                loss,
            });
        }
        if points.get(point) == Some(&t) {
            point += 1;
            let target = cubic_ratio(schedule.target, point, points.len());
            let current = prunable_params(&model);
            let goal = (target * full as f64).round() as usize;
            let more = goal.saturating_sub(full - current);
            if more == 0 {
                continue;
            }
            let ratio = (more as f64 / current as f64).min(0.999);
            let plan = match schedule.importance {
                ImportanceKind::LoraGradient => PrunePlan {
                    keep: select_reachable(&model, importance.scores(), ratio, &options)?,
                    compensation: None,
                },
                ImportanceKind::Flap => {
                    let sequences: Vec<Vec<u32>> = data
                        .iter()
                        .take(FLAP_CALIBRATION_SEQUENCES)
                        .map(|e| e.ids.clone())
                        .collect();
                    let inner = model.valid();
                    let stats = calibrate(&inner, &sequences);
                    match plan_flap(&stats, &inner, ratio, &options) {
                        Err(PlanError::Unreachable { reachable, .. }) if reachable > 0.0 => {
                            plan_flap(&stats, &inner, reachable * 0.999, &options)?
                        }
                        other => other?,
                    }
                }
            };
            model = prune_with_adapters(model, &plan, lora)?;
            reseed_dropout(&model, rng);
            importance.restrict(&plan.keep);
            kept = compose(&kept, &plan.keep);
            trainer = LoraTrainer::new(train.clone(), trainer.next_step());
            tracing::debug!(
                step = t,
                target,
                removed = full - prunable_params(&model),
                "pruning step"
            );
        }
    }
    let report = RoundReport {
        first_loss: losses.first().copied().unwrap_or(f32::NAN),
        mean_loss: losses.iter().sum::<f32>() / losses.len().max(1) as f32,
        steps: losses.len(),
        samples,
        wall_s: start.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_memory::peak_rss_bytes(),
    };
    let removed_ratio = (full - prunable_params(&model)) as f64 / full.max(1) as f64;
    Ok(PruneTuneRound {
        model,
        kept,
        report,
        next_step: trainer.next_step(),
        param_steps,
        removed_ratio,
    })
}

/// [`select`], falling back to the largest ratio the options allow when `ratio` is out of
/// their reach (protected layers and per-layer minimums can cap it below the server's target).
fn select_reachable(
    model: &Llama,
    scores: &[super::units::LayerScores],
    ratio: f64,
    options: &PruneOptions,
) -> Result<Vec<KeptUnits>, PlanError> {
    match select(model, scores, ratio, options) {
        Err(PlanError::Unreachable { reachable, .. }) if reachable > 0.0 => {
            tracing::warn!(
                ratio,
                reachable,
                "pruning target out of reach; pruning what the options allow"
            );
            select(model, scores, reachable * 0.999, options)
        }
        other => other,
    }
}

/// `model` pruned by `plan` with its adapters following: read off as numbers, the kept rows and
/// columns taken ([`restrict_adapter`]), attached afresh to the smaller projections (new
/// trainable parameters of the new shapes) on the training device.
pub fn prune_with_adapters(
    model: Llama,
    plan: &PrunePlan,
    lora: &LoraConfig,
) -> Result<Llama, PruneTuneError> {
    let weights = adapter_weights(&model, lora.scaling).ok_or(PruneTuneError::NoAdapters)?;
    let shapes: Vec<LayerShape> = model.layers.iter().map(LayerShape::of).collect();
    let restricted = restrict_adapter(&weights, &plan.keep, &shapes)?;
    plan.check(&model)?;
    let (pruned, _) = prune_model(detach(model).valid(), plan);
    Ok(attach_weights(pruned, &restricted, lora.dropout)?.train())
}

/// `inner` (in `outer`'s kept numbering) expressed in the numbering `outer` was made in:
/// `outer[inner[i]]`.
pub fn compose(outer: &[KeptUnits], inner: &[KeptUnits]) -> Vec<KeptUnits> {
    outer
        .iter()
        .zip(inner)
        .map(|(o, i)| KeptUnits {
            layer: o.layer,
            kv_heads: i.kv_heads.iter().map(|&h| o.kv_heads[h]).collect(),
            ffn_channels: i.ffn_channels.iter().map(|&c| o.ffn_channels[c]).collect(),
        })
        .collect()
}
