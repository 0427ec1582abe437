//! Rouge-L of a model's greedy answers to held-out instructions: how the simulation harness
//! scores instruction data besides perplexity.
//!
//! Each example's prompt (rendered by [`crate::data::render_instruction_prompt`]) is continued
//! greedily until an end-of-turn token or a token budget; the answer is cut where the model
//! starts a new `###` section (a model that has learnt the format, but not yet to stop, goes
//! on with `### Instruction:` of an invented next example), and scored with
//! [`rouge_l`](super::rouge::rouge_l) against the example's response.

use crate::data::Example;
use crate::generate::{GenerationConfig, generate};
use crate::model::Llama;
use crate::tokenizer::{Tokenizer, TokenizerError};

use super::rouge::rouge_l;

/// Where an answer is cut: the start of a new section of the prompt format.
const SECTION_MARK: &str = "\n###";

/// The greedy answers and their Rouge-L.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationScores {
    /// Mean Rouge-L F over the examples (an empty answer scores 0).
    pub mean_f: f64,
    /// Each example's answer, in order.
    pub answers: Vec<String>,
    /// Each answer's Rouge-L F.
    pub f: Vec<f64>,
}

/// Greedy answers of `model` to `examples`' prompts, each prompt cut to its last
/// `max_prompt_tokens` tokens, at most `max_new_tokens` new tokens each, scored with Rouge-L F
/// against the examples' responses.
///
/// # Panics
///
/// If `max_prompt_tokens` is 0.
pub fn greedy_rouge_l(
    model: &Llama,
    tokenizer: &Tokenizer,
    examples: &[Example],
    max_prompt_tokens: usize,
    max_new_tokens: usize,
) -> Result<GenerationScores, TokenizerError> {
    assert!(max_prompt_tokens > 0, "max_prompt_tokens must be positive");
    let stop_ids = tokenizer.end_of_turn_ids();
    let config = GenerationConfig {
        max_new_tokens,
        temperature: 0.0,
        stop_ids: stop_ids.clone(),
        ..GenerationConfig::default()
    };
    let mut answers = Vec::with_capacity(examples.len());
    let mut f = Vec::with_capacity(examples.len());
    for example in examples {
        let mut prompt = tokenizer.encode(&example.prompt)?;
        if prompt.len() > max_prompt_tokens {
            prompt.drain(..prompt.len() - max_prompt_tokens);
        }
        if prompt.is_empty() {
            // Plain text has no prompt to answer; start from BOS, else nothing to score.
            match tokenizer.bos_id() {
                Some(bos) => prompt.push(bos),
                None => {
                    answers.push(String::new());
                    f.push(0.0);
                    continue;
                }
            }
        }
        let mut ids = generate(model, &prompt, &config, |_| {}).new_ids;
        if ids.last().is_some_and(|id| stop_ids.contains(id)) {
            ids.pop();
        }
        let text = tokenizer.decode(&ids)?;
        let answer = text
            .find(SECTION_MARK)
            .map_or(text.as_str(), |end| &text[..end])
            .trim()
            .to_string();
        f.push(rouge_l(&answer, &example.response).map_or(0.0, |s| s.f));
        answers.push(answer);
    }
    let mean_f = if f.is_empty() {
        0.0
    } else {
        f.iter().sum::<f64>() / f.len() as f64
    };
    Ok(GenerationScores { mean_f, answers, f })
}
