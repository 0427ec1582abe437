//! The messages: what a device asks ([`Request`]), what the server answers ([`Response`]), and
//! the typed payloads they carry (round plans and reports of each algorithm).

use serde::{Deserialize, Serialize};

use super::auth::{DeviceId, PublicKey, Signed};
use super::blob::Digest;
use super::secure::{SecAggDownload, SecAggUpload, SecureRound};
use crate::lora::config::LoraConfig;
use crate::lora::train::TrainConfig;
use crate::prune::kept::KeptUnits;
use crate::prune::schedule::PruneSchedule;
use crate::zo::round::{ClientReport, RoundPlan};

/// What a device sends, one request per QUIC stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    /// First contact: register a device key with an operator-issued token.
    Enroll(EnrollRequest),
    /// Prove the device key on this connection; must precede every request below.
    Authenticate(AuthenticateRequest),
    /// Ask for work.
    Poll(PollRequest),
    /// Return the result of a plan.
    Report(Report),
    /// Fetch a blob (global adapter, …) by digest, from a byte offset (to resume).
    Download {
        /// The blob.
        digest: Digest,
        /// Bytes the device already holds.
        offset: u64,
    },
    /// Ask how much of an upload the server already holds (to resume).
    UploadStatus {
        /// The blob being uploaded.
        digest: Digest,
    },
    /// Upload a blob's bytes from `offset`; the raw bytes follow this frame on the stream.
    Upload {
        /// The blob's SHA-256 (checked when complete).
        digest: Digest,
        /// Its total length.
        total: u64,
        /// Where the bytes that follow start.
        offset: u64,
    },
    /// A secure round's phase message (the device's SecAgg id must be its own).
    SecAgg {
        /// The round (the session).
        round: u64,
        /// The message.
        message: SecAggUpload,
    },
    /// Ask for the next message of a secure round's session (answered with
    /// [`Response::SecAgg`] once the current phase has closed, [`Response::Wait`] before).
    SecAggPoll {
        /// The round (the session).
        round: u64,
    },
}

/// A device's enrollment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The operator's enrollment token.
    pub token: String,
    /// The device's Ed25519 public key.
    pub public_key: PublicKey,
    /// What the device can do.
    pub capabilities: Capabilities,
}

/// What a device reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Free-form platform name ("linux-x86_64", "android-arm64", …).
    pub platform: String,
    /// The compute backend it trains on ("cpu", "wgpu").
    pub backend: String,
    /// Memory it may use, in bytes (0: unknown).
    pub memory_bytes: u64,
    /// Digest of the base model it holds.
    pub base_model: Digest,
}

/// The per-connection proof of a device key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthenticateRequest {
    /// The device.
    pub device: DeviceId,
    /// Signature of the connection's exporter material (see [`super::auth`]).
    pub signature: Vec<u8>,
}

/// A request for work.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PollRequest {
    /// The last round whose global state the device holds (0: the initial model).
    pub last_seen_round: u64,
}

/// A plan, signed by the server.
pub type SignedPlan = Signed<Plan>;

/// What the server asks one device to do in one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The run this plan belongs to (a new run id means: start from the base model).
    pub run_id: u64,
    /// The round.
    pub round: u64,
    /// The device it was made for (a plan is useless to any other device).
    pub device: DeviceId,
    /// Digest of the base model the work applies to.
    pub base_model: Digest,
    /// Seed of the device's local randomness this round (data order, seed draws, dropout).
    pub local_seed: u64,
    /// Milliseconds the device has before the server stops waiting.
    pub deadline_ms: u64,
    /// The work.
    pub task: Task,
    /// Set when the round aggregates with SecAgg+: after training, the device runs the four
    /// phases (see [`super::secure`]) instead of sending its update in a [`Report`].
    pub secure: Option<SecureRound>,
}

/// The algorithm-specific part of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Task {
    /// FedKSeed: catch up on missed history, then τ zeroth-order steps.
    FedKSeed {
        /// The FedKSeed plan (run settings, sampling, catch-up deltas).
        plan: RoundPlan,
        /// Sequences per local step.
        batch_size: usize,
    },
    /// LoRA: load the global adapter at the assigned rank, train, return the adapter.
    Lora(LoraTask),
    /// FedSpine: LoRA tuning at the assigned rank while pruning toward the assigned ratio;
    /// return the adapter on the kept units and which units were kept.
    FedSpine(FedSpineTask),
}

/// A FedSpine round's work: [`LoraTask`]'s, plus how to prune.
///
/// The device starts the round from its full base model with the global adapter at its rank
/// (full coordinates), prunes every `schedule.every` iterations on the cubic schedule toward
/// `schedule.target`, and reports its adapter in its kept coordinates with the kept units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FedSpineTask {
    /// Adapter, optimiser and step settings, with the rank the server assigned.
    pub lora: LoraTask,
    /// The pruning ratio the server assigned, and how to get there.
    pub schedule: PruneSchedule,
}

/// A LoRA round's work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraTask {
    /// Adapter settings, with the rank the server assigned this device.
    pub lora: LoraConfig,
    /// Optimiser settings.
    pub train: TrainConfig,
    /// Optimiser steps.
    pub local_steps: usize,
    /// The global adapter at this device's rank (`None`: start from a fresh adapter seeded by
    /// `adapter_seed`).
    pub adapter: Option<BlobRef>,
    /// Seed of a fresh adapter's initialisation.
    pub adapter_seed: u64,
    /// The device's position in the learning-rate schedule (steps it trained in earlier rounds).
    pub first_step: usize,
}

/// A blob the device downloads separately (large payloads never travel inside a frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// SHA-256 of its bytes.
    pub digest: Digest,
    /// Its length.
    pub len: u64,
}

/// A device's result for one plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The run.
    pub run_id: u64,
    /// The round.
    pub round: u64,
    /// What the device measured.
    pub stats: LocalStats,
    /// The algorithm's result.
    pub payload: ReportPayload,
}

/// The algorithm-specific part of a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ReportPayload {
    /// FedKSeed: accumulated scalar gradients per seed.
    FedKSeed(ClientReport),
    /// LoRA: the trained adapter, uploaded beforehand as a blob.
    Lora {
        /// The uploaded adapter blob ([`super::adapter_blob`] format).
        adapter: BlobRef,
        /// Its rank.
        rank: usize,
    },
    /// FedSpine: the adapter trained on the pruned model, and what the device kept.
    FedSpine {
        /// The uploaded adapter blob, in the kept coordinates.
        adapter: BlobRef,
        /// Its rank.
        rank: usize,
        /// Per decoder layer, the units kept (the full model's numbering).
        kept: Vec<KeptUnits>,
    },
}

impl ReportPayload {
    /// The uploaded adapter blob, for the algorithms that upload one.
    pub fn adapter(&self) -> Option<BlobRef> {
        match self {
            Self::Lora { adapter, .. } | Self::FedSpine { adapter, .. } => Some(*adapter),
            Self::FedKSeed(_) => None,
        }
    }
}

/// What a device measured in its round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LocalStats {
    /// Training samples used (the aggregation weight).
    pub samples: u64,
    /// Mean training loss.
    pub mean_loss: f32,
    /// Loss before the round's training (LoRA: on a fixed probe of the device's data; the
    /// bandit's measure of progress).
    pub first_loss: f32,
    /// Loss after the round's training, on the same probe.
    pub loss_after: f32,
    /// Wall time of the local work, seconds.
    pub wall_s: f64,
    /// Peak resident memory, where known.
    pub peak_rss_bytes: Option<u64>,
}

/// What the server answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Response {
    /// Enrollment accepted.
    Enrolled {
        /// The device's id.
        device: DeviceId,
    },
    /// The connection is authenticated.
    Authenticated,
    /// Work for this device.
    Plan(SignedPlan),
    /// No work now; ask again later.
    Wait {
        /// Suggested wait.
        retry_after_ms: u64,
        /// Why.
        reason: String,
    },
    /// The run is over: no more rounds.
    Finished {
        /// The last round.
        last_round: u64,
    },
    /// The report is stored durably and counts.
    Accepted {
        /// The round.
        round: u64,
        /// True when this exact device's report for this round was already stored (a resend
        /// after a lost acknowledgement); it counts once.
        duplicate: bool,
    },
    /// A download follows: raw bytes from `offset` to `total` on the stream after this frame.
    Blob {
        /// The blob's length.
        total: u64,
        /// Where the bytes start.
        offset: u64,
    },
    /// The server holds the first `offset` bytes of an upload.
    UploadOffset {
        /// Bytes held.
        offset: u64,
    },
    /// An upload is complete and its digest checked.
    Uploaded {
        /// The blob.
        digest: Digest,
    },
    /// The request was refused.
    Error(WireError),
    /// The next message of a secure round's session.
    SecAgg(SecAggDownload),
    /// A secure round's phase message was taken.
    SecAggAccepted {
        /// The round.
        round: u64,
    },
}

/// A refusal, with a code a program can act on and a message a person can read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct WireError {
    /// What kind of refusal.
    pub code: ErrorCode,
    /// Details.
    pub message: String,
}

/// Kinds of refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The peer speaks another protocol version.
    VersionMismatch,
    /// The bytes were not a valid message.
    Malformed,
    /// A frame or blob exceeded a limit.
    TooLarge,
    /// The enrollment token is unknown or used up.
    BadToken,
    /// The device is not enrolled, or its proof failed.
    Unauthenticated,
    /// The device was revoked by the operator.
    Revoked,
    /// The report is for a round that is not open (over, or not yet started).
    WrongRound,
    /// The device was not given a plan for this round.
    NotSelected,
    /// The report's content failed validation (shapes, finiteness, norm, indices).
    Invalid,
    /// An upload's bytes do not match its digest, or a blob is unknown.
    BadBlob,
    /// The server failed (its fault, not the request's).
    Internal,
    /// A secure-aggregation message out of phase, repeated, malformed, or for a session the
    /// device is not (or no longer) part of: the device abandons the session.
    SecAgg,
}

impl WireError {
    /// An error of `code` with `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}
