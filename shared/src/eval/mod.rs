//! Measuring a model: next-token negative log-likelihood (and so perplexity).

pub mod perplexity;

pub use perplexity::{batch_loss, mean_next_token_nll, next_token_nll, token_nlls};
