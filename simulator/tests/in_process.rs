//! The harness in process on a tiny model: each algorithm improves held-out loss over a few
//! rounds, devices drop out as their profiles say, and runs are deterministic from the seed.

mod common;

use common::counting_population;
use fedtune_server::config::AlgorithmConfig;
use fedtune_shared::lora::TargetModule;
use fedtune_shared::lora::aggregation::AggregationStrategy;
use fedtune_shared::lora::config::LoraConfig;
use fedtune_shared::lora::train::TrainConfig;
use fedtune_shared::model::Llama;
use fedtune_shared::prune::schedule::PruneSchedule;
use fedtune_shared::zo::round::ZoRunConfig;
use fedtune_simulator::engine::{Driver, RoundPolicy, blob_store, run_in_process};
use fedtune_simulator::evaluation::Evaluator;
use fedtune_simulator::fleet::{FleetSpec, assign};
use fedtune_simulator::record::RoundRecord;
use fedtune_tests::network::{fedkseed_run, load_model, tiny_model_folder};

fn run(
    base: &Llama,
    algorithm: &AlgorithmConfig,
    fleet: &FleetSpec,
    rounds: u64,
) -> (f32, Vec<RoundRecord>) {
    let dir = tempfile::tempdir().unwrap();
    let profiles = fleet.profiles().unwrap();
    let population = counting_population(&assign(&profiles, 8), 11);
    let blobs = blob_store(dir.path()).unwrap();
    let mut driver = Driver::new(algorithm, base, blobs.clone(), 11, None).unwrap();
    let policy = RoundPolicy {
        rounds,
        clients_per_round: 4,
        deadline_s: None,
        seed: 11,
        eval_every: 1,
        concurrency: 2,
        secure: None,
    };
    let evaluator = Evaluator {
        heldout: population.heldout.clone(),
        pad_id: 0,
        rouge: None,
    };
    let mut records = Vec::new();
    let initial = run_in_process(
        "test",
        "test",
        base,
        &mut driver,
        &blobs,
        &population,
        &profiles,
        &policy,
        &evaluator,
        |r| records.push(r.clone()),
    )
    .unwrap();
    (initial.loss, records)
}

fn lora(strategy: AggregationStrategy, ranks: Vec<usize>) -> AlgorithmConfig {
    AlgorithmConfig::Lora {
        lora: LoraConfig::default(),
        ranks,
        train: TrainConfig {
            lr: 1e-2,
            warmup_steps: 0,
            ..TrainConfig::default()
        },
        local_steps: 4,
        strategy,
    }
}

fn fedspine() -> AlgorithmConfig {
    AlgorithmConfig::FedSpine {
        lora: LoraConfig {
            targets: TargetModule::ALL.to_vec(),
            ..LoraConfig::default()
        },
        ranks: vec![2, 4],
        ratios: vec![0.0, 0.2],
        // A pruning step every other optimiser step: a round of 4 steps prunes twice. The tiny
        // model has two layers: none is protected, or nothing would be left to prune.
        schedule: PruneSchedule {
            every: 2,
            protect_first: 0,
            protect_last: false,
            ..PruneSchedule::default()
        },
        train: TrainConfig {
            lr: 1e-2,
            warmup_steps: 0,
            ..TrainConfig::default()
        },
        local_steps: 4,
    }
}

#[test]
fn every_algorithm_improves_heldout_loss() {
    // Dropped devices and rejected reports are logged at `warn`: shown when a check fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let base = load_model(&tiny_model_folder(dir.path(), 3));
    let fleet = FleetSpec::Mix {
        mix: "three-speeds".into(),
    };
    // Zeroth-order steps are cheap and noisy: more of them per round than the network tests.
    let zo = ZoRunConfig {
        k: 256,
        tau: 40,
        lr: 1e-3,
        eps: 1e-3,
        ..fedkseed_run()
    };
    let pro = ZoRunConfig {
        pro: true,
        ..zo.clone()
    };
    let algorithms = [
        (
            "fedkseed",
            AlgorithmConfig::Fedkseed {
                run: zo,
                batch_size: 1,
            },
        ),
        (
            "fedkseed-pro",
            AlgorithmConfig::Fedkseed {
                run: pro,
                batch_size: 1,
            },
        ),
        ("fedavg", lora(AggregationStrategy::FedAvg, vec![4])),
        ("hetlora", lora(AggregationStrategy::HetLora, vec![2, 4, 8])),
        (
            "flexlora",
            lora(AggregationStrategy::FlexLora, vec![2, 4, 8]),
        ),
        ("fedspine", fedspine()),
    ];
    for (name, algorithm) in &algorithms {
        let (initial, records) = run(&base, algorithm, &fleet, 5);
        let last = records.last().unwrap();
        let final_loss = last.heldout_loss.unwrap();
        eprintln!("{name}: held-out loss {initial:.4} -> {final_loss:.4}");
        assert_eq!(records.len(), 5);
        assert!(final_loss < initial, "{name}: {initial} -> {final_loss}");
        for r in &records {
            assert!(
                r.clients == 4 && r.bytes_up > 0 && r.bytes_down > 0,
                "{name}: {r:?}"
            );
        }
        assert!(last.sim_time_s > 0.0 && last.total_bytes > 0);
    }
}
