//! A bias-optional linear layer, `y = x W + b`, with its weight stored `[in, out]`.
//!
//! Checkpoints (Hugging Face, GGUF, PEFT) store projections as `[out, in]`; the layer transposes
//! once at load and back at export. The stored orientation is what the CPU kernel wants: gemm
//! packs the right-hand matrix along its rows, and a `[out, in]` weight read through a transposed
//! view made that packing a scalar gather costing a quarter of every forward pass.
//! (`burn::nn::Linear` uses the same orientation; fedtune keeps its own type because pruning,
//! LoRA and seed noise address a layer's rows and columns directly.)

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData, assert_shape};

use crate::lora::LoraLayer;
use crate::ops::frozen_matmul::frozen_matmul;

/// `y = x W + b` with `W` of shape `[d_input, d_output]`, plus `s · x A B` when a LoRA adapter
/// is attached.
#[derive(Module, Debug)]
pub struct Linear {
    /// Weight `[d_input, d_output]`: column `j` holds output unit `j`'s input weights.
    pub weight: Param<Tensor<2>>,
    /// Optional bias `[d_output]` (Llama has none; pruning with bias compensation adds one).
    pub bias: Option<Param<Tensor<1>>>,
    /// A LoRA adapter, trained while `weight` stays frozen (see [`crate::lora`]).
    pub adapter: Option<LoraLayer>,
}

impl Linear {
    /// A layer from a checkpoint's row-major `[d_output, d_input]` values.
    ///
    /// # Panics
    /// When `values.len() != d_output * d_input`.
    pub fn from_checkpoint(
        values: &[f32],
        d_output: usize,
        d_input: usize,
        device: &Device,
    ) -> Self {
        assert_eq!(
            values.len(),
            d_output * d_input,
            "weight values and shape disagree"
        );
        let mut transposed = vec![0.0f32; values.len()];
        for (o, row) in values.chunks_exact(d_input).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                transposed[i * d_output + o] = v;
            }
        }
        let weight = Tensor::from_data(TensorData::new(transposed, [d_input, d_output]), device);
        Self {
            weight: Param::from_tensor(weight),
            bias: None,
            adapter: None,
        }
    }

    /// The weight as a checkpoint stores it: row-major `[d_output, d_input]`.
    pub fn checkpoint_values(&self) -> Vec<f32> {
        self.weight
            .val()
            .transpose()
            .into_data()
            .try_into_vec_as()
            .expect("weights are float32")
    }

    /// `(d_input, d_output)`.
    pub fn dims(&self) -> (usize, usize) {
        let [d_input, d_output] = self.weight.dims();
        (d_input, d_output)
    }

    /// Applies the layer.
    ///
    /// # Shapes
    /// - input: `[..., d_input]`
    /// - output: `[..., d_output]`
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let (d_input, _) = self.dims();
        assert_shape!(input, [.., d_input]);
        let weight = self.weight.val();
        let base = if weight.is_require_grad() {
            burn::tensor::module::linear(input.clone(), weight, self.bias.as_ref().map(Param::val))
        } else {
            // A frozen weight (LoRA, FedSpine, zeroth-order and inference passes): the product
            // that differentiates in the input only, on fedtune's CPU kernel where it has one.
            let base = frozen_matmul(input.clone(), weight, false);
            match &self.bias {
                Some(bias) => base + bias.val().unsqueeze(),
                None => base,
            }
        };
        match &self.adapter {
            Some(adapter) => base + adapter.forward(input),
            None => base,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn computes_x_w_transpose_of_the_checkpoint_matrix() {
        let device = Device::flex();
        // Checkpoint W = [[1, 2], [3, 4], [5, 6]]: 3 outputs over 2 inputs.
        let layer = Linear::from_checkpoint(&[1., 2., 3., 4., 5., 6.], 3, 2, &device);
        assert_eq!(layer.dims(), (2, 3));
        let x = Tensor::<2>::from_data([[1.0, -1.0]], &device);
        let y: Vec<f32> = layer.forward(x).into_data().try_into_vec_as().unwrap();
        assert_eq!(y, vec![-1.0, -1.0, -1.0]);
        assert_eq!(layer.checkpoint_values(), vec![1., 2., 3., 4., 5., 6.]);
    }

    #[test]
    #[should_panic(expected = "assert_shape!(input, [.., d_input])")]
    fn rejects_wrong_input_width() {
        let device = Device::flex();
        let layer = Linear::from_checkpoint(&[0.0; 6], 3, 2, &device);
        let _ = layer.forward(Tensor::<2>::zeros([1, 3], &device));
    }
}
