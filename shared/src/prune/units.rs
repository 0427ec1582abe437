//! What structured pruning removes: the two kinds of unit, where their weights sit in the
//! stored `[in, out]` projections, and what each costs in parameters.
//!
//! - An **attention unit** is one key/value head together with its whole group of query heads
//!   (grouped-query attention cannot drop a query head alone without breaking the group, nor a
//!   key/value head while queries still read it). With `g = num_heads / num_kv_heads` and
//!   `d = head_dim`, key/value head `k` owns query heads `k·g .. (k+1)·g`, so it removes
//!   - columns `k·g·d .. (k+1)·g·d` of `q_proj`'s stored weight (its query heads' outputs),
//!   - columns `k·d .. (k+1)·d` of `k_proj` and `v_proj`,
//!   - rows `k·g·d .. (k+1)·g·d` of `o_proj` (the same query heads, now as inputs).
//! - An **FFN unit** is one intermediate channel `j`: column `j` of `gate_proj` and `up_proj`,
//!   row `j` of `down_proj`.
//!
//! Costs count the weights of these seven projections only (biases, norms and embeddings are
//! not prunable here): an attention unit costs `hidden·d·(2g + 2)`, an FFN channel `3·hidden`.

use crate::model::Llama;
use crate::model::block::DecoderLayer;

/// The kind of a pruning unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum UnitKind {
    /// A key/value head with its group of query heads.
    Attention,
    /// One intermediate channel of the SwiGLU MLP.
    Ffn,
}

/// One pruning unit of a model, in the coordinates of the model it was scored on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Unit {
    /// Decoder layer.
    pub layer: usize,
    /// Attention unit or FFN channel.
    pub kind: UnitKind,
    /// The key/value head or the intermediate channel.
    pub index: usize,
}

/// A score for every unit of one layer (higher means more important, kept longer).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LayerScores {
    /// One per key/value head (its whole query group included).
    pub kv_heads: Vec<f64>,
    /// One per intermediate channel.
    pub ffn_channels: Vec<f64>,
}

/// One decoder layer's sizes, read from its tensors (layers differ once pruned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerShape {
    /// Width of the residual stream.
    pub hidden: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Intermediate channels of the MLP.
    pub intermediate: usize,
}

impl LayerShape {
    /// The shape of `layer`.
    pub fn of(layer: &DecoderLayer) -> Self {
        let attention = &layer.attention;
        Self {
            hidden: attention.q_proj.dims().0,
            num_heads: attention.num_heads,
            num_kv_heads: attention.num_kv_heads,
            head_dim: attention.head_dim,
            intermediate: layer.mlp.intermediate_size(),
        }
    }

    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Parameters one attention unit removes: `hidden·d·g` (q) + `2·hidden·d` (k, v) +
    /// `g·d·hidden` (o).
    pub fn attention_unit_params(&self) -> usize {
        self.hidden * self.head_dim * (2 * self.group() + 2)
    }

    /// Parameters one FFN channel removes: a column of `gate_proj` and `up_proj`, a row of
    /// `down_proj`.
    pub fn ffn_channel_params(&self) -> usize {
        3 * self.hidden
    }

    /// Parameters a unit of `kind` removes.
    pub fn unit_params(&self, kind: UnitKind) -> usize {
        match kind {
            UnitKind::Attention => self.attention_unit_params(),
            UnitKind::Ffn => self.ffn_channel_params(),
        }
    }

    /// Weights of the layer's seven projections.
    pub fn prunable_params(&self) -> usize {
        self.num_kv_heads * self.attention_unit_params()
            + self.intermediate * self.ffn_channel_params()
    }
}

/// Weights in the attention and MLP projections of every layer: what a pruning ratio is a
/// fraction of.
pub fn prunable_params(model: &Llama) -> usize {
    model
        .layers
        .iter()
        .map(|layer| LayerShape::of(layer).prunable_params())
        .sum()
}

/// Every weight of the model, adapters aside: embeddings, output head, norms, the projections
/// and their biases. What [`RatioBasis::Total`](super::RatioBasis::Total) is a fraction of (the
/// "pruning ratio" of LLM-Pruner and FLAP), and what structured pruning can at best shrink by
/// the [`prunable_params`] share.
pub fn model_params(model: &Llama) -> usize {
    let linear = |l: &crate::model::linear::Linear| {
        let (d_input, d_output) = l.dims();
        d_input * d_output + l.bias.as_ref().map_or(0, |b| b.dims()[0])
    };
    let [vocab, hidden] = model.embed_tokens.dims();
    let layers: usize = model
        .layers
        .iter()
        .map(|layer| {
            let (a, m) = (&layer.attention, &layer.mlp);
            [
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &m.gate_proj,
                &m.up_proj,
                &m.down_proj,
            ]
            .into_iter()
            .map(linear)
            .sum::<usize>()
                + layer.input_norm.gamma.dims()[0]
                + layer.post_attention_norm.gamma.dims()[0]
        })
        .sum();
    vocab * hidden + layers + model.norm.gamma.dims()[0] + model.lm_head.as_ref().map_or(0, linear)
}

/// The query heads of key/value heads `kv_heads` (each `k` owns `k·group .. (k+1)·group`).
pub fn query_heads(kv_heads: &[usize], group: usize) -> Vec<usize> {
    kv_heads
        .iter()
        .flat_map(|&k| k * group..(k + 1) * group)
        .collect()
}

/// The `head_dim`-wide blocks of columns (or rows) that heads `heads` occupy.
pub fn head_columns(heads: &[usize], head_dim: usize) -> Vec<usize> {
    heads
        .iter()
        .flat_map(|&h| h * head_dim..(h + 1) * head_dim)
        .collect()
}

/// The indices of `0..len` not in `kept` (which must be ascending).
pub fn complement(kept: &[usize], len: usize) -> Vec<usize> {
    let mut kept = kept.iter().peekable();
    (0..len)
        .filter(|i| {
            if kept.peek() == Some(&i) {
                kept.next();
                false
            } else {
                true
            }
        })
        .collect()
}
