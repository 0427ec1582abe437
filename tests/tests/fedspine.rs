//! FedSpine in process, through the daemon's interfaces: the server's FedSpine driver
//! ([`ServerAlgorithm`]) and the device's trainer ([`train_fedspine`]), nothing else, with
//! devices of three simulated speeds.
//!
//! Rounds have a deadline, as the daemon's: a report that would arrive after it is not counted
//! and the device's arm earns nothing that round (`MISSED_ROUND_REWARD`), and the round lasts
//! until its last counted report or the deadline. That is what makes pruning pay for a slow
//! device: progress per unit of time alone ranks a device's arms the same whatever its speed.
//!
//! A device's simulated round time is `LATENCY_S + slowdown × work`: a fixed part every device
//! pays (scheduling, handshakes, waiting for the round to open) and its own compute and transfer,
//! scaled by how slow it is. The work is counted, not timed: the prunable weights each iteration
//! ran on (the pruned model's size, falling as it is pruned) plus the adapter's weights, in
//! multiply-adds, and the adapter's bytes both ways. On a shared two-core CI machine a measured
//! wall time of a tiny model is mostly dispatch overhead and noise from other jobs, which would
//! make a bandit assertion flaky; the count is what the wall time measures on a real device.

use std::collections::BTreeMap;

use burn::tensor::Device;
use fedtune_client::trainer::{TrainingData, train_fedspine};
use fedtune_server::algorithm::ServerAlgorithm;
use fedtune_server::algorithm::fedspine::{
    DEFAULT_RANKS, DEFAULT_RATIOS, FedSpine, FedSpineSettings,
};
use fedtune_server::algorithm::lora::LoraSettings;
use fedtune_server::blobs::Blobs;
use fedtune_shared::checkpoint::MemorySource;
use fedtune_shared::lora::adapter::{AdapterWeights, TargetModule};
use fedtune_shared::lora::aggregation::AggregationStrategy;
use fedtune_shared::lora::attach::{adapter_weights, attach_fresh};
use fedtune_shared::lora::config::LoraConfig;
use fedtune_shared::lora::train::{TrainConfig, TrainExample};
use fedtune_shared::model::{Llama, LlamaConfig};
use fedtune_shared::progress::Silent;
use fedtune_shared::protocol::adapter_blob::{decode_adapter, encode_adapter};
use fedtune_shared::protocol::{DeviceId, Report, ReportPayload, Task};
use fedtune_shared::prune::schedule::{ImportanceKind, PruneSchedule};
use fedtune_shared::prune::units::LayerShape;
use fedtune_tests::network::counting;

/// What every device pays per round whatever its configuration, seconds.
const LATENCY_S: f64 = 20.0;
/// Seconds per multiply-add on the fastest device (an arbitrary unit that sets how much of a
/// fast device's round is compute: 10-25% here).
const SECONDS_PER_MAC: f64 = 2e-7;
/// Seconds per adapter byte sent or received on the fastest device.
const SECONDS_PER_BYTE: f64 = 1e-7;
/// The round's deadline: a report that would arrive later is not counted (the daemon's
/// `deadline_s`), and the round lasts until then.
const DEADLINE_S: f64 = 110.0;
/// The three speeds: how many times slower than the fastest.
const SLOWDOWNS: [f64; 3] = [1.0, 5.0, 25.0];
const LOCAL_STEPS: usize = 8;
const BATCH: usize = 2;

fn examples(starts: impl Iterator<Item = u32>) -> Vec<TrainExample> {
    counting(starts, 12)
        .into_iter()
        .map(TrainExample::text)
        .collect()
}

/// The base every device holds: a random model of [`config`] (counting is learnt from scratch
/// by the adapters over the run, so every round has progress to make).
fn base() -> Llama {
    Llama::load(
        &MemorySource::random(LlamaConfig::tiny_gqa(), 3),
        &Device::flex(),
        |_, _| {},
    )
    .expect("random model")
}

struct SimDevice {
    id: DeviceId,
    slowdown: f64,
    data: TrainingData,
}

/// `(ratio, rank)` of every device in every round, and every round's time (its slowest
/// device's).
struct RunLog {
    chosen: Vec<BTreeMap<usize, (f64, usize)>>,
    round_times: Vec<f64>,
}

fn settings(base: &Llama, ratios: Vec<f64>, ranks: Vec<usize>) -> FedSpineSettings {
    FedSpineSettings {
        lora: LoraSettings {
            lora: LoraConfig {
                rank: 16,
                targets: TargetModule::ALL.to_vec(),
                dropout: 0.0,
                ..LoraConfig::default()
            },
            ranks,
            train: TrainConfig {
                lr: 5e-4,
                warmup_steps: 0,
                batch_size: BATCH,
                ..TrainConfig::default()
            },
            local_steps: LOCAL_STEPS,
            strategy: AggregationStrategy::FlexLora,
            seed: 11,
            max_norm: None,
        },
        ratios,
        schedule: PruneSchedule {
            target: 0.0,
            every: 2,
            protect_first: 0,
            protect_last: false,
            importance: ImportanceKind::LoraGradient,
        },
        shapes: base.layers.iter().map(LayerShape::of).collect(),
    }
}

/// Multiply-adds of a round: forward and backward through the kept base weights (2 per weight
/// per token: the input gradient; the frozen weights get none), forward, backward and weight
/// gradient through the adapter (3 per weight), for every token of every iteration.
fn round_work_s(param_steps: u64, adapter: &AdapterWeights, tokens_per_step: usize) -> f64 {
    let adapter_params: usize = adapter.layers.values().map(|f| f.a.len() + f.b.len()).sum();
    let macs = (2 * param_steps as usize + 3 * LOCAL_STEPS * adapter_params) * tokens_per_step;
    let bytes = 2 * 4 * adapter_params;
    macs as f64 * SECONDS_PER_MAC + bytes as f64 * SECONDS_PER_BYTE
}

fn run(base: &Llama, devices: &[SimDevice], settings: FedSpineSettings, rounds: u64) -> RunLog {
    let dir = tempfile::tempdir().expect("tempdir");
    let blobs = Blobs::open(dir.path()).expect("blobs");
    let mut fresh = settings.lora.lora.clone();
    fresh.rank = settings.lora.ranks.iter().copied().max().expect("ranks");
    let initial = adapter_weights(
        &attach_fresh(base.clone(), &fresh, settings.lora.seed),
        fresh.scaling,
    )
    .expect("adapters");
    let mut server = FedSpine::new(settings, blobs.clone(), initial);
    let mut log = RunLog {
        chosen: Vec::new(),
        round_times: Vec::new(),
    };
    for round in 1..=rounds {
        let mut reports = Vec::new();
        let mut chosen = BTreeMap::new();
        let mut slowest = 0.0f64;
        for (i, device) in devices.iter().enumerate() {
            let Task::FedSpine(task) = server.task(device.id, round - 1).expect("task") else {
                panic!("not a FedSpine task");
            };
            let sent = task.lora.adapter.expect("adapter blob");
            let global = decode_adapter(&blobs.read(&sent.digest).expect("read")).expect("decode");
            let outcome = train_fedspine(
                base,
                &task,
                &global,
                &device.data,
                round * 97 + i as u64,
                &mut Silent,
            )
            .expect("train");
            assert!(
                (outcome.removed_ratio - task.schedule.target).abs() < 0.05,
                "pruned {} toward {}",
                outcome.removed_ratio,
                task.schedule.target
            );
            let mut stats = outcome.stats;
            stats.wall_s = LATENCY_S
                + device.slowdown * round_work_s(outcome.param_steps, &outcome.adapter, BATCH * 11);
            // Past the deadline the report never arrives; the round waited until then.
            let delivered = stats.wall_s <= DEADLINE_S;
            slowest = slowest.max(stats.wall_s.min(DEADLINE_S));
            if std::env::var_os("FEDSPINE_TRACE").is_some() {
                // Per-round choices and losses, for tuning the scenario by hand.
                eprintln!(
                    "round {round} device {i}: ratio {} rank {} loss {:.4} -> {:.4} time {:.2}",
                    task.schedule.target,
                    task.lora.lora.rank,
                    stats.first_loss,
                    stats.loss_after,
                    stats.wall_s
                );
            }
            let adapter = blobs
                .put(&encode_adapter(&outcome.adapter))
                .expect("upload");
            let report = Report {
                run_id: 1,
                round,
                stats,
                payload: ReportPayload::FedSpine {
                    adapter,
                    rank: task.lora.lora.rank,
                    kept: outcome.kept,
                },
            };
            chosen.insert(i, (task.schedule.target, task.lora.lora.rank));
            if delivered {
                server.validate(device.id, &report).expect("valid report");
                reports.push((device.id, report));
            }
        }
        reports.sort_by_key(|(id, _)| *id);
        server.aggregate(&reports).expect("aggregate");
        log.chosen.push(chosen);
        log.round_times.push(slowest);
    }
    log
}

/// The mean ratio and rank a device chose over `rounds`.
fn mean_choice(rounds: &[BTreeMap<usize, (f64, usize)>], device: usize) -> (f64, f64) {
    let n = rounds.len() as f64;
    let ratio = rounds.iter().map(|r| r[&device].0).sum::<f64>() / n;
    let rank = rounds.iter().map(|r| r[&device].1 as f64).sum::<f64>() / n;
    (ratio, rank)
}

/// The acceptance test: slow devices get higher pruning ratios and lower ranks than fast ones,
/// and the run's rounds are shorter than with every device at the fast devices' configuration.
#[test]
fn bandit_prunes_slow_devices_more_and_shortens_rounds() {
    let base = base();
    let devices: Vec<SimDevice> = SLOWDOWNS
        .iter()
        .enumerate()
        .map(|(i, &slowdown)| SimDevice {
            id: DeviceId([i as u8 + 1; 16]),
            slowdown,
            data: TrainingData {
                examples: examples((0..16).map(|s| s * 4 + i as u32)),
                ..TrainingData::default()
            },
        })
        .collect();
    let ratios = vec![0.0, 0.3, 0.5];
    let ranks = vec![4, 16];
    let rounds = 30;
    let adaptive = run(
        &base,
        &devices,
        settings(&base, ratios.clone(), ranks.clone()),
        rounds,
    );
    // After every arm has been tried (6 arms), what each device settled on.
    let late = &adaptive.chosen[rounds as usize / 2..];
    let choices: Vec<(f64, f64)> = (0..devices.len()).map(|d| mean_choice(late, d)).collect();
    eprintln!("mean (ratio, rank) per device, slowdowns {SLOWDOWNS:?}: {choices:?}");
    let (fast, slow) = (choices[0], choices[2]);
    assert!(slow.0 > fast.0, "slow ratio {} <= fast {}", slow.0, fast.0);
    assert!(slow.1 < fast.1, "slow rank {} >= fast {}", slow.1, fast.1);

    // The fast device's most frequent late configuration, for everyone.
    let mut counts: BTreeMap<(u64, usize), usize> = BTreeMap::new();
    for r in late {
        let (ratio, rank) = r[&0];
        *counts.entry((ratio.to_bits(), rank)).or_default() += 1;
    }
    let (&(ratio_bits, rank), _) = counts.iter().max_by_key(|(_, n)| **n).expect("rounds");
    let fixed = run(
        &base,
        &devices,
        settings(&base, vec![f64::from_bits(ratio_bits)], vec![rank]),
        rounds,
    );
    let mean = |t: &[f64]| t.iter().sum::<f64>() / t.len() as f64;
    let (adaptive_s, fixed_s) = (mean(&adaptive.round_times), mean(&fixed.round_times));
    eprintln!(
        "mean simulated round time: bandit {adaptive_s:.2} s, everyone at the fast devices' ({}, {rank}) {fixed_s:.2} s",
        f64::from_bits(ratio_bits)
    );
    assert!(adaptive_s < fixed_s, "{adaptive_s} >= {fixed_s}");
}

#[test]
fn default_arms_are_ratio_times_rank() {
    let base = base();
    let s = settings(&base, DEFAULT_RATIOS.to_vec(), DEFAULT_RANKS.to_vec());
    let arms = s.arms();
    assert_eq!(arms.len(), 15);
    assert_eq!((arms[0].pruning_ratio, arms[0].lora_rank), (0.0, 4));
    assert_eq!((arms[14].pruning_ratio, arms[14].lora_rank), (0.5, 16));
}
