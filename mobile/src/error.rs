//! The SDK's one error type, thrown to Kotlin as `FedtuneException`, to Swift as `FedtuneError`
//! and to Python as `FedtuneError`, each variant its own subclass / case so apps can match on it.

use fedtune_client::ClientError;

/// Why an SDK call (or the background work it started) failed.
///
/// Calls that can be checked at once throw it; failures of background work (enrollment, a
/// training run) arrive through `ProgressListener::on_error`.
#[derive(Debug, Clone, PartialEq, thiserror::Error, uniffi::Error)]
pub enum FedtuneError {
    /// A setting is unusable (an address that does not parse, a malformed certificate or key,
    /// a sequence length of zero).
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// The model could not be opened or the requested compute backend could not be started.
    #[error("model: {reason}")]
    Model {
        /// What failed.
        reason: String,
    },
    /// The data directory (state, keys, training examples) could not be read or written.
    #[error("storage: {reason}")]
    Storage {
        /// What failed.
        reason: String,
    },
    /// The server could not be reached or answered in a way retrying cannot fix (including a
    /// certificate that does not match the pinned one).
    #[error("network: {reason}")]
    Network {
        /// What failed.
        reason: String,
    },
    /// The server refused this device (a bad or used-up enrollment token, a revoked device).
    #[error("refused by the server: {reason}")]
    Refused {
        /// The server's reason.
        reason: String,
    },
    /// A plan from the server failed verification; the SDK does not act on it.
    #[error("plan rejected: {reason}")]
    PlanRejected {
        /// Why.
        reason: String,
    },
    /// Local training failed.
    #[error("training: {reason}")]
    Training {
        /// What failed.
        reason: String,
    },
    /// `start` before the device enrolled.
    #[error("not enrolled: call enroll first")]
    NotEnrolled,
    /// `start` with no training examples in the local store.
    #[error("no training examples: add some before starting")]
    NoTrainingData,
    /// The client was closed; create a new one.
    #[error("the client is closed")]
    Closed,
}

impl From<ClientError> for FedtuneError {
    fn from(e: ClientError) -> Self {
        let reason = e.to_string();
        match e {
            ClientError::Transport(_) => Self::Network { reason },
            ClientError::State(_) => Self::Storage { reason },
            ClientError::Refused(_) => Self::Refused { reason },
            ClientError::PlanRejected(_) => Self::PlanRejected { reason },
            ClientError::Train(_) => Self::Training { reason },
            ClientError::NotEnrolled => Self::NotEnrolled,
            // ClientError is non-exhaustive: a new kind is most likely a server-side failure.
            _ => Self::Network { reason },
        }
    }
}
