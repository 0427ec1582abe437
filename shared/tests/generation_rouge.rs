//! Rouge-L of greedy answers on a tiny random model with a 64-word tokenizer: the plumbing
//! (prompt, greedy decoding, stop token, decoding, scoring) gives 1 for an answer equal to the
//! reference, is deterministic, and scores each answer as `rouge_l` does.

use std::path::Path;

use burn::tensor::Device;
use fedtune_shared::checkpoint::MemorySource;
use fedtune_shared::data::{Example, render_instruction_prompt};
use fedtune_shared::eval::{greedy_rouge_l, rouge_l};
use fedtune_shared::model::{Llama, LlamaConfig};
use fedtune_shared::tokenizer::Tokenizer;

/// A word-level tokenizer with exactly the tiny model's 64 ids, so every generated id decodes.
fn tokenizer(dir: &Path) -> Tokenizer {
    let mut words: Vec<String> = ["[UNK]", "</s>", "###", "Instruction:", "Response:"]
        .iter()
        .map(|w| w.to_string())
        .collect();
    words.extend((words.len()..64).map(|i| format!("w{i}")));
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), serde_json::json!(i)))
        .collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": "</s>"}"#,
    )
    .unwrap();
    Tokenizer::from_tokenizer_json(&dir.join("tokenizer.json")).unwrap()
}

#[test]
fn greedy_answers_are_scored_with_rouge_l() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = tokenizer(dir.path());
    let device = Device::flex();
    let model = Llama::load(
        &MemorySource::random(LlamaConfig::tiny(), 3),
        &device,
        |_, _| {},
    )
    .unwrap();
    let example = |instruction: &str, response: &str| Example {
        prompt: render_instruction_prompt(instruction, ""),
        response: response.into(),
        key: None,
        label: None,
    };
    let mut examples = vec![
        example("w10 w11 w12", "w20 w21 w22 w23"),
        example("w30 w31", "w40 w41"),
        example("w50", "w60 w61 w62"),
    ];
    let first = greedy_rouge_l(&model, &tokenizer, &examples, 32, 6).unwrap();
    assert_eq!(first.answers.len(), 3);
    assert_eq!(
        first,
        greedy_rouge_l(&model, &tokenizer, &examples, 32, 6).unwrap()
    );
    for ((answer, f), e) in first.answers.iter().zip(&first.f).zip(&examples) {
        assert!(
            !answer.contains("</s>"),
            "the stop token is not part of the answer"
        );
        assert!(answer.split(' ').count() <= 6, "{answer}");
        let expected = rouge_l(answer, &e.response).map_or(0.0, |s| s.f);
        assert_eq!(*f, expected);
    }
    assert_eq!(first.mean_f, first.f.iter().sum::<f64>() / 3.0);
    eprintln!("answers {:?}, Rouge-L F {:?}", first.answers, first.f);

    // With the model's own answers as references, every non-empty answer scores 1 (to the
    // package's 1e-8 smoothing).
    for (e, answer) in examples.iter_mut().zip(&first.answers) {
        e.response = answer.clone();
    }
    let own = greedy_rouge_l(&model, &tokenizer, &examples, 32, 6).unwrap();
    for (answer, f) in own.answers.iter().zip(&own.f) {
        if answer.is_empty() {
            assert_eq!(*f, 0.0);
        } else {
            assert!((f - 1.0).abs() < 1e-7, "{answer}: {f}");
        }
    }
    assert!(
        own.answers.iter().any(|a| !a.is_empty()),
        "a random model said nothing"
    );
}
