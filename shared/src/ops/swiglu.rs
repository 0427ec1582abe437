//! The SwiGLU activation `silu(gate) · up` as one differentiable operation: on burn-flex one
//! parallel pass each way (`fedtune_kernels::swiglu`), elsewhere burn's own operations,
//! differentiated by burn.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Cube, Flex, TensorMetadata, backend_extension};
use burn::tensor::{DType, Tensor, TensorData};
use burn_flex::FlexTensor;
use fedtune_kernels::swiglu as kernel;

use crate::ops::host_tensor::{contiguous, f32s};

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

/// The fused kernels a backend has; one without composes the activation from its own
/// operations, which the autodiff wrapper then differentiates itself.
pub trait SwigluKernels: Backend {
    /// `silu(gate) · up`, or `None` when this backend has no fused kernel for these inputs.
    fn fused_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> Option<FloatTensor<Self>>;

    /// `(grad · up · σ(g)(1 + g(1 − σ(g))), grad · silu(g))` for `g = gate`; only called after
    /// [`Self::fused_swiglu`] returned some.
    fn fused_swiglu_grad(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

fn composed<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let silu = B::float_mul(gate.clone(), B::sigmoid(gate));
    B::float_mul(silu, up)
}

/// Float32 inputs, contiguous, or `None` for the composed path.
fn float32(gate: FlexTensor, up: FlexTensor) -> Option<(FlexTensor, FlexTensor)> {
    (gate.dtype() == DType::F32 && up.dtype() == DType::F32)
        .then(|| (contiguous(gate), contiguous(up)))
}

impl SwigluKernels for Flex {
    fn fused_swiglu(gate: FlexTensor, up: FlexTensor) -> Option<FlexTensor> {
        let (gate, up) = float32(gate, up)?;
        let out = kernel::swiglu(f32s(&gate), f32s(&up));
        Some(FlexTensor::from_data(TensorData::new(out, gate.shape())))
    }

    fn fused_swiglu_grad(
        gate: FlexTensor,
        up: FlexTensor,
        grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor) {
        let (gate, up, grad) = (contiguous(gate), contiguous(up), contiguous(grad));
        let (d_gate, d_up) = kernel::swiglu_grad(f32s(&gate), f32s(&up), f32s(&grad));
        let shape = gate.shape();
        (
            FlexTensor::from_data(TensorData::new(d_gate, shape.clone())),
            FlexTensor::from_data(TensorData::new(d_up, shape)),
        )
    }
}

impl SwigluBackend for Flex {
    fn swiglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
        match Self::fused_swiglu(gate.clone(), up.clone()) {
            Some(out) => out,
            None => composed::<Flex>(gate, up),
        }
    }
}

impl SwigluKernels for Cube {
    fn fused_swiglu(_: FloatTensor<Self>, _: FloatTensor<Self>) -> Option<FloatTensor<Self>> {
        None
    }

    fn fused_swiglu_grad(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("CubeCL runtimes never return a fused activation, so no fused backward runs")
    }
}

impl SwigluBackend for Cube {
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        composed::<Cube>(gate, up)
    }
}

/// Keeps both inputs (alive anyway: they are the projections' outputs) and computes both
/// gradients in one pass.
#[derive(Debug)]
struct SwigluBackward;

impl<B: SwigluKernels> Backward<B, 2> for SwigluBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (gate, up) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let (d_gate, d_up) = B::fused_swiglu_grad(gate, up, grad);
        for (node, grad) in ops.parents.into_iter().zip([d_gate, d_up]) {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: SwigluBackend + SwigluKernels, C: CheckpointStrategy> SwigluBackend for Autodiff<B, C> {
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let Some(out) = B::fused_swiglu(gate.primitive().clone(), up.primitive().clone()) else {
            // No fused kernel: burn's operations on this wrapper record their own backward.
            return composed::<Self>(gate, up);
        };
        let (gate, gate_node) = gate.into_parts();
        let (up, up_node) = up.into_parts();
        match SwigluBackward
            .prepare::<C>([gate_node, up_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((gate, up), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
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
