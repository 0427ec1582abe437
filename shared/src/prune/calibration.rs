//! Calibration: per-channel mean and variance of the inputs of `o_proj` and `down_proj` over a
//! set of token sequences, which FLAP's scores and bias compensation need.
//!
//! Each batch is reduced on the device (masked count, mean and sum of squared deviations per
//! channel, in `f32` over at most [`CALIBRATION_BATCH`] sequences), and batches are merged on the
//! host in `f64` with Chan et al.'s pairwise update, so no sum of squares of raw values is ever
//! formed (the `Σx² − n·mean²` form loses every digit when the mean dwarfs the spread).

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::model::block::ProjectionInput;
use crate::model::{Llama, TokenBatch};

/// Sequences per forward pass. Eight keeps the activations of SmolLM2-sized models at 512
/// tokens to a few hundred megabytes, as `zo::federation::heldout_loss` does.
pub const CALIBRATION_BATCH: usize = 8;

/// Running mean and sum of squared deviations of a set of channels (Welford's `M2`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelStats {
    /// Samples (tokens) seen.
    pub count: u64,
    /// Mean of each channel.
    pub mean: Vec<f64>,
    /// Sum of squared deviations from the mean of each channel.
    pub m2: Vec<f64>,
}

impl ChannelStats {
    /// No samples yet, `width` channels.
    pub fn new(width: usize) -> Self {
        Self {
            count: 0,
            mean: vec![0.0; width],
            m2: vec![0.0; width],
        }
    }

    /// Channels.
    pub fn width(&self) -> usize {
        self.mean.len()
    }

    /// Adds one sample (Welford's update).
    ///
    /// # Panics
    /// When `x` is not `width` long.
    pub fn push(&mut self, x: &[f64]) {
        assert_eq!(x.len(), self.width(), "sample width");
        self.count += 1;
        let n = self.count as f64;
        for ((mean, m2), &x) in self.mean.iter_mut().zip(&mut self.m2).zip(x) {
            let delta = x - *mean;
            *mean += delta / n;
            *m2 += delta * (x - *mean);
        }
    }

    /// Merges the statistics of another set of samples (Chan, Golub and LeVeque's pairwise
    /// update): with `δ = mean_b − mean_a`, `mean = mean_a + δ·n_b/n` and
    /// `M2 = M2_a + M2_b + δ²·n_a·n_b/n`.
    ///
    /// # Panics
    /// When the widths differ.
    pub fn merge(&mut self, other: &ChannelStats) {
        assert_eq!(other.width(), self.width(), "merged widths");
        if other.count == 0 {
            return;
        }
        let (na, nb) = (self.count as f64, other.count as f64);
        let n = na + nb;
        for i in 0..self.width() {
            let delta = other.mean[i] - self.mean[i];
            self.mean[i] += delta * nb / n;
            self.m2[i] += other.m2[i] + delta * delta * na * nb / n;
        }
        self.count += other.count;
    }

    /// Sample variance of each channel, `M2 / (n − 1)` (zero with fewer than two samples).
    pub fn variance(&self) -> Vec<f64> {
        if self.count < 2 {
            return vec![0.0; self.width()];
        }
        let denominator = (self.count - 1) as f64;
        self.m2.iter().map(|m2| m2 / denominator).collect()
    }
}

/// Calibration statistics of one decoder layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    /// The inputs of `o_proj`: the heads' outputs, `num_heads · head_dim` channels.
    pub o_proj: ChannelStats,
    /// The inputs of `down_proj`: `silu(gate) · up`, one per intermediate channel.
    pub down_proj: ChannelStats,
}

/// Calibration statistics of a whole model, one entry per decoder layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationStats {
    /// Per layer, in order.
    pub layers: Vec<LayerStats>,
}

/// The mean inputs of the two projections pruning shrinks along their inputs, for bias
/// compensation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputMeans {
    /// Mean input of `o_proj`, per channel.
    pub o_proj: Vec<f64>,
    /// Mean input of `down_proj`, per channel.
    pub down_proj: Vec<f64>,
}

impl CalibrationStats {
    /// Empty statistics sized for `model`.
    pub fn new(model: &Llama) -> Self {
        let layers = model
            .layers
            .iter()
            .map(|layer| LayerStats {
                o_proj: ChannelStats::new(layer.attention.o_proj.dims().0),
                down_proj: ChannelStats::new(layer.mlp.down_proj.dims().0),
            })
            .collect();
        Self { layers }
    }

    /// Tokens seen (every channel of every layer saw each of them).
    pub fn tokens(&self) -> u64 {
        self.layers.first().map_or(0, |l| l.o_proj.count)
    }

    /// The per-layer mean inputs, for bias compensation.
    pub fn means(&self) -> Vec<InputMeans> {
        self.layers
            .iter()
            .map(|l| InputMeans {
                o_proj: l.o_proj.mean.clone(),
                down_proj: l.down_proj.mean.clone(),
            })
            .collect()
    }

    /// Whether the statistics have the widths of `model`'s projections.
    pub fn fits(&self, model: &Llama) -> bool {
        self.layers.len() == model.layers.len()
            && self.layers.iter().zip(&model.layers).all(|(s, l)| {
                s.o_proj.width() == l.attention.o_proj.dims().0
                    && s.down_proj.width() == l.mlp.down_proj.dims().0
            })
    }
}

/// Runs `model` over `sequences` (each on its own, without padding effects: padded positions
/// are neither attended to nor counted) and collects the per-channel mean and variance of every
/// layer's `o_proj` and `down_proj` inputs, one sample per token. Empty sequences are skipped.
pub fn calibrate(model: &Llama, sequences: &[Vec<u32>]) -> CalibrationStats {
    let device = model.device();
    let mut stats = CalibrationStats::new(model);
    let sequences: Vec<Vec<u32>> = sequences
        .iter()
        .filter(|s| !s.is_empty())
        .cloned()
        .collect();
    for chunk in sequences.chunks(CALIBRATION_BATCH) {
        let batch = TokenBatch::right_padded(chunk, 0, &device);
        let [rows, seq] = batch.dims();
        let count: usize = batch.lengths.iter().sum();
        let mask: Vec<f32> = batch
            .lengths
            .iter()
            .flat_map(|&len| (0..seq).map(move |t| if t < len { 1.0 } else { 0.0 }))
            .collect();
        let mask = Tensor::<3>::from_data(TensorData::new(mask, [rows, seq, 1]), &device);
        let lengths = batch.is_padded().then_some(batch.lengths.as_slice());
        let mut observe = |layer: usize, which: ProjectionInput, input: &Tensor<3>| {
            let batch_stats = masked_stats(input.clone(), &mask, count);
            let layer = &mut stats.layers[layer];
            match which {
                ProjectionInput::OProj => layer.o_proj.merge(&batch_stats),
                ProjectionInput::DownProj => layer.down_proj.merge(&batch_stats),
            }
        };
        let _ = model.hidden_observed(batch.ids.clone(), lengths, None, Some(&mut observe));
    }
    stats
}

/// Count, mean and `M2` per channel of the unmasked positions of one batch.
///
/// # Shapes
/// - input: `[batch, seq, channels]`
/// - mask: `[batch, seq, 1]`, one for real positions, zero for padding
fn masked_stats(input: Tensor<3>, mask: &Tensor<3>, count: usize) -> ChannelStats {
    let width = input.dims()[2];
    let host = |t: Tensor<1>| -> Vec<f64> {
        let values: Vec<f32> = t
            .into_data()
            .try_into_vec_as()
            .expect("activations are float32");
        values.into_iter().map(f64::from).collect()
    };
    let input = input.detach();
    let mean = (input.clone() * mask.clone()).sum_dims_squeeze::<1, _>(&[0, 1]) / count as f64;
    let centred = (input - mean.clone().reshape([1, 1, width])) * mask.clone();
    let m2 = centred.square().sum_dims_squeeze::<1, _>(&[0, 1]);
    ChannelStats {
        count: count as u64,
        mean: host(mean),
        m2: host(m2),
    }
}
