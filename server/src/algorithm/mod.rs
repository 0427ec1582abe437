//! What the daemon runs each round, behind one small trait: make a device's task, validate a
//! report, aggregate a round's reports into the next global state. The daemon never looks
//! inside the algorithm's state; it stores the bytes [`ServerAlgorithm::state`] gives it.

pub mod combine;
pub mod fedkseed;
pub mod fedspine;
pub mod lora;

use fedtune_shared::privacy::dp::RoundPrivacy;
use fedtune_shared::protocol::{DeviceId, ErrorCode, Report, Task, WireError};
use serde::{Deserialize, Serialize};

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
}

impl RoundSummary {
    /// The summary of aggregating `reports` in round `round`, started at `started`.
    pub fn of(round: u64, reports: &[(DeviceId, Report)], started: std::time::Instant) -> Self {
        let (samples, mean_loss) = weighted_loss(reports);
        Self {
            round,
            reports: reports.len(),
            samples,
            mean_loss,
            aggregation_s: started.elapsed().as_secs_f64(),
            privacy: None,
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
}

/// Sample-weighted mean loss of reports.
pub fn weighted_loss(reports: &[(DeviceId, Report)]) -> (u64, f32) {
    let samples = reports
        .iter()
        .fold(0u64, |total, (_, r)| total.saturating_add(r.stats.samples));
    let loss = reports
        .iter()
        .map(|(_, r)| r.stats.mean_loss as f64 * r.stats.samples as f64)
        .sum::<f64>()
        / samples.max(1) as f64;
    (samples, loss as f32)
}
