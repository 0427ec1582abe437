//! The frozen-weight product as a burn backend extension: a host kernel on burn-flex, burn's
//! matmul on CubeCL runtimes, and a hand-written backward for the autodiff wrapper.

use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Cube, Flex, backend_extension};
use burn::tensor::{DType, Shape, TensorData};
use burn_flex::FlexTensor;

use crate::ops::host_tensor::contiguous;
use fedtune_kernels::sgemm::{self, Matrix, Output};

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
