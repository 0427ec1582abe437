//! Robust aggregation through the harness: ten virtual devices on a tiny model, two of them
//! (20%, drawn by the fleet's seeded `attackers` setting) reporting their LoRA update scaled by
//! −10, every device in every round. The daemon's own LoRA driver with its `[robust]` combiner
//! aggregates: under the plain mean the held-out loss goes up, under the coordinate-wise
//! median, the trimmed mean and Krum it keeps going down.

mod common;

use common::counting_population;
use fedtune_server::algorithm::combine::UpdateCombiner;
use fedtune_server::config::AlgorithmConfig;
use fedtune_shared::lora::aggregation::AggregationStrategy;
use fedtune_shared::lora::config::LoraConfig;
use fedtune_shared::lora::train::TrainConfig;
use fedtune_shared::model::Llama;
use fedtune_shared::robust::RobustRule;
use fedtune_simulator::attack::{AttackerSpec, Behaviour, behaviours};
use fedtune_simulator::engine::{Driver, RoundPolicy, blob_store, run_in_process};
use fedtune_simulator::evaluation::Evaluator;
use fedtune_simulator::fleet::{FleetConfig, FleetSpec, assign};
use fedtune_simulator::population::Population;
use fedtune_simulator::record::RoundRecord;
use fedtune_tests::network::{load_model, tiny_model_folder};

const CLIENTS: usize = 10;
const ATTACKERS: usize = 2;
const ROUNDS: u64 = 4;
const SEED: u64 = 5;

/// The fleet of the test as a configuration would give it.
fn fleet() -> FleetConfig {
    FleetConfig {
        devices: FleetSpec::Mix {
            mix: "uniform".into(),
        },
        attackers: Some(AttackerSpec {
            fraction: 0.2,
            behaviour: Behaviour::Scaled { factor: -10.0 },
        }),
    }
}

/// Ten devices, each counting from its own starting points: one pattern, different text.
fn population(fleet: &FleetConfig) -> Population {
    let profiles = fleet.profiles().unwrap();
    let assignment = assign(&profiles, CLIENTS);
    let mut population = counting_population(&assignment, SEED);
    population.set_behaviours(&behaviours(
        &profiles,
        &assignment,
        fleet.attackers.as_ref(),
        SEED,
    ));
    population
}

/// LoRA at one rank (robust rules compare updates coordinate by coordinate), with the default
/// dropout: its masks follow from the plan's seed, so the determinism check covers them too.
fn lora() -> AlgorithmConfig {
    AlgorithmConfig::Lora {
        lora: LoraConfig::default(),
        ranks: vec![4],
        train: TrainConfig {
            lr: 1e-2,
            warmup_steps: 0,
            ..TrainConfig::default()
        },
        local_steps: 4,
        strategy: AggregationStrategy::FedAvg,
    }
}

/// The held-out loss before the first round and each round's record.
fn run(base: &Llama, population: &Population, rule: RobustRule) -> (f32, Vec<RoundRecord>) {
    let dir = tempfile::tempdir().unwrap();
    let profiles = fleet().profiles().unwrap();
    let blobs = blob_store(dir.path()).unwrap();
    let combiner = UpdateCombiner::new(rule, None).unwrap();
    let mut driver =
        Driver::with_combiner(&lora(), base, blobs.clone(), SEED, None, combiner).unwrap();
    let policy = RoundPolicy {
        rounds: ROUNDS,
        clients_per_round: CLIENTS,
        deadline_s: None,
        seed: SEED,
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
        rule.name(),
        "lora-fedavg",
        base,
        &mut driver,
        &blobs,
        population,
        &profiles,
        &policy,
        &evaluator,
        |r| records.push(r.clone()),
    )
    .unwrap();
    (initial.loss, records)
}

fn losses(initial: f32, records: &[RoundRecord]) -> Vec<f32> {
    std::iter::once(initial)
        .chain(records.iter().map(|r| r.heldout_loss.unwrap()))
        .collect()
}

#[test]
fn robust_rules_keep_improving_under_attack_and_the_mean_does_not() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let base = load_model(&tiny_model_folder(dir.path(), 3));
    let population = population(&fleet());
    assert_eq!(population.attackers(), ATTACKERS);

    let (initial, records) = run(&base, &population, RobustRule::Mean);
    let mean = losses(initial, &records);
    eprintln!("mean: held-out loss {mean:?}");
    for r in &records {
        assert_eq!((r.clients, r.attackers), (CLIENTS, ATTACKERS), "{r:?}");
    }
    // Seeded: the same attackers, seeds and selection give the same run.
    let (again, repeated) = run(&base, &population, RobustRule::Mean);
    assert_eq!(losses(again, &repeated), mean);
    let mean_final = mean[ROUNDS as usize];
    assert!(
        mean_final >= mean[0],
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
        let (initial, records) = run(&base, &population, rule);
        let robust = losses(initial, &records);
        eprintln!("{}: held-out loss {robust:?}", rule.name());
        assert!(records.iter().all(|r| r.attackers == ATTACKERS));
        let last = robust[ROUNDS as usize];
        assert!(
            last < robust[0] && last < mean_final - 0.05,
            "{} should keep improving under attack: {robust:?} (mean: {mean:?})",
            rule.name()
        );
    }
}
