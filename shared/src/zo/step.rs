//! One two-point zeroth-order step (MeZO, as FedKSeed's clients run it): the gradient along a
//! seeded direction `z` estimated from two losses, and the update applied along the same `z`.

use burn::module::Module;
use serde::{Deserialize, Serialize};

use super::perturb::add_noise;
use crate::noise::SeedNoise;

/// Step hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ZoStepConfig {
    /// Perturbation scale ε.
    pub eps: f32,
    /// Learning rate.
    pub lr: f32,
}

impl Default for ZoStepConfig {
    /// FedKSeed's defaults for full-model tuning: ε = 5e-4, lr = 3e-7.
    fn default() -> Self {
        Self {
            eps: 5e-4,
            lr: 3e-7,
        }
    }
}

/// What a step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// The projected gradient `g = (L+ - L-) / 2ε`; `None` when a loss was not finite and the
    /// step was skipped.
    pub g: Option<f32>,
    /// `(L+ + L-) / 2`, an estimate of the loss at the current weights.
    pub loss: f32,
}

/// Successive zeroth-order steps on one model.
///
/// Step `t`: `w += ε z_t` → `L+`; `w -= 2ε z_t` → `L-`; `g = (L+ - L-) / 2ε`; then the restore
/// and the update `w += (ε - lr g) z_t`. That last pass is not applied on its own: it is merged
/// into step `t + 1`'s perturbation, `w += (ε - lr g_t) z_t` then `w += ε z_{t+1}` in the same
/// pass over the weights ([`add_noise`] with two terms, each chunk of weights updated by both
/// while it is in cache). A step thus generates noise three times but reads and writes the
/// weights twice; [`finish`](Self::finish) applies the last pending update.
///
/// Merging changes rounding: the weights after a step are `w - lr g z` up to the rounding of
/// the adds, not bit for bit. That never reaches the global model: a round's local weights are
/// discarded and every party rebuilds the global model by replaying seeds from the last global
/// one (see [`super::round`]).
///
/// Peak memory is the model plus one small noise buffer per core: the weights are updated in
/// place on the device that holds them.
pub struct ZoSteps<M> {
    /// Always `Some` between calls; taken while [`add_noise`] consumes and rebuilds it.
    model: Option<M>,
    config: ZoStepConfig,
    /// The restore-and-update term of the previous step, not yet applied.
    pending: Option<(SeedNoise, f32)>,
}

impl<M: Module> ZoSteps<M> {
    /// Starts stepping `model`.
    pub fn new(model: M, config: ZoStepConfig) -> Self {
        Self {
            model: Some(model),
            config,
            pending: None,
        }
    }

    /// One step along `noise`'s direction; `loss` evaluates the model on this step's batch.
    pub fn step(&mut self, noise: SeedNoise, mut loss: impl FnMut(&M) -> f32) -> StepOutcome {
        let eps = self.config.eps;
        let mut terms: Vec<(SeedNoise, f32)> = self.pending.take().into_iter().collect();
        terms.push((noise, eps));
        let plus = loss(self.apply(&terms));
        let minus = loss(self.apply(&[(noise, -2.0 * eps)]));
        if !plus.is_finite() || !minus.is_finite() {
            self.pending = Some((noise, eps));
            return StepOutcome {
                g: None,
                loss: f32::NAN,
            };
        }
        let g = (plus - minus) / (2.0 * eps);
        self.pending = Some((noise, eps - self.config.lr * g));
        StepOutcome {
            g: Some(g),
            loss: (plus + minus) / 2.0,
        }
    }

    /// Applies the pending update and returns the model.
    pub fn finish(mut self) -> M {
        let pending: Vec<_> = self.pending.take().into_iter().collect();
        self.apply(&pending);
        self.model
            .take()
            .expect("the model is present between steps")
    }

    /// Adds the terms to the weights and returns the model. The model is moved, not cloned, so
    /// each weight tensor has one owner and the add can reuse its memory.
    fn apply(&mut self, terms: &[(SeedNoise, f32)]) -> &M {
        let model = self
            .model
            .take()
            .expect("the model is present between steps");
        self.model.insert(add_noise(model, terms))
    }
}
