//! Properties of the model that must hold on any weights: incremental decoding with the KV cache
//! equals a full forward pass, and right padding does not change a row's logits.

use burn::tensor::{Device, Int, Tensor, TensorData};
use fedtune_shared::checkpoint::MemorySource;
use fedtune_shared::model::{Llama, LlamaConfig, TokenBatch};

fn tiny_model() -> Llama {
    Llama::load(
        &MemorySource::random(LlamaConfig::tiny(), 3),
        &Device::flex(),
        |_, _| {},
    )
    .unwrap()
}

fn ids_tensor(ids: &[i64], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), device)
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff < 1e-4, "{what}: max difference {diff}");
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    let model = tiny_model();
    let device = model.device();
    let ids = [4i64, 8, 15, 16, 23, 42, 7, 1];
    let full: Vec<f32> = model
        .forward(ids_tensor(&ids, &device), None)
        .into_data()
        .try_into_vec_as()
        .unwrap();

    // Prefill three tokens, then feed the rest one at a time.
    let mut cache = model.new_cache();
    let mut stepped: Vec<f32> = model
        .forward(ids_tensor(&ids[..3], &device), Some(&mut cache))
        .into_data()
        .try_into_vec_as()
        .unwrap();
    for &id in &ids[3..] {
        let step: Vec<f32> = model
            .forward(ids_tensor(&[id], &device), Some(&mut cache))
            .into_data()
            .try_into_vec_as()
            .unwrap();
        stepped.extend(step);
    }
    assert_eq!(cache.len(), ids.len());
    assert_close(&stepped, &full, "cached decoding");
}

#[test]
fn right_padding_leaves_real_positions_unchanged() {
    let model = tiny_model();
    let device = model.device();
    let short = vec![5u32, 6, 7];
    let long = vec![9u32, 10, 11, 12, 13, 14];
    let batch = TokenBatch::right_padded(&[short.clone(), long.clone()], 0, &device);
    let logits = model.forward_batch(&batch);
    let [_, seq, vocab] = logits.dims();
    let all: Vec<f32> = logits.into_data().try_into_vec_as().unwrap();

    for (row, ids) in [short, long].iter().enumerate() {
        let alone: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        let alone: Vec<f32> = model
            .forward(ids_tensor(&alone, &device), None)
            .into_data()
            .try_into_vec_as()
            .unwrap();
        let start = row * seq * vocab;
        assert_close(
            &all[start..start + ids.len() * vocab],
            &alone,
            &format!("row {row}"),
        );
    }
}
