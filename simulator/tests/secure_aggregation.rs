//! `[privacy] secure_aggregation = true` in the harness: the in-process transport (SecAgg+'s
//! state machines, fleet drop-outs becoming SecAgg drop-outs) and the QUIC transport (the real
//! daemon and device SDKs) end with the global model of the plain run, within the quantization
//! error, and record what secure aggregation cost. FedKSeed and FedKSeed-Pro follow the plain
//! run for three rounds (Pro's importance from the securely summed statistics samples the
//! same seeds). With `[privacy.dp] mode = "distributed"` both transports run, record ε growing
//! round by round (the `epsilon` column of `metrics.csv`), and an in-process run repeats
//! exactly (its noise is seeded).

mod common;

use common::{block_population, single_rank_lora};
use fedtune_server::algorithm::combine::UpdateCombiner;
use fedtune_server::config::{AlgorithmConfig, PrivacySettings, SecAggSettings};
use fedtune_shared::privacy::clipping::ClipNorm;
use fedtune_shared::privacy::dp::DpConfig;
use fedtune_shared::privacy::gaussian::NoiseMode;
use fedtune_shared::privacy::quantize::Quantizer;
use fedtune_shared::protocol::adapter_blob::decode_adapter;
use fedtune_shared::protocol::frame::decode_body;
use fedtune_shared::robust::RobustRule;
use fedtune_shared::zo::round::{ZoRunConfig, ZoServer};
use fedtune_shared::zo::seed_pool::SeedSampling;
use fedtune_simulator::engine::{Driver, RoundPolicy, blob_store, run_in_process};
use fedtune_simulator::evaluation::Evaluator;
use fedtune_simulator::fleet::{DeviceProfile, FleetSpec, assign};
use fedtune_simulator::population::Population;
use fedtune_simulator::quic::{QuicRun, run_quic};
use fedtune_simulator::record::RoundRecord;
use fedtune_tests::network::{fedkseed_run, load_model, tiny_model_folder};

/// Rounds of LoRA and FedKSeed.
const ROUNDS: u64 = 3;
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
    block_population(&assign(profiles, clients), 40..44, SEED)
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
    in_process_dp(dir, rounds, algorithm, population, fleet, secure, None)
}

/// [`in_process`] with DP (`dp`: the daemon's `[privacy.dp]`).
fn in_process_dp(
    dir: &std::path::Path,
    rounds: u64,
    algorithm: &AlgorithmConfig,
    population: &Population,
    fleet: &[DeviceProfile],
    secure: bool,
    dp: Option<DpConfig>,
) -> (Vec<u8>, Vec<RoundRecord>) {
    let model = tiny_model_folder(dir, 9);
    let base = load_model(&model);
    let store = format!("{}-{rounds}", if secure { "secure" } else { "plain" });
    let blobs = blob_store(&dir.join(store)).unwrap();
    let combiner = UpdateCombiner::new(RobustRule::Mean, dp).unwrap();
    let mut driver =
        Driver::with_combiner(algorithm, &base, blobs.clone(), SEED, None, combiner).unwrap();
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

/// What FedKSeed's rounds after the first may add to [`bound`]: its gradients are loss
/// differences over 2ε, so after a round whose history is off by the quantization error (a
/// value that truncates to another 21-bit replay coefficient), the next round's losses can
/// differ by an ulp or so, and its gradients by ulp(loss) / 2ε: far above the quantizer's
/// bound though far below the gradients themselves. Up to τ steps of 4 ulps of a loss below 8,
/// over 2ε, per round after the first (measured: up to 1.6e-5 after three rounds; 1.1e-3 allowed).
fn compounding(rounds: u64) -> f64 {
    let run = fedkseed_run();
    let ulp = f64::from(8.0f32.next_up() - 8.0);
    rounds.saturating_sub(1) as f64 * f64::from(run.tau) * 4.0 * ulp / (2.0 * f64::from(run.eps))
}

/// The algorithms under test, with their rounds and the bound on their models' difference
/// from the plain run's.
fn algorithms(clients: usize) -> [(&'static str, AlgorithmConfig, u64, f64); 2] {
    [
        (
            "fedkseed",
            fedkseed(),
            ROUNDS,
            bound(clients, ROUNDS) + compounding(ROUNDS),
        ),
        ("lora", single_rank_lora(), ROUNDS, bound(clients, ROUNDS)),
    ]
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
    for (name, algorithm, rounds, bound) in algorithms(6) {
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
        assert!(
            gap <= bound,
            "{name}: models differ by {gap}, bound {bound}"
        );
        assert!(size > 1e-3 && size < f64::from(CLIP), "{name}: {size}");
    }
}

#[test]
fn quic_secure_runs_reach_the_plain_model() {
    let fleet = uniform();
    let clients = 3;
    let population = population(clients, &fleet);
    for (name, algorithm, rounds, bound) in algorithms(clients) {
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
            gap <= bound,
            "{name}: models differ by {gap}, bound {bound}"
        );
        assert!(size > 1e-3 && size < f64::from(CLIP), "{name}: {size}");
    }
}

fn fedkseed_pro() -> AlgorithmConfig {
    AlgorithmConfig::Fedkseed {
        run: ZoRunConfig {
            pro: true,
            ..fedkseed_run()
        },
        batch_size: 1,
    }
}

/// The seed-sampling probabilities of the next round's plans (FedKSeed-Pro's importance).
fn probabilities(checkpoint: &[u8]) -> Vec<f32> {
    let server: ZoServer = decode_body(checkpoint).unwrap();
    match server.plan(0).sampling {
        SeedSampling::Probabilities(p) => p,
        SeedSampling::Uniform => Vec::new(),
    }
}

#[test]
fn fedkseed_pro_secure_run_samples_as_the_plain_run_for_three_rounds() {
    // Pro's importance needs every per-step |g|: under secure aggregation the devices mask
    // their summed |g| and counts per seed after their update, and the server feeds the
    // importance from those sums. The next round's sampling probabilities must be the plain
    // run's (if the importance saw anything else, different seeds would be drawn and the
    // histories part by the size of the gradients).
    let fleet = uniform();
    let population = population(6, &fleet);
    let dir = tempfile::tempdir().unwrap();
    let algorithm = fedkseed_pro();
    for rounds in 1..=ROUNDS {
        let (plain, _) = in_process(dir.path(), rounds, &algorithm, &population, &fleet, false);
        let (secure, records) =
            in_process(dir.path(), rounds, &algorithm, &population, &fleet, true);
        check_costs(&records, rounds);
        // The statistics triple what a device masks: K values of update, 2K of statistics.
        let k = fedkseed_run().k as f64;
        let up = records[0].secagg_up_bytes_per_client.unwrap_or(0.0);
        assert!(up > 3.0 * 4.0 * k, "{up} bytes up");
        let (gap, size) = history_gap(&plain, &secure);
        let (p, q) = (probabilities(&plain), probabilities(&secure));
        assert_eq!((p.len(), q.len()), (64, 64), "Pro samples by importance");
        let p_gap = p
            .iter()
            .zip(&q)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let spread =
            p.iter().fold(0.0f32, |m, v| m.max(*v)) - p.iter().fold(1.0f32, |m, v| m.min(*v));
        eprintln!(
            "fedkseed-pro round {rounds}: history gap {gap:e} (size {size:e}), probability gap \
             {p_gap:e} (spread {spread:e})"
        );
        let allowed = bound(6, rounds) + compounding(rounds);
        assert!(
            gap <= allowed,
            "round {rounds}: histories differ by {gap}, bound {allowed}"
        );
        assert!(
            p_gap <= 1e-5,
            "round {rounds}: probabilities differ by {p_gap}"
        );
        assert!(spread > 1e-4, "round {rounds}: the importance is flat");
        assert!(size > 1e-3, "round {rounds}: the run moved nothing");
    }
}

/// Distributed DP at z = 1, C = 1 for `population` devices (ε for δ = 1e-5).
fn distributed_dp() -> DpConfig {
    DpConfig {
        clip: ClipNorm::fixed(1.0),
        noise_multiplier: 1.0,
        mode: NoiseMode::Distributed,
        delta: 1e-5,
        selection: fedtune_shared::privacy::dp::Selection::FirstCome,
        population: 100,
    }
}

/// ε of every round, checked present and growing.
fn growing_epsilon(records: &[RoundRecord]) -> Vec<f64> {
    let epsilon: Vec<f64> = records
        .iter()
        .map(|r| r.epsilon.expect("epsilon recorded"))
        .collect();
    assert!(epsilon[0] > 0.0, "{epsilon:?}");
    assert!(epsilon.windows(2).all(|w| w[1] > w[0]), "{epsilon:?}");
    for r in records {
        assert!(r.dp_server_s.is_some_and(|s| s >= 0.0), "{r:?}");
    }
    epsilon
}

#[test]
fn distributed_dp_runs_in_both_transports_with_growing_epsilon() {
    let fleet = uniform();
    let dp = distributed_dp();
    let privacy = PrivacySettings {
        secure_aggregation: true,
        secagg: secagg(),
        dp: Some(dp),
    };
    // In process: six devices, every round; the noise is seeded, so a second run is the same.
    let population6 = population(6, &fleet);
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        in_process_dp(
            &dir.path().join(name),
            ROUNDS,
            &fedkseed(),
            &population6,
            &fleet,
            true,
            Some(dp),
        )
    };
    let (first, records) = run("first");
    let (again, _) = run("again");
    assert_eq!(first, again, "a seeded in-process run repeats");
    check_costs(&records, ROUNDS);
    let epsilon = growing_epsilon(&records);
    // The accountant's ε for 6 of 100 devices per round, as the daemon records it.
    let mut reference = fedtune_shared::privacy::dp::DpMechanism::new(dp).unwrap();
    for e in &epsilon {
        let expected = reference.record_round(6, 1.0).epsilon;
        assert!((e - expected).abs() < 1e-9, "{e} vs {expected}");
    }
    // The `epsilon` column of metrics.csv, as the run folder has it.
    let folder = dir.path().join("run");
    let mut writer = fedtune_simulator::report::RunWriter::create(&folder).unwrap();
    for r in &records {
        writer.record(r).unwrap();
    }
    drop(writer);
    let csv = std::fs::read_to_string(folder.join("metrics.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let column = header
        .iter()
        .position(|h| *h == "epsilon")
        .expect("epsilon column");
    let written: Vec<f64> = lines
        .map(|l| {
            l.split(',')
                .nth(column)
                .unwrap()
                .parse()
                .expect("an epsilon")
        })
        .collect();
    assert_eq!(written, epsilon);
    // The noise moved the model off the plain run's by far more than quantization: σ on the
    // mean is z · C · √(6 / 4) / 6 ≈ 0.2 per seed and round.
    let (plain, _) = in_process(dir.path(), ROUNDS, &fedkseed(), &population6, &fleet, false);
    let (gap, _) = history_gap(&plain, &first);
    assert!(gap > 0.1, "the DP run is {gap} from the plain run");
    let description =
        fedtune_simulator::run::privacy_description(&privacy, 6).expect("a description");
    assert!(
        description.contains("distributed DP") && description.contains("at least 4 devices"),
        "{description}"
    );
    eprintln!("distributed DP in process: ε {epsilon:?}; {description}");

    // Over QUIC: three SDK devices (at least 2 in a sum at δ = 0.4), OS randomness.
    let clients = 3;
    let population3 = population(clients, &fleet);
    let model = tiny_model_folder(dir.path(), 9);
    let base = load_model(&model);
    let quic = run_quic(
        &QuicRun {
            label: "t".into(),
            algorithm_name: "t".into(),
            model,
            algorithm: fedkseed(),
            robust: Default::default(),
            privacy,
            rounds: ROUNDS,
            seed: SEED,
            work_dir: dir.path().join("quic"),
            timeout: std::time::Duration::from_secs(120),
        },
        &base,
        &population3,
    )
    .unwrap();
    check_costs(&quic.records, ROUNDS);
    let epsilon = growing_epsilon(&quic.records);
    eprintln!("distributed DP over QUIC: ε {epsilon:?}");
}
