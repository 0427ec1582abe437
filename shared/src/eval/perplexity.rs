//! Next-token negative log-likelihood: the loss every fedtune algorithm minimises and the
//! number `fedtune score` prints.

use burn::tensor::{Int, Tensor};

use crate::model::{Llama, TokenBatch};
use crate::ops::token_nll::token_nll;

/// Negative log-likelihood of every next token, as a tensor (differentiable when the model is on
/// an autodiff device).
///
/// # Shapes
/// - output: `[batch, seq - 1]`: position `t` is the NLL of `ids[t + 1]`; padding positions
///   hold values callers must mask.
///
/// # Panics
/// When the batch has fewer than two positions.
pub fn next_token_nll(model: &Llama, batch: &TokenBatch) -> Tensor<2> {
    let [_, seq] = batch.dims();
    assert!(seq >= 2, "next-token losses need two positions");
    // The last position predicts nothing here: drop it before the output head, not after.
    let lengths = batch.is_padded().then_some(batch.lengths.as_slice());
    let hidden = model
        .hidden(batch.ids.clone(), lengths, None)
        .narrow(1, 0, seq - 1);
    let logits = model.logits(hidden);
    let targets: Tensor<2, Int> = batch.ids.clone().narrow(1, 1, seq - 1);
    // -log softmax(x)[t] = logsumexp(x) - x[t], fused: the log-softmax over the vocabulary is
    // never materialised, and the backward keeps only the logits.
    token_nll(logits, targets)
}

/// Per-position negative log-likelihood (natural log) of each token given its prefix.
///
/// Row `b` yields `lengths[b] - 1` values: the NLL of `ids[b][1..len]`.
pub fn token_nlls(model: &Llama, batch: &TokenBatch) -> Vec<Vec<f32>> {
    let [rows, seq] = batch.dims();
    if seq < 2 {
        return vec![Vec::new(); rows];
    }
    let values: Vec<f32> = next_token_nll(model, batch)
        .into_data()
        .try_into_vec_as()
        .expect("losses are float32");
    (0..rows)
        .map(|b| values[b * (seq - 1)..b * (seq - 1) + batch.lengths[b].saturating_sub(1)].to_vec())
        .collect()
}

/// Mean next-token NLL of one sequence (no BOS added): the mean cross-entropy of predicting
/// `ids[1..]` from the prefix, as transformers' `model(ids, labels=ids).loss` computes it.
///
/// Returns `None` for fewer than two tokens.
pub fn mean_next_token_nll(model: &Llama, ids: &[u32]) -> Option<f64> {
    if ids.len() < 2 {
        return None;
    }
    let batch = TokenBatch::right_padded(&[ids.to_vec()], 0, &model.device());
    let nlls = token_nlls(model, &batch).pop()?;
    Some(nlls.iter().map(|&v| v as f64).sum::<f64>() / nlls.len() as f64)
}

/// Mean next-token NLL over every real (unpadded) target position of a batch: the training loss.
///
/// Returns `NaN` when the batch has no target position.
pub fn batch_loss(model: &Llama, batch: &TokenBatch) -> f32 {
    let nlls = token_nlls(model, batch);
    let count: usize = nlls.iter().map(Vec::len).sum();
    let total: f64 = nlls.iter().flatten().map(|&v| v as f64).sum();
    (total / count as f64) as f32
}
