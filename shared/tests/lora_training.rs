//! LoRA on a small random model: the adapter gradients match finite differences, only adapters
//! train, the response-only loss is what it says, merging preserves the function, and training
//! lowers the loss.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use fedtune_shared::checkpoint::MemorySource;
use fedtune_shared::eval::token_nlls;
use fedtune_shared::lora::attach::{adapter_weights, attach_fresh, attach_weights, merge};
use fedtune_shared::lora::train::{LoraTrainer, TrainConfig, TrainExample, response_loss};
use fedtune_shared::lora::{LoraConfig, LoraScaling, TargetModule};
use fedtune_shared::model::{Llama, LlamaConfig, TokenBatch};
use fedtune_shared::progress::{Silent, StepProgress};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn tiny(device: &Device) -> Llama {
    Llama::load(
        &MemorySource::random(LlamaConfig::tiny(), 3),
        device,
        |_, _| {},
    )
    .unwrap()
}

fn config(rank: usize) -> LoraConfig {
    LoraConfig {
        rank,
        scaling: LoraScaling {
            alpha: 2.0 * rank as f32,
            rslora: false,
        },
        dropout: 0.0,
        targets: TargetModule::ALL.to_vec(),
    }
}

fn examples() -> Vec<TrainExample> {
    vec![
        TrainExample {
            ids: vec![1, 5, 9, 13, 17, 21, 25, 29],
            prompt_len: 3,
        },
        TrainExample::text(vec![2, 4, 8, 16, 32, 1]),
    ]
}

/// Gives every `B` random values, so that gradients with respect to `A` are not zero.
fn randomised(model: Llama, rank: usize, seed: u64) -> Llama {
    let scaling = config(rank).scaling;
    let mut weights = adapter_weights(&model, scaling).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for f in weights.layers.values_mut() {
        f.b.iter_mut()
            .for_each(|v| *v = rng.random_range(-0.2..0.2));
    }
    attach_weights(model, &weights, 0.0).unwrap()
}

#[test]
fn adapter_gradients_match_finite_differences() {
    let device = Device::flex().autodiff();
    let rank = 3;
    let model = randomised(attach_fresh(tiny(&device), &config(rank), 1), rank, 2);
    let batch = examples();
    let loss = response_loss(&model, &batch, 0).unwrap();
    let grads = GradientsParams::from_grads(loss.backward(), &model);

    // Every gradient belongs to an adapter: the base is frozen.
    struct Grads<'a>(&'a GradientsParams, Vec<(String, Option<Vec<f32>>)>);
    impl ModuleVisitor for Grads<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let g = self
                .0
                .get::<D>(param.id)
                .map(|g| g.into_data().try_into_vec_as().unwrap());
            self.1.push((format!("{:?}", param.val().dims()), g));
        }
    }
    let mut collected = Grads(&grads, Vec::new());
    model.visit(&mut collected);
    let layers = LlamaConfig::tiny().num_layers;
    let with_grad = collected.1.iter().filter(|(_, g)| g.is_some()).count();
    assert_eq!(
        with_grad,
        layers * 7 * 2,
        "exactly the A and B of every adapter"
    );
    assert_eq!(grads.len(), with_grad);

    // Directional derivative along a random direction v over all adapter values, against finite
    // differences. float32 tolerance: the loss carries ~1e-7 relative rounding, so with steps of
    // 5e-3 and 1e-2 the extrapolated quotient is good to ~1e-4 absolute; 1e-3 relative (the
    // issue's float64 bound) holds with margin.
    let scaling = config(rank).scaling;
    let base = adapter_weights(&model, scaling).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut direction = base.clone();
    for f in direction.layers.values_mut() {
        f.a.iter_mut()
            .for_each(|v| *v = rng.random_range(-1.0..1.0));
        f.b.iter_mut()
            .for_each(|v| *v = rng.random_range(-1.0..1.0));
    }
    // The analytic directional derivative, from the model's own adapter tensors.
    let mut analytic = 0.0f64;
    for (&at, dir) in &direction.layers {
        let linear = fedtune_shared::lora::attach::projection(&model.layers[at.layer], at.target);
        let adapter = linear.adapter.as_ref().unwrap();
        let ga: Vec<f32> = grads
            .get::<2>(adapter.a.id)
            .unwrap()
            .transpose()
            .into_data()
            .try_into_vec_as()
            .unwrap();
        let gb: Vec<f32> = grads
            .get::<2>(adapter.b.id)
            .unwrap()
            .transpose()
            .into_data()
            .try_into_vec_as()
            .unwrap();
        analytic += ga
            .iter()
            .zip(&dir.a)
            .map(|(g, v)| (*g * *v) as f64)
            .sum::<f64>();
        analytic += gb
            .iter()
            .zip(&dir.b)
            .map(|(g, v)| (*g * *v) as f64)
            .sum::<f64>();
    }
    let plain = model.valid();
    let loss_at = |t: f32| -> f64 {
        let mut moved = base.clone();
        for (at, f) in moved.layers.iter_mut() {
            let d = &direction.layers[at];
            f.a.iter_mut().zip(&d.a).for_each(|(w, v)| *w += t * v);
            f.b.iter_mut().zip(&d.b).for_each(|(w, v)| *w += t * v);
        }
        let m = attach_weights(plain.clone(), &moved, 0.0).unwrap();
        response_loss(&m, &batch, 0).unwrap().into_scalar::<f32>() as f64
    };
    // Richardson extrapolation of two central differences cancels their h² error term.
    let central = |h: f32| (loss_at(h) - loss_at(-h)) / (2.0 * h as f64);
    let numeric = (4.0 * central(5e-3) - central(1e-2)) / 3.0;
    let rel = (analytic - numeric).abs() / numeric.abs().max(1e-6);
    eprintln!(
        "directional derivative: analytic {analytic:.6}, central difference {numeric:.6}, relative {rel:.2e}"
    );
    assert!(numeric.abs() > 1e-3, "the direction must change the loss");
    assert!(rel < 1e-3, "analytic {analytic} vs numeric {numeric}");
}

#[test]
fn response_loss_covers_only_response_tokens() {
    let device = Device::flex();
    let model = tiny(&device);
    let batch = examples();
    let loss = response_loss(&model, &batch, 0)
        .unwrap()
        .into_scalar::<f32>();
    let rows: Vec<Vec<u32>> = batch.iter().map(|e| e.ids.clone()).collect();
    let nlls = token_nlls(&model, &TokenBatch::right_padded(&rows, 0, &device));
    // Example 0 predicts tokens 3.. (positions 2..), example 1 every token after the first.
    let picked: Vec<f32> = nlls[0][2..].iter().chain(&nlls[1]).copied().collect();
    let expected = picked.iter().sum::<f32>() / picked.len() as f32;
    assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
    assert_eq!(
        picked.len(),
        batch.iter().map(TrainExample::targets).sum::<usize>()
    );
}

fn logits(model: &Llama, device: &Device) -> Vec<f32> {
    let ids =
        Tensor::<2, Int>::from_data(TensorData::new(vec![3i64, 1, 4, 1, 5, 9], [1, 6]), device);
    model
        .forward(ids, None)
        .into_data()
        .try_into_vec_as()
        .unwrap()
}

#[test]
fn fresh_adapters_change_nothing_and_merging_keeps_the_function() {
    let device = Device::flex();
    let base = tiny(&device);
    let fresh = attach_fresh(base.clone(), &config(4), 7);
    assert_eq!(
        logits(&fresh, &device),
        logits(&base, &device),
        "B = 0 at start"
    );

    let trained = randomised(fresh, 4, 8);
    let adapted = logits(&trained, &device);
    assert_ne!(adapted, logits(&base, &device));
    let merged = merge(trained);
    let diff = adapted
        .iter()
        .zip(logits(&merged, &device))
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff < 1e-4, "merged model differs by {diff}");
}

#[test]
fn training_lowers_the_loss_and_leaves_the_base_untouched() {
    let device = Device::flex().autodiff();
    let base = tiny(&device);
    let embed_before: Vec<f32> = base
        .embed_tokens
        .val()
        .into_data()
        .try_into_vec_as()
        .unwrap();
    let mut model = attach_fresh(base, &config(4), 11);
    // A synthetic task: a fixed cycle of tokens.
    let data: Vec<TrainExample> = (0..8)
        .map(|s| TrainExample::text((0..16).map(|i| ((s + i) * 7 % 32) as u32).collect()))
        .collect();
    let train = TrainConfig {
        lr: 1e-2,
        warmup_steps: 2,
        decay_steps: 40,
        batch_size: 2,
        ..TrainConfig::default()
    };
    let loss_of = |m: &Llama| {
        response_loss(&m.valid(), &data, 0)
            .unwrap()
            .into_scalar::<f32>()
    };
    let before = loss_of(&model);
    let mut trainer = LoraTrainer::new(train, 0);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let report;
    (model, report) = trainer.train_round(model, &data, 40, &mut rng, &mut Silent);
    let after = loss_of(&model);
    eprintln!("loss {before:.4} -> {after:.4}; report {report:?}");
    assert_eq!(report.steps, 40);
    assert_eq!(report.samples, 80);
    assert!(after < before - 0.5, "loss {before} -> {after}");
    let embed_after: Vec<f32> = model
        .embed_tokens
        .val()
        .into_data()
        .try_into_vec_as()
        .unwrap();
    assert_eq!(embed_before, embed_after, "the base stays frozen");
    let adapters = adapter_weights(&model, config(4).scaling).unwrap();
    assert!(
        adapters
            .layers
            .values()
            .any(|f| f.b.iter().any(|&v| v != 0.0))
    );
}

#[test]
fn a_round_with_dropout_is_a_function_of_its_seed() {
    let device = Device::flex().autodiff();
    let base = tiny(&device);
    let dropped = LoraConfig {
        dropout: 0.3,
        ..config(4)
    };
    let data: Vec<TrainExample> = (0..4)
        .map(|s| TrainExample::text((0..12).map(|i| ((s + i) * 5 % 32) as u32).collect()))
        .collect();
    let round = |round_seed: u64| {
        let model = attach_fresh(base.clone(), &dropped, 3);
        let mut trainer = LoraTrainer::new(TrainConfig::default(), 0);
        let mut rng = ChaCha8Rng::seed_from_u64(round_seed);
        let mut done = Vec::new();
        let mut progress = |p: StepProgress| done.push((p.step, p.steps, p.loss.is_some()));
        let (model, report) = trainer.train_round(model, &data, 3, &mut rng, &mut progress);
        assert_eq!(done, vec![(1, 3, true), (2, 3, true), (3, 3, true)]);
        let weights = adapter_weights(&model, dropped.scaling).unwrap();
        (weights, report.mean_loss)
    };
    let (first, loss) = round(21);
    let (again, loss_again) = round(21);
    assert_eq!(first, again, "same seed, same masks, same adapters");
    assert_eq!(loss, loss_again);
    // Batches come from the same generator; the seed moves both, and the masks must matter:
    // the same batches with dropout off train to other adapters.
    let (other, _) = round(22);
    assert_ne!(first, other);
    let model = attach_fresh(base.clone(), &config(4), 3);
    let mut trainer = LoraTrainer::new(TrainConfig::default(), 0);
    let (model, _) = trainer.train_round(
        model,
        &data,
        3,
        &mut ChaCha8Rng::seed_from_u64(21),
        &mut Silent,
    );
    assert_ne!(adapter_weights(&model, dropped.scaling).unwrap(), first);
}
