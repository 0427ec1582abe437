//! How the daemon combines a round's updates when the configuration asks for more than the
//! algorithm's own averaging: a robust rule (`[robust]`) or central differential privacy
//! (`[privacy.dp]`). Both algorithms hand it flat update vectors (FedKSeed: dense K-vectors of
//! accumulated scalar gradients; LoRA: adapter minus the global adapter) and apply the result.
//! The DP state (adaptive clipping norm, accountant) is part of the algorithm's stored state,
//! so ε keeps counting across restarts.

use fedtune_shared::privacy::dp::{DpConfig, DpMechanism, RoundPrivacy};
use fedtune_shared::protocol::frame::decode_body;
use fedtune_shared::robust::RobustRule;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::AlgorithmError;

/// The robust rule and the DP mechanism of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateCombiner {
    robust: RobustRule,
    dp: Option<DpMechanism>,
}

impl Default for UpdateCombiner {
    /// The plain mean, no DP: the algorithm aggregates as it always did.
    fn default() -> Self {
        Self {
            robust: RobustRule::Mean,
            dp: None,
        }
    }
}

impl UpdateCombiner {
    /// A run's combiner with nothing spent.
    ///
    /// # Errors
    ///
    /// [`AlgorithmError::Aggregation`] for DP settings out of range (checked with the
    /// configuration already).
    pub fn new(robust: RobustRule, dp: Option<DpConfig>) -> Result<Self, AlgorithmError> {
        let dp = dp
            .map(DpMechanism::new)
            .transpose()
            .map_err(|e| AlgorithmError::Aggregation(e.to_string()))?;
        Ok(Self { robust, dp })
    }

    /// True when neither a robust rule nor DP is on: the algorithm aggregates as it always did.
    pub fn is_plain(&self) -> bool {
        self.robust == RobustRule::Mean && self.dp.is_none()
    }

    /// The DP state to store with the algorithm's (None without DP).
    pub fn dp_state(&self) -> Option<&DpMechanism> {
        self.dp.as_ref()
    }

    /// Restores the DP state an algorithm stored after its own state `S`, as
    /// `(S, DpMechanism)`, when DP is on. A run that turns DP on mid-way has no such state and
    /// starts its accountant at zero (logged).
    pub fn restore_dp_after<S: serde::de::DeserializeOwned>(&mut self, stored: &[u8]) {
        if self.dp.is_some() {
            match decode_body::<(S, DpMechanism)>(stored) {
                Ok((_, dp)) => self.dp = Some(dp),
                Err(_) => tracing::warn!("no stored DP state: epsilon counts from this round"),
            }
        }
    }

    /// Combines one round's `updates` (one per report, `weights` their sample counts) into the
    /// round's update, and what DP spent when it is on.
    ///
    /// # Errors
    ///
    /// [`AlgorithmError::Aggregation`] when the robust rule refuses the updates (e.g. Krum
    /// with too few reports).
    pub fn combine(
        &mut self,
        updates: Vec<Vec<f32>>,
        weights: &[f64],
    ) -> Result<(Vec<f32>, Option<RoundPrivacy>), AlgorithmError> {
        if let Some(dp) = &mut self.dp {
            // Fresh OS randomness for the noise: noise an observer could predict protects
            // nothing.
            let seed = fedtune_shared::privacy::secagg::os_seed()
                .map_err(|e| AlgorithmError::Aggregation(e.to_string()))?;
            let (mean, spent) = dp.private_mean(updates, &mut ChaCha20Rng::from_seed(seed));
            return Ok((mean, Some(spent)));
        }
        let refs: Vec<&[f32]> = updates.iter().map(Vec::as_slice).collect();
        let combined = self
            .robust
            .aggregate(&refs, weights)
            .map_err(|e| AlgorithmError::Aggregation(e.to_string()))?;
        Ok((combined, None))
    }
}
