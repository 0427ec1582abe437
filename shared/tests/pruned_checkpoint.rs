//! Pruned models as checkpoints, on tiny grouped-query models: a pruned folder (per-layer sizes
//! in `config.json`, compensation biases in `model.safetensors`, `pruning.json` beside them)
//! loads back through `HfFolder` to exactly the in-memory pruned model, prunes again with
//! records that compose, and an unpruned model's files stay what they always were.

use std::collections::BTreeMap;

use burn::module::Module;
use burn::tensor::Device;
use fedtune_shared::checkpoint::export::{write_gguf, write_hf_folder};
use fedtune_shared::checkpoint::{CheckpointError, GgmlType, GgufMetadata, HfFolder, WeightSource};
use fedtune_shared::model::{Llama, LlamaConfig, TokenBatch};
use fedtune_shared::prune::{
    Axis, CalibrationInfo, KeptUnits, PRUNING_FILE, PruneMetric, PruneOptions, PrunePlan,
    PruneStep, PruningRecord, RatioBasis, calibrate, gather, plan_flap, plan_magnitude,
    prune_model, write_pruned_folder,
};

mod gqa_model;
use gqa_model::sequences;

/// The shared test model with an untied head, so checkpoints carry `lm_head` too.
fn config() -> LlamaConfig {
    LlamaConfig {
        tie_word_embeddings: false,
        ..gqa_model::config()
    }
}

fn model(seed: u64) -> Llama {
    gqa_model::model_of(config(), seed)
}

fn logits(model: &Llama, sequences: &[Vec<u32>]) -> Vec<f32> {
    let batch = TokenBatch::right_padded(sequences, 0, &model.device());
    model
        .forward_batch(&batch)
        .into_data()
        .try_into_vec_as()
        .unwrap()
}

fn step(metric: PruneMetric, ratio: f64, removed_params: usize) -> PruneStep {
    PruneStep {
        metric,
        ratio,
        ratio_of: RatioBasis::Prunable,
        removed_params,
        prunable_params: 0,
        total_params: 0,
        removed_fraction_of_prunable: 0.0,
        removed_fraction_of_total: 0.0,
        bias_compensation: true,
        calibration: Some(CalibrationInfo {
            text: "<synthetic>".into(),
            sequences: 16,
            seq_len: 16,
            tokens: 160,
        }),
    }
}

/// The tensor names and shapes of a folder's `model.safetensors`.
fn tensors(dir: &std::path::Path) -> BTreeMap<String, Vec<usize>> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.shape.clone()))
        .collect()
}

fn host(t: burn::tensor::Tensor<2>) -> Vec<f32> {
    t.into_data().try_into_vec_as().unwrap()
}

#[test]
fn a_pruned_folder_loads_back_to_the_in_memory_pruned_model() {
    let device = Device::flex();
    let full = model(1);
    let base = config();
    let seqs = sequences(16, 1);
    let stats = calibrate(&full, &seqs);
    let plan = plan_flap(&stats, &full, 0.3, &PruneOptions::default()).unwrap();
    assert!(plan.compensation.is_some());
    let removed = plan.removed_params(&full);
    let (pruned, kept) = prune_model(full.clone(), &plan);
    let record = PruningRecord::new(
        "tiny",
        &full,
        kept.clone(),
        step(PruneMetric::Flap, 0.3, removed),
    );

    let dir = tempfile::tempdir().unwrap();
    write_pruned_folder(&pruned, &base, &record, dir.path()).unwrap();

    // config.json: the full model's model-wide sizes, each layer's own in fedtune's keys.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(json["num_attention_heads"], 6);
    assert_eq!(json["intermediate_size"], 64);
    let per_layer = |key: &str| -> Vec<serde_json::Value> { json[key].as_array().unwrap().clone() };
    let heads: Vec<usize> = kept.iter().map(|k| k.kv_heads.len()).collect();
    let channels: Vec<usize> = kept.iter().map(|k| k.ffn_channels.len()).collect();
    assert_eq!(
        per_layer("fedtune_layer_kv_heads"),
        heads
            .iter()
            .map(|&h| h.into())
            .collect::<Vec<serde_json::Value>>()
    );
    assert_eq!(
        per_layer("fedtune_layer_heads"),
        heads
            .iter()
            .map(|&h| (2 * h).into())
            .collect::<Vec<serde_json::Value>>()
    );
    assert_eq!(
        per_layer("fedtune_layer_intermediate"),
        channels
            .iter()
            .map(|&c| c.into())
            .collect::<Vec<serde_json::Value>>()
    );
    assert!(heads.iter().any(|&h| h < 3) && channels.iter().any(|&c| c < 64));

    // model.safetensors: shrunken projections, and a bias where a layer lost inputs.
    let names = tensors(dir.path());
    for (i, kept) in kept.iter().enumerate() {
        let (h, c) = (kept.kv_heads.len(), kept.ffn_channels.len());
        let name = |leaf: &str| format!("model.layers.{i}.{leaf}");
        assert_eq!(names[&name("self_attn.q_proj.weight")], vec![2 * h * 8, 32]);
        assert_eq!(names[&name("self_attn.k_proj.weight")], vec![h * 8, 32]);
        assert_eq!(names[&name("self_attn.o_proj.weight")], vec![32, 2 * h * 8]);
        assert_eq!(names[&name("mlp.down_proj.weight")], vec![32, c]);
        assert_eq!(
            names.get(&name("self_attn.o_proj.bias")),
            (h < 3).then_some(&vec![32])
        );
        assert_eq!(
            names.get(&name("mlp.down_proj.bias")),
            (c < 64).then_some(&vec![32])
        );
        assert_eq!(json["fedtune_layer_o_proj_bias"][i], h < 3);
        assert_eq!(json["fedtune_layer_down_proj_bias"][i], c < 64);
    }

    // Loading gives the pruned model, bit for bit.
    let folder = HfFolder::open(dir.path()).unwrap();
    assert_eq!(folder.config(), &pruned.architecture(&base));
    assert_eq!(folder.config().num_params(), pruned.num_params());
    let loaded = Llama::load(&folder, &device, |_, _| {}).unwrap();
    let heldout = sequences(6, 99);
    assert_eq!(logits(&loaded, &heldout), logits(&pruned, &heldout));

    // pruning.json reads back and describes the folder's config.
    let back = PruningRecord::read(dir.path()).unwrap().unwrap();
    assert_eq!(back, record);
    back.check(folder.config()).unwrap();

    // Pruning the loaded model again: the records compose into full coordinates, and the
    // uncompensated output projections are the full ones' kept columns.
    let second = plan_magnitude(&loaded, 0.2, &PruneOptions::default()).unwrap();
    let removed = second.removed_params(&loaded);
    let (twice, kept_again) = prune_model(loaded, &second);
    let composed = back.then(&kept_again, step(PruneMetric::Magnitude, 0.2, removed));
    assert_eq!(composed.steps.len(), 2);
    let again = dir.path().join("again");
    write_pruned_folder(&twice, folder.config(), &composed, &again).unwrap();
    let reloaded = Llama::load(&HfFolder::open(&again).unwrap(), &device, |_, _| {}).unwrap();
    assert_eq!(logits(&reloaded, &heldout), logits(&twice, &heldout));
    for ((layer, original), kept) in twice.layers.iter().zip(&full.layers).zip(&composed.kept) {
        for (small, big, columns) in [
            (
                &layer.attention.q_proj,
                &original.attention.q_proj,
                kept.query_columns(2, 8),
            ),
            (
                &layer.attention.v_proj,
                &original.attention.v_proj,
                kept.kv_columns(8),
            ),
            (
                &layer.mlp.up_proj,
                &original.mlp.up_proj,
                kept.ffn_channels.clone(),
            ),
        ] {
            assert_eq!(
                gather(
                    &host(big.weight.val()),
                    big.weight.dims(),
                    Axis::Columns,
                    &columns
                ),
                host(small.weight.val())
            );
        }
    }
    PruningRecord::read(&again)
        .unwrap()
        .unwrap()
        .check(&twice.architecture(&base))
        .unwrap();
}

#[test]
fn an_unpruned_model_writes_the_files_it_always_did() {
    let full = model(2);
    let base = config();
    // Keeping everything leaves the architecture (and so config.json) as loaded.
    let (same, _) = prune_model(full.clone(), &PrunePlan::keep_all(&full));
    assert_eq!(same.architecture(&base), base);

    let dir = tempfile::tempdir().unwrap();
    write_hf_folder(&same.to_source(&base), dir.path()).unwrap();
    let json = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    assert_eq!(json, base.to_hf_json());
    assert!(!json.contains("fedtune"), "{json}");
    let names = tensors(dir.path());
    assert_eq!(names.len(), 1 + 4 * 9 + 1 + 1);
    assert!(names.keys().all(|n| n.ends_with(".weight")));
    assert!(!dir.path().join(PRUNING_FILE).exists());
    assert_eq!(PruningRecord::read(dir.path()).unwrap(), None);
}

#[test]
fn records_and_exports_that_do_not_fit_are_refused() {
    let full = model(3);
    let base = config();
    let plan = plan_magnitude(&full, 0.3, &PruneOptions::default()).unwrap();
    let (pruned, kept) = prune_model(full.clone(), &plan);

    // GGUF has one size per model here: a pruned model is refused, naming the reason.
    let dir = tempfile::tempdir().unwrap();
    let err = write_gguf(
        &pruned.to_source(&base),
        GgmlType::F32,
        &GgufMetadata::default(),
        &dir.path().join("pruned.gguf"),
    )
    .unwrap_err();
    assert!(
        matches!(&err, CheckpointError::BadConfig { reason, .. } if reason.contains("per-layer")),
        "{err}"
    );

    // A record of another plan does not describe this model.
    let mut wrong: Vec<KeptUnits> = kept.clone();
    wrong[0].ffn_channels.pop();
    let record = PruningRecord::new("tiny", &full, wrong, step(PruneMetric::Magnitude, 0.3, 0));
    let err = write_pruned_folder(&pruned, &base, &record, dir.path()).unwrap_err();
    assert!(err.to_string().contains("layer 0"), "{err}");

    // An unknown record format is refused with the file's name.
    let record = PruningRecord {
        format: 2,
        ..PruningRecord::new("tiny", &full, kept, step(PruneMetric::Magnitude, 0.3, 0))
    };
    record.write(dir.path()).unwrap();
    let err = PruningRecord::read(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains(PRUNING_FILE) && err.contains("format 2"),
        "{err}"
    );
}
