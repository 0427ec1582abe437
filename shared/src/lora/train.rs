//! The client's local LoRA training: AdamW on the adapters only, global gradient-norm clipping,
//! linear warm-up then cosine decay, and a loss on response tokens only.

use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::eval::next_token_nll;
use crate::model::{Llama, TokenBatch};
use crate::peak_memory;
use crate::progress::{Progress, StepProgress};

/// One training sequence: the loss covers `ids[t]` for `t ≥ prompt_len` (never `t = 0`, which
/// nothing predicts). `prompt_len = 0` trains on the whole text; for instruction data it is the
/// length of the rendered prompt, so the model learns the answers and not the questions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainExample {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Tokens at the start excluded from the loss.
    pub prompt_len: usize,
}

impl TrainExample {
    /// A plain-text example: every token after the first is a target.
    pub fn text(ids: Vec<u32>) -> Self {
        Self { ids, prompt_len: 0 }
    }

    /// Target positions this example contributes to a loss.
    pub fn targets(&self) -> usize {
        self.ids.len().saturating_sub(self.prompt_len.max(1))
    }
}

/// Optimiser and schedule settings (the usual PEFT fine-tuning defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f32,
    /// AdamW's β₁.
    pub beta_1: f32,
    /// AdamW's β₂.
    pub beta_2: f32,
    /// AdamW's ε.
    pub epsilon: f32,
    /// Clip the global gradient norm to this (`None`: no clipping).
    pub max_grad_norm: Option<f32>,
    /// Steps of linear warm-up from 0 to `lr`.
    pub warmup_steps: usize,
    /// Steps over which the rate decays (cosine) to `min_lr_ratio · lr`; later steps keep it.
    pub decay_steps: usize,
    /// The floor of the decay, relative to `lr`.
    pub min_lr_ratio: f64,
    /// Sequences per step.
    pub batch_size: usize,
    /// Padding token.
    pub pad_id: u32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            weight_decay: 0.01,
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            max_grad_norm: Some(1.0),
            warmup_steps: 10,
            decay_steps: 1000,
            min_lr_ratio: 0.1,
            batch_size: 1,
            pad_id: 0,
        }
    }
}

impl TrainConfig {
    /// The learning rate of step `step` (from 0).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let progress =
            ((step - self.warmup_steps) as f64 / self.decay_steps.max(1) as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
    }

    fn optimizer(&self) -> ModuleOptimizer {
        AdamWConfig::new()
            .with_beta_1(self.beta_1)
            .with_beta_2(self.beta_2)
            .with_epsilon(self.epsilon)
            .with_weight_decay(self.weight_decay)
            .init()
    }
}

/// The mean next-token NLL over the batch's target positions, differentiable.
///
/// Returns `None` when no example has a target.
pub fn response_loss(model: &Llama, examples: &[TrainExample], pad_id: u32) -> Option<Tensor<1>> {
    let rows: Vec<Vec<u32>> = examples.iter().map(|e| e.ids.clone()).collect();
    let seq = rows.iter().map(Vec::len).max().unwrap_or(0);
    let count: usize = examples.iter().map(TrainExample::targets).sum();
    if seq < 2 || count == 0 {
        return None;
    }
    let device = model.device();
    // Position t predicts token t + 1: a target when t + 1 is past the prompt and not padding.
    let mut mask = Vec::with_capacity(rows.len() * (seq - 1));
    for e in examples {
        let first = e.prompt_len.max(1);
        mask.extend((1..seq).map(|t| f32::from(u8::from(t >= first && t < e.ids.len()))));
    }
    let mask = Tensor::<2>::from_data(TensorData::new(mask, [rows.len(), seq - 1]), &device);
    let batch = TokenBatch::right_padded(&rows, pad_id, &device);
    let nll = next_token_nll(model, &batch);
    Some((nll * mask).sum() / count as f32)
}

/// What one local round did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    /// Loss of the first step (before any update this round).
    pub first_loss: f32,
    /// Mean loss over the round's steps.
    pub mean_loss: f32,
    /// Steps taken (a step whose loss is not finite is skipped and not counted).
    pub steps: usize,
    /// Training sequences seen.
    pub samples: u64,
    /// Wall time of the round.
    pub wall_s: f64,
    /// The process's peak resident memory during the round, where the OS reports it.
    pub peak_rss_bytes: Option<u64>,
}

/// Successive AdamW steps on a model's adapters.
pub struct LoraTrainer {
    config: TrainConfig,
    optimizer: ModuleOptimizer,
    step: usize,
}

impl LoraTrainer {
    /// A trainer with fresh optimizer state, its schedule at step `first_step`.
    pub fn new(config: TrainConfig, first_step: usize) -> Self {
        Self {
            optimizer: config.optimizer(),
            config,
            step: first_step,
        }
    }

    /// The schedule's next step.
    pub fn next_step(&self) -> usize {
        self.step
    }

    /// One step on `examples`: forward, backward, clipping, AdamW. Returns the updated model and
    /// the loss before the update, or the model unchanged and `None` when the loss is not finite
    /// or the batch has no target.
    ///
    /// `model` must live on an autodiff device with its base frozen (see
    /// [`super::attach::attach_fresh`]).
    pub fn step(&mut self, model: Llama, examples: &[TrainExample]) -> (Llama, Option<f32>) {
        self.step_observed(model, examples, |_, _| {})
    }

    /// [`Self::step`], showing the step's gradients (before clipping) to `observe` before the
    /// update: how pruning during tuning scores units from the adapters' gradients
    /// ([`crate::prune::lora_importance`]).
    pub fn step_observed(
        &mut self,
        model: Llama,
        examples: &[TrainExample],
        observe: impl FnOnce(&Llama, &GradientsParams),
    ) -> (Llama, Option<f32>) {
        let Some(loss) = response_loss(&model, examples, self.config.pad_id) else {
            return (model, None);
        };
        let value: f32 = loss.clone().into_scalar::<f32>();
        if !value.is_finite() {
            tracing::warn!(loss = value, "skipping a step with a non-finite loss");
            return (model, None);
        }
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        observe(&model, &grads);
        if let Some(max_norm) = self.config.max_grad_norm {
            clip_global_norm(&model, &mut grads, max_norm);
        }
        let lr = self.config.lr_at(self.step);
        self.step += 1;
        (self.optimizer.step(lr, model, grads), Some(value))
    }

    /// `steps` steps on batches drawn with replacement from `data`.
    ///
    /// # Panics
    /// When `data` is empty.
    pub fn train_round(
        &mut self,
        mut model: Llama,
        data: &[TrainExample],
        steps: usize,
        rng: &mut impl Rng,
        progress: &mut impl Progress,
    ) -> (Llama, RoundReport) {
        assert!(!data.is_empty(), "a round needs training data");
        // The round's dropout masks come from the same generator as its batches, so a round is
        // reproducible from the seed it was planned with.
        super::attach::reseed_dropout(&model, rng);
        peak_memory::reset_peak_rss();
        let start = Instant::now();
        let mut losses = Vec::with_capacity(steps);
        let mut samples = 0u64;
        for done in 1..=steps {
            let batch: Vec<TrainExample> = (0..self.config.batch_size.max(1))
                .map(|_| data[rng.random_range(0..data.len())].clone())
                .collect();
            let loss;
            (model, loss) = self.step(model, &batch);
            if let Some(loss) = loss {
                losses.push(loss);
                samples += batch.len() as u64;
            }
            progress.step_done(StepProgress {
                step: done,
                steps,
                loss,
            });
        }
        let report = RoundReport {
            first_loss: losses.first().copied().unwrap_or(f32::NAN),
            mean_loss: losses.iter().sum::<f32>() / losses.len().max(1) as f32,
            steps: losses.len(),
            samples,
            wall_s: start.elapsed().as_secs_f64(),
            peak_rss_bytes: peak_memory::peak_rss_bytes(),
        };
        (model, report)
    }
}

/// Scales every gradient by `min(1, max_norm / ‖g‖)` where `‖g‖` is the norm of all gradients
/// together, as PyTorch's `clip_grad_norm_` (what PEFT training uses) does. burn's own
/// `GradientClipping::Norm` clips each tensor by its own norm, which changes the direction of the
/// update. Returns the norm before clipping.
pub fn clip_global_norm(model: &Llama, grads: &mut GradientsParams, max_norm: f32) -> f32 {
    struct SumSquares<'a> {
        grads: &'a GradientsParams,
        total: Option<Tensor<1>>,
    }
    impl ModuleVisitor for SumSquares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let s = g.square().sum();
                self.total = Some(match self.total.take() {
                    Some(t) => t + s,
                    None => s,
                });
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f32,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads.register(param.id, g * self.factor);
            }
        }
    }

    let mut sum = SumSquares { grads, total: None };
    model.visit(&mut sum);
    let Some(total) = sum.total else {
        return 0.0;
    };
    let norm = total.into_scalar::<f32>().sqrt();
    if norm > max_norm {
        let factor = max_norm / (norm + 1e-6);
        model.visit(&mut Scale { grads, factor });
    }
    norm
}

/// The device to train on: `device` with autodiff.
pub fn training_device(device: &Device) -> Device {
    device.clone().autodiff()
}
