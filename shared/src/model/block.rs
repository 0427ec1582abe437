//! One pre-norm decoder layer: `x + attn(norm(x))`, then `h + mlp(norm(h))`.

use burn::module::Module;
use burn::nn::RmsNorm;
use burn::tensor::Tensor;

use super::attention::Attention;
use super::kv_cache::KvCache;
use super::mlp::Mlp;
use super::rope::RopeTables;
use crate::ops::rms_norm;

/// A projection input that a [`DecoderLayer::forward_observed`] observer sees: the inputs of
/// the two projections structured pruning shrinks along their input axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProjectionInput {
    /// The attention heads' outputs, `[batch, seq, num_heads * head_dim]`
    /// ([`Attention::context`]).
    OProj,
    /// The MLP's intermediate channels, `[batch, seq, intermediate]` ([`Mlp::activation`]).
    DownProj,
}

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
        // One code path: observing nothing costs two empty calls.
        self.forward_observed(x, rope, bias, cache, &mut |_, _| {})
    }

    /// [`forward`](Self::forward), showing `observe` the input of `o_proj` and of `down_proj`
    /// on the way (for pruning calibration).
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward_observed(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        bias: &Tensor<4>,
        cache: Option<(&mut KvCache, usize)>,
        observe: &mut dyn FnMut(ProjectionInput, &Tensor<3>),
    ) -> Tensor<3> {
        let context = self.attention.context(
            rms_norm::apply(&self.input_norm, x.clone()),
            rope,
            bias,
            cache,
        );
        observe(ProjectionInput::OProj, &context);
        let h = x + self.attention.o_proj.forward(context);
        let inner = self
            .mlp
            .activation(rms_norm::apply(&self.post_attention_norm, h.clone()));
        observe(ProjectionInput::DownProj, &inner);
        h + self.mlp.down_proj.forward(inner)
    }
}
