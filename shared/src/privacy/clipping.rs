//! Per-client L2 clipping of an update, with a fixed norm or an adaptive one that tracks a
//! quantile of the clients' update norms (Andrew et al. 2021, "Differentially Private Learning
//! with Adaptive Clipping").
//!
//! Clipping bounds one client's influence on the sum (its sensitivity), which is what the
//! Gaussian noise is calibrated to.

use serde::{Deserialize, Serialize};

/// The L2 norm of `x`, accumulated in f64.
pub fn l2_norm(x: &[f32]) -> f64 {
    x.iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

/// Scales `x` down to L2 norm `max_norm` if it is longer; returns the norm before clipping.
/// Non-finite entries are zeroed first (a non-finite update has no meaningful direction).
pub fn clip_l2(x: &mut [f32], max_norm: f64) -> f64 {
    x.iter_mut()
        .filter(|v| !v.is_finite())
        .for_each(|v| *v = 0.0);
    let norm = l2_norm(x);
    if norm > max_norm && norm > 0.0 {
        let scale = (max_norm / norm) as f32;
        x.iter_mut().for_each(|v| *v *= scale);
    }
    norm
}

/// How the clipping norm is chosen, as written in a configuration: `norm = 1.0` alone is a
/// fixed norm; with `adaptive` it is the first round's norm.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipNorm {
    /// The (first round's) norm.
    pub norm: f64,
    /// Move the norm towards a quantile of the clients' update norms (`None`: fixed).
    #[serde(default)]
    pub adaptive: Option<AdaptiveClip>,
}

impl ClipNorm {
    /// A fixed norm.
    pub fn fixed(norm: f64) -> Self {
        Self {
            norm,
            adaptive: None,
        }
    }
}

/// The geometric rule `C ← C · exp(−lr · (b − γ))`, where `b` is the fraction of clients whose
/// norm was at most `C`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveClip {
    /// `γ`: the fraction of updates that should end unclipped.
    pub target_quantile: f64,
    /// `lr`: the step of the geometric update (Andrew et al. use 0.2).
    pub lr: f64,
}

/// The clipping norm over a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Clipper {
    rule: ClipNorm,
    current: f64,
}

impl Clipper {
    /// A clipper starting at the rule's (initial) norm.
    pub fn new(rule: ClipNorm) -> Self {
        Self {
            rule,
            current: rule.norm,
        }
    }

    /// The norm this round clips to.
    pub fn norm(&self) -> f64 {
        self.current
    }

    /// Clips every update of a round to [`Self::norm`] and then adapts the norm to their
    /// norms before clipping. Returns the norms before clipping.
    ///
    /// Andrew et al. privatize the unclipped fraction `b` with noise of its own; here it is
    /// used as is, so [`super::accountant`]'s ε does not cover the adaptive norm's choice: use
    /// a fixed norm when the guarantee must be exact.
    pub fn clip_round(&mut self, updates: &mut [Vec<f32>]) -> Vec<f64> {
        let c = self.current;
        let norms: Vec<f64> = updates.iter_mut().map(|u| clip_l2(u, c)).collect();
        if let Some(AdaptiveClip {
            target_quantile,
            lr,
        }) = self.rule.adaptive
            && !norms.is_empty()
        {
            let b = norms.iter().filter(|&&n| n <= c).count() as f64 / norms.len() as f64;
            self.current = c * (-lr * (b - target_quantile)).exp();
        }
        norms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_bounds_the_norm_and_keeps_the_direction() {
        let mut x = vec![3.0f32, 4.0];
        assert_eq!(clip_l2(&mut x, 1.0), 5.0);
        assert!((x[0] - 0.6).abs() < 1e-6 && (x[1] - 0.8).abs() < 1e-6);
        let mut small = vec![0.1f32, 0.1];
        clip_l2(&mut small, 1.0);
        assert_eq!(small, vec![0.1, 0.1]);
    }

    #[test]
    fn adaptive_norm_moves_towards_the_quantile() {
        let mut clipper = Clipper::new(ClipNorm {
            norm: 0.1,
            adaptive: Some(AdaptiveClip {
                target_quantile: 0.5,
                lr: 0.2,
            }),
        });
        // Norms 1..=10: the median is about 5.5; starting far below, the norm grows towards it.
        for _ in 0..200 {
            let mut updates: Vec<Vec<f32>> = (1..=10).map(|n| vec![n as f32]).collect();
            clipper.clip_round(&mut updates);
        }
        assert!((4.0..=7.0).contains(&clipper.norm()), "{}", clipper.norm());
    }
}
