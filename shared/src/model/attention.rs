//! Grouped-query self-attention with rotary embeddings and an additive mask (causal and padding).

use burn::module::Module;
use burn::tensor::Tensor;

use super::kv_cache::KvCache;
use super::linear::Linear;
use super::rope::RopeTables;
use crate::ops::attention::attention;

/// Self-attention where `num_heads` query heads share `num_kv_heads` key/value heads.
///
/// Head counts are per layer, not global, because structured pruning removes heads layer by
/// layer: a query head is its `head_dim` output units of `q_proj` and input units of `o_proj`; a
/// key/value head goes only with its whole group of query heads.
#[derive(Module, Debug)]
pub struct Attention {
    /// `hidden -> num_heads * head_dim`.
    pub q_proj: Linear,
    /// `hidden -> num_kv_heads * head_dim`.
    pub k_proj: Linear,
    /// `hidden -> num_kv_heads * head_dim`.
    pub v_proj: Linear,
    /// `num_heads * head_dim -> hidden`.
    pub o_proj: Linear,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl Attention {
    /// Applies attention to `x`, appending to `cache` (as layer `layer`) when one is given.
    ///
    /// `bias` is added to the attention scores: 0 where a query may look at a key, a large
    /// negative number where it may not (future positions, padding).
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - bias: `[batch or 1, 1, seq, cached + seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        bias: &Tensor<4>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor<3> {
        self.o_proj.forward(self.context(x, rope, bias, cache))
    }

    /// The heads' outputs side by side, before `o_proj`: what [`forward`](Self::forward) feeds
    /// `o_proj`, and what pruning calibration measures (query head `h` is columns
    /// `h * head_dim .. (h + 1) * head_dim`).
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - bias: `[batch or 1, 1, seq, cached + seq]`
    /// - output: `[batch, seq, num_heads * head_dim]`
    pub fn context(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        bias: &Tensor<4>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let (heads, kv_heads, head_dim) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let group = heads / kv_heads;

        let split = |t: Tensor<3>, n: usize| t.reshape([batch, seq, n, head_dim]).swap_dims(1, 2);
        let q = rope.apply(split(self.q_proj.forward(x.clone()), heads));
        let k = rope.apply(split(self.k_proj.forward(x.clone()), kv_heads));
        let v = split(self.v_proj.forward(x), kv_heads);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };

        // Query head h uses key/value head h / group. Folding each group's queries into the
        // sequence axis lets one product serve the group without copying keys per head.
        let q = q.reshape([batch, kv_heads, group * seq, head_dim]);
        let scale = 1.0 / (head_dim as f32).sqrt();
        attention(q, k, v, bias.clone(), scale)
            .reshape([batch, heads, seq, head_dim])
            .swap_dims(1, 2)
            .reshape([batch, seq, heads * head_dim])
    }
}
