//! Text generation: greedy decoding or temperature / nucleus (top-p) sampling over a KV cache.

use burn::tensor::{Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::Llama;

/// How to pick each new token.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Softmax temperature; `0.0` means greedy (always the most likely token).
    pub temperature: f32,
    /// Nucleus sampling: sample only among the most likely tokens whose probabilities add up to
    /// `top_p` (`1.0` disables it).
    pub top_p: f32,
    /// Seed of the sampler, so sampled generations are reproducible.
    pub seed: u64,
    /// Tokens that end generation (they are included in the output, as transformers does).
    pub stop_ids: Vec<u32>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_ids: Vec::new(),
        }
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was produced.
    StopToken,
    /// `max_new_tokens` were produced.
    MaxTokens,
}

/// The generated continuation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// New token ids, the stop token included.
    pub new_ids: Vec<u32>,
    /// Why generation ended.
    pub stop: StopReason,
}

/// Continues `prompt`, calling `on_token` as each token is chosen (for streaming output).
///
/// # Panics
/// When `prompt` is empty.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    config: &GenerationConfig,
    mut on_token: impl FnMut(u32),
) -> Generation {
    assert!(!prompt.is_empty(), "generation needs a non-empty prompt");
    let device = model.device();
    let mut cache = model.new_cache();
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut new_ids = Vec::new();
    let mut input = prompt.to_vec();
    while new_ids.len() < config.max_new_tokens {
        let ids: Vec<i64> = input.iter().map(|&t| t as i64).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, input.len()]), &device);
        let hidden = model.hidden(ids, None, Some(&mut cache));
        let [_, seq, _] = hidden.dims();
        // Only the last position predicts the next token: skip the head for the others.
        let logits = model.logits(hidden.narrow(1, seq - 1, 1));
        let next = if config.temperature <= 0.0 {
            let id: Vec<i64> = logits
                .argmax(2)
                .into_data()
                .try_into_vec_as()
                .expect("argmax yields integers");
            id.first().copied().unwrap_or(0) as u32
        } else {
            let row: Vec<f32> = logits
                .into_data()
                .try_into_vec_as()
                .expect("logits are float32");
            sample(&row, config.temperature, config.top_p, &mut rng)
        };
        new_ids.push(next);
        on_token(next);
        if config.stop_ids.contains(&next) {
            return Generation {
                new_ids,
                stop: StopReason::StopToken,
            };
        }
        input = vec![next];
    }
    Generation {
        new_ids,
        stop: StopReason::MaxTokens,
    }
}

/// Draws a token from `logits / temperature`, restricted to the top-`top_p` nucleus.
fn sample(logits: &[f32], temperature: f32, top_p: f32, rng: &mut impl Rng) -> u32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - max) / temperature).exp()))
        .collect();
    probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    let total: f32 = probs.iter().map(|p| p.1).sum();
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= top_p {
            cut = i + 1;
            break;
        }
    }
    let nucleus = &probs[..cut];
    let mass: f32 = nucleus.iter().map(|p| p.1).sum();
    let mut target = rng.random::<f32>() * mass;
    for &(id, p) in nucleus {
        if target < p {
            return id;
        }
        target -= p;
    }
    nucleus.last().map_or(0, |p| p.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        // Token 2 holds almost all the mass: a nucleus of 0.5 is token 2 alone.
        let logits = [0.0, 1.0, 10.0, 2.0];
        for _ in 0..100 {
            assert_eq!(sample(&logits, 1.0, 0.5, &mut rng), 2);
        }
        // With top_p = 1 and a high temperature, other tokens appear.
        let drawn: std::collections::HashSet<u32> = (0..200)
            .map(|_| sample(&logits, 100.0, 1.0, &mut rng))
            .collect();
        assert!(drawn.len() > 1);
    }
}
