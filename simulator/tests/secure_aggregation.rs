//! `[privacy] secure_aggregation = true` in the harness: the in-process transport (SecAgg+'s
//! state machines, fleet drop-outs becoming SecAgg drop-outs) and the QUIC transport (the real
//! daemon and device SDKs) end with the global model of the plain run, within the quantization
//! error, and record what secure aggregation cost.

use fedtune_server::config::{AlgorithmConfig, PrivacySettings, SecAggSettings};
use fedtune_shared::lora::aggregation::AggregationStrategy;
use fedtune_shared::lora::config::LoraConfig;
use fedtune_shared::lora::train::{TrainConfig, TrainExample};
use fedtune_shared::privacy::quantize::Quantizer;
use fedtune_shared::protocol::adapter_blob::decode_adapter;
use fedtune_shared::protocol::frame::decode_body;
use fedtune_shared::zo::round::ZoServer;
use fedtune_simulator::engine::{Driver, RoundPolicy, blob_store, run_in_process};
use fedtune_simulator::evaluation::Evaluator;
use fedtune_simulator::fleet::{DeviceProfile, FleetSpec, assign};
use fedtune_simulator::population::Population;
use fedtune_simulator::quic::{QuicRun, run_quic};
use fedtune_simulator::record::RoundRecord;
use fedtune_tests::network::{counting, fedkseed_run, load_model, tiny_model_folder};

/// Rounds of LoRA. FedKSeed runs one: its gradients are loss differences over 2ε, so after a
/// round whose history is off by the quantization error (a value that truncates to another
/// 21-bit replay coefficient), the next round's gradients can differ by ulp(loss) / 2ε, far
/// above the quantizer's bound though far below the gradients themselves.
const ROUNDS: u64 = 2;
const SEED: u64 = 5;
const CLIP: f32 = 50.0;

fn secagg() -> SecAggSettings {
    SecAggSettings {
        clip: CLIP,
        // Up to two of six devices may vanish in a round.
        max_dropout: 0.4,
        ..SecAggSettings::default()
    }
}

fn population(clients: usize, profiles: &[DeviceProfile]) -> Population {
    let examples: Vec<TrainExample> = counting(0..(clients as u32 * 4), 10)
        .into_iter()
        .map(TrainExample::text)
        .collect();
    let items = (0..clients as u32)
        .map(|c| (c * 4..c * 4 + 4).collect())
        .collect();
    let heldout = counting(40..44, 10)
        .into_iter()
        .map(TrainExample::text)
        .collect();
    let names = (0..clients).map(|c| format!("device-{c}")).collect();
    let assigned = assign(profiles, clients);
    Population::new(examples, names, items, &assigned, heldout, 0, SEED).unwrap()
}

fn uniform() -> Vec<DeviceProfile> {
    FleetSpec::Mix {
        mix: "uniform".into(),
    }
    .profiles()
    .unwrap()
}

/// One in-process run; returns the daemon's checkpoint and the records.
fn in_process(
    dir: &std::path::Path,
    rounds: u64,
    algorithm: &AlgorithmConfig,
    population: &Population,
    fleet: &[DeviceProfile],
    secure: bool,
) -> (Vec<u8>, Vec<RoundRecord>) {
    let model = tiny_model_folder(dir, 9);
    let base = load_model(&model);
    let blobs = blob_store(&dir.join(if secure { "secure" } else { "plain" })).unwrap();
    let mut driver = Driver::new(algorithm, &base, blobs.clone(), SEED, None).unwrap();
    let policy = RoundPolicy {
        rounds,
        clients_per_round: population.clients.len(),
        deadline_s: None,
        seed: SEED,
        eval_every: rounds,
        concurrency: 1,
        secure: secure.then(secagg),
    };
    let evaluator = Evaluator {
        heldout: population.heldout.clone(),
        pad_id: 0,
        rouge: None,
    };
    let mut records = Vec::new();
    run_in_process(
        "t",
        "t",
        &base,
        &mut driver,
        &blobs,
        population,
        fleet,
        &policy,
        &evaluator,
        |r| records.push(r.clone()),
    )
    .unwrap();
    (driver.checkpoint(), records)
}

fn fedkseed() -> AlgorithmConfig {
    AlgorithmConfig::Fedkseed {
        run: fedkseed_run(),
        batch_size: 1,
    }
}

fn lora() -> AlgorithmConfig {
    AlgorithmConfig::Lora {
        lora: LoraConfig {
            rank: 4,
            dropout: 0.0,
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

/// The largest difference of two FedKSeed checkpoints' histories, and the largest value.
fn history_gap(a: &[u8], b: &[u8]) -> (f64, f64) {
    let (a, b): (ZoServer, ZoServer) = (decode_body(a).unwrap(), decode_body(b).unwrap());
    assert_eq!(a.round(), b.round());
    let gap = a
        .history()
        .iter()
        .zip(b.history())
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs())
        .fold(0.0, f64::max);
    let largest = a
        .history()
        .iter()
        .map(|v| f64::from(v.abs()))
        .fold(0.0, f64::max);
    (gap, largest)
}

/// The largest difference of two LoRA checkpoints' adapters, and how far B moved.
fn adapter_gap(a: &[u8], b: &[u8]) -> (f64, f64) {
    let (a, b) = (decode_adapter(a).unwrap(), decode_adapter(b).unwrap());
    let mut gap = 0.0f64;
    let mut moved = 0.0f64;
    for (p, s) in a.layers.values().zip(b.layers.values()) {
        for (x, y) in p.a.iter().chain(&p.b).zip(s.a.iter().chain(&s.b)) {
            gap = gap.max((f64::from(*x) - f64::from(*y)).abs());
        }
        moved = p.b.iter().fold(moved, |m, v| m.max(f64::from(v.abs())));
    }
    (gap, moved)
}

/// The bound on the difference after `rounds` rounds: each round's mean is off by at most the
/// sum's error (`n` half-steps) over its total weight (at least 1 with every device training
/// its full round), plus the f32 rounding of the two ways of averaging.
fn bound(clients: usize, rounds: u64) -> f64 {
    let q = Quantizer::for_sum(CLIP, clients).unwrap();
    rounds as f64 * (clients as f64 * q.max_error() + 1e-6)
}

/// The algorithms under test, with their rounds.
fn algorithms() -> [(&'static str, AlgorithmConfig, u64); 2] {
    [("fedkseed", fedkseed(), 1), ("lora", lora(), ROUNDS)]
}

fn check_costs(records: &[RoundRecord], rounds: u64) {
    assert_eq!(records.len() as u64, rounds);
    for r in records {
        let up = r.secagg_up_bytes_per_client.expect("secagg bytes up");
        let down = r.secagg_down_bytes_per_client.expect("secagg bytes down");
        assert!(
            up > 0.0 && down > 0.0 && r.secagg_server_s.is_some(),
            "{r:?}"
        );
    }
}

#[test]
fn in_process_secure_runs_with_dropouts_reach_the_plain_model() {
    // Six devices, each dropping out of a round with probability 0.2: the fleet's drop-outs
    // share keys and vanish before masking, and SecAgg+ recovers their masks.
    let mut profile = uniform()[0].clone();
    profile.dropout = 0.2;
    let fleet = vec![profile];
    let population = population(6, &fleet);
    for (name, algorithm, rounds) in algorithms() {
        let dir = tempfile::tempdir().unwrap();
        let (plain, plain_records) =
            in_process(dir.path(), rounds, &algorithm, &population, &fleet, false);
        let (secure, records) =
            in_process(dir.path(), rounds, &algorithm, &population, &fleet, true);
        check_costs(&records, rounds);
        let dropped: usize = records.iter().map(|r| r.dropped).sum();
        assert_eq!(
            dropped,
            plain_records.iter().map(|r| r.dropped).sum::<usize>()
        );
        assert!(
            dropped > 0,
            "{name}: no device dropped out; pick another seed"
        );
        let (gap, size) = match name {
            "fedkseed" => history_gap(&plain, &secure),
            _ => adapter_gap(&plain, &secure),
        };
        eprintln!(
            "{name} in process: gap {gap:e}, size {size:e}, {dropped} drop-outs, {:?}",
            records[0]
        );
        assert!(gap <= bound(6, rounds), "{name}: models differ by {gap}");
        assert!(size > 1e-3 && size < f64::from(CLIP), "{name}: {size}");
    }
}

#[test]
fn quic_secure_runs_reach_the_plain_model() {
    let fleet = uniform();
    let clients = 3;
    let population = population(clients, &fleet);
    for (name, algorithm, rounds) in algorithms() {
        let dir = tempfile::tempdir().unwrap();
        let (plain, _) = in_process(dir.path(), rounds, &algorithm, &population, &fleet, false);
        let model = tiny_model_folder(dir.path(), 9);
        let base = load_model(&model);
        let quic = run_quic(
            &QuicRun {
                label: "t".into(),
                algorithm_name: "t".into(),
                model,
                algorithm,
                robust: Default::default(),
                privacy: PrivacySettings {
                    secure_aggregation: true,
                    secagg: secagg(),
                    ..PrivacySettings::default()
                },
                rounds,
                seed: SEED,
                work_dir: dir.path().join("quic"),
                timeout: std::time::Duration::from_secs(120),
            },
            &base,
            &population,
        )
        .unwrap();
        check_costs(&quic.records, rounds);
        for r in &quic.records {
            assert_eq!(r.clients, clients, "{r:?}");
        }
        let served = std::fs::read(quic.checkpoint.expect("a checkpoint")).unwrap();
        let (gap, size) = match name {
            "fedkseed" => history_gap(&plain, &served),
            _ => adapter_gap(&plain, &served),
        };
        eprintln!(
            "{name} over QUIC: gap {gap:e}, size {size:e}, {:?}",
            quic.records[0]
        );
        assert!(
            gap <= bound(clients, rounds),
            "{name}: models differ by {gap}"
        );
        assert!(size > 1e-3 && size < f64::from(CLIP), "{name}: {size}");
    }
}
