//! A bias-optional linear layer that stores its weight as `[out, in]`, the layout of Hugging Face
//! and GGUF checkpoints.
//!
//! fedtune keeps its own type instead of `burn::nn::Linear` (which stores `[in, out]`) so that
//! a row is an output unit: pruning removes rows and columns by index, seed noise and LoRA
//! adapters address elements in checkpoint order, and exports need no transposes.

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData, assert_shape};

/// `y = x Wᵀ + b` with `W` of shape `[out, in]`.
#[derive(Module, Debug)]
pub struct Linear {
    /// Weight `[d_output, d_input]`.
    pub weight: Param<Tensor<2>>,
    /// Optional bias `[d_output]` (Llama has none; pruning with bias compensation adds one).
    pub bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    /// A layer from row-major `[d_output, d_input]` values.
    ///
    /// # Panics
    /// When `values.len() != d_output * d_input`.
    pub fn from_values(values: Vec<f32>, d_output: usize, d_input: usize, device: &Device) -> Self {
        let weight = Tensor::from_data(TensorData::new(values, [d_output, d_input]), device);
        Self {
            weight: Param::from_tensor(weight),
            bias: None,
        }
    }

    /// `(d_output, d_input)`.
    pub fn dims(&self) -> (usize, usize) {
        let [d_output, d_input] = self.weight.dims();
        (d_output, d_input)
    }

    /// Applies the layer.
    ///
    /// # Shapes
    /// - input: `[..., d_input]`
    /// - output: `[..., d_output]`
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let (_, d_input) = self.dims();
        assert_shape!(input, [.., d_input]);
        // The transpose is a strided view: no copy, the matmul kernels read it in place.
        burn::tensor::module::linear(
            input,
            self.weight.val().transpose(),
            self.bias.as_ref().map(Param::val),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn computes_x_w_transpose() {
        let device = Device::flex();
        // W = [[1, 2], [3, 4], [5, 6]]: 2 inputs, 3 outputs.
        let layer = Linear::from_values(vec![1., 2., 3., 4., 5., 6.], 3, 2, &device);
        let x = Tensor::<2>::from_data([[1.0, -1.0]], &device);
        let y: Vec<f32> = layer.forward(x).into_data().try_into_vec_as().unwrap();
        assert_eq!(y, vec![-1.0, -1.0, -1.0]);
    }

    #[test]
    #[should_panic(expected = "assert_shape!(input, [.., d_input])")]
    fn rejects_wrong_input_width() {
        let device = Device::flex();
        let layer = Linear::from_values(vec![0.0; 6], 3, 2, &device);
        let _ = layer.forward(Tensor::<2>::zeros([1, 3], &device));
    }
}
