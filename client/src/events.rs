//! What the SDK tells the app while it works, for a progress UI and logs.

/// One thing that happened.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// The device enrolled with the server.
    Enrolled {
        /// Its id.
        device: String,
    },
    /// Connected and authenticated.
    Connected,
    /// The server has no work now.
    Waiting {
        /// Why.
        reason: String,
    },
    /// A verified plan arrived.
    PlanReceived {
        /// Its round.
        round: u64,
    },
    /// Training progress within a round.
    Training {
        /// The round.
        round: u64,
        /// Steps done.
        step: usize,
        /// Steps planned.
        steps: usize,
        /// The step's training loss (`None` for a step skipped on a non-finite loss).
        loss: Option<f32>,
    },
    /// A round's report is written to disk and about to be sent.
    ReportReady {
        /// The round.
        round: u64,
    },
    /// The report was acknowledged.
    Reported {
        /// The round.
        round: u64,
        /// It had already been counted (a resend).
        duplicate: bool,
    },
    /// Training may not run under the current conditions.
    Deferred {
        /// The policy's reason.
        reason: String,
    },
    /// The app paused the SDK.
    Paused,
    /// The run is over.
    Finished {
        /// Its last round.
        last_round: u64,
    },
    /// A recoverable problem (the SDK retries).
    Problem {
        /// What went wrong.
        message: String,
    },
}

/// Receives events; called from the SDK's worker thread, so it must not block for long.
pub trait EventListener: Send + Sync {
    /// One event.
    fn on_event(&self, event: Event);
}

impl<F: Fn(Event) + Send + Sync> EventListener for F {
    fn on_event(&self, event: Event) {
        self(event)
    }
}
