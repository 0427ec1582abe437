//! The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.

use burn::module::Module;
use burn::tensor::Tensor;

use super::linear::Linear;
use crate::ops::swiglu::swiglu;

/// SwiGLU MLP. An intermediate channel is one output unit of `gate_proj` and `up_proj` and one
/// input unit of `down_proj`, which is how structured pruning removes it.
#[derive(Module, Debug)]
pub struct Mlp {
    /// `hidden -> intermediate`.
    pub gate_proj: Linear,
    /// `hidden -> intermediate`.
    pub up_proj: Linear,
    /// `intermediate -> hidden`.
    pub down_proj: Linear,
}

impl Mlp {
    /// Applies the block.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.down_proj.forward(self.activation(x))
    }

    /// The intermediate channels, `silu(gate(x)) * up(x)`: what [`forward`](Self::forward)
    /// feeds `down_proj`, and what pruning calibration measures.
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - output: `[batch, seq, intermediate]`
    pub fn activation(&self, x: Tensor<3>) -> Tensor<3> {
        swiglu(self.gate_proj.forward(x.clone()), self.up_proj.forward(x))
    }

    /// Intermediate channels (the output width of `gate_proj`; per layer, since pruning removes
    /// channels layer by layer).
    pub fn intermediate_size(&self) -> usize {
        self.gate_proj.dims().1
    }
}
