//! `fedtune bench`: performance measurements printed as a table or JSON. Benchmarks, not timed
//! tests: they report numbers and never fail on them.

use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use fedtune_shared::model::Llama;

/// Timings of one benchmark, in seconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Timings {
    /// Median of the measured runs.
    pub median_s: f64,
    /// Fastest run.
    pub min_s: f64,
    /// Runs measured (after warm-up).
    pub runs: usize,
}

impl Timings {
    fn from_samples(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let median_s = if n % 2 == 1 {
            samples[n / 2]
        } else {
            (samples[n / 2 - 1] + samples[n / 2]) / 2.0
        };
        Self {
            median_s,
            min_s: samples[0],
            runs: n,
        }
    }
}

/// Times one full forward pass (all positions' logits) of batch 1 at `seq_len` tokens.
pub fn forward(model: &Llama, seq_len: usize, warmup: usize, runs: usize) -> Timings {
    let runs = runs.max(1);
    let device = model.device();
    let vocab = model.vocab_size() as i64;
    // Deterministic, varied token ids: the cost does not depend on which tokens they are.
    let ids: Vec<i64> = (0..seq_len as i64).map(|i| (i * 7919 + 13) % vocab).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, seq_len]), &device);
    let mut samples = Vec::with_capacity(runs);
    for i in 0..warmup + runs {
        let start = Instant::now();
        let logits = model.forward(ids.clone(), None);
        // Reading a value back waits for asynchronous backends (wgpu) to finish.
        let _: f32 = logits.narrow(1, seq_len - 1, 1).sum().into_scalar();
        if i >= warmup {
            samples.push(start.elapsed().as_secs_f64());
        }
    }
    Timings::from_samples(samples)
}
