//! The small grouped-query-attention model and token sequences the pruning tests share.
// Each test file uses a part of this module.
#![allow(dead_code)]

use burn::tensor::Device;
use fedtune_shared::checkpoint::MemorySource;
use fedtune_shared::model::{Llama, LlamaConfig};

/// Grouped-query attention with three key/value heads of two query heads each, four layers.
pub fn config() -> LlamaConfig {
    LlamaConfig::tiny_gqa()
}

/// A random model of [`config`].
pub fn model(seed: u64) -> Llama {
    model_of(config(), seed)
}

/// A random model of `config`.
pub fn model_of(config: LlamaConfig, seed: u64) -> Llama {
    Llama::load(
        &MemorySource::random(config, seed),
        &Device::flex(),
        |_, _| {},
    )
    .unwrap()
}

/// Deterministic token sequences of lengths 5 to 16 (so batches are padded).
pub fn sequences(count: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..count)
        .map(|_| {
            let len = 5 + (next() % 12) as usize;
            (0..len).map(|_| (next() % 64) as u32).collect()
        })
        .collect()
}
