//! SecAgg+ end to end: ten clients summing through the in-process driver with 0, 1 and 3
//! drop-outs after masking, a sparse neighbour graph, a statistical check that one client's
//! masked input looks like uniform noise, and a FedKSeed run whose history is the same with
//! and without secure aggregation (within the quantization error).

use std::collections::BTreeSet;

use fedtune_shared::privacy::secagg::{
    ClientId, SecAggClient, SecAggConfig, SecAggError, SecAggServer,
};
use fedtune_shared::privacy::secure_sum::{Dropouts, run_secure_sum};
use fedtune_shared::progress::Silent;
use fedtune_shared::robust::flat::dense_seed_grads;
use fedtune_shared::zo::round::{ClientReport, ZoRunConfig, ZoServer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CLIENTS: usize = 10;
const LEN: usize = 1000;
const CLIP: f32 = 1.0;

fn inputs(seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..CLIENTS)
        .map(|_| (0..LEN).map(|_| rng.random_range(-0.9f32..0.9)).collect())
        .collect()
}

fn plain_sum(inputs: &[Vec<f32>], included: impl Fn(usize) -> bool) -> Vec<f64> {
    let mut sum = vec![0.0f64; LEN];
    for (_, x) in inputs.iter().enumerate().filter(|(i, _)| included(*i)) {
        sum.iter_mut().zip(x).for_each(|(s, &v)| *s += f64::from(v));
    }
    sum
}

fn config(degree: usize) -> SecAggConfig {
    SecAggConfig::new(7, CLIENTS, LEN, CLIP, degree, 0.3).expect("config")
}

#[test]
fn sum_equals_the_plain_sum_with_0_1_and_3_dropouts() {
    let x = inputs(1);
    let config = config(CLIENTS - 1);
    let tolerance = CLIENTS as f64 * config.quantizer.max_error() + 1e-5;
    for before_input in [vec![], vec![4], vec![0, 5, 9]] {
        let dropped: BTreeSet<ClientId> = before_input.iter().copied().collect();
        let dropouts = Dropouts {
            before_input: dropped.clone(),
            before_unmask: BTreeSet::new(),
        };
        let run = run_secure_sum(&config, &x, &dropouts, 11).expect("secure sum");
        assert_eq!(run.result.clients.len(), CLIENTS - dropped.len());
        let expected = plain_sum(&x, |i| !dropped.contains(&(i as ClientId)));
        for (got, want) in run.result.sum.iter().zip(&expected) {
            assert!(
                (f64::from(*got) - want).abs() <= tolerance,
                "{} dropped: {got} vs {want}",
                dropped.len()
            );
        }
    }
    // Clients that drop after sending their masked input: their updates count, and the others'
    // shares are enough to unmask.
    let dropouts = Dropouts {
        before_input: [2].into(),
        before_unmask: [3, 8].into(),
    };
    let run = run_secure_sum(&config, &x, &dropouts, 12).expect("secure sum");
    let expected = plain_sum(&x, |i| i != 2);
    assert_eq!(run.result.clients.len(), CLIENTS - 1);
    for (got, want) in run.result.sum.iter().zip(&expected) {
        assert!((f64::from(*got) - want).abs() <= tolerance);
    }
}

#[test]
fn too_many_dropouts_are_an_error_not_a_wrong_sum() {
    let x = inputs(2);
    let dropouts = Dropouts {
        before_input: [0, 1, 2, 3].into(),
        before_unmask: BTreeSet::new(),
    };
    let err = run_secure_sum(&config(CLIENTS - 1), &x, &dropouts, 13).expect_err("4 of 10");
    assert!(matches!(err, SecAggError::TooFewClients { .. }), "{err}");
}

#[test]
fn every_unmasked_sum_holds_at_least_min_survivors_inputs() {
    // What distributed DP's noise is calibrated to: whichever clients drop out before masking,
    // a sum the server can unmask has at least `min_survivors` inputs in it (7 of 10 in the
    // full graph at δ = 0.3, where the bound is reached; 4 in the degree-4 graph).
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let x: Vec<Vec<f32>> = (0..CLIENTS).map(|c| vec![c as f32 / 10.0; 8]).collect();
    for (degree, least) in [(CLIENTS - 1, 7), (4, 4)] {
        let config = SecAggConfig::new(9, CLIENTS, 8, CLIP, degree, 0.3).expect("config");
        assert_eq!(config.min_survivors(CLIENTS), least);
        let mut fewest = CLIENTS;
        for trial in 0..60u64 {
            let drops = rng.random_range(0..=5usize);
            let before_input: BTreeSet<ClientId> = (0..drops)
                .map(|_| rng.random_range(0..CLIENTS as ClientId))
                .collect();
            let dropouts = Dropouts {
                before_input,
                before_unmask: BTreeSet::new(),
            };
            if let Ok(run) = run_secure_sum(&config, &x, &dropouts, trial) {
                fewest = fewest.min(run.result.clients.len());
            }
        }
        assert!(fewest >= least, "degree {degree}: a sum of {fewest}");
        if degree == CLIENTS - 1 {
            assert_eq!(fewest, least, "the full graph's bound is reached");
        }
    }
    // Fewer clients advertising lowers the bound; never below 3 clients' threshold.
    assert_eq!(config(CLIENTS - 1).min_survivors(5), 4);
    assert_eq!(config(CLIENTS - 1).min_survivors(1), 3);
}

#[test]
fn sparse_neighbour_graph_sums_correctly() {
    let x = inputs(3);
    // Degree 4: each client shares masks and secrets with 4 others only.
    let config = config(4);
    let dropouts = Dropouts {
        before_input: [6].into(),
        before_unmask: BTreeSet::new(),
    };
    let run = run_secure_sum(&config, &x, &dropouts, 14).expect("secure sum");
    let expected = plain_sum(&x, |i| i != 6);
    let tolerance = CLIENTS as f64 * config.quantizer.max_error() + 1e-5;
    for (got, want) in run.result.sum.iter().zip(&expected) {
        assert!((f64::from(*got) - want).abs() <= tolerance);
    }
    let mut server = SecAggServer::new(config);
    for id in 0..CLIENTS as ClientId {
        let (_, advert) = SecAggClient::new(config, id, [id as u8; 32]);
        server.handle_advertisement(advert).expect("advert");
    }
    server.close_advertisements().expect("graph");
    for id in 0..CLIENTS as ClientId {
        assert_eq!(server.neighbours(id).len(), 4);
    }
}

/// Pearson's χ² statistic of `values`' top 8 bits against the uniform distribution.
fn chi_square_top_byte(values: &[u32]) -> f64 {
    let mut counts = [0usize; 256];
    for v in values {
        counts[(v >> 24) as usize] += 1;
    }
    let expected = values.len() as f64 / 256.0;
    counts
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum()
}

#[test]
fn a_single_masked_input_is_indistinguishable_from_uniform_noise() {
    // One client's update is a constant vector, the most structured input there is. What the
    // server receives from it must pass a χ² test of uniformity on the top byte of each value
    // (255 degrees of freedom: the 99.9% quantile is 330.5), and so must its lowest byte;
    // the unmasked quantized input fails the same test by far.
    const N: usize = 1 << 16;
    let config = SecAggConfig::new(3, 4, N, CLIP, 3, 0.3).expect("config");
    let mut server = SecAggServer::new(config);
    let mut clients = Vec::new();
    for id in 0..4 {
        let (client, advert) = SecAggClient::new(config, id, [id as u8 + 1; 32]);
        server.handle_advertisement(advert).expect("advert");
        clients.push(client);
    }
    for (id, msg) in server.close_advertisements().expect("graph") {
        let bundle = clients[id as usize]
            .handle_neighbour_keys(msg)
            .expect("share");
        server.handle_share_bundle(bundle).expect("bundle");
    }
    let forwarded = server.close_share_bundles().expect("forward");
    let (id, msg) = forwarded.into_iter().next().expect("client 0");
    let input = vec![0.25f32; N];
    let masked = clients[id as usize]
        .handle_forwarded_shares(msg, &input)
        .expect("mask")
        .masked;
    let values: Vec<u32> = masked
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .collect();
    let top = chi_square_top_byte(&values);
    let low_bytes: Vec<u32> = values.iter().map(|v| v << 24).collect();
    let low = chi_square_top_byte(&low_bytes);
    assert!(top < 330.5 && low < 330.5, "χ² {top}, {low}");
    let plain = config.quantizer.quantize(&input);
    assert!(chi_square_top_byte(&plain) > 10_000.0);
    // Every bit is set about half the time (binomial std of N/4 is 128; 6 std allowed).
    for bit in 0..32 {
        let ones = values.iter().filter(|v| (*v >> bit) & 1 == 1).count() as f64;
        assert!(
            (ones - N as f64 / 2.0).abs() < 6.0 * 128.0,
            "bit {bit}: {ones}"
        );
    }
}

#[test]
fn the_server_cannot_ask_for_both_secrets_of_one_client() {
    let config = config(CLIENTS - 1);
    let mut server = SecAggServer::new(config);
    let mut clients = Vec::new();
    for id in 0..CLIENTS as ClientId {
        let (c, advert) = SecAggClient::new(config, id, [id as u8 + 40; 32]);
        server.handle_advertisement(advert).expect("advert");
        clients.push(c);
    }
    for (id, msg) in server.close_advertisements().expect("graph") {
        let bundle = clients[id as usize]
            .handle_neighbour_keys(msg)
            .expect("share");
        server.handle_share_bundle(bundle).expect("bundle");
    }
    for (id, msg) in server.close_share_bundles().expect("forward") {
        let input = vec![0.0f32; LEN];
        let masked = clients[id as usize]
            .handle_forwarded_shares(msg, &input)
            .expect("mask");
        server.handle_masked_input(masked).expect("masked");
    }
    let greedy = fedtune_shared::privacy::secagg::UnmaskRequest {
        survivors: (0..CLIENTS as ClientId).collect(),
        dropped: vec![5],
    };
    assert!(clients[0].handle_unmask_request(greedy).is_err());
}

#[test]
fn fedkseed_with_secure_aggregation_reaches_the_same_history() {
    // Three FedKSeed rounds of ten clients' reports (K = 4096, 200 seeds each, equal samples),
    // aggregated by the plain server and by secure sums of the dense K-vectors: the histories
    // agree within the quantization error of each round's mean.
    let run = ZoRunConfig {
        k: 4096,
        ..ZoRunConfig::default()
    };
    let mut plain = ZoServer::new(run.clone());
    let mut secure = ZoServer::new(run.clone());
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let clip = 4.0;
    let mut bound = 0.0;
    for round in 1..=3u64 {
        let reports: Vec<ClientReport> = (0..CLIENTS)
            .map(|_| {
                let mut seeds: Vec<u32> = (0..200).map(|_| rng.random_range(0..run.k)).collect();
                seeds.sort_unstable();
                seeds.dedup();
                ClientReport {
                    round,
                    seed_grads: seeds
                        .iter()
                        .map(|&s| (s, rng.random_range(-2.0..2.0)))
                        .collect(),
                    step_grads: Vec::new(),
                    samples: 200,
                }
            })
            .collect();
        let (_, rejected) = plain.aggregate(&reports);
        assert!(rejected.is_empty());
        let dense: Vec<Vec<f32>> = reports.iter().map(|r| dense_seed_grads(r, run.k)).collect();
        let config = SecAggConfig::new(round, CLIENTS, run.k as usize, clip, 6, 0.3).expect("cfg");
        let sum = run_secure_sum(&config, &dense, &Dropouts::default(), round)
            .expect("secure sum")
            .result
            .sum;
        let mean: Vec<f32> = sum.iter().map(|s| s / CLIENTS as f32).collect();
        secure.apply_mean(&reports, &mean);
        bound += config.quantizer.max_error() + 1e-6;
    }
    for (a, b) in plain.history().iter().zip(secure.history()) {
        assert!((f64::from(*a) - f64::from(*b)).abs() <= bound, "{a} vs {b}");
    }
}

#[test]
fn lora_run_with_secure_aggregation_reaches_the_same_adapter() {
    // Three rounds of ten clients training LoRA (rank 4, q_proj and v_proj) on a tiny random
    // model, averaged by the plain mean and by secure sums with one drop-out before input per
    // round: the final global adapters agree far below the training's own step sizes.
    use burn::tensor::Device;
    use fedtune_shared::checkpoint::MemorySource;
    use fedtune_shared::lora::attach::{adapter_weights, attach_fresh, attach_weights};
    use fedtune_shared::lora::train::{LoraTrainer, TrainConfig, TrainExample};
    use fedtune_shared::lora::{LoraConfig, LoraScaling, TargetModule};
    use fedtune_shared::model::{Llama, LlamaConfig};
    use fedtune_shared::robust::flat::{adapter_delta, apply_adapter_delta};

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
    let data: Vec<Vec<TrainExample>> = (0..CLIENTS as u32)
        .map(|c| {
            (0..6)
                .map(|s| TrainExample::text((0..10).map(|i| (c + s * 5 + i * 3) % 32).collect()))
                .collect()
        })
        .collect();
    let fresh =
        adapter_weights(&attach_fresh(base.clone(), &lora, 9), lora.scaling).expect("fresh");
    let run = |secure: bool| {
        let mut global = fresh.clone();
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for round in 0..3u64 {
            let dropped = round as usize % CLIENTS;
            let mut deltas = Vec::new();
            for client_data in &data {
                let model = attach_weights(base.clone(), &global, 0.0).expect("attach");
                let mut trainer = LoraTrainer::new(train.clone(), 0);
                let (trained, _) =
                    trainer.train_round(model, client_data, 2, &mut rng, &mut Silent);
                let local = adapter_weights(&trained, lora.scaling).expect("adapter");
                deltas.push(adapter_delta(&global, &local).expect("shapes"));
            }
            let len = deltas[0].len();
            let mean: Vec<f32> = if secure {
                let config = SecAggConfig::new(round, CLIENTS, len, 0.5, 6, 0.3).expect("cfg");
                let dropouts = Dropouts {
                    before_input: [dropped as ClientId].into(),
                    before_unmask: BTreeSet::new(),
                };
                let sum = run_secure_sum(&config, &deltas, &dropouts, round).expect("sum");
                sum.result
                    .sum
                    .iter()
                    .map(|s| s / (CLIENTS - 1) as f32)
                    .collect()
            } else {
                let kept: Vec<&Vec<f32>> = deltas
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != dropped)
                    .map(|(_, d)| d)
                    .collect();
                (0..len)
                    .map(|j| kept.iter().map(|d| d[j]).sum::<f32>() / kept.len() as f32)
                    .collect()
            };
            assert!(
                deltas.iter().flatten().all(|d| d.abs() < 0.5),
                "inside the clip range"
            );
            global = apply_adapter_delta(&global, &mean).expect("apply");
        }
        global
    };
    let (plain, secure) = (run(false), run(true));
    let mut largest = 0.0f32;
    for (p, s) in plain.layers.values().zip(secure.layers.values()) {
        for (a, b) in p.a.iter().chain(&p.b).zip(s.a.iter().chain(&s.b)) {
            largest = largest.max((a - b).abs());
        }
    }
    let moved = plain
        .layers
        .values()
        .zip(fresh.layers.values())
        .flat_map(|(p, f)| p.b.iter().zip(&f.b).map(|(a, b)| (a - b).abs()))
        .fold(0.0f32, f32::max);
    assert!(
        largest < 1e-4 && moved > 1e-3,
        "differ by {largest}, training moved {moved}"
    );
}
