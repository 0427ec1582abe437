//! Evaluation of a run's global model on the held-out split: mean next-token loss (and so
//! perplexity) on held-out examples; for instruction data, Rouge-L F of greedy answers.

use fedtune_shared::lora::federation::heldout_loss;
use fedtune_shared::lora::train::TrainExample;
use fedtune_shared::model::Llama;

/// What an evaluation measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Mean held-out loss (nats per target token).
    pub loss: f32,
    /// Mean Rouge-L F of greedy answers, instruction data only.
    pub rouge_l: Option<f32>,
}

/// The held-out data and how to score a model on it.
#[derive(Debug, Clone)]
pub struct Evaluator {
    /// Held-out examples (the loss covers their targets).
    pub heldout: Vec<TrainExample>,
    /// Padding token of batches.
    pub pad_id: u32,
}

impl Evaluator {
    /// Scores `model` (an inference model).
    pub fn evaluate(&self, model: &Llama) -> Evaluation {
        Evaluation {
            loss: heldout_loss(model, &self.heldout, self.pad_id),
            rouge_l: None,
        }
    }
}
