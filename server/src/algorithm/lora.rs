//! LoRA on the daemon: each device's bandit picks its rank for the round, the device receives
//! the global adapter at that rank (a blob), trains, uploads its adapter (a blob) and reports;
//! the round's adapters are combined with the configured strategy (FedAvg, HetLoRA, FlexLoRA)
//! into the global adapter kept at the largest rank, and every device's bandit is rewarded by
//! its loss progress per unit of (its) round time. The same steps as the in-process
//! [`fedtune_shared::lora::federation`], in the same order, so both give the same adapter.

use std::collections::BTreeMap;
use std::time::Instant;

use fedtune_shared::bandit::reward::{
    RewardModel, RoundObservation, ThroughputReward, median_round_time_s,
};
use fedtune_shared::bandit::{Arm, BanditPolicy, DeviceBandit};
use fedtune_shared::lora::adapter::AdapterWeights;
use fedtune_shared::lora::aggregation::{AggregationStrategy, ClientAdapter};
use fedtune_shared::lora::config::LoraConfig;
use fedtune_shared::lora::federation::{adapter_for_rank, aggregate_to_rank};
use fedtune_shared::lora::train::TrainConfig;
use fedtune_shared::privacy::dp::{DistributedNoise, DpMechanism};
use fedtune_shared::protocol::adapter_blob::{decode_adapter, encode_adapter};
use fedtune_shared::protocol::frame::{decode_body, encode_body};
use fedtune_shared::protocol::{
    BlobRef, DeviceId, LocalStats, LoraTask, Report, ReportPayload, Task,
};
use fedtune_shared::robust::RobustRule;
use fedtune_shared::robust::flat::{adapter_delta, apply_adapter_delta};
use serde::{Deserialize, Serialize};

use super::combine::UpdateCombiner;
use super::{AlgorithmError, Rejection, RoundSummary, ServerAlgorithm, secure_mean};
use crate::blobs::Blobs;
use crate::secure::SecureAggregate;

/// The run's fixed settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    /// Adapter settings; `rank` is ignored (the bandit picks it from `ranks`).
    pub lora: LoraConfig,
    /// Ranks to choose from.
    pub ranks: Vec<usize>,
    /// Optimiser settings.
    pub train: TrainConfig,
    /// Steps per round.
    pub local_steps: usize,
    /// Aggregation strategy.
    pub strategy: AggregationStrategy,
    /// Seed of bandits and fresh adapters.
    pub seed: u64,
    /// Bound on `‖s·B·A‖_F` summed over layers (`None`: none).
    pub max_norm: Option<f64>,
}

impl LoraSettings {
    fn max_rank(&self) -> usize {
        self.ranks.iter().copied().max().unwrap_or(self.lora.rank)
    }
}

/// The first global adapter of a run over `model`: fresh at the largest rank (A random, B
/// zero), seeded by the run, so every device's first adapter is the same model of its rank.
/// `None` when the configuration adapts no layer.
pub fn initial_adapter(
    model: fedtune_shared::model::Llama,
    settings: &LoraSettings,
) -> Option<AdapterWeights> {
    let mut fresh = settings.lora.clone();
    fresh.rank = settings.max_rank();
    fedtune_shared::lora::attach::adapter_weights(
        &fedtune_shared::lora::attach::attach_fresh(model, &fresh, settings.seed),
        fresh.scaling,
    )
}

/// What a device was given this round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Assignment {
    arm: usize,
    rank: usize,
    sent: BlobRef,
}

/// Everything that changes from round to round (stored after each).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    round: u64,
    global: AdapterWeights,
    bandits: BTreeMap<DeviceId, DeviceBandit>,
    steps: BTreeMap<DeviceId, usize>,
    assigned: BTreeMap<DeviceId, Assignment>,
    /// Blobs of the previous round (sent and uploaded), deleted once the round after it is
    /// aggregated: by then no stored report refers to them.
    stale: Vec<BlobRef>,
}

/// LoRA's server side.
pub struct Lora {
    settings: LoraSettings,
    blobs: Blobs,
    state: State,
    combiner: UpdateCombiner,
}

fn plain_combiner() -> UpdateCombiner {
    // The plain mean without DP cannot fail to build.
    UpdateCombiner::new(RobustRule::Mean, None).unwrap_or_else(|_| unreachable!())
}

impl Lora {
    /// A fresh run whose global adapter starts as `initial` (at the largest rank).
    pub fn new(settings: LoraSettings, blobs: Blobs, initial: AdapterWeights) -> Self {
        Self {
            settings,
            blobs,
            state: State {
                round: 1,
                global: initial,
                bandits: BTreeMap::new(),
                steps: BTreeMap::new(),
                assigned: BTreeMap::new(),
                stale: Vec::new(),
            },
            combiner: plain_combiner(),
        }
    }

    /// The same run combining adapter updates (adapter minus the global adapter) with
    /// `combiner` (a robust rule or central DP) instead of the strategy's averaging; every
    /// device must train at the global rank. Call it before [`Self::restore_dp`].
    pub fn with_combiner(mut self, combiner: UpdateCombiner) -> Self {
        self.combiner = combiner;
        self
    }

    /// Restores the DP state stored with `bytes` by [`ServerAlgorithm::state`] when DP is on.
    /// A run that turns DP on mid-way starts its accountant at zero (logged).
    pub fn restore_dp(mut self, bytes: &[u8]) -> Self {
        self.combiner.restore_dp_after::<State>(bytes);
        self
    }

    /// A run restored from [`ServerAlgorithm::state`] bytes.
    pub fn restore(
        settings: LoraSettings,
        blobs: Blobs,
        bytes: &[u8],
    ) -> Result<Self, AlgorithmError> {
        // With DP on, the state is (state, DP state); without, the state alone.
        let state: State = match decode_body::<(State, DpMechanism)>(bytes) {
            Ok((state, _)) => state,
            Err(_) => decode_body(bytes).map_err(|e| AlgorithmError::Corrupt(e.to_string()))?,
        };
        Ok(Self {
            settings,
            blobs,
            state,
            combiner: plain_combiner(),
        })
    }

    /// The global adapter (at the largest rank).
    pub fn global(&self) -> &AdapterWeights {
        &self.state.global
    }

    fn bandit(&mut self, device: DeviceId) -> Result<&mut DeviceBandit, AlgorithmError> {
        let arms = self.settings.ranks.iter().map(|&r| Arm::lora(r)).collect();
        device_bandit(&mut self.state.bandits, device, arms, self.settings.seed)
    }
}

/// `device`'s bandit over `arms`, made on first use with a seed fixed by the run and the
/// device.
pub(super) fn device_bandit(
    bandits: &mut BTreeMap<DeviceId, DeviceBandit>,
    device: DeviceId,
    arms: Vec<Arm>,
    run_seed: u64,
) -> Result<&mut DeviceBandit, AlgorithmError> {
    match bandits.entry(device) {
        std::collections::btree_map::Entry::Occupied(e) => Ok(e.into_mut()),
        std::collections::btree_map::Entry::Vacant(v) => {
            // Each device's bandit has its own seed, fixed by the run and the device.
            let seed = run_seed ^ u64::from_le_bytes(device.0[..8].try_into().unwrap_or_default());
            let bandit = DeviceBandit::new(arms, BanditPolicy::default(), seed)
                .map_err(|e| AlgorithmError::Aggregation(e.to_string()))?;
            Ok(v.insert(bandit))
        }
    }
}

/// Checks a LoRA-style report's measurements: samples within what `max_samples` allows, finite
/// losses, a finite non-negative time.
pub(super) fn check_stats(stats: &LocalStats, max_samples: u64) -> Result<(), Rejection> {
    if stats.samples == 0 || stats.samples > max_samples {
        return Err(Rejection::new(
            "samples",
            format!("{} samples, a round has 1..={max_samples}", stats.samples),
        ));
    }
    let losses_finite = [stats.first_loss, stats.loss_after, stats.mean_loss]
        .iter()
        .all(|l| l.is_finite());
    let time_valid = stats.wall_s.is_finite() && stats.wall_s >= 0.0;
    if !losses_finite || !time_valid {
        return Err(Rejection::new("not_finite", "loss or time is not finite"));
    }
    Ok(())
}

/// The adapter a device uploaded as `adapter`, read and decoded (outside input: every failure
/// is a [`Rejection`]).
pub(super) fn read_uploaded_adapter(
    blobs: &Blobs,
    adapter: &BlobRef,
) -> Result<AdapterWeights, Rejection> {
    if blobs.len(&adapter.digest) != Some(adapter.len) {
        return Err(Rejection::new(
            "blob",
            "the adapter was not uploaded (or its length differs)",
        ));
    }
    let bytes = blobs
        .read(&adapter.digest)
        .map_err(|e| Rejection::new("blob", e.to_string()))?;
    decode_adapter(&bytes).map_err(|e| {
        let kind = match e {
            fedtune_shared::protocol::adapter_blob::AdapterBlobError::NotFinite { .. } => {
                "not_finite"
            }
            _ => "shape",
        };
        Rejection::new(kind, e.to_string())
    })
}

/// Refuses an adapter whose update norm ([`update_norm`]) exceeds `max`.
pub(super) fn check_norm(weights: &AdapterWeights, max: Option<f64>) -> Result<(), Rejection> {
    if let Some(max) = max {
        let norm = update_norm(weights);
        if norm > max {
            return Err(Rejection::new(
                "norm",
                format!("update norm {norm:.3e} exceeds the bound {max:.3e}"),
            ));
        }
    }
    Ok(())
}

/// Rewards every observed device's bandit with [`ThroughputReward`] against the round's median
/// time.
pub(super) fn reward_bandits(
    bandits: &mut BTreeMap<DeviceId, DeviceBandit>,
    observations: &[(DeviceId, usize, RoundObservation)],
) {
    let times: Vec<f64> = observations
        .iter()
        .map(|(_, _, o)| o.round_time_s)
        .collect();
    if let Ok(median) = median_round_time_s(&times) {
        for (device, arm, observation) in observations {
            match ThroughputReward.reward(observation, median) {
                Ok(r) => {
                    if let Some(b) = bandits.get_mut(device) {
                        let _ = b.update(*arm, r);
                    }
                }
                Err(e) => tracing::warn!(%device, error = %e, "no reward this round"),
            }
        }
    }
}

/// The observation of a device's round that its bandit is rewarded by.
pub(super) fn observation(stats: &LocalStats) -> RoundObservation {
    RoundObservation {
        loss_before: stats.first_loss,
        loss_after: stats.loss_after,
        round_time_s: stats.wall_s.max(1e-9),
    }
}

/// `‖s·B·A‖_F` summed over layers, from the r×r Gram matrices (`‖BA‖²_F = Σ (BᵀB ∘ AAᵀ)`), so
/// the dense product is never formed.
pub(super) fn update_norm(adapter: &AdapterWeights) -> f64 {
    let s = adapter.scale() as f64;
    adapter
        .layers
        .values()
        .map(|f| {
            let r = f.rank;
            let mut gb = vec![0.0f64; r * r];
            for row in f.b.chunks_exact(r) {
                for i in 0..r {
                    for j in 0..r {
                        gb[i * r + j] += row[i] as f64 * row[j] as f64;
                    }
                }
            }
            let mut total = 0.0;
            for i in 0..r {
                for j in 0..r {
                    let ai = &f.a[i * f.d_in..(i + 1) * f.d_in];
                    let aj = &f.a[j * f.d_in..(j + 1) * f.d_in];
                    let ga: f64 = ai.iter().zip(aj).map(|(&x, &y)| x as f64 * y as f64).sum();
                    total += gb[i * r + j] * ga;
                }
            }
            s * total.max(0.0).sqrt()
        })
        .sum()
}

impl ServerAlgorithm for Lora {
    fn round(&self) -> u64 {
        self.state.round
    }

    fn task(&mut self, device: DeviceId, _last_seen: u64) -> Result<Task, AlgorithmError> {
        let assignment = match self.state.assigned.get(&device) {
            // A device that polls again in the same round (after a reconnect) gets the same work.
            Some(a) => a.clone(),
            None => {
                let bandit = self.bandit(device)?;
                let arm = bandit.select();
                let rank = bandit.arms()[arm].lora_rank;
                // Every device of a rank gets the same adapter this round: made (an SVD for FlexLoRA)
                // and stored once per rank, not once per device.
                let same_rank = self.state.assigned.values().find(|a| a.rank == rank);
                let sent = match same_rank {
                    Some(a) => a.sent,
                    None => {
                        let adapter =
                            adapter_for_rank(&self.state.global, rank, self.settings.strategy)
                                .map_err(|e| AlgorithmError::Aggregation(e.to_string()))?;
                        self.blobs
                            .put(&encode_adapter(&adapter))
                            .map_err(|e| AlgorithmError::Aggregation(e.to_string()))?
                    }
                };
                let a = Assignment { arm, rank, sent };
                self.state.assigned.insert(device, a.clone());
                a
            }
        };
        let mut lora = self.settings.lora.clone();
        lora.rank = assignment.rank;
        Ok(Task::Lora(LoraTask {
            lora,
            train: self.settings.train.clone(),
            local_steps: self.settings.local_steps,
            adapter: Some(assignment.sent),
            adapter_seed: self.settings.seed,
            first_step: self.state.steps.get(&device).copied().unwrap_or(0),
        }))
    }

    fn tasks_change_state(&self) -> bool {
        true
    }

    fn validate(&self, device: DeviceId, report: &Report) -> Result<(), Rejection> {
        let ReportPayload::Lora { adapter, rank } = &report.payload else {
            return Err(Rejection::new(
                "payload",
                "this run is LoRA; the report carries another algorithm's payload",
            ));
        };
        let Some(assigned) = self.state.assigned.get(&device) else {
            return Err(Rejection::new(
                "not_assigned",
                "no adapter was sent to this device this round",
            ));
        };
        if *rank != assigned.rank {
            return Err(Rejection::new(
                "shape",
                format!("rank {rank}, the device was assigned {}", assigned.rank),
            ));
        }
        let max_samples =
            (self.settings.local_steps * self.settings.train.batch_size.max(1)) as u64;
        check_stats(&report.stats, max_samples)?;
        let weights = read_uploaded_adapter(&self.blobs, adapter)?;
        if weights.rank != *rank || weights.scaling != self.settings.lora.scaling {
            return Err(Rejection::new(
                "shape",
                "adapter rank or scaling differs from the plan",
            ));
        }
        let global = &self.state.global;
        if weights.layers.len() != global.layers.len() {
            return Err(Rejection::new(
                "shape",
                "adapter layers differ from the run's",
            ));
        }
        for (at, f) in &weights.layers {
            let Some(g) = global.layers.get(at) else {
                return Err(Rejection::new("shape", format!("unexpected layer {at:?}")));
            };
            if (f.d_in, f.d_out) != (g.d_in, g.d_out) {
                return Err(Rejection::new(
                    "shape",
                    format!("layer {at:?} has the wrong shape"),
                ));
            }
        }
        check_norm(&weights, self.settings.max_norm)
    }

    fn aggregate(
        &mut self,
        reports: &[(DeviceId, Report)],
    ) -> Result<RoundSummary, AlgorithmError> {
        let start = Instant::now();
        let round = self.state.round;
        let mut next = self.state.clone();
        let mut uploads = Vec::new();
        let mut observations = Vec::new();
        let mut uploaded = Vec::new();
        for (device, report) in reports {
            let ReportPayload::Lora { adapter, .. } = &report.payload else {
                return Err(AlgorithmError::Aggregation(
                    "a non-LoRA report was stored".into(),
                ));
            };
            let bytes = self
                .blobs
                .read(&adapter.digest)
                .map_err(|e| AlgorithmError::Aggregation(e.to_string()))?;
            let weights =
                decode_adapter(&bytes).map_err(|e| AlgorithmError::Aggregation(e.to_string()))?;
            uploads.push(ClientAdapter {
                weights,
                samples: report.stats.samples.max(1),
            });
            uploaded.push(*adapter);
            if let Some(a) = next.assigned.get(device) {
                observations.push((*device, a.arm, observation(&report.stats)));
            }
            *next.steps.entry(*device).or_default() += self.settings.local_steps;
        }
        let mut combiner = self.combiner.clone();
        let mut privacy = None;
        next.global = if combiner.is_plain() {
            aggregate_to_rank(
                self.settings.strategy,
                &uploads,
                self.settings.max_rank(),
                &self.state.global,
            )
            .map_err(|e| AlgorithmError::Aggregation(e.to_string()))?
        } else {
            let global = &self.state.global;
            let deltas = uploads
                .iter()
                .map(|u| adapter_delta(global, &u.weights))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| AlgorithmError::Aggregation(e.to_string()))?;
            let weights: Vec<f64> = uploads.iter().map(|u| u.samples as f64).collect();
            let (mean, spent) = combiner.combine(deltas, &weights)?;
            privacy = spent;
            apply_adapter_delta(global, &mean)
                .map_err(|e| AlgorithmError::Aggregation(e.to_string()))?
        };
        reward_bandits(&mut next.bandits, &observations);
        // Blobs of the round before are no longer referenced by any stored report.
        for stale in std::mem::take(&mut next.stale) {
            self.blobs.remove(&stale.digest);
        }
        next.stale = uploaded;
        next.stale.extend(next.assigned.values().map(|a| a.sent));
        next.assigned.clear();
        next.round += 1;
        self.state = next;
        self.combiner = combiner;
        tracing::info!(round, ranks = ?reports.len(), "LoRA round aggregated");
        Ok(RoundSummary {
            privacy,
            ..RoundSummary::of(round, reports, start)
        })
    }

    fn state(&self) -> Vec<u8> {
        // Plain numbers: always encodes.
        match self.combiner.dp_state() {
            Some(dp) => encode_body(&(&self.state, dp)).unwrap_or_default(),
            None => encode_body(&self.state).unwrap_or_default(),
        }
    }

    fn checkpoint(&self) -> Vec<u8> {
        encode_adapter(&self.state.global)
    }

    fn secure_vector_len(&self) -> Option<usize> {
        // A sum is over one shape: FedAvg of devices that all train at the global rank.
        let single_rank = self
            .settings
            .ranks
            .iter()
            .all(|&r| r == self.state.global.rank);
        (self.settings.strategy == AggregationStrategy::FedAvg && single_rank)
            .then(|| fedtune_shared::robust::flat::adapter_len(&self.state.global))
    }

    fn max_samples(&self) -> u64 {
        (self.settings.local_steps * self.settings.train.batch_size.max(1)) as u64
    }

    fn distributed_noise(&self, min_clients: usize) -> Option<DistributedNoise> {
        self.combiner.distributed_noise(min_clients)
    }

    fn aggregate_secure(
        &mut self,
        aggregate: &SecureAggregate,
    ) -> Result<RoundSummary, AlgorithmError> {
        let start = Instant::now();
        let round = self.state.round;
        let len = self
            .secure_vector_len()
            .ok_or_else(|| AlgorithmError::Aggregation("not a single-rank FedAvg run".into()))?;
        let mean = secure_mean(aggregate, len)?;
        // Checked before anything changes: a sum that cannot be used leaves the state as it was.
        let mut combiner = self.combiner.clone();
        let privacy = combiner.account_secure(aggregate)?;
        let mut next = self.state.clone();
        next.global = apply_adapter_delta(&self.state.global, &mean)
            .map_err(|e| AlgorithmError::Aggregation(e.to_string()))?;
        let mut observations = Vec::new();
        for (device, stats) in &aggregate.stats {
            if let Some(a) = next.assigned.get(device) {
                observations.push((*device, a.arm, observation(stats)));
            }
            *next.steps.entry(*device).or_default() += self.settings.local_steps;
        }
        reward_bandits(&mut next.bandits, &observations);
        for stale in std::mem::take(&mut next.stale) {
            self.blobs.remove(&stale.digest);
        }
        next.stale = next.assigned.values().map(|a| a.sent).collect();
        next.assigned.clear();
        next.round += 1;
        self.state = next;
        self.combiner = combiner;
        tracing::info!(
            round,
            clients = aggregate.stats.len(),
            "LoRA round aggregated from a secure sum"
        );
        Ok(RoundSummary {
            privacy,
            secure: Some(aggregate.cost),
            ..RoundSummary::of_stats(round, aggregate.stats.iter().map(|(_, s)| s), start)
        })
    }
}
