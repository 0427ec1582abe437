//! How the daemon combines a round's updates when the configuration asks for more than the
//! algorithm's own averaging: a robust rule (`[robust]`) or central differential privacy
//! (`[privacy.dp]`). Both algorithms hand it flat update vectors (FedKSeed: dense K-vectors of
//! accumulated scalar gradients; LoRA: adapter minus the global adapter) and apply the result.
//! The DP state (adaptive clipping norm, accountant) is part of the algorithm's stored state,
//! so ε keeps counting across restarts.
//!
//! Under secure aggregation with distributed DP the devices clip and noise their own updates;
//! the combiner then only says what they must add ([`UpdateCombiner::distributed_noise`]) and
//! records each unmasked round ([`UpdateCombiner::account_secure`]).

use std::time::Instant;

use fedtune_shared::privacy::dp::{DistributedNoise, DpConfig, DpMechanism, RoundPrivacy};
use fedtune_shared::privacy::gaussian::NoiseMode;
use fedtune_shared::protocol::frame::decode_body;
use fedtune_shared::robust::RobustRule;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::AlgorithmError;
use crate::secure::SecureAggregate;

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

    /// Accounts Poisson-sampled rounds at `cohort / population` (the daemon's plans per round),
    /// not at the count a round ended up with: every device was sampled at that rate.
    pub fn with_cohort(mut self, cohort: usize) -> Self {
        self.dp = self.dp.map(|dp| dp.with_cohort(cohort));
        self
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
            if dp.config().mode == NoiseMode::Distributed {
                // Refused at configuration load; a sum without the devices' noise must not
                // pass for a private one.
                return Err(AlgorithmError::Aggregation(
                    "distributed DP noise is added by devices under secure aggregation; \
                     this round was aggregated in the clear"
                        .into(),
                ));
            }
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

    /// What each device adds under distributed DP when at least `min_clients` devices are in
    /// every sum (`None` without DP or in central mode).
    pub fn distributed_noise(&self, min_clients: usize) -> Option<DistributedNoise> {
        self.dp.as_ref()?.distributed_noise(min_clients)
    }

    /// Records a secure round's DP in the accountant and reports what it spent (`None` without
    /// DP): the devices clipped and noised their updates, the server only accounts (its time
    /// is the cost; no extra bytes).
    ///
    /// # Errors
    ///
    /// [`AlgorithmError::Aggregation`] when the session's DP settings are not the run's, or the
    /// sum holds fewer devices than the noise was calibrated to (its noise would be below the
    /// guarantee: the round must not be used).
    pub fn account_secure(
        &mut self,
        aggregate: &SecureAggregate,
    ) -> Result<Option<RoundPrivacy>, AlgorithmError> {
        let started = Instant::now();
        match (&mut self.dp, &aggregate.dp) {
            (None, None) => Ok(None),
            (Some(dp), Some(noise)) if dp.config().mode == NoiseMode::Distributed => {
                let clients = aggregate.cost.clients;
                if clients < noise.min_clients {
                    return Err(AlgorithmError::Aggregation(format!(
                        "only {clients} devices' noise in the sum, at least {} needed for the \
                         DP guarantee",
                        noise.min_clients
                    )));
                }
                let spent = dp.record_round(aggregate.sampled.max(clients), noise.clip_norm);
                Ok(Some(RoundPrivacy {
                    device_noise_std: Some(noise.noise_std),
                    server_s: started.elapsed().as_secs_f64(),
                    ..spent
                }))
            }
            _ => Err(AlgorithmError::Aggregation(
                "the secure session's differential privacy differs from the run's".into(),
            )),
        }
    }
}
