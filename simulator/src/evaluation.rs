//! Evaluation of a run's global model on the held-out split: mean next-token loss (and so
//! perplexity) on held-out examples; for instruction data, Rouge-L F of greedy answers.

use fedtune_shared::data::example::Example;
use fedtune_shared::eval::generation_rouge::greedy_rouge_l;
use fedtune_shared::lora::federation::heldout_loss;
use fedtune_shared::lora::train::TrainExample;
use fedtune_shared::model::Llama;
use fedtune_shared::tokenizer::Tokenizer;

/// What an evaluation measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Mean held-out loss (nats per target token).
    pub loss: f32,
    /// Mean Rouge-L F of greedy answers, instruction data only.
    pub rouge_l: Option<f32>,
}

/// Held-out instructions answered greedily and scored with Rouge-L.
#[derive(Debug, Clone)]
pub struct RougeSet {
    /// Encodes prompts and decodes answers.
    pub tokenizer: Tokenizer,
    /// Held-out instruction examples (prompt and reference response).
    pub examples: Vec<Example>,
    /// Longest prompt in tokens (its end is kept).
    pub max_prompt_tokens: usize,
    /// Longest answer in tokens.
    pub max_new_tokens: usize,
}

/// The held-out data and how to score a model on it.
#[derive(Debug, Clone)]
pub struct Evaluator {
    /// Held-out examples (the loss covers their targets).
    pub heldout: Vec<TrainExample>,
    /// Padding token of batches.
    pub pad_id: u32,
    /// Greedy answers to score, for instruction data.
    pub rouge: Option<RougeSet>,
}

impl Evaluator {
    /// Scores `model` (an inference model).
    pub fn evaluate(&self, model: &Llama) -> Evaluation {
        let rouge_l = self.rouge.as_ref().map(|set| {
            match greedy_rouge_l(
                model,
                &set.tokenizer,
                &set.examples,
                set.max_prompt_tokens,
                set.max_new_tokens,
            ) {
                Ok(scores) => scores.mean_f as f32,
                Err(e) => {
                    tracing::warn!(error = %e, "Rouge-L evaluation failed");
                    f32::NAN
                }
            }
        });
        Evaluation {
            loss: heldout_loss(model, &self.heldout, self.pad_id),
            rouge_l,
        }
    }
}
