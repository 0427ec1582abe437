//! The next-token loss as a burn backend extension: fused host kernels on burn-flex, composed
//! backend operations on CubeCL runtimes, and a backward for the autodiff wrapper that keeps
//! only the logits.

use crate::ops::host_tensor::contiguous;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, Cube, Flex, TensorMetadata, backend_extension};
use burn::tensor::{DType, IndexingUpdateOp, Shape, TensorData};
use burn_flex::FlexTensor;
use fedtune_kernels::cross_entropy;

/// The loss, implemented by every backend fedtune runs on.
#[backend_extension(Flex, Cube, Autodiff)]
pub trait TokenNllBackend: Backend {
    /// `logsumexp(logits[.., :]) − logits[.., targets[..]]`: logits `[..., vocab]`, targets and
    /// output `[...]`.
    fn token_nll(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self>;
}

/// The loss's gradient on a backend that computes (not records) it.
pub trait TokenNllGrad: Backend {
    /// `grad[..] · (softmax(logits[.., :]) − onehot(targets[..]))`, shaped like `logits`.
    fn token_nll_grad(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// `(rows, vocab)` of logits `[..., vocab]`, and the shape without the last dimension.
fn rows_of(shape: &Shape) -> (usize, usize, Shape) {
    let d = shape.num_dims();
    let vocab = shape[d - 1];
    let leading: Shape = shape.iter().take(d - 1).copied().collect();
    (leading.num_elements(), vocab, leading)
}

/// `max + ln Σ exp(x − max)` over the last dimension of `[rows, vocab]`, as `[rows, 1]`.
fn log_sum_exp<B: Backend>(logits: FloatTensor<B>) -> FloatTensor<B> {
    let max = B::float_max_dim(logits.clone(), 1);
    let sum = B::float_sum_dim(B::float_exp(B::float_sub(logits, max.clone())), 1);
    B::float_add(B::float_log(sum), max)
}

fn composed_nll<B: Backend>(logits: FloatTensor<B>, targets: IntTensor<B>) -> FloatTensor<B> {
    let (rows, vocab, leading) = rows_of(&logits.shape());
    let logits = B::float_reshape(logits, Shape::new([rows, vocab]));
    let targets = B::int_reshape(targets, Shape::new([rows, 1]));
    let lse = log_sum_exp::<B>(logits.clone());
    let nll = B::float_sub(lse, B::float_gather(1, logits, targets));
    B::float_reshape(nll, leading)
}

fn composed_grad<B: Backend>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let shape = logits.shape();
    let (rows, vocab, _) = rows_of(&shape);
    let logits = B::float_reshape(logits, Shape::new([rows, vocab]));
    let targets = B::int_reshape(targets, Shape::new([rows, 1]));
    let grad = B::float_reshape(grad, Shape::new([rows, 1]));
    let lse = log_sum_exp::<B>(logits.clone());
    let softmax = B::float_exp(B::float_sub(logits, lse));
    let scaled = B::float_mul(softmax, grad.clone());
    let out = B::float_scatter(
        1,
        scaled,
        targets,
        B::float_neg(grad),
        IndexingUpdateOp::Add,
    );
    B::float_reshape(out, shape)
}

/// The targets as vocabulary indices (the kernel checks they are below the vocabulary).
fn indices(targets: FlexTensor) -> Vec<usize> {
    targets
        .into_data()
        .iter::<i64>()
        .map(|t| usize::try_from(t).unwrap_or(usize::MAX))
        .collect()
}

impl TokenNllBackend for Flex {
    fn token_nll(logits: FlexTensor, targets: FlexTensor) -> FlexTensor {
        if logits.dtype() != DType::F32 {
            return composed_nll::<Flex>(logits, targets);
        }
        let logits = contiguous(logits);
        let (_, vocab, leading) = rows_of(&logits.shape());
        let values = logits
            .as_slice::<f32>()
            .expect("a contiguous float32 tensor");
        let nll = cross_entropy::token_nll(values, vocab, &indices(targets));
        FlexTensor::from_data(TensorData::new(nll, leading))
    }
}

impl TokenNllGrad for Flex {
    fn token_nll_grad(logits: FlexTensor, targets: FlexTensor, grad: FlexTensor) -> FlexTensor {
        if logits.dtype() != DType::F32 || grad.dtype() != DType::F32 {
            return composed_grad::<Flex>(logits, targets, grad);
        }
        let (logits, grad) = (contiguous(logits), contiguous(grad));
        let shape = logits.shape();
        let (_, vocab, _) = rows_of(&shape);
        let values = logits
            .as_slice::<f32>()
            .expect("a contiguous float32 tensor");
        let upstream = grad.as_slice::<f32>().expect("a contiguous float32 tensor");
        let out = cross_entropy::token_nll_grad(values, vocab, &indices(targets), upstream);
        FlexTensor::from_data(TensorData::new(out, shape))
    }
}

impl TokenNllBackend for Cube {
    fn token_nll(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        composed_nll::<Cube>(logits, targets)
    }
}

impl TokenNllGrad for Cube {
    fn token_nll_grad(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        composed_grad::<Cube>(logits, targets, grad)
    }
}

/// Keeps the logits and targets; the backward recomputes each row's log-sum-exp (one pass)
/// rather than storing the softmax (a second copy of the logits).
#[derive(Debug)]
struct TokenNllBackward;

impl<B: TokenNllGrad> Backward<B, 1> for TokenNllBackward {
    type State = (FloatTensor<B>, IntTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (logits, targets) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::token_nll_grad(logits, targets, grad)
        });
    }
}

impl<B: TokenNllBackend + TokenNllGrad, C: CheckpointStrategy> TokenNllBackend for Autodiff<B, C> {
    fn token_nll(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        let (logits, node) = logits.into_parts();
        match TokenNllBackward
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let nll = B::token_nll(logits.clone(), targets.clone());
                prep.finish((logits, targets), nll)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::token_nll(logits, targets)),
        }
    }
}
