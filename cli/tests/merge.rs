//! `fedtune merge` on the real model: a PEFT adapter folded into SmolLM2 and written as a
//! Hugging Face folder (with the tokenizer) gives the same logits as the adapter applied on the
//! fly.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use burn::tensor::{Device, Int, Tensor, TensorData};
use fedtune_shared::checkpoint::hf_folder::HfFolder;
use fedtune_shared::lora::attach::attach_weights;
use fedtune_shared::lora::peft::{PeftExportOptions, read_peft_adapter, write_peft_adapter};
use fedtune_shared::lora::{AdaptedLayer, AdapterWeights, LoraFactors, LoraScaling, TargetModule};
use fedtune_shared::model::Llama;
use fedtune_shared::pretrained::Pretrained;

fn logits(model: &Llama, device: &Device) -> Vec<f32> {
    let ids = Tensor::<2, Int>::from_data(
        TensorData::new(vec![1i64, 504, 3458, 28, 253], [1, 5]),
        device,
    );
    model
        .forward(ids, None)
        .into_data()
        .try_into_vec_as()
        .unwrap()
}

#[test]
fn merged_model_equals_the_adapted_model() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        eprintln!("SKIPPED: needs {}", path.display());
        return;
    }
    let device = Device::flex();
    let base = Pretrained::open(&path, &device, |_, _| {}).unwrap();
    let config = base.config.clone();
    // A rank-2 adapter on q_proj and v_proj of every layer, with deterministic values.
    let mut layers = BTreeMap::new();
    let kv_width = config.num_kv_heads * config.head_dim;
    for layer in 0..config.num_layers {
        for (target, d_out) in [
            (TargetModule::QProj, config.num_heads * config.head_dim),
            (TargetModule::VProj, kv_width),
        ] {
            let d_in = config.hidden_size;
            let wave =
                |i: usize, k: usize| ((i * 31 + k * 17 + layer * 7) % 97) as f32 / 97.0 - 0.5;
            layers.insert(
                AdaptedLayer { layer, target },
                LoraFactors {
                    rank: 2,
                    d_in,
                    d_out,
                    a: (0..2 * d_in).map(|i| wave(i, 1) * 0.05).collect(),
                    b: (0..d_out * 2).map(|i| wave(i, 2) * 0.05).collect(),
                },
            );
        }
    }
    let adapter = AdapterWeights {
        rank: 2,
        scaling: LoraScaling {
            alpha: 4.0,
            rslora: false,
        },
        layers,
    };
    let dir = tempfile::tempdir().unwrap();
    let adapter_dir = dir.path().join("adapter");
    write_peft_adapter(
        &adapter_dir,
        &adapter,
        &PeftExportOptions::new("HuggingFaceTB/SmolLM2-135M-Instruct"),
    )
    .unwrap();
    let (read_back, _) = read_peft_adapter(&adapter_dir).unwrap();
    assert_eq!(read_back, adapter, "the adapter loads back bit-exactly");

    let out = dir.path().join("merged");
    let status = Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args([
            "merge",
            "--model",
            path.to_str().unwrap(),
            "--adapter",
            adapter_dir.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );

    // The folder carries the base model's tokenizer, so it is a complete model.
    let tokenizer = Pretrained::open_tokenizer(&out).unwrap();
    let text = "<|im_start|>user\nhello 2024<|im_end|>";
    assert_eq!(
        tokenizer.encode(text).unwrap(),
        base.tokenizer.encode(text).unwrap()
    );
    let merged = Llama::load(&HfFolder::open(&out).unwrap(), &device, |_, _| {}).unwrap();
    let adapted = attach_weights(base.model, &adapter, 0.0).unwrap();
    let (a, m) = (logits(&adapted, &device), logits(&merged, &device));
    let scale = a.iter().fold(0.0f32, |x, v| x.max(v.abs()));
    let diff = a
        .iter()
        .zip(&m)
        .fold(0.0f32, |x, (p, q)| x.max((p - q).abs()))
        / scale;
    eprintln!("merged vs adapted: max relative logit difference {diff:.2e}");
    assert!(diff < 1e-4, "{diff}");

    // A bad adapter folder is refused with a clear error.
    std::fs::write(adapter_dir.join("adapter_config.json"), "{").unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_fedtune"))
        .args([
            "merge",
            "--model",
            path.to_str().unwrap(),
            "--adapter",
            adapter_dir.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("adapter_config.json"));
}
