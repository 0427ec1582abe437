//! Evaluation of a run's global model on the held-out split: mean next-token loss (and so
//! perplexity) on held-out examples; for instruction data, Rouge-L F of greedy answers.

use fedtune_shared::eval::rouge::mean_rouge_l_f;
use fedtune_shared::generate::{GenerationConfig, generate};
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
    /// (rendered prompt, reference answer) pairs.
    pub answers: Vec<(String, String)>,
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
        Evaluation {
            loss: heldout_loss(model, &self.heldout, self.pad_id),
            rouge_l: self.rouge.as_ref().map(|set| rouge_of(model, set)),
        }
    }
}

fn rouge_of(model: &Llama, set: &RougeSet) -> f32 {
    let config = GenerationConfig {
        max_new_tokens: set.max_new_tokens,
        stop_ids: set.tokenizer.eos_id().into_iter().collect(),
        ..GenerationConfig::default()
    };
    let answers: Vec<(String, &str)> = set
        .answers
        .iter()
        .filter_map(|(prompt, reference)| {
            let ids = set.tokenizer.encode(prompt).ok().filter(|ids| !ids.is_empty())?;
            let generated = generate(model, &ids, &config, |_| {});
            let text = set.tokenizer.decode(&generated.new_ids).unwrap_or_default();
            Some((text, reference.as_str()))
        })
        .collect();
    mean_rouge_l_f(answers.iter().map(|(h, r)| (h.as_str(), *r))) as f32
}
