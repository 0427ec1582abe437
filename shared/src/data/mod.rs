//! Training data: corpora loaded into one in-memory form ([`Example`]), how examples become
//! token ids, and how items are split among clients and held out.

pub mod example;
pub mod instructions;
pub mod partition;
pub mod plain_text;
pub mod shakespeare;

pub use example::{Example, render_instruction_prompt, tokenize, tokenize_all};
