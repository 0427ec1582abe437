//! A multi-armed bandit per device that picks the configuration ("arm") a device trains with
//! next, learned from the rewards of its past rounds.
//!
//! Devices differ in speed by orders of magnitude, so the LoRA rank (and, later, the structured
//! pruning ratio) that makes the most progress per unit of time differs between devices, and it
//! drifts as a phone heats up, switches to battery saver or shares its cores with other apps.
//! Nobody can tell in advance, so each device gets its own bandit that learns it from rounds.
//! Pure logic: no I/O, no clock, no tensors.
//!
//! Each round the server calls [`DeviceBandit::select`] and sends the chosen [`Arm`] to the
//! device; when the device reports, [`reward::RewardModel::reward`] turns the report into a
//! reward and [`DeviceBandit::update`] records it. A device that drops out simply gets no
//! update: selecting does not change what the bandit has learned.
//!
//! - [`DeviceBandit`]: one device's arms, policy state and random generator, serialisable so
//!   that a restarted server continues exactly where it stopped;
//! - [`BanditPolicy`]: which policy, with what parameters; [`Policy`]: what a policy does;
//! - [`discounted_ucb`] (the default), [`sliding_window_ucb`], [`exp3`]: the policies;
//! - [`reward`]: how a round's outcome becomes a reward.

pub mod discounted_ucb;
pub mod exp3;
pub mod reward;
pub mod sliding_window_ucb;

mod exact_float;
#[cfg(test)]
mod simulation;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use self::discounted_ucb::DiscountedUcb;
use self::exp3::Exp3;
use self::reward::RewardError;
use self::sliding_window_ucb::SlidingWindowUcb;

/// The largest reward magnitude a bandit accepts. Far beyond anything
/// [`reward::ThroughputReward`] produces (its relative improvement lies in `[-1, 1]`, divided
/// by a speed ratio), while sums of squared rewards stay far from `f64` overflow.
pub const MAX_ABS_REWARD: f64 = 1e12;

/// The ChaCha8 stream of a bandit's generator: "bandit" in ASCII. A stream of its own keeps the
/// bandit's draws independent of a `SeedPool` or of noise keyed with the same 64-bit seed
/// (those use stream 0 and the tensor index).
const RNG_STREAM: u64 = u64::from_le_bytes(*b"bandit\0\0");

/// ChaCha's word position is a 68-bit number (64-bit block counter, 16 words per block).
const RNG_WORD_POS_LIMIT: u128 = 1 << 68;

/// One configuration a device can train with.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Arm {
    /// The LoRA rank of the adapters the device trains.
    pub lora_rank: usize,
    /// The fraction of structured units (heads, channels) pruned away before training: `0.0`
    /// keeps the whole model. Missing in a serialised arm means `0.0`.
    #[serde(default)]
    pub pruning_ratio: f32,
}

impl Arm {
    /// An arm with LoRA rank `lora_rank` and no pruning.
    pub fn lora(lora_rank: usize) -> Self {
        Self {
            lora_rank,
            pruning_ratio: 0.0,
        }
    }
}

/// Which policy a bandit follows, with its parameters. Missing parameters in a serialised
/// policy take the documented defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BanditPolicy {
    /// Discounted UCB: see [`DiscountedUcb`]. The default.
    DiscountedUcb {
        /// `γ` in `(0, 1]`: a reward `a` plays old weighs `γ^a`; `1` never forgets.
        /// Default [`discounted_ucb::DEFAULT_DISCOUNT`].
        #[serde(default = "discounted_ucb::default_discount")]
        discount: f64,
        /// `c ≥ 0`, the weight of the exploration bonus. Default
        /// [`discounted_ucb::DEFAULT_EXPLORATION`].
        #[serde(default = "discounted_ucb::default_exploration")]
        exploration: f64,
    },
    /// Sliding-window UCB: see [`SlidingWindowUcb`].
    SlidingWindowUcb {
        /// `τ`, the number of most recent plays remembered, at least the number of arms.
        /// Default [`sliding_window_ucb::DEFAULT_WINDOW`].
        #[serde(default = "sliding_window_ucb::default_window")]
        window: usize,
        /// `c ≥ 0`, the weight of the exploration bonus. Default
        /// [`sliding_window_ucb::DEFAULT_EXPLORATION`].
        #[serde(default = "sliding_window_ucb::default_exploration")]
        exploration: f64,
    },
    /// EXP3: see [`Exp3`].
    Exp3 {
        /// `γ` in `(0, 1]`, the probability mass spread uniformly over all arms. Default
        /// [`exp3::DEFAULT_EXPLORATION`].
        #[serde(default = "exp3::default_exploration")]
        exploration: f64,
        /// `η > 0`, how strongly estimated gains sharpen the distribution. Default
        /// [`exp3::DEFAULT_LEARNING_RATE`].
        #[serde(default = "exp3::default_learning_rate")]
        learning_rate: f64,
    },
}

impl BanditPolicy {
    /// Discounted UCB with its default parameters.
    pub fn discounted_ucb() -> Self {
        Self::DiscountedUcb {
            discount: discounted_ucb::DEFAULT_DISCOUNT,
            exploration: discounted_ucb::DEFAULT_EXPLORATION,
        }
    }

    /// Sliding-window UCB with its default parameters.
    pub fn sliding_window_ucb() -> Self {
        Self::SlidingWindowUcb {
            window: sliding_window_ucb::DEFAULT_WINDOW,
            exploration: sliding_window_ucb::DEFAULT_EXPLORATION,
        }
    }

    /// EXP3 with its default parameters.
    pub fn exp3() -> Self {
        Self::Exp3 {
            exploration: exp3::DEFAULT_EXPLORATION,
            learning_rate: exp3::DEFAULT_LEARNING_RATE,
        }
    }
}

impl Default for BanditPolicy {
    /// [`BanditPolicy::discounted_ucb`]: it adapts to devices whose speed changes, and needs
    /// no bound on rewards.
    fn default() -> Self {
        Self::discounted_ucb()
    }
}

/// A bandit policy: the statistics it keeps per arm, how it picks an arm from them, and how a
/// reward changes them. [`DeviceBandit`] plays every arm once, in order, before it asks the
/// policy.
pub trait Policy {
    /// The number of arms.
    fn arm_count(&self) -> usize;

    /// The arm to play next. Leaves the statistics unchanged, so that asking again for a
    /// device that dropped out before reporting gives an arm from the same state; randomised
    /// policies draw from `rng`.
    fn select(&self, rng: &mut dyn RngCore) -> usize;

    /// Records `reward` for one play of `arm`.
    ///
    /// # Errors
    ///
    /// [`BanditError::ArmOutOfRange`] and [`BanditError::InvalidReward`]; the statistics are
    /// then unchanged.
    fn update(&mut self, arm: usize, reward: f64) -> Result<(), BanditError>;

    /// The arm the policy currently believes best, `None` before its first reward.
    fn best_arm(&self) -> Option<usize>;
}

/// What can go wrong building, feeding or restoring a bandit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum BanditError {
    /// A bandit needs at least one arm.
    #[error("a bandit needs at least one arm")]
    NoArms,
    /// LoRA ranks start at 1.
    #[error("arm {index}: lora rank must be at least 1")]
    ZeroLoraRank {
        /// The arm's index.
        index: usize,
    },
    /// A pruning ratio outside `[0, 1)`.
    #[error("arm {index}: pruning ratio {ratio} outside [0, 1)")]
    InvalidPruningRatio {
        /// The arm's index.
        index: usize,
        /// The ratio.
        ratio: f32,
    },
    /// Two arms are the same configuration, which would split its plays between them.
    #[error("arms {first} and {second} are the same configuration")]
    DuplicateArm {
        /// The first arm's index.
        first: usize,
        /// The second arm's index.
        second: usize,
    },
    /// A policy parameter out of its range.
    #[error("{name} is {value}, expected {expected}")]
    InvalidParameter {
        /// The parameter.
        name: &'static str,
        /// Its value.
        value: f64,
        /// Its valid range.
        expected: &'static str,
    },
    /// A sliding window shorter than the number of arms could never hold every arm at once.
    #[error("window of {window} plays is shorter than the {arms} arms")]
    WindowTooSmall {
        /// The window.
        window: usize,
        /// The number of arms.
        arms: usize,
    },
    /// An arm index the bandit does not have.
    #[error("arm {arm} out of range: the bandit has {arms} arms")]
    ArmOutOfRange {
        /// The index given.
        arm: usize,
        /// The number of arms.
        arms: usize,
    },
    /// A reward that is not finite or exceeds [`MAX_ABS_REWARD`].
    #[error("reward {0} is not a finite number within ±{max:e}", max = MAX_ABS_REWARD)]
    InvalidReward(f64),
    /// A restored bandit whose parts do not fit together.
    #[error("saved bandit state is inconsistent: {0}")]
    CorruptState(&'static str),
    /// A round's observation could not be turned into a reward.
    #[error(transparent)]
    Reward(#[from] RewardError),
}

/// A multi-armed bandit for one device: its arms, its policy's statistics and its random
/// generator.
///
/// Deterministic given its seed: the same seed and the same rewards give the same choices (on
/// one platform: the UCB and EXP3 formulas use the platform's `ln`, `sqrt` and `exp`, whose
/// last bit may differ elsewhere, so a restored state should stay on the same kind of server).
/// Serialising and restoring it (any serde format; floats keep their exact bits, see
/// `exact_float`) continues the same sequence, so a restarted server picks up where it was.
/// Restoring checks that the parts fit together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "UncheckedBandit")]
pub struct DeviceBandit {
    arms: Vec<Arm>,
    /// Rewards recorded per arm.
    plays: Vec<u64>,
    policy: PolicyState,
    rng: BanditRng,
}

impl DeviceBandit {
    /// A bandit over `arms`, following `policy`, drawing from a generator seeded with `seed`.
    ///
    /// # Errors
    ///
    /// [`BanditError::NoArms`], an invalid or duplicate arm, or a policy parameter out of
    /// range.
    pub fn new(arms: Vec<Arm>, policy: BanditPolicy, seed: u64) -> Result<Self, BanditError> {
        check_arms(&arms)?;
        let k = arms.len();
        let policy = match policy {
            BanditPolicy::DiscountedUcb {
                discount,
                exploration,
            } => PolicyState::DiscountedUcb(DiscountedUcb::new(k, discount, exploration)?),
            BanditPolicy::SlidingWindowUcb {
                window,
                exploration,
            } => PolicyState::SlidingWindowUcb(SlidingWindowUcb::new(k, window, exploration)?),
            BanditPolicy::Exp3 {
                exploration,
                learning_rate,
            } => PolicyState::Exp3(Exp3::new(k, exploration, learning_rate)?),
        };
        Ok(Self {
            plays: vec![0; k],
            arms,
            policy,
            rng: BanditRng::new(seed, 0),
        })
    }

    /// The arms, in index order.
    pub fn arms(&self) -> &[Arm] {
        &self.arms
    }

    /// How many rewards each arm has received.
    pub fn plays(&self) -> &[u64] {
        &self.plays
    }

    /// The seed of the bandit's generator.
    pub fn seed(&self) -> u64 {
        self.rng.seed
    }

    /// The index of the arm the device should train with next: the first arm without a
    /// reward yet (every arm is tried once, in order), then the policy's choice.
    pub fn select(&mut self) -> usize {
        match self.plays.iter().position(|&n| n == 0) {
            Some(untried) => untried,
            None => self.policy.as_policy().select(&mut self.rng.rng),
        }
    }

    /// Records the `reward` of one round played with arm `arm`.
    ///
    /// # Errors
    ///
    /// [`BanditError::ArmOutOfRange`], or [`BanditError::InvalidReward`] for a reward that is
    /// not finite or exceeds [`MAX_ABS_REWARD`]; the bandit is then unchanged.
    pub fn update(&mut self, arm: usize, reward: f64) -> Result<(), BanditError> {
        self.policy.as_policy_mut().update(arm, reward)?;
        // `update` succeeded, so `arm` is in range.
        if let Some(n) = self.plays.get_mut(arm) {
            *n = n.saturating_add(1);
        }
        Ok(())
    }

    /// The arm currently estimated best, `None` before the first reward.
    pub fn best_arm(&self) -> Option<usize> {
        self.policy.as_policy().best_arm()
    }
}

/// A deserialised bandit before its parts are checked against each other.
#[derive(Deserialize)]
struct UncheckedBandit {
    arms: Vec<Arm>,
    plays: Vec<u64>,
    policy: PolicyState,
    rng: BanditRng,
}

impl TryFrom<UncheckedBandit> for DeviceBandit {
    type Error = BanditError;

    fn try_from(state: UncheckedBandit) -> Result<Self, BanditError> {
        check_arms(&state.arms)?;
        if state.plays.len() != state.arms.len() {
            return Err(BanditError::CorruptState("one play count per arm"));
        }
        let policy = state.policy.as_policy();
        if policy.arm_count() != state.arms.len() {
            return Err(BanditError::CorruptState("policy and arms disagree"));
        }
        state.policy.check()?;
        Ok(Self {
            arms: state.arms,
            plays: state.plays,
            policy: state.policy,
            rng: state.rng,
        })
    }
}

/// Checks that `arms` is non-empty and every arm valid and distinct.
fn check_arms(arms: &[Arm]) -> Result<(), BanditError> {
    if arms.is_empty() {
        return Err(BanditError::NoArms);
    }
    for (index, arm) in arms.iter().enumerate() {
        if arm.lora_rank == 0 {
            return Err(BanditError::ZeroLoraRank { index });
        }
        if !(0.0..1.0).contains(&arm.pruning_ratio) {
            return Err(BanditError::InvalidPruningRatio {
                index,
                ratio: arm.pruning_ratio,
            });
        }
        if let Some(first) = arms[..index].iter().position(|a| a == arm) {
            return Err(BanditError::DuplicateArm {
                first,
                second: index,
            });
        }
    }
    Ok(())
}

/// Checks a play before a policy records it.
fn check_play(arm: usize, arm_count: usize, reward: f64) -> Result<(), BanditError> {
    if arm >= arm_count {
        return Err(BanditError::ArmOutOfRange {
            arm,
            arms: arm_count,
        });
    }
    if !reward.is_finite() || reward.abs() > MAX_ABS_REWARD {
        return Err(BanditError::InvalidReward(reward));
    }
    Ok(())
}

/// The policy of a bandit with its statistics: one variant per [`BanditPolicy`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum PolicyState {
    DiscountedUcb(DiscountedUcb),
    SlidingWindowUcb(SlidingWindowUcb),
    Exp3(Exp3),
}

impl PolicyState {
    fn as_policy(&self) -> &dyn Policy {
        match self {
            Self::DiscountedUcb(p) => p,
            Self::SlidingWindowUcb(p) => p,
            Self::Exp3(p) => p,
        }
    }

    fn as_policy_mut(&mut self) -> &mut dyn Policy {
        match self {
            Self::DiscountedUcb(p) => p,
            Self::SlidingWindowUcb(p) => p,
            Self::Exp3(p) => p,
        }
    }

    /// Checks a restored policy's parameters and statistics.
    fn check(&self) -> Result<(), BanditError> {
        match self {
            Self::DiscountedUcb(p) => p.check(),
            Self::SlidingWindowUcb(p) => p.check(),
            Self::Exp3(p) => p.check(),
        }
    }
}

/// The bandit's ChaCha8 generator, serialised as its seed and word position (two numbers
/// rather than the generator's internal buffer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RngState", into = "RngState")]
struct BanditRng {
    seed: u64,
    rng: ChaCha8Rng,
}

impl BanditRng {
    /// Keyed like `zo::seed_pool::SeedPool`: `seed` little-endian, zero-padded to 32 bytes;
    /// stream [`RNG_STREAM`], positioned `word_pos` words in.
    fn new(seed: u64, word_pos: u128) -> Self {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        let mut rng = ChaCha8Rng::from_seed(key);
        rng.set_stream(RNG_STREAM);
        rng.set_word_pos(word_pos);
        Self { seed, rng }
    }
}

#[derive(Serialize, Deserialize)]
struct RngState {
    seed: u64,
    /// 32-bit words drawn so far.
    word_pos: u128,
}

impl TryFrom<RngState> for BanditRng {
    type Error = BanditError;

    fn try_from(state: RngState) -> Result<Self, BanditError> {
        if state.word_pos >= RNG_WORD_POS_LIMIT {
            return Err(BanditError::CorruptState("generator position beyond 2^68"));
        }
        Ok(Self::new(state.seed, state.word_pos))
    }
}

impl From<BanditRng> for RngState {
    fn from(rng: BanditRng) -> Self {
        Self {
            seed: rng.seed,
            word_pos: rng.rng.get_word_pos(),
        }
    }
}

/// Reward statistics of one arm, or of all arms pooled: total weight (a play count, or a
/// discounted one), weighted sum of rewards and weighted sum of squared rewards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct Moments {
    #[serde(with = "exact_float")]
    weight: f64,
    #[serde(with = "exact_float")]
    sum: f64,
    #[serde(with = "exact_float")]
    squares: f64,
}

impl Moments {
    fn add(&mut self, reward: f64) {
        self.weight += 1.0;
        self.sum += reward;
        self.squares += reward * reward;
    }

    fn scale(&mut self, factor: f64) {
        self.weight *= factor;
        self.sum *= factor;
        self.squares *= factor;
    }

    fn plus(self, other: &Self) -> Self {
        Self {
            weight: self.weight + other.weight,
            sum: self.sum + other.sum,
            squares: self.squares + other.squares,
        }
    }

    /// The weighted mean; only meaningful when `weight > 0`.
    fn mean(&self) -> f64 {
        self.sum / self.weight
    }

    /// The weighted standard deviation; 0 without weight.
    fn std_dev(&self) -> f64 {
        if self.weight <= 0.0 {
            return 0.0;
        }
        let mean = self.mean();
        // Rounding can leave the difference slightly negative when all rewards are equal.
        (self.squares / self.weight - mean * mean).max(0.0).sqrt()
    }

    fn is_valid(&self) -> bool {
        self.weight.is_finite()
            && self.sum.is_finite()
            && self.squares.is_finite()
            && self.weight >= 0.0
            && self.squares >= 0.0
    }
}

/// The UCB choice shared by both UCB policies: an arm without weight first (its index is
/// unbounded), otherwise
///
/// `argmax_i  X̄_i + c · σ̂ · sqrt(ln n / N_i)`
///
/// with `N_i` arm `i`'s weight, `X̄_i` its mean, `n = Σ N_i` and `σ̂` the standard deviation of
/// all remembered rewards. Garivier & Moulines write the bonus `2B · sqrt(ξ ln n / N_i)` for
/// rewards in `[0, B]`; our rewards have no known bound, so `σ̂` measures their scale instead
/// and `c` takes the place of `2 sqrt(ξ)`. Ties go to the lowest index.
fn upper_confidence_arm(arms: &[Moments], exploration: f64) -> usize {
    if let Some(empty) = arms.iter().position(|m| m.weight <= 0.0) {
        return empty;
    }
    let pooled = arms.iter().fold(Moments::default(), |acc, m| acc.plus(m));
    let log_total = pooled.weight.ln().max(0.0);
    let bonus_scale = exploration * pooled.std_dev();
    argmax(
        arms.iter()
            .map(|m| m.mean() + bonus_scale * (log_total / m.weight).sqrt()),
    )
    .unwrap_or(0)
}

/// The index of the largest value, the first of equal ones, NaN counting as no value; `None`
/// when there is none.
fn argmax(values: impl Iterator<Item = f64>) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, v) in values.enumerate() {
        if !v.is_nan() && best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::simulation::{self, DEVICES};
    use super::*;

    fn policies() -> [BanditPolicy; 3] {
        [
            BanditPolicy::discounted_ucb(),
            BanditPolicy::sliding_window_ucb(),
            BanditPolicy::exp3(),
        ]
    }

    fn bandit(policy: BanditPolicy, seed: u64) -> DeviceBandit {
        DeviceBandit::new(simulation::arms(), policy, seed).expect("valid bandit")
    }

    #[test]
    fn every_arm_is_tried_once_in_order_first() {
        for policy in policies() {
            let mut b = bandit(policy, 1);
            assert_eq!(b.best_arm(), None);
            for expected in 0..4 {
                let arm = b.select();
                assert_eq!(arm, expected, "{policy:?}");
                // Selecting again without a reward (the device dropped out) repeats the arm.
                assert_eq!(b.select(), expected, "{policy:?}");
                b.update(arm, 0.1 * expected as f64).expect("valid update");
            }
            assert_eq!(b.plays(), &[1, 1, 1, 1]);
            assert_eq!(b.best_arm(), Some(3), "{policy:?}");
        }
    }

    #[test]
    fn same_seed_same_choices() {
        for policy in policies() {
            let run = |seed| {
                let mut b = bandit(policy, seed);
                simulation::play(&mut b, |_| DEVICES[1], 200, 7)
            };
            assert_eq!(run(3), run(3), "{policy:?}");
        }
        // EXP3 draws from the generator, so its seed matters too.
        let exp3 = |seed| {
            let mut b = bandit(BanditPolicy::exp3(), seed);
            simulation::play(&mut b, |_| DEVICES[1], 200, 7)
        };
        assert_ne!(exp3(3), exp3(4));
    }

    #[test]
    fn restored_bandit_continues_identically() {
        for policy in policies() {
            let mut original = bandit(policy, 11);
            let mut noise = simulation::Noise::new(5);
            let _ = simulation::play_with(&mut original, &mut noise, |_| DEVICES[2], 150);

            let json = serde_json::to_string(&original).expect("serialises");
            let mut restored: DeviceBandit = serde_json::from_str(&json).expect("deserialises");
            assert_eq!(
                restored, original,
                "{policy:?}: state survives JSON bit for bit"
            );

            let mut noise_copy = noise.clone();
            let uninterrupted =
                simulation::play_with(&mut original, &mut noise, |_| DEVICES[2], 150);
            let resumed =
                simulation::play_with(&mut restored, &mut noise_copy, |_| DEVICES[2], 150);
            assert_eq!(resumed, uninterrupted, "{policy:?}");
            assert_eq!(restored, original, "{policy:?}");
        }
    }

    #[test]
    fn rejects_bad_rewards_and_arm_indices() {
        for policy in policies() {
            let mut b = bandit(policy, 0);
            assert_eq!(
                b.update(4, 0.5),
                Err(BanditError::ArmOutOfRange { arm: 4, arms: 4 })
            );
            for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 2e12] {
                assert!(matches!(
                    b.update(0, bad),
                    Err(BanditError::InvalidReward(_))
                ));
            }
            assert_eq!(b.plays(), &[0, 0, 0, 0], "rejected updates change nothing");
            assert_eq!(b, bandit(policy, 0));
            b.update(0, -3.0).expect("negative rewards are fine");
        }
    }

    #[test]
    fn rejects_bad_arms_and_parameters() {
        let new = |arms: Vec<Arm>, policy| DeviceBandit::new(arms, policy, 0).map(|_| ());
        let two = || vec![Arm::lora(4), Arm::lora(8)];
        assert_eq!(
            new(vec![], BanditPolicy::default()),
            Err(BanditError::NoArms)
        );
        assert_eq!(
            new(vec![Arm::lora(0)], BanditPolicy::default()),
            Err(BanditError::ZeroLoraRank { index: 0 })
        );
        let pruned = |r| Arm {
            lora_rank: 4,
            pruning_ratio: r,
        };
        for r in [-0.1, 1.0, f32::NAN] {
            assert!(matches!(
                new(vec![pruned(r)], BanditPolicy::default()),
                Err(BanditError::InvalidPruningRatio { index: 0, .. })
            ));
        }
        assert_eq!(
            new(
                vec![Arm::lora(4), pruned(0.5), Arm::lora(4)],
                BanditPolicy::default()
            ),
            Err(BanditError::DuplicateArm {
                first: 0,
                second: 2
            })
        );
        for policy in [
            BanditPolicy::DiscountedUcb {
                discount: 0.0,
                exploration: 1.0,
            },
            BanditPolicy::DiscountedUcb {
                discount: 1.01,
                exploration: 1.0,
            },
            BanditPolicy::DiscountedUcb {
                discount: 0.9,
                exploration: -1.0,
            },
            BanditPolicy::SlidingWindowUcb {
                window: 10,
                exploration: f64::NAN,
            },
            BanditPolicy::Exp3 {
                exploration: 0.0,
                learning_rate: 1.0,
            },
            BanditPolicy::Exp3 {
                exploration: 0.1,
                learning_rate: f64::INFINITY,
            },
        ] {
            assert!(
                matches!(
                    new(two(), policy),
                    Err(BanditError::InvalidParameter { .. })
                ),
                "{policy:?}"
            );
        }
        assert_eq!(
            new(
                two(),
                BanditPolicy::SlidingWindowUcb {
                    window: 1,
                    exploration: 1.0
                }
            ),
            Err(BanditError::WindowTooSmall { window: 1, arms: 2 })
        );
        assert_eq!(new(two(), BanditPolicy::default()), Ok(()));
    }

    #[test]
    fn restoring_checks_the_parts_fit() {
        let mut b = bandit(BanditPolicy::default(), 0);
        for _ in 0..6 {
            let arm = b.select();
            b.update(arm, 0.5).expect("valid update");
        }
        let json = serde_json::to_value(&b).expect("serialises");

        let mut fewer_plays = json.clone();
        fewer_plays["plays"] = serde_json::json!([1, 1, 1]);
        let mut fewer_arms = json.clone();
        fewer_arms["arms"] = serde_json::json!([{ "lora_rank": 2 }, { "lora_rank": 4 }]);
        fewer_arms["plays"] = serde_json::json!([1, 1]);
        let mut negative_weight = json.clone();
        negative_weight["policy"]["discounted_ucb"]["arms"][0]["weight"] = "-1.0".into();
        for bad in [fewer_plays, fewer_arms, negative_weight] {
            assert!(serde_json::from_value::<DeviceBandit>(bad).is_err());
        }
        // UCB draws nothing from the generator; a position beyond ChaCha's 2^68 words is
        // rejected (`Value` holds no integer that large, hence the text).
        let text = json.to_string();
        assert!(text.contains(r#""word_pos":0"#));
        let far_rng = text.replace(r#""word_pos":0"#, &format!(r#""word_pos":{}"#, 1u128 << 68));
        assert!(serde_json::from_str::<DeviceBandit>(&far_rng).is_err());
        let near_rng = text.replace(
            r#""word_pos":0"#,
            &format!(r#""word_pos":{}"#, (1u128 << 68) - 1),
        );
        assert!(serde_json::from_str::<DeviceBandit>(&near_rng).is_ok());
        assert_eq!(
            serde_json::from_value::<DeviceBandit>(json).expect("unchanged state restores"),
            b
        );
    }

    #[test]
    fn policy_config_defaults_and_format() {
        assert_eq!(BanditPolicy::default(), BanditPolicy::discounted_ucb());
        let parsed: BanditPolicy =
            serde_json::from_str(r#"{"sliding_window_ucb": {}}"#).expect("parses");
        assert_eq!(parsed, BanditPolicy::sliding_window_ucb());
        let parsed: BanditPolicy =
            serde_json::from_str(r#"{"discounted_ucb": {"discount": 0.9}}"#).expect("parses");
        assert_eq!(
            parsed,
            BanditPolicy::DiscountedUcb {
                discount: 0.9,
                exploration: discounted_ucb::DEFAULT_EXPLORATION
            }
        );
        let arm: Arm = serde_json::from_str(r#"{"lora_rank": 8}"#).expect("parses");
        assert_eq!(arm, Arm::lora(8));
    }

    #[test]
    fn argmax_prefers_the_first_of_equals() {
        assert_eq!(argmax([1.0, 3.0, 3.0, 2.0].into_iter()), Some(1));
        assert_eq!(argmax([f64::NAN, 1.0, f64::NAN].into_iter()), Some(1));
        assert_eq!(argmax(std::iter::empty()), None);
    }
}
