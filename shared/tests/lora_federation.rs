//! An in-process federated LoRA run on a small random model: clients of different ranks, chosen
//! by their bandits, aggregated with HetLoRA or FlexLoRA, lower the held-out loss.

use burn::tensor::Device;
use fedtune_shared::bandit::BanditPolicy;
use fedtune_shared::checkpoint::MemorySource;
use fedtune_shared::lora::aggregation::AggregationStrategy;
use fedtune_shared::lora::federation::{
    LoraClient, LoraFederationConfig, rank_histogram, run_lora_federation,
};
use fedtune_shared::lora::train::{TrainConfig, TrainExample};
use fedtune_shared::lora::{LoraConfig, LoraScaling, TargetModule};
use fedtune_shared::model::{Llama, LlamaConfig};

/// Client `c`'s sequences follow the cycle `t → t + step` (mod 32) with its own step, so the
/// clients share structure (arithmetic progressions) but differ.
fn sequences(step: u32, count: u32) -> Vec<TrainExample> {
    (0..count)
        .map(|s| TrainExample::text((0..12).map(|i| (s * 3 + i * step) % 32).collect()))
        .collect()
}

fn run(strategy: AggregationStrategy) -> (f32, Vec<f32>, std::collections::BTreeMap<usize, usize>) {
    let device = Device::flex().autodiff();
    let base = Llama::load(
        &MemorySource::random(LlamaConfig::tiny(), 21),
        &device,
        |_, _| {},
    )
    .unwrap();
    let clients: Vec<LoraClient> = (1..=4)
        .map(|c| LoraClient {
            data: sequences(c, 10),
            slowdown: [1.0, 2.0, 8.0, 1.0][c as usize - 1],
        })
        .collect();
    let heldout: Vec<TrainExample> = (1..=4)
        .flat_map(|c| sequences(c, 13).split_off(10))
        .collect();
    let config = LoraFederationConfig {
        rounds: 8,
        clients_per_round: 3,
        local_steps: 6,
        lora: LoraConfig {
            rank: 8,
            scaling: LoraScaling {
                alpha: 16.0,
                rslora: false,
            },
            dropout: 0.0,
            targets: TargetModule::ALL.to_vec(),
        },
        ranks: vec![2, 4, 8],
        bandit: BanditPolicy::default(),
        train: TrainConfig {
            lr: 5e-3,
            warmup_steps: 0,
            decay_steps: 100,
            batch_size: 2,
            ..TrainConfig::default()
        },
        strategy,
        seed: 3,
    };
    let before = fedtune_shared::lora::federation::heldout_loss(
        &Llama::load(
            &MemorySource::random(LlamaConfig::tiny(), 21),
            &Device::flex(),
            |_, _| {},
        )
        .unwrap(),
        &heldout,
        0,
    );
    let mut stats = Vec::new();
    let global =
        run_lora_federation(base, &clients, &heldout, &config, |s| stats.push(s.clone())).unwrap();
    assert_eq!(
        global.rank, 8,
        "the global adapter is kept at the largest rank"
    );
    for s in &stats {
        assert!(s.upload_bytes > 0 && s.local_round_s > 0.0);
        if s.round > 1 {
            assert!(s.download_bytes > 0);
        }
    }
    let losses = stats.iter().map(|s| s.heldout_loss).collect();
    (before, losses, rank_histogram(&stats))
}

#[test]
fn federated_lora_with_mixed_ranks_lowers_the_heldout_loss() {
    for strategy in [AggregationStrategy::FlexLora, AggregationStrategy::HetLora] {
        let (before, losses, ranks) = run(strategy);
        eprintln!("{strategy:?}: held-out {before:.4} -> {losses:?}; ranks trained {ranks:?}");
        let last = *losses.last().unwrap();
        assert!(last < before - 0.3, "{strategy:?}: {before} -> {last}");
        assert!(
            ranks.len() >= 2,
            "{strategy:?}: clients trained at several ranks: {ranks:?}"
        );
    }
}
