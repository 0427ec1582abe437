//! The next-token negative log-likelihood, `logsumexp(logits) − logits[target]` per position,
//! as one differentiable operation.
//!
//! Composed from tensor operations the loss walks the `[positions, vocabulary]` logits about
//! ten times and keeps several copies of them alive for the backward pass. This operation keeps
//! only the logits (alive anyway) and computes the gradient `softmax − one-hot` in one pass; on
//! burn-flex both directions run on `fedtune_kernels::cross_entropy`, rows in parallel. Other
//! backends compose it from their own operations.

mod op;

pub use op::{TokenNllBackend, TokenNllGrad};

use burn::tensor::{Int, Tensor};

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
