//! FedSpine on the daemon: each device's bandit picks a (pruning ratio, LoRA rank) arm for the
//! round; the device receives the global adapter at that rank (a blob, full coordinates), tunes
//! it while pruning its model toward that ratio, and uploads the adapter on the units it kept
//! with the list of those units. The server scatters the uploads back to full coordinates and
//! averages each coordinate over the devices that kept it
//! ([`fedtune_shared::lora::aggregation::masked::aggregate_masked`], on FlexLoRA), and rewards
//! every bandit by its loss progress per unit of its round time, as LoRA does: a pruned model
//! trains faster but contributes less, and the bandit weighs the two for each device without
//! knowing its compute or bandwidth. A device that was given work and missed the round (the
//! deadline) earns [`MISSED_ROUND_REWARD`] for its arm: that is what makes slow devices prune,
//! since progress per time alone is the same trade-off for every device whatever its speed.
//!
//! The bookkeeping (bandits, blobs, stats checks, rewards) is the LoRA driver's
//! ([`super::lora`]); what differs is the arm, the task, the kept units in the report and the
//! masked aggregation.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::time::Instant;

use fedtune_shared::bandit::{Arm, DeviceBandit};
use fedtune_shared::lora::adapter::AdapterWeights;
use fedtune_shared::lora::aggregation::AggregationStrategy;
use fedtune_shared::lora::aggregation::masked::{
    PrunedClientAdapter, aggregate_masked, scatter_adapter,
};
use fedtune_shared::lora::federation::adapter_for_rank;
use fedtune_shared::protocol::adapter_blob::{decode_adapter, encode_adapter};
use fedtune_shared::protocol::frame::{decode_body, encode_body};
use fedtune_shared::protocol::{
    BlobRef, DeviceId, FedSpineTask, LoraTask, Report, ReportPayload, Task,
};
use fedtune_shared::prune::schedule::PruneSchedule;
use fedtune_shared::prune::units::LayerShape;
use serde::{Deserialize, Serialize};

use super::lora::{
    LoraSettings, check_norm, check_stats, device_bandit, observation, read_uploaded_adapter,
    reward_bandits,
};
use super::{AlgorithmError, Rejection, RoundSummary, ServerAlgorithm};
use crate::blobs::Blobs;

/// The pruning ratios a bandit chooses from by default (the issue's `{0, 0.1, 0.2, 0.3, 0.5}`).
pub const DEFAULT_RATIOS: [f64; 5] = [0.0, 0.1, 0.2, 0.3, 0.5];

/// The LoRA ranks a bandit chooses from by default.
pub const DEFAULT_RANKS: [usize; 3] = [4, 8, 16];

/// The reward of a device that was given work and did not report before the round closed (a
/// straggler past the deadline, or gone): its update added nothing, so its progress, and its
/// reward, is zero. Without it a configuration too slow for the deadline would never be
/// observed, and the bandit would never learn to avoid it.
pub const MISSED_ROUND_REWARD: f64 = 0.0;

/// The run's fixed settings.
#[derive(Debug, Clone, PartialEq)]
pub struct FedSpineSettings {
    /// LoRA's settings: adapter, ranks, optimiser, steps, seed, norm bound. The strategy is
    /// FlexLoRA whatever is set (the masked aggregation builds on it).
    pub lora: LoraSettings,
    /// Pruning ratios to choose from (each in `[0, 1)`).
    pub ratios: Vec<f64>,
    /// How devices prune (interval, protected layers, importance); `target` is the arm's.
    pub schedule: PruneSchedule,
    /// The full model's decoder layers, to check kept units and scatter adapters against.
    pub shapes: Vec<LayerShape>,
}

impl FedSpineSettings {
    /// Every (ratio, rank) arm, ratios outer.
    pub fn arms(&self) -> Vec<Arm> {
        self.ratios
            .iter()
            .flat_map(|&ratio| {
                self.lora.ranks.iter().map(move |&rank| Arm {
                    lora_rank: rank,
                    pruning_ratio: ratio as f32,
                })
            })
            .collect()
    }

    fn max_rank(&self) -> NonZeroUsize {
        let max = self
            .lora
            .ranks
            .iter()
            .copied()
            .max()
            .unwrap_or(self.lora.lora.rank);
        NonZeroUsize::new(max).unwrap_or(NonZeroUsize::MIN)
    }
}

/// What a device was given this round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Assignment {
    arm: usize,
    rank: usize,
    ratio: f64,
    sent: BlobRef,
}

/// Everything that changes from round to round (stored after each).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    round: u64,
    /// The global adapter, full coordinates, at the largest rank.
    global: AdapterWeights,
    bandits: BTreeMap<DeviceId, DeviceBandit>,
    steps: BTreeMap<DeviceId, usize>,
    assigned: BTreeMap<DeviceId, Assignment>,
    /// Blobs of the previous round, deleted once the round after it is aggregated.
    stale: Vec<BlobRef>,
}

/// FedSpine's server side.
pub struct FedSpine {
    settings: FedSpineSettings,
    blobs: Blobs,
    state: State,
}

impl FedSpine {
    /// A fresh run whose global adapter starts as `initial` (full coordinates, largest rank).
    pub fn new(settings: FedSpineSettings, blobs: Blobs, initial: AdapterWeights) -> Self {
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
        }
    }

    /// A run restored from [`ServerAlgorithm::state`] bytes.
    pub fn restore(
        settings: FedSpineSettings,
        blobs: Blobs,
        bytes: &[u8],
    ) -> Result<Self, AlgorithmError> {
        let state: State =
            decode_body(bytes).map_err(|e| AlgorithmError::Corrupt(e.to_string()))?;
        Ok(Self {
            settings,
            blobs,
            state,
        })
    }

    /// The global adapter (full coordinates, largest rank).
    pub fn global(&self) -> &AdapterWeights {
        &self.state.global
    }

    /// `device`'s bandit, once it has been given a task.
    pub fn bandit(&self, device: DeviceId) -> Option<&DeviceBandit> {
        self.state.bandits.get(&device)
    }
}

impl ServerAlgorithm for FedSpine {
    fn round(&self) -> u64 {
        self.state.round
    }

    fn max_samples(&self) -> u64 {
        let lora = &self.settings.lora;
        (lora.local_steps * lora.train.batch_size.max(1)) as u64
    }

    fn task(&mut self, device: DeviceId, _last_seen: u64) -> Result<Task, AlgorithmError> {
        let assignment = match self.state.assigned.get(&device) {
            // A device that polls again in the same round gets the same work.
            Some(a) => a.clone(),
            None => {
                let arms = self.settings.arms();
                let bandit = device_bandit(
                    &mut self.state.bandits,
                    device,
                    arms,
                    self.settings.lora.seed,
                )?;
                let arm = bandit.select();
                let chosen = bandit.arms()[arm];
                let rank = chosen.lora_rank;
                let ratio = self
                    .settings
                    .ratios
                    .iter()
                    .copied()
                    .find(|&r| r as f32 == chosen.pruning_ratio)
                    .unwrap_or(f64::from(chosen.pruning_ratio));
                // One adapter per rank and round, shared by every device of that rank.
                let sent = match self.state.assigned.values().find(|a| a.rank == rank) {
                    Some(a) => a.sent,
                    None => {
                        let adapter = adapter_for_rank(
                            &self.state.global,
                            rank,
                            AggregationStrategy::FlexLora,
                        )
                        .map_err(|e| AlgorithmError::Aggregation(e.to_string()))?;
                        self.blobs
                            .put(&encode_adapter(&adapter))
                            .map_err(|e| AlgorithmError::Aggregation(e.to_string()))?
                    }
                };
                let a = Assignment {
                    arm,
                    rank,
                    ratio,
                    sent,
                };
                self.state.assigned.insert(device, a.clone());
                a
            }
        };
        let settings = &self.settings.lora;
        let mut lora = settings.lora.clone();
        lora.rank = assignment.rank;
        Ok(Task::FedSpine(FedSpineTask {
            lora: LoraTask {
                lora,
                train: settings.train.clone(),
                local_steps: settings.local_steps,
                adapter: Some(assignment.sent),
                adapter_seed: settings.seed,
                first_step: self.state.steps.get(&device).copied().unwrap_or(0),
            },
            schedule: PruneSchedule {
                target: assignment.ratio,
                ..self.settings.schedule.clone()
            },
        }))
    }

    fn tasks_change_state(&self) -> bool {
        true
    }

    fn validate(&self, device: DeviceId, report: &Report) -> Result<(), Rejection> {
        let ReportPayload::FedSpine {
            adapter,
            rank,
            kept,
        } = &report.payload
        else {
            return Err(Rejection::new(
                "payload",
                "this run is FedSpine; the report carries another algorithm's payload",
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
        let lora = &self.settings.lora;
        let max_samples = (lora.local_steps * lora.train.batch_size.max(1)) as u64;
        check_stats(&report.stats, max_samples)?;
        let weights = read_uploaded_adapter(&self.blobs, adapter)?;
        if weights.rank != *rank || weights.scaling != lora.lora.scaling {
            return Err(Rejection::new(
                "shape",
                "adapter rank or scaling differs from the plan",
            ));
        }
        let global = &self.state.global;
        if weights.layers.len() != global.layers.len()
            || weights
                .layers
                .keys()
                .any(|at| !global.layers.contains_key(at))
        {
            return Err(Rejection::new(
                "shape",
                "adapter layers differ from the run's",
            ));
        }
        // Kept units in range and ascending, and every factor of the shape they give.
        scatter_adapter(&weights, kept, &self.settings.shapes)
            .map_err(|e| Rejection::new("shape", e.to_string()))?;
        check_norm(&weights, lora.max_norm)
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
            let ReportPayload::FedSpine { adapter, kept, .. } = &report.payload else {
                return Err(AlgorithmError::Aggregation(
                    "a non-FedSpine report was stored".into(),
                ));
            };
            let bytes = self
                .blobs
                .read(&adapter.digest)
                .map_err(|e| AlgorithmError::Aggregation(e.to_string()))?;
            let weights =
                decode_adapter(&bytes).map_err(|e| AlgorithmError::Aggregation(e.to_string()))?;
            uploads.push(PrunedClientAdapter {
                weights,
                kept: kept.clone(),
                samples: report.stats.samples.max(1),
            });
            uploaded.push(*adapter);
            if let Some(a) = next.assigned.get(device) {
                observations.push((*device, a.arm, observation(&report.stats)));
            }
            *next.steps.entry(*device).or_default() += self.settings.lora.local_steps;
        }
        next.global = aggregate_masked(
            &uploads,
            &self.settings.shapes,
            self.settings.max_rank(),
            &self.state.global,
        )
        .map_err(|e| AlgorithmError::Aggregation(e.to_string()))?;
        reward_bandits(&mut next.bandits, &observations);
        let reported: std::collections::BTreeSet<DeviceId> =
            reports.iter().map(|(d, _)| *d).collect();
        for (device, a) in &self.state.assigned {
            if !reported.contains(device)
                && let Some(b) = next.bandits.get_mut(device)
            {
                let _ = b.update(a.arm, MISSED_ROUND_REWARD);
            }
        }
        for stale in std::mem::take(&mut next.stale) {
            self.blobs.remove(&stale.digest);
        }
        next.stale = uploaded;
        next.stale.extend(next.assigned.values().map(|a| a.sent));
        next.assigned.clear();
        next.round += 1;
        self.state = next;
        tracing::info!(round, reports = reports.len(), "FedSpine round aggregated");
        Ok(RoundSummary::of(round, reports, start))
    }

    fn state(&self) -> Vec<u8> {
        encode_body(&self.state).unwrap_or_default()
    }

    fn checkpoint(&self) -> Vec<u8> {
        encode_adapter(&self.state.global)
    }
}
