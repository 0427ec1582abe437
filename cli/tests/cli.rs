//! The `fedtune` binary's model commands: their JSON contract, checked against the reference
//! fixtures on the real model, and their errors on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fedtune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args(args)
        .output()
        .unwrap()
}

fn model_path() -> Option<PathBuf> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let fixtures =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/smollm2/reference.json");
    if path.is_file() && fixtures.is_file() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED: needs {} and {}",
            path.display(),
            fixtures.display()
        );
        None
    }
}

fn reference() -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/smollm2/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn json_stdout(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn tokenize_score_and_generate_print_the_documented_json() {
    let Some(model) = model_path() else { return };
    let model = model.to_str().unwrap();
    let reference = reference();

    let text = reference["tokenize"][0]["text"].as_str().unwrap();
    let out = json_stdout(&fedtune(&["tokenize", "--model", model, "--json", text]));
    assert_eq!(
        out,
        serde_json::json!({ "ids": reference["tokenize"][0]["ids"] })
    );

    let entry = &reference["forward"][0];
    let out = json_stdout(&fedtune(&[
        "score",
        "--model",
        model,
        "--json",
        entry["prompt"].as_str().unwrap(),
    ]));
    assert_eq!(out["ids"], entry["ids"]);
    let nll = out["mean_next_token_nll"].as_f64().unwrap();
    assert!(
        (nll - entry["mean_next_token_nll"].as_f64().unwrap()).abs() < 2e-3,
        "{nll}"
    );

    let entry = &reference["generate"][0];
    let prompt = entry["messages"][0]["content"].as_str().unwrap();
    let out = json_stdout(&fedtune(&[
        "generate",
        "--model",
        model,
        "--json",
        "--chat",
        "--max-new-tokens",
        "24",
        prompt,
    ]));
    assert_eq!(out["new_ids"], entry["greedy_new_ids"]);
    assert_eq!(out["text"], entry["greedy_text"]);
}

#[test]
fn bad_model_files_give_clear_errors() {
    let dir = std::env::temp_dir().join(format!("fedtune-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bogus = dir.join("bogus.gguf");
    std::fs::write(&bogus, b"definitely not a model").unwrap();
    let out = fedtune(&[
        "score",
        "--model",
        bogus.to_str().unwrap(),
        "--json",
        "hello there",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("bogus.gguf") && stderr.contains("not a GGUF file"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    let missing = dir.join("missing.gguf");
    let out = fedtune(&[
        "tokenize",
        "--model",
        missing.to_str().unwrap(),
        "--json",
        "x",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.gguf"));

    let out = fedtune(&["score", "--backend", "tpu", "--json", "x"]);
    assert!(
        !out.status.success(),
        "unknown backends are refused by the argument parser"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
