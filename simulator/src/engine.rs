//! The in-process round loop: the daemon's own algorithm driver (`ServerAlgorithm`: tasks,
//! validation, aggregation) and the device SDK's own training functions, with the network
//! replaced by function calls and the fleet's availability, dropouts, speeds and links
//! simulated. Plans and reports are still encoded as they would be on the wire, so byte counts
//! are real.

use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use fedtune_client::trainer::FedKSeedModel;
use fedtune_server::algorithm::combine::UpdateCombiner;
use fedtune_server::algorithm::fedkseed::FedKSeed;
use fedtune_server::algorithm::fedspine::{FedSpine, FedSpineSettings};
use fedtune_server::algorithm::lora::{Lora, LoraSettings};
use fedtune_server::algorithm::{AlgorithmError, ServerAlgorithm};
use fedtune_server::blobs::{BlobError, Blobs};
use fedtune_server::config::{AlgorithmConfig, SecAggSettings};
use fedtune_server::daemon::local_seed;
use fedtune_server::secure::{SecureAggregate, SecureCost};
use fedtune_shared::lora::attach::attach_weights;
use fedtune_shared::model::Llama;
use fedtune_shared::privacy::secagg::{ClientId, SecAggConfig};
use fedtune_shared::privacy::secure_sum::{Dropouts, run_secure_sum};
use fedtune_shared::protocol::auth::PLAN_LABEL;
use fedtune_shared::protocol::frame::encode;
use fedtune_shared::protocol::secure::{fedkseed_parts, input_weight, secure_input};
use fedtune_shared::protocol::{
    DeviceId, Digest, Plan, Report, ReportPayload, Request, Response, SigningKey, Task,
};
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::{ChaCha8Rng, ChaCha20Rng};

use crate::evaluation::{Evaluation, Evaluator};
use crate::fleet::{DeviceProfile, round_time_s};
use crate::local::{LocalError, LocalResult, SharedModels, run_task};
use crate::population::Population;
use crate::record::RoundRecord;

/// How rounds are run.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundPolicy {
    /// Rounds to run.
    pub rounds: u64,
    /// Devices given a task per round (fewer when fewer are available).
    pub clients_per_round: usize,
    /// Seconds of simulated time after which the server stops waiting for a device
    /// (`None`: it waits for every device that did not drop out).
    pub deadline_s: Option<f64>,
    /// Seed of availability, selection and dropouts (and the daemon's per-device seeds).
    pub seed: u64,
    /// Evaluate every this many rounds (the last round always).
    pub eval_every: u64,
    /// Devices trained at the same time on this machine.
    pub concurrency: usize,
    /// Secure aggregation (`[privacy] secure_aggregation = true`): each round's updates are
    /// summed by SecAgg+'s state machines (`fedtune_shared::privacy::secure_sum`), and the
    /// daemon's driver advances from the sum as the daemon does. A device the fleet drops
    /// takes part in the session up to sharing its keys and vanishes before its masked input,
    /// so its pairwise masks are recovered from its neighbours' shares (its update is not in
    /// the sum, as it is not in the clear).
    pub secure: Option<SecAggSettings>,
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The algorithm failed (a server fault).
    #[error("algorithm: {0}")]
    Algorithm(#[from] AlgorithmError),
    /// The blob store failed.
    #[error("blob store: {0}")]
    Blob(#[from] BlobError),
    /// A setting the run cannot use.
    #[error("{0}")]
    Invalid(String),
    /// A message could not be encoded.
    #[error("encoding: {0}")]
    Encode(String),
}

/// The daemon's driver of the run's algorithm, with what the harness needs to evaluate its
/// global model.
// One driver per run, never moved in a hot path: boxing the larger variant buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum Driver {
    /// FedKSeed (or Pro): the driver and the one global model all virtual devices share.
    FedKSeed {
        /// The daemon's FedKSeed driver.
        algorithm: FedKSeed,
        /// The global model, caught up before each round.
        model: FedKSeedModel,
    },
    /// LoRA with any aggregation strategy.
    Lora(Lora),
    /// FedSpine: LoRA with pruning on the devices.
    FedSpine(FedSpine),
}

impl Driver {
    /// The driver the daemon would build for `config` over `base` (the daemon loads the
    /// model itself; the harness passes the copy it holds). `blobs` is the driver's store.
    pub fn new(
        config: &AlgorithmConfig,
        base: &Llama,
        blobs: Blobs,
        seed: u64,
        max_norm: Option<f64>,
    ) -> Result<Self, EngineError> {
        Self::with_combiner(
            config,
            base,
            blobs,
            seed,
            max_norm,
            UpdateCombiner::default(),
        )
    }

    /// [`Self::new`] with the daemon's `[robust]` / `[privacy]` combination of updates.
    pub fn with_combiner(
        config: &AlgorithmConfig,
        base: &Llama,
        blobs: Blobs,
        seed: u64,
        max_norm: Option<f64>,
        combiner: UpdateCombiner,
    ) -> Result<Self, EngineError> {
        match config {
            AlgorithmConfig::Fedkseed { run, batch_size } => Ok(Self::FedKSeed {
                algorithm: FedKSeed::new(run.clone(), *batch_size, max_norm)
                    .with_combiner(combiner),
                model: FedKSeedModel::new(base.valid()),
            }),
            AlgorithmConfig::Lora { .. } => {
                let settings = lora_settings(config, seed, max_norm)?;
                let initial = initial_adapter(base, &settings)?;
                Ok(Self::Lora(
                    Lora::new(settings, blobs, initial).with_combiner(combiner),
                ))
            }
            AlgorithmConfig::FedSpine {
                ratios, schedule, ..
            } => {
                if !combiner.is_plain() {
                    return Err(EngineError::Invalid(
                        "robust and private combination are not available for FedSpine yet".into(),
                    ));
                }
                let settings = lora_settings(config, seed, max_norm)?;
                let initial = initial_adapter(base, &settings)?;
                let settings = FedSpineSettings {
                    lora: settings,
                    ratios: ratios.clone(),
                    schedule: schedule.clone(),
                    shapes: base
                        .layers
                        .iter()
                        .map(fedtune_shared::prune::units::LayerShape::of)
                        .collect(),
                };
                Ok(Self::FedSpine(FedSpine::new(settings, blobs, initial)))
            }
        }
    }

    fn algorithm(&mut self) -> &mut dyn ServerAlgorithm {
        match self {
            Self::FedKSeed { algorithm, .. } => algorithm,
            Self::Lora(lora) => lora,
            Self::FedSpine(fedspine) => fedspine,
        }
    }

    /// Brings the shared FedKSeed model up to the last aggregated round (what every device's
    /// own replay would give).
    fn catch_up(&mut self) -> Result<(), EngineError> {
        if let Self::FedKSeed { algorithm, model } = self {
            let plan = algorithm.server().plan(model.held_round());
            model
                .catch_up(&plan.config, &plan.catch_up)
                .map_err(|e| EngineError::Invalid(e.to_string()))?;
        }
        Ok(())
    }

    /// The daemon's checkpoint of the global state (FedKSeed: its history; LoRA: the adapter
    /// in the adapter-blob format), byte for byte what the daemon would write.
    pub fn checkpoint(&mut self) -> Vec<u8> {
        self.algorithm().checkpoint()
    }

    /// The global model a daemon's checkpoint holds (`None`: the starting model), for
    /// evaluating a QUIC run with the same code as an in-process one.
    pub fn model_from_checkpoint(
        &mut self,
        base: &Llama,
        checkpoint: Option<&[u8]>,
    ) -> Result<Llama, EngineError> {
        let corrupt = |e: &dyn std::fmt::Display| EngineError::Invalid(format!("checkpoint: {e}"));
        match (self, checkpoint) {
            (driver, None) => driver.global_model(base),
            (Self::FedKSeed { algorithm, model }, Some(bytes)) => {
                *algorithm = FedKSeed::restore(bytes, 1, None).map_err(|e| corrupt(&e))?;
                let plan = algorithm.server().plan(0);
                let mut fresh = FedKSeedModel::new(model.base().clone());
                fresh
                    .catch_up(&plan.config, &plan.catch_up)
                    .map_err(|e| corrupt(&e))?;
                *model = fresh;
                Ok(model.model().clone())
            }
            (Self::Lora(_) | Self::FedSpine(_), Some(bytes)) => {
                let adapter = fedtune_shared::protocol::adapter_blob::decode_adapter(bytes)
                    .map_err(|e| corrupt(&e))?;
                attach_weights(base.valid(), &adapter, 0.0).map_err(|e| corrupt(&e))
            }
        }
    }

    /// The flat update a device masks in a secure round (FedKSeed: its dense K-vector of
    /// accumulated scalar gradients; LoRA: its adapter minus the global adapter), before its
    /// sample weight (or DP's clipping and noise), and the statistics it masks after it
    /// (FedKSeed-Pro without DP: its importance statistics scaled into `clip`; else none).
    pub fn secure_update(
        &self,
        blobs: &Blobs,
        report: &Report,
        dp: bool,
        clip: f32,
    ) -> Result<(Vec<f32>, Vec<f32>), EngineError> {
        let invalid =
            |e: &dyn std::fmt::Display| EngineError::Invalid(format!("secure update: {e}"));
        match (self, &report.payload) {
            (Self::FedKSeed { algorithm, .. }, ReportPayload::FedKSeed(inner)) => {
                Ok(fedkseed_parts(inner, algorithm.server().config(), dp, clip))
            }
            (Self::Lora(lora), ReportPayload::Lora { adapter, .. }) => {
                let bytes = blobs.read(&adapter.digest).map_err(|e| invalid(&e))?;
                let weights = fedtune_shared::protocol::adapter_blob::decode_adapter(&bytes)
                    .map_err(|e| invalid(&e))?;
                fedtune_shared::robust::flat::adapter_delta(lora.global(), &weights)
                    .map(|update| (update, Vec::new()))
                    .map_err(|e| invalid(&e))
            }
            _ => Err(EngineError::Invalid(
                "secure aggregation runs FedKSeed and LoRA (FedAvg, one rank) only".into(),
            )),
        }
    }

    /// The global model for inference.
    pub fn global_model(&mut self, base: &Llama) -> Result<Llama, EngineError> {
        self.catch_up()?;
        match self {
            Self::FedKSeed { model, .. } => Ok(model.model().clone()),
            Self::Lora(lora) => attach_weights(base.valid(), lora.global(), 0.0)
                .map_err(|e| EngineError::Invalid(e.to_string())),
            // The global adapter lives in the full model's coordinates: evaluated unpruned.
            Self::FedSpine(fedspine) => attach_weights(base.valid(), fedspine.global(), 0.0)
                .map_err(|e| EngineError::Invalid(e.to_string())),
        }
    }
}

/// What one device did in a round.
struct Attempt {
    client: usize,
    attacker: bool,
    device: DeviceId,
    down_bytes: u64,
    outcome: Option<Result<LocalResult, LocalError>>,
}

/// Runs `policy.rounds` rounds of `driver` over `population` and `fleet`, calling `on_round`
/// with each round's record. The initial evaluation is returned first.
#[allow(clippy::too_many_arguments)]
pub fn run_in_process(
    label: &str,
    algorithm_name: &str,
    base: &Llama,
    driver: &mut Driver,
    blobs: &Blobs,
    population: &Population,
    fleet: &[DeviceProfile],
    policy: &RoundPolicy,
    evaluator: &Evaluator,
    mut on_round: impl FnMut(&RoundRecord),
) -> Result<Evaluation, EngineError> {
    if policy.clients_per_round == 0 || population.clients.is_empty() {
        return Err(EngineError::Invalid("no clients to run".into()));
    }
    if fleet.is_empty() {
        return Err(EngineError::Invalid("the fleet has no profiles".into()));
    }
    let initial = evaluator.evaluate(&driver.global_model(base)?);
    // The harness plays the daemon: it signs plans like the daemon would, so their encoded
    // size is the real one.
    let server_key = SigningKey::from_seed(&crate::population::key_seed(policy.seed, usize::MAX))
        .map_err(|e| EngineError::Invalid(e.to_string()))?;
    let run_id = policy.seed;
    let mut last_seen = vec![0u64; population.clients.len()];
    let mut sim_time = 0.0f64;
    let mut total_bytes = 0u64;
    for round in 1..=policy.rounds {
        let started = Instant::now();
        driver.catch_up()?;
        let mut rng =
            ChaCha8Rng::seed_from_u64(policy.seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let available: Vec<usize> = (0..population.clients.len())
            .filter(|&i| rng.random::<f64>() < profile(fleet, population, i).availability)
            .collect();
        let take = policy.clients_per_round.min(available.len());
        let mut chosen: Vec<usize> = sample(&mut rng, available.len(), take)
            .into_iter()
            .map(|k| available[k])
            .collect();
        chosen.sort_unstable();
        let drops: Vec<bool> = chosen
            .iter()
            .map(|&c| rng.random::<f64>() < profile(fleet, population, c).dropout)
            .collect();

        // Tasks are made one at a time, as the daemon does when devices poll.
        let mut jobs = Vec::with_capacity(chosen.len());
        let mut bytes_down = 0u64;
        for (&c, &dropped) in chosen.iter().zip(&drops) {
            let device = population.clients[c].device;
            let task = driver.algorithm().task(device, last_seen[c])?;
            let seed = local_seed(policy.seed, round, device);
            let plan = Plan {
                run_id,
                round,
                device,
                base_model: Digest([0; 32]),
                local_seed: seed,
                deadline_ms: policy.deadline_s.map_or(0, |s| (s * 1000.0) as u64),
                task: task.clone(),
                secure: None,
            };
            let signed = server_key
                .sign_value(PLAN_LABEL, &plan)
                .map_err(|e| EngineError::Encode(e.to_string()))?;
            let frame =
                encode(&Response::Plan(signed)).map_err(|e| EngineError::Encode(e.to_string()))?;
            last_seen[c] = round - 1;
            bytes_down += frame.len() as u64;
            jobs.push((c, device, task, seed, frame.len() as u64, dropped));
        }

        let attempts = train_all(base, driver, blobs, population, &jobs, policy.concurrency);

        let mut reports = Vec::new();
        let mut round_time = 0.0f64;
        let mut dropped = 0usize;
        let mut bytes_up = 0u64;
        let mut compute_s = 0.0f64;
        let mut attackers = 0usize;
        let mut vanished = 0usize;
        for attempt in attempts {
            let profile = profile(fleet, population, attempt.client);
            let Some(outcome) = attempt.outcome else {
                // Dropped out after taking the task: it cost the download and the wait.
                dropped += 1;
                vanished += 1;
                continue;
            };
            let result = match outcome {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(client = %population.clients[attempt.client].name, error = %e, "device failed its round");
                    dropped += 1;
                    continue;
                }
            };
            bytes_down += result.blob_down_bytes;
            compute_s += result.device_s;
            if profile.memory_bytes.is_some_and(|m| result.model_bytes > m) {
                dropped += 1;
                continue;
            }
            let mut report = Report {
                run_id,
                round,
                stats: result.stats,
                payload: result.payload,
            };
            let frame_len = encode(&Request::Report(report.clone()))
                .map_err(|e| EngineError::Encode(e.to_string()))?
                .len() as u64;
            let up = frame_len + result.blob_up_bytes;
            let time = round_time_s(
                profile,
                result.device_s,
                attempt.down_bytes + result.blob_down_bytes,
                up,
            );
            if policy.deadline_s.is_some_and(|d| time > d) {
                dropped += 1;
                bytes_up += up;
                round_time = round_time.max(policy.deadline_s.unwrap_or(time));
                continue;
            }
            // The bandit sees the device's simulated round, not this machine's.
            report.stats.wall_s = time;
            if let Err(rejection) = driver.algorithm().validate(attempt.device, &report) {
                tracing::warn!(client = %population.clients[attempt.client].name, %rejection, "report rejected");
                dropped += 1;
                continue;
            }
            bytes_up += up;
            round_time = round_time.max(time);
            attackers += usize::from(attempt.attacker);
            reports.push((attempt.device, report));
        }
        reports.sort_by_key(|(device, _)| *device);
        let mut secure_cost = None;
        let (train_loss, privacy) = if let Some(settings) = &policy.secure {
            let session = SessionInputs {
                reports: &reports,
                vanished,
                sampled: chosen.len(),
                round,
            };
            match secure_sum(driver, blobs, &session, settings, policy)? {
                Some(aggregate) => {
                    let summary = driver.algorithm().aggregate_secure(&aggregate)?;
                    let cost = aggregate.cost;
                    bytes_up += (cost.upload_bytes_per_client * cost.clients as f64) as u64;
                    bytes_down += (cost.download_bytes_per_client * cost.clients as f64) as u64;
                    secure_cost = Some(cost);
                    (summary.mean_loss, summary.privacy)
                }
                None => (f32::NAN, None),
            }
        } else if reports.is_empty() {
            tracing::warn!(round, "no report this round; the global model stays");
            (f32::NAN, None)
        } else {
            let summary = driver.algorithm().aggregate(&reports)?;
            (summary.mean_loss, summary.privacy)
        };
        sim_time += round_time;
        total_bytes += bytes_up + bytes_down;
        let eval_started = Instant::now();
        let evaluation = (round % policy.eval_every.max(1) == 0 || round == policy.rounds)
            .then(|| driver.global_model(base).map(|m| evaluator.evaluate(&m)))
            .transpose()?;
        let eval_s = eval_started.elapsed().as_secs_f64();
        let record = RoundRecord {
            run: label.to_string(),
            algorithm: algorithm_name.to_string(),
            round,
            clients: reports.len(),
            attackers,
            dropped,
            train_loss,
            heldout_loss: evaluation.as_ref().map(|e| e.loss),
            perplexity: evaluation.as_ref().map(|e| e.loss.exp()),
            rouge_l: evaluation.as_ref().and_then(|e| e.rouge_l),
            round_time_s: round_time,
            sim_time_s: sim_time,
            bytes_up,
            bytes_down,
            total_bytes,
            host_wall_s: started.elapsed().as_secs_f64(),
            compute_s,
            eval_s,
            peak_rss_bytes: fedtune_shared::peak_memory::peak_rss_bytes(),
            epsilon: privacy.map(|p| p.epsilon),
            dp_server_s: privacy.map(|p| p.server_s),
            secagg_up_bytes_per_client: secure_cost.map(|c| c.upload_bytes_per_client),
            secagg_down_bytes_per_client: secure_cost.map(|c| c.download_bytes_per_client),
            secagg_server_s: secure_cost.map(|c| c.server_s),
        };
        tracing::info!(?record, "round simulated");
        on_round(&record);
    }
    Ok(initial)
}

/// What one round brings to its secure session.
struct SessionInputs<'a> {
    /// The accepted reports, by device id.
    reports: &'a [(DeviceId, Report)],
    /// Devices that share keys and drop out before masking.
    vanished: usize,
    /// Devices given the round's task (the DP accountant's sampled count).
    sampled: usize,
    /// The round.
    round: u64,
}

/// The stream of the harness's DP noise, apart from every other use of a device's local seed.
const DP_NOISE_STREAM: u64 = 0x6470_6e6f_6973_6521;

/// One round's secure sum over the accepted reports plus the vanished devices, which share keys
/// and drop out before masking, through SecAgg+'s state machines. Under distributed DP each
/// device clips and noises its update as the SDK does, from a seed of the run's (a simulation
/// stays repeatable; a real device draws from the OS). `None` when the session fails (too few
/// devices, or too many drop-outs for the threshold) or, under DP, holds fewer devices than the
/// noise was calibrated to (fewer took part than the round's clients): the round then changes
/// nothing, as on the daemon, where it would run again.
fn secure_sum(
    driver: &Driver,
    blobs: &Blobs,
    session: &SessionInputs<'_>,
    settings: &SecAggSettings,
    policy: &RoundPolicy,
) -> Result<Option<SecureAggregate>, EngineError> {
    let SessionInputs {
        reports,
        vanished,
        sampled,
        round,
    } = *session;
    let algorithm: &dyn ServerAlgorithm = match driver {
        Driver::FedKSeed { algorithm, .. } => algorithm,
        Driver::Lora(lora) => lora,
        Driver::FedSpine(fedspine) => fedspine,
    };
    let len = algorithm.secure_vector_len().ok_or_else(|| {
        EngineError::Invalid("this algorithm cannot aggregate from a secure sum".into())
    })?;
    let max_samples = algorithm.max_samples();
    // The daemon's calibration, with a round's clients standing for its `min_reports`.
    let dp = algorithm.distributed_noise(settings.min_survivors(policy.clients_per_round));
    let mut inputs = Vec::with_capacity(reports.len() + vanished);
    for (device, report) in reports {
        let (update, statistics) =
            driver.secure_update(blobs, report, dp.is_some(), settings.clip)?;
        let mut rng =
            ChaCha20Rng::seed_from_u64(local_seed(policy.seed, round, *device) ^ DP_NOISE_STREAM);
        let (input, _) = secure_input(
            &update,
            &statistics,
            report.stats.samples,
            max_samples,
            dp.as_ref(),
            &mut rng,
        );
        inputs.push(input);
    }
    // The vanished devices' inputs are never masked; their length only has to be right.
    inputs.extend((0..vanished).map(|_| vec![0.0f32; len]));
    let config = SecAggConfig::new(
        round,
        policy.clients_per_round.max(inputs.len()),
        len,
        settings.clip,
        settings.degree,
        settings.max_dropout,
    )
    .map_err(|e| EngineError::Invalid(e.to_string()))?;
    let dropouts = Dropouts {
        before_input: (reports.len()..inputs.len())
            .map(|i| i as ClientId)
            .collect(),
        before_unmask: Default::default(),
    };
    let run = match run_secure_sum(&config, &inputs, &dropouts, policy.seed ^ round) {
        Ok(run) => run,
        Err(e) => {
            tracing::warn!(round, error = %e, "secure aggregation failed; the global model stays");
            return Ok(None);
        }
    };
    let clients = run.result.clients.len();
    if let Some(noise) = &dp
        && clients < noise.min_clients
    {
        tracing::warn!(
            round,
            clients,
            min_clients = noise.min_clients,
            "too few devices' noise in the sum for the DP guarantee; the global model stays"
        );
        return Ok(None);
    }
    let weight = match dp {
        Some(_) => clients as f64,
        None => reports
            .iter()
            .map(|(_, r)| f64::from(input_weight(r.stats.samples, max_samples)))
            .sum(),
    };
    Ok(Some(SecureAggregate {
        sum: run.result.sum,
        weight,
        stats: reports.iter().map(|(d, r)| (*d, r.stats)).collect(),
        cost: SecureCost {
            clients,
            dropped: vanished,
            upload_bytes_per_client: run.upload_bytes_per_client,
            download_bytes_per_client: run.download_bytes_per_client,
            server_s: run.server_s,
        },
        sampled: sampled.max(clients),
        dp,
        clip: settings.clip,
    }))
}

fn profile<'a>(
    fleet: &'a [DeviceProfile],
    population: &Population,
    client: usize,
) -> &'a DeviceProfile {
    let index = population.clients[client].profile.min(fleet.len() - 1);
    &fleet[index]
}

type Job = (usize, DeviceId, Task, u64, u64, bool);

/// Trains the round's devices, `concurrency` at a time; results in job order.
fn train_all(
    base: &Llama,
    driver: &Driver,
    blobs: &Blobs,
    population: &Population,
    jobs: &[Job],
    concurrency: usize,
) -> Vec<Attempt> {
    let fedkseed = match driver {
        Driver::FedKSeed { model, .. } => Some(model),
        Driver::Lora(_) | Driver::FedSpine(_) => None,
    };
    let run = |job: &Job, base: &Llama, fedkseed: Option<&FedKSeedModel>| {
        let (client, device, task, seed, down, dropped) = job;
        let outcome = (!dropped).then(|| {
            let models = SharedModels { base, fedkseed };
            run_task(
                &models,
                blobs,
                task,
                *seed,
                &population.training_data(*client),
                &population.clients[*client].behaviour,
            )
        });
        Attempt {
            client: *client,
            attacker: population.clients[*client].behaviour.is_attack(),
            device: *device,
            down_bytes: *down,
            outcome,
        }
    };
    let workers = concurrency.clamp(1, jobs.len().max(1));
    if workers == 1 {
        return jobs.iter().map(|j| run(j, base, fedkseed)).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut slots: Vec<Option<Attempt>> = (0..jobs.len()).map(|_| None).collect();
    let done = std::sync::Mutex::new(&mut slots);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            // Each worker holds its own handles on the shared weights (clones share tensors).
            let base = base.clone();
            let fedkseed = fedkseed.cloned();
            let (next, done, run) = (&next, &done, &run);
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let attempt = run(job, &base, fedkseed.as_ref());
                    if let Ok(mut slots) = done.lock() {
                        slots[i] = Some(attempt);
                    }
                }
            });
        }
    });
    slots.into_iter().flatten().collect()
}

/// The LoRA settings the daemon derives from `config`.
fn lora_settings(
    config: &AlgorithmConfig,
    seed: u64,
    max_norm: Option<f64>,
) -> Result<LoraSettings, EngineError> {
    config
        .lora_settings(seed, max_norm)
        .ok_or_else(|| EngineError::Invalid("not a LoRA configuration".into()))
}

/// The daemon's first adapter (on the inference copy of `base`, as the daemon loads it).
fn initial_adapter(
    base: &Llama,
    settings: &LoraSettings,
) -> Result<fedtune_shared::lora::adapter::AdapterWeights, EngineError> {
    fedtune_server::algorithm::lora::initial_adapter(base.valid(), settings)
        .ok_or_else(|| EngineError::Invalid("the LoRA configuration adapts no layer".into()))
}

/// A fresh blob store for a run's driver under `dir`.
pub fn blob_store(dir: &Path) -> Result<Blobs, EngineError> {
    Ok(Blobs::open(dir)?)
}
