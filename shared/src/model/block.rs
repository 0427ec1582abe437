//! One pre-norm decoder layer: `x + attn(norm(x))`, then `h + mlp(norm(h))`.

use burn::module::Module;
use burn::nn::RmsNorm;
use burn::tensor::Tensor;

use super::attention::Attention;
use super::kv_cache::KvCache;
use super::mlp::Mlp;
use super::rope::RopeTables;

/// A decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// RMSNorm before attention.
    pub input_norm: RmsNorm,
    /// Self-attention.
    pub attention: Attention,
    /// RMSNorm before the MLP.
    pub post_attention_norm: RmsNorm,
    /// Feed-forward block.
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// Applies the layer.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        bias: &Tensor<4>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor<3> {
        let h = x.clone()
            + self
                .attention
                .forward(self.input_norm.forward(x), rope, bias, cache);
        h.clone() + self.mlp.forward(self.post_attention_norm.forward(h))
    }
}
