//! The one in-memory form every data set is loaded into, and how an example becomes the token
//! ids a client trains on.
//!
//! An [`Example`] is a prompt and a response: plain text has an empty prompt and trains on
//! every token; instruction data has its instruction (and context) rendered into the prompt by
//! [`render_instruction_prompt`] and trains on the response only. `key` names the example's
//! owner for the natural partition (a Shakespeare role), `label` its class for Dirichlet skew
//! (a Dolly category).

use crate::lora::train::TrainExample;
use crate::tokenizer::{Tokenizer, TokenizerError};

/// One training or evaluation example.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Example {
    /// Text the model conditions on and is not trained to produce; empty for plain text.
    pub prompt: String,
    /// Text the loss covers.
    pub response: String,
    /// The natural owner of the example (`"romeo_and_juliet/Romeo"`), if the data set has one.
    pub key: Option<String>,
    /// The example's class for label-skewed partitions (`"open_qa"`), if the data set has one.
    pub label: Option<String>,
}

impl Example {
    /// A plain-text example: no prompt, the loss on all of `text`.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            response: text.into(),
            ..Self::default()
        }
    }

    /// Whether the example is instruction data (has a prompt the loss skips).
    pub fn is_instruction(&self) -> bool {
        !self.prompt.is_empty()
    }
}

/// Renders an instruction and its optional context as the prompt of an instruction example.
///
/// The format is the Alpaca/Dolly one, plain text with no model-specific special tokens, so the
/// same data trains every model the same way:
///
/// ```text
/// ### Instruction:
/// {instruction}
///
/// ### Context:
/// {context}
///
/// ### Response:
/// ```
///
/// The context block is left out when the context is empty or only whitespace. The prompt ends
/// with a newline after `### Response:`, so the response's first token starts a fresh line.
pub fn render_instruction_prompt(instruction: &str, context: &str) -> String {
    let mut prompt = format!("### Instruction:\n{}\n\n", instruction.trim());
    if !context.trim().is_empty() {
        prompt.push_str(&format!("### Context:\n{}\n\n", context.trim()));
    }
    prompt.push_str("### Response:\n");
    prompt
}

/// Turns `example` into token ids at most `seq_len` long, with `prompt_len` set so the loss
/// covers the response only.
///
/// Prompt and response are encoded separately and concatenated, so the boundary between them
/// is exact (a byte-level BPE would otherwise be free to merge across it). Instruction examples
/// end with the tokenizer's EOS token, where it has one, so that greedy generation learns to
/// stop; plain text does not (a window of a book has no end).
///
/// When the whole does not fit, the response keeps at least half the window (or all of itself
/// if shorter): the prompt is cut from its start, keeping its end (where `### Response:` is),
/// and the response is cut at its end.
///
/// # Panics
///
/// If `seq_len` is below 2 (a sequence needs a token to predict from and one to predict).
pub fn tokenize(
    example: &Example,
    tokenizer: &Tokenizer,
    seq_len: usize,
) -> Result<TrainExample, TokenizerError> {
    assert!(seq_len >= 2, "seq_len must be at least 2, got {seq_len}");
    let mut prompt = tokenizer.encode(&example.prompt)?;
    let mut response = tokenizer.encode(&example.response)?;
    if example.is_instruction()
        && let Some(eos) = tokenizer.eos_id()
    {
        response.push(eos);
    }
    if prompt.len() + response.len() > seq_len {
        // The response keeps at least half the window (all of it if shorter), more when the
        // prompt is short; the prompt keeps its end.
        let response_keep = response
            .len()
            .min((seq_len / 2).max(seq_len.saturating_sub(prompt.len())));
        let prompt_keep = prompt.len().min(seq_len - response_keep);
        prompt.drain(..prompt.len() - prompt_keep);
        response.truncate(seq_len - prompt_keep);
    }
    let prompt_len = prompt.len();
    prompt.extend(response);
    Ok(TrainExample {
        ids: prompt,
        prompt_len,
    })
}

/// [`tokenize`] for every example, in order (index `i` of the result is example `i`, so
/// partitions of the examples index the result too).
pub fn tokenize_all(
    examples: &[Example],
    tokenizer: &Tokenizer,
    seq_len: usize,
) -> Result<Vec<TrainExample>, TokenizerError> {
    examples
        .iter()
        .map(|e| tokenize(e, tokenizer, seq_len))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_format_with_and_without_context() {
        assert_eq!(
            render_instruction_prompt(" Name a colour. ", ""),
            "### Instruction:\nName a colour.\n\n### Response:\n"
        );
        assert_eq!(
            render_instruction_prompt("Summarise.", "A long text.\n"),
            "### Instruction:\nSummarise.\n\n### Context:\nA long text.\n\n### Response:\n"
        );
    }
}
