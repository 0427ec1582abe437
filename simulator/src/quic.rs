//! The QUIC transport: the real daemon (`fedtune_server::Core` behind its quinn listener) on
//! loopback and every virtual device as a real device SDK (`fedtune_client::Client`), each with
//! its own state folder and the seeded key of the in-process run, so both transports train the
//! same devices with the same per-device seeds and must end with the same global model.
//!
//! Devices run in real time here: the fleet's speeds and links are not simulated, every device
//! takes part in every round (the daemon's own selection with `RoundSettings::everyone`), and
//! the records carry real wall-clock seconds and the daemon's own byte counters.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedtune_client::{Always, Client, ClientConfig, Event, Outcome};
use fedtune_server::Core;
use fedtune_server::algorithm::RoundSummary;
use fedtune_server::config::{AlgorithmConfig, RoundSettings, ServerConfig};
use fedtune_server::registry::Registry;
use fedtune_server::transport::Listener;
use fedtune_shared::model::Llama;
use fedtune_shared::protocol::blob::model_digest;
use fedtune_shared::protocol::frame::decode_body;
use fedtune_shared::protocol::{Capabilities, SigningKey};

use crate::population::Population;
use crate::record::RoundRecord;

/// The enrollment token the harness's daemon issues to its virtual devices.
const TOKEN: &str = "simulated-fleet";

/// Why a QUIC run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuicError {
    /// The daemon could not start or failed.
    #[error("daemon: {0}")]
    Daemon(#[from] fedtune_server::DaemonError),
    /// A device failed.
    #[error("device {device}: {message}")]
    Device {
        /// The device's name.
        device: String,
        /// What failed.
        message: String,
    },
    /// Local files.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The run did not finish in time.
    #[error("the run did not finish within {0:?}")]
    Timeout(Duration),
}

/// What a QUIC run left behind.
pub struct QuicOutcome {
    /// The daemon's algorithm state after the last round (the daemon's own encoding).
    pub state: Vec<u8>,
    /// The daemon's latest checkpoint file.
    pub checkpoint: Option<PathBuf>,
    /// One record per round, from the daemon's round summaries and byte counters.
    pub records: Vec<RoundRecord>,
}

/// Settings of a QUIC run.
#[derive(Debug, Clone)]
pub struct QuicRun {
    /// Run label for the records.
    pub label: String,
    /// Algorithm name for the records.
    pub algorithm_name: String,
    /// The model folder or GGUF file the daemon and devices load.
    pub model: PathBuf,
    /// The algorithm.
    pub algorithm: AlgorithmConfig,
    /// The daemon's `[robust]` rule.
    pub robust: fedtune_shared::robust::RobustRule,
    /// The daemon's `[privacy]` settings.
    pub privacy: fedtune_server::config::PrivacySettings,
    /// Rounds.
    pub rounds: u64,
    /// The run's seed (the daemon's per-device seeds and LoRA initialisation).
    pub seed: u64,
    /// Folder for the daemon's and devices' state.
    pub work_dir: PathBuf,
    /// Longest the whole run may take.
    pub timeout: Duration,
}

/// Runs `run` with every device of `population` as a real client over loopback QUIC. `base`
/// is the devices' copy of the model (shared by all of them, as in process).
pub fn run_quic(
    run: &QuicRun,
    base: &Llama,
    population: &Population,
) -> Result<QuicOutcome, QuicError> {
    let runtime = fedtune_server::runtime()?;
    runtime.block_on(serve_and_train(run, base, population))
}

async fn serve_and_train(
    run: &QuicRun,
    base: &Llama,
    population: &Population,
) -> Result<QuicOutcome, QuicError> {
    let clients = population.clients.len();
    let config = ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        rounds: RoundSettings {
            seed: run.seed,
            ..RoundSettings::everyone(clients, run.rounds, run.timeout.as_secs_f64())
        },
        robust: run.robust,
        privacy: run.privacy.clone(),
        ..ServerConfig::new(
            &run.work_dir.join("server"),
            &run.model,
            run.algorithm.clone(),
        )
    };
    let core = Arc::new(tokio::task::block_in_place(|| Core::open(config))?);
    Registry::new(core.store())
        .add_token(TOKEN, u32::try_from(clients).unwrap_or(u32::MAX))
        .map_err(fedtune_server::DaemonError::from)?;
    let listener = Listener::bind(core.clone(), SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let address = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(listener.serve(async move {
        let _ = stop_rx.await;
    }));
    let identity = core.keys().identity(address);
    let digest = model_digest(&run.model).map_err(QuicError::Io)?;

    let mut devices = tokio::task::JoinSet::new();
    for (i, virtual_client) in population.clients.iter().enumerate() {
        let state_dir = run.work_dir.join("devices").join(format!("{i:05}"));
        let key =
            SigningKey::from_seed(&virtual_client.key_seed).map_err(|e| QuicError::Device {
                device: virtual_client.name.clone(),
                message: e.to_string(),
            })?;
        fedtune_client::state::StateDir::open(&state_dir)
            .and_then(|dir| dir.provision_key(&key))
            .map_err(|e| QuicError::Device {
                device: virtual_client.name.clone(),
                message: e.to_string(),
            })?;
        let config = ClientConfig {
            server: identity.clone(),
            state_dir,
            base_model: digest,
            capabilities: Capabilities {
                platform: "simulated".into(),
                backend: "cpu".into(),
                memory_bytes: 0,
                base_model: digest,
            },
            policy: Arc::new(Always),
            listener: Arc::new(|_: Event| {}),
            max_backoff: Duration::from_millis(500),
        };
        let name = virtual_client.name.clone();
        let fail = move |message: String| QuicError::Device {
            device: name.clone(),
            message,
        };
        let (mut client, _handle) = Client::new(config, base.clone(), population.training_data(i))
            .map_err(|e| fail(e.to_string()))?;
        devices.spawn(async move {
            client
                .enroll(TOKEN)
                .await
                .map_err(|e| fail(e.to_string()))?;
            match client.run().await.map_err(|e| fail(e.to_string()))? {
                Outcome::Finished { .. } => Ok(()),
                Outcome::Stopped => Err(fail("stopped before the run finished".into())),
            }
        });
    }

    let started = Instant::now();
    let mut records = Vec::new();
    let mut seen_round = 1u64;
    let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
    let mut round_started = Instant::now();
    let result = tokio::time::timeout(run.timeout, async {
        loop {
            let (round, _) = core.round();
            if seen_round < round {
                records.extend(round_records(
                    run,
                    &core,
                    seen_round..round,
                    (&mut bytes_in, &mut bytes_out),
                    round_started.elapsed().as_secs_f64(),
                    started.elapsed().as_secs_f64(),
                ));
                round_started = Instant::now();
                seen_round = round;
            }
            if devices.is_empty() {
                return Ok::<(), QuicError>(());
            }
            tokio::select! {
                joined = devices.join_next() => {
                    if let Some(joined) = joined {
                        joined.map_err(|e| QuicError::Device { device: "?".into(), message: e.to_string() })??;
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    })
    .await;
    let _ = stop_tx.send(());
    let _ = serving.await;
    match result {
        Err(_) => return Err(QuicError::Timeout(run.timeout)),
        Ok(r) => r?,
    }
    let (round, _) = core.round();
    records.extend(round_records(
        run,
        &core,
        seen_round..round,
        (&mut bytes_in, &mut bytes_out),
        round_started.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64(),
    ));
    let checkpoint = core
        .store()
        .latest_checkpoint()
        .map_err(fedtune_server::DaemonError::from)?
        .map(|(_, path)| path);
    Ok(QuicOutcome {
        state: core.algorithm_state(),
        checkpoint,
        records,
    })
}

/// Records of `rounds` (finished since the last look), from the daemon's stored summaries;
/// the bytes its counters moved since then and the time elapsed are shared evenly among them
/// (the harness looks every 50 ms, so several rounds of a tiny model can end in between).
fn round_records(
    run: &QuicRun,
    core: &Core,
    rounds: std::ops::Range<u64>,
    (bytes_in, bytes_out): (&mut u64, &mut u64),
    elapsed_s: f64,
    since_start_s: f64,
) -> Vec<RoundRecord> {
    let summaries: Vec<(u64, RoundSummary)> = core
        .store()
        .round_summaries()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(r, bytes)| decode_body(&bytes).ok().map(|s| (r, s)))
        .collect();
    let metrics = core.metrics();
    let (now_in, now_out) = (metrics.bytes_in.get(), metrics.bytes_out.get());
    let n = (rounds.end - rounds.start).max(1);
    let (up, down) = ((now_in - *bytes_in) / n, (now_out - *bytes_out) / n);
    (*bytes_in, *bytes_out) = (now_in, now_out);
    let first = rounds.start;
    rounds
        .map(|round| {
            let summary = summaries.iter().find(|(r, _)| *r == round).map(|(_, s)| s);
            let secure = summary.and_then(|s| s.secure);
            let k = (round - first + 1) as f64;
            RoundRecord {
                run: run.label.clone(),
                algorithm: run.algorithm_name.clone(),
                round,
                clients: summary.map_or(0, |s| s.reports),
                // Attackers are refused with the QUIC transport (`SimulationConfig::validate`).
                attackers: 0,
                dropped: secure.map_or(0, |c| c.dropped),
                train_loss: summary.map_or(f32::NAN, |s| s.mean_loss),
                heldout_loss: None,
                perplexity: None,
                rouge_l: None,
                round_time_s: elapsed_s / n as f64,
                sim_time_s: since_start_s - elapsed_s + elapsed_s * k / n as f64,
                bytes_up: up,
                bytes_down: down,
                total_bytes: now_in + now_out,
                host_wall_s: elapsed_s / n as f64,
                compute_s: 0.0,
                eval_s: 0.0,
                peak_rss_bytes: fedtune_shared::peak_memory::peak_rss_bytes(),
                epsilon: summary.and_then(|s| s.privacy.as_ref()).map(|p| p.epsilon),
                dp_server_s: summary.and_then(|s| s.privacy.as_ref()).map(|p| p.server_s),
                secagg_up_bytes_per_client: secure.map(|c| c.upload_bytes_per_client),
                secagg_down_bytes_per_client: secure.map(|c| c.download_bytes_per_client),
                secagg_server_s: secure.map(|c| c.server_s),
            }
        })
        .collect()
}
