//! Applying a plan: every pruned projection becomes a new, smaller [`Linear`], and each layer's
//! head counts follow, so the pruned model holds and computes less.
//!
//! A projection loses either outputs (columns of the stored `[in, out]` weight: `q_proj`,
//! `k_proj`, `v_proj`, `gate_proj`, `up_proj`) or inputs (rows: `o_proj`, `down_proj`). The
//! rule for what goes with them:
//!
//! | removed   | weight `[in, out]` | bias `[out]`         | LoRA `A [in, r]` | LoRA `B [r, out]` |
//! |-----------|--------------------|----------------------|------------------|-------------------|
//! | outputs   | columns            | same entries         | unchanged        | columns           |
//! | inputs    | rows               | + compensation       | rows             | unchanged         |
//!
//! Both are exact for the kept units: an output of `x W + s·x A B` depends on its own columns
//! of `W` and `B` only, and a removed input contributes through its own rows of `W` and `A`
//! only. The adapter's rank never changes.

use burn::module::Param;
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::calibration::InputMeans;
use super::flap::compensation_bias;
use super::kept::KeptUnits;
use super::plan::PrunePlan;
use super::units::{LayerShape, complement};
use crate::model::Llama;
use crate::model::attention::Attention;
use crate::model::block::DecoderLayer;
use crate::model::linear::Linear;
use crate::model::mlp::Mlp;

/// Prunes `model` as `plan` says, returning the smaller model and the record of what each layer
/// kept (the plan's, in the input model's coordinates).
///
/// With compensation means in the plan, each removed input `i` of `o_proj` and `down_proj` adds
/// `mean_i · W[i, :]` to that projection's bias (created if absent; see
/// [`compensation_bias`]).
///
/// The plan's indices are those of `model`: pruning an already pruned model needs a plan in the
/// pruned model's numbering, and the two records compose by indexing
/// (`first.kv_heads[second.kv_heads[i]]`).
///
/// # Panics
/// When the plan does not fit `model` ([`PrunePlan::check`]).
pub fn prune_model(mut model: Llama, plan: &PrunePlan) -> (Llama, Vec<KeptUnits>) {
    if let Err(e) = plan.check(&model) {
        panic!("{e}");
    }
    let layers = std::mem::take(&mut model.layers);
    model.layers = layers
        .into_iter()
        .zip(&plan.keep)
        .enumerate()
        .map(|(i, (layer, kept))| {
            let means = plan.compensation.as_ref().map(|m| &m[i]);
            prune_layer(layer, kept, means)
        })
        .collect();
    (model, plan.keep.clone())
}

/// Prunes one decoder layer to the units in `kept` (checked by the caller), compensating
/// removed inputs with `means` when given.
pub fn prune_layer(
    layer: DecoderLayer,
    kept: &KeptUnits,
    means: Option<&InputMeans>,
) -> DecoderLayer {
    let shape = LayerShape::of(&layer);
    let (g, d) = (shape.group(), shape.head_dim);
    let DecoderLayer {
        input_norm,
        attention,
        post_attention_norm,
        mlp,
    } = layer;
    let attention = if kept.kv_heads.len() < shape.num_kv_heads {
        let Attention {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            head_dim,
            ..
        } = attention;
        let query = kept.query_columns(g, d);
        let kv = kept.kv_columns(d);
        Attention {
            q_proj: keep_outputs(q_proj, &query),
            k_proj: keep_outputs(k_proj, &kv),
            v_proj: keep_outputs(v_proj, &kv),
            o_proj: keep_inputs(o_proj, &query, means.map(|m| m.o_proj.as_slice())),
            num_heads: kept.kv_heads.len() * g,
            num_kv_heads: kept.kv_heads.len(),
            head_dim,
        }
    } else {
        attention
    };
    let mlp = if kept.ffn_channels.len() < shape.intermediate {
        let channels = &kept.ffn_channels;
        Mlp {
            gate_proj: keep_outputs(mlp.gate_proj, channels),
            up_proj: keep_outputs(mlp.up_proj, channels),
            down_proj: keep_inputs(
                mlp.down_proj,
                channels,
                means.map(|m| m.down_proj.as_slice()),
            ),
        }
    } else {
        mlp
    };
    DecoderLayer {
        input_norm,
        attention,
        post_attention_norm,
        mlp,
    }
}

/// The projection restricted to output units `kept` (columns of the weight and of LoRA's `B`,
/// entries of the bias).
pub fn keep_outputs(linear: Linear, kept: &[usize]) -> Linear {
    if kept.len() == linear.dims().1 {
        return linear;
    }
    let index = index_tensor(kept, &linear.weight.val().device());
    let Linear {
        weight,
        bias,
        adapter,
    } = linear;
    Linear {
        weight: weight.map(|w| w.select(1, index.clone())),
        bias: bias.map(|b| b.map(|b| b.select(0, index.clone()))),
        adapter: adapter.map(|mut adapter| {
            adapter.b = adapter.b.map(|b| b.select(1, index.clone()));
            adapter
        }),
    }
}

/// The projection restricted to input units `kept` (rows of the weight and of LoRA's `A`), with
/// FLAP's bias compensation for the removed ones when their `means` (one per input) are given.
pub fn keep_inputs(linear: Linear, kept: &[usize], means: Option<&[f64]>) -> Linear {
    let (d_input, _) = linear.dims();
    if kept.len() == d_input {
        return linear;
    }
    let compensation =
        means.map(|means| compensation_bias(&linear, &complement(kept, d_input), means));
    let index = index_tensor(kept, &linear.weight.val().device());
    let Linear {
        weight,
        bias,
        adapter,
    } = linear;
    let bias = match (bias, compensation) {
        (Some(bias), Some(extra)) => Some(bias.map(|b| b + extra)),
        (None, Some(extra)) => Some(Param::from_tensor(extra)),
        (bias, None) => bias,
    };
    Linear {
        weight: weight.map(|w| w.select(0, index.clone())),
        bias,
        adapter: adapter.map(|mut adapter| {
            adapter.a = adapter.a.map(|a| a.select(0, index.clone()));
            adapter
        }),
    }
}

/// `indices` as the index tensor `select` takes.
pub(crate) fn index_tensor(indices: &[usize], device: &Device) -> Tensor<1, Int> {
    let values: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(values, [indices.len()]), device)
}
