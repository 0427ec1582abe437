//! Byzantine-robust aggregation of client updates, for rounds without secure aggregation (the
//! rules must see individual updates). Every rule works on flat `f32` update vectors, so it
//! applies to LoRA adapters ([`flat::adapter_delta`]) and to FedKSeed's accumulated
//! scalar-gradient K-vectors ([`flat::dense_seed_grads`]) alike:
//!
//! - [`RobustRule::Median`]: the coordinate-wise median (Yin et al. 2018);
//! - [`RobustRule::TrimmedMean`]: the coordinate-wise mean after dropping the largest and
//!   smallest `trim` fraction (Yin et al. 2018);
//! - [`RobustRule::NormBound`]: each update scaled down to a norm bound, then averaged (Sun et
//!   al. 2019);
//! - [`RobustRule::Krum`]: the update (or the mean of the `multi` updates) closest to its
//!   `n − f − 2` nearest neighbours (Blanchard et al. 2017).
//!
//! The rules other than [`RobustRule::Mean`] weigh every client equally: a sample count is the
//! client's own claim, and a liar would buy itself weight with it.

mod krum;
mod median;
mod trimmed_mean;

pub mod flat;

use serde::{Deserialize, Serialize};

pub use krum::krum;
pub use median::coordinate_median;
pub use trimmed_mean::trimmed_mean;

/// How the server combines a round's updates, as written in its configuration
/// (`rule = "median"`, …).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case", deny_unknown_fields)]
pub enum RobustRule {
    /// The sample-weighted mean (plain FedAvg), not robust.
    #[default]
    Mean,
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise trimmed mean.
    TrimmedMean {
        /// Fraction dropped at each end, in `[0, 0.5)`.
        trim: f64,
    },
    /// Norm bounding, then the mean.
    NormBound {
        /// The largest L2 norm an update keeps.
        max_norm: f64,
    },
    /// (Multi-)Krum.
    Krum {
        /// `f`: the most attackers tolerated; needs `n > 2f + 2` updates.
        byzantine: usize,
        /// How many best-scored updates are averaged (1: plain Krum).
        #[serde(default = "one")]
        multi: usize,
    },
}

fn one() -> usize {
    1
}

/// Why a round's updates could not be combined.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RobustError {
    /// No updates.
    #[error("no updates to aggregate")]
    NoUpdates,
    /// Updates of different lengths.
    #[error("update {index} has {got} values, update 0 has {expected}")]
    LengthMismatch {
        /// The offending update.
        index: usize,
        /// Its length.
        got: usize,
        /// Update 0's length.
        expected: usize,
    },
    /// A NaN or infinity in an update.
    #[error("update {0} has a non-finite value")]
    NonFinite(usize),
    /// Too few updates for the rule's setting, or a setting out of range.
    #[error("{rule}: {reason}")]
    Unsupported {
        /// The rule.
        rule: &'static str,
        /// Why.
        reason: String,
    },
}

impl RobustRule {
    /// The rule's name in configurations and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Mean => "mean",
            Self::Median => "median",
            Self::TrimmedMean { .. } => "trimmed_mean",
            Self::NormBound { .. } => "norm_bound",
            Self::Krum { .. } => "krum",
        }
    }

    /// Combines `updates`; `weights` (one per update, e.g. sample counts) are used by
    /// [`RobustRule::Mean`] only.
    ///
    /// # Errors
    ///
    /// [`RobustError`] for no updates, differing lengths, non-finite values, or settings the
    /// rule cannot meet with this many updates.
    pub fn aggregate(&self, updates: &[&[f32]], weights: &[f64]) -> Result<Vec<f32>, RobustError> {
        let first = updates.first().ok_or(RobustError::NoUpdates)?;
        for (index, u) in updates.iter().enumerate() {
            if u.len() != first.len() {
                return Err(RobustError::LengthMismatch {
                    index,
                    got: u.len(),
                    expected: first.len(),
                });
            }
            if u.iter().any(|v| !v.is_finite()) {
                return Err(RobustError::NonFinite(index));
            }
        }
        match *self {
            Self::Mean => {
                let equal = vec![1.0; updates.len()];
                let w = if weights.len() == updates.len() && weights.iter().sum::<f64>() > 0.0 {
                    weights
                } else {
                    &equal
                };
                Ok(weighted_mean(updates, w))
            }
            Self::Median => Ok(coordinate_median(updates)),
            Self::TrimmedMean { trim } => trimmed_mean(updates, trim),
            Self::NormBound { max_norm } => {
                if !(max_norm.is_finite() && max_norm > 0.0) {
                    return Err(RobustError::Unsupported {
                        rule: "norm_bound",
                        reason: "max_norm must be positive".into(),
                    });
                }
                let bounded: Vec<Vec<f32>> = updates
                    .iter()
                    .map(|u| {
                        let mut u = u.to_vec();
                        crate::privacy::clipping::clip_l2(&mut u, max_norm);
                        u
                    })
                    .collect();
                let refs: Vec<&[f32]> = bounded.iter().map(Vec::as_slice).collect();
                Ok(weighted_mean(&refs, &vec![1.0; refs.len()]))
            }
            Self::Krum { byzantine, multi } => krum(updates, byzantine, multi),
        }
    }
}

/// `Σ w_i u_i / Σ w_i`, in f64.
pub fn weighted_mean(updates: &[&[f32]], weights: &[f64]) -> Vec<f32> {
    let total: f64 = weights.iter().sum();
    let mut out = vec![0.0f64; updates.first().map_or(0, |u| u.len())];
    for (u, &w) in updates.iter().zip(weights) {
        out.iter_mut()
            .zip(u.iter())
            .for_each(|(o, &v)| *o += w * f64::from(v));
    }
    out.iter().map(|&o| (o / total) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_resist_one_outlier_that_moves_the_mean() {
        let honest: Vec<Vec<f32>> = (0..8).map(|i| vec![1.0 + 0.01 * i as f32, -1.0]).collect();
        let mut all = honest.clone();
        all.push(vec![1000.0, 1000.0]);
        all.push(vec![-1000.0, 500.0]);
        let refs: Vec<&[f32]> = all.iter().map(Vec::as_slice).collect();
        let w = vec![1.0; refs.len()];
        let mean = RobustRule::Mean.aggregate(&refs, &w).expect("mean");
        assert!(mean[1] > 100.0);
        for rule in [
            RobustRule::Median,
            RobustRule::TrimmedMean { trim: 0.2 },
            RobustRule::Krum {
                byzantine: 2,
                multi: 3,
            },
        ] {
            let out = rule.aggregate(&refs, &w).expect("robust");
            assert!(
                (out[0] - 1.04).abs() < 0.05 && (out[1] + 1.0).abs() < 1e-4,
                "{} gave {out:?}",
                rule.name()
            );
        }
        let bounded = RobustRule::NormBound { max_norm: 2.0 }
            .aggregate(&refs, &w)
            .expect("norm bound");
        assert!(bounded.iter().all(|v| v.abs() < 2.0));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let a = [1.0f32, 2.0];
        let b = [1.0f32];
        let nan = [f32::NAN, 0.0];
        assert_eq!(
            RobustRule::Median.aggregate(&[], &[]),
            Err(RobustError::NoUpdates)
        );
        assert!(matches!(
            RobustRule::Median.aggregate(&[&a, &b], &[]),
            Err(RobustError::LengthMismatch { index: 1, .. })
        ));
        assert_eq!(
            RobustRule::Median.aggregate(&[&a, &nan], &[]),
            Err(RobustError::NonFinite(1))
        );
        assert!(
            RobustRule::Krum {
                byzantine: 1,
                multi: 1
            }
            .aggregate(&[&a, &a, &a], &[])
            .is_err()
        );
    }

    #[test]
    fn rules_parse_from_config() {
        let rule: RobustRule =
            serde_json::from_str(r#"{"rule": "krum", "byzantine": 2}"#).expect("parses");
        assert_eq!(
            rule,
            RobustRule::Krum {
                byzantine: 2,
                multi: 1
            }
        );
    }
}
