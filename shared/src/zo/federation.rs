//! An in-process FedKSeed federation: one server, N clients with their own data, M sampled per
//! round, τ local steps each, aggregation and replay; no network. It is the reference the
//! networked daemon and the simulator must agree with.

use std::collections::BTreeMap;

use burn::tensor::Device;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::round::{ClientReport, RoundPlan, ZoRunConfig, ZoServer, replay, wire_size};
use super::seed_pool::SeedPool;
use super::step::{ZoStepConfig, ZoSteps};
use crate::eval::batch_loss;
use crate::model::{Llama, TokenBatch};
use crate::noise::SeedNoise;
use crate::progress::{Progress, Silent, StepProgress};

/// Settings of an in-process run.
#[derive(Debug, Clone)]
pub struct FederationConfig {
    /// The FedKSeed run.
    pub run: ZoRunConfig,
    /// Rounds to train.
    pub rounds: u64,
    /// Clients sampled per round (M).
    pub clients_per_round: usize,
    /// Sequences per local step.
    pub batch_size: usize,
    /// Padding token for batches.
    pub pad_id: u32,
    /// Seed of client sampling and of each client's data order and seed draws.
    pub seed: u64,
}

/// What one round did.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundStats {
    /// The round (1-based).
    pub round: u64,
    /// Mean local training loss over the round's steps.
    pub train_loss: f32,
    /// Held-out loss of the global model after the round.
    pub heldout_loss: f32,
    /// Mean encoded size of a round plan sent (server to client).
    pub plan_bytes: usize,
    /// Mean encoded size of a report (client to server).
    pub report_bytes: usize,
    /// Seeds whose history changed this round.
    pub seeds_touched: usize,
}

/// One client's local round: τ zeroth-order steps on a working copy of `model` (the client's
/// copy of the global model, which is left untouched), returning the report and the mean loss.
pub fn local_round(
    model: &Llama,
    plan: &RoundPlan,
    pool: &SeedPool,
    data: &[Vec<u32>],
    batch_size: usize,
    pad_id: u32,
    rng: &mut impl Rng,
    progress: &mut impl Progress,
) -> (ClientReport, f32) {
    let config = &plan.config;
    let device: Device = model.device();
    let step = ZoStepConfig {
        eps: config.eps,
        lr: config.lr,
    };
    let mut working = ZoSteps::new(model.clone(), step);
    let mut grads: BTreeMap<u32, f32> = BTreeMap::new();
    let mut step_grads = Vec::new();
    let mut losses = Vec::new();
    let mut samples = 0u64;
    for done in 1..=config.tau as usize {
        let rows: Vec<Vec<u32>> = (0..batch_size.max(1))
            .map(|_| data[rng.random_range(0..data.len())].clone())
            .collect();
        let batch = TokenBatch::right_padded(&rows, pad_id, &device);
        let index = plan.sampling.sample(pool.len(), rng) as u32;
        let Some(seed) = pool.seed(index as usize) else {
            continue;
        };
        let noise = SeedNoise::new(seed, config.distribution);
        let outcome = working.step(noise, |m| batch_loss(m, &batch));
        samples += rows.len() as u64;
        if let Some(g) = outcome.g {
            *grads.entry(index).or_default() += g;
            if config.pro {
                step_grads.push((index, g));
            }
            losses.push(outcome.loss);
        }
        progress.step_done(StepProgress {
            step: done,
            steps: config.tau as usize,
            loss: outcome.g.map(|_| outcome.loss),
        });
    }
    let report = ClientReport {
        round: plan.round,
        seed_grads: grads.into_iter().filter(|&(_, g)| g != 0.0).collect(),
        step_grads,
        samples,
    };
    let mean = losses.iter().sum::<f32>() / losses.len().max(1) as f32;
    (report, mean)
}

/// Mean loss of `model` over `sequences` (batched 8 at a time).
pub fn heldout_loss(model: &Llama, sequences: &[Vec<u32>], pad_id: u32) -> f32 {
    let device = model.device();
    let mut total = 0.0f64;
    let mut count = 0usize;
    for chunk in sequences.chunks(8) {
        let batch = TokenBatch::right_padded(chunk, pad_id, &device);
        let targets: usize = chunk.iter().map(|s| s.len().saturating_sub(1)).sum();
        total += batch_loss(model, &batch) as f64 * targets as f64;
        count += targets;
    }
    (total / count.max(1) as f64) as f32
}

/// Runs `config.rounds` rounds and returns the final global model, calling `on_round` after each.
///
/// # Panics
/// When there are fewer clients than `clients_per_round` or a client has no data.
pub fn run_federation(
    mut global: Llama,
    clients: &[Vec<Vec<u32>>],
    heldout: &[Vec<u32>],
    config: &FederationConfig,
    mut on_round: impl FnMut(&RoundStats),
) -> Llama {
    assert!(
        clients.len() >= config.clients_per_round,
        "not enough clients"
    );
    assert!(
        clients.iter().all(|c| !c.is_empty()),
        "every client needs data"
    );
    let pool = SeedPool::new(config.run.run_seed, config.run.k as usize);
    let mut server = ZoServer::new(config.run.clone());
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut last_seen = vec![0u64; clients.len()];
    for _ in 0..config.rounds {
        let chosen = sample(&mut rng, clients.len(), config.clients_per_round).into_vec();
        let mut reports = Vec::new();
        let mut plan_bytes = 0;
        let mut losses = 0.0;
        for &c in &chosen {
            // In process every client trains from the one global model, already replayed; the
            // plan still carries its catch-up deltas, so the bytes are what the wire would carry.
            let plan = server.plan(last_seen[c]);
            plan_bytes += wire_size(&plan);
            let mut client_rng =
                ChaCha8Rng::seed_from_u64(config.seed ^ (plan.round << 20) ^ c as u64);
            let (report, loss) = local_round(
                &global,
                &plan,
                &pool,
                &clients[c],
                config.batch_size,
                config.pad_id,
                &mut client_rng,
                &mut Silent,
            );
            losses += loss;
            reports.push(report);
            last_seen[c] = plan.base_round();
        }
        let report_bytes = reports.iter().map(wire_size).sum::<usize>() / reports.len().max(1);
        let (delta, rejected) = server.aggregate(&reports);
        for (i, e) in rejected {
            tracing::warn!(client = chosen[i], error = %e, "report rejected");
        }
        global = replay(global, &config.run, &pool, &delta);
        let stats = RoundStats {
            round: delta.round,
            train_loss: losses / chosen.len().max(1) as f32,
            heldout_loss: heldout_loss(&global, heldout, config.pad_id),
            plan_bytes: plan_bytes / chosen.len().max(1),
            report_bytes,
            seeds_touched: delta.entries.nonzero().len(),
        };
        tracing::info!(?stats, "round finished");
        on_round(&stats);
    }
    global
}
