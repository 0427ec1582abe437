//! Load a model, chat-template a question and generate an answer greedily, using the library
//! directly (what the `fedtune generate --chat` command does).
//!
//! `cargo run -p fedtune-examples --example generate -- models/SmolLM2-135M-Instruct.Q4_1.gguf "What is federated learning?"`

use burn::tensor::Device;
use fedtune_shared::generate::{GenerationConfig, generate};
use fedtune_shared::pretrained::Pretrained;
use fedtune_shared::tokenizer::ChatMessage;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let question = args
        .next()
        .unwrap_or_else(|| "What is federated learning?".into());

    let pretrained = Pretrained::open(&model, &Device::flex(), |_, _| {})?;
    let message = ChatMessage {
        role: "user".into(),
        content: question,
    };
    let prompt = pretrained.tokenizer.apply_chat_template(&[message], true)?;
    let ids = pretrained.tokenizer.encode(&prompt)?;
    let config = GenerationConfig {
        max_new_tokens: 48,
        stop_ids: pretrained.tokenizer.end_of_turn_ids(),
        ..GenerationConfig::default()
    };
    let answer = generate(&pretrained.model, &ids, &config, |_| {});
    println!("{}", pretrained.tokenizer.decode(&answer.new_ids)?);
    Ok(())
}
