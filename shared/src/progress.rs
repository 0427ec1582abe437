//! Step-by-step progress of a device's local training, for an app's progress display: the
//! training loops report each finished step to a [`Progress`] the caller passes in, so the
//! loops stay free of any event or UI machinery.

/// One finished local step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepProgress {
    /// Steps done so far this round (1 after the first).
    pub step: usize,
    /// Steps the round plans.
    pub steps: usize,
    /// The step's training loss; `None` when the step was skipped (a non-finite loss).
    pub loss: Option<f32>,
}

/// Receives progress. Called on the training thread between steps: keep it quick.
pub trait Progress {
    /// A step finished.
    fn step_done(&mut self, progress: StepProgress);
}

impl<F: FnMut(StepProgress)> Progress for F {
    fn step_done(&mut self, progress: StepProgress) {
        self(progress);
    }
}

/// Progress no one watches.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Progress for Silent {
    fn step_done(&mut self, _: StepProgress) {}
}
