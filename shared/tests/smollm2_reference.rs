//! The real SmolLM2-135M-Instruct model against Hugging Face transformers' reference numbers
//! (`../shared/fixtures/smollm2`, see `../shared/README.md`): forward-pass NLL and logits, and
//! greedy generation. Skips, saying why, when the model or the fixtures are absent.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use fedtune_shared::eval::mean_next_token_nll;
use fedtune_shared::generate::{GenerationConfig, generate};
use fedtune_shared::pretrained::Pretrained;
use serde_json::Value;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/smollm2")
}

fn model_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The reference JSON and the loaded model, or `None` (with the reason printed) to skip.
fn setup() -> Option<(Value, Pretrained)> {
    let reference = fixtures_dir().join("reference.json");
    let model = model_path();
    if !reference.is_file() {
        eprintln!("SKIPPED: no reference fixtures at {}", reference.display());
        return None;
    }
    if !model.is_file() {
        eprintln!(
            "SKIPPED: model absent at {} (run `fedtune fetch-model`)",
            model.display()
        );
        return None;
    }
    let json = serde_json::from_str(&std::fs::read_to_string(reference).unwrap()).unwrap();
    let pretrained = Pretrained::open(&model, &Device::flex(), |_, _| {}).unwrap();
    Some((json, pretrained))
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn forward_matches_transformers() {
    let Some((reference, pretrained)) = setup() else {
        return;
    };
    let model = &pretrained.model;
    assert_eq!(pretrained.config.num_params(), 134_515_008);
    for entry in reference["forward"].as_array().unwrap() {
        let prompt = entry["prompt"].as_str().unwrap();
        let ids = ids_of(&entry["ids"]);
        assert_eq!(
            pretrained.tokenizer.encode(prompt).unwrap(),
            ids,
            "tokens of {prompt:?}"
        );

        let nll = mean_next_token_nll(model, &ids).unwrap();
        let expected = entry["mean_next_token_nll"].as_f64().unwrap();
        assert!(
            (nll - expected).abs() < 2e-3,
            "{prompt:?}: NLL {nll} vs {expected}"
        );

        let device = model.device();
        let input = ids.iter().map(|&t| t as i64).collect::<Vec<_>>();
        let input = Tensor::<2, Int>::from_data(TensorData::new(input, [1, ids.len()]), &device);
        let last: Vec<f32> = model
            .forward(input, None)
            .narrow(1, ids.len() - 1, 1)
            .into_data()
            .try_into_vec_as()
            .unwrap();
        let file = fixtures_dir().join(entry["last_logits_file"].as_str().unwrap());
        let want: Vec<f32> = std::fs::read(file)
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(last.len(), want.len());
        let max_ref = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let max_diff = last
            .iter()
            .zip(&want)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        let rel = max_diff / max_ref;
        eprintln!("{prompt:?}: NLL {nll:.6} (ref {expected:.6}), logits max rel diff {rel:.2e}");
        assert!(
            rel < 1e-3,
            "{prompt:?}: last logits differ by {rel} relative"
        );

        let top = entry["last_logits_top10"][0][0].as_u64().unwrap() as usize;
        let argmax = last
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(argmax, top, "{prompt:?}: most likely next token");
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    let Some((reference, pretrained)) = setup() else {
        return;
    };
    let entry = &reference["generate"][0];
    let prompt = ids_of(&entry["prompt_ids"]);
    let expected = ids_of(&entry["greedy_new_ids"]);
    let config = GenerationConfig {
        max_new_tokens: 24,
        stop_ids: pretrained.tokenizer.end_of_turn_ids(),
        ..GenerationConfig::default()
    };
    let generation = generate(&pretrained.model, &prompt, &config, |_| {});
    assert_eq!(generation.new_ids, expected);
    assert_eq!(
        pretrained.tokenizer.decode(&generation.new_ids).unwrap(),
        entry["greedy_text"].as_str().unwrap()
    );
}
