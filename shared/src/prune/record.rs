//! A pruned checkpoint: the Hugging Face folder of a pruned model, plus `pruning.json`, the record
//! of what was kept (in the unpruned model's coordinates) and how it was chosen.
//!
//! The folder loads like any other ([`HfFolder`](crate::checkpoint::HfFolder) →
//! [`Llama::load`]): its `config.json` carries the per-layer sizes (see [`crate::model::config`])
//! and its safetensors the compensation biases. Nothing needs `pruning.json` to run the model;
//! it is what maps the pruned model back onto the full one ([`scatter`](super::scatter),
//! [`gather`](super::gather)), which is why it is a file of its own rather than more keys in
//! `config.json`: tens of thousands of channel indices for a SmolLM2-sized model, which every
//! reader of the config would otherwise parse.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::kept::KeptUnits;
use super::plan::RatioBasis;
use super::units::{LayerShape, model_params, prunable_params};
use crate::checkpoint::export::write_hf_folder;
use crate::checkpoint::{CheckpointError, WeightSource};
use crate::model::{Llama, LlamaConfig};

/// The record's file name inside a pruned folder.
pub const PRUNING_FILE: &str = "pruning.json";

/// The record's format version; [`PruningRecord::read`] refuses others.
pub const RECORD_FORMAT: u32 = 1;

/// How units were scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PruneMetric {
    /// FLAP's fluctuation ([`plan_flap`](super::plan_flap)).
    Flap,
    /// Weight magnitude ([`plan_magnitude`](super::plan_magnitude)).
    Magnitude,
}

/// The calibration text a step used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalibrationInfo {
    /// The text file.
    pub text: String,
    /// Sequences.
    pub sequences: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Tokens in all.
    pub tokens: u64,
}

/// One pruning pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruneStep {
    /// The importance score.
    pub metric: PruneMetric,
    /// The requested fraction of the pruned model's parameters, counted on `ratio_of`.
    pub ratio: f64,
    /// What `ratio` is a fraction of (records older than the field: the prunable parameters).
    #[serde(default)]
    pub ratio_of: RatioBasis,
    /// Projection weights this pass removed.
    pub removed_params: usize,
    /// The prunable parameters of the model this pass pruned
    /// ([`prunable_params`](super::prunable_params); 0 in records older than the field).
    #[serde(default)]
    pub prunable_params: usize,
    /// All parameters of the model this pass pruned ([`model_params`](super::model_params); 0 in
    /// records older than the field).
    #[serde(default)]
    pub total_params: usize,
    /// `removed_params / prunable_params`.
    #[serde(default)]
    pub removed_fraction_of_prunable: f64,
    /// `removed_params / total_params`.
    #[serde(default)]
    pub removed_fraction_of_total: f64,
    /// Whether removed inputs' means were folded into the `o_proj`/`down_proj` biases.
    pub bias_compensation: bool,
    /// The calibration text, when the pass calibrated.
    pub calibration: Option<CalibrationInfo>,
}

impl PruneStep {
    /// The step that removed `removed_params` weights from `model` (the model before this pass)
    /// with `metric` at `ratio` of `ratio_of`; both removed
    /// fractions filled in from `model`. Compensation and calibration are left off; set them.
    pub fn new(
        metric: PruneMetric,
        ratio: f64,
        ratio_of: RatioBasis,
        removed_params: usize,
        model: &Llama,
    ) -> Self {
        let (prunable, total) = (prunable_params(model), model_params(model));
        Self {
            metric,
            ratio,
            ratio_of,
            removed_params,
            prunable_params: prunable,
            total_params: total,
            removed_fraction_of_prunable: removed_params as f64 / prunable.max(1) as f64,
            removed_fraction_of_total: removed_params as f64 / total.max(1) as f64,
            bias_compensation: false,
            calibration: None,
        }
    }
}

/// `pruning.json`: what a pruned model kept of the full model, and the passes that pruned it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruningRecord {
    /// [`RECORD_FORMAT`].
    pub format: u32,
    /// The unpruned model, as it was named when pruned.
    pub source: String,
    /// The unpruned model's layer shapes: the coordinates of `kept`.
    pub full: Vec<LayerShape>,
    /// Per layer, the units kept, in the unpruned model's numbering.
    pub kept: Vec<KeptUnits>,
    /// Every pass, in order (more than one when a pruned model was pruned again).
    pub steps: Vec<PruneStep>,
}

impl PruningRecord {
    /// The record of a first pass over the unpruned `full` model (named `source`) that kept
    /// `kept`.
    pub fn new(
        source: impl Into<String>,
        full: &Llama,
        kept: Vec<KeptUnits>,
        step: PruneStep,
    ) -> Self {
        Self {
            format: RECORD_FORMAT,
            source: source.into(),
            full: full.layers.iter().map(LayerShape::of).collect(),
            kept,
            steps: vec![step],
        }
    }

    /// The record after another pass that kept `kept`, numbered in the already pruned model's
    /// coordinates: the records compose by indexing (`self.kept.kv_heads[kept.kv_heads[i]]`).
    ///
    /// # Panics
    /// When `kept` does not have one record per layer or an index is past what this record kept.
    pub fn then(mut self, kept: &[KeptUnits], step: PruneStep) -> Self {
        assert_eq!(kept.len(), self.kept.len(), "one record per layer");
        for (before, now) in self.kept.iter_mut().zip(kept) {
            before.kv_heads = now.kv_heads.iter().map(|&i| before.kv_heads[i]).collect();
            before.ffn_channels = now
                .ffn_channels
                .iter()
                .map(|&i| before.ffn_channels[i])
                .collect();
        }
        self.steps.push(step);
        self
    }

    /// Checks the record against the pruned model's `config`: one record per layer, each valid
    /// in its full layer ([`KeptUnits::check`]), and as many units as the layer has.
    pub fn check(&self, config: &LlamaConfig) -> Result<(), String> {
        if self.kept.len() != config.num_layers || self.full.len() != config.num_layers {
            return Err(format!(
                "{} records and {} full layers for {} layers",
                self.kept.len(),
                self.full.len(),
                config.num_layers
            ));
        }
        for (i, (kept, full)) in self.kept.iter().zip(&self.full).enumerate() {
            kept.check(i, full)?;
            let arch = config.layer(i);
            let heads = kept.kv_heads.len();
            if heads != arch.num_kv_heads
                || heads * full.group() != arch.num_heads
                || kept.ffn_channels.len() != arch.intermediate_size
            {
                return Err(format!(
                    "layer {i}: the record keeps {heads} key/value groups and {} channels, the \
                     config has {} query heads over {} key/value heads and {} channels",
                    kept.ffn_channels.len(),
                    arch.num_heads,
                    arch.num_kv_heads,
                    arch.intermediate_size
                ));
            }
        }
        Ok(())
    }

    /// Writes `dir/pruning.json`.
    pub fn write(&self, dir: &Path) -> Result<(), CheckpointError> {
        let path = dir.join(PRUNING_FILE);
        let json = serde_json::to_string_pretty(self).map_err(|e| CheckpointError::Malformed {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::write(&path, json).map_err(|source| CheckpointError::Io { path, source })
    }

    /// Reads `dir/pruning.json`; `None` when the folder has none (an unpruned model).
    pub fn read(dir: &Path) -> Result<Option<Self>, CheckpointError> {
        let path = dir.join(PRUNING_FILE);
        let json = match std::fs::read_to_string(&path) {
            Ok(json) => json,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(CheckpointError::Io { path, source }),
        };
        let malformed = |reason: String| CheckpointError::Malformed {
            path: path.clone(),
            reason,
        };
        let record: Self = serde_json::from_str(&json).map_err(|e| malformed(e.to_string()))?;
        if record.format != RECORD_FORMAT {
            return Err(malformed(format!(
                "format {} (this fedtune reads {RECORD_FORMAT})",
                record.format
            )));
        }
        Ok(Some(record))
    }
}

/// Writes a pruned model as a checkpoint folder: `config.json` with its per-layer sizes,
/// `model.safetensors` with its biases (both by [`write_hf_folder`] from
/// [`Llama::to_source`]) and `pruning.json`.
///
/// `base` is the configuration of the model pruning started from.
///
/// # Errors
/// [`CheckpointError::BadConfig`] when `record` does not describe `model`
/// ([`PruningRecord::check`]); the errors of writing the files.
pub fn write_pruned_folder(
    model: &Llama,
    base: &LlamaConfig,
    record: &PruningRecord,
    dir: &Path,
) -> Result<(), CheckpointError> {
    let source = model.to_source(base);
    record
        .check(source.config())
        .map_err(|reason| CheckpointError::BadConfig {
            path: dir.join(PRUNING_FILE),
            reason,
        })?;
    write_hf_folder(&source, dir)?;
    record.write(dir)
}
