//! Multiplying activations by a frozen weight: `X·W` or `X·Wᵀ`, differentiable in `X` only.
//!
//! Every projection of a LoRA or FedSpine step, and the tied output head, multiplies by a
//! weight that gets no gradient. burn's matmul treats both operands alike, so its backward runs
//! `dY·Wᵀ` through a transposed view that the CPU kernel packs element by element. This
//! operation knows the weight is frozen: its backward is the same operation with the other
//! orientation, and on CPUs with AVX-512 it runs on `fedtune_kernels::sgemm`, which reads the
//! weight in the order it is stored. Elsewhere (other CPUs, wgpu) it is burn's own matmul.

use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Cube, Flex, backend_extension};
use burn::tensor::{DType, Shape, Tensor, TensorData};
use burn_flex::FlexTensor;
use fedtune_kernels::sgemm::{self, Matrix, Output};

use crate::ops::host_tensor::contiguous;

/// `x · w` (`w` `[d_in, d_out]`), or `x · wᵀ` when `transposed` (`w` `[d_out, d_in]`), with a
/// gradient for `x` only.
///
/// # Panics
/// When `w` requires a gradient (use burn's matmul there), or the widths disagree.
///
/// # Shapes
/// - x: `[..., d_in]`
/// - output: `[..., d_out]`
pub fn frozen_matmul<const D: usize>(x: Tensor<D>, w: Tensor<2>, transposed: bool) -> Tensor<D> {
    assert!(
        !w.is_require_grad(),
        "frozen_matmul gives no gradient to its weight"
    );
    let [rows, cols] = w.dims();
    let d_in = if transposed { cols } else { rows };
    assert_eq!(x.dims()[D - 1], d_in, "input width and weight disagree");
    let out = <burn::backend::Dispatch as FrozenMatmulBackend>::frozen_matmul(
        x.into_dispatch(),
        w.into_dispatch(),
        transposed,
    );
    Tensor::from_dispatch(out)
}

/// The frozen-weight product, implemented by every backend fedtune runs on.
#[backend_extension(Flex, Cube, Autodiff)]
pub trait FrozenMatmulBackend: Backend {
    /// `x · w` (`w` `[d_in, d_out]`), or `x · wᵀ` when `transposed` (`w` `[d_out, d_in]`);
    /// `x` is `[..., d_in]`, the output `[..., d_out]`.
    fn frozen_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        transposed: bool,
    ) -> FloatTensor<Self>;
}

/// The product with the backend's own operations: flatten `x` to rows, multiply, restore.
fn with_matmul<B: Backend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    transposed: bool,
) -> FloatTensor<B> {
    let shape = x.shape();
    let d_in = shape[shape.num_dims() - 1];
    let rows = shape.num_elements() / d_in.max(1);
    let w = if transposed { B::float_transpose(w) } else { w };
    let d_out = w.shape()[1];
    let y = B::float_matmul(B::float_reshape(x, Shape::new([rows, d_in])), w);
    let mut out = shape;
    let last = out.num_dims() - 1;
    out[last] = d_out;
    B::float_reshape(y, out)
}

impl FrozenMatmulBackend for Flex {
    fn frozen_matmul(x: FlexTensor, w: FlexTensor, transposed: bool) -> FlexTensor {
        if !sgemm::available() || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
            return with_matmul::<Flex>(x, w, transposed);
        }
        let (x, w) = (contiguous(x), contiguous(w));
        let (Some(xs), Some(ws)) = (x.as_slice::<f32>(), w.as_slice::<f32>()) else {
            return with_matmul::<Flex>(x, w, transposed);
        };
        let shape = x.shape();
        let d_in = shape[shape.num_dims() - 1];
        let rows = shape.num_elements() / d_in.max(1);
        let [w_rows, w_cols] = w.shape().dims::<2>();
        let input = Matrix::row_major(xs, rows, d_in);
        let weight = Matrix::row_major(ws, w_rows, w_cols);
        let (values, d_out) = if transposed {
            // y = x·Wᵀ = (W·xᵀ)ᵀ: the weight is the streamed left operand, read row by row;
            // the small x is read as xᵀ by the kernel's packing.
            let xt = Matrix::column_major(xs, d_in, rows);
            (sgemm::multiply(weight, xt, Output::Transposed), w_rows)
        } else {
            (sgemm::multiply(input, weight, Output::RowMajor), w_cols)
        };
        let mut out = shape;
        let last = out.num_dims() - 1;
        out[last] = d_out;
        FlexTensor::from_data(TensorData::new(values, out))
    }
}

impl FrozenMatmulBackend for Cube {
    fn frozen_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        transposed: bool,
    ) -> FloatTensor<Self> {
        with_matmul::<Cube>(x, w, transposed)
    }
}

/// The backward of `y = x·op(W)`: `dx = dy·op(W)ᵀ`, the same operation with the other
/// orientation. The weight is kept as state (it is alive anyway: it is the model's).
#[derive(Debug)]
struct FrozenMatmulBackward;

impl<B: FrozenMatmulBackend> Backward<B, 1> for FrozenMatmulBackward {
    type State = (FloatTensor<B>, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (w, transposed) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::frozen_matmul(grad, w, !transposed)
        });
    }
}

impl<B: FrozenMatmulBackend, C: CheckpointStrategy> FrozenMatmulBackend for Autodiff<B, C> {
    fn frozen_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        transposed: bool,
    ) -> FloatTensor<Self> {
        assert!(
            !w.is_tracked(),
            "frozen_matmul gives no gradient to its weight"
        );
        let w = w.into_primitive();
        let (x, node) = x.into_parts();
        match FrozenMatmulBackward
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = B::frozen_matmul(x, w.clone(), transposed);
                prep.finish((w, transposed), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::frozen_matmul(x, w, transposed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_into_vec_as().expect("float32")
    }

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what}: {g} vs {w}"
            );
        }
    }

    /// Value and input gradient equal burn's matmul in both orientations, on shapes off the
    /// kernel's tiles and large enough to be split between threads.
    #[test]
    fn value_and_input_gradient_match_burns_matmul() {
        let device = Device::flex().autodiff();
        for &(batch, seq, d_in, d_out) in &[(1, 3, 5, 7), (2, 37, 70, 45), (1, 128, 96, 200)] {
            let x0 = Tensor::<3>::random([batch, seq, d_in], Distribution::Default, &device);
            let w = Tensor::<2>::random([d_in, d_out], Distribution::Default, &device);
            let upstream = Tensor::<3>::random([batch, seq, d_out], Distribution::Default, &device);
            for transposed in [false, true] {
                let weight = if transposed {
                    w.clone().transpose().into_data()
                } else {
                    w.clone().into_data()
                };
                let weight = Tensor::<2>::from_data(weight, &device);

                let x = x0.clone().detach().require_grad();
                let ours = frozen_matmul(x.clone(), weight, transposed);
                let grads = (ours.clone() * upstream.clone()).sum().backward();
                let our_grad = x.grad(&grads).expect("x is tracked");

                let x = x0.clone().detach().require_grad();
                let theirs = x.clone().matmul(w.clone().unsqueeze());
                let grads = (theirs.clone() * upstream.clone()).sum().backward();
                let their_grad = x.grad(&grads).expect("x is tracked");

                let what = format!("{batch}x{seq}x{d_in}->{d_out} transposed={transposed}");
                assert_close(&values(ours), &values(theirs), &what);
                assert_close(&values(our_grad), &values(their_grad), &what);
            }
        }
    }

    #[test]
    #[should_panic(expected = "no gradient to its weight")]
    fn refuses_a_weight_that_wants_a_gradient() {
        let device = Device::flex().autodiff();
        let w = Tensor::<2>::ones([3, 2], &device).require_grad();
        let _ = frozen_matmul(Tensor::<2>::ones([1, 3], &device), w, false);
    }
}
