//! Structured pruning: removing whole attention heads and MLP channels so that the model itself
//! gets smaller and faster (FedSpine's first step), not just sparser.
//!
//! - [`units`]: what a unit is (a key/value head with its query group, or one FFN channel),
//!   where its weights sit, what it costs;
//! - [`calibration`]: per-channel input statistics of `o_proj` and `down_proj` from a forward
//!   pass ([`calibrate`]);
//! - [`magnitude`], [`flap`]: importance scores (weight magnitude; FLAP's fluctuation metric and
//!   bias compensation);
//! - [`plan`]: one global ranking cut at a fraction of the prunable parameters or of the whole
//!   model ([`RatioBasis`]) ([`plan_flap`], [`plan_magnitude`], [`select`]);
//! - [`structural`]: applying a plan ([`prune_model`]);
//! - [`kept`]: the per-layer record of kept units, and the maps between pruned and full
//!   coordinates;
//! - [`record`]: a pruned model as a checkpoint folder ([`write_pruned_folder`]), with
//!   `pruning.json` ([`PruningRecord`]) beside the weights.
//!
//! ```text
//! let stats = calibrate(&model, &sequences);
//! let plan = plan_flap(&stats, &model, 0.2, &PruneOptions::default())?;
//! let (pruned, kept) = prune_model(model, &plan);
//! let record = PruningRecord::new("SmolLM2", &full, kept, step);
//! write_pruned_folder(&pruned, &config, &record, dir)?; // loads back with HfFolder + Llama::load
//! ```
//!
//! - [`lora_importance`]: LoRAPrune's importance from the adapters' gradients during tuning;
//! - [`schedule`], [`prune_tune`]: FedSpine's local round, pruning on a cubic schedule every `P`
//!   iterations while the adapters are tuned ([`prune_and_tune`]).
//!
//! Not here yet: GGUF export
//! of a pruned model (llama.cpp reads per-layer head counts as metadata arrays; fedtune's GGUF
//! reader and writer do not yet).

pub mod calibration;
pub mod flap;
pub mod kept;
pub mod lora_importance;
pub mod magnitude;
pub mod plan;
pub mod prune_tune;
pub mod record;
pub mod schedule;
pub mod structural;
pub mod units;

pub use calibration::{CalibrationStats, ChannelStats, InputMeans, LayerStats, calibrate};
pub use flap::{compensation_bias, flap_scores, layer_flap_scores};
pub use kept::{Axis, KeptUnits, gather, scatter};
pub use lora_importance::{LoraImportance, layer_importance};
pub use magnitude::{layer_magnitude, magnitude_rms, magnitude_scores};
pub use plan::{PlanError, PruneOptions, PrunePlan, RatioBasis, plan_flap, plan_magnitude, select};
pub use prune_tune::{LocalTuning, PruneTuneError, PruneTuneRound, prune_and_tune};
pub use record::{
    CalibrationInfo, PRUNING_FILE, PruneMetric, PruneStep, PruningRecord, write_pruned_folder,
};
pub use schedule::{ImportanceKind, PruneSchedule, cubic_ratio, pruning_points};
pub use structural::prune_model;
pub use units::{LayerScores, LayerShape, Unit, UnitKind, model_params, prunable_params};
