//! Discounted UCB (Garivier & Moulines, "On Upper-Confidence Bound Policies for Switching
//! Bandit Problems", ALT 2011): UCB over statistics in which a reward `a` plays old weighs
//! `γ^a`, so the estimates follow a device whose speed changes. The default policy.

use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::{BanditError, Moments, Policy, check_play, exact_float, upper_confidence_arm};

/// The default discount `γ`: statistics remember about `1 / (1 - γ) = 50` plays. Long enough
/// to average the noise of single rounds (the simulated fleet in the tests has reward noise
/// as large as the gaps between arms), short enough to follow a device that slows down for
/// good within a few dozen of its rounds.
pub const DEFAULT_DISCOUNT: f64 = 0.98;

/// The default exploration weight `c`: the bonus `c · σ̂ · sqrt(ln n / N_i)` counts in standard
/// deviations of the rewards, and one is the natural unit. On the simulated fleet of the tests
/// (32 runs per setting, `γ = 0.98`), `c = 1` gave the best arm 88 % of the last 100 of 400
/// rounds and switched within 51 rounds of an 8× slow-down; `c = 0.5` gave 95 % and 39 rounds
/// but misjudged the best arm once; `c = 2` gave 72 % and 21 rounds. Real rewards have heavier
/// tails than the simulation's, which argues for the middle.
pub const DEFAULT_EXPLORATION: f64 = 1.0;

/// [`DEFAULT_DISCOUNT`], for serde defaults.
pub fn default_discount() -> f64 {
    DEFAULT_DISCOUNT
}

/// [`DEFAULT_EXPLORATION`], for serde defaults.
pub fn default_exploration() -> f64 {
    DEFAULT_EXPLORATION
}

/// Discounted UCB.
///
/// After plays `I_1 … I_t` with rewards `X_1 … X_t`, arm `i` has
///
/// - discounted count `N_i = Σ_s γ^(t-s) 1{I_s = i}`,
/// - discounted mean `X̄_i = Σ_s γ^(t-s) X_s 1{I_s = i} / N_i`,
///
/// and the policy plays
///
/// `argmax_i  X̄_i + c · σ̂ · sqrt(ln n / N_i)`,  `n = Σ_i N_i`,
///
/// where `σ̂` is the discounted standard deviation of all rewards (the paper's `2B sqrt(ξ)`
/// assumes rewards in `[0, B]`; ours have no known bound, so their spread sets the scale).
/// An arm left unplayed sees `N_i` shrink geometrically and its bonus grow until it is tried
/// again, which is how the policy notices that an arm has become better.
///
/// Age counts this device's plays, not the server's rounds: rounds the device sits out tell
/// nothing about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiscountedUcb {
    #[serde(with = "exact_float")]
    discount: f64,
    #[serde(with = "exact_float")]
    exploration: f64,
    /// Discounted statistics per arm.
    arms: Vec<Moments>,
}

impl DiscountedUcb {
    /// A policy over `arms` arms with discount `γ = discount` and exploration weight
    /// `c = exploration`.
    ///
    /// # Errors
    ///
    /// [`BanditError::InvalidParameter`] unless `discount` lies in `(0, 1]` and
    /// `exploration` is finite and non-negative.
    pub fn new(arms: usize, discount: f64, exploration: f64) -> Result<Self, BanditError> {
        check_parameters(discount, exploration)?;
        Ok(Self {
            discount,
            exploration,
            arms: vec![Moments::default(); arms],
        })
    }

    /// Checks a restored policy.
    pub(super) fn check(&self) -> Result<(), BanditError> {
        check_parameters(self.discount, self.exploration)?;
        if !self.arms.iter().all(Moments::is_valid) {
            return Err(BanditError::CorruptState(
                "discounted statistics negative or not finite",
            ));
        }
        Ok(())
    }
}

fn check_parameters(discount: f64, exploration: f64) -> Result<(), BanditError> {
    if !(discount > 0.0 && discount <= 1.0) {
        return Err(BanditError::InvalidParameter {
            name: "discount",
            value: discount,
            expected: "a number in (0, 1]",
        });
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

impl Policy for DiscountedUcb {
    fn arm_count(&self) -> usize {
        self.arms.len()
    }

    fn select(&self, _rng: &mut dyn RngCore) -> usize {
        upper_confidence_arm(&self.arms, self.exploration)
    }

    fn update(&mut self, arm: usize, reward: f64) -> Result<(), BanditError> {
        check_play(arm, self.arms.len(), reward)?;
        for m in &mut self.arms {
            m.scale(self.discount);
        }
        self.arms[arm].add(reward);
        Ok(())
    }

    fn best_arm(&self) -> Option<usize> {
        let means = self.arms.iter().map(|m| {
            if m.weight > 0.0 {
                m.mean()
            } else {
                f64::NEG_INFINITY
            }
        });
        super::argmax(means).filter(|&i| self.arms[i].weight > 0.0)
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::super::simulation;
    use super::super::{BanditPolicy, DeviceBandit};
    use super::*;

    #[test]
    fn converges_to_each_devices_best_arm() {
        simulation::assert_converges(BanditPolicy::discounted_ucb(), simulation::ROUNDS);
    }

    #[test]
    fn adapts_when_a_device_slows_down() {
        simulation::assert_adapts(BanditPolicy::discounted_ucb());
    }

    #[test]
    fn without_discount_it_adapts_far_later() {
        // γ = 1 is plain UCB: 300 rounds of history outweigh the new evidence for a long time,
        // which is what the discount is for.
        let undiscounted = BanditPolicy::DiscountedUcb {
            discount: 1.0,
            exploration: DEFAULT_EXPLORATION,
        };
        for seed in 0..simulation::SEEDS {
            let latency = simulation::switch_latency(undiscounted, seed);
            assert!(
                latency > simulation::MAX_SWITCH_LATENCY,
                "seed {seed}: undiscounted UCB switched after {latency} rounds"
            );
        }
    }

    #[test]
    fn old_rewards_fade_geometrically() {
        let mut p = DiscountedUcb::new(2, 0.5, 1.0).expect("valid");
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        p.update(0, 0.0).expect("valid");
        p.update(1, 0.9).expect("valid");
        p.update(1, 1.1).expect("valid");
        // Arm 0's single play is two plays old: weight 1/4; arm 1 has 1/2 + 1.
        assert_eq!(p.arms[0].weight, 0.25);
        assert_eq!(p.arms[1].weight, 1.5);
        assert_eq!(p.best_arm(), Some(1));
        assert_eq!(p.select(&mut rng), 1);
        // The bonus of an arm left unplayed grows like γ^(-a/2) until it is tried again.
        for i in 0..8 {
            p.update(1, if i % 2 == 0 { 0.9 } else { 1.1 })
                .expect("valid");
        }
        assert_eq!(p.arms[0].weight, 0.5f64.powi(10));
        assert_eq!(p.best_arm(), Some(1));
        assert_eq!(p.select(&mut rng), 0);
    }

    #[test]
    fn device_bandit_uses_it_by_default() {
        let b = DeviceBandit::new(simulation::arms(), BanditPolicy::default(), 0).expect("valid");
        let json = serde_json::to_value(&b).expect("serialises");
        assert!(json["policy"]["discounted_ucb"].is_object());
    }
}
