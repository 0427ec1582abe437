//! `fedtune bench privacy`: what secure aggregation, differential privacy and the robust rules
//! cost one round of N clients (default 100), for LoRA rank 8 on q_proj and v_proj of
//! SmolLM2-135M's shapes (30 layers, hidden 576, kv dim 192; no model is loaded) and for FedKSeed
//! with K = 4096 (τ = 200 seeds a report). Updates are random numbers of realistic size.
//!
//! Bytes are what the wire format (bincode) encodes: a client's upload (plain: the adapter blob
//! or the sparse report; SecAgg+: its four protocol messages, masked input included) and what
//! SecAgg+ adds to its download (neighbour keys, forwarded shares, unmask request; the global
//! model's download is unchanged). Server time is the aggregation of the round (plain: the
//! algorithm's own mean; SecAgg+: the server machine's work, unmasking included; with
//! distributed DP also the accountant's, and the clients' clipping and noise in client time).

use std::time::Instant;

use anyhow::Result;
use fedtune_shared::lora::adapter::{
    AdaptedLayer, AdapterWeights, LoraFactors, LoraScaling, TargetModule,
};
use fedtune_shared::lora::aggregation::{AggregationStrategy, ClientAdapter, aggregate};
use fedtune_shared::privacy::clipping::ClipNorm;
use fedtune_shared::privacy::dp::{DpConfig, DpMechanism};
use fedtune_shared::privacy::gaussian::NoiseMode;
use fedtune_shared::privacy::secagg::{ClientId, SecAggConfig};
use fedtune_shared::privacy::secure_sum::{Dropouts, run_secure_sum};
use fedtune_shared::protocol::adapter_blob::encode_adapter;
use fedtune_shared::robust::RobustRule;
use fedtune_shared::robust::flat::{adapter_delta, dense_seed_grads};
use fedtune_shared::zo::round::{ClientReport, ZoRunConfig, ZoServer, wire_size};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// SmolLM2-135M: decoder layers, hidden size, key/value width.
const LAYERS: usize = 30;
const HIDDEN: usize = 576;
const KV_DIM: usize = 192;
/// The LoRA rank measured.
const RANK: usize = 8;
/// FedKSeed's candidate seeds and seeds per report (τ).
const K: u32 = 4096;
const TAU: u32 = 200;

/// One row of the table.
struct Row {
    workload: &'static str,
    aggregation: String,
    upload: f64,
    extra_download: f64,
    server_s: f64,
    client_s: Option<f64>,
}

fn adapter(rng: &mut ChaCha8Rng) -> AdapterWeights {
    let mut layers = std::collections::BTreeMap::new();
    for layer in 0..LAYERS {
        for (target, d_out) in [(TargetModule::QProj, HIDDEN), (TargetModule::VProj, KV_DIM)] {
            let mut values = |n: usize| (0..n).map(|_| rng.random_range(-0.05f32..0.05)).collect();
            layers.insert(
                AdaptedLayer { layer, target },
                LoraFactors {
                    rank: RANK,
                    d_in: HIDDEN,
                    d_out,
                    a: values(RANK * HIDDEN),
                    b: values(d_out * RANK),
                },
            );
        }
    }
    AdapterWeights {
        rank: RANK,
        scaling: LoraScaling {
            alpha: 16.0,
            rslora: false,
        },
        layers,
    }
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed().as_secs_f64())
}

/// Rows for the rules that need no protocol: same bytes as plain, extra server time only.
fn rule_rows(
    workload: &'static str,
    vectors: &[Vec<f32>],
    upload: f64,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let refs: Vec<&[f32]> = vectors.iter().map(Vec::as_slice).collect();
    let weights = vec![1.0; refs.len()];
    let f = refs.len() / 5;
    for rule in [
        RobustRule::Median,
        RobustRule::TrimmedMean { trim: 0.2 },
        RobustRule::NormBound { max_norm: 1.0 },
        RobustRule::Krum {
            byzantine: f,
            multi: refs.len() - 2 * f,
        },
    ] {
        let (out, s) = timed(|| rule.aggregate(&refs, &weights));
        out?;
        rows.push(Row {
            workload,
            aggregation: format!("robust: {}", rule.name()),
            upload,
            extra_download: 0.0,
            server_s: s,
            client_s: None,
        });
    }
    let mut dp = DpMechanism::new(DpConfig {
        clip: ClipNorm::fixed(1.0),
        noise_multiplier: 1.0,
        mode: NoiseMode::Central,
        delta: 1e-5,
        selection: fedtune_shared::privacy::dp::Selection::Poisson,
        population: 10_000,
    })?;
    let ((_, spent), s) =
        timed(|| dp.private_mean(vectors.to_vec(), &mut ChaCha8Rng::seed_from_u64(1)));
    rows.push(Row {
        workload,
        aggregation: format!(
            "central DP (z=1, q={}/10000): ε={:.3} after 1 round, δ=1e-5",
            vectors.len(),
            spent.epsilon
        ),
        upload,
        extra_download: 0.0,
        server_s: s,
        client_s: None,
    });
    Ok(())
}

fn secure_rows(
    workload: &'static str,
    vectors: &[Vec<f32>],
    clip: f32,
    degree: usize,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let n = vectors.len();
    for (label, dropped) in [
        ("no drop-outs", 0usize),
        ("10% drop out before input", n / 10),
    ] {
        let config = SecAggConfig::new(1, n, vectors[0].len(), clip, degree, 0.3)?;
        let dropouts = Dropouts {
            before_input: (0..dropped as ClientId)
                .map(|i| i * 7 % n as ClientId)
                .collect(),
            ..Dropouts::default()
        };
        let run = run_secure_sum(&config, vectors, &dropouts, 2)?;
        rows.push(Row {
            workload,
            aggregation: format!(
                "SecAgg+ degree {}, t={}, {label}",
                degree.min(n - 1),
                config.threshold(degree.min(n - 1) + 1)
            ),
            upload: run.upload_bytes_per_client,
            extra_download: run.download_bytes_per_client,
            server_s: run.server_s,
            client_s: Some(run.client_s),
        });
    }
    // Distributed DP on top: each client clips and noises its vector (client time), the server
    // sums as before and only records the round in the accountant (server time); no extra bytes.
    let dp_config = DpConfig {
        clip: ClipNorm::fixed(1.0),
        noise_multiplier: 1.0,
        mode: NoiseMode::Distributed,
        delta: 1e-5,
        selection: fedtune_shared::privacy::dp::Selection::Poisson,
        population: 10_000,
    };
    let probe = SecAggConfig::new(1, n, vectors[0].len(), clip, degree, 0.3)?;
    let noise = dp_config.distributed_noise(probe.min_survivors(n));
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (noised, noise_s) = timed(|| {
        vectors
            .iter()
            .map(|v| {
                let mut x = v.clone();
                noise.apply(&mut x, &mut rng);
                x
            })
            .collect::<Vec<_>>()
    });
    // The quantizer's range holds a clipped value plus 8 standard deviations of a share.
    let range = clip.max(noise.value_bound() as f32);
    let config = SecAggConfig::new(1, n, vectors[0].len(), range, degree, 0.3)?;
    let run = run_secure_sum(&config, &noised, &Dropouts::default(), 4)?;
    let mut dp = DpMechanism::new(dp_config)?;
    let (spent, account_s) = timed(|| dp.record_round(n, noise.clip_norm));
    rows.push(Row {
        workload,
        aggregation: format!(
            "SecAgg+, distributed DP (z=1, C=1, σ={:.3}, m={}): ε={:.3}",
            noise.noise_std, noise.min_clients, spent.epsilon
        ),
        upload: run.upload_bytes_per_client,
        extra_download: run.download_bytes_per_client,
        server_s: run.server_s + account_s,
        client_s: Some(run.client_s + noise_s / n as f64),
    });
    Ok(())
}

/// Runs the benchmark for `clients` clients with SecAgg+ neighbourhoods of `degree`.
pub fn run(clients: usize, degree: usize) -> Result<()> {
    anyhow::ensure!(clients >= 5, "at least 5 clients");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut rows = Vec::new();

    // LoRA rank 8 on q_proj, v_proj.
    let global = adapter(&mut rng);
    let uploads: Vec<ClientAdapter> = (0..clients)
        .map(|_| ClientAdapter {
            weights: adapter(&mut rng),
            samples: 16,
        })
        .collect();
    let upload = encode_adapter(&uploads[0].weights).len() as f64;
    let (out, s) = timed(|| aggregate(AggregationStrategy::FedAvg, &uploads));
    out?;
    rows.push(Row {
        workload: "LoRA r8 q,v",
        aggregation: "plain FedAvg".into(),
        upload,
        extra_download: 0.0,
        server_s: s,
        client_s: None,
    });
    let deltas = uploads
        .iter()
        .map(|u| adapter_delta(&global, &u.weights))
        .collect::<Result<Vec<_>, _>>()?;
    rule_rows("LoRA r8 q,v", &deltas, upload, &mut rows)?;
    secure_rows("LoRA r8 q,v", &deltas, 0.25, degree, &mut rows)?;

    // FedKSeed, K = 4096, τ = 200.
    let run = ZoRunConfig::default();
    let reports: Vec<ClientReport> = (0..clients)
        .map(|_| {
            let mut seeds: Vec<u32> = (0..TAU).map(|_| rng.random_range(0..K)).collect();
            seeds.sort_unstable();
            seeds.dedup();
            ClientReport {
                round: 1,
                seed_grads: seeds
                    .iter()
                    .map(|&s| (s, rng.random_range(-2.0..2.0)))
                    .collect(),
                step_grads: Vec::new(),
                samples: u64::from(TAU),
            }
        })
        .collect();
    let upload = reports.iter().map(|r| wire_size(r) as f64).sum::<f64>() / clients as f64;
    let mut server = ZoServer::new(run);
    let ((_, rejected), s) = timed(|| server.aggregate(&reports));
    anyhow::ensure!(rejected.is_empty(), "benchmark reports rejected");
    rows.push(Row {
        workload: "FedKSeed K=4096",
        aggregation: "plain weighted mean (sparse reports)".into(),
        upload,
        extra_download: 0.0,
        server_s: s,
        client_s: None,
    });
    let dense: Vec<Vec<f32>> = reports.iter().map(|r| dense_seed_grads(r, K)).collect();
    rule_rows("FedKSeed K=4096", &dense, upload, &mut rows)?;
    secure_rows("FedKSeed K=4096", &dense, 8.0, degree, &mut rows)?;

    println!(
        "one round, {clients} clients (dev profile, this machine); bytes per client as encoded"
    );
    println!(
        "{:<16} {:<58} {:>14} {:>16} {:>10} {:>10}",
        "workload", "aggregation", "upload B", "+download B", "server s", "client s"
    );
    for r in &rows {
        println!(
            "{:<16} {:<58} {:>14.0} {:>16.0} {:>10.3} {:>10}",
            r.workload,
            r.aggregation,
            r.upload,
            r.extra_download,
            r.server_s,
            r.client_s.map_or("-".into(), |s| format!("{s:.3}"))
        );
    }
    Ok(())
}
