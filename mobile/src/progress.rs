//! What the SDK tells the app while it works: progress events for a UI, the client's state, and
//! the listener the app implements to receive both (and background errors).

use fedtune_client::Event;

use crate::error::FedtuneError;

/// One thing that happened, in the order it happened.
#[derive(Debug, Clone, PartialEq, uniffi::Enum)]
pub enum ProgressEvent {
    /// The base model is loaded and the stored training history replayed; the SDK is ready.
    ModelLoaded {
        /// The compute backend it runs on: `cpu` or `wgpu`.
        backend: String,
    },
    /// The device enrolled with the server (also sent by `enroll` on a device already
    /// enrolled).
    Enrolled {
        /// The device's id.
        device_id: String,
    },
    /// Connected and authenticated.
    Connected,
    /// The server has no work for this device now; the SDK asks again later.
    Waiting {
        /// The server's reason.
        reason: String,
    },
    /// A verified plan arrived and training started.
    PlanReceived {
        /// Its round.
        round: u64,
    },
    /// Training progress within a round.
    Training {
        /// The round.
        round: u64,
        /// Steps done.
        step: u64,
        /// Steps planned.
        steps: u64,
    },
    /// A round's update is trained and stored; it is sent next.
    ReportReady {
        /// The round.
        round: u64,
    },
    /// The server acknowledged the round's update.
    Reported {
        /// The round.
        round: u64,
        /// It had been counted already (a resend after an interruption).
        duplicate: bool,
    },
    /// The policy forbids training under the current conditions; the SDK waits for new ones.
    Deferred {
        /// The policy's reason (`not charging`, `on a metered network`, `device in use`,
        /// `device too hot`, `battery too low`).
        reason: String,
    },
    /// The app paused the SDK; it waits for `start`.
    Paused,
    /// The server's run is over.
    Finished {
        /// Its last round.
        last_round: u64,
    },
    /// The app stopped the SDK (state is on disk; `start` continues).
    Stopped,
    /// A recoverable problem: the SDK retries by itself.
    Problem {
        /// What went wrong.
        reason: String,
    },
}

impl ProgressEvent {
    /// The app-facing form of a client SDK event; `None` for kinds this version does not know.
    pub(crate) fn from_client(event: Event) -> Option<Self> {
        Some(match event {
            Event::Enrolled { device } => Self::Enrolled { device_id: device },
            Event::Connected => Self::Connected,
            Event::Waiting { reason } => Self::Waiting { reason },
            Event::PlanReceived { round } => Self::PlanReceived { round },
            Event::Training {
                round, step, steps, ..
            } => Self::Training {
                round,
                step: step as u64,
                steps: steps as u64,
            },
            Event::ReportReady { round } => Self::ReportReady { round },
            Event::Reported { round, duplicate } => Self::Reported { round, duplicate },
            Event::Deferred { reason } => Self::Deferred { reason },
            Event::Paused => Self::Paused,
            Event::Finished { last_round } => Self::Finished { last_round },
            Event::Problem { message } => Self::Problem { reason: message },
            _ => return None,
        })
    }

    /// The state the client is in after this event, where the event says.
    pub(crate) fn state_after(&self) -> Option<ClientState> {
        Some(match self {
            Self::Connected | Self::PlanReceived { .. } | Self::Training { .. } => {
                ClientState::Training
            }
            Self::Waiting { .. } => ClientState::Waiting,
            Self::Deferred { .. } => ClientState::Deferred,
            Self::Paused => ClientState::Paused,
            Self::Finished { .. } => ClientState::Finished,
            Self::Stopped => ClientState::Stopped,
            _ => return None,
        })
    }
}

/// Where the client is, for a status line in the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum ClientState {
    /// Created; nothing started.
    Idle,
    /// Loading the model or enrolling.
    Preparing,
    /// Started: connected, training or sending.
    Training,
    /// Started, but the server has no work now.
    Waiting,
    /// Started, but the policy forbids training under the current conditions.
    Deferred,
    /// Paused by the app.
    Paused,
    /// Stopped by the app.
    Stopped,
    /// The server's run is over.
    Finished,
    /// Background work failed; the error went to `ProgressListener::on_error`.
    Failed,
}

/// Implemented by the app to follow the SDK. Called on the SDK's background thread: return
/// quickly and hop to the UI thread yourself (Android: `runOnUiThread`; iOS:
/// `DispatchQueue.main.async`).
#[uniffi::export(callback_interface)]
pub trait ProgressListener: Send + Sync {
    /// One progress event.
    fn on_event(&self, event: ProgressEvent);
    /// Background work failed (enrollment, loading the model, a training run). The client
    /// stays usable: fix the cause and call the method again.
    fn on_error(&self, error: FedtuneError);
}
