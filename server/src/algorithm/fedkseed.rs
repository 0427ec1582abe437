//! FedKSeed on the daemon: the plans carry the seed history deltas a device missed, reports are
//! (seed index, accumulated scalar gradient) pairs, aggregation is [`ZoServer::aggregate`] over
//! the round's reports in device-id order, so that the result does not depend on arrival order.

use std::time::Instant;

use fedtune_shared::privacy::dp::{DistributedNoise, DpMechanism};
use fedtune_shared::protocol::frame::{decode_body, encode_body};
use fedtune_shared::protocol::secure::fedkseed_secure_len;
use fedtune_shared::protocol::{DeviceId, Report, ReportPayload, Task};
use fedtune_shared::robust::RobustRule;
use fedtune_shared::robust::flat::dense_seed_grads;
use fedtune_shared::zo::round::{ClientReport, ReportError, ZoRunConfig, ZoServer};

use super::combine::UpdateCombiner;
use super::{AlgorithmError, Rejection, RoundSummary, ServerAlgorithm, secure_mean};
use crate::secure::SecureAggregate;

/// FedKSeed's server side.
#[derive(Debug, Clone)]
pub struct FedKSeed {
    server: ZoServer,
    batch_size: usize,
    max_norm: Option<f64>,
    combiner: UpdateCombiner,
}

impl FedKSeed {
    /// A fresh run.
    pub fn new(run: ZoRunConfig, batch_size: usize, max_norm: Option<f64>) -> Self {
        Self {
            server: ZoServer::new(run),
            batch_size,
            max_norm,
            combiner: plain_combiner(),
        }
    }

    /// The same run combining updates with `combiner` (a robust rule or central DP) instead of
    /// FedKSeed's sample-weighted mean. Call it before [`Self::restore_dp`].
    pub fn with_combiner(mut self, combiner: UpdateCombiner) -> Self {
        self.combiner = combiner;
        self
    }

    /// Restores the DP state stored with `bytes` by [`ServerAlgorithm::state`] when DP is on.
    /// A run that turns DP on mid-way starts its accountant at zero (logged).
    pub fn restore_dp(mut self, bytes: &[u8]) -> Self {
        self.combiner.restore_dp_after::<ZoServer>(bytes);
        self
    }

    /// A run restored from [`ServerAlgorithm::state`] bytes.
    pub fn restore(
        bytes: &[u8],
        batch_size: usize,
        max_norm: Option<f64>,
    ) -> Result<Self, AlgorithmError> {
        // With DP on, the state is (history, DP state); without, the history alone.
        let server: ZoServer = match decode_body::<(ZoServer, DpMechanism)>(bytes) {
            Ok((server, _)) => server,
            Err(_) => decode_body(bytes).map_err(|e| AlgorithmError::Corrupt(e.to_string()))?,
        };
        Ok(Self {
            server,
            batch_size,
            max_norm,
            combiner: plain_combiner(),
        })
    }

    /// The FedKSeed server state.
    pub fn server(&self) -> &ZoServer {
        &self.server
    }
}

fn plain_combiner() -> UpdateCombiner {
    // The plain mean without DP cannot fail to build.
    UpdateCombiner::new(RobustRule::Mean, None).unwrap_or_else(|_| unreachable!())
}

fn report_of(report: &Report) -> Result<&ClientReport, Rejection> {
    match &report.payload {
        ReportPayload::FedKSeed(r) => Ok(r),
        _ => Err(Rejection::new(
            "payload",
            "this run is FedKSeed; the report carries another algorithm's payload",
        )),
    }
}

impl ServerAlgorithm for FedKSeed {
    fn round(&self) -> u64 {
        self.server.round()
    }

    fn task(&mut self, _device: DeviceId, last_seen: u64) -> Result<Task, AlgorithmError> {
        Ok(Task::FedKSeed {
            plan: self
                .server
                .plan(last_seen.min(self.server.round().saturating_sub(1))),
            batch_size: self.batch_size,
        })
    }

    fn validate(&self, _device: DeviceId, report: &Report) -> Result<(), Rejection> {
        let inner = report_of(report)?;
        inner
            .validate(self.server.round(), self.server.config().k)
            .map_err(|e| {
                let kind = match e {
                    ReportError::SeedOutOfRange { .. } => "seed_range",
                    ReportError::NotFinite { .. } => "not_finite",
                    ReportError::WrongRound { .. } => "wrong_round",
                    ReportError::NoSamples => "no_samples",
                    _ => "invalid",
                };
                Rejection::new(kind, e.to_string())
            })?;
        if inner.samples != report.stats.samples {
            return Err(Rejection::new(
                "inconsistent",
                "report and stats disagree on samples",
            ));
        }
        // A round is τ steps of `batch_size` sequences: more samples is a lie that would buy a
        // device more weight in the average (and overflows sums if large enough).
        let config = self.server.config();
        let max_samples = config.tau as u64 * self.batch_size as u64;
        if inner.samples > max_samples {
            return Err(Rejection::new(
                "samples",
                format!(
                    "{} samples claimed, a round has at most {max_samples}",
                    inner.samples
                ),
            ));
        }
        let max_seeds = config.tau.min(config.k) as usize;
        if inner.seed_grads.len() > max_seeds {
            return Err(Rejection::new(
                "shape",
                format!(
                    "{} seeds reported, a round draws at most {max_seeds}",
                    inner.seed_grads.len()
                ),
            ));
        }
        // Raw per-step values feed FedKSeed-Pro's importance only; without Pro there are none,
        // with Pro at most one per step.
        let max_steps = if config.pro { config.tau as usize } else { 0 };
        if inner.step_grads.len() > max_steps {
            return Err(Rejection::new(
                "shape",
                format!(
                    "{} per-step values, at most {max_steps} expected",
                    inner.step_grads.len()
                ),
            ));
        }
        if !(report.stats.mean_loss.is_finite() && report.stats.wall_s.is_finite()) {
            return Err(Rejection::new("not_finite", "loss or time is not finite"));
        }
        let mut seen = std::collections::BTreeSet::new();
        if !inner.seed_grads.iter().all(|(s, _)| seen.insert(*s)) {
            return Err(Rejection::new(
                "duplicate_seed",
                "a seed index appears twice",
            ));
        }
        if let Some(max) = self.max_norm {
            let norm = inner
                .seed_grads
                .iter()
                .map(|&(_, g)| (g as f64) * (g as f64))
                .sum::<f64>()
                .sqrt();
            let largest_step = inner
                .step_grads
                .iter()
                .map(|&(_, g)| (g as f64).abs())
                .fold(0.0, f64::max);
            if norm > max || largest_step > max {
                return Err(Rejection::new(
                    "norm",
                    format!(
                        "update norm {:.3e} exceeds the bound {max:.3e}",
                        norm.max(largest_step)
                    ),
                ));
            }
        }
        Ok(())
    }

    fn aggregate(
        &mut self,
        reports: &[(DeviceId, Report)],
    ) -> Result<RoundSummary, AlgorithmError> {
        let start = Instant::now();
        let round = self.server.round();
        let inner: Vec<ClientReport> = reports
            .iter()
            .filter_map(|(_, r)| report_of(r).ok().cloned())
            .collect();
        // On a copy, so that a failure leaves the state as it was (the round stays closing and
        // is retried, never half-applied).
        let mut next = self.server.clone();
        if self.combiner.is_plain() {
            let (_delta, rejected) = next.aggregate(&inner);
            if let Some((_, e)) = rejected.first() {
                // Reports were validated on arrival; a failure here is a bug, not a device's.
                return Err(AlgorithmError::Aggregation(e.to_string()));
            }
            self.server = next;
            return Ok(RoundSummary::of(round, reports, start));
        }
        let k = self.server.config().k;
        let dense: Vec<Vec<f32>> = inner.iter().map(|r| dense_seed_grads(r, k)).collect();
        let weights: Vec<f64> = inner.iter().map(|r| r.samples as f64).collect();
        let mut combiner = self.combiner.clone();
        let (mean, privacy) = combiner.combine(dense, &weights)?;
        next.apply_mean(&inner, &mean);
        self.server = next;
        self.combiner = combiner;
        Ok(RoundSummary {
            privacy,
            ..RoundSummary::of(round, reports, start)
        })
    }

    fn state(&self) -> Vec<u8> {
        // The history is plain numbers: it always encodes.
        match self.combiner.dp_state() {
            Some(dp) => encode_body(&(&self.server, dp)).unwrap_or_default(),
            None => encode_body(&self.server).unwrap_or_default(),
        }
    }

    fn checkpoint(&self) -> Vec<u8> {
        encode_body(&self.server).unwrap_or_default()
    }

    fn secure_vector_len(&self) -> Option<usize> {
        // FedKSeed-Pro without DP appends its importance statistics to the update.
        let dp = self.combiner.dp_state().is_some();
        Some(fedkseed_secure_len(self.server.config(), dp))
    }

    fn max_samples(&self) -> u64 {
        self.server.config().tau as u64 * self.batch_size as u64
    }

    fn distributed_noise(&self, min_clients: usize) -> Option<DistributedNoise> {
        self.combiner.distributed_noise(min_clients)
    }

    fn aggregate_secure(
        &mut self,
        aggregate: &SecureAggregate,
    ) -> Result<RoundSummary, AlgorithmError> {
        let start = Instant::now();
        let round = self.server.round();
        let k = self.server.config().k as usize;
        let len = self.secure_vector_len().unwrap_or(k);
        let mean = secure_mean(aggregate, len)?;
        // Checked before anything changes: a sum that cannot be used leaves the state as it was.
        let mut combiner = self.combiner.clone();
        let privacy = combiner.account_secure(aggregate)?;
        // FedKSeed-Pro's importance: the summed statistics after the update (not divided by
        // the weight), or under DP the noised mean itself (see `ZoServer::apply_secure_mean`).
        let statistics = (len > k).then(|| &aggregate.sum[k..]);
        let mut next = self.server.clone();
        next.apply_secure_mean(
            &mean[..k],
            statistics,
            aggregate.cost.clients,
            aggregate.clip,
        );
        self.server = next;
        self.combiner = combiner;
        Ok(RoundSummary {
            privacy,
            secure: Some(aggregate.cost),
            ..RoundSummary::of_stats(round, aggregate.stats.iter().map(|(_, s)| s), start)
        })
    }
}

#[cfg(test)]
mod tests {
    use fedtune_shared::privacy::clipping::ClipNorm;
    use fedtune_shared::privacy::dp::DpConfig;
    use fedtune_shared::privacy::gaussian::NoiseMode;
    use fedtune_shared::protocol::LocalStats;

    use super::*;

    fn report(device: u8, seed_grads: Vec<(u32, f32)>) -> (DeviceId, Report) {
        let stats = LocalStats {
            samples: 4,
            mean_loss: 2.0,
            first_loss: 2.0,
            loss_after: 2.0,
            wall_s: 1.0,
            peak_rss_bytes: None,
        };
        let payload = ReportPayload::FedKSeed(ClientReport {
            round: 1,
            seed_grads,
            step_grads: Vec::new(),
            samples: 4,
        });
        let report = Report {
            run_id: 1,
            round: 1,
            stats,
            payload,
        };
        (DeviceId([device; 16]), report)
    }

    fn run() -> ZoRunConfig {
        ZoRunConfig {
            k: 16,
            tau: 4,
            ..ZoRunConfig::default()
        }
    }

    #[test]
    fn median_ignores_a_poisoned_report() {
        let mut algo = FedKSeed::new(run(), 1, None)
            .with_combiner(UpdateCombiner::new(RobustRule::Median, None).expect("median"));
        let reports = vec![
            report(1, vec![(3, 1.0)]),
            report(2, vec![(3, 1.2)]),
            report(3, vec![(3, -1000.0), (5, 1000.0)]),
        ];
        for (d, r) in &reports {
            algo.validate(*d, r).expect("valid");
        }
        let summary = algo.aggregate(&reports).expect("aggregate");
        assert_eq!(summary.privacy, None);
        let h = algo.server().history();
        assert_eq!((h[3], h[5]), (1.0, 0.0));
    }

    #[test]
    fn central_dp_reports_growing_epsilon_and_survives_a_restart() {
        let dp = DpConfig {
            clip: ClipNorm::fixed(1.0),
            noise_multiplier: 1.0,
            mode: NoiseMode::Central,
            delta: 1e-5,
            selection: fedtune_shared::privacy::dp::Selection::Poisson,
            population: 100,
        };
        let combiner = || UpdateCombiner::new(RobustRule::Mean, Some(dp)).expect("dp");
        let mut algo = FedKSeed::new(run(), 1, None).with_combiner(combiner());
        let first = algo
            .aggregate(&[report(1, vec![(3, 5.0)]), report(2, vec![(4, 0.5)])])
            .expect("round 1")
            .privacy
            .expect("dp summary");
        assert!(first.epsilon > 0.0 && first.noise_std == 1.0);
        // Clipped to norm 1 and noised: the history cannot hold the raw 5.0 / 2.
        assert!(algo.server().history().iter().all(|v| v.is_finite()));
        let state = algo.state();
        let restored = FedKSeed::restore(&state, 1, None)
            .expect("restore")
            .with_combiner(combiner())
            .restore_dp(&state);
        let mut restored = restored;
        let mut second_reports = vec![report(1, vec![(3, 0.1)]), report(2, vec![(4, 0.1)])];
        for (_, r) in &mut second_reports {
            r.round = 2;
            if let ReportPayload::FedKSeed(inner) = &mut r.payload {
                inner.round = 2;
            }
        }
        let second = restored
            .aggregate(&second_reports)
            .expect("round 2")
            .privacy
            .expect("dp summary");
        assert!(second.epsilon > first.epsilon, "{second:?} vs {first:?}");
    }
}
