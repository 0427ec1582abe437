//! The SDK's main loop: enroll once, then connect, authenticate, resend any unacknowledged
//! report, poll, verify the plan, train if the policy allows, store the report, send it —
//! reconnecting with back-off when the network fails, until the run is over or the app stops it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fedtune_shared::model::Llama;
use fedtune_shared::progress::StepProgress;
use fedtune_shared::protocol::auth::PLAN_LABEL;
use fedtune_shared::protocol::{
    Capabilities, DeviceId, Digest, EnrollRequest, ErrorCode, Plan, PollRequest, PublicKey, Report,
    ReportPayload, Request, Response, SigningKey, Task,
};
use fedtune_shared::transport::TransportError;
use fedtune_shared::transport::identity::ServerIdentity;
use tokio::sync::watch;

use crate::connection::Connection;
use crate::events::{Event, EventListener};
use crate::policy::{DeviceConditions, TrainingPolicy};
use crate::secure::{SecureError, SecureOutcome, run_secure_round};
use crate::state::{DeviceState, StateDir, StateError};
use crate::trainer::{FedKSeedModel, TrainError, TrainingData, train_fedspine, train_lora};
use fedtune_shared::protocol::adapter_blob::{decode_adapter, encode_adapter};
use fedtune_shared::protocol::{BlobRef, FedSpineTask, LoraTask};

/// Why the SDK stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The network or the server's answers failed in a way retrying cannot fix.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The state folder failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The server refused the device (not enrolled, revoked, bad token).
    #[error("refused: {0}")]
    Refused(fedtune_shared::protocol::WireError),
    /// A plan failed verification (signature, device, model): the device does not act on it.
    #[error("plan rejected: {0}")]
    PlanRejected(String),
    /// Local training failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// The device is not enrolled yet.
    #[error("not enrolled: call enroll with a token first")]
    NotEnrolled,
    /// A secure round could not draw its secrets.
    #[error("secure aggregation: {0}")]
    SecureAggregation(String),
}

/// How a run of the SDK ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The server's run is over.
    Finished {
        /// Its last round.
        last_round: u64,
    },
    /// The app stopped the SDK.
    Stopped,
}

/// What the app asks of the SDK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Work.
    Run,
    /// Do not start new work; stay connected state on disk.
    Pause,
    /// Stop at the next safe point (state is on disk).
    Stop,
}

/// The app's side of a running SDK: pause, resume, stop, and the device's conditions.
#[derive(Clone)]
pub struct ClientHandle {
    control: watch::Sender<Control>,
    conditions: watch::Sender<DeviceConditions>,
}

impl ClientHandle {
    /// Pauses after the current step.
    pub fn pause(&self) {
        let _ = self.control.send(Control::Pause);
    }
    /// Resumes.
    pub fn resume(&self) {
        let _ = self.control.send(Control::Run);
    }
    /// Stops.
    pub fn stop(&self) {
        let _ = self.control.send(Control::Stop);
    }
    /// Reports new device conditions.
    pub fn set_conditions(&self, conditions: DeviceConditions) {
        let _ = self.conditions.send(conditions);
    }
}

/// The SDK's settings.
pub struct ClientConfig {
    /// The server to trust.
    pub server: ServerIdentity,
    /// The device's state folder.
    pub state_dir: PathBuf,
    /// Digest of the base model the device holds.
    pub base_model: Digest,
    /// What the device says about itself at enrollment.
    pub capabilities: Capabilities,
    /// The policy deciding when training may run.
    pub policy: Arc<dyn TrainingPolicy>,
    /// Receives progress events.
    pub listener: Arc<dyn EventListener>,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
}

/// The device SDK.
pub struct Client {
    config: ClientConfig,
    state_dir: StateDir,
    state: DeviceState,
    key: SigningKey,
    server_key: PublicKey,
    cert_der: Vec<u8>,
    model: FedKSeedModel,
    data: TrainingData,
    control: watch::Receiver<Control>,
    conditions: watch::Receiver<DeviceConditions>,
}

impl Client {
    /// A client over `base` (the device's copy of the base model) and `data`; replays the
    /// history stored in the state folder, so a restarted app holds the model it had.
    pub fn new(
        config: ClientConfig,
        base: Llama,
        data: TrainingData,
    ) -> Result<(Self, ClientHandle), ClientError> {
        let state_dir = StateDir::open(&config.state_dir)?;
        let key = state_dir.device_key()?;
        let state = state_dir.load()?;
        let server_key = config.server.signing_key()?;
        let cert_der = config.server.certificate_der()?;
        let (control_tx, control) = watch::channel(Control::Run);
        let (conditions_tx, conditions) = watch::channel(DeviceConditions::default());
        let mut client = Self {
            config,
            state_dir,
            state,
            key,
            server_key,
            cert_der,
            model: FedKSeedModel::new(base),
            data,
            control,
            conditions,
        };
        client.restore_history()?;
        Ok((
            client,
            ClientHandle {
                control: control_tx,
                conditions: conditions_tx,
            },
        ))
    }

    fn restore_history(&mut self) -> Result<(), ClientError> {
        if self.state.history.is_empty() {
            return Ok(());
        }
        let Some(config) = self.state.fedkseed_config.clone() else {
            return Ok(());
        };
        let history = std::mem::take(&mut self.state.history);
        let applied = self.model.catch_up(&config, &history)?;
        tracing::info!(
            rounds = applied.len(),
            "replayed the stored FedKSeed history"
        );
        self.state.history = applied;
        Ok(())
    }

    /// The device id, once enrolled.
    pub fn device(&self) -> Option<DeviceId> {
        self.state.device
    }

    /// The device's current model (base plus the history it holds).
    pub fn model(&self) -> &Llama {
        self.model.model()
    }

    /// The durable state.
    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    /// Replaces the training data between runs (an app that collected new examples); rounds
    /// already reported are unaffected.
    pub fn set_training_data(&mut self, data: TrainingData) {
        self.data = data;
    }

    fn emit(&self, event: Event) {
        self.config.listener.on_event(event);
    }

    /// Turns a round's finished local steps into [`Event::Training`] on the training thread.
    fn progress(&self, round: u64) -> impl FnMut(StepProgress) + Send + 'static {
        let listener = Arc::clone(&self.config.listener);
        move |p: StepProgress| {
            listener.on_event(Event::Training {
                round,
                step: p.step,
                steps: p.steps,
                loss: p.loss,
            });
        }
    }

    async fn connect(&self) -> Result<Connection, TransportError> {
        Connection::open(self.config.server.address, &self.cert_der).await
    }

    /// Enrolls with an operator-issued token (once; a device already enrolled returns its id).
    pub async fn enroll(&mut self, token: &str) -> Result<DeviceId, ClientError> {
        if let Some(id) = self.state.device {
            return Ok(id);
        }
        let connection = self.connect().await?;
        let request = Request::Enroll(EnrollRequest {
            token: token.to_string(),
            public_key: self.key.public_key(),
            capabilities: self.config.capabilities.clone(),
        });
        let response = connection.request(&request).await.map_err(refusal)?;
        connection.close().await;
        let Response::Enrolled { device } = response else {
            return Err(TransportError::Unexpected(format!("{response:?}")).into());
        };
        if device != self.key.public_key().device_id() {
            return Err(
                TransportError::Unexpected("server assigned a foreign device id".into()).into(),
            );
        }
        self.state.device = Some(device);
        self.state_dir.save(&self.state)?;
        self.emit(Event::Enrolled {
            device: device.to_string(),
        });
        Ok(device)
    }

    /// Works until the server's run is over or the app stops the SDK. Network failures are
    /// retried with exponential back-off; refusals that retrying cannot fix end the run with an
    /// error.
    pub async fn run(&mut self) -> Result<Outcome, ClientError> {
        let device = self.state.device.ok_or(ClientError::NotEnrolled)?;
        let mut backoff = Duration::from_millis(100);
        loop {
            if let Some(outcome) = self.wait_until_allowed().await {
                return Ok(outcome);
            }
            match self.session(device).await {
                Ok(Some(outcome)) => return Ok(outcome),
                Ok(None) => backoff = Duration::from_millis(100),
                Err(ClientError::Transport(e)) if e.is_transient() => {
                    self.emit(Event::Problem {
                        message: e.to_string(),
                    });
                    tracing::info!(error = %e, ?backoff, "connection failed; retrying");
                    self.sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits while paused or while the policy forbids training; `Some` when stopped.
    async fn wait_until_allowed(&mut self) -> Option<Outcome> {
        loop {
            match *self.control.borrow() {
                Control::Stop => return Some(Outcome::Stopped),
                Control::Pause => {}
                Control::Run => {
                    let conditions = *self.conditions.borrow();
                    match self.config.policy.allows(&conditions) {
                        Ok(()) => return None,
                        Err(reason) => self.emit(Event::Deferred {
                            reason: reason.into(),
                        }),
                    }
                }
            }
            if *self.control.borrow() == Control::Pause {
                self.emit(Event::Paused);
            }
            tokio::select! {
                _ = self.control.changed() => {}
                _ = self.conditions.changed() => {}
            }
        }
    }

    async fn sleep(&mut self, duration: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(duration) => {}
            _ = self.control.changed() => {}
        }
    }

    /// One connection's worth of work. `Ok(None)`: come back (paused, conditions changed).
    async fn session(&mut self, device: DeviceId) -> Result<Option<Outcome>, ClientError> {
        let connection = self.connect().await?;
        connection
            .authenticate(device, &self.key)
            .await
            .map_err(refusal)?;
        self.emit(Event::Connected);
        loop {
            if *self.control.borrow() != Control::Run
                || self
                    .config
                    .policy
                    .allows(&self.conditions.borrow())
                    .is_err()
            {
                connection.close().await;
                return Ok(None);
            }
            if let Some(report) = self.state.pending.clone() {
                self.send_report(&connection, report).await?;
                continue;
            }
            let poll = Request::Poll(PollRequest {
                last_seen_round: self.state.last_seen_round,
            });
            match connection.request(&poll).await.map_err(refusal)? {
                Response::Plan(signed) => {
                    let plan = signed
                        .verify(&self.server_key, PLAN_LABEL)
                        .map_err(|e| ClientError::PlanRejected(e.to_string()))?;
                    self.check_plan(&plan, device)?;
                    self.emit(Event::PlanReceived { round: plan.round });
                    self.train(&connection, plan).await?;
                }
                Response::Wait {
                    retry_after_ms,
                    reason,
                } => {
                    self.emit(Event::Waiting { reason });
                    self.sleep(Duration::from_millis(retry_after_ms.clamp(10, 60_000)))
                        .await;
                }
                Response::Finished { last_round } => {
                    self.emit(Event::Finished { last_round });
                    connection.close().await;
                    return Ok(Some(Outcome::Finished { last_round }));
                }
                other => return Err(TransportError::Unexpected(format!("{other:?}")).into()),
            }
        }
    }

    fn check_plan(&mut self, plan: &Plan, device: DeviceId) -> Result<(), ClientError> {
        if plan.device != device {
            return Err(ClientError::PlanRejected(
                "the plan is for another device".into(),
            ));
        }
        if plan.base_model != self.config.base_model {
            return Err(ClientError::PlanRejected(format!(
                "the plan is for base model {}, this device holds {}",
                plan.base_model, self.config.base_model
            )));
        }
        if self.state.run_id != Some(plan.run_id) {
            if self.state.run_id.is_some() {
                tracing::info!(run = plan.run_id, "a new run: back to the base model");
            }
            self.model.reset();
            self.state = DeviceState {
                device: self.state.device,
                run_id: Some(plan.run_id),
                ..DeviceState::default()
            };
            self.state_dir.save(&self.state)?;
        }
        Ok(())
    }

    async fn train(&mut self, connection: &Connection, plan: Plan) -> Result<(), ClientError> {
        let (zo_plan, batch_size) = match plan.task.clone() {
            Task::FedKSeed {
                plan: zo_plan,
                batch_size,
            } => (zo_plan, batch_size),
            Task::Lora(task) => return self.train_lora(connection, plan, task).await,
            Task::FedSpine(task) => return self.train_fedspine(connection, plan, task).await,
            _ => {
                return Err(ClientError::PlanRejected(
                    "the plan's algorithm is unknown to this SDK".into(),
                ));
            }
        };
        let mut model = self.model.clone();
        let data = self.data.clone();
        let local_seed = plan.local_seed;
        let mut progress = self.progress(plan.round);
        let (model, result) = tokio::task::spawn_blocking(move || {
            let result = model.train(&zo_plan, batch_size, local_seed, &data, &mut progress);
            (model, result.map(|r| (r, zo_plan.config)))
        })
        .await
        .map_err(|e| TransportError::Unexpected(format!("training thread failed: {e}")))?;
        let ((applied, report, stats), config) = result?;
        self.model = model;
        self.state.history.extend(applied);
        self.state.fedkseed_config = Some(config.clone());
        self.state.last_seen_round = plan.round - 1;
        if let Some(secure) = plan.secure {
            self.state_dir.save(&self.state)?;
            let (update, statistics) = fedtune_shared::protocol::secure::fedkseed_parts(
                &report,
                &config,
                secure.dp.is_some(),
                secure.config.quantizer.clip(),
            );
            return self
                .secure_round(connection, plan.round, secure, &update, &statistics, stats)
                .await;
        }
        self.state.pending = Some(Report {
            run_id: plan.run_id,
            round: plan.round,
            stats,
            payload: ReportPayload::FedKSeed(report),
        });
        // Durable before it is sent: a killed app resends it on restart, and the server counts
        // it once.
        self.state_dir.save(&self.state)?;
        self.emit(Event::ReportReady { round: plan.round });
        Ok(())
    }

    async fn train_lora(
        &mut self,
        connection: &Connection,
        plan: Plan,
        task: LoraTask,
    ) -> Result<(), ClientError> {
        let global = self.fetch_adapter(connection, task.adapter).await?;
        let base = self.model.base().clone();
        let data = self.data.clone();
        let local_seed = plan.local_seed;
        let train_task = task.clone();
        let sent = global.clone();
        let mut progress = self.progress(plan.round);
        let (weights, stats) = tokio::task::spawn_blocking(move || {
            train_lora(&base, &train_task, &sent, &data, local_seed, &mut progress)
        })
        .await
        .map_err(|e| TransportError::Unexpected(format!("training thread failed: {e}")))??;
        if let Some(secure) = plan.secure {
            let update = fedtune_shared::robust::flat::adapter_delta(&global, &weights)
                .map_err(|e| TrainError::Adapter(e.to_string()))?;
            return self
                .secure_round(connection, plan.round, secure, &update, &[], stats)
                .await;
        }
        let rank = task.lora.rank;
        self.store_adapter_report(&plan, &weights, stats, |adapter| ReportPayload::Lora {
            adapter,
            rank,
        })
    }

    async fn train_fedspine(
        &mut self,
        connection: &Connection,
        plan: Plan,
        task: FedSpineTask,
    ) -> Result<(), ClientError> {
        let global = self.fetch_adapter(connection, task.lora.adapter).await?;
        let base = self.model.base().clone();
        let data = self.data.clone();
        let local_seed = plan.local_seed;
        let train_task = task.clone();
        let mut progress = self.progress(plan.round);
        let outcome = tokio::task::spawn_blocking(move || {
            train_fedspine(
                &base,
                &train_task,
                &global,
                &data,
                local_seed,
                &mut progress,
            )
        })
        .await
        .map_err(|e| TransportError::Unexpected(format!("training thread failed: {e}")))??;
        let rank = task.lora.lora.rank;
        let kept = outcome.kept;
        self.store_adapter_report(&plan, &outcome.adapter, outcome.stats, |adapter| {
            ReportPayload::FedSpine {
                adapter,
                rank,
                kept,
            }
        })
    }

    /// Runs a secure round's SecAgg+ phases for `update` and `statistics` (see
    /// [`run_secure_round`]). A refusal drops the round (the device polls for work again); the
    /// network's failures reconnect, as anywhere else.
    async fn secure_round(
        &mut self,
        connection: &Connection,
        round: u64,
        secure: fedtune_shared::protocol::secure::SecureRound,
        update: &[f32],
        statistics: &[f32],
        stats: fedtune_shared::protocol::LocalStats,
    ) -> Result<(), ClientError> {
        match run_secure_round(connection, round, secure, update, statistics, stats).await {
            Ok(SecureOutcome::Done) => {
                self.state.last_reported_round = round;
                self.state_dir.save(&self.state)?;
                self.emit(Event::Reported {
                    round,
                    duplicate: false,
                });
                Ok(())
            }
            Ok(SecureOutcome::Abandoned(reason)) => {
                tracing::warn!(round, %reason, "left the secure aggregation session");
                self.emit(Event::Problem {
                    message: format!("secure round {round} not counted: {reason}"),
                });
                Ok(())
            }
            Err(SecureError::Transport(e)) => Err(refusal(e)),
            Err(e) => Err(ClientError::SecureAggregation(e.to_string())),
        }
    }

    /// The global adapter a LoRA or FedSpine plan names, downloaded and decoded.
    async fn fetch_adapter(
        &mut self,
        connection: &Connection,
        blob: Option<BlobRef>,
    ) -> Result<fedtune_shared::lora::adapter::AdapterWeights, ClientError> {
        let Some(blob) = blob else {
            return Err(ClientError::PlanRejected(
                "an adapter plan without an adapter".into(),
            ));
        };
        let bytes = self.fetch_blob(connection, blob).await?;
        Ok(decode_adapter(&bytes).map_err(|e| TrainError::Adapter(e.to_string()))?)
    }

    /// Puts the trained adapter in the outbox and the report that names it in the durable
    /// state, to be uploaded and sent.
    fn store_adapter_report(
        &mut self,
        plan: &Plan,
        weights: &fedtune_shared::lora::adapter::AdapterWeights,
        stats: fedtune_shared::protocol::LocalStats,
        payload: impl FnOnce(BlobRef) -> ReportPayload,
    ) -> Result<(), ClientError> {
        let encoded = encode_adapter(weights);
        let adapter = BlobRef {
            digest: Digest::of(&encoded),
            len: encoded.len() as u64,
        };
        self.state_dir.put_outbox(&adapter.digest, &encoded)?;
        self.state.pending = Some(Report {
            run_id: plan.run_id,
            round: plan.round,
            stats,
            payload: payload(adapter),
        });
        self.state_dir.save(&self.state)?;
        self.emit(Event::ReportReady { round: plan.round });
        Ok(())
    }

    /// A blob the server holds, resuming a partial download left by a dropped connection and
    /// checking the digest once complete.
    async fn fetch_blob(
        &mut self,
        connection: &Connection,
        blob: BlobRef,
    ) -> Result<Vec<u8>, ClientError> {
        if blob.len > fedtune_shared::protocol::MAX_BLOB {
            return Err(ClientError::PlanRejected(format!(
                "a blob of {} bytes",
                blob.len
            )));
        }
        let part = self.state_dir.download_path(&blob.digest);
        for _ in 0..3 {
            let held = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
            if held < blob.len {
                connection
                    .download(blob.digest, held, blob.len, &part)
                    .await?;
            }
            let bytes = std::fs::read(&part).map_err(TransportError::from)?;
            let _ = std::fs::remove_file(&part);
            if bytes.len() as u64 == blob.len && Digest::of(&bytes) == blob.digest {
                return Ok(bytes);
            }
            tracing::warn!(digest = %blob.digest, "downloaded blob does not match its digest; fetching again");
        }
        Err(
            TransportError::Unexpected(format!("blob {} never matched its digest", blob.digest))
                .into(),
        )
    }

    /// Makes sure the server holds an uploaded blob, resuming from what it already has.
    async fn ensure_uploaded(
        &mut self,
        connection: &Connection,
        blob: BlobRef,
    ) -> Result<(), ClientError> {
        let bytes = self.state_dir.outbox(&blob.digest)?;
        for _ in 0..5 {
            let offset = match connection
                .request(&Request::UploadStatus {
                    digest: blob.digest,
                })
                .await?
            {
                Response::UploadOffset { offset } => offset,
                other => return Err(TransportError::Unexpected(format!("{other:?}")).into()),
            };
            if offset >= blob.len {
                return Ok(());
            }
            match connection.upload(blob.digest, &bytes, offset).await? {
                Response::Uploaded { .. } => return Ok(()),
                Response::UploadOffset { .. } => continue,
                other => return Err(TransportError::Unexpected(format!("{other:?}")).into()),
            }
        }
        Err(TransportError::Unexpected("upload did not complete".into()).into())
    }

    async fn send_report(
        &mut self,
        connection: &Connection,
        report: Report,
    ) -> Result<(), ClientError> {
        let round = report.round;
        if let Some(adapter) = report.payload.adapter() {
            self.ensure_uploaded(connection, adapter).await?;
        }
        match connection.request(&Request::Report(report)).await {
            Ok(Response::Accepted { round, duplicate }) => {
                self.emit(Event::Reported { round, duplicate });
                self.state.last_reported_round = round;
            }
            Ok(other) => return Err(TransportError::Unexpected(format!("{other:?}")).into()),
            Err(TransportError::Refused(e))
                if matches!(
                    e.code,
                    ErrorCode::WrongRound | ErrorCode::NotSelected | ErrorCode::Invalid
                ) =>
            {
                // The round closed without it (or it was refused): drop it and move on.
                tracing::warn!(round, error = %e, "report not counted");
                self.emit(Event::Problem {
                    message: format!("report for round {round} not counted: {e}"),
                });
            }
            Err(e) => return Err(refusal(e)),
        }
        if let Some(adapter) = self.state.pending.take().and_then(|r| r.payload.adapter()) {
            self.state_dir.remove_outbox(&adapter.digest);
        }
        self.state.pending = None;
        self.state_dir.save(&self.state)?;
        Ok(())
    }
}

/// Refusals that mean "this device may not continue" become [`ClientError::Refused`].
fn refusal(e: TransportError) -> ClientError {
    match e {
        TransportError::Refused(w)
            if matches!(
                w.code,
                ErrorCode::Unauthenticated
                    | ErrorCode::Revoked
                    | ErrorCode::BadToken
                    | ErrorCode::VersionMismatch
            ) =>
        {
            ClientError::Refused(w)
        }
        e => ClientError::Transport(e),
    }
}
