//! Importance of pruning units from the LoRA adapters' gradients, during tuning (FedSpine's
//! client-side score, after LoRAPrune: Zhang et al. 2024, "LoRAPrune: Structured Pruning Meets
//! Low-Rank Parameter-Efficient Fine-Tuning", §3.2).
//!
//! The base weights are frozen, so their gradient is never computed; LoRAPrune estimates it
//! from the adapters'. In PEFT's orientation (`ΔW = B A`), one step moves the adapter's product
//! by `(B − dB)(A − dA) − B A = −[(dB) A + B (dA) − (dB)(dA)]`, so
//!
//! ```text
//! G = (dB) A + B (dA) − (dB)(dA)          (the estimated weight gradient)
//! I = | G ⊙ (W + s · B A) |               (first-order Taylor importance of each weight)
//! ```
//!
//! fedtune stores `W` as `[in, out]` and `A` `[in, r]`, `B` `[r, out]` (`ΔW = s·A B`), so the
//! same quantity is `G = A (dB) + (dA) B − (dA)(dB)` there. A unit's score is `I` summed over
//! the weights it removes ([`super::units`]: a key/value head's q/k/v columns and o rows, an FFN
//! channel's gate/up columns and down row), divided by that count (a per-weight score, so heads
//! and channels compare, as [`super::magnitude_rms`]), then normalised per layer by the layer's
//! mean per-weight importance, and smoothed across steps with an exponential moving average
//! `Ī ← λ Ī + (1 − λ) I` (λ = 0.9, LoRAPrune's choice; Ī starts at zero).
//!
//! Projections without an adapter contribute nothing (no gradient estimate exists for them):
//! FedSpine adapts all seven projections so that every unit is scored.

use burn::optim::GradientsParams;
use burn::tensor::Tensor;

use super::kept::KeptUnits;
use super::units::{LayerScores, LayerShape, head_columns, query_heads};
use crate::lora::adapter::TargetModule;
use crate::lora::attach::projection;
use crate::model::Llama;
use crate::model::block::DecoderLayer;
use crate::model::linear::Linear;

/// LoRAPrune's moving-average factor λ.
pub const DEFAULT_EMA: f64 = 0.9;

/// The smoothed LoRA-gradient importance of every unit of a model as it is pruned.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraImportance {
    ema: f64,
    scores: Vec<LayerScores>,
    observations: usize,
}

impl LoraImportance {
    /// Zero scores for every unit of `model`, smoothed with factor `ema` (λ).
    pub fn new(model: &Llama, ema: f64) -> Self {
        let scores = model
            .layers
            .iter()
            .map(|layer| {
                let shape = LayerShape::of(layer);
                LayerScores {
                    kv_heads: vec![0.0; shape.num_kv_heads],
                    ffn_channels: vec![0.0; shape.intermediate],
                }
            })
            .collect();
        Self {
            ema,
            scores,
            observations: 0,
        }
    }

    /// The smoothed scores (higher: more important), one entry per unit of the model as last
    /// restricted.
    pub fn scores(&self) -> &[LayerScores] {
        &self.scores
    }

    /// Steps observed so far.
    pub fn observations(&self) -> usize {
        self.observations
    }

    /// Folds one step's gradients into the average: `Ī ← λ Ī + (1 − λ) I` with `I` the
    /// per-layer normalised scores of [`layer_importance`].
    pub fn observe(&mut self, model: &Llama, grads: &GradientsParams) {
        for (smoothed, layer) in self.scores.iter_mut().zip(&model.layers) {
            let fresh = layer_importance(layer, grads);
            let blend = |old: &mut Vec<f64>, new: &[f64]| {
                old.iter_mut()
                    .zip(new)
                    .for_each(|(o, &n)| *o = self.ema * *o + (1.0 - self.ema) * n);
            };
            blend(&mut smoothed.kv_heads, &fresh.kv_heads);
            blend(&mut smoothed.ffn_channels, &fresh.ffn_channels);
        }
        self.observations += 1;
    }

    /// Keeps the scores of the units in `kept` (in the numbering of the model the scores were
    /// made on), after that model was pruned to them.
    pub fn restrict(&mut self, kept: &[KeptUnits]) {
        for (scores, k) in self.scores.iter_mut().zip(kept) {
            scores.kv_heads = k.kv_heads.iter().map(|&h| scores.kv_heads[h]).collect();
            scores.ffn_channels = k
                .ffn_channels
                .iter()
                .map(|&c| scores.ffn_channels[c])
                .collect();
        }
    }
}

/// One step's importance of every unit of `layer`, normalised per layer (see the
/// [module docs](self)); zero for a layer without adapter gradients.
pub fn layer_importance(layer: &DecoderLayer, grads: &GradientsParams) -> LayerScores {
    let shape = LayerShape::of(layer);
    let (g, d) = (shape.group(), shape.head_dim);
    let per = |target, by_rows: bool| -> Option<Vec<f64>> {
        let linear = projection(layer, target);
        let i = weight_importance(linear, grads)?;
        Some(host(if by_rows {
            i.sum_dim(1).flatten(0, 1)
        } else {
            i.sum_dim(0).flatten(0, 1)
        }))
    };
    let q = per(TargetModule::QProj, false);
    let k = per(TargetModule::KProj, false);
    let v = per(TargetModule::VProj, false);
    let o = per(TargetModule::OProj, true);
    let gate = per(TargetModule::GateProj, false);
    let up = per(TargetModule::UpProj, false);
    let down = per(TargetModule::DownProj, true);
    let at = |s: &Option<Vec<f64>>, i: usize| s.as_ref().map_or(0.0, |s| s[i]);

    let head_params = shape.attention_unit_params() as f64;
    let channel_params = shape.ffn_channel_params() as f64;
    let mut kv_heads: Vec<f64> = (0..shape.num_kv_heads)
        .map(|kv| {
            let q_cols = head_columns(&query_heads(&[kv], g), d);
            let kv_cols = head_columns(&[kv], d);
            q_cols.iter().map(|&c| at(&q, c) + at(&o, c)).sum::<f64>()
                + kv_cols.iter().map(|&c| at(&k, c) + at(&v, c)).sum::<f64>()
        })
        .collect();
    let mut ffn_channels: Vec<f64> = (0..shape.intermediate)
        .map(|j| at(&gate, j) + at(&up, j) + at(&down, j))
        .collect();
    // The layer's mean importance per weight: Σ over units / Σ of their weights.
    let total: f64 = kv_heads.iter().chain(&ffn_channels).sum();
    let mean = total / shape.prunable_params().max(1) as f64;
    let normalise = |s: &mut f64, params: f64| {
        *s = if mean > 0.0 && mean.is_finite() {
            *s / params / mean
        } else {
            0.0
        }
    };
    kv_heads.iter_mut().for_each(|s| normalise(s, head_params));
    ffn_channels
        .iter_mut()
        .for_each(|s| normalise(s, channel_params));
    LayerScores {
        kv_heads,
        ffn_channels,
    }
}

/// `|G ⊙ (W + s A B)|`, `[in, out]`, for a projection whose adapter has gradients in `grads`.
pub fn weight_importance(linear: &Linear, grads: &GradientsParams) -> Option<Tensor<2>> {
    let adapter = linear.adapter.as_ref()?;
    let da = grads.get::<2>(adapter.a.id)?;
    let db = grads.get::<2>(adapter.b.id)?;
    let a = adapter.a.val().inner();
    let b = adapter.b.val().inner();
    let w = linear.weight.val().inner();
    let g = a.clone().matmul(db.clone()) + da.clone().matmul(b.clone()) - da.matmul(db);
    let merged = w + a.matmul(b) * adapter.scale;
    Some((g * merged).abs())
}

fn host(t: Tensor<1>) -> Vec<f64> {
    let values: Vec<f32> = t
        .into_data()
        .try_into_vec_as()
        .expect("importance is float32");
    values.into_iter().map(f64::from).collect()
}
