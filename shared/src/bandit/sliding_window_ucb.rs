//! Sliding-window UCB (Garivier & Moulines, "On Upper-Confidence Bound Policies for Switching
//! Bandit Problems", ALT 2011): UCB over the last `τ` plays only, so once a device's speed
//! changes, the old evidence is entirely gone after `τ` of its rounds.

use std::collections::VecDeque;

use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::{
    BanditError, MAX_ABS_REWARD, Moments, Policy, check_play, exact_float, upper_confidence_arm,
};

/// The default window `τ`: the same memory as discounted UCB's default (`1 / (1 - 0.98) = 50`
/// plays), for the same reasons: enough plays to average round-to-round noise, few enough to
/// follow a device that slows down.
pub const DEFAULT_WINDOW: usize = 50;

/// The default exploration weight `c`, in standard deviations of the rewards, as for
/// discounted UCB. On the simulated fleet of the tests (32 runs, `τ = 50`), `c = 1` switched
/// within 27 rounds of an 8× slow-down where `c = 0.5` took up to 65.
pub const DEFAULT_EXPLORATION: f64 = 1.0;

/// [`DEFAULT_WINDOW`], for serde defaults.
pub fn default_window() -> usize {
    DEFAULT_WINDOW
}

/// [`DEFAULT_EXPLORATION`], for serde defaults.
pub fn default_exploration() -> f64 {
    DEFAULT_EXPLORATION
}

/// Sliding-window UCB.
///
/// Over the last `τ` plays (all of them while fewer than `τ`), arm `i` has count `N_i` and
/// mean `X̄_i`, and the policy plays an arm absent from the window if there is one, otherwise
///
/// `argmax_i  X̄_i + c · σ̂ · sqrt(ln min(t, τ) / N_i)`
///
/// with `t` the number of plays so far and `σ̂` the standard deviation of the rewards in the
/// window (the paper's `2B sqrt(ξ)` assumes rewards in `[0, B]`; ours have no known bound, so
/// their spread sets the scale). Compared with discounting, the memory is a hard edge: every
/// arm is replayed at least once per `τ` plays, and evidence from before a change is gone
/// exactly `τ` plays later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlidingWindowUcb {
    arm_count: usize,
    window: usize,
    #[serde(with = "exact_float")]
    exploration: f64,
    /// The last `window` plays, oldest first.
    plays: VecDeque<Play>,
}

/// One remembered play.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Play {
    arm: usize,
    #[serde(with = "exact_float")]
    reward: f64,
}

impl SlidingWindowUcb {
    /// A policy over `arms` arms remembering the last `window` plays, with exploration weight
    /// `c = exploration`.
    ///
    /// # Errors
    ///
    /// [`BanditError::WindowTooSmall`] when `window < arms`, [`BanditError::InvalidParameter`]
    /// unless `exploration` is finite and non-negative.
    pub fn new(arms: usize, window: usize, exploration: f64) -> Result<Self, BanditError> {
        check_parameters(arms, window, exploration)?;
        Ok(Self {
            arm_count: arms,
            window,
            exploration,
            plays: VecDeque::with_capacity(window),
        })
    }

    /// The statistics of each arm over the window.
    fn moments(&self) -> Vec<Moments> {
        let mut arms = vec![Moments::default(); self.arm_count];
        for play in &self.plays {
            if let Some(m) = arms.get_mut(play.arm) {
                m.add(play.reward);
            }
        }
        arms
    }

    /// Checks a restored policy.
    pub(super) fn check(&self) -> Result<(), BanditError> {
        check_parameters(self.arm_count, self.window, self.exploration)?;
        if self.plays.len() > self.window {
            return Err(BanditError::CorruptState(
                "more plays than the window holds",
            ));
        }
        let valid = |p: &Play| {
            p.arm < self.arm_count && p.reward.is_finite() && p.reward.abs() <= MAX_ABS_REWARD
        };
        if !self.plays.iter().all(valid) {
            return Err(BanditError::CorruptState(
                "remembered play with a bad arm or reward",
            ));
        }
        Ok(())
    }
}

fn check_parameters(arms: usize, window: usize, exploration: f64) -> Result<(), BanditError> {
    if window < arms {
        return Err(BanditError::WindowTooSmall { window, arms });
    }
    if !(exploration.is_finite() && exploration >= 0.0) {
        return Err(BanditError::InvalidParameter {
            name: "exploration",
            value: exploration,
            expected: "a finite number ≥ 0",
        });
    }
    Ok(())
}

impl Policy for SlidingWindowUcb {
    fn arm_count(&self) -> usize {
        self.arm_count
    }

    fn select(&self, _rng: &mut dyn RngCore) -> usize {
        // `ln n` of the shared formula is `ln min(t, τ)` here: the window holds `min(t, τ)`
        // plays, each of weight 1.
        upper_confidence_arm(&self.moments(), self.exploration)
    }

    fn update(&mut self, arm: usize, reward: f64) -> Result<(), BanditError> {
        check_play(arm, self.arm_count, reward)?;
        if self.plays.len() == self.window {
            self.plays.pop_front();
        }
        self.plays.push_back(Play { arm, reward });
        Ok(())
    }

    fn best_arm(&self) -> Option<usize> {
        let arms = self.moments();
        let means = arms.iter().map(|m| {
            if m.weight > 0.0 {
                m.mean()
            } else {
                f64::NEG_INFINITY
            }
        });
        super::argmax(means).filter(|&i| arms[i].weight > 0.0)
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::super::BanditPolicy;
    use super::super::simulation;
    use super::*;

    #[test]
    fn converges_to_each_devices_best_arm() {
        simulation::assert_converges(BanditPolicy::sliding_window_ucb(), simulation::ROUNDS);
    }

    #[test]
    fn adapts_when_a_device_slows_down() {
        simulation::assert_adapts(BanditPolicy::sliding_window_ucb());
    }

    #[test]
    fn forgets_plays_older_than_the_window() {
        let mut p = SlidingWindowUcb::new(2, 3, 1.0).expect("valid");
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        p.update(0, 5.0).expect("valid");
        for _ in 0..2 {
            p.update(1, 1.0).expect("valid");
        }
        assert_eq!(p.best_arm(), Some(0));
        // A third play of arm 1 pushes arm 0 out of the window: it is then replayed first.
        p.update(1, 1.0).expect("valid");
        assert_eq!(p.plays.len(), 3);
        assert_eq!(p.best_arm(), Some(1));
        assert_eq!(p.select(&mut rng), 0);
    }
}
