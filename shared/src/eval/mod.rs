//! Measuring a model: next-token negative log-likelihood (and so perplexity), and Rouge-L of
//! its generations against references.

pub mod generation_rouge;
pub mod perplexity;
pub mod rouge;

pub use generation_rouge::{GenerationScores, greedy_rouge_l};
pub use perplexity::{batch_loss, mean_next_token_nll, next_token_nll, token_nlls};
pub use rouge::{RougeL, mean_rouge_l_f, rouge_l};
