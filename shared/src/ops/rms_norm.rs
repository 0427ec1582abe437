//! RMS normalisation with a frozen scale, `x / √(mean(x²) + ε) · γ`, as one differentiable
//! operation (in `x`): on burn-flex one parallel pass each way (`fedtune_kernels::rms_norm`),
//! elsewhere burn's own operations, differentiated by burn.

use crate::ops::host_tensor::{contiguous, f32s};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Cube, Flex, TensorMetadata, backend_extension};
use burn::tensor::{DType, Shape, Tensor, TensorData};
use burn_flex::FlexTensor;
use fedtune_kernels::rms_norm as kernel;

/// `x / √(mean(x²) + ε) · γ` over the last dimension, with a gradient for `x` only.
///
/// # Panics
/// When `gamma` requires a gradient (use `burn::nn::RmsNorm` there) or its width is not `x`'s.
pub fn rms_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, epsilon: f64) -> Tensor<D> {
    assert!(
        !gamma.is_require_grad(),
        "rms_norm gives no gradient to its scale"
    );
    assert_eq!(
        x.dims()[D - 1],
        gamma.dims()[0],
        "scale and input widths differ"
    );
    let out = <burn::backend::Dispatch as RmsNormBackend>::rms_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        epsilon as f32,
    );
    Tensor::from_dispatch(out)
}

/// `norm` applied to `x`: this operation when its scale is frozen (LoRA, FedSpine, inference),
/// burn's module otherwise.
pub fn apply<const D: usize>(norm: &burn::nn::RmsNorm, x: Tensor<D>) -> Tensor<D> {
    let gamma = norm.gamma.val();
    if gamma.is_require_grad() {
        norm.forward(x)
    } else {
        rms_norm(x, gamma, norm.epsilon)
    }
}

/// The operation, implemented by every backend fedtune runs on.
#[backend_extension(Flex, Cube, Autodiff)]
pub trait RmsNormBackend: Backend {
    /// See [`rms_norm`].
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, epsilon: f32) -> FloatTensor<Self>;
}

/// The fused kernels a backend has; one without composes the norm from its own operations.
pub trait RmsNormKernels: Backend {
    /// `(y, rms per row)`, or `None` when this backend has no fused kernel for these inputs.
    fn fused_rms_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        epsilon: f32,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)>;

    /// `dx` from what [`Self::fused_rms_norm`] kept; only called after it returned some.
    fn fused_rms_norm_grad(saved: &RmsNormState<Self>, dy: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// What the backward pass keeps: the input, the scale and each row's rms.
#[derive(Debug, Clone)]
pub struct RmsNormState<B: Backend> {
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    rms: FloatTensor<B>,
}

fn composed<X: Backend>(x: FloatTensor<X>, gamma: FloatTensor<X>, epsilon: f32) -> FloatTensor<X> {
    let shape = x.shape();
    let last = shape.num_dims() - 1;
    let mean_square = X::float_mean_dim(X::float_mul(x.clone(), x.clone()), last);
    let rms = X::float_sqrt(X::float_add_scalar(mean_square, epsilon.into()));
    let mut gamma_shape = vec![1; last];
    gamma_shape.push(shape[last]);
    let gamma = X::float_reshape(gamma, Shape::from(gamma_shape));
    X::float_mul(X::float_div(x, rms), gamma)
}

impl RmsNormKernels for Flex {
    fn fused_rms_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        epsilon: f32,
    ) -> Option<(FlexTensor, FlexTensor)> {
        if x.dtype() != DType::F32 || gamma.dtype() != DType::F32 {
            return None;
        }
        let (x, gamma) = (contiguous(x), contiguous(gamma));
        let (y, rms) = kernel::rms_norm(f32s(&x), f32s(&gamma), epsilon);
        let rows = rms.len();
        Some((
            FlexTensor::from_data(TensorData::new(y, x.shape())),
            FlexTensor::from_data(TensorData::new(rms, [rows])),
        ))
    }

    fn fused_rms_norm_grad(saved: &RmsNormState<Self>, dy: FlexTensor) -> FlexTensor {
        let (x, dy) = (contiguous(saved.x.clone()), contiguous(dy));
        let gamma = contiguous(saved.gamma.clone());
        let dx = kernel::rms_norm_grad(f32s(&x), f32s(&gamma), f32s(&saved.rms), f32s(&dy));
        FlexTensor::from_data(TensorData::new(dx, x.shape()))
    }
}

impl RmsNormBackend for Flex {
    fn rms_norm(x: FlexTensor, gamma: FlexTensor, epsilon: f32) -> FlexTensor {
        match Self::fused_rms_norm(x.clone(), gamma.clone(), epsilon) {
            Some((y, _)) => y,
            None => composed::<Flex>(x, gamma, epsilon),
        }
    }
}

impl RmsNormKernels for Cube {
    fn fused_rms_norm(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: f32,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }

    fn fused_rms_norm_grad(_: &RmsNormState<Self>, _: FloatTensor<Self>) -> FloatTensor<Self> {
        unreachable!("CubeCL runtimes never return a fused norm, so no fused backward runs")
    }
}

impl RmsNormBackend for Cube {
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, epsilon: f32) -> FloatTensor<Self> {
        composed::<Cube>(x, gamma, epsilon)
    }
}

#[derive(Debug)]
struct RmsNormBackward;

impl<B: RmsNormKernels> Backward<B, 1> for RmsNormBackward {
    type State = RmsNormState<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let saved = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |dy| {
            B::fused_rms_norm_grad(&saved, dy)
        });
    }
}

impl<B: RmsNormBackend + RmsNormKernels, C: CheckpointStrategy> RmsNormBackend for Autodiff<B, C> {
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, epsilon: f32) -> FloatTensor<Self> {
        assert!(
            !gamma.is_tracked(),
            "rms_norm gives no gradient to its scale"
        );
        let Some((y, rms)) =
            B::fused_rms_norm(x.primitive().clone(), gamma.primitive().clone(), epsilon)
        else {
            // No fused kernel: burn's operations on this wrapper record their own backward.
            return composed::<Self>(x, gamma, epsilon);
        };
        let (x, node) = x.into_parts();
        match RmsNormBackward
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let gamma = gamma.into_primitive();
                prep.finish(RmsNormState { x, gamma, rms }, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::RmsNormConfig;
    use burn::tensor::{Device, Distribution};

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_into_vec_as().expect("float32")
    }

    #[test]
    fn value_and_input_gradient_match_burns_rms_norm() {
        let device = Device::flex().autodiff();
        // One row block (serial) and enough rows to be split between threads.
        for &(rows, width) in &[(3usize, 5usize), (300, 576)] {
            let norm = RmsNormConfig::new(width).with_epsilon(1e-5).init(&device);
            let gamma = Tensor::<1>::random([width], Distribution::Uniform(0.5, 2.0), &device);
            let norm = burn::nn::RmsNorm {
                gamma: burn::module::Param::from_tensor(gamma.clone()).set_require_grad(false),
                ..norm
            };
            let x0 = Tensor::<3>::random([1, rows, width], Distribution::Default, &device);
            let w = Tensor::<3>::random([1, rows, width], Distribution::Default, &device);
            let run = |fused: bool| {
                let x = x0.clone().detach().require_grad();
                let y = if fused {
                    rms_norm(x.clone(), gamma.clone(), 1e-5)
                } else {
                    norm.forward(x.clone())
                };
                let grads = (y.clone() * w.clone()).sum().backward();
                (values(y), values(x.grad(&grads).expect("tracked")))
            };
            let (ours, theirs) = (run(true), run(false));
            for (a, b) in ours
                .0
                .iter()
                .zip(&theirs.0)
                .chain(ours.1.iter().zip(&theirs.1))
            {
                assert!((a - b).abs() <= 2e-5 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
    }
}
