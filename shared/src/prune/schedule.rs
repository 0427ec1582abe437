//! When a client prunes during its local tuning, and how much: the cubic schedule of gradual
//! pruning (Zhu & Gupta 2017, "To prune, or not to prune"; used by FedSpine and LoRAPrune).
//!
//! Pruning step `k` of `n` takes the model to `R · (1 − (1 − k/n)³)` of its prunable
//! parameters removed: large steps early, while the model has redundancy to spare and tuning
//! time left to recover, small ones near the target `R`, which step `n` reaches exactly.

use serde::{Deserialize, Serialize};

/// Local iterations between pruning steps by default (FedSpine's `P`).
pub const DEFAULT_PRUNE_EVERY: usize = 20;

/// The fraction of prunable parameters removed after pruning step `step` of `steps` toward
/// `target` (`step` clamped to `0..=steps`; `steps = 0` means the target at once).
pub fn cubic_ratio(target: f64, step: usize, steps: usize) -> f64 {
    if steps == 0 {
        return target;
    }
    let progress = step.min(steps) as f64 / steps as f64;
    target * (1.0 - (1.0 - progress).powi(3))
}

/// The local iterations after which a pruning step happens, for a round of `local_steps`
/// iterations pruning every `every` (`P`): `P, 2P, …` below `local_steps`, so that tuning
/// follows the last step. A round shorter than `P + 1` iterations prunes once, halfway (after
/// at least one iteration, whose gradients score the units).
pub fn pruning_points(local_steps: usize, every: usize) -> Vec<usize> {
    let every = every.max(1);
    let points: Vec<usize> = (1..)
        .map(|k| k * every)
        .take_while(|&t| t < local_steps)
        .collect();
    if points.is_empty() {
        vec![(local_steps / 2).max(1)]
    } else {
        points
    }
}

/// How a client prunes while it tunes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PruneSchedule {
    /// The fraction of prunable parameters gone at the end of the round (`R`, from the server).
    pub target: f64,
    /// Iterations between pruning steps (`P`).
    pub every: usize,
    /// Leading decoder layers never pruned.
    pub protect_first: usize,
    /// Never prune the last decoder layer.
    pub protect_last: bool,
    /// How units are scored.
    pub importance: ImportanceKind,
}

impl Default for PruneSchedule {
    fn default() -> Self {
        Self {
            target: 0.0,
            every: DEFAULT_PRUNE_EVERY,
            protect_first: 1,
            protect_last: true,
            importance: ImportanceKind::LoraGradient,
        }
    }
}

/// The importance score pruning during tuning ranks units by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceKind {
    /// LoRAPrune's gradient-based score ([`super::lora_importance`]), smoothed over the steps.
    #[default]
    LoraGradient,
    /// FLAP's fluctuation metric on the client's own data ([`super::flap`]), forward only, with
    /// bias compensation: for when gradients are not available.
    Flap,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cubic_schedule_front_loads_and_ends_at_the_target() {
        assert_eq!(cubic_ratio(0.5, 0, 4), 0.0);
        assert_eq!(cubic_ratio(0.5, 4, 4), 0.5);
        // Step 1 of 4: 1 - (3/4)^3 = 37/64 of the target.
        assert!((cubic_ratio(0.5, 1, 4) - 0.5 * 37.0 / 64.0).abs() < 1e-12);
        let steps: Vec<f64> = (0..=4).map(|k| cubic_ratio(0.3, k, 4)).collect();
        let gains: Vec<f64> = steps.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gains.windows(2).all(|g| g[0] > g[1]), "{gains:?}");
        assert_eq!(cubic_ratio(0.2, 0, 0), 0.2);
    }

    #[test]
    fn points_every_p_iterations_before_the_end() {
        assert_eq!(pruning_points(100, 20), vec![20, 40, 60, 80]);
        assert_eq!(pruning_points(41, 20), vec![20, 40]);
        assert_eq!(pruning_points(10, 20), vec![5]);
        assert_eq!(pruning_points(1, 20), vec![1]);
    }
}
