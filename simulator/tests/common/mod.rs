//! Populations the harness tests share: tiny devices whose data are counting sequences, so a
//! tiny model learns them in a few rounds and every test reads the same kind of fleet.

// Each test binary uses a subset of these.
#![allow(dead_code)]

use std::ops::Range;

use fedtune_server::config::AlgorithmConfig;
use fedtune_shared::lora::aggregation::AggregationStrategy;
use fedtune_shared::lora::config::LoraConfig;
use fedtune_shared::lora::train::{TrainConfig, TrainExample};
use fedtune_simulator::population::Population;
use fedtune_tests::network::counting;

/// One device per entry of `profiles` (its profile index), each counting from its own starting
/// points: the same pattern, different text. Held out: eight sequences of the pattern.
pub fn counting_population(profiles: &[usize], seed: u64) -> Population {
    let mut examples = Vec::new();
    let mut items = Vec::new();
    for c in 0..profiles.len() as u32 {
        let start = examples.len() as u32;
        for s in counting((0..6).map(|i| c * 7 + i * 3), 12) {
            examples.push(TrainExample::text(s));
        }
        items.push((start..examples.len() as u32).collect());
    }
    let heldout = counting((0..8).map(|i| i * 5 + 1), 12)
        .into_iter()
        .map(TrainExample::text)
        .collect();
    let names = (0..profiles.len()).map(|c| format!("client-{c}")).collect();
    Population::new(examples, names, items, profiles, heldout, 0, seed).unwrap()
}

/// One device per entry of `profiles`, device `c` holding the four counting sequences that
/// start at `4c .. 4c + 4`; held out: the sequences starting in `heldout`.
pub fn block_population(profiles: &[usize], heldout: Range<u32>, seed: u64) -> Population {
    let clients = profiles.len() as u32;
    let examples: Vec<TrainExample> = counting(0..clients * 4, 10)
        .into_iter()
        .map(TrainExample::text)
        .collect();
    let items = (0..clients).map(|c| (c * 4..c * 4 + 4).collect()).collect();
    let heldout = counting(heldout, 10)
        .into_iter()
        .map(TrainExample::text)
        .collect();
    let names = (0..clients).map(|c| format!("device-{c}")).collect();
    Population::new(examples, names, items, profiles, heldout, 0, seed).unwrap()
}

/// LoRA at rank 4 for every device, FedAvg, three local steps. One rank: the bandit's choice
/// cannot depend on measured times, which differ between runs. Dropout stays on: its masks
/// follow from the plan's seed, so two transports or a secure and a plain run see the same.
pub fn single_rank_lora() -> AlgorithmConfig {
    AlgorithmConfig::Lora {
        lora: LoraConfig {
            rank: 4,
            ..LoraConfig::default()
        },
        ranks: vec![4],
        train: TrainConfig {
            lr: 1e-2,
            warmup_steps: 0,
            ..TrainConfig::default()
        },
        local_steps: 3,
        strategy: AggregationStrategy::FedAvg,
    }
}
