//! Robust aggregation against poisoned LoRA updates on a small random model: ten clients, two of
//! them (20%) attackers that send their honest update sign-flipped and scaled by ten. Over a few
//! rounds the coordinate-wise median, the trimmed mean and Krum keep lowering the held-out loss;
//! plain averaging follows the attackers uphill.

use burn::module::Module;
use burn::tensor::Device;
use fedtune_shared::checkpoint::MemorySource;
use fedtune_shared::lora::attach::{adapter_weights, attach_fresh, attach_weights};
use fedtune_shared::lora::federation::heldout_loss;
use fedtune_shared::lora::train::{LoraTrainer, TrainConfig, TrainExample};
use fedtune_shared::lora::{LoraConfig, LoraScaling, TargetModule};
use fedtune_shared::model::{Llama, LlamaConfig};
use fedtune_shared::progress::Silent;
use fedtune_shared::robust::RobustRule;
use fedtune_shared::robust::flat::{adapter_delta, apply_adapter_delta};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const CLIENTS: usize = 10;
const ATTACKERS: usize = 2;
const ROUNDS: usize = 4;

/// Arithmetic progressions mod 32 with a client-specific start: shared structure to learn.
fn sequences(offset: u32, count: u32) -> Vec<TrainExample> {
    (0..count)
        .map(|s| TrainExample::text((0..12).map(|i| (offset + s * 5 + i * 3) % 32).collect()))
        .collect()
}

/// Held-out loss of the global adapter before the first round and after each round.
fn run(rule: RobustRule) -> Vec<f32> {
    let device = Device::flex().autodiff();
    let base = Llama::load(
        &MemorySource::random(LlamaConfig::tiny(), 5),
        &device,
        |_, _| {},
    )
    .expect("tiny model");
    let lora = LoraConfig {
        rank: 4,
        scaling: LoraScaling {
            alpha: 8.0,
            rslora: false,
        },
        dropout: 0.0,
        targets: vec![TargetModule::QProj, TargetModule::VProj],
    };
    let train = TrainConfig {
        lr: 1e-2,
        warmup_steps: 0,
        decay_steps: 1000,
        batch_size: 2,
        ..TrainConfig::default()
    };
    let data: Vec<Vec<TrainExample>> = (0..CLIENTS as u32).map(|c| sequences(c, 8)).collect();
    let heldout: Vec<TrainExample> = (0..CLIENTS as u32)
        .map(|c| sequences(c + 1, 1)[0].clone())
        .collect();
    let mut global = adapter_weights(&attach_fresh(base.clone(), &lora, 9), lora.scaling)
        .expect("adapters attached");
    let eval = |g: &_| {
        let model = attach_weights(base.clone(), g, 0.0).expect("attach");
        heldout_loss(&model.valid(), &heldout, train.pad_id)
    };
    let mut losses = vec![eval(&global)];
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for round in 0..ROUNDS {
        let mut updates = Vec::with_capacity(CLIENTS);
        for (c, client_data) in data.iter().enumerate() {
            let model = attach_weights(base.clone(), &global, 0.0).expect("attach");
            let mut trainer = LoraTrainer::new(train.clone(), round * 3);
            let (trained, _) = trainer.train_round(model, client_data, 3, &mut rng, &mut Silent);
            let local = adapter_weights(&trained, lora.scaling).expect("trained adapter");
            let mut delta = adapter_delta(&global, &local).expect("same shapes");
            if c < ATTACKERS {
                delta.iter_mut().for_each(|d| *d *= -10.0);
            }
            updates.push(delta);
        }
        let refs: Vec<&[f32]> = updates.iter().map(Vec::as_slice).collect();
        let combined = rule.aggregate(&refs, &[1.0; CLIENTS]).expect("aggregate");
        global = apply_adapter_delta(&global, &combined).expect("apply");
        losses.push(eval(&global));
    }
    losses
}

#[test]
fn robust_rules_keep_improving_under_attack_and_the_mean_does_not() {
    let mean = run(RobustRule::Mean);
    println!("mean: {mean:?}");
    assert!(
        mean[ROUNDS] >= mean[0],
        "plain averaging should be derailed by the attackers: {mean:?}"
    );
    for rule in [
        RobustRule::Median,
        RobustRule::TrimmedMean { trim: 0.2 },
        RobustRule::Krum {
            byzantine: ATTACKERS,
            multi: CLIENTS - 2 * ATTACKERS,
        },
    ] {
        let losses = run(rule);
        println!("{}: {losses:?}", rule.name());
        assert!(
            losses[ROUNDS] < losses[0] - 0.05 && losses[ROUNDS] < losses[ROUNDS / 2],
            "{} should keep improving: {losses:?} (mean: {mean:?})",
            rule.name()
        );
    }
}
