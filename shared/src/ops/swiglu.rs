//! The SwiGLU activation `silu(gate) · up` as one differentiable operation: on burn-flex one
//! parallel pass each way (`fedtune_kernels::swiglu`), elsewhere burn's own operations.

use crate::ops::host_tensor::contiguous;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Cube, Flex, TensorMetadata, backend_extension};
use burn::tensor::{DType, Tensor, TensorData};
use burn_flex::FlexTensor;
use fedtune_kernels::swiglu as kernel;

/// `silu(gate) · up`, element-wise, with gradients for both inputs.
///
/// # Panics
/// When the shapes differ.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    assert_eq!(gate.dims(), up.dims(), "gate and up differ in shape");
    let out = <burn::backend::Dispatch as SwigluBackend>::swiglu(
        gate.into_dispatch(),
        up.into_dispatch(),
    );
    Tensor::from_dispatch(out)
}

/// The activation, implemented by every backend fedtune runs on.
#[backend_extension(Flex, Cube, Autodiff)]
pub trait SwigluBackend: Backend {
    /// `silu(gate) · up` for two tensors of one shape.
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The activation's gradients on a backend that computes (not records) them.
pub trait SwigluGrad: Backend {
    /// `(grad · up · σ(g)(1 + g(1 − σ(g))), grad · silu(g))` for `g = gate`.
    fn swiglu_grad(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

fn composed<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let silu = B::float_mul(gate.clone(), B::sigmoid(gate));
    B::float_mul(silu, up)
}

fn composed_grad<B: Backend>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let s = B::sigmoid(gate.clone());
    let silu = B::float_mul(gate.clone(), s.clone());
    let d_up = B::float_mul(grad.clone(), silu);
    // σ(g)(1 + g(1 − σ(g))) = σ(g) + silu(g)(1 − σ(g))
    let one_minus = B::float_add_scalar(B::float_neg(s.clone()), 1.0.into());
    let slope = B::float_add(s.clone(), B::float_mul(B::float_mul(gate, s), one_minus));
    let d_gate = B::float_mul(B::float_mul(grad, up), slope);
    (d_gate, d_up)
}

impl SwigluBackend for Flex {
    fn swiglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
        if gate.dtype() != DType::F32 || up.dtype() != DType::F32 {
            return composed::<Flex>(gate, up);
        }
        let (gate, up) = (contiguous(gate), contiguous(up));
        let (Some(g), Some(u)) = (gate.as_slice::<f32>(), up.as_slice::<f32>()) else {
            return composed::<Flex>(gate, up);
        };
        FlexTensor::from_data(TensorData::new(kernel::swiglu(g, u), gate.shape()))
    }
}

impl SwigluGrad for Flex {
    fn swiglu_grad(gate: FlexTensor, up: FlexTensor, grad: FlexTensor) -> (FlexTensor, FlexTensor) {
        if [gate.dtype(), up.dtype(), grad.dtype()] != [DType::F32; 3] {
            return composed_grad::<Flex>(gate, up, grad);
        }
        let (gate, up, grad) = (contiguous(gate), contiguous(up), contiguous(grad));
        let (Some(g), Some(u), Some(dy)) = (
            gate.as_slice::<f32>(),
            up.as_slice::<f32>(),
            grad.as_slice::<f32>(),
        ) else {
            return composed_grad::<Flex>(gate, up, grad);
        };
        let (d_gate, d_up) = kernel::swiglu_grad(g, u, dy);
        let shape = gate.shape();
        (
            FlexTensor::from_data(TensorData::new(d_gate, shape.clone())),
            FlexTensor::from_data(TensorData::new(d_up, shape)),
        )
    }
}

impl SwigluBackend for Cube {
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        composed::<Cube>(gate, up)
    }
}

impl SwigluGrad for Cube {
    fn swiglu_grad(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed_grad::<Cube>(gate, up, grad)
    }
}

/// Keeps both inputs (alive anyway: they are the projections' outputs) and computes both
/// gradients in one pass.
#[derive(Debug)]
struct SwigluBackward;

impl<B: SwigluGrad> Backward<B, 2> for SwigluBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (gate, up) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let (d_gate, d_up) = B::swiglu_grad(gate, up, grad);
        let [gate_node, up_node] = ops.parents;
        if let Some(node) = gate_node {
            grads.register::<B>(node.id, d_gate);
        }
        if let Some(node) = up_node {
            grads.register::<B>(node.id, d_up);
        }
    }
}

impl<B: SwigluBackend + SwigluGrad, C: CheckpointStrategy> SwigluBackend for Autodiff<B, C> {
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let (gate, gate_node) = gate.into_parts();
        let (up, up_node) = up.into_parts();
        match SwigluBackward
            .prepare::<C>([gate_node, up_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::swiglu(gate.clone(), up.clone());
                prep.finish((gate, up), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::swiglu(gate, up)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::silu;
    use burn::tensor::{Device, Distribution};

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_into_vec_as().expect("float32")
    }

    #[test]
    fn value_and_gradients_match_burns_silu_times_up() {
        let device = Device::flex().autodiff();
        // Small (one chunk) and large (split across threads).
        for &(rows, cols) in &[(3usize, 5usize), (128, 300)] {
            let gate0 =
                Tensor::<2>::random([rows, cols], Distribution::Uniform(-9.0, 9.0), &device);
            let up0 = Tensor::<2>::random([rows, cols], Distribution::Default, &device);
            let weights = Tensor::<2>::random([rows, cols], Distribution::Default, &device);
            let run = |fused: bool| {
                let gate = gate0.clone().detach().require_grad();
                let up = up0.clone().detach().require_grad();
                let out = if fused {
                    swiglu(gate.clone(), up.clone())
                } else {
                    silu(gate.clone()) * up.clone()
                };
                let grads = (out.clone() * weights.clone()).sum().backward();
                let d_gate = gate.grad(&grads).expect("tracked");
                let d_up = up.grad(&grads).expect("tracked");
                (values(out), values(d_gate), values(d_up))
            };
            let (ours, theirs) = (run(true), run(false));
            for (a, b) in [(ours.0, theirs.0), (ours.1, theirs.1), (ours.2, theirs.2)] {
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
                }
            }
        }
    }
}
