//! What the daemon runs each round, behind one small trait: make a device's task, validate a
//! report, aggregate a round's reports into the next global state. The daemon never looks
//! inside the algorithm's state; it stores the bytes [`ServerAlgorithm::state`] gives it.

pub mod combine;
pub mod fedkseed;
pub mod fedspine;
pub mod lora;

use fedtune_shared::privacy::dp::{DistributedNoise, RoundPrivacy};
use fedtune_shared::protocol::{DeviceId, ErrorCode, LocalStats, Report, Task, WireError};
use serde::{Deserialize, Serialize};

use crate::secure::{SecureAggregate, SecureCost};

/// Why a report was refused by the algorithm.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason}")]
pub struct Rejection {
    /// A short label for metrics ("not_finite", "norm", "shape", "seed_range", …).
    pub kind: &'static str,
    /// What was wrong.
    pub reason: String,
}

impl Rejection {
    /// A rejection of `kind`.
    pub fn new(kind: &'static str, reason: impl Into<String>) -> Self {
        Self {
            kind,
            reason: reason.into(),
        }
    }
}

impl From<Rejection> for WireError {
    fn from(r: Rejection) -> Self {
        WireError::new(ErrorCode::Invalid, r.reason)
    }
}

/// Why the algorithm failed (a server fault, not a device's).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AlgorithmError {
    /// Stored state could not be decoded.
    #[error("stored algorithm state is corrupt: {0}")]
    Corrupt(String),
    /// Aggregation failed.
    #[error("aggregation failed: {0}")]
    Aggregation(String),
}

/// What a round's aggregation did, kept in the store and exported as metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundSummary {
    /// The round.
    pub round: u64,
    /// Reports aggregated.
    pub reports: usize,
    /// Training samples they used.
    pub samples: u64,
    /// Sample-weighted mean training loss.
    pub mean_loss: f32,
    /// Seconds the aggregation took.
    pub aggregation_s: f64,
    /// What differential privacy spent (ε so far for the configured δ); `None` without DP.
    pub privacy: Option<RoundPrivacy>,
    /// What secure aggregation cost; `None` for a round aggregated in the clear.
    pub secure: Option<SecureCost>,
}

impl RoundSummary {
    /// The summary of aggregating `reports` in round `round`, started at `started`.
    pub fn of(round: u64, reports: &[(DeviceId, Report)], started: std::time::Instant) -> Self {
        Self::of_stats(round, reports.iter().map(|(_, r)| &r.stats), started)
    }

    /// The summary of a round whose devices measured `stats` (a secure round has no reports,
    /// only the measurements sent with the masked inputs).
    pub fn of_stats<'a>(
        round: u64,
        stats: impl Iterator<Item = &'a LocalStats> + Clone,
        started: std::time::Instant,
    ) -> Self {
        let (samples, mean_loss) = weighted_stats_loss(stats.clone());
        Self {
            round,
            reports: stats.count(),
            samples,
            mean_loss,
            aggregation_s: started.elapsed().as_secs_f64(),
            privacy: None,
            secure: None,
        }
    }
}

/// An algorithm as the daemon drives it.
pub trait ServerAlgorithm: Send {
    /// The round the algorithm's state is at (the next to aggregate).
    fn round(&self) -> u64;

    /// The task of `device` in the current round; its model reflects rounds up to `last_seen`.
    fn task(&mut self, device: DeviceId, last_seen: u64) -> Result<Task, AlgorithmError>;

    /// True when [`Self::task`] changes the state in a way that must survive a restart (which
    /// rank a device was given), so the daemon stores the state after each new task.
    fn tasks_change_state(&self) -> bool {
        false
    }

    /// Checks a report's content (shapes, ranges, finiteness, norm). Round and device were
    /// checked by the orchestrator.
    fn validate(&self, device: DeviceId, report: &Report) -> Result<(), Rejection>;

    /// Combines the round's reports (sorted by device id, each validated) and advances.
    fn aggregate(&mut self, reports: &[(DeviceId, Report)])
    -> Result<RoundSummary, AlgorithmError>;

    /// The state to store after each round, from which [`Self::round`] and all later work
    /// follow.
    fn state(&self) -> Vec<u8>;

    /// The global checkpoint to keep on disk (FedKSeed: its history; LoRA: the adapter).
    fn checkpoint(&self) -> Vec<u8>;

    /// The length of the vector each device masks in a secure round (FedKSeed: K; LoRA: the
    /// flattened adapter), or `None` when the algorithm cannot aggregate from a sum.
    fn secure_vector_len(&self) -> Option<usize> {
        None
    }

    /// The most samples a device can train on in a round (the weights of a secure sum are
    /// `samples / max_samples`).
    fn max_samples(&self) -> u64;

    /// Under distributed DP, what each device adds to its update before masking when at least
    /// `min_clients` devices are in every sum; `None` otherwise.
    fn distributed_noise(&self, _min_clients: usize) -> Option<DistributedNoise> {
        None
    }

    /// Advances from a secure round's sum of weighted updates (see
    /// [`fedtune_shared::protocol::secure::weighted_input`]).
    fn aggregate_secure(
        &mut self,
        _aggregate: &SecureAggregate,
    ) -> Result<RoundSummary, AlgorithmError> {
        Err(AlgorithmError::Aggregation(
            "this algorithm cannot aggregate from a secure sum".into(),
        ))
    }
}

/// The mean of a secure sum (divided by its weight: the sample-weighted mean, or under DP the
/// equal-weight mean), checked against the expected length.
pub(crate) fn secure_mean(
    aggregate: &SecureAggregate,
    len: usize,
) -> Result<Vec<f32>, AlgorithmError> {
    if aggregate.sum.len() != len || aggregate.weight.is_nan() || aggregate.weight <= 0.0 {
        return Err(AlgorithmError::Aggregation(format!(
            "a secure sum of {} values with weight {}, {len} values expected",
            aggregate.sum.len(),
            aggregate.weight
        )));
    }
    Ok(aggregate
        .sum
        .iter()
        .map(|&s| (f64::from(s) / aggregate.weight) as f32)
        .collect())
}

/// Sample-weighted mean loss of reports.
pub fn weighted_loss(reports: &[(DeviceId, Report)]) -> (u64, f32) {
    weighted_stats_loss(reports.iter().map(|(_, r)| &r.stats))
}

fn weighted_stats_loss<'a>(stats: impl Iterator<Item = &'a LocalStats> + Clone) -> (u64, f32) {
    let samples = stats
        .clone()
        .fold(0u64, |total, s| total.saturating_add(s.samples));
    let loss = stats
        .map(|s| s.mean_loss as f64 * s.samples as f64)
        .sum::<f64>()
        / samples.max(1) as f64;
    (samples, loss as f32)
}
