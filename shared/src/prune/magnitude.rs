//! Weight magnitude: the baseline importance score of structured pruning (as in Li et al. 2017,
//! "Pruning Filters for Efficient ConvNets", and the `l2` baseline of LLM-Pruner, Ma et al.
//! 2023).

use burn::tensor::Tensor;

use super::units::{LayerScores, LayerShape, head_columns, query_heads};
use crate::model::Llama;
use crate::model::block::DecoderLayer;
use crate::model::linear::Linear;

/// The L2 norm of every weight each unit of `layer` would remove:
///
/// - attention unit `k`: `sqrt(Σ W_q[:, cols]² + Σ W_k[:, kcols]² + Σ W_v[:, kcols]² +
///   Σ W_o[cols, :]²)` with `cols` its query heads' columns and `kcols` its own;
/// - FFN channel `j`: `sqrt(Σ W_gate[:, j]² + Σ W_up[:, j]² + Σ W_down[j, :]²)`.
///
/// Base weights only: biases and LoRA adapters are not counted. The two kinds differ in size
/// (see [`magnitude_rms`] for a score that compares them).
pub fn layer_magnitude(layer: &DecoderLayer) -> LayerScores {
    let shape = LayerShape::of(layer);
    let (g, d) = (shape.group(), shape.head_dim);
    let attention = &layer.attention;
    let q = column_squares(&attention.q_proj);
    let k = column_squares(&attention.k_proj);
    let v = column_squares(&attention.v_proj);
    let o = row_squares(&attention.o_proj);
    let kv_heads = (0..shape.num_kv_heads)
        .map(|kv| {
            let q_cols = head_columns(&query_heads(&[kv], g), d);
            let kv_cols = head_columns(&[kv], d);
            let sum: f64 = q_cols.iter().map(|&c| q[c] + o[c]).sum::<f64>()
                + kv_cols.iter().map(|&c| k[c] + v[c]).sum::<f64>();
            sum.sqrt()
        })
        .collect();
    let mlp = &layer.mlp;
    let gate = column_squares(&mlp.gate_proj);
    let up = column_squares(&mlp.up_proj);
    let down = row_squares(&mlp.down_proj);
    let ffn_channels = (0..shape.intermediate)
        .map(|j| (gate[j] + up[j] + down[j]).sqrt())
        .collect();
    LayerScores {
        kv_heads,
        ffn_channels,
    }
}

/// [`layer_magnitude`] for every layer.
pub fn magnitude_scores(model: &Llama) -> Vec<LayerScores> {
    model.layers.iter().map(layer_magnitude).collect()
}

/// Magnitude scores divided by the square root of the number of weights each unit removes: the
/// root-mean-square weight of the unit. A head removes `2(g + 1)·head_dim/3` times as many
/// weights as a channel, so its plain L2 norm would always look larger; per weight, the two
/// kinds rank on one scale. This is what [`plan_magnitude`](super::plan_magnitude) ranks by.
pub fn magnitude_rms(model: &Llama) -> Vec<LayerScores> {
    model
        .layers
        .iter()
        .map(|layer| {
            let shape = LayerShape::of(layer);
            let per = |params: usize| (params as f64).sqrt();
            let LayerScores {
                kv_heads,
                ffn_channels,
            } = layer_magnitude(layer);
            LayerScores {
                kv_heads: kv_heads
                    .iter()
                    .map(|s| s / per(shape.attention_unit_params()))
                    .collect(),
                ffn_channels: ffn_channels
                    .iter()
                    .map(|s| s / per(shape.ffn_channel_params()))
                    .collect(),
            }
        })
        .collect()
}

/// `Σ_i W[i, j]²` for every column `j` of the stored `[in, out]` weight (per output unit).
pub(crate) fn column_squares(linear: &Linear) -> Vec<f64> {
    host(linear.weight.val().square().sum_dim(0).flatten(0, 1))
}

/// `Σ_j W[i, j]²` for every row `i` of the stored `[in, out]` weight (per input unit).
pub(crate) fn row_squares(linear: &Linear) -> Vec<f64> {
    host(linear.weight.val().square().sum_dim(1).flatten(0, 1))
}

fn host(t: Tensor<1>) -> Vec<f64> {
    let values: Vec<f32> = t
        .into_data()
        .try_into_vec_as()
        .expect("weights are float32");
    values.into_iter().map(f64::from).collect()
}
