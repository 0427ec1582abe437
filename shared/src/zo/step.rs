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

/// `w += ε z` → `L+`; `w -= 2ε z` → `L-`; `g = (L+ - L-) / 2ε`; `w += (ε - lr g) z`.
///
/// The last pass fuses the restore (`+ε z`) with the update (`-lr g z`): one rounding per weight
/// instead of two, so the weights after a step are `w - lr g z` up to the rounding of the three
/// adds, not bit for bit. That never reaches the global model: a round's local weights are
/// discarded and every party rebuilds the global model by replaying seeds from the last global
/// one (see [`super::round`]).
///
/// Peak memory is the model plus one parameter tensor of noise.
pub fn zo_step<M: Module>(
    model: M,
    noise: SeedNoise,
    config: ZoStepConfig,
    mut loss: impl FnMut(&M) -> f32,
) -> (M, StepOutcome) {
    let model = add_noise(model, &[(noise, config.eps)]);
    let plus = loss(&model);
    let model = add_noise(model, &[(noise, -2.0 * config.eps)]);
    let minus = loss(&model);
    if !plus.is_finite() || !minus.is_finite() {
        let model = add_noise(model, &[(noise, config.eps)]);
        return (
            model,
            StepOutcome {
                g: None,
                loss: f32::NAN,
            },
        );
    }
    let g = (plus - minus) / (2.0 * config.eps);
    let model = add_noise(model, &[(noise, config.eps - config.lr * g)]);
    (
        model,
        StepOutcome {
            g: Some(g),
            loss: (plus + minus) / 2.0,
        },
    )
}
