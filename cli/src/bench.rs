//! `fedtune bench`: performance measurements printed as a table or JSON. Benchmarks, not timed
//! tests: they report numbers and never fail on them.

use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Int, Tensor, TensorData};
use fedtune_shared::eval::batch_loss;
use fedtune_shared::lora::attach::attach_fresh;
use fedtune_shared::lora::train::{LoraTrainer, TrainConfig, TrainExample};
use fedtune_shared::lora::{LoraConfig, LoraScaling, TargetModule};
use fedtune_shared::model::{Llama, TokenBatch};
use fedtune_shared::noise::{NoiseDistribution, SeedNoise};
use fedtune_shared::peak_memory;
use fedtune_shared::zo::step::{ZoStepConfig, ZoSteps};

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

/// Deterministic, varied token ids of a benchmark sequence: the cost does not depend on which
/// tokens they are.
fn bench_ids(seq_len: usize, vocab: usize) -> Vec<i64> {
    (0..seq_len as i64)
        .map(|i| (i * 7919 + 13) % vocab as i64)
        .collect()
}

/// Bytes of every parameter tensor of `model` (elements times element size): the weight memory
/// a forward pass reads.
pub fn weight_bytes(model: &Llama) -> usize {
    struct Sum(usize);
    impl ModuleVisitor for Sum {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let tensor = param.val();
            self.0 += tensor.shape().num_elements() * tensor.dtype().size();
        }
    }
    let mut sum = Sum(0);
    model.visit(&mut sum);
    sum.0
}

/// Times one full forward pass (all positions' logits) of batch 1 at `seq_len` tokens.
pub fn forward(model: &Llama, seq_len: usize, warmup: usize, runs: usize) -> Timings {
    let runs = runs.max(1);
    let device = model.device();
    let ids = bench_ids(seq_len, model.vocab_size());
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

/// One forward pass of each model, timed like [`forward`] but alternately in one process:
/// round `i` runs every model once, in turn (reversed on odd rounds, so that no model always
/// follows the same one). On a machine shared with other work, a slow spell then slows every
/// model alike, and the ratio of their medians stays trustworthy where their absolute times do
/// not.
///
/// Returns each model's timings and, per model, the median over rounds of
/// `time(models[0]) / time(model)` in the same round (the paired speedup; 1 for the first).
pub fn forward_alternating(
    models: &[&Llama],
    seq_len: usize,
    warmup: usize,
    runs: usize,
) -> (Vec<Timings>, Vec<f64>) {
    let runs = runs.max(1);
    let inputs: Vec<Tensor<2, Int>> = models
        .iter()
        .map(|model| {
            let ids = bench_ids(seq_len, model.vocab_size());
            Tensor::from_data(TensorData::new(ids, [1, seq_len]), &model.device())
        })
        .collect();
    let mut samples = vec![Vec::with_capacity(runs); models.len()];
    for i in 0..warmup + runs {
        let mut order: Vec<usize> = (0..models.len()).collect();
        if i % 2 == 1 {
            order.reverse();
        }
        for m in order {
            let start = Instant::now();
            let logits = models[m].forward(inputs[m].clone(), None);
            let _: f32 = logits.narrow(1, seq_len - 1, 1).sum().into_scalar();
            if i >= warmup {
                samples[m].push(start.elapsed().as_secs_f64());
            }
        }
    }
    let paired = samples
        .iter()
        .map(|s| {
            let ratios = samples[0].iter().zip(s).map(|(a, b)| a / b).collect();
            Timings::from_samples(ratios).median_s
        })
        .collect();
    (
        samples.into_iter().map(Timings::from_samples).collect(),
        paired,
    )
}

/// Timings of one zeroth-order step.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ZoTimings {
    /// Median of whole steps in a run of steps (three noise generations, two weight passes,
    /// two forward passes each; see `ZoSteps`).
    pub median_s: f64,
    /// Median of the step's noise passes (`median_s - forward_s`).
    pub noise_s: f64,
    /// Median of the step's two loss evaluations.
    pub forward_s: f64,
    /// Noise values generated per second on every core, as one pass over the model's size.
    pub noise_values_per_s: f64,
}

/// Times one ZO step (batch 1, `seq_len` tokens) on `model`.
pub fn zo(model: Llama, seq_len: usize, warmup: usize, runs: usize) -> ZoTimings {
    let runs = runs.max(1);
    let device = model.device();
    let ids: Vec<u32> = bench_ids(seq_len, model.vocab_size())
        .iter()
        .map(|&t| t as u32)
        .collect();
    let batch = TokenBatch::right_padded(&[ids], 0, &device);
    let params = model.num_params();

    let mut forwards = Vec::with_capacity(runs);
    for i in 0..warmup + runs {
        let start = Instant::now();
        let _ = batch_loss(&model, &batch);
        let _ = batch_loss(&model, &batch);
        if i >= warmup {
            forwards.push(start.elapsed().as_secs_f64());
        }
    }
    let mut steps = Vec::with_capacity(runs);
    let mut stepper = ZoSteps::new(model, ZoStepConfig::default());
    for i in 0..warmup + runs {
        let noise = SeedNoise::new(i as u64, NoiseDistribution::Binomial16);
        let start = Instant::now();
        stepper.step(noise, |m| batch_loss(m, &batch));
        if i >= warmup {
            steps.push(start.elapsed().as_secs_f64());
        }
    }
    let mut buffer = vec![0.0f32; params];
    let mut fills = Vec::with_capacity(runs);
    for i in 0..warmup + runs {
        let start = Instant::now();
        SeedNoise::new(i as u64, NoiseDistribution::Binomial16).fill_parallel(0, 0, &mut buffer);
        if i >= warmup {
            fills.push(start.elapsed().as_secs_f64());
        }
    }
    let step = Timings::from_samples(steps).median_s;
    let forward = Timings::from_samples(forwards).median_s;
    ZoTimings {
        median_s: step,
        noise_s: (step - forward).max(0.0),
        forward_s: forward,
        noise_values_per_s: params as f64 / Timings::from_samples(fills).median_s,
    }
}

/// Timings and memory of one LoRA training step.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoraTimings {
    /// Median step (forward, backward, clipping, AdamW).
    pub median_s: f64,
    /// Fastest step.
    pub min_s: f64,
    /// Steps measured.
    pub runs: usize,
    /// The process's peak resident memory over loading and all steps.
    pub peak_rss_bytes: Option<u64>,
}

/// Times LoRA training steps (batch 1, `seq_len` tokens, loss on every token) on `model`, which
/// must live on an autodiff device.
pub fn lora(
    model: Llama,
    seq_len: usize,
    rank: usize,
    targets: Vec<TargetModule>,
    warmup: usize,
    runs: usize,
) -> LoraTimings {
    let runs = runs.max(1);
    let config = LoraConfig {
        rank,
        scaling: LoraScaling {
            alpha: 2.0 * rank as f32,
            rslora: false,
        },
        dropout: 0.05,
        targets,
    };
    let ids: Vec<u32> = bench_ids(seq_len, model.vocab_size())
        .iter()
        .map(|&t| t as u32)
        .collect();
    let example = [TrainExample::text(ids)];
    let mut model = attach_fresh(model, &config, 0);
    let mut trainer = LoraTrainer::new(TrainConfig::default(), 0);
    let mut samples = Vec::with_capacity(runs);
    for i in 0..warmup + runs {
        let start = Instant::now();
        let loss;
        (model, loss) = trainer.step(model, &example);
        assert!(loss.is_some(), "the benchmark sequence has targets");
        if i >= warmup {
            samples.push(start.elapsed().as_secs_f64());
        }
    }
    let t = Timings::from_samples(samples);
    LoraTimings {
        median_s: t.median_s,
        min_s: t.min_s,
        runs: t.runs,
        peak_rss_bytes: peak_memory::peak_rss_bytes(),
    }
}
