//! The SecAgg+ messages of the daemon's protocol: what a plan says about a secure round
//! ([`SecureRound`]), what a device sends in each phase ([`SecAggUpload`]) and what it fetches
//! ([`SecAggDownload`]), and how a device turns its update into the vector it masks
//! ([`weighted_input`]).
//!
//! ```text
//! device                                              server
//!   | <-- Plan(signed, secure = {config, id, n_max}) -  |  round r is secure; SecAgg id u
//!   |        … local training …                          |
//!   | -- SecAgg{r, Advertise(keys)} ------------------>  |  phase 1 (counts as the report)
//!   | -- SecAggPoll{r} ------------------------------->  |  Wait until every selected device
//!   | <--------- SecAgg(NeighbourKeys) | Wait ---------  |  advertised, or the deadline
//!   | -- SecAgg{r, Shares(bundle)} ------------------->  |  phase 2
//!   | -- SecAggPoll{r} -> SecAgg(ForwardedShares) ---->  |
//!   | -- SecAgg{r, Masked(input, stats)} ------------->  |  phase 3: masked update, public stats
//!   | -- SecAggPoll{r} -> SecAgg(UnmaskRequest) ------>  |
//!   | -- SecAgg{r, Unmask(shares)} ------------------->  |  phase 4; the server unmasks the sum
//! ```
//!
//! A phase closes when every device still in the session has answered, or at the phase
//! deadline: devices that vanish are SecAgg drop-outs, tolerated up to the session's
//! threshold. Every upload is acknowledged with [`super::Response::SecAggAccepted`].

use serde::{Deserialize, Serialize};

use super::message::LocalStats;
use crate::privacy::secagg::{
    ClientId, ForwardedShares, KeyAdvertisement, MaskedInput, NeighbourKeys, SecAggConfig,
    ShareBundle, UnmaskRequest, UnmaskResponse,
};

/// The part of a plan that makes a round secure.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SecureRound {
    /// The session's settings (session = round, vector length, quantizer, degree, drop-outs).
    pub config: SecAggConfig,
    /// This device's id in the session (a device may speak only for its own).
    pub id: ClientId,
    /// The most samples a device can train on this round: a device multiplies its update by
    /// `samples / max_samples` before masking (see [`weighted_input`]).
    pub max_samples: u64,
}

/// What a device sends in a phase, for the round's session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SecAggUpload {
    /// Phase 1: the device's public keys (sent once it has trained).
    Advertise(KeyAdvertisement),
    /// Phase 2: its secrets' shares, sealed for each neighbour.
    Shares(ShareBundle),
    /// Phase 3: its masked, weighted, quantized update, and its public measurements.
    Masked {
        /// The masked input.
        input: MaskedInput,
        /// Samples, losses and times, in the clear as in a plain report.
        stats: LocalStats,
    },
    /// Phase 4: the shares the server asked for.
    Unmask(UnmaskResponse),
}

impl SecAggUpload {
    /// The SecAgg id the message speaks for.
    pub fn sender(&self) -> ClientId {
        match self {
            Self::Advertise(m) => m.id,
            Self::Shares(m) => m.from,
            Self::Masked { input, .. } => input.from,
            Self::Unmask(m) => m.from,
        }
    }

    /// The phase's name, for logs and errors.
    pub fn phase(&self) -> &'static str {
        match self {
            Self::Advertise(_) => "advertise keys",
            Self::Shares(_) => "share keys",
            Self::Masked { .. } => "masked input",
            Self::Unmask(_) => "unmask",
        }
    }
}

/// What the server gives a polling device once a phase has closed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SecAggDownload {
    /// After phase 1: the neighbours' keys and the threshold.
    NeighbourKeys(NeighbourKeys),
    /// After phase 2: the sealed shares the neighbours addressed to this device.
    ForwardedShares(ForwardedShares),
    /// After phase 3: which neighbours survived and which dropped.
    UnmaskRequest(UnmaskRequest),
    /// After phase 4: the session is over for this device (its update is in the sum).
    Done,
}

/// The vector a device masks: its update times `samples / max_samples`, so the server's sum
/// divided by the (public) sum of the weights is the sample-weighted mean, and no per-device
/// weighted vector is ever seen. The weight is at most 1, so the clipping range of the update
/// also bounds the weighted values.
pub fn weighted_input(update: &[f32], samples: u64, max_samples: u64) -> Vec<f32> {
    let w = input_weight(samples, max_samples);
    update.iter().map(|v| v * w).collect()
}

/// The weight [`weighted_input`] applies: `samples / max_samples`, at most 1 (0 when
/// `max_samples` is 0).
pub fn input_weight(samples: u64, max_samples: u64) -> f32 {
    if max_samples == 0 {
        return 0.0;
    }
    (samples.min(max_samples) as f64 / max_samples as f64) as f32
}
