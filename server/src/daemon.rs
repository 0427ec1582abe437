//! The daemon's core: the store, the registry, the orchestrator and the algorithm behind one
//! lock, answering decoded requests. No sockets here ([`crate::transport`] moves the bytes), so
//! tests can call [`Core::handle`] directly.
//!
//! Durability: a report is acknowledged only after the store has committed it; a round's
//! aggregate, new algorithm state and summary are committed together; after a crash the core
//! reopens at the stored state, counts the round's stored reports, and aggregates at once if
//! they already reach the quorum.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fedtune_shared::protocol::auth::EXPORTER_LEN;
use fedtune_shared::protocol::auth::PLAN_LABEL;
use fedtune_shared::protocol::blob::model_digest;
use fedtune_shared::protocol::frame::{decode_body, encode_body};
use fedtune_shared::protocol::secure::SecAggUpload;
use fedtune_shared::protocol::{
    DeviceId, Digest, ErrorCode, MAX_REQUEST_FRAME, PROTOCOL_VERSION, Plan, PollRequest, Report,
    Request, Response, WireError,
};

use crate::algorithm::combine::UpdateCombiner;
use crate::algorithm::fedkseed::FedKSeed;
use crate::algorithm::fedspine::{FedSpine, FedSpineSettings};
use crate::algorithm::lora::{Lora, LoraSettings};
use crate::algorithm::{AlgorithmError, RoundSummary, ServerAlgorithm};
use crate::blobs::{BlobError, Blobs};
use crate::config::{AlgorithmConfig, ServerConfig};
use crate::identity::{IdentityError, ServerKeys};
use crate::metrics::Metrics;
use crate::registry::{DeviceRecord, Registry, RegistryError};
use crate::rounds::{Phase, PoissonSampling, PollDecision, RoundRefusal, RoundRules, Rounds};
use crate::secure::{PollAnswer, SecureSession, SessionRefusal};
use crate::store::{PutOutcome, Store, StoreError};
use fedtune_shared::privacy::dp::Selection;

/// The store's key for the secret that decides which devices a Poisson-sampled round takes
/// (kept so that a restarted daemon samples as it did).
pub const SAMPLING_KEY: &str = "sampling_key";

/// The store's key for the protocol version its records are encoded in.
pub const RECORDS_FORMAT_KEY: &str = "records_format";

/// Why the daemon could not start or continue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// Keys could not be loaded or made.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The algorithm failed.
    #[error(transparent)]
    Algorithm(#[from] AlgorithmError),
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The base model could not be read.
    #[error("cannot read the base model {path}: {source}")]
    Model {
        /// The model path.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The socket or TLS set-up failed.
    #[error("network: {0}")]
    Network(String),
    /// The blob folders failed.
    #[error(transparent)]
    Blobs(#[from] BlobError),
    /// The stored run was made with another algorithm or model.
    #[error("the state folder holds a run of another configuration: {0}")]
    Mismatch(String),
    /// The operator's control socket failed, or the daemon refused a command sent to it.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
}

/// What a connection has established.
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// The authenticated device.
    pub device: Option<DeviceId>,
    /// The TLS exporter output of the connection (what a device signs).
    pub exporter: [u8; EXPORTER_LEN],
}

struct Running {
    rounds: Rounds,
    algorithm: Box<dyn ServerAlgorithm>,
    /// The open round's SecAgg+ session (secure aggregation only; made with the first plan).
    secure: Option<SecureSession>,
}

/// The daemon's state and request handling.
pub struct Core {
    config: ServerConfig,
    store: Store,
    keys: ServerKeys,
    blobs: Blobs,
    base_model: Digest,
    run_id: u64,
    metrics: Arc<Metrics>,
    running: Mutex<Running>,
}

/// Poisson sampling of each round's devices when DP asks for it, with the run's key (made once
/// and stored, so a restarted daemon samples as before).
fn round_sampling(
    config: &ServerConfig,
    store: &Store,
) -> Result<Option<PoissonSampling>, DaemonError> {
    Ok(match config.privacy.dp {
        Some(dp) if dp.selection == Selection::Poisson => {
            let key = match store.meta(SAMPLING_KEY)? {
                Some(key) => key,
                None => {
                    let key = rand::random::<[u8; 32]>().to_vec();
                    store.put_meta(SAMPLING_KEY, &key)?;
                    key
                }
            };
            let rate = dp.poisson_rate(config.rounds.slots());
            tracing::info!(rate, "devices are Poisson-sampled into rounds");
            Some(PoissonSampling::new(rate, &key))
        }
        Some(_) => {
            tracing::warn!(
                "differential privacy with first-come selection: ε is accounted without \
                 sampling amplification (set privacy.dp.selection = \"poisson\" for it)"
            );
            None
        }
        None => None,
    })
}

fn rules(config: &ServerConfig, sampling: Option<PoissonSampling>) -> RoundRules {
    let r = &config.rounds;
    RoundRules {
        total_rounds: r.total_rounds,
        quorum: r.clients_per_round,
        slots: r.slots(),
        min_reports: r.min_reports,
        deadline: r.deadline(),
        sampling,
    }
}

fn wire(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error(WireError::new(code, message))
}

fn body_of<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Records of plain numbers and strings always encode.
    encode_body(value).unwrap_or_default()
}

impl Core {
    /// Opens (or creates) the daemon's state for `config`.
    pub fn open(config: ServerConfig) -> Result<Self, DaemonError> {
        let keys = ServerKeys::load_or_create(&config.state_dir.join("keys"))?;
        let store = Store::open(&config.state_dir.join("store"))?;
        let blobs = Blobs::open(&config.state_dir)?;
        let base_model = model_digest(&config.model).map_err(|source| DaemonError::Model {
            path: config.model.clone(),
            source,
        })?;
        let algorithm_tag = match &config.algorithm {
            AlgorithmConfig::Fedkseed { .. } => "fedkseed",
            AlgorithmConfig::Lora { .. } => "lora",
            AlgorithmConfig::FedSpine { .. } => "fedspine",
        };
        let run_id = match store.meta("run_id")? {
            Some(bytes) => {
                // Reports and round summaries are stored in the wire encoding; there is no
                // migration between versions, so a run is finished by the daemon that began it.
                let format = match store.meta(RECORDS_FORMAT_KEY)? {
                    Some(v) => {
                        u16::from_le_bytes(v.try_into().map_err(|_| StoreError::Corrupt {
                            what: RECORDS_FORMAT_KEY.into(),
                        })?)
                    }
                    None => 1,
                };
                if format != PROTOCOL_VERSION {
                    return Err(DaemonError::Mismatch(format!(
                        "its records were written by a daemon of protocol version {format} and \
                         this one reads version {PROTOCOL_VERSION}: finish that run with the \
                         daemon that began it, or start from an empty state folder"
                    )));
                }
                let stored_model = store.meta("base_model")?.unwrap_or_default();
                if stored_model != base_model.0 {
                    return Err(DaemonError::Mismatch("the base model changed".into()));
                }
                if store.meta("algorithm")?.as_deref() != Some(algorithm_tag.as_bytes()) {
                    return Err(DaemonError::Mismatch("the algorithm changed".into()));
                }
                u64::from_le_bytes(bytes.try_into().map_err(|_| StoreError::Corrupt {
                    what: "run_id".into(),
                })?)
            }
            None => {
                let id: u64 = rand::random();
                store.put_meta("base_model", &base_model.0)?;
                store.put_meta("algorithm", algorithm_tag.as_bytes())?;
                store.put_meta(RECORDS_FORMAT_KEY, &PROTOCOL_VERSION.to_le_bytes())?;
                store.put_meta("run_id", &id.to_le_bytes())?;
                id
            }
        };
        let max_norm = config.validation.max_update_norm;
        let combiner = UpdateCombiner::new(config.robust, config.privacy.dp)?
            .with_cohort(config.rounds.slots());
        let algorithm: Box<dyn ServerAlgorithm> = match (&config.algorithm, store.state()?) {
            (AlgorithmConfig::Fedkseed { run, batch_size }, None) => {
                Box::new(FedKSeed::new(run.clone(), *batch_size, max_norm).with_combiner(combiner))
            }
            (AlgorithmConfig::Fedkseed { batch_size, .. }, Some(bytes)) => Box::new(
                FedKSeed::restore(&bytes, *batch_size, max_norm)?
                    .with_combiner(combiner)
                    .restore_dp(&bytes),
            ),
            (AlgorithmConfig::Lora { .. }, stored) => {
                let settings = lora_settings(&config, max_norm)?;
                match stored {
                    Some(bytes) => Box::new(
                        Lora::restore(settings, blobs.clone(), &bytes)?
                            .with_combiner(combiner)
                            .restore_dp(&bytes),
                    ),
                    None => {
                        let (initial, _) = initial_adapter(&config, &settings)?;
                        Box::new(
                            Lora::new(settings, blobs.clone(), initial).with_combiner(combiner),
                        )
                    }
                }
            }
            (
                AlgorithmConfig::FedSpine {
                    ratios, schedule, ..
                },
                stored,
            ) => {
                // Masked aggregation has no robust or private variant yet: refusing beats
                // silently aggregating in the clear.
                if !combiner.is_plain() {
                    return Err(DaemonError::Mismatch(
                        "[robust] and [privacy.dp] are not available for FedSpine yet".into(),
                    ));
                }
                let lora = lora_settings(&config, max_norm)?;
                // The model is read either way: its layer shapes check every report.
                let (initial, shapes) = initial_adapter(&config, &lora)?;
                let settings = FedSpineSettings {
                    lora,
                    ratios: ratios.clone(),
                    schedule: schedule.clone(),
                    shapes,
                };
                match stored {
                    Some(bytes) => Box::new(FedSpine::restore(settings, blobs.clone(), &bytes)?),
                    None => Box::new(FedSpine::new(settings, blobs.clone(), initial)),
                }
            }
        };
        if config.privacy.secure_aggregation {
            check_secure_length(algorithm.as_ref())?;
        }
        let round = algorithm.round();
        let reported: BTreeSet<DeviceId> = store
            .reports(round)?
            .into_iter()
            .map(|(id, _)| DeviceId(id))
            .collect();
        tracing::info!(
            run_id,
            round,
            stored_reports = reported.len(),
            "daemon state opened"
        );
        let sampling = round_sampling(&config, &store)?;
        let rounds = Rounds::resume(rules(&config, sampling), round, reported, Instant::now());
        let metrics = Arc::new(Metrics::default());
        metrics.current_round.set(round as i64);
        let core = Self {
            config,
            store,
            keys,
            blobs,
            base_model,
            run_id,
            metrics,
            running: Mutex::new(Running {
                rounds,
                algorithm,
                secure: None,
            }),
        };
        {
            let mut running = core.lock();
            if running.rounds.phase() == Phase::Closing {
                tracing::info!(round, "stored reports reach the quorum; aggregating now");
                core.finish_round(&mut running)?;
            }
        }
        Ok(core)
    }

    fn lock(&self) -> MutexGuard<'_, Running> {
        // A panic while holding the lock leaves state that was only ever changed after durable
        // writes, so continuing with it is sound.
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The server's keys.
    pub fn keys(&self) -> &ServerKeys {
        &self.keys
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The run id.
    pub fn run_id(&self) -> u64 {
        self.run_id
    }

    /// The current round and phase.
    pub fn round(&self) -> (u64, Phase) {
        let running = self.lock();
        (running.rounds.round(), running.rounds.phase())
    }

    /// The algorithm's state bytes (what the store holds after each round).
    pub fn algorithm_state(&self) -> Vec<u8> {
        self.lock().algorithm.state()
    }

    /// Answers one request on a connection.
    pub fn handle(&self, session: &mut Session, request: Request, now: Instant) -> Response {
        let response = self.dispatch(session, request, now);
        if let Response::Error(e) = &response {
            self.metrics.refuse(&format!("{:?}", e.code));
            tracing::debug!(device = ?session.device, error = %e, "request refused");
        }
        response
    }

    fn dispatch(&self, session: &mut Session, request: Request, now: Instant) -> Response {
        let registry = Registry::new(&self.store);
        match request {
            Request::Enroll(enroll) => {
                match registry.enroll(&enroll.token, enroll.public_key, enroll.capabilities) {
                    Ok(device) => {
                        self.metrics.enrollments.inc();
                        tracing::info!(%device, "device enrolled");
                        Response::Enrolled { device }
                    }
                    Err(RegistryError::BadToken) => wire(
                        ErrorCode::BadToken,
                        "enrollment token is unknown or used up",
                    ),
                    Err(RegistryError::Revoked(d)) => {
                        wire(ErrorCode::Revoked, format!("device {d} is revoked"))
                    }
                    Err(e) => self.internal(e),
                }
            }
            Request::Authenticate(auth) => {
                match registry.authenticate(auth.device, &session.exporter, &auth.signature) {
                    Ok(_) => {
                        session.device = Some(auth.device);
                        Response::Authenticated
                    }
                    Err(RegistryError::Revoked(d)) => {
                        wire(ErrorCode::Revoked, format!("device {d} is revoked"))
                    }
                    Err(RegistryError::Unknown(d)) => wire(
                        ErrorCode::Unauthenticated,
                        format!("device {d} is not enrolled"),
                    ),
                    Err(RegistryError::BadProof(d)) => wire(
                        ErrorCode::Unauthenticated,
                        format!("device {d} failed to prove its key"),
                    ),
                    Err(e) => self.internal(e),
                }
            }
            request => {
                let (device, record) = match self.authorized(session) {
                    Ok(authorized) => authorized,
                    Err(refusal) => return refusal,
                };
                match request {
                    Request::Poll(poll) => self.poll(device, poll, now),
                    Request::Report(report) if self.config.privacy.secure_aggregation => {
                        let _ = (record, report);
                        wire(
                            ErrorCode::Invalid,
                            "rounds are secure: updates go through the SecAgg+ phases, not reports",
                        )
                    }
                    Request::Report(report) => self.report(device, record, report),
                    Request::SecAgg { round, message } => {
                        self.secagg_message(device, round, message, now)
                    }
                    Request::SecAggPoll { round } => self.secagg_poll(device, round),
                    Request::UploadStatus { digest } => Response::UploadOffset {
                        offset: self.blobs.upload_offset(device, &digest),
                    },
                    _ => wire(
                        ErrorCode::Malformed,
                        "blob transfers carry raw bytes on their stream",
                    ),
                }
            }
        }
    }

    fn internal(&self, error: impl std::fmt::Display) -> Response {
        tracing::error!(%error, "internal error");
        wire(ErrorCode::Internal, "internal server error")
    }

    fn poll(&self, device: DeviceId, poll: PollRequest, now: Instant) -> Response {
        let mut running = self.lock();
        match running.rounds.on_poll(device, now) {
            PollDecision::Finished { last_round } => Response::Finished { last_round },
            PollDecision::Wait {
                retry_after,
                reason,
            } => Response::Wait {
                retry_after_ms: retry_after.as_millis() as u64,
                reason: reason.into(),
            },
            PollDecision::Plan { round, time_left } => {
                let task = match running.algorithm.task(device, poll.last_seen_round) {
                    Ok(task) => task,
                    Err(e) => return self.internal(e),
                };
                if running.algorithm.tasks_change_state()
                    && let Err(e) = self.store.put_state(&running.algorithm.state())
                {
                    return self.internal(e);
                }
                let secure = if self.config.privacy.secure_aggregation {
                    match self.session(&mut running, round) {
                        Ok(session) => Some(session.assign(device)),
                        Err(e) => return self.internal(e),
                    }
                } else {
                    None
                };
                let plan = Plan {
                    run_id: self.run_id,
                    round,
                    device,
                    base_model: self.base_model,
                    local_seed: local_seed(self.config.rounds.seed, round, device),
                    deadline_ms: time_left.as_millis() as u64,
                    task,
                    secure,
                };
                match self.keys.signing.sign_value(PLAN_LABEL, &plan) {
                    Ok(signed) => Response::Plan(signed),
                    Err(e) => self.internal(e),
                }
            }
        }
    }

    fn report(&self, device: DeviceId, mut record: DeviceRecord, report: Report) -> Response {
        if report.run_id != self.run_id {
            return wire(ErrorCode::WrongRound, "the report belongs to another run");
        }
        let mut running = self.lock();
        let round = report.round;
        // A resend of a report already stored (its acknowledgement was lost) counts once.
        // The open round's stored reports are known in memory; an earlier round's need one lookup.
        let resent = if round == running.rounds.round() {
            Ok(running.rounds.reported().contains(&device))
        } else if round < running.rounds.round() {
            self.store.has_report(round, device.0)
        } else {
            Ok(false)
        };
        match resent {
            Ok(true) => {
                return Response::Accepted {
                    round,
                    duplicate: true,
                };
            }
            Ok(false) => {}
            Err(e) => return self.internal(e),
        }
        if let Err(refusal) = running.rounds.check_report(device, round) {
            let code = match refusal {
                RoundRefusal::NotSelected(_) => ErrorCode::NotSelected,
                _ => ErrorCode::WrongRound,
            };
            return wire(code, refusal.to_string());
        }
        if let Err(rejection) = running.algorithm.validate(device, &report) {
            self.metrics.invalid_report(rejection.kind);
            tracing::warn!(%device, round, reason = %rejection, "report rejected");
            return Response::Error(rejection.into());
        }
        // The report and the device's record (its last round and measured time) in one commit.
        record.last_round = round;
        record.last_round_s = Some(report.stats.wall_s);
        let record = match serde_json::to_vec(&record) {
            Ok(bytes) => bytes,
            Err(e) => return self.internal(e),
        };
        match self
            .store
            .put_report_and_device(round, device.0, &body_of(&report), Some(&record))
        {
            Ok(PutOutcome::Duplicate) => {
                return Response::Accepted {
                    round,
                    duplicate: true,
                };
            }
            Ok(PutOutcome::Inserted) => {}
            Err(e) => return self.internal(e),
        }
        self.metrics.reports_accepted.inc();
        if running.rounds.on_report_stored(device)
            && let Err(e) = self.finish_round(&mut running)
        {
            tracing::error!(round, error = %e, "aggregation failed; the round stays closing");
        }
        Response::Accepted {
            round,
            duplicate: false,
        }
    }

    /// Checks the deadlines; aggregates when they close the round.
    pub fn on_timer(&self, now: Instant) {
        let mut running = self.lock();
        if self.config.privacy.secure_aggregation {
            let closed = running.rounds.on_timer(now);
            self.advance_secure(&mut running, closed, now);
            return;
        }
        let closing = running.rounds.on_timer(now) || running.rounds.phase() == Phase::Closing;
        if closing && let Err(e) = self.finish_round(&mut running) {
            tracing::error!(error = %e, "aggregation failed");
        }
    }

    /// The open round's SecAgg+ session, made with the round's first plan.
    fn session<'a>(
        &self,
        running: &'a mut Running,
        round: u64,
    ) -> Result<&'a mut SecureSession, DaemonError> {
        if running.secure.as_ref().map(SecureSession::round) != Some(round) {
            let len = check_secure_length(running.algorithm.as_ref())?;
            // Distributed noise is calibrated to the fewest devices any unmasked sum can hold.
            let privacy = &self.config.privacy;
            let min_clients = privacy.secagg.min_survivors(self.config.rounds.min_reports);
            let dp = running.algorithm.distributed_noise(min_clients);
            if privacy.dp.is_some() && dp.is_none() {
                return Err(DaemonError::Mismatch(
                    "secure aggregation: the algorithm has no distributed DP".into(),
                ));
            }
            let session = SecureSession::new(
                round,
                self.config.rounds.slots(),
                len,
                running.algorithm.max_samples(),
                &privacy.secagg,
                dp,
            )
            .map_err(|e| DaemonError::Mismatch(format!("secure aggregation: {e}")))?;
            running.secure = Some(session);
        }
        running
            .secure
            .as_mut()
            .ok_or_else(|| DaemonError::Mismatch("no secure session".into()))
    }

    fn secagg_message(
        &self,
        device: DeviceId,
        round: u64,
        message: SecAggUpload,
        now: Instant,
    ) -> Response {
        let mut running = self.lock();
        let running = &mut *running;
        if !self.config.privacy.secure_aggregation {
            return wire(
                ErrorCode::SecAgg,
                "this run does not use secure aggregation",
            );
        }
        let advertisement = matches!(message, SecAggUpload::Advertise(_));
        if advertisement {
            // Keys are what a device sends once it has trained: they count as its report.
            if let Err(refusal) = running.rounds.check_report(device, round) {
                return wire(ErrorCode::SecAgg, refusal.to_string());
            }
        }
        let Some(session) = running.secure.as_mut().filter(|s| s.round() == round) else {
            return wire(
                ErrorCode::SecAgg,
                format!("no secure session for round {round} (the round may have been restarted)"),
            );
        };
        let phase = message.phase();
        if let Err(refusal) = session.handle(device, message) {
            self.metrics.invalid_report("secagg");
            tracing::warn!(%device, round, phase, %refusal, "secure aggregation message refused");
            let code = match refusal {
                SessionRefusal::Stats(_) => ErrorCode::Invalid,
                _ => ErrorCode::SecAgg,
            };
            return wire(code, refusal.to_string());
        }
        let closed = advertisement && running.rounds.on_report_stored(device);
        self.advance_secure(running, closed, now);
        Response::SecAggAccepted { round }
    }

    fn secagg_poll(&self, device: DeviceId, round: u64) -> Response {
        let mut running = self.lock();
        if round < running.rounds.round() {
            return Response::SecAgg(fedtune_shared::protocol::secure::SecAggDownload::Done);
        }
        let Some(session) = running.secure.as_mut().filter(|s| s.round() == round) else {
            return wire(
                ErrorCode::SecAgg,
                format!("no secure session for round {round} (the round may have been restarted)"),
            );
        };
        match session.poll(device) {
            Ok(PollAnswer::Message(m)) => Response::SecAgg(m),
            Ok(PollAnswer::Wait(reason)) => Response::Wait {
                retry_after_ms: SECAGG_RETRY.as_millis() as u64,
                reason: reason.into(),
            },
            Err(refusal) => wire(ErrorCode::SecAgg, refusal.to_string()),
        }
    }

    /// Moves the secure session on: phase 1 closes with the orchestrator (`closed`), the
    /// others when every device answered or at their deadline; the last one aggregates. A
    /// session that fails restarts the round.
    fn advance_secure(&self, running: &mut Running, closed: bool, now: Instant) {
        let round = running.rounds.round();
        let Some(session) = running.secure.as_mut().filter(|s| s.round() == round) else {
            if closed {
                // Closed without a session: no device ever got a plan.
                running.rounds.restart(now);
            }
            return;
        };
        let mut result = Ok(None);
        if closed {
            result = session.close_advertisements(now).map(|()| None);
        }
        while matches!(result, Ok(None)) && session.phase_done(now) {
            result = session.close_phase(now);
        }
        match result {
            Ok(None) => {}
            Ok(Some(aggregate)) => {
                running.secure = None;
                if let Err(e) = self.finish_secure_round(running, &aggregate) {
                    tracing::error!(round, error = %e, "secure aggregation failed; running the round again");
                    running.rounds.restart(now);
                }
            }
            Err(e) => {
                tracing::warn!(round, error = %e, "secure aggregation session failed; running the round again");
                running.secure = None;
                running.rounds.restart(now);
            }
        }
    }

    fn finish_secure_round(
        &self,
        running: &mut Running,
        aggregate: &crate::secure::SecureAggregate,
    ) -> Result<RoundSummary, DaemonError> {
        let round = running.rounds.round();
        let summary = running.algorithm.aggregate_secure(aggregate)?;
        self.commit_round(running, round, &summary)?;
        let cost = aggregate.cost;
        tracing::info!(
            round,
            clients = cost.clients,
            dropped = cost.dropped,
            secagg_up_bytes_per_client = cost.upload_bytes_per_client,
            secagg_down_bytes_per_client = cost.download_bytes_per_client,
            secagg_server_s = cost.server_s,
            "secure aggregation cost"
        );
        if let (Some(p), Some(noise)) = (summary.privacy, aggregate.dp) {
            // Distributed DP costs no bytes (the noise rides in the masked values) and the
            // server only the accountant's time.
            tracing::info!(
                round,
                epsilon = p.epsilon,
                delta = p.delta,
                clip_norm = p.clip_norm,
                device_noise_std = noise.noise_std,
                sum_noise_std = noise.sum_std(cost.clients),
                min_clients = noise.min_clients,
                sampled = aggregate.sampled,
                dp_extra_bytes = 0,
                dp_server_s = p.server_s,
                "distributed differential privacy"
            );
        }
        Ok(summary)
    }

    fn finish_round(&self, running: &mut Running) -> Result<RoundSummary, DaemonError> {
        let round = running.rounds.round();
        let mut reports = Vec::new();
        for (id, bytes) in self.store.reports(round)? {
            match decode_body::<Report>(&bytes) {
                Ok(r) => reports.push((DeviceId(id), r)),
                Err(e) => {
                    return Err(StoreError::Corrupt {
                        what: format!("report of round {round}: {e}"),
                    }
                    .into());
                }
            }
        }
        let summary = running.algorithm.aggregate(&reports)?;
        self.commit_round(running, round, &summary)?;
        Ok(summary)
    }

    /// Stores a round's summary, state and checkpoint, and opens the next round.
    fn commit_round(
        &self,
        running: &mut Running,
        round: u64,
        summary: &RoundSummary,
    ) -> Result<(), DaemonError> {
        let keep = self.config.rounds.keep_report_rounds;
        self.store
            .finish_round(round, &body_of(summary), &running.algorithm.state(), keep)?;
        self.store.write_checkpoint(
            round,
            &running.algorithm.checkpoint(),
            self.config.rounds.keep_checkpoints,
        )?;
        running.rounds.advance(Instant::now());
        self.metrics.rounds_completed.inc();
        self.metrics
            .current_round
            .set(running.rounds.round() as i64);
        self.metrics.aggregation_seconds.set(summary.aggregation_s);
        tracing::info!(
            round,
            reports = summary.reports,
            samples = summary.samples,
            mean_loss = summary.mean_loss,
            aggregation_s = summary.aggregation_s,
            epsilon = summary.privacy.map(|p| p.epsilon),
            "round finished"
        );
        Ok(())
    }
}

impl Core {
    /// The authenticated, not revoked device of a session, or the refusal to send.
    pub fn authorize(&self, session: &Session) -> Result<DeviceId, Response> {
        self.authorized(session).map(|(device, _)| device)
    }

    /// [`Self::authorize`], with the device's record.
    fn authorized(&self, session: &Session) -> Result<(DeviceId, DeviceRecord), Response> {
        let Some(device) = session.device else {
            return Err(wire(ErrorCode::Unauthenticated, "authenticate first"));
        };
        match Registry::new(&self.store).record(device) {
            Ok(Some(r)) if !r.revoked => Ok((device, r)),
            Ok(Some(_)) => Err(wire(
                ErrorCode::Revoked,
                format!("device {device} is revoked"),
            )),
            Ok(None) => Err(wire(ErrorCode::Unauthenticated, "device is not enrolled")),
            Err(e) => Err(self.internal(e)),
        }
    }

    /// A download of `digest` from `offset`: the file and its length, or the refusal.
    pub fn download(
        &self,
        session: &Session,
        digest: &Digest,
        offset: u64,
    ) -> Result<(std::path::PathBuf, u64), Response> {
        self.authorize(session)?;
        let Some(total) = self.blobs.len(digest) else {
            return Err(wire(ErrorCode::BadBlob, format!("no blob {digest}")));
        };
        if offset > total {
            return Err(wire(
                ErrorCode::BadBlob,
                format!("offset {offset} beyond the blob's {total} bytes"),
            ));
        }
        Ok((self.blobs.path(digest), total))
    }

    /// Where the bytes of an upload go: the partial file and how many bytes may still come.
    /// Refuses uploads over the limit, and answers with the server's offset when the device's
    /// differs (the device resumes from there).
    pub fn upload_target(
        &self,
        session: &Session,
        digest: &Digest,
        total: u64,
        offset: u64,
    ) -> Result<(DeviceId, std::path::PathBuf, u64), Response> {
        let device = self.authorize(session)?;
        let limit = self.config.validation.max_upload_bytes;
        if total > limit {
            return Err(wire(
                ErrorCode::TooLarge,
                format!("upload of {total} bytes exceeds {limit}"),
            ));
        }
        let held = self.blobs.upload_offset(device, digest);
        if self.blobs.len(digest).is_some() {
            return Err(Response::Uploaded { digest: *digest });
        }
        if held != offset || offset > total {
            return Err(Response::UploadOffset { offset: held });
        }
        Ok((
            device,
            self.blobs.upload_path(device, digest),
            total - offset,
        ))
    }

    /// After an upload's bytes arrived: complete (digest checked) or the offset held.
    pub fn finish_upload(&self, device: DeviceId, digest: &Digest, total: u64) -> Response {
        match self.blobs.complete_upload(device, digest, total) {
            Ok(Some(_)) => Response::Uploaded { digest: *digest },
            Ok(None) => Response::UploadOffset {
                offset: self.blobs.upload_offset(device, digest),
            },
            Err(BlobError::Io(e)) => self.internal(e),
            Err(e) => wire(ErrorCode::BadBlob, e.to_string()),
        }
    }
}

/// The global adapter a LoRA run starts from: fresh adapters at the largest rank on the base
/// model (A Kaiming-uniform from the run's seed, B zero), as the in-process run makes it; with
/// the base model's decoder layer shapes.
/// The LoRA settings of the configured LoRA or FedSpine run.
fn lora_settings(
    config: &ServerConfig,
    max_norm: Option<f64>,
) -> Result<LoraSettings, DaemonError> {
    config
        .algorithm
        .lora_settings(config.rounds.seed, max_norm)
        .ok_or_else(|| DaemonError::Mismatch("not a LoRA configuration".into()))
}

fn initial_adapter(
    config: &ServerConfig,
    settings: &LoraSettings,
) -> Result<
    (
        fedtune_shared::lora::adapter::AdapterWeights,
        Vec<fedtune_shared::prune::units::LayerShape>,
    ),
    DaemonError,
> {
    use fedtune_shared::checkpoint::{GgufSource, HfFolder, WeightSource};
    let device = burn::tensor::Device::flex();
    let open = |e: fedtune_shared::checkpoint::CheckpointError| DaemonError::Model {
        path: config.model.clone(),
        source: std::io::Error::other(e.to_string()),
    };
    let source: Box<dyn WeightSource> = if config.model.is_dir() {
        Box::new(HfFolder::open(&config.model).map_err(open)?)
    } else {
        Box::new(GgufSource::open(&config.model).map_err(open)?)
    };
    let model =
        fedtune_shared::model::Llama::load(source.as_ref(), &device, |_, _| {}).map_err(open)?;
    let shapes = model
        .layers
        .iter()
        .map(fedtune_shared::prune::units::LayerShape::of)
        .collect();
    let adapter = crate::algorithm::lora::initial_adapter(model, settings)
        .ok_or_else(|| DaemonError::Mismatch("the LoRA configuration adapts no layer".into()))?;
    Ok((adapter, shapes))
}

/// The seed of a device's local randomness in a round: the first 8 bytes of
/// SHA-256(seed ‖ round ‖ device), so it is fixed by the run and unpredictable across devices.
pub fn local_seed(seed: u64, round: u64, device: DeviceId) -> u64 {
    let mut bytes = Vec::with_capacity(32);
    bytes.extend_from_slice(&seed.to_le_bytes());
    bytes.extend_from_slice(&round.to_le_bytes());
    bytes.extend_from_slice(&device.0);
    let d = Digest::of(&bytes).0;
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// The length of the vector a secure round sums, checked against the request frame limit
/// (a masked input is one request: 4 bytes a value).
fn check_secure_length(algorithm: &dyn ServerAlgorithm) -> Result<usize, DaemonError> {
    let len = algorithm.secure_vector_len().ok_or_else(|| {
        DaemonError::Mismatch(
            "secure aggregation: this algorithm cannot aggregate from a sum".into(),
        )
    })?;
    // Frame header, message tags and the measurements are far below a kilobyte.
    if len.saturating_mul(4).saturating_add(1024) > MAX_REQUEST_FRAME {
        return Err(DaemonError::Mismatch(format!(
            "secure aggregation: a masked input of {len} values exceeds the {MAX_REQUEST_FRAME}-byte request limit"
        )));
    }
    Ok(len)
}

/// How long a device waits before polling a secure session again.
const SECAGG_RETRY: Duration = Duration::from_millis(100);

/// How often the daemon checks round deadlines.
pub const TICK: Duration = Duration::from_millis(200);
