//! A virtual device's round in process: the same training functions the device SDK runs
//! (`fedtune_client::trainer`), fed from the daemon's blob store instead of a QUIC stream, so
//! an in-process run and a QUIC run compute the same thing.

use fedtune_client::trainer::{
    FedKSeedModel, TrainError, TrainingData, train_fedspine, train_lora,
};
use fedtune_server::blobs::{BlobError, Blobs};
use fedtune_shared::lora::adapter::AdapterWeights;
use fedtune_shared::lora::aggregation::masked::restrict_adapter;
use fedtune_shared::model::Llama;
use fedtune_shared::progress::Silent;
use fedtune_shared::protocol::adapter_blob::{decode_adapter, encode_adapter};
use fedtune_shared::protocol::{BlobRef, LocalStats, ReportPayload, Task};
use fedtune_shared::prune::units::LayerShape;

use crate::attack::{AttackError, Behaviour};

/// What a device's round produced.
#[derive(Debug, Clone)]
pub struct LocalResult {
    /// The report's payload.
    pub payload: ReportPayload,
    /// What the device measured (wall time on this machine).
    pub stats: LocalStats,
    /// Bytes of blobs the device downloaded for the task.
    pub blob_down_bytes: u64,
    /// Bytes of blobs it uploaded.
    pub blob_up_bytes: u64,
    /// Bytes of weights and adapters the device held while training (the memory a profile's
    /// limit is checked against).
    pub model_bytes: u64,
    /// Seconds of the whole local round on this machine: training and everything around it
    /// (LoRA's probe losses for the bandit, adapter encoding), which a real device also does.
    pub device_s: f64,
}

/// Why a device's round failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalError {
    /// Training failed.
    #[error("training failed: {0}")]
    Train(#[from] TrainError),
    /// A blob was missing or unreadable.
    #[error("blob: {0}")]
    Blob(#[from] BlobError),
    /// An attacker's update could not be built.
    #[error("{0}")]
    Attack(#[from] AttackError),
    /// A plan this harness cannot run.
    #[error("{0}")]
    Unsupported(String),
}

/// The models a round's devices start from, shared by all of them.
pub struct SharedModels<'a> {
    /// The frozen base (on the training device: autodiff for LoRA).
    pub base: &'a Llama,
    /// FedKSeed: the global model, caught up to the round before the current one.
    pub fedkseed: Option<&'a FedKSeedModel>,
}

/// Runs `task` as a device would, with its data and the plan's local seed; a device whose
/// `behaviour` is an attack tampers with the update it reports ([`Behaviour`]) after training
/// honestly, as a poisoning device running the real SDK would.
pub fn run_task(
    models: &SharedModels<'_>,
    blobs: &Blobs,
    task: &Task,
    local_seed: u64,
    data: &TrainingData,
    behaviour: &Behaviour,
) -> Result<LocalResult, LocalError> {
    let started = std::time::Instant::now();
    let mut result = run(models, blobs, task, local_seed, data, behaviour)?;
    result.device_s = started.elapsed().as_secs_f64();
    Ok(result)
}

fn run(
    models: &SharedModels<'_>,
    blobs: &Blobs,
    task: &Task,
    local_seed: u64,
    data: &TrainingData,
    behaviour: &Behaviour,
) -> Result<LocalResult, LocalError> {
    // The attacker's noise has a stream of its own: its training is the honest device's.
    let attack_seed = local_seed ^ 0x0bad_5eed_0bad_5eed;
    match task {
        Task::FedKSeed { plan, batch_size } => {
            let shared = models.fedkseed.ok_or_else(|| {
                LocalError::Unsupported("a FedKSeed task in a run without a FedKSeed model".into())
            })?;
            // Tensors are shared until written: the clone costs nothing until the steps perturb
            // it, and the catch-up inside `train` skips the rounds the shared model holds.
            let mut model = shared.clone();
            let (_, mut report, stats) =
                model.train(plan, *batch_size, local_seed, data, &mut Silent)?;
            behaviour.tamper_seed_grads(&mut report, attack_seed);
            Ok(LocalResult {
                payload: ReportPayload::FedKSeed(report),
                stats,
                blob_down_bytes: 0,
                blob_up_bytes: 0,
                model_bytes: weight_bytes(model.model()),
                device_s: 0.0,
            })
        }
        Task::Lora(lora) => {
            let (global, down) = download(blobs, lora.adapter)?;
            let (weights, stats) =
                train_lora(models.base, lora, &global, data, local_seed, &mut Silent)?;
            let weights = behaviour.tamper_adapter(&global, weights, attack_seed)?;
            let (uploaded, up) = upload(blobs, &weights)?;
            Ok(LocalResult {
                payload: ReportPayload::Lora {
                    adapter: uploaded,
                    rank: weights.rank,
                },
                stats,
                blob_down_bytes: down,
                blob_up_bytes: up,
                model_bytes: weight_bytes(models.base) + up,
                device_s: 0.0,
            })
        }
        Task::FedSpine(spine) => {
            let (global, down) = download(blobs, spine.lora.adapter)?;
            let mut outcome =
                train_fedspine(models.base, spine, &global, data, local_seed, &mut Silent)?;
            if behaviour.is_attack() {
                // The device's adapter lives in its kept coordinates: its update is measured
                // from the same coordinates of the global adapter it received.
                let shapes: Vec<LayerShape> =
                    models.base.layers.iter().map(LayerShape::of).collect();
                let start = restrict_adapter(&global, &outcome.kept, &shapes)
                    .map_err(|e| TrainError::Adapter(e.to_string()))?;
                outcome.adapter = behaviour.tamper_adapter(&start, outcome.adapter, attack_seed)?;
            }
            let (uploaded, up) = upload(blobs, &outcome.adapter)?;
            // The device trained the pruned model: its weights are what it held.
            let kept_fraction = 1.0 - outcome.removed_ratio;
            Ok(LocalResult {
                payload: ReportPayload::FedSpine {
                    adapter: uploaded,
                    rank: outcome.adapter.rank,
                    kept: outcome.kept,
                },
                stats: outcome.stats,
                blob_down_bytes: down,
                blob_up_bytes: up,
                model_bytes: (weight_bytes(models.base) as f64 * kept_fraction) as u64 + up,
                device_s: 0.0,
            })
        }
        _ => Err(LocalError::Unsupported(
            "this harness does not know the plan's algorithm".into(),
        )),
    }
}

/// The global adapter a plan names, read from the daemon's blob store, and its size.
fn download(blobs: &Blobs, blob: Option<BlobRef>) -> Result<(AdapterWeights, u64), LocalError> {
    let blob =
        blob.ok_or_else(|| LocalError::Unsupported("an adapter plan without an adapter".into()))?;
    let bytes = blobs.read(&blob.digest)?;
    let global = decode_adapter(&bytes).map_err(|e| TrainError::Adapter(e.to_string()))?;
    Ok((global, bytes.len() as u64))
}

/// Stores a trained adapter as the device's upload, and its size.
fn upload(blobs: &Blobs, weights: &AdapterWeights) -> Result<(BlobRef, u64), LocalError> {
    let encoded = encode_adapter(weights);
    Ok((blobs.put(&encoded)?, encoded.len() as u64))
}

/// Bytes of a model's parameters as they sit in memory.
pub fn weight_bytes(model: &Llama) -> u64 {
    use burn::module::Module;
    model.num_params() as u64 * 4
}
