//! The round orchestrator as a state machine without I/O, in the style of quinn-proto: the
//! daemon feeds it events (a device polled, a report was stored, time passed) with the current
//! time, and it answers with decisions (give this device a plan, tell it to wait, close the
//! round). Tests drive it with a fake clock.
//!
//! A round opens; the first `slots` distinct devices that poll get a plan (`clients_per_round`
//! times the over-selection factor); the round closes when `clients_per_round` reports are in
//! (the quorum), or at the deadline if at least `min_reports` are. A round that reaches its
//! deadline with fewer reports stays open with a new deadline, and devices that have not
//! reported lose their slot to new devices (stragglers are dropped; if they report anyway while
//! the round is open, their report still counts). Reports for a closed round are refused.
//!
//! Under differential privacy with Poisson selection a device also has to be sampled: it is in
//! round r when a keyed hash of (r, device) falls below the rate, so asking again in the same
//! round changes nothing and devices cannot tell beforehand which rounds will take them.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use fedtune_shared::protocol::DeviceId;

/// The orchestration settings the state machine needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundRules {
    /// Rounds to run.
    pub total_rounds: u64,
    /// Reports that close a round.
    pub quorum: usize,
    /// Plans handed out per round.
    pub slots: usize,
    /// Reports a round may close with at its deadline.
    pub min_reports: usize,
    /// How long a round waits.
    pub deadline: Duration,
    /// Poisson sampling of each round's devices (differential privacy), or everyone eligible.
    pub sampling: Option<PoissonSampling>,
}

/// Each device is in a round independently with probability `rate`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoissonSampling {
    rate: f64,
    key: [u8; 32],
}

impl PoissonSampling {
    /// Sampling at `rate` (clamped to [0, 1]) decided by `key`, a secret of the server's (only
    /// its first 32 bytes count).
    pub fn new(rate: f64, key: &[u8]) -> Self {
        let mut k = [0u8; 32];
        let n = key.len().min(32);
        k[..n].copy_from_slice(&key[..n]);
        Self {
            rate: rate.clamp(0.0, 1.0),
            key: k,
        }
    }

    /// Whether `device` is in round `round`: HMAC-SHA256(key, round ‖ device) read as a
    /// uniform number in [0, 1) and compared with the rate.
    pub fn takes(&self, round: u64, device: DeviceId) -> bool {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.key);
        let mut message = [0u8; 24];
        message[..8].copy_from_slice(&round.to_le_bytes());
        message[8..].copy_from_slice(&device.0);
        let tag = ring::hmac::sign(&key, &message);
        let mut head = [0u8; 8];
        head.copy_from_slice(&tag.as_ref()[..8]);
        // 53 bits, as a uniform f64 in [0, 1).
        let uniform = (u64::from_le_bytes(head) >> 11) as f64 / (1u64 << 53) as f64;
        uniform < self.rate
    }
}

/// What to tell a polling device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollDecision {
    /// Give it this round's plan.
    Plan {
        /// The round.
        round: u64,
        /// Time left before the deadline.
        time_left: Duration,
    },
    /// Nothing for it now.
    Wait {
        /// Suggested wait.
        retry_after: Duration,
        /// Why.
        reason: &'static str,
    },
    /// The run is over.
    Finished {
        /// The last round.
        last_round: u64,
    },
}

/// Why a report cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RoundRefusal {
    /// The round is not the open one.
    #[error("round {got} is not open (the open round is {open})")]
    WrongRound {
        /// The open round.
        open: u64,
        /// The report's.
        got: u64,
    },
    /// The device has no plan this round.
    #[error("device has no plan for round {0}")]
    NotSelected(u64),
    /// The round is closing (aggregating) and takes no more reports.
    #[error("round {0} is closing")]
    Closing(u64),
    /// The run is over.
    #[error("the run is finished")]
    Finished,
}

/// Where a round stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Handing out plans and collecting reports.
    Open,
    /// Closed, waiting for the daemon to aggregate and call [`Rounds::advance`].
    Closing,
    /// No more rounds.
    Finished,
}

/// The orchestrator.
#[derive(Debug, Clone)]
pub struct Rounds {
    rules: RoundRules,
    round: u64,
    phase: Phase,
    deadline: Instant,
    assigned: BTreeSet<DeviceId>,
    reported: BTreeSet<DeviceId>,
}

/// How long a device that polls while a round is full or closing waits before polling again.
const RETRY_AFTER: Duration = Duration::from_millis(500);

impl Rounds {
    /// The orchestrator at round `round` (1-based), with the devices whose reports for it are
    /// already stored (after a restart), opened at `now`.
    pub fn resume(
        rules: RoundRules,
        round: u64,
        reported: BTreeSet<DeviceId>,
        now: Instant,
    ) -> Self {
        let mut rounds = Self {
            rules,
            round,
            phase: Phase::Open,
            deadline: now + rules.deadline,
            assigned: reported.clone(),
            reported,
        };
        if round > rules.total_rounds {
            rounds.phase = Phase::Finished;
        } else if rounds.reported.len() >= rules.quorum {
            rounds.phase = Phase::Closing;
        }
        rounds
    }

    /// The current round.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Devices whose report for this round is stored.
    pub fn reported(&self) -> &BTreeSet<DeviceId> {
        &self.reported
    }

    /// A device asks for work.
    pub fn on_poll(&mut self, device: DeviceId, now: Instant) -> PollDecision {
        match self.phase {
            Phase::Finished => {
                return PollDecision::Finished {
                    last_round: self.rules.total_rounds,
                };
            }
            Phase::Closing => {
                return PollDecision::Wait {
                    retry_after: RETRY_AFTER,
                    reason: "round is being aggregated",
                };
            }
            Phase::Open => {}
        }
        if self.reported.contains(&device) {
            return PollDecision::Wait {
                retry_after: RETRY_AFTER,
                reason: "already reported this round",
            };
        }
        let sampled_out = self
            .rules
            .sampling
            .is_some_and(|s| !s.takes(self.round, device));
        if !self.assigned.contains(&device) && sampled_out {
            return PollDecision::Wait {
                retry_after: RETRY_AFTER,
                reason: "not sampled for this round",
            };
        }
        if self.assigned.contains(&device) || self.assigned.len() < self.rules.slots {
            self.assigned.insert(device);
            return PollDecision::Plan {
                round: self.round,
                time_left: self.deadline.saturating_duration_since(now),
            };
        }
        PollDecision::Wait {
            retry_after: RETRY_AFTER,
            reason: "round is full",
        }
    }

    /// Checks that a report for `round` from `device` may be stored now.
    pub fn check_report(&self, device: DeviceId, round: u64) -> Result<(), RoundRefusal> {
        match self.phase {
            Phase::Finished => return Err(RoundRefusal::Finished),
            Phase::Closing if round == self.round => return Err(RoundRefusal::Closing(round)),
            _ => {}
        }
        if round != self.round {
            return Err(RoundRefusal::WrongRound {
                open: self.round,
                got: round,
            });
        }
        if !self.assigned.contains(&device) {
            return Err(RoundRefusal::NotSelected(round));
        }
        Ok(())
    }

    /// A report passed [`Self::check_report`] and is stored. Returns true when the round is now
    /// closing (the daemon should aggregate).
    pub fn on_report_stored(&mut self, device: DeviceId) -> bool {
        self.reported.insert(device);
        if self.phase == Phase::Open && self.reported.len() >= self.rules.quorum {
            self.phase = Phase::Closing;
            return true;
        }
        false
    }

    /// Time passed. Returns true when the round is now closing. At a deadline with too few
    /// reports the round stays open with a new deadline, and the slots of devices that have not
    /// reported are freed for others.
    pub fn on_timer(&mut self, now: Instant) -> bool {
        if self.phase != Phase::Open || now < self.deadline {
            return false;
        }
        if self.reported.len() >= self.rules.min_reports {
            self.phase = Phase::Closing;
            return true;
        }
        tracing::info!(
            round = self.round,
            reports = self.reported.len(),
            "deadline passed with too few reports; inviting other devices"
        );
        self.assigned = self.reported.clone();
        self.deadline = now + self.rules.deadline;
        false
    }

    /// The closing round failed in a way that running it again can fix (a secure session lost
    /// too many devices): opens the same round again at `now`, every slot free.
    pub fn restart(&mut self, now: Instant) {
        self.assigned.clear();
        self.reported.clear();
        self.deadline = now + self.rules.deadline;
        if self.phase != Phase::Finished {
            self.phase = Phase::Open;
        }
    }

    /// The daemon aggregated the closing round; opens the next one at `now`.
    pub fn advance(&mut self, now: Instant) {
        self.round += 1;
        self.assigned.clear();
        self.reported.clear();
        self.deadline = now + self.rules.deadline;
        self.phase = if self.round > self.rules.total_rounds {
            Phase::Finished
        } else {
            Phase::Open
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> DeviceId {
        DeviceId([n; 16])
    }

    fn rules() -> RoundRules {
        RoundRules {
            total_rounds: 2,
            quorum: 2,
            slots: 3,
            min_reports: 1,
            deadline: Duration::from_secs(10),
            sampling: None,
        }
    }

    #[test]
    fn poisson_sampling_takes_each_device_at_the_rate_and_retries_change_nothing() {
        let sampling = PoissonSampling::new(0.1, &[7; 32]);
        let devices: Vec<DeviceId> = (0..4000u32)
            .map(|i| {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&i.to_le_bytes());
                DeviceId(b)
            })
            .collect();
        let taken = |round| -> BTreeSet<DeviceId> {
            devices
                .iter()
                .copied()
                .filter(|&d| sampling.takes(round, d))
                .collect()
        };
        let (one, two) = (taken(1), taken(2));
        // Binomial(4000, 0.1): mean 400, standard deviation 19.
        for set in [&one, &two] {
            assert!((330..470).contains(&set.len()), "{}", set.len());
        }
        assert_eq!(taken(1), one, "the same answer on every ask");
        let both = one.intersection(&two).count();
        assert!(
            (10..80).contains(&both),
            "rounds sample independently: {both}"
        );
        assert!(taken(1) != taken(3));
        let other_key = PoissonSampling::new(0.1, &[8; 32]);
        assert!(
            devices
                .iter()
                .any(|&d| other_key.takes(1, d) != sampling.takes(1, d))
        );

        // The orchestrator turns an unsampled device away, however often it asks.
        let t0 = Instant::now();
        let mut r = Rounds::resume(
            RoundRules {
                slots: 4000,
                sampling: Some(sampling),
                ..rules()
            },
            1,
            BTreeSet::new(),
            t0,
        );
        let out = devices.iter().copied().find(|d| !one.contains(d)).unwrap();
        let inn = *one.iter().next().unwrap();
        for _ in 0..3 {
            assert!(matches!(r.on_poll(out, t0), PollDecision::Wait { .. }));
        }
        assert!(matches!(r.on_poll(inn, t0), PollDecision::Plan { .. }));
    }

    #[test]
    fn over_selects_then_closes_at_quorum_and_refuses_stragglers() {
        let t0 = Instant::now();
        let mut r = Rounds::resume(rules(), 1, BTreeSet::new(), t0);
        for n in 0..3 {
            assert!(matches!(
                r.on_poll(id(n), t0),
                PollDecision::Plan { round: 1, .. }
            ));
        }
        assert!(matches!(
            r.on_poll(id(3), t0),
            PollDecision::Wait {
                reason: "round is full",
                ..
            }
        ));
        assert_eq!(r.check_report(id(3), 1), Err(RoundRefusal::NotSelected(1)));
        r.check_report(id(0), 1).unwrap();
        assert!(!r.on_report_stored(id(0)));
        assert!(matches!(r.on_poll(id(0), t0), PollDecision::Wait { .. }));
        assert!(r.on_report_stored(id(1)));
        assert_eq!(r.phase(), Phase::Closing);
        assert_eq!(r.check_report(id(2), 1), Err(RoundRefusal::Closing(1)));
        r.advance(t0);
        assert_eq!(
            r.check_report(id(2), 1),
            Err(RoundRefusal::WrongRound { open: 2, got: 1 })
        );
        r.on_poll(id(2), t0);
        r.on_report_stored(id(2));
        r.on_poll(id(0), t0);
        assert!(r.on_report_stored(id(0)));
        r.advance(t0);
        assert_eq!(
            r.on_poll(id(0), t0),
            PollDecision::Finished { last_round: 2 }
        );
        assert_eq!(r.check_report(id(0), 3), Err(RoundRefusal::Finished));
    }

    #[test]
    fn deadline_closes_with_min_reports_or_reinvites() {
        let t0 = Instant::now();
        let mut r = Rounds::resume(rules(), 1, BTreeSet::new(), t0);
        for n in 0..3 {
            r.on_poll(id(n), t0);
        }
        assert!(!r.on_timer(t0 + Duration::from_secs(9)));
        // No report at the deadline: slots are freed for a new device.
        assert!(!r.on_timer(t0 + Duration::from_secs(10)));
        assert!(matches!(
            r.on_poll(id(7), t0 + Duration::from_secs(10)),
            PollDecision::Plan { .. }
        ));
        r.on_report_stored(id(7));
        assert!(r.on_timer(t0 + Duration::from_secs(21)));
        assert_eq!(r.phase(), Phase::Closing);
    }

    #[test]
    fn resumes_with_stored_reports() {
        let t0 = Instant::now();
        let r = Rounds::resume(rules(), 2, [id(1)].into(), t0);
        assert_eq!(r.phase(), Phase::Open);
        assert!(r.check_report(id(1), 2).is_ok());
        let full = Rounds::resume(rules(), 2, [id(1), id(2)].into(), t0);
        assert_eq!(full.phase(), Phase::Closing);
        let done = Rounds::resume(rules(), 3, BTreeSet::new(), t0);
        assert_eq!(done.phase(), Phase::Finished);
    }
}
