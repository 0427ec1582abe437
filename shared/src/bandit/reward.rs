//! How the outcome of a device's round becomes the reward its bandit learns from.
//!
//! [`RewardModel`] is the seam; [`ThroughputReward`], the default, scores a round by the
//! progress it made per unit of the time it took:
//!
//! `reward = improvement / relative_time`, with
//! `improvement = clamp((loss_before - loss_after) / loss_before, -1, 1)` and
//! `relative_time = round_time_s / median_round_time_s`.
//!
//! Why this reward:
//!
//! - **Progress per time.** The server waits for a round's slowest participants, so a
//!   configuration is only as good as the improvement it brings for the wall time it costs on
//!   that device, end to end (download, training, upload: the device's slowest path). A large
//!   LoRA rank that improves the loss a little more but doubles a slow phone's round is worse.
//! - **Relative improvement.** The loss falls over training and differs between devices'
//!   data; the relative change is comparable across rounds and devices, where the absolute
//!   one shrinks as training goes on.
//! - **Relative time.** Dividing by the fleet's median round time makes the reward
//!   dimensionless and keeps its scale steady as the fleet, the model or the network change.
//! - **No prior knowledge.** It needs no benchmark, FLOP count or device profile: the round
//!   itself measures the device's speed, including what no profile captures (thermal
//!   throttling, battery saver, other apps).
//!
//! The clamp at `-1` (the loss doubled or worse) keeps one divergent round from outweighing
//! hundreds of good ones in the bandit's averages; a relative improvement cannot exceed `1`
//! since a loss is never negative.

use serde::{Deserialize, Serialize};

/// The lowest relative loss improvement [`ThroughputReward`] counts: a round that doubles the
/// loss or worse scores as if it had doubled it.
pub const MIN_RELATIVE_IMPROVEMENT: f64 = -1.0;

/// What the server measured about one device's round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoundObservation {
    /// The device's training loss before the round, finite and positive.
    pub loss_before: f32,
    /// The same loss after the round, finite and non-negative.
    pub loss_after: f32,
    /// Wall time from sending the round to receiving the device's report, in seconds; finite
    /// and positive.
    pub round_time_s: f64,
}

/// Turns a round's observation into a bandit reward.
pub trait RewardModel {
    /// The reward of `round`, given the median round time of the devices in the round (or a
    /// recent window of rounds).
    ///
    /// # Errors
    ///
    /// A [`RewardError`] when an input is out of range; nothing should then be fed to the
    /// bandit.
    fn reward(
        &self,
        round: &RoundObservation,
        median_round_time_s: f64,
    ) -> Result<f64, RewardError>;
}

/// Relative loss improvement per relative round time; see the [module docs](self).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThroughputReward;

impl RewardModel for ThroughputReward {
    fn reward(
        &self,
        round: &RoundObservation,
        median_round_time_s: f64,
    ) -> Result<f64, RewardError> {
        let before = f64::from(round.loss_before);
        let after = f64::from(round.loss_after);
        if !(before.is_finite() && before > 0.0) {
            return Err(RewardError::InvalidLossBefore(round.loss_before));
        }
        if !(after.is_finite() && after >= 0.0) {
            return Err(RewardError::InvalidLossAfter(round.loss_after));
        }
        check_time(round.round_time_s)?;
        if !(median_round_time_s.is_finite() && median_round_time_s > 0.0) {
            return Err(RewardError::InvalidMedianRoundTime(median_round_time_s));
        }
        let improvement = ((before - after) / before).max(MIN_RELATIVE_IMPROVEMENT);
        Ok(improvement * median_round_time_s / round.round_time_s)
    }
}

/// The median of `round_times_s` (the mean of the middle two for an even count), for the
/// `median_round_time_s` of [`RewardModel::reward`].
///
/// # Errors
///
/// [`RewardError::NoRoundTimes`] for an empty slice, [`RewardError::InvalidRoundTime`] for a
/// time that is not finite and positive.
pub fn median_round_time_s(round_times_s: &[f64]) -> Result<f64, RewardError> {
    let mut times = round_times_s.to_vec();
    for &t in &times {
        check_time(t)?;
    }
    times.sort_by(f64::total_cmp);
    let mid = times.len() / 2;
    match times.len() {
        0 => Err(RewardError::NoRoundTimes),
        n if n % 2 == 1 => Ok(times[mid]),
        _ => Ok((times[mid - 1] + times[mid]) / 2.0),
    }
}

fn check_time(round_time_s: f64) -> Result<(), RewardError> {
    if round_time_s.is_finite() && round_time_s > 0.0 {
        Ok(())
    } else {
        Err(RewardError::InvalidRoundTime(round_time_s))
    }
}

/// An observation a reward cannot be computed from.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RewardError {
    /// The loss before the round is not finite and positive (a relative change needs it).
    #[error("loss before the round is {0}, expected a finite number > 0")]
    InvalidLossBefore(f32),
    /// The loss after the round is not finite and non-negative.
    #[error("loss after the round is {0}, expected a finite number ≥ 0")]
    InvalidLossAfter(f32),
    /// A round time that is not finite and positive.
    #[error("round time is {0} s, expected a finite number > 0")]
    InvalidRoundTime(f64),
    /// A median round time that is not finite and positive.
    #[error("median round time is {0} s, expected a finite number > 0")]
    InvalidMedianRoundTime(f64),
    /// No round times to take the median of.
    #[error("no round times to take the median of")]
    NoRoundTimes,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(loss_before: f32, loss_after: f32, round_time_s: f64) -> RoundObservation {
        RoundObservation {
            loss_before,
            loss_after,
            round_time_s,
        }
    }

    fn reward(r: RoundObservation, median: f64) -> Result<f64, RewardError> {
        ThroughputReward.reward(&r, median)
    }

    #[test]
    fn progress_per_relative_time() {
        // 10 % better in half the median time: 0.1 / 0.5.
        let fast = reward(round(2.0, 1.8, 30.0), 60.0).expect("valid");
        assert!((fast - 0.2).abs() < 1e-6, "{fast}");
        // The same progress taking four times the median: a quarter of the score.
        let slow = reward(round(2.0, 1.8, 240.0), 60.0).expect("valid");
        assert!((slow - 0.025).abs() < 1e-6, "{slow}");
        // Relative, not absolute: the same fraction at a lower loss scores the same.
        let late = reward(round(0.5, 0.45, 30.0), 60.0).expect("valid");
        assert!((late - fast).abs() < 1e-6);
        // A round that made things worse scores below zero.
        assert!(reward(round(2.0, 2.2, 60.0), 60.0).expect("valid") < 0.0);
        // Perfect: loss to zero.
        assert_eq!(reward(round(2.0, 0.0, 60.0), 60.0), Ok(1.0));
    }

    #[test]
    fn divergent_round_is_clamped() {
        assert_eq!(reward(round(1.0, 1e6, 60.0), 60.0), Ok(-1.0));
        assert_eq!(reward(round(1.0, 3.0, 30.0), 60.0), Ok(-2.0));
    }

    #[test]
    fn rejects_inputs_out_of_range() {
        for before in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert!(matches!(
                reward(round(before, 1.0, 10.0), 10.0),
                Err(RewardError::InvalidLossBefore(_))
            ));
        }
        for after in [-0.1, f32::NAN, f32::INFINITY] {
            assert!(matches!(
                reward(round(1.0, after, 10.0), 10.0),
                Err(RewardError::InvalidLossAfter(_))
            ));
        }
        for time in [0.0, -3.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                reward(round(1.0, 0.9, time), 10.0),
                Err(RewardError::InvalidRoundTime(_))
            ));
            assert!(matches!(
                reward(round(1.0, 0.9, 10.0), time),
                Err(RewardError::InvalidMedianRoundTime(_))
            ));
        }
    }

    #[test]
    fn median_of_round_times() {
        assert_eq!(median_round_time_s(&[30.0, 10.0, 20.0]), Ok(20.0));
        assert_eq!(median_round_time_s(&[40.0, 10.0, 20.0, 30.0]), Ok(25.0));
        assert_eq!(median_round_time_s(&[7.0]), Ok(7.0));
        assert_eq!(median_round_time_s(&[]), Err(RewardError::NoRoundTimes));
        assert!(matches!(
            median_round_time_s(&[1.0, f64::NAN]),
            Err(RewardError::InvalidRoundTime(_))
        ));
        assert!(matches!(
            median_round_time_s(&[1.0, 0.0]),
            Err(RewardError::InvalidRoundTime(_))
        ));
    }
}
