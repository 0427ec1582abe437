//! Grouped-query attention's core, `softmax(scale · Q Kᵀ + bias) V`, as one differentiable
//! operation: on burn-flex (with AVX-512) one task per query head forward and backward
//! (`fedtune_kernels::attention`); elsewhere burn's own operations, differentiated by burn.

use crate::ops::host_tensor::{contiguous, f32s};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Cube, Flex, TensorMetadata, backend_extension};
use burn::tensor::{DType, Shape, Tensor, TensorData};
use burn_flex::FlexTensor;
use fedtune_kernels::attention::{self as kernel, Dims};
use fedtune_kernels::sgemm;

/// `softmax(scale · q kᵀ + bias) v` per key/value head, its `group` query heads stacked along
/// the rows of `q`.
///
/// # Shapes
/// - q: `[batch, kv_heads, group · seq, head_dim]`
/// - k, v: `[batch, kv_heads, total, head_dim]`
/// - bias: `[batch or 1, 1, seq, total]` (broadcast over heads)
/// - output: `[batch, kv_heads, group · seq, head_dim]`
///
/// # Panics
/// When the shapes disagree.
pub fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    bias: Tensor<4>,
    scale: f32,
) -> Tensor<4> {
    let ([batch, kv_heads, rows, head_dim], [bias_batch, one, seq, total]) =
        (q.dims(), bias.dims());
    assert_eq!(k.dims(), [batch, kv_heads, total, head_dim], "keys");
    assert_eq!(v.dims(), k.dims(), "values");
    assert!(
        one == 1 && (bias_batch == 1 || bias_batch == batch),
        "bias shape"
    );
    assert!(seq > 0 && rows % seq == 0, "query rows are whole heads");
    let out = <burn::backend::Dispatch as AttentionBackend>::attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        bias.into_dispatch(),
        scale,
    );
    Tensor::from_dispatch(out)
}

/// The operation, implemented by every backend fedtune runs on.
#[backend_extension(Flex, Cube, Autodiff)]
pub trait AttentionBackend: Backend {
    /// See [`attention`].
    fn attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self>;
}

/// The fused kernels a backend has. A backend without them composes attention from its own
/// operations, which the autodiff wrapper then differentiates itself.
pub trait AttentionKernels: Backend {
    /// The output and the probabilities `[batch, kv_heads, group · seq, total]`, or `None`
    /// when this backend has no fused kernel for these inputs.
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f32,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)>;

    /// `(dq, dk, dv)` from the probabilities [`Self::fused_attention`] returned; only called
    /// after it returned some.
    fn fused_attention_grad(
        saved: &AttentionState<Self>,
        d_out: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// What the backward pass keeps: the inputs (alive anyway: the projections' outputs) and the
/// probabilities, a `[heads, seq, total]` tensor per layer.
#[derive(Debug, Clone)]
pub struct AttentionState<B: Backend> {
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    probs: FloatTensor<B>,
    dims: Dims,
    scale: f32,
}

fn dims_of(q: &Shape, k: &Shape, bias: &Shape) -> Dims {
    let (seq, total) = (bias[2], k[2]);
    Dims {
        batch: q[0],
        kv_heads: q[1],
        group: q[2] / seq,
        seq,
        total,
        head_dim: q[3],
        bias_batch: bias[0],
    }
}

/// The attention in any backend's own operations (as fedtune's model wrote it before).
fn composed<X: Backend>(
    q: FloatTensor<X>,
    k: FloatTensor<X>,
    v: FloatTensor<X>,
    bias: FloatTensor<X>,
    scale: f32,
) -> FloatTensor<X> {
    let d = dims_of(&q.shape(), &k.shape(), &bias.shape());
    let scores = X::float_mul_scalar(
        X::float_matmul(q, X::float_swap_dims(k, 2, 3)),
        scale.into(),
    );
    let scores = X::float_reshape(
        scores,
        Shape::new([d.batch, d.kv_heads, d.group, d.seq, d.total]),
    );
    let bias = X::float_reshape(bias, Shape::new([d.bias_batch, 1, 1, d.seq, d.total]));
    let probs = X::softmax(X::float_add(scores, bias), 4);
    let probs = X::float_reshape(
        probs,
        Shape::new([d.batch, d.kv_heads, d.group * d.seq, d.total]),
    );
    X::float_matmul(probs, v)
}

impl AttentionKernels for Flex {
    fn fused_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        bias: FlexTensor,
        scale: f32,
    ) -> Option<(FlexTensor, FlexTensor)> {
        let float32 = [&q, &k, &v, &bias].iter().all(|t| t.dtype() == DType::F32);
        if !sgemm::available() || !float32 {
            return None;
        }
        let (q, k, v, bias) = (
            contiguous(q),
            contiguous(k),
            contiguous(v),
            contiguous(bias),
        );
        let dims = dims_of(&q.shape(), &k.shape(), &bias.shape());
        let (out, probs) =
            kernel::attention(f32s(&q), f32s(&k), f32s(&v), f32s(&bias), dims, scale);
        let probs_shape = [dims.batch, dims.kv_heads, dims.group * dims.seq, dims.total];
        Some((
            FlexTensor::from_data(TensorData::new(out, q.shape())),
            FlexTensor::from_data(TensorData::new(probs, probs_shape)),
        ))
    }

    fn fused_attention_grad(
        saved: &AttentionState<Self>,
        d_out: FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let d_out = contiguous(d_out);
        let (q, k, v) = (
            contiguous(saved.q.clone()),
            contiguous(saved.k.clone()),
            contiguous(saved.v.clone()),
        );
        let (dq, dk, dv) = kernel::attention_grad(
            f32s(&q),
            f32s(&k),
            f32s(&v),
            f32s(&saved.probs),
            f32s(&d_out),
            saved.dims,
            saved.scale,
        );
        (
            FlexTensor::from_data(TensorData::new(dq, q.shape())),
            FlexTensor::from_data(TensorData::new(dk, k.shape())),
            FlexTensor::from_data(TensorData::new(dv, v.shape())),
        )
    }
}

impl AttentionBackend for Flex {
    fn attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        bias: FlexTensor,
        scale: f32,
    ) -> FlexTensor {
        match Self::fused_attention(q.clone(), k.clone(), v.clone(), bias.clone(), scale) {
            Some((out, _)) => out,
            None => composed::<Flex>(q, k, v, bias, scale),
        }
    }
}

impl AttentionKernels for Cube {
    fn fused_attention(
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: FloatTensor<Self>,
        _: f32,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }

    fn fused_attention_grad(
        _: &AttentionState<Self>,
        _: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("CubeCL runtimes never return fused probabilities, so no fused backward runs")
    }
}

impl AttentionBackend for Cube {
    fn attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        composed::<Cube>(q, k, v, bias, scale)
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: AttentionKernels> Backward<B, 3> for AttentionBackward {
    type State = AttentionState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out = grads.consume::<B>(&ops.node);
        let (dq, dk, dv) = B::fused_attention_grad(&ops.state, d_out);
        for (node, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: AttentionBackend + AttentionKernels, C: CheckpointStrategy> AttentionBackend
    for Autodiff<B, C>
{
    fn attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        assert!(!bias.is_tracked(), "the attention bias gets no gradient");
        let dims = dims_of(&q.shape(), &k.shape(), &bias.shape());
        let fused = B::fused_attention(
            q.primitive().clone(),
            k.primitive().clone(),
            v.primitive().clone(),
            bias.primitive().clone(),
            scale,
        );
        let Some((out, probs)) = fused else {
            // No fused kernel: burn's operations on this wrapper record their own backward.
            return composed::<Self>(q, k, v, bias, scale);
        };
        let (q, q_node) = q.into_parts();
        let (k, k_node) = k.into_parts();
        let (v, v_node) = v.into_parts();
        match AttentionBackward
            .prepare::<C>([q_node, k_node, v_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = AttentionState {
                    q,
                    k,
                    v,
                    probs,
                    dims,
                    scale,
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::softmax;
    use burn::tensor::{Device, Distribution};

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_into_vec_as().expect("float32")
    }

    /// The model's attention before this operation, in tensor operations.
    fn reference(
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        bias: Tensor<4>,
        scale: f32,
    ) -> Tensor<4> {
        let [batch, kv_heads, rows, head_dim] = q.dims();
        let [_, _, seq, total] = bias.dims();
        let group = rows / seq;
        let scores = q.matmul(k.swap_dims(2, 3)) * scale;
        let scores =
            scores.reshape([batch, kv_heads, group, seq, total]) + bias.unsqueeze_dim::<5>(2);
        let _ = head_dim;
        softmax(scores, 4)
            .reshape([batch, kv_heads, rows, total])
            .matmul(v)
    }

    #[test]
    fn output_and_gradients_match_the_tensor_formula() {
        let device = Device::flex().autodiff();
        let (batch, kv_heads, group, seq, head_dim) = (2, 3, 3, 7, 8);
        let q0 = Tensor::<4>::random(
            [batch, kv_heads, group * seq, head_dim],
            Distribution::Default,
            &device,
        );
        let k0 = Tensor::<4>::random(
            [batch, kv_heads, seq, head_dim],
            Distribution::Default,
            &device,
        );
        let v0 = Tensor::<4>::random(
            [batch, kv_heads, seq, head_dim],
            Distribution::Default,
            &device,
        );
        let w = Tensor::<4>::random(
            [batch, kv_heads, group * seq, head_dim],
            Distribution::Default,
            &device,
        );
        let lengths = [7, 4];
        let bias = crate::model::batch::attention_bias(seq, 0, Some(&lengths), &device);
        let run = |fused: bool| {
            let (q, k, v) = (
                q0.clone().detach().require_grad(),
                k0.clone().detach().require_grad(),
                v0.clone().detach().require_grad(),
            );
            let out = if fused {
                attention(q.clone(), k.clone(), v.clone(), bias.clone(), 0.35)
            } else {
                reference(q.clone(), k.clone(), v.clone(), bias.clone(), 0.35)
            };
            let grads = (out.clone() * w.clone()).sum().backward();
            [
                values(out),
                values(q.grad(&grads).expect("tracked")),
                values(k.grad(&grads).expect("tracked")),
                values(v.grad(&grads).expect("tracked")),
            ]
        };
        for (ours, theirs) in run(true).iter().zip(run(false)) {
            for (a, b) in ours.iter().zip(&theirs) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
    }
}
