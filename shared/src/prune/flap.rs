//! FLAP's fluctuation metric (An, Zhao, Yu, Tang and Wang, "Fluctuation-based Adaptive
//! Structured Pruning for Large Language Models", AAAI 2024; their code's `WIFV` metric with the
//! `AL-AM` global structure). Forward passes only: no gradient, no retraining.
//!
//! An input channel `j` of `o_proj` or `down_proj` whose value barely changes from token to
//! token can be replaced by its mean, and the mean folded into the projection's bias (see
//! [`compensation_bias`]). How much the output moves when it is replaced is measured by
//!
//! `S_j = Var(x_j) · ‖W[j, :]‖²`
//!
//! with `Var` the sample variance over calibration tokens and `W[j, :]` row `j` of the stored
//! `[in, out]` weight (column `j` of the checkpoint's `[out, in]`). Scores of different layers
//! and of the two unit kinds are made comparable by standardising them per layer and kind
//! ([`standardise`]); the global choice weighs each unit by its parameter cost
//! ([`select`](super::select)).
//!
//! Statistics are those of the unpruned model for every layer, as in FLAP's global (`AL-AM`)
//! mode. One difference from their code: it squares the attention channels' scores
//! (`W_metric ** 2` for `o_proj`) before standardising; here both kinds use the paper's
//! `S_j` as written.

use burn::tensor::{Tensor, TensorData};

use super::calibration::{CalibrationStats, ChannelStats, LayerStats};
use super::magnitude::row_squares;
use super::structural::index_tensor;
use super::units::{LayerScores, LayerShape, head_columns, query_heads};
use crate::model::Llama;
use crate::model::block::DecoderLayer;
use crate::model::linear::Linear;

/// FLAP's per-input-channel fluctuation `S_j = Var(x_j) · ‖W[j, :]‖²` of a projection whose
/// inputs have statistics `inputs` (sample variance, `n − 1` denominator, as FLAP's running
/// estimate).
///
/// # Panics
/// When the statistics' width is not the projection's input width.
pub fn channel_fluctuation(projection: &Linear, inputs: &ChannelStats) -> Vec<f64> {
    let rows = row_squares(projection);
    assert_eq!(
        rows.len(),
        inputs.width(),
        "statistics and projection widths"
    );
    inputs
        .variance()
        .iter()
        .zip(&rows)
        .map(|(var, norm)| var * norm)
        .collect()
}

/// `(s − mean) / std` over `scores`, with the sample standard deviation (`n − 1`, as
/// `torch.std` in FLAP's code). All zeros when there are fewer than two scores or they are all
/// equal: nothing distinguishes them.
pub fn standardise(scores: &[f64]) -> Vec<f64> {
    let n = scores.len();
    if n < 2 {
        return vec![0.0; n];
    }
    let mean = scores.iter().sum::<f64>() / n as f64;
    let var = scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let std = var.sqrt();
    if !(std > 0.0 && std.is_finite()) {
        return vec![0.0; n];
    }
    scores.iter().map(|s| (s - mean) / std).collect()
}

/// FLAP scores of one layer's units, comparable across layers and kinds:
///
/// - FFN channel `j`: `standardise(S^down)_j`, the fluctuation of `down_proj`'s input `j`
///   standardised over the layer's channels;
/// - attention unit `k`: the mean of `standardise(S^o)` over the `g·head_dim` input channels of
///   `o_proj` that its query group owns, `S^o` standardised over all of the layer's
///   `num_heads·head_dim` channels.
///
/// Attention channels are standardised before they are pooled per unit, as FLAP's code does
/// (`standarlization`, then `reshape(layers, -1, head_dim).mean(2)`): with grouped-query
/// attention a layer has only two or three units, and standardising two pooled sums would give
/// every layer the same `±0.71`, erasing the differences between layers that the global
/// ranking needs. Pooled by the mean, a unit's score stays on the per-channel scale the FFN
/// channels are on. (The raw pooled sum is [`attention_fluctuation`].)
pub fn layer_flap_scores(layer: &DecoderLayer, stats: &LayerStats) -> LayerScores {
    let shape = LayerShape::of(layer);
    let (g, d) = (shape.group(), shape.head_dim);
    let attention = standardise(&channel_fluctuation(&layer.attention.o_proj, &stats.o_proj));
    let kv_heads = (0..shape.num_kv_heads)
        .map(|kv| {
            let cols = head_columns(&query_heads(&[kv], g), d);
            cols.iter().map(|&c| attention[c]).sum::<f64>() / cols.len() as f64
        })
        .collect();
    LayerScores {
        kv_heads,
        ffn_channels: standardise(&channel_fluctuation(&layer.mlp.down_proj, &stats.down_proj)),
    }
}

/// The unstandardised fluctuation of each attention unit of `layer`: `Σ S^o_c` over the
/// `g·head_dim` input channels `c` of `o_proj` its query group owns.
pub fn attention_fluctuation(layer: &DecoderLayer, stats: &LayerStats) -> Vec<f64> {
    let shape = LayerShape::of(layer);
    let channels = channel_fluctuation(&layer.attention.o_proj, &stats.o_proj);
    (0..shape.num_kv_heads)
        .map(|kv| {
            head_columns(&query_heads(&[kv], shape.group()), shape.head_dim)
                .iter()
                .map(|&c| channels[c])
                .sum()
        })
        .collect()
}

/// [`layer_flap_scores`] for every layer.
///
/// # Panics
/// When `stats` was not collected on a model of `model`'s shape.
pub fn flap_scores(model: &Llama, stats: &CalibrationStats) -> Vec<LayerScores> {
    assert!(
        stats.fits(model),
        "calibration statistics do not fit the model"
    );
    model
        .layers
        .iter()
        .zip(&stats.layers)
        .map(|(layer, stats)| layer_flap_scores(layer, stats))
        .collect()
}

/// FLAP's bias compensation for removing input channels `pruned` of `projection`:
/// `b' = W[pruned, :]ᵀ · mean[pruned]`, what the removed inputs contributed on average, to be
/// added to the projection's bias. With a LoRA adapter attached, its share of those inputs
/// (`s · A[pruned, :] B`, frozen at its current value) is compensated too, since its pruned rows
/// go with the inputs.
///
/// # Shapes
/// - output: `[d_output]`
///
/// # Panics
/// When `pruned` is empty or `means` is not as long as the projection's inputs.
pub fn compensation_bias(projection: &Linear, pruned: &[usize], means: &[f64]) -> Tensor<1> {
    let (d_input, d_output) = projection.dims();
    assert_eq!(means.len(), d_input, "means and projection widths");
    assert!(!pruned.is_empty(), "nothing pruned to compensate");
    let device = projection.weight.val().device();
    let index = index_tensor(pruned, &device);
    let mut rows = projection.weight.val().select(0, index.clone());
    if let Some(adapter) = &projection.adapter {
        rows = rows + adapter.a.val().select(0, index).matmul(adapter.b.val()) * adapter.scale;
    }
    let mean: Vec<f32> = pruned.iter().map(|&i| means[i] as f32).collect();
    let mean = Tensor::<2>::from_data(TensorData::new(mean, [1, pruned.len()]), &device);
    mean.matmul(rows).reshape([d_output])
}
