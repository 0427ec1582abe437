//! A simulated fleet for the policies' tests: devices of fixed (or suddenly changing) speed
//! train with LoRA ranks 2, 4, 8 and 16, and report noisy losses and exact round times, which
//! [`ThroughputReward`] turns into rewards.
//!
//! A round of rank `r` on a device of slowness `s`:
//!
//! - improves the loss by the fraction `0.01 · sqrt(r)` on average (larger ranks learn more
//!   per round, with diminishing returns), plus Gaussian noise of standard deviation `0.005`:
//!   as large as the gaps between arms' rewards, so one round says little;
//! - takes `30 s + s · r³ / 100 s`: a fixed 30 s of communication, the same on every device,
//!   plus compute proportional to the slowness. Without the fixed part the slowness would
//!   cancel out of the reward and every device would have the same best rank; the cubic cost
//!   makes an 8× change in slowness move the best rank by exactly one step.
//!
//! The median round time is fixed at 60 s, so the expected reward of an arm is exactly
//! `0.01 · sqrt(r) / (time / 60 s)`, and the best arm of each device is known.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::reward::{RewardModel, RoundObservation, ThroughputReward};
use super::{Arm, BanditPolicy, DeviceBandit};

/// The arms' LoRA ranks.
pub(super) const RANKS: [usize; 4] = [2, 4, 8, 16];

/// Slowness of four devices, one per best rank: the optimum of `sqrt(r) / (30 + s r³ / 100)`
/// is at `r³ = 600 / s`, i.e. rank 16, 8, 4 and 2 exactly.
pub(super) const DEVICES: [f64; 4] = [600.0 / 4096.0, 600.0 / 512.0, 600.0 / 64.0, 600.0 / 8.0];

/// Independent runs (bandit seed and noise seed) each property is checked on.
pub(super) const SEEDS: u64 = 8;

/// Rounds a convergence run of a UCB policy plays.
pub(super) const ROUNDS: usize = 400;

/// The last rounds of a convergence run, over which the most played arm must be the best.
const FINAL_ROUNDS: usize = 100;

/// The round at which the device of [`assert_adapts`] becomes 8× slower.
const CHANGE_ROUND: usize = 300;

/// Rounds each adaptation run plays.
const ADAPT_ROUNDS: usize = 500;

/// The block of rounds in which the new best arm must be the most played to count as switched.
const SWITCH_BLOCK: usize = 20;

/// At most this many rounds after the change, the new best arm must be the most played.
pub(super) const MAX_SWITCH_LATENCY: usize = 60;

const OVERHEAD_S: f64 = 30.0;
const MEDIAN_ROUND_TIME_S: f64 = 60.0;
const IMPROVEMENT_PER_SQRT_RANK: f64 = 0.01;
const IMPROVEMENT_NOISE: f64 = 0.005;
const LOSS_BEFORE: f32 = 2.0;

/// The arms of the simulated devices: [`RANKS`], no pruning.
pub(super) fn arms() -> Vec<Arm> {
    RANKS.iter().map(|&r| Arm::lora(r)).collect()
}

fn round_time_s(rank: usize, slowness: f64) -> f64 {
    OVERHEAD_S + slowness * (rank as f64).powi(3) / 100.0
}

fn mean_improvement(rank: usize) -> f64 {
    IMPROVEMENT_PER_SQRT_RANK * (rank as f64).sqrt()
}

/// The expected reward of rank `rank` on a device of slowness `slowness`.
fn expected_reward(rank: usize, slowness: f64) -> f64 {
    mean_improvement(rank) * MEDIAN_ROUND_TIME_S / round_time_s(rank, slowness)
}

/// The arm of largest expected reward.
pub(super) fn best_arm(slowness: f64) -> usize {
    super::argmax(RANKS.iter().map(|&r| expected_reward(r, slowness))).unwrap_or(0)
}

/// The source of the rounds' loss noise.
#[derive(Clone)]
pub(super) struct Noise(ChaCha8Rng);

impl Noise {
    pub(super) fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }

    /// A standard normal value (Box–Muller).
    fn gaussian(&mut self) -> f64 {
        let u1: f64 = 1.0 - self.0.random::<f64>();
        let u2: f64 = self.0.random();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// Plays `rounds` rounds of `bandit` on a device whose slowness in round `t` (counted from
/// this call) is `slowness(t)`; returns the arms chosen.
pub(super) fn play_with(
    bandit: &mut DeviceBandit,
    noise: &mut Noise,
    slowness: impl Fn(usize) -> f64,
    rounds: usize,
) -> Vec<usize> {
    (0..rounds)
        .map(|t| {
            let arm = bandit.select();
            let rank = RANKS[arm];
            let improvement = mean_improvement(rank) + IMPROVEMENT_NOISE * noise.gaussian();
            let round = RoundObservation {
                loss_before: LOSS_BEFORE,
                loss_after: (f64::from(LOSS_BEFORE) * (1.0 - improvement)) as f32,
                round_time_s: round_time_s(rank, slowness(t)),
            };
            let reward = ThroughputReward
                .reward(&round, MEDIAN_ROUND_TIME_S)
                .expect("simulated rounds are valid");
            bandit
                .update(arm, reward)
                .expect("simulated rewards are valid");
            arm
        })
        .collect()
}

/// [`play_with`] with fresh noise seeded with `noise_seed`.
pub(super) fn play(
    bandit: &mut DeviceBandit,
    slowness: impl Fn(usize) -> f64,
    rounds: usize,
    noise_seed: u64,
) -> Vec<usize> {
    play_with(bandit, &mut Noise::new(noise_seed), slowness, rounds)
}

/// The arm chosen most often in `choices`, the lowest of equals.
pub(super) fn most_played(choices: &[usize]) -> usize {
    let mut counts = [0usize; RANKS.len()];
    for &c in choices {
        counts[c] += 1;
    }
    super::argmax(counts.iter().map(|&n| n as f64)).unwrap_or(0)
}

/// Asserts that `policy`, on every device and for every seed, plays the device's best arm most
/// over the last [`FINAL_ROUNDS`] of `rounds`, and estimates it best at the end.
pub(super) fn assert_converges(policy: BanditPolicy, rounds: usize) {
    for seed in 0..SEEDS {
        for (d, &slowness) in DEVICES.iter().enumerate() {
            let mut bandit = DeviceBandit::new(arms(), policy, seed).expect("valid bandit");
            let choices = play(&mut bandit, |_| slowness, rounds, 1000 * seed + d as u64);
            let last = &choices[rounds - FINAL_ROUNDS..];
            let best = best_arm(slowness);
            let share = last.iter().filter(|&&c| c == best).count();
            assert_eq!(
                most_played(last),
                best,
                "{policy:?}, seed {seed}, device {d}: best arm played {share}/{FINAL_ROUNDS}"
            );
            assert_eq!(
                bandit.best_arm(),
                Some(best),
                "{policy:?}, seed {seed}, device {d}"
            );
        }
    }
}

/// The fast device that becomes 8× slower at [`CHANGE_ROUND`]: best rank 16, then 8.
fn slowing_device(t: usize) -> f64 {
    if t < CHANGE_ROUND {
        DEVICES[0]
    } else {
        DEVICES[0] * 8.0
    }
}

/// The rounds after [`CHANGE_ROUND`] until the new best arm is first the most played in a block
/// of [`SWITCH_BLOCK`] rounds ([`ADAPT_ROUNDS`] `-` [`CHANGE_ROUND`] if never), and the choices.
fn adaptation_run(policy: BanditPolicy, seed: u64) -> (usize, Vec<usize>) {
    let mut bandit = DeviceBandit::new(arms(), policy, seed).expect("valid bandit");
    let choices = play(&mut bandit, slowing_device, ADAPT_ROUNDS, 7000 + seed);
    let new_best = best_arm(slowing_device(CHANGE_ROUND));
    let latency = (CHANGE_ROUND..=ADAPT_ROUNDS - SWITCH_BLOCK)
        .find(|&t| most_played(&choices[t..t + SWITCH_BLOCK]) == new_best)
        .map_or(ADAPT_ROUNDS - CHANGE_ROUND, |t| t - CHANGE_ROUND);
    (latency, choices)
}

/// How many rounds `policy` with seed `seed` takes to switch after the change.
pub(super) fn switch_latency(policy: BanditPolicy, seed: u64) -> usize {
    adaptation_run(policy, seed).0
}

/// Asserts that `policy` plays the old best arm most before the change, switches to the new
/// one within [`MAX_SWITCH_LATENCY`] rounds of it, and keeps to it afterwards.
pub(super) fn assert_adapts(policy: BanditPolicy) {
    let old_best = best_arm(slowing_device(0));
    let new_best = best_arm(slowing_device(CHANGE_ROUND));
    for seed in 0..SEEDS {
        let (latency, choices) = adaptation_run(policy, seed);
        assert_eq!(
            most_played(&choices[CHANGE_ROUND - FINAL_ROUNDS..CHANGE_ROUND]),
            old_best,
            "{policy:?}, seed {seed}: before the change"
        );
        assert!(
            latency <= MAX_SWITCH_LATENCY,
            "{policy:?}, seed {seed}: switched after {latency} rounds"
        );
        assert_eq!(
            most_played(&choices[CHANGE_ROUND + MAX_SWITCH_LATENCY..]),
            new_best,
            "{policy:?}, seed {seed}: after the change"
        );
    }
}

#[test]
fn each_device_has_a_different_best_arm_by_a_clear_margin() {
    for (d, &slowness) in DEVICES.iter().enumerate() {
        let best = best_arm(slowness);
        assert_eq!(best, RANKS.len() - 1 - d, "device {d}");
        let rewards: Vec<f64> = RANKS
            .iter()
            .map(|&r| expected_reward(r, slowness))
            .collect();
        let runner_up = rewards
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != best)
            .map(|(_, &r)| r)
            .fold(f64::NEG_INFINITY, f64::max);
        assert!(
            rewards[best] > 1.15 * runner_up,
            "device {d}: {rewards:?} too close to tell apart"
        );
    }
    assert_eq!(best_arm(slowing_device(0)), 3);
    assert_eq!(best_arm(slowing_device(CHANGE_ROUND)), 2);
}
