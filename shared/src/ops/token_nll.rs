//! The next-token negative log-likelihood, `logsumexp(logits) − logits[target]` per position,
//! as one differentiable operation.
//!
//! Composed from tensor operations the loss walks the `[positions, vocabulary]` logits about
//! ten times and keeps several copies of them alive for the backward pass. This operation keeps
//! only the logits (alive anyway) and computes the gradient `softmax − one-hot` in one pass; on
//! burn-flex both directions run on `fedtune_kernels::cross_entropy`, rows in parallel. Other
//! backends compose it from their own operations, differentiated by burn.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, Cube, Flex, TensorMetadata, backend_extension};
use burn::tensor::{DType, Int, Shape, Tensor, TensorData};
use burn_flex::FlexTensor;
use fedtune_kernels::cross_entropy;

use crate::ops::host_tensor::{contiguous, f32s};

/// `logsumexp(logits[.., :]) − logits[.., target]` for every position, differentiable in
/// `logits`.
///
/// # Panics
/// When the leading shapes disagree (and, on the CPU, when a target is past the vocabulary).
///
/// # Shapes
/// - logits: `[..., vocab]`
/// - targets: `[...]` (one rank fewer)
/// - output: `[...]`
pub fn token_nll<const D: usize, const E: usize>(
    logits: Tensor<D>,
    targets: Tensor<E, Int>,
) -> Tensor<E> {
    assert_eq!(E + 1, D, "targets have one dimension fewer than logits");
    assert_eq!(
        &logits.dims()[..E],
        &targets.dims()[..],
        "one target per position"
    );
    let out = <burn::backend::Dispatch as TokenNllBackend>::token_nll(
        logits.into_dispatch(),
        targets.into_dispatch(),
    );
    Tensor::from_dispatch(out)
}

/// The loss, implemented by every backend fedtune runs on.
#[backend_extension(Flex, Cube, Autodiff)]
pub trait TokenNllBackend: Backend {
    /// `logsumexp(logits[.., :]) − logits[.., targets[..]]`: logits `[..., vocab]`, targets and
    /// output `[...]`.
    fn token_nll(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self>;
}

/// The fused kernels a backend has; one without composes the loss from its own operations,
/// which the autodiff wrapper then differentiates itself.
pub trait TokenNllKernels: Backend {
    /// The loss, or `None` when this backend has no fused kernel for these inputs.
    fn fused_token_nll(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> Option<FloatTensor<Self>>;

    /// `grad[..] · (softmax(logits[.., :]) − onehot(targets[..]))`, shaped like `logits`; only
    /// called after [`Self::fused_token_nll`] returned some.
    fn fused_token_nll_grad(
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

/// The loss in any backend's own operations: `max + ln Σ exp(x − max) − x[target]`.
fn composed<X: Backend>(logits: FloatTensor<X>, targets: IntTensor<X>) -> FloatTensor<X> {
    let (rows, vocab, leading) = rows_of(&logits.shape());
    let logits = X::float_reshape(logits, Shape::new([rows, vocab]));
    let targets = X::int_reshape(targets, Shape::new([rows, 1]));
    // The maximum only shifts the exponentials; it needs no gradient of its own.
    let max = X::float_detach(X::float_max_dim(logits.clone(), 1));
    let sum = X::float_sum_dim(X::float_exp(X::float_sub(logits.clone(), max.clone())), 1);
    let lse = X::float_add(X::float_log(sum), max);
    let nll = X::float_sub(lse, X::float_gather(1, logits, targets));
    X::float_reshape(nll, leading)
}

/// The targets as vocabulary indices (the kernel checks they are below the vocabulary).
fn indices(targets: FlexTensor) -> Vec<usize> {
    targets
        .into_data()
        .iter::<i64>()
        .map(|t| usize::try_from(t).unwrap_or(usize::MAX))
        .collect()
}

impl TokenNllKernels for Flex {
    fn fused_token_nll(logits: FlexTensor, targets: FlexTensor) -> Option<FlexTensor> {
        if logits.dtype() != DType::F32 {
            return None;
        }
        let logits = contiguous(logits);
        let (_, vocab, leading) = rows_of(&logits.shape());
        let nll = cross_entropy::token_nll(f32s(&logits), vocab, &indices(targets));
        Some(FlexTensor::from_data(TensorData::new(nll, leading)))
    }

    fn fused_token_nll_grad(
        logits: FlexTensor,
        targets: FlexTensor,
        grad: FlexTensor,
    ) -> FlexTensor {
        let (logits, grad) = (contiguous(logits), contiguous(grad));
        let shape = logits.shape();
        let (_, vocab, _) = rows_of(&shape);
        let out =
            cross_entropy::token_nll_grad(f32s(&logits), vocab, &indices(targets), f32s(&grad));
        FlexTensor::from_data(TensorData::new(out, shape))
    }
}

impl TokenNllBackend for Flex {
    fn token_nll(logits: FlexTensor, targets: FlexTensor) -> FlexTensor {
        match Self::fused_token_nll(logits.clone(), targets.clone()) {
            Some(nll) => nll,
            None => composed::<Flex>(logits, targets),
        }
    }
}

impl TokenNllKernels for Cube {
    fn fused_token_nll(_: FloatTensor<Self>, _: IntTensor<Self>) -> Option<FloatTensor<Self>> {
        None
    }

    fn fused_token_nll_grad(
        _: FloatTensor<Self>,
        _: IntTensor<Self>,
        _: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        unreachable!("CubeCL runtimes never return a fused loss, so no fused backward runs")
    }
}

impl TokenNllBackend for Cube {
    fn token_nll(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        composed::<Cube>(logits, targets)
    }
}

/// Keeps the logits and targets; the backward recomputes each row's log-sum-exp (one pass)
/// rather than storing the softmax (a second copy of the logits).
#[derive(Debug)]
struct TokenNllBackward;

impl<B: TokenNllKernels> Backward<B, 1> for TokenNllBackward {
    type State = (FloatTensor<B>, IntTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (logits, targets) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::fused_token_nll_grad(logits, targets, grad)
        });
    }
}

impl<B: TokenNllBackend + TokenNllKernels, C: CheckpointStrategy> TokenNllBackend
    for Autodiff<B, C>
{
    fn token_nll(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        let Some(nll) = B::fused_token_nll(logits.primitive().clone(), targets.clone()) else {
            // No fused kernel: burn's operations on this wrapper record their own backward.
            return composed::<Self>(logits, targets);
        };
        let (logits, node) = logits.into_parts();
        match TokenNllBackward
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((logits, targets), nll),
            OpsKind::UnTracked(prep) => prep.finish(nll),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution, TensorData};

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_into_vec_as().expect("float32")
    }

    /// The unfused formula the operation replaces.
    fn composed(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
        let picked = logits.clone().gather(2, targets.unsqueeze_dim(2));
        let max = logits.clone().max_dim(2).detach();
        let logsumexp = (logits - max.clone()).exp().sum_dim(2).log() + max;
        (logsumexp - picked).squeeze_dim(2)
    }

    #[test]
    fn loss_and_gradient_match_the_composed_formula() {
        let device = Device::flex().autodiff();
        // 2 × 3 positions over 11 words (serial), and 2 × 40 over 1500 (rows in parallel).
        for &(batch, seq, vocab) in &[(2usize, 3usize, 11usize), (2, 40, 1500)] {
            let logits = Tensor::<3>::random(
                [batch, seq, vocab],
                Distribution::Uniform(-8.0, 8.0),
                &device,
            );
            let ids: Vec<i64> = (0..batch * seq).map(|i| (i * 31 % vocab) as i64).collect();
            let targets = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, seq]), &device);
            let weights = Tensor::<2>::random([batch, seq], Distribution::Default, &device);

            let x = logits.clone().detach().require_grad();
            let ours = token_nll(x.clone(), targets.clone());
            let our_grad = x
                .grad(&(ours.clone() * weights.clone()).sum().backward())
                .expect("tracked");
            let x = logits.detach().require_grad();
            let theirs = composed(x.clone(), targets);
            let their_grad = x
                .grad(&(theirs.clone() * weights).sum().backward())
                .expect("tracked");

            for (got, want) in values(ours).iter().zip(values(theirs)) {
                assert!(
                    (got - want).abs() < 1e-5 * want.abs().max(1.0),
                    "{got} vs {want}"
                );
            }
            for (got, want) in values(our_grad).iter().zip(values(their_grad)) {
                assert!((got - want).abs() < 1e-6, "{got} vs {want}");
            }
        }
    }
}
