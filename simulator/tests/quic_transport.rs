//! The QUIC transport trains the same devices with the same seeds as the in-process one: the
//! daemon over loopback ends with the same global state, byte for byte.

mod common;

use common::{block_population, single_rank_lora};
use fedtune_server::config::AlgorithmConfig;
use fedtune_shared::lora::TargetModule;
use fedtune_shared::lora::config::LoraConfig;
use fedtune_shared::lora::train::TrainConfig;
use fedtune_shared::prune::schedule::PruneSchedule;
use fedtune_simulator::engine::{Driver, RoundPolicy, blob_store, run_in_process};
use fedtune_simulator::evaluation::Evaluator;
use fedtune_simulator::fleet::{FleetSpec, assign};
use fedtune_simulator::population::Population;
use fedtune_simulator::quic::{QuicRun, run_quic};
use fedtune_tests::network::{fedkseed_run, load_model, tiny_model_folder};

const CLIENTS: usize = 3;
const ROUNDS: u64 = 2;
const SEED: u64 = 5;

fn population() -> Population {
    let profiles = assign(
        &FleetSpec::Mix {
            mix: "uniform".into(),
        }
        .profiles()
        .unwrap(),
        CLIENTS,
    );
    block_population(&profiles, 20..24, SEED)
}

fn both(algorithm: AlgorithmConfig) -> (Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model_folder(dir.path(), 9);
    let base = load_model(&model);
    let population = population();
    let fleet = FleetSpec::Mix {
        mix: "uniform".into(),
    }
    .profiles()
    .unwrap();

    let blobs = blob_store(&dir.path().join("in-process")).unwrap();
    let mut driver = Driver::new(&algorithm, &base, blobs.clone(), SEED, None).unwrap();
    let policy = RoundPolicy {
        rounds: ROUNDS,
        clients_per_round: CLIENTS,
        deadline_s: None,
        seed: SEED,
        eval_every: ROUNDS,
        concurrency: 1,
        secure: None,
    };
    let evaluator = Evaluator {
        heldout: population.heldout.clone(),
        pad_id: 0,
        rouge: None,
    };
    run_in_process(
        "t",
        "t",
        &base,
        &mut driver,
        &blobs,
        &population,
        &fleet,
        &policy,
        &evaluator,
        |_| {},
    )
    .unwrap();

    let quic = run_quic(
        &QuicRun {
            label: "t".into(),
            algorithm_name: "t".into(),
            model: model.clone(),
            algorithm,
            robust: Default::default(),
            privacy: Default::default(),
            rounds: ROUNDS,
            seed: SEED,
            work_dir: dir.path().join("quic"),
            timeout: std::time::Duration::from_secs(120),
        },
        &base,
        &population,
    )
    .unwrap();
    assert_eq!(quic.records.len() as u64, ROUNDS);
    for r in &quic.records {
        assert!(
            r.clients == CLIENTS && r.bytes_up > 0 && r.bytes_down > 0,
            "{r:?}"
        );
    }
    let served = std::fs::read(quic.checkpoint.expect("a checkpoint")).unwrap();
    (driver.checkpoint(), served)
}

#[test]
fn fedkseed_over_quic_equals_in_process() {
    let (in_process, served) = both(AlgorithmConfig::Fedkseed {
        run: fedkseed_run(),
        batch_size: 1,
    });
    assert!(!in_process.is_empty());
    assert!(
        in_process == served,
        "the daemon's checkpoint differs from the in-process one"
    );
}

#[test]
fn lora_over_quic_equals_in_process() {
    let (in_process, served) = both(single_rank_lora());
    assert!(!in_process.is_empty());
    assert!(
        in_process == served,
        "the daemon's checkpoint differs from the in-process one"
    );
}

#[test]
fn fedspine_over_quic_equals_in_process() {
    // One arm (ratio, rank), as for LoRA; devices prune while they tune either way.
    let (in_process, served) = both(AlgorithmConfig::FedSpine {
        lora: LoraConfig {
            rank: 4,
            dropout: 0.0,
            targets: TargetModule::ALL.to_vec(),
            ..LoraConfig::default()
        },
        ranks: vec![4],
        ratios: vec![0.2],
        schedule: PruneSchedule {
            every: 1,
            protect_first: 0,
            protect_last: false,
            ..PruneSchedule::default()
        },
        train: TrainConfig {
            lr: 1e-2,
            warmup_steps: 0,
            ..TrainConfig::default()
        },
        local_steps: 3,
    });
    assert!(!in_process.is_empty());
    assert!(
        in_process == served,
        "the daemon's checkpoint differs from the in-process one"
    );
}
