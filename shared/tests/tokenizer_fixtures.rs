//! The tokenizer rebuilt from SmolLM2's GGUF file against Hugging Face transformers' own output
//! for the same model (`../shared/fixtures/smollm2/reference.json`).
//!
//! Both the fixtures and the model live outside the repository; when either is absent the tests
//! say so and pass without checking anything.

use std::path::Path;

use fedtune_shared::checkpoint::GgufFile;
use fedtune_shared::tokenizer::{ChatMessage, Tokenizer};
use serde::Deserialize;

const REFERENCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/fixtures/smollm2/reference.json"
);
const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
);

#[derive(Deserialize)]
struct Reference {
    tokenize: Vec<TokenizeCase>,
    generate: Vec<GenerateCase>,
}

#[derive(Deserialize)]
struct TokenizeCase {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct GenerateCase {
    messages: Vec<ChatMessage>,
    templated: String,
    prompt_ids: Vec<u32>,
    greedy_new_ids: Vec<u32>,
    greedy_text: String,
}

/// The model's tokenizer and the reference data, or `None` (with the reason printed) when
/// either file is missing.
fn setup(test: &str) -> Option<(Tokenizer, Reference)> {
    for path in [REFERENCE, MODEL] {
        if !Path::new(path).exists() {
            eprintln!("SKIPPED: {test}: {path} is absent");
            return None;
        }
    }
    let reference = std::fs::read_to_string(REFERENCE).expect("read reference.json");
    let reference = serde_json::from_str(&reference).expect("parse reference.json");
    let gguf = GgufFile::open(MODEL).expect("open the model");
    let tokenizer =
        Tokenizer::from_gguf(gguf.metadata(), Path::new(MODEL)).expect("build tokenizer");
    Some((tokenizer, reference))
}

#[test]
fn tokenize_matches_transformers() {
    let Some((tokenizer, reference)) = setup("tokenize_matches_transformers") else {
        return;
    };
    assert_eq!(tokenizer.vocab_size(), 49152);
    for case in &reference.tokenize {
        let ids = tokenizer.encode(&case.text).unwrap();
        assert_eq!(ids, case.ids, "ids of {:?}", case.text);
        assert_eq!(
            tokenizer.decode(&ids).unwrap(),
            case.text,
            "decode of {:?}",
            case.ids
        );
    }
}

#[test]
fn chat_prompt_matches_transformers() {
    let Some((tokenizer, reference)) = setup("chat_prompt_matches_transformers") else {
        return;
    };
    let case = &reference.generate[0];
    let templated = tokenizer.apply_chat_template(&case.messages, true).unwrap();
    assert_eq!(templated, case.templated);
    assert_eq!(tokenizer.encode(&templated).unwrap(), case.prompt_ids);
}

#[test]
fn greedy_reply_decodes_and_ends_the_turn() {
    let Some((tokenizer, reference)) = setup("greedy_reply_decodes_and_ends_the_turn") else {
        return;
    };
    let case = &reference.generate[0];
    assert_eq!(
        tokenizer.decode(&case.greedy_new_ids).unwrap(),
        case.greedy_text
    );
    assert!(
        tokenizer.end_of_turn_ids().contains(&2),
        "{:?}",
        tokenizer.end_of_turn_ids()
    );
    let last = case.greedy_new_ids.last().unwrap();
    assert!(tokenizer.end_of_turn_ids().contains(last));
    assert_eq!(tokenizer.bos_id(), Some(1));
    assert_eq!(tokenizer.eos_id(), Some(2));
}
