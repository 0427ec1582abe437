//! Hugging Face PEFT adapter folders: an [`AdapterWeights`] written as, and read back from, the
//! `adapter_config.json` + `adapter_model.safetensors` pair that
//! `peft.PeftModel.from_pretrained(base, dir)` loads onto a Llama-family base model
//! (`LlamaForCausalLM`, e.g. SmolLM2-135M-Instruct).
//!
//! # Format followed
//!
//! The config carries exactly the keys that PEFT 0.9.0's `LoraConfig` saves
//! (`src/peft/config.py` and `src/peft/tuners/lora/config.py` at tag `v0.9.0`), with the same
//! layout as its `json.dumps(…, indent=2, sort_keys=True)`. 0.9.0 is the first release that
//! knows `use_dora`. Releases before 0.14 fail on keys they do not know, so this key set loads
//! in every PEFT from 0.9.0 on. Keys added later (`layer_replication`, `exclude_modules`,
//! `lora_bias`, `peft_version`, …) are left out, and their defaults give plain LoRA. Checked
//! against PEFT main at 0.20.1.dev0 (commit `5d602fd`): `PeftConfig.from_peft_type` needs only
//! `peft_type`, and since 0.14 it drops keys it does not know, with a warning.
//!
//! The weights match what `PeftModel.save_pretrained` writes: `get_peft_model_state_dict` with
//! the adapter name (`.default`) removed, stored as float32 safetensors with metadata
//! `{"format": "pt"}`.
//!
//! # Names and orientation
//!
//! | fedtune | PEFT | shape |
//! |---|---|---|
//! | `layers[AdaptedLayer { layer: i, target }].a` | `base_model.model.model.layers.{i}.{target.hf_path()}.lora_A.weight` | `[r, d_in]` |
//! | `layers[AdaptedLayer { layer: i, target }].b` | `base_model.model.model.layers.{i}.{target.hf_path()}.lora_B.weight` | `[d_out, r]` |
//! | `rank` | `r` | |
//! | `scaling.alpha` | `lora_alpha` | |
//! | `scaling.rslora` | `use_rslora` | |
//! | `targets()` | `target_modules` (short names: `q_proj`, …) | |
//!
//! `target.hf_path()` is `self_attn.{q,k,v,o}_proj` or `mlp.{gate,up,down}_proj`. The prefix reads
//! `base_model` (PEFT's `LoraModel`), `.model` (`LlamaForCausalLM`), `.model` (`LlamaModel`),
//! `.layers`. Nothing is transposed. [`LoraFactors`] already uses the orientation of PEFT's
//! `nn.Linear` weights, because PEFT computes `base(x) + s · lora_B(lora_A(x))` =
//! `x Wᵀ + s · x Aᵀ Bᵀ`.
//!
//! An adapter that covers only some layers is still written with `target_modules` alone and
//! `layers_to_transform: null`, as PEFT writes its own adapters. PEFT then wraps the uncovered
//! projections too, and warns about their missing keys. Those projections keep their
//! initialisation (`init_lora_weights: true` sets `lora_B` to zero), so the model computes the
//! same thing.
//!
//! # Reading
//!
//! [`read_peft_adapter`] also reads folders that PEFT wrote. It accepts keys it does not know,
//! because PEFT adds keys from release to release, and F16 and BF16 tensors. Tensor names may
//! carry the `.default` adapter name. It rejects everything that a plain single-rank LoRA on a
//! Llama projection cannot represent (DoRA, per-layer ranks, extra trained modules, …) and every
//! inconsistency between the config and the tensors. Each error names the file and the key or
//! tensor at fault.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{Map, Value};

use crate::checkpoint::hf_folder::safetensors_values;
use crate::lora::adapter::{AdaptedLayer, AdapterWeights, LoraFactors, LoraScaling, TargetModule};

/// The config's file name in an adapter folder (PEFT's `CONFIG_NAME`).
pub const CONFIG_FILE: &str = "adapter_config.json";

/// The weights' file name in an adapter folder (PEFT's `SAFETENSORS_WEIGHTS_NAME`).
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// PEFT's older pickled weight file (`WEIGHTS_NAME`). It is never read, because unpickling can
/// run code. Its name only improves the error when a folder has nothing else.
const PICKLE_WEIGHTS_FILE: &str = "adapter_model.bin";

/// Every LoRA tensor name starts with this: `PeftModel.base_model` (the `LoraModel`), its
/// `.model` (`LlamaForCausalLM`), that one's `.model` (`LlamaModel`) and its decoder `.layers`.
const TENSOR_PREFIX: &str = "base_model.model.model.layers.";

/// The adapter name that PEFT gives an adapter it was not told a name for. It appears in tensor
/// names only when a raw `state_dict()` was saved, not `save_pretrained`'s output.
const DEFAULT_ADAPTER_NAME: &str = "default";

/// At most this many bytes of `adapter_config.json`. PEFT writes about 1 KiB. A `rank_pattern`
/// for every projection of a 128-layer model stays under 100 KiB.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// At most this many bytes of `adapter_model.safetensors`, which is read whole into memory. A
/// rank-256 adapter on every projection of an 8B Llama is about 2.7 GB in float32. Anything
/// larger is not an adapter that fedtune trains on a device.
const MAX_WEIGHTS_BYTES: u64 = 8 << 30;

/// PEFT's `LoraConfig` default for `r`, used when a config leaves the key out (PEFT does the same).
const PEFT_DEFAULT_R: u64 = 8;

/// PEFT's `LoraConfig` default for `lora_alpha`.
const PEFT_DEFAULT_ALPHA: f64 = 8.0;

/// `init_lora_weights` values that only choose the starting point of training. The saved
/// factors then mean the same as any LoRA on the unchanged base model.
const PLAIN_INITS: [&str; 3] = ["gaussian", "eva", "orthogonal"];

/// `init_lora_weights` values (or prefixes) whose adapters only fit a base model that PEFT
/// modified at initialisation. PEFT only writes a plain LoRA from these when
/// `save_pretrained(…, path_initial_model_for_weight_conversion=…)` converts it, and that
/// writes `init_lora_weights: true`.
const BASE_CHANGING_INITS: [&str; 6] = ["pissa", "olora", "corda", "loftq", "lora_ga", "mica"];

/// Config keys that select something other than a plain LoRA on a projection, with the reason.
/// A key is only refused when it is set, that is, when it is not `null`, `false`, `{}` or `[]`.
const UNSUPPORTED_IF_SET: [(&str, &str); 16] = [
    (
        "use_dora",
        "DoRA adds a magnitude vector per projection; fedtune adapters are plain LoRA",
    ),
    (
        "fan_in_fan_out",
        "factors stored transposed (GPT-2 `Conv1D` layout) do not occur on Llama projections",
    ),
    (
        "rank_pattern",
        "per-module ranks; a fedtune adapter has one rank",
    ),
    (
        "alpha_pattern",
        "per-module alphas; a fedtune adapter has one scale",
    ),
    (
        "modules_to_save",
        "fully trained extra modules are not part of a fedtune adapter",
    ),
    (
        "lora_bias",
        "a trained bias on lora_B is not part of a fedtune adapter",
    ),
    (
        "trainable_token_indices",
        "trained token embeddings are not part of a fedtune adapter",
    ),
    (
        "target_parameters",
        "LoRA on bare parameters (e.g. MoE experts) is not supported",
    ),
    (
        "layer_replication",
        "replicated base layers change the model's depth",
    ),
    ("use_qalora", "QA-LoRA pools lora_A's input"),
    (
        "alora_invocation_tokens",
        "activated LoRA applies only after its invocation tokens",
    ),
    (
        "megatron_config",
        "Megatron parallel layers are not Llama projections",
    ),
    ("use_bdlora", "block-diagonal factors are not supported"),
    (
        "arrow_config",
        "Arrow routing between adapters is not supported",
    ),
    (
        "kasa_config",
        "KaSA changes the base weights and adds a singular-value diagonal",
    ),
    (
        "monteclora_config",
        "MonteCLoRA samples the factors in the forward pass",
    ),
];

/// Every `LoraConfig` key that PEFT 0.20 knows. A key outside this list is accepted (PEFT adds
/// keys over versions) and logged, as a warning when its value is set.
const KNOWN_KEYS: [&str; 42] = [
    "alora_invocation_tokens",
    "alpha_pattern",
    "arrow_config",
    "auto_mapping",
    "base_model_name_or_path",
    "bias",
    "corda_config",
    "ensure_weight_tying",
    "eva_config",
    "exclude_modules",
    "fan_in_fan_out",
    "inference_mode",
    "init_lora_weights",
    "kasa_config",
    "layer_replication",
    "layers_pattern",
    "layers_to_transform",
    "loftq_config",
    "lora_alpha",
    "lora_bias",
    "lora_dropout",
    "lora_ga_config",
    "megatron_config",
    "megatron_core",
    "modules_to_save",
    "monteclora_config",
    "peft_type",
    "peft_version",
    "qalora_group_size",
    "r",
    "rank_pattern",
    "revision",
    "runtime_config",
    "target_modules",
    "target_parameters",
    "task_type",
    "trainable_token_indices",
    "use_bdlora",
    "use_dora",
    "use_qalora",
    "use_rslora",
    "velora_config",
];

/// Why an adapter folder could not be written or read. Every variant names the file, and the
/// config key or tensor when one is at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeftError {
    /// A file or the folder could not be opened, read, written or renamed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// A file is larger than any adapter file should be.
    #[error("{}: {len} bytes, more than the {max} bytes allowed for this file", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The limit for this file.
        max: u64,
    },
    /// The folder holds only pickled PyTorch weights.
    #[error(
        "{}: pickled weights are not read (unpickling can run code); save the adapter with \
         `save_pretrained(…, safe_serialization=True)` to get {WEIGHTS_FILE}",
        path.display()
    )]
    PickleWeights {
        /// The `adapter_model.bin` file.
        path: PathBuf,
    },
    /// `adapter_config.json` is not valid JSON.
    #[error("{}: not valid JSON: {source}", path.display())]
    BadJson {
        /// The config file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A config key has the wrong type or an impossible value.
    #[error("{}: `{key}`: {reason}", path.display())]
    BadConfig {
        /// The config file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The config describes another PEFT method.
    #[error("{}: `peft_type` is `{found}`, only LORA adapters are read", path.display())]
    NotLora {
        /// The config file.
        path: PathBuf,
        /// The `peft_type` found.
        found: String,
    },
    /// The config asks for a LoRA variant or extra that a fedtune adapter cannot hold.
    #[error("{}: `{key}` is not supported: {reason}", path.display())]
    Unsupported {
        /// The config file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Why it cannot be represented.
        reason: String,
    },
    /// `target_modules` names a module that is not one of a Llama layer's seven projections.
    #[error(
        "{}: target module `{name}` is not a Llama projection \
         (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)",
        path.display()
    )]
    UnknownTargetModule {
        /// The config file.
        path: PathBuf,
        /// The name as written.
        name: String,
    },
    /// The safetensors container is broken (truncated, bad header, forged offsets, …).
    #[error("{}: malformed safetensors file: {reason}", path.display())]
    Malformed {
        /// The weights file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The weights file holds no LoRA tensors at all.
    #[error("{}: no LoRA tensors", path.display())]
    NoTensors {
        /// The weights file.
        path: PathBuf,
    },
    /// A tensor is not a LoRA factor of a Llama projection (a bias, DoRA magnitude, `lm_head`,
    /// another adapter's name, …).
    #[error(
        "{}: unexpected tensor `{tensor}` (expected \
         `{TENSOR_PREFIX}{{i}}.{{self_attn|mlp}}.{{q|k|v|o|gate|up|down}}_proj.lora_{{A|B}}.weight`)",
        path.display()
    )]
    UnexpectedTensor {
        /// The weights file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
    },
    /// Two tensors hold the same factor (e.g. `lora_A.weight` and `lora_A.default.weight`).
    #[error("{}: tensors `{tensor}` and `{other}` are the same factor", path.display())]
    DuplicateTensor {
        /// The weights file.
        path: PathBuf,
        /// One tensor.
        tensor: String,
        /// The other.
        other: String,
    },
    /// One factor of a pair is present and the other is not.
    #[error("{}: tensor `{tensor}` is missing", path.display())]
    MissingTensor {
        /// The weights file.
        path: PathBuf,
        /// The expected name.
        tensor: String,
    },
    /// A factor's rank dimension differs from the config's `r`.
    #[error(
        "{}: tensor `{tensor}` has rank {found}, the config says r = {expected}",
        path.display()
    )]
    RankMismatch {
        /// The weights file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// `r` from the config.
        expected: usize,
        /// The rank dimension found.
        found: usize,
    },
    /// Two factors disagree on a dimension that every Llama layer shares.
    #[error("{}: tensor `{tensor}` disagrees with `{other}`: {reason}", path.display())]
    ShapeMismatch {
        /// The weights file.
        path: PathBuf,
        /// The tensor found inconsistent.
        tensor: String,
        /// The tensor it was compared with.
        other: String,
        /// Which dimension, and the two values.
        reason: String,
    },
    /// A tensor has an unsupported dtype or an impossible shape.
    #[error("{}: tensor `{tensor}`: {reason}", path.display())]
    BadTensor {
        /// The weights file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor holds NaN or an infinity.
    #[error(
        "{}: tensor `{tensor}`: element {index} is {value}, not a finite number",
        path.display()
    )]
    NonFinite {
        /// The weights file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Row-major index of the first bad element.
        index: usize,
        /// The value.
        value: f32,
    },
    /// The adapter given to [`write_peft_adapter`] is inconsistent.
    #[error("cannot export adapter: {reason}")]
    InvalidAdapter {
        /// What is wrong, naming the layer.
        reason: String,
    },
    /// An export option is out of range.
    #[error("cannot export adapter: option `{option}`: {reason}")]
    InvalidOption {
        /// The option.
        option: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The safetensors or JSON encoder refused the data.
    #[error("{}: cannot encode: {reason}", path.display())]
    Encode {
        /// The file being written.
        path: PathBuf,
        /// The encoder's error.
        reason: String,
    },
}

/// What [`write_peft_adapter`] needs beyond the weights.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftExportOptions {
    /// `base_model_name_or_path`: the Hub id or folder of the base model, e.g.
    /// `HuggingFaceTB/SmolLM2-135M-Instruct`. `PeftModel.from_pretrained(base, dir)` takes the base
    /// as an argument and ignores this, but `AutoPeftModelForCausalLM` loads it from here. An
    /// empty string writes `null`.
    pub base_model_name_or_path: String,
    /// `lora_dropout`, in `[0, 1]`. Only used if someone trains the adapter further in PEFT.
    pub lora_dropout: f32,
}

impl PeftExportOptions {
    /// Options for base model `base_model_name_or_path`, without dropout.
    pub fn new(base_model_name_or_path: impl Into<String>) -> Self {
        Self {
            base_model_name_or_path: base_model_name_or_path.into(),
            lora_dropout: 0.0,
        }
    }
}

/// The parts of an `adapter_config.json` that matter to fedtune, after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftAdapterConfig {
    /// `base_model_name_or_path`, if the config names one.
    pub base_model_name_or_path: Option<String>,
    /// `revision` of the base model, if any.
    pub revision: Option<String>,
    /// `task_type`, e.g. `CAUSAL_LM`, if any.
    pub task_type: Option<String>,
    /// `r`.
    pub r: usize,
    /// `lora_alpha`.
    pub lora_alpha: f32,
    /// `lora_dropout`.
    pub lora_dropout: f32,
    /// `use_rslora`.
    pub use_rslora: bool,
    /// `target_modules`, deduplicated, in decoder-layer order. `all-linear` means all seven. A
    /// config without the key gets the targets that have tensors.
    pub target_modules: Vec<TargetModule>,
    /// `layers_to_transform`, if the adapter is restricted to some layers.
    pub layers_to_transform: Option<Vec<usize>>,
    /// `peft_version`, written by PEFT 0.18 and later.
    pub peft_version: Option<String>,
}

impl PeftAdapterConfig {
    /// The scaling that `lora_alpha` and `use_rslora` describe.
    pub fn scaling(&self) -> LoraScaling {
        LoraScaling {
            alpha: self.lora_alpha,
            rslora: self.use_rslora,
        }
    }
}

/// Writes `adapter` to `dir` (created if missing) as `adapter_config.json` and
/// `adapter_model.safetensors`, which `peft.PeftModel.from_pretrained(base, dir)` loads.
///
/// The adapter is checked first: one rank everywhere, factor lengths matching their shapes,
/// finite values, and dimensions that a Llama model can have (e.g. every `q_proj` and `k_proj`
/// reads the same hidden size). Each file is written to a temporary file in `dir`, synced and
/// renamed over the old one. A crash therefore leaves every file either old or new, never cut
/// short. Both files are synced before the first rename, so the window in which the folder
/// mixes old and new files is two renames long. [`read_peft_adapter`] checks the config
/// against the tensors, and it catches such a mix whenever the rank or targets changed.
pub fn write_peft_adapter(
    dir: &Path,
    adapter: &AdapterWeights,
    options: &PeftExportOptions,
) -> Result<(), PeftError> {
    validate_adapter(adapter)?;
    let config = PeftAdapterConfig::for_export(adapter, options)?;

    let config_path = dir.join(CONFIG_FILE);
    let weights_path = dir.join(WEIGHTS_FILE);
    let config_json = config.to_peft_json(&config_path)?;
    let weights = encode_weights(&weights_path, adapter)?;

    fs::create_dir_all(dir).map_err(|source| PeftError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let weights_file = PendingFile::write(dir, WEIGHTS_FILE, &weights)?;
    let config_file = PendingFile::write(dir, CONFIG_FILE, config_json.as_bytes())?;
    weights_file.commit()?;
    config_file.commit()?;
    sync_dir(dir)?;

    tracing::debug!(
        dir = %dir.display(),
        rank = adapter.rank,
        layers = adapter.layers.len(),
        "wrote PEFT adapter"
    );
    Ok(())
}

/// Reads a PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`), one
/// that [`write_peft_adapter`] or PEFT's `save_pretrained` wrote.
///
/// The function rejects folders that a single-rank LoRA on Llama projections cannot represent,
/// and any mismatch between the config and the tensors. F16 and BF16 factors are widened to
/// f32 exactly.
pub fn read_peft_adapter(dir: &Path) -> Result<(AdapterWeights, PeftAdapterConfig), PeftError> {
    let config_path = dir.join(CONFIG_FILE);
    let config_bytes = read_capped(&config_path, MAX_CONFIG_BYTES)?;
    let parsed = parse_config(&config_path, &config_bytes)?;

    let weights_path = dir.join(WEIGHTS_FILE);
    let weights_bytes = match read_capped(&weights_path, MAX_WEIGHTS_BYTES) {
        Err(PeftError::Io { source, .. })
            if source.kind() == io::ErrorKind::NotFound
                && dir.join(PICKLE_WEIGHTS_FILE).is_file() =>
        {
            return Err(PeftError::PickleWeights {
                path: dir.join(PICKLE_WEIGHTS_FILE),
            });
        }
        other => other?,
    };
    let layers = decode_weights(&weights_path, &weights_bytes, &parsed)?;

    let config = parsed.finish(&layers);
    let adapter = AdapterWeights {
        rank: config.r,
        scaling: config.scaling(),
        layers,
    };
    tracing::debug!(
        dir = %dir.display(),
        rank = adapter.rank,
        layers = adapter.layers.len(),
        "read PEFT adapter"
    );
    Ok((adapter, config))
}

// ---------------------------------------------------------------------------------------------
// Writing

impl PeftAdapterConfig {
    /// The config that describes `adapter` (already validated).
    fn for_export(
        adapter: &AdapterWeights,
        options: &PeftExportOptions,
    ) -> Result<Self, PeftError> {
        let dropout = options.lora_dropout;
        if !(0.0..=1.0).contains(&dropout) {
            return Err(PeftError::InvalidOption {
                option: "lora_dropout",
                reason: format!("{dropout} is not a probability in [0, 1]"),
            });
        }
        let base = &options.base_model_name_or_path;
        Ok(Self {
            base_model_name_or_path: (!base.is_empty()).then(|| base.clone()),
            revision: None,
            task_type: Some("CAUSAL_LM".into()),
            r: adapter.rank,
            lora_alpha: adapter.scaling.alpha,
            lora_dropout: dropout,
            use_rslora: adapter.scaling.rslora,
            target_modules: adapter.targets(),
            layers_to_transform: None,
            peft_version: None,
        })
    }

    /// `adapter_config.json` as PEFT 0.9.0 writes it: the keys of its `LoraConfig`, sorted,
    /// indented by two spaces. `peft_version` is not one of those keys, so it is left out.
    fn to_peft_json(&self, path: &Path) -> Result<String, PeftError> {
        let opt_string = |s: &Option<String>| s.clone().map_or(Value::Null, Value::String);
        let alpha = alpha_json(self.lora_alpha).ok_or_else(|| PeftError::InvalidAdapter {
            reason: format!("alpha {} is not finite", self.lora_alpha),
        })?;
        let dropout = float_json(self.lora_dropout).ok_or_else(|| PeftError::InvalidOption {
            option: "lora_dropout",
            reason: format!("{} is not finite", self.lora_dropout),
        })?;
        let targets = self
            .target_modules
            .iter()
            .map(|t| Value::String(t.name().into()))
            .collect();
        let layers = self.layers_to_transform.as_ref().map_or(Value::Null, |l| {
            l.iter().copied().map(Value::from).collect()
        });

        // In sorted key order, so that the text is sorted whether or not serde_json's
        // `preserve_order` feature is switched on somewhere in the build.
        let entries: [(&str, Value); 23] = [
            ("alpha_pattern", Value::Object(Map::new())),
            ("auto_mapping", Value::Null),
            (
                "base_model_name_or_path",
                opt_string(&self.base_model_name_or_path),
            ),
            ("bias", "none".into()),
            ("fan_in_fan_out", false.into()),
            ("inference_mode", true.into()),
            ("init_lora_weights", true.into()),
            ("layers_pattern", Value::Null),
            ("layers_to_transform", layers),
            ("loftq_config", Value::Object(Map::new())),
            ("lora_alpha", alpha),
            ("lora_dropout", dropout),
            ("megatron_config", Value::Null),
            ("megatron_core", "megatron.core".into()),
            ("modules_to_save", Value::Null),
            ("peft_type", "LORA".into()),
            ("r", self.r.into()),
            ("rank_pattern", Value::Object(Map::new())),
            ("revision", opt_string(&self.revision)),
            ("target_modules", Value::Array(targets)),
            ("task_type", opt_string(&self.task_type)),
            ("use_dora", false.into()),
            ("use_rslora", self.use_rslora.into()),
        ];
        debug_assert!(entries.windows(2).all(|w| w[0].0 < w[1].0));
        let map: Map<String, Value> = entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        serde_json::to_string_pretty(&Value::Object(map)).map_err(|e| PeftError::Encode {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }
}

/// `lora_alpha` as PEFT writes it: an integer when it is one (the field is typed `int`, and
/// users pass `lora_alpha=16`), otherwise a float. Zero stays a float so that `-0.0` keeps its
/// sign. `None` if not finite.
fn alpha_json(alpha: f32) -> Option<Value> {
    // 2^53: every f32 with no fraction below this is exactly an i64 and back.
    const EXACT_INT: f32 = 9_007_199_254_740_992.0;
    if alpha.is_finite() && alpha != 0.0 && alpha.fract() == 0.0 && alpha.abs() < EXACT_INT {
        // The checks above make the cast exact.
        #[allow(clippy::cast_possible_truncation)]
        return Some(Value::from(alpha as i64));
    }
    float_json(alpha)
}

/// An f32 as the JSON number with the fewest digits that still reads back to the same f32
/// (`0.05`, not `0.05000000074505806`), as Python prints the value a user typed. `None` if not
/// finite.
fn float_json(x: f32) -> Option<Value> {
    // Rust prints the shortest decimal that reads back as `x`. Reading that decimal as an f64
    // and then narrowing rounds twice, so the f64 is checked and, in the rare case where it
    // narrows to another f32, replaced by `x` widened exactly.
    let shortest = x
        .to_string()
        .parse::<f64>()
        .ok()
        .filter(|&v| (v as f32).to_bits() == x.to_bits())
        .unwrap_or(f64::from(x));
    serde_json::Number::from_f64(shortest).map(Value::Number)
}

/// Checks what a PEFT folder needs from `adapter`. Data that fails these checks would give a
/// folder that PEFT cannot load or that loads as nonsense.
fn validate_adapter(adapter: &AdapterWeights) -> Result<(), PeftError> {
    let invalid = |reason: String| PeftError::InvalidAdapter { reason };
    if adapter.rank == 0 {
        return Err(invalid("rank is 0".into()));
    }
    if adapter.layers.is_empty() {
        return Err(invalid("no adapted layers".into()));
    }
    if !adapter.scaling.alpha.is_finite() {
        return Err(invalid(format!(
            "alpha {} is not finite",
            adapter.scaling.alpha
        )));
    }
    for (at, f) in &adapter.layers {
        let here = describe(*at);
        if f.rank != adapter.rank {
            return Err(invalid(format!(
                "{here} has rank {}, the adapter has rank {}",
                f.rank, adapter.rank
            )));
        }
        if f.d_in == 0 || f.d_out == 0 {
            return Err(invalid(format!(
                "{here} is [{} -> {}], a zero-sized projection",
                f.d_in, f.d_out
            )));
        }
        if !f.is_consistent() {
            return Err(invalid(format!(
                "{here}: A has {} values and B {}, expected {} x {} and {} x {}",
                f.a.len(),
                f.b.len(),
                f.rank,
                f.d_in,
                f.d_out,
                f.rank
            )));
        }
        for (factor, values) in [("A", &f.a), ("B", &f.b)] {
            if let Some((i, v)) = first_non_finite(values) {
                return Err(invalid(format!(
                    "{here}: {factor}[{i}] is {v}, not a finite number"
                )));
            }
        }
    }
    let dims = adapter.layers.iter().map(|(&at, f)| (at, f.d_in, f.d_out));
    check_shared_dims(dims).map_err(|c| {
        invalid(format!(
            "{} has {} {}, but {} has {}",
            describe(c.second.0),
            c.dim,
            c.second.2,
            describe(c.first.0),
            c.first.2
        ))
    })
}

/// `layer 3 q_proj`, for messages.
fn describe(at: AdaptedLayer) -> String {
    format!("layer {} {}", at.layer, at.target)
}

/// The safetensors bytes of `adapter`: float32, little-endian, PEFT's names, `format: pt`
/// metadata as `save_pretrained` writes it.
fn encode_weights(path: &Path, adapter: &AdapterWeights) -> Result<Vec<u8>, PeftError> {
    let le_bytes =
        |values: &[f32]| -> Vec<u8> { values.iter().flat_map(|v| v.to_le_bytes()).collect() };
    let mut buffers = Vec::with_capacity(2 * adapter.layers.len());
    for (&at, f) in &adapter.layers {
        buffers.push((
            tensor_name(at, Factor::A),
            vec![f.rank, f.d_in],
            le_bytes(&f.a),
        ));
        buffers.push((
            tensor_name(at, Factor::B),
            vec![f.d_out, f.rank],
            le_bytes(&f.b),
        ));
    }
    let encode_error = |e: safetensors::SafeTensorError| PeftError::Encode {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let views = buffers
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data).map(|view| (name.as_str(), view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(encode_error)?;
    let metadata = [("format".to_owned(), "pt".to_owned())]
        .into_iter()
        .collect();
    safetensors::serialize(views, Some(metadata)).map_err(encode_error)
}

/// A file written under a temporary name in its final folder, renamed into place by
/// [`PendingFile::commit`] and removed if dropped before that.
struct PendingFile {
    temp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl PendingFile {
    /// Writes and syncs `bytes` to a fresh hidden file next to `dir/name`.
    fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<Self, PeftError> {
        // The pid and a counter keep concurrent writers, in this process or another, off each
        // other's temporary files. `create_new` refuses to reuse a leftover from a crash.
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
        let io_error = |source| PeftError::Io {
            path: temp.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(io_error)?;
        // From here on a failure must remove the file, which the guard's `Drop` does.
        let pending = Self {
            temp: temp.clone(),
            target: dir.join(name),
            committed: false,
        };
        file.write_all(bytes).map_err(io_error)?;
        file.sync_all().map_err(io_error)?;
        Ok(pending)
    }

    /// Renames the file over its target.
    fn commit(mut self) -> Result<(), PeftError> {
        fs::rename(&self.temp, &self.target).map_err(|source| PeftError::Io {
            path: self.target.clone(),
            source,
        })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the error that got us here is the one worth reporting, and a stray
            // hidden `.tmp` file is harmless.
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Makes the renames in `dir` durable. On Unix a rename reaches the disk only when its folder
/// is synced.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<(), PeftError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| PeftError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// Elsewhere folders cannot be opened as files, and renames are durable once they return.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<(), PeftError> {
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Reading

/// Reads `path` whole, refusing files over `max` bytes before allocating.
fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, PeftError> {
    let io_error = |source| PeftError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_error)?;
    let len = file.metadata().map_err(io_error)?.len();
    let too_large = |len| PeftError::TooLarge {
        path: path.to_path_buf(),
        len,
        max,
    };
    if len > max {
        return Err(too_large(len));
    }
    let capacity = usize::try_from(len).map_err(|_| too_large(len))?;
    let mut bytes = Vec::with_capacity(capacity);
    // `take` guards against a file that grows after `metadata`.
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    if bytes.len() as u64 > max {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// A config that has been checked but not yet compared with the tensors.
struct ParsedConfig {
    config: PeftAdapterConfig,
    /// Whether `target_modules` was given (a list or `all-linear`).
    targets_given: bool,
}

impl ParsedConfig {
    /// The final config. A config that did not name its targets gets the ones that have tensors.
    fn finish(mut self, layers: &BTreeMap<AdaptedLayer, LoraFactors>) -> PeftAdapterConfig {
        if !self.targets_given {
            let mut targets: Vec<_> = layers.keys().map(|at| at.target).collect();
            targets.sort();
            targets.dedup();
            self.config.target_modules = targets;
        }
        self.config
    }
}

/// Typed access to the keys of the config object, with errors that name the key.
struct ConfigKeys<'a> {
    path: &'a Path,
    object: &'a Map<String, Value>,
}

impl ConfigKeys<'_> {
    fn bad(&self, key: &str, reason: impl Into<String>) -> PeftError {
        PeftError::BadConfig {
            path: self.path.to_path_buf(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// The value, with `null` read as absent (PEFT writes `null` for every unset optional key).
    fn get(&self, key: &str) -> Option<&Value> {
        self.object.get(key).filter(|v| !v.is_null())
    }

    fn string(&self, key: &str) -> Result<Option<String>, PeftError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.bad(key, format!("expected a string, found {other}"))),
        }
    }

    fn bool(&self, key: &str) -> Result<bool, PeftError> {
        match self.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(self.bad(key, format!("expected true or false, found {other}"))),
        }
    }

    fn positive_int(&self, key: &str, default: u64) -> Result<usize, PeftError> {
        let n = match self.get(key) {
            None => default,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| self.bad(key, format!("expected a positive integer, found {v}")))?,
        };
        if n == 0 {
            return Err(self.bad(key, "must be at least 1"));
        }
        usize::try_from(n).map_err(|_| self.bad(key, format!("{n} is too large")))
    }

    /// A JSON number (integer or float) that is finite as an f32.
    fn number(&self, key: &str, default: f64) -> Result<f32, PeftError> {
        let x = match self.get(key) {
            None => default,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.bad(key, format!("expected a number, found {v}")))?,
        };
        // Narrowing picks the nearest f32, which is exactly the value that fedtune wrote.
        #[allow(clippy::cast_possible_truncation)]
        let narrow = x as f32;
        if !narrow.is_finite() {
            return Err(self.bad(key, format!("{x} is outside the f32 range")));
        }
        Ok(narrow)
    }
}

/// Whether a config value turns its option on: anything but `null`, `false`, `""`, `{}`, `[]`.
fn is_set(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::Number(_) => true,
    }
}

/// Parses and checks `adapter_config.json`.
fn parse_config(path: &Path, bytes: &[u8]) -> Result<ParsedConfig, PeftError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|source| PeftError::BadJson {
        path: path.to_path_buf(),
        source,
    })?;
    let Value::Object(object) = &value else {
        return Err(PeftError::BadConfig {
            path: path.to_path_buf(),
            key: "(top level)".into(),
            reason: "expected a JSON object".into(),
        });
    };
    let keys = ConfigKeys { path, object };
    let unsupported = |key: &str, reason: String| PeftError::Unsupported {
        path: path.to_path_buf(),
        key: key.into(),
        reason,
    };

    // `peft_type` is the one key PEFT itself requires (`MIN_EXPECTED_CONFIG_KEYS`).
    let peft_type = keys
        .string("peft_type")?
        .ok_or_else(|| keys.bad("peft_type", "missing; a PEFT config names its method"))?;
    if peft_type != "LORA" {
        return Err(PeftError::NotLora {
            path: path.to_path_buf(),
            found: peft_type,
        });
    }

    for (key, reason) in UNSUPPORTED_IF_SET {
        if object.get(key).is_some_and(is_set) {
            return Err(unsupported(key, reason.into()));
        }
    }
    let bias = keys.string("bias")?.unwrap_or_else(|| "none".into());
    if bias != "none" {
        return Err(unsupported(
            "bias",
            format!(
                "`{bias}` trains the base model's biases, which are not part of a fedtune adapter"
            ),
        ));
    }
    check_init(&keys)?;

    let r = keys.positive_int("r", PEFT_DEFAULT_R)?;
    let lora_alpha = keys.number("lora_alpha", PEFT_DEFAULT_ALPHA)?;
    let lora_dropout = keys.number("lora_dropout", 0.0)?;
    if !(0.0..=1.0).contains(&lora_dropout) {
        return Err(keys.bad(
            "lora_dropout",
            format!("{lora_dropout} is not a probability in [0, 1]"),
        ));
    }
    let use_rslora = keys.bool("use_rslora")?;
    let target_modules = parse_targets(&keys)?;
    let layers_to_transform = parse_layers_to_transform(&keys)?;

    for (key, value) in object {
        if KNOWN_KEYS.contains(&key.as_str()) {
            continue;
        }
        if is_set(value) {
            tracing::warn!(
                config = %path.display(),
                key = %key,
                value = %value,
                "ignoring an adapter config key that this fedtune does not know; \
                 if it selects a LoRA variant, the adapter will not behave as in PEFT"
            );
        } else {
            tracing::debug!(config = %path.display(), key = %key, "ignoring unset config key");
        }
    }

    Ok(ParsedConfig {
        targets_given: target_modules.is_some(),
        config: PeftAdapterConfig {
            base_model_name_or_path: keys.string("base_model_name_or_path")?,
            revision: keys.string("revision")?,
            task_type: keys.string("task_type")?,
            r,
            lora_alpha,
            lora_dropout,
            use_rslora,
            target_modules: target_modules.unwrap_or_default(),
            layers_to_transform,
            peft_version: keys.string("peft_version")?,
        },
    })
}

/// Accepts `init_lora_weights` values whose adapters fit the unchanged base model.
fn check_init(keys: &ConfigKeys<'_>) -> Result<(), PeftError> {
    const KEY: &str = "init_lora_weights";
    let unsupported = |reason: String| PeftError::Unsupported {
        path: keys.path.to_path_buf(),
        key: KEY.into(),
        reason,
    };
    match keys.get(KEY) {
        None | Some(Value::Bool(_)) => Ok(()),
        Some(Value::String(s)) if PLAIN_INITS.contains(&s.as_str()) => Ok(()),
        Some(Value::String(s)) if BASE_CHANGING_INITS.iter().any(|p| s.starts_with(p)) => {
            Err(unsupported(format!(
                "`{s}` changes the base model's weights, so the factors only fit that changed \
                 base; save from PEFT with `path_initial_model_for_weight_conversion` to get a \
                 plain LoRA"
            )))
        }
        Some(Value::String(s)) => Err(unsupported(format!(
            "unknown initialisation `{s}` may change the base weights or the forward pass"
        ))),
        Some(other) => Err(keys.bad(
            KEY,
            format!("expected true, false or a name, found {other}"),
        )),
    }
}

/// `target_modules`: a list of projection names, `all-linear`, or absent (`None`).
fn parse_targets(keys: &ConfigKeys<'_>) -> Result<Option<Vec<TargetModule>>, PeftError> {
    const KEY: &str = "target_modules";
    let names = match keys.get(KEY) {
        None => return Ok(None),
        // PEFT resolves `all-linear` to every linear layer except the output head: on Llama,
        // the seven projections.
        Some(Value::String(s)) if s == "all-linear" => return Ok(Some(TargetModule::ALL.to_vec())),
        Some(Value::String(s)) => {
            return Err(PeftError::Unsupported {
                path: keys.path.to_path_buf(),
                key: KEY.into(),
                reason: format!("regular expression `{s}`; list the projections by name"),
            });
        }
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(keys.bad(KEY, format!("expected a list of names, found {other}")));
        }
    };
    let mut targets = Vec::with_capacity(names.len());
    for item in names {
        let Value::String(name) = item else {
            return Err(keys.bad(KEY, format!("expected a module name, found {item}")));
        };
        // PEFT matches a name against the end of each module path, so `self_attn.q_proj`
        // selects the same modules as `q_proj`.
        let target = TargetModule::ALL
            .into_iter()
            .find(|t| t.name() == name || t.hf_path() == name)
            .ok_or_else(|| PeftError::UnknownTargetModule {
                path: keys.path.to_path_buf(),
                name: name.clone(),
            })?;
        targets.push(target);
    }
    targets.sort();
    targets.dedup();
    Ok(Some(targets))
}

/// `layers_to_transform`: one index, a list of indices, or absent.
fn parse_layers_to_transform(keys: &ConfigKeys<'_>) -> Result<Option<Vec<usize>>, PeftError> {
    const KEY: &str = "layers_to_transform";
    let index = |v: &Value| {
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| keys.bad(KEY, format!("expected a layer index, found {v}")))
    };
    match keys.get(KEY) {
        None => Ok(None),
        Some(Value::Array(items)) => {
            let mut layers = items.iter().map(index).collect::<Result<Vec<_>, _>>()?;
            layers.sort_unstable();
            layers.dedup();
            Ok(Some(layers))
        }
        Some(v) => Ok(Some(vec![index(v)?])),
    }
}

/// Which factor of a pair a tensor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Factor {
    /// `lora_A`, `[r, d_in]`.
    A,
    /// `lora_B`, `[d_out, r]`.
    B,
}

impl Factor {
    const fn module(self) -> &'static str {
        match self {
            Self::A => "lora_A",
            Self::B => "lora_B",
        }
    }
}

/// The name PEFT's `save_pretrained` gives a factor.
fn tensor_name(at: AdaptedLayer, factor: Factor) -> String {
    format!(
        "{TENSOR_PREFIX}{}.{}.{}.weight",
        at.layer,
        at.target.hf_path(),
        factor.module()
    )
}

/// Parses `base_model.model.model.layers.{i}.{path}.lora_{A|B}[.default].weight`. Returns
/// whether the `.default` adapter name was present.
fn parse_tensor_name(name: &str) -> Option<(AdaptedLayer, Factor, bool)> {
    let rest = name.strip_prefix(TENSOR_PREFIX)?;
    let (index, rest) = rest.split_once('.')?;
    // Digits only, without leading zeros: `01` would silently alias layer 1, and PEFT never
    // writes it.
    let canonical = !index.is_empty()
        && index.bytes().all(|b| b.is_ascii_digit())
        && (index == "0" || !index.starts_with('0'));
    if !canonical {
        return None;
    }
    let layer = index.parse::<usize>().ok()?;
    let (target, rest) = TargetModule::ALL.into_iter().find_map(|t| {
        let rest = rest.strip_prefix(t.hf_path())?.strip_prefix('.')?;
        Some((t, rest))
    })?;
    let (module, rest) = rest.split_once('.')?;
    let factor = [Factor::A, Factor::B]
        .into_iter()
        .find(|f| f.module() == module)?;
    let named = match rest {
        "weight" => false,
        _ if rest.strip_suffix(".weight") == Some(DEFAULT_ADAPTER_NAME) => true,
        _ => return None,
    };
    Some((AdaptedLayer { layer, target }, factor, named))
}

/// One decoded factor.
struct RawFactor {
    tensor: String,
    rows: usize,
    cols: usize,
    values: Vec<f32>,
}

/// Both factors of one projection as found in the file.
#[derive(Default)]
struct RawPair {
    a: Option<RawFactor>,
    b: Option<RawFactor>,
    /// Whether the names carried `.default`, to name a missing partner the same way.
    named: bool,
}

/// Decodes and checks the safetensors file against the config.
fn decode_weights(
    path: &Path,
    bytes: &[u8],
    parsed: &ParsedConfig,
) -> Result<BTreeMap<AdaptedLayer, LoraFactors>, PeftError> {
    let config = &parsed.config;
    let tensors = SafeTensors::deserialize(bytes).map_err(|e| PeftError::Malformed {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    // Sorted, so that the first error reported does not depend on hash order.
    let mut views = tensors.tensors();
    views.sort_by(|x, y| x.0.cmp(&y.0));
    if views.is_empty() {
        return Err(PeftError::NoTensors {
            path: path.to_path_buf(),
        });
    }

    let bad = |tensor: &str, reason: String| PeftError::BadTensor {
        path: path.to_path_buf(),
        tensor: tensor.into(),
        reason,
    };
    let mut pairs: BTreeMap<AdaptedLayer, RawPair> = BTreeMap::new();
    for (name, view) in views {
        let (at, factor, named) =
            parse_tensor_name(&name).ok_or_else(|| PeftError::UnexpectedTensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
            })?;
        if parsed.targets_given && !config.target_modules.contains(&at.target) {
            return Err(bad(
                &name,
                format!("`{}` is not in the config's target_modules", at.target),
            ));
        }
        if let Some(layers) = &config.layers_to_transform
            && !layers.contains(&at.layer)
        {
            return Err(bad(
                &name,
                format!(
                    "layer {} is not in the config's layers_to_transform",
                    at.layer
                ),
            ));
        }

        let &[rows, cols] = view.shape() else {
            return Err(bad(
                &name,
                format!("shape {:?}, expected two dimensions", view.shape()),
            ));
        };
        if rows == 0 || cols == 0 {
            return Err(bad(&name, format!("shape [{rows}, {cols}] is empty")));
        }
        let rank = match factor {
            Factor::A => rows,
            Factor::B => cols,
        };
        if rank != config.r {
            return Err(PeftError::RankMismatch {
                path: path.to_path_buf(),
                tensor: name,
                expected: config.r,
                found: rank,
            });
        }
        let values = safetensors_values(&view).map_err(|reason| bad(&name, reason))?;
        if values.len() != rows * cols {
            // The safetensors reader already ties the byte length to the shape. This stays as
            // a guard in case that ever changes.
            return Err(bad(
                &name,
                format!("{} values for shape [{rows}, {cols}]", values.len()),
            ));
        }
        if let Some((index, value)) = first_non_finite(&values) {
            return Err(PeftError::NonFinite {
                path: path.to_path_buf(),
                tensor: name,
                index,
                value,
            });
        }

        let pair = pairs.entry(at).or_default();
        pair.named |= named;
        let slot = match factor {
            Factor::A => &mut pair.a,
            Factor::B => &mut pair.b,
        };
        if let Some(previous) = slot {
            return Err(PeftError::DuplicateTensor {
                path: path.to_path_buf(),
                tensor: previous.tensor.clone(),
                other: name,
            });
        }
        *slot = Some(RawFactor {
            tensor: name,
            rows,
            cols,
            values,
        });
    }

    let mut layers = BTreeMap::new();
    let mut names = BTreeMap::new();
    for (at, pair) in pairs {
        let missing = |factor: Factor| {
            let canonical = tensor_name(at, factor);
            let tensor = if pair.named {
                canonical.replace(".weight", &format!(".{DEFAULT_ADAPTER_NAME}.weight"))
            } else {
                canonical
            };
            PeftError::MissingTensor {
                path: path.to_path_buf(),
                tensor,
            }
        };
        let (a, b) = match (pair.a, pair.b) {
            (Some(a), Some(b)) => (a, b),
            (Some(_), None) => return Err(missing(Factor::B)),
            (None, _) => return Err(missing(Factor::A)),
        };
        names.insert(at, (a.tensor, b.tensor));
        layers.insert(
            at,
            LoraFactors {
                rank: config.r,
                d_in: a.cols,
                d_out: b.rows,
                a: a.values,
                b: b.values,
            },
        );
    }

    let dims = layers.iter().map(|(&at, f)| (at, f.d_in, f.d_out));
    check_shared_dims(dims).map_err(|c| {
        let name = |(at, side, _): (AdaptedLayer, Side, usize)| {
            names.get(&at).map_or_else(
                || tensor_name(at, side.factor()),
                |(a, b)| match side {
                    Side::In => a.clone(),
                    Side::Out => b.clone(),
                },
            )
        };
        PeftError::ShapeMismatch {
            path: path.to_path_buf(),
            tensor: name(c.second),
            other: name(c.first),
            reason: format!("{} {} vs {}", c.dim, c.second.2, c.first.2),
        }
    })?;

    for target in &config.target_modules {
        if !layers.keys().any(|at| at.target == *target) {
            tracing::debug!(
                weights = %path.display(),
                target = %target,
                "target module listed in the config has no tensors"
            );
        }
    }
    Ok(layers)
}

/// The first NaN or infinity and its index.
fn first_non_finite(values: &[f32]) -> Option<(usize, f32)> {
    values
        .iter()
        .copied()
        .enumerate()
        .find(|(_, v)| !v.is_finite())
}

/// Which side of a projection a dimension is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// `d_in`, the columns of `lora_A`.
    In,
    /// `d_out`, the rows of `lora_B`.
    Out,
}

impl Side {
    const fn factor(self) -> Factor {
        match self {
            Self::In => Factor::A,
            Self::Out => Factor::B,
        }
    }
}

/// Dimensions that every projection of every `LlamaForCausalLM` layer shares: `hidden_size`,
/// `num_attention_heads · head_dim`, `num_key_value_heads · head_dim` and `intermediate_size`.
/// An adapter that disagrees with itself here fits no base model. Catching that in fedtune
/// names the tensors, where PEFT only reports a size mismatch at load time. Every
/// (projection, side) pair is in exactly one group, so the table also requires each
/// projection to have the same shape in every layer.
const SHARED_DIMS: [(&str, &[(TargetModule, Side)]); 4] = [
    (
        "hidden size",
        &[
            (TargetModule::QProj, Side::In),
            (TargetModule::KProj, Side::In),
            (TargetModule::VProj, Side::In),
            (TargetModule::OProj, Side::Out),
            (TargetModule::GateProj, Side::In),
            (TargetModule::UpProj, Side::In),
            (TargetModule::DownProj, Side::Out),
        ],
    ),
    (
        "attention width",
        &[
            (TargetModule::QProj, Side::Out),
            (TargetModule::OProj, Side::In),
        ],
    ),
    (
        "key/value width",
        &[
            (TargetModule::KProj, Side::Out),
            (TargetModule::VProj, Side::Out),
        ],
    ),
    (
        "intermediate size",
        &[
            (TargetModule::GateProj, Side::Out),
            (TargetModule::UpProj, Side::Out),
            (TargetModule::DownProj, Side::In),
        ],
    ),
];

/// Two projections that disagree on a shared dimension: `(where, side, value)` of the first
/// one seen and of the one that differs.
struct DimConflict {
    dim: &'static str,
    first: (AdaptedLayer, Side, usize),
    second: (AdaptedLayer, Side, usize),
}

/// Checks [`SHARED_DIMS`] over `(where, d_in, d_out)` of every adapted projection.
fn check_shared_dims(
    layers: impl Iterator<Item = (AdaptedLayer, usize, usize)>,
) -> Result<(), DimConflict> {
    let mut seen: [Option<(AdaptedLayer, Side, usize)>; SHARED_DIMS.len()] =
        [None; SHARED_DIMS.len()];
    for (at, d_in, d_out) in layers {
        for side in [Side::In, Side::Out] {
            let value = match side {
                Side::In => d_in,
                Side::Out => d_out,
            };
            let Some(group) = SHARED_DIMS
                .iter()
                .position(|(_, members)| members.contains(&(at.target, side)))
            else {
                continue;
            };
            match seen[group] {
                None => seen[group] = Some((at, side, value)),
                Some(first) if first.2 != value => {
                    return Err(DimConflict {
                        dim: SHARED_DIMS[group].0,
                        first,
                        second: (at, side, value),
                    });
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// A Llama-shaped layer: hidden 8, attention 8, key/value 4, intermediate 12.
    fn dims(target: TargetModule) -> (usize, usize) {
        match target {
            TargetModule::QProj | TargetModule::OProj => (8, 8),
            TargetModule::KProj | TargetModule::VProj => (8, 4),
            TargetModule::GateProj | TargetModule::UpProj => (8, 12),
            TargetModule::DownProj => (12, 8),
        }
    }

    /// Deterministic values that exercise every bit: signs, a negative zero, a subnormal, huge
    /// and tiny magnitudes.
    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        (0..n)
            .map(|i| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                match i % 17 {
                    3 => -0.0,
                    5 => f32::from_bits(1), // smallest subnormal
                    7 => -3.0e38,
                    11 => 1.0e-30,
                    _ => ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02,
                }
            })
            .collect()
    }

    fn adapter(
        rank: usize,
        layers: &[usize],
        targets: &[TargetModule],
        scaling: LoraScaling,
    ) -> AdapterWeights {
        let mut map = BTreeMap::new();
        for &layer in layers {
            for &target in targets {
                let (d_in, d_out) = dims(target);
                let seed = (layer * 10 + target as usize) as u64;
                map.insert(
                    AdaptedLayer { layer, target },
                    LoraFactors {
                        rank,
                        d_in,
                        d_out,
                        a: values(seed, rank * d_in),
                        b: values(seed + 1000, d_out * rank),
                    },
                );
            }
        }
        AdapterWeights {
            rank,
            scaling,
            layers: map,
        }
    }

    fn plain(alpha: f32) -> LoraScaling {
        LoraScaling {
            alpha,
            rslora: false,
        }
    }

    fn assert_bit_exact(x: &AdapterWeights, y: &AdapterWeights) {
        assert_eq!(x.rank, y.rank);
        assert_eq!(x.scaling.alpha.to_bits(), y.scaling.alpha.to_bits());
        assert_eq!(x.scaling.rslora, y.scaling.rslora);
        assert_eq!(
            x.layers.keys().collect::<Vec<_>>(),
            y.layers.keys().collect::<Vec<_>>()
        );
        for (at, f) in &x.layers {
            let g = &y.layers[at];
            assert_eq!(
                (f.rank, f.d_in, f.d_out),
                (g.rank, g.d_in, g.d_out),
                "{at:?}"
            );
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&f.a), bits(&g.a), "A of {at:?}");
            assert_eq!(bits(&f.b), bits(&g.b), "B of {at:?}");
        }
    }

    /// The config PEFT 0.9.0 writes for `LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05,
    /// target_modules=[…], task_type="CAUSAL_LM")` after `save_pretrained`, with keys added in
    /// later releases (as PEFT 0.17 writes them) and an unknown future key.
    fn peft_config_json(r: usize, targets: &str, extra: &str) -> String {
        format!(
            r#"{{
  "alpha_pattern": {{}},
  "auto_mapping": null,
  "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
  "bias": "none",
  "corda_config": null,
  "eva_config": null,
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "layer_replication": null,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {{}},
  "lora_alpha": 16,
  "lora_bias": false,
  "lora_dropout": 0.05,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": null,
  "peft_type": "LORA",
  "peft_version": "0.17.1",
  "r": {r},
  "rank_pattern": {{}},
  "revision": null,
  "target_modules": {targets},
  "task_type": "CAUSAL_LM",
  "trainable_token_indices": null,
  "use_dora": false,
  "use_rslora": false,
  "some_future_key": null{extra}
}}"#
        )
    }

    /// A tensor in a hand-built safetensors file: name, dtype, shape, little-endian bytes.
    type RawTensor = (String, Dtype, Vec<usize>, Vec<u8>);

    fn f32_tensor(name: &str, shape: &[usize], values: &[f32]) -> RawTensor {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        (name.to_owned(), Dtype::F32, shape.to_vec(), bytes)
    }

    fn write_folder(dir: &Path, config: &str, tensors: &[RawTensor]) {
        fs::write(dir.join(CONFIG_FILE), config).expect("write config");
        let views: Vec<_> = tensors
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                let view = TensorView::new(*dtype, shape.clone(), bytes).expect("view");
                (name.as_str(), view)
            })
            .collect();
        let bytes = safetensors::serialize(views, None).expect("serialize");
        fs::write(dir.join(WEIGHTS_FILE), bytes).expect("write weights");
    }

    const Q0: &str = "base_model.model.model.layers.0.self_attn.q_proj";

    /// A valid r = 2 folder with q_proj on layer 0, then `config` and tensors changed by the
    /// caller. Returns the folder.
    fn folder_with(config: &str, edit: impl FnOnce(&mut Vec<RawTensor>)) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut tensors = vec![
            f32_tensor(&format!("{Q0}.lora_A.weight"), &[2, 8], &[0.5; 16]),
            f32_tensor(&format!("{Q0}.lora_B.weight"), &[8, 2], &[0.25; 16]),
        ];
        edit(&mut tensors);
        write_folder(dir.path(), config, &tensors);
        dir
    }

    fn q_config() -> String {
        peft_config_json(2, r#"["q_proj"]"#, "")
    }

    fn read_err(dir: &tempfile::TempDir) -> PeftError {
        match read_peft_adapter(dir.path()) {
            Ok(_) => panic!("reading {} should fail", dir.path().display()),
            Err(e) => e,
        }
    }

    #[test]
    fn round_trip_is_bit_exact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let original = adapter(3, &[0, 1, 5], &TargetModule::ALL, plain(0.1));
        let options = PeftExportOptions {
            base_model_name_or_path: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
            lora_dropout: 0.05,
        };
        write_peft_adapter(dir.path(), &original, &options).expect("write");
        let (read, config) = read_peft_adapter(dir.path()).expect("read");
        assert_bit_exact(&original, &read);
        assert_eq!(
            config,
            PeftAdapterConfig {
                base_model_name_or_path: Some("HuggingFaceTB/SmolLM2-135M-Instruct".into()),
                revision: None,
                task_type: Some("CAUSAL_LM".into()),
                r: 3,
                lora_alpha: 0.1,
                lora_dropout: 0.05,
                use_rslora: false,
                target_modules: TargetModule::ALL.to_vec(),
                layers_to_transform: None,
                peft_version: None,
            }
        );
    }

    #[test]
    fn round_trip_keeps_scaling_rank_and_rslora() {
        let cases = [
            (
                1,
                LoraScaling {
                    alpha: 7.3,
                    rslora: true,
                },
                0.0,
            ),
            (
                2,
                LoraScaling {
                    alpha: 16.0,
                    rslora: true,
                },
                0.1,
            ),
            (
                8,
                LoraScaling {
                    alpha: -0.0,
                    rslora: false,
                },
                1.0,
            ),
            (
                5,
                LoraScaling {
                    alpha: 1.0e-7,
                    rslora: false,
                },
                0.3,
            ),
            (
                4,
                LoraScaling {
                    alpha: 3.0e9,
                    rslora: true,
                },
                0.05,
            ),
        ];
        for (rank, scaling, dropout) in cases {
            let dir = tempfile::tempdir().expect("tempdir");
            let original = adapter(
                rank,
                &[2, 30],
                &[TargetModule::KProj, TargetModule::DownProj],
                scaling,
            );
            let mut options = PeftExportOptions::new("");
            options.lora_dropout = dropout;
            write_peft_adapter(dir.path(), &original, &options).expect("write");
            let (read, config) = read_peft_adapter(dir.path()).expect("read");
            assert_bit_exact(&original, &read);
            assert_eq!(read.scale().to_bits(), original.scale().to_bits());
            assert_eq!(config.lora_dropout.to_bits(), dropout.to_bits());
            assert_eq!(config.base_model_name_or_path, None);
        }
    }

    #[test]
    fn config_json_matches_peft_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let original = adapter(
            4,
            &[0, 1],
            &[
                TargetModule::VProj,
                TargetModule::QProj,
                TargetModule::UpProj,
            ],
            plain(16.0),
        );
        let options = PeftExportOptions {
            base_model_name_or_path: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
            lora_dropout: 0.05,
        };
        write_peft_adapter(dir.path(), &original, &options).expect("write");
        let text = fs::read_to_string(dir.path().join(CONFIG_FILE)).expect("config");
        // Byte for byte what PEFT 0.9.0 writes (json.dumps(indent=2, sort_keys=True)).
        let expected = r#"{
  "alpha_pattern": {},
  "auto_mapping": null,
  "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
  "bias": "none",
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {},
  "lora_alpha": 16,
  "lora_dropout": 0.05,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": null,
  "peft_type": "LORA",
  "r": 4,
  "rank_pattern": {},
  "revision": null,
  "target_modules": [
    "q_proj",
    "v_proj",
    "up_proj"
  ],
  "task_type": "CAUSAL_LM",
  "use_dora": false,
  "use_rslora": false
}"#;
        assert_eq!(text, expected);

        // The same through a JSON parser, for the keys the brief names.
        let json: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(json["peft_type"], "LORA");
        assert_eq!(json["task_type"], "CAUSAL_LM");
        assert_eq!(json["r"], 4);
        assert!(json["r"].is_u64());
        assert_eq!(json["lora_alpha"], 16);
        assert_eq!(json["use_rslora"], false);
        assert_eq!(json["fan_in_fan_out"], false);
        assert_eq!(json["use_dora"], false);
        assert!(json["modules_to_save"].is_null());

        // Non-integral alpha and rsLoRA.
        let rs = adapter(
            2,
            &[0],
            &[TargetModule::QProj],
            LoraScaling {
                alpha: 0.1,
                rslora: true,
            },
        );
        write_peft_adapter(dir.path(), &rs, &PeftExportOptions::new("")).expect("write");
        let json: Value = serde_json::from_str(
            &fs::read_to_string(dir.path().join(CONFIG_FILE)).expect("config"),
        )
        .expect("json");
        assert_eq!(json["lora_alpha"].to_string(), "0.1");
        assert_eq!(json["lora_dropout"].to_string(), "0.0");
        assert_eq!(json["use_rslora"], true);
        assert!(json["base_model_name_or_path"].is_null());
    }

    #[test]
    fn safetensors_names_shapes_and_metadata_match_peft() {
        let dir = tempfile::tempdir().expect("tempdir");
        let original = adapter(
            2,
            &[0, 11],
            &[
                TargetModule::QProj,
                TargetModule::OProj,
                TargetModule::GateProj,
                TargetModule::DownProj,
            ],
            plain(8.0),
        );
        write_peft_adapter(dir.path(), &original, &PeftExportOptions::new("m")).expect("write");
        let bytes = fs::read(dir.path().join(WEIGHTS_FILE)).expect("weights");
        let (_, metadata) = SafeTensors::read_metadata(&bytes).expect("metadata");
        let format = metadata.metadata().as_ref().and_then(|m| m.get("format"));
        assert_eq!(format.map(String::as_str), Some("pt"));

        let file = SafeTensors::deserialize(&bytes).expect("safetensors");
        let mut found: Vec<(String, Dtype, Vec<usize>)> = file
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.dtype(), view.shape().to_vec()))
            .collect();
        found.sort();
        let mut expected: Vec<(String, Dtype, Vec<usize>)> = [
            ("0.self_attn.q_proj", [2, 8], [8, 2]),
            ("0.self_attn.o_proj", [2, 8], [8, 2]),
            ("0.mlp.gate_proj", [2, 8], [12, 2]),
            ("0.mlp.down_proj", [2, 12], [8, 2]),
            ("11.self_attn.q_proj", [2, 8], [8, 2]),
            ("11.self_attn.o_proj", [2, 8], [8, 2]),
            ("11.mlp.gate_proj", [2, 8], [12, 2]),
            ("11.mlp.down_proj", [2, 12], [8, 2]),
        ]
        .into_iter()
        .flat_map(|(module, a, b)| {
            [
                (
                    format!("base_model.model.model.layers.{module}.lora_A.weight"),
                    Dtype::F32,
                    a.to_vec(),
                ),
                (
                    format!("base_model.model.model.layers.{module}.lora_B.weight"),
                    Dtype::F32,
                    b.to_vec(),
                ),
            ]
        })
        .collect();
        expected.sort();
        assert_eq!(found, expected);

        // Row-major, little-endian, no transposition.
        let b = file
            .tensor("base_model.model.model.layers.11.mlp.down_proj.lora_B.weight")
            .expect("tensor");
        let f = &original.layers[&AdaptedLayer {
            layer: 11,
            target: TargetModule::DownProj,
        }];
        let stored: Vec<u32> = b
            .data()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(stored, f.b.iter().map(|v| v.to_bits()).collect::<Vec<_>>());

        // Nothing else in the folder: the temporary files were renamed away.
        let mut entries: Vec<_> = fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        entries.sort();
        assert_eq!(entries, [CONFIG_FILE, WEIGHTS_FILE]);
    }

    #[test]
    fn rewriting_a_folder_replaces_both_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = adapter(4, &[0, 1], &TargetModule::ALL, plain(8.0));
        let second = adapter(2, &[3], &[TargetModule::UpProj], plain(4.0));
        write_peft_adapter(dir.path(), &first, &PeftExportOptions::new("m")).expect("write");
        write_peft_adapter(dir.path(), &second, &PeftExportOptions::new("m")).expect("rewrite");
        let (read, _) = read_peft_adapter(dir.path()).expect("read");
        assert_bit_exact(&second, &read);
        assert_eq!(fs::read_dir(dir.path()).expect("read_dir").count(), 2);

        // A folder path that is a file fails cleanly and leaves nothing behind.
        let file = dir.path().join(CONFIG_FILE);
        let err = write_peft_adapter(&file, &second, &PeftExportOptions::new("m")).unwrap_err();
        assert!(matches!(err, PeftError::Io { .. }), "{err}");
        assert_eq!(fs::read_dir(dir.path()).expect("read_dir").count(), 2);
    }

    #[test]
    fn reads_peft_folders_with_default_suffix_and_half_precision() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Values exactly representable in both f16 and bf16.
        let a: Vec<f32> = (0..16).map(|i| (i as f32 - 8.0) * 0.125).collect();
        let b: Vec<f32> = (0..16).map(|i| (i as f32) * -0.5).collect();
        let f16_bytes = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                .collect()
        };
        let bf16_bytes = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
                .collect()
        };
        let k1 = "base_model.model.model.layers.1.self_attn.k_proj";
        let k1_a: Vec<f32> = a[..16].to_vec();
        let k1_b: Vec<f32> = b[..8].to_vec();
        let tensors = vec![
            (
                format!("{Q0}.lora_A.default.weight"),
                Dtype::F16,
                vec![2, 8],
                f16_bytes(&a),
            ),
            (
                format!("{Q0}.lora_B.default.weight"),
                Dtype::BF16,
                vec![8, 2],
                bf16_bytes(&b),
            ),
            // Plain names next to `.default` ones, in another precision.
            (
                format!("{k1}.lora_A.weight"),
                Dtype::BF16,
                vec![2, 8],
                bf16_bytes(&k1_a),
            ),
            f32_tensor(&format!("{k1}.lora_B.weight"), &[4, 2], &k1_b),
        ];
        let config = peft_config_json(
            2,
            r#"["k_proj", "self_attn.q_proj"]"#,
            r#", "future_switch": true"#,
        );
        write_folder(dir.path(), &config, &tensors);

        let (read, config) = read_peft_adapter(dir.path()).expect("read");
        assert_eq!(read.rank, 2);
        assert_eq!(read.scaling, plain(16.0));
        assert_eq!(
            config.target_modules,
            [TargetModule::QProj, TargetModule::KProj]
        );
        assert_eq!(config.peft_version.as_deref(), Some("0.17.1"));
        assert_eq!(config.lora_dropout, 0.05);
        let q = &read.layers[&AdaptedLayer {
            layer: 0,
            target: TargetModule::QProj,
        }];
        assert_eq!((q.d_in, q.d_out), (8, 8));
        assert_eq!(q.a, a);
        assert_eq!(q.b, b);
        let k = &read.layers[&AdaptedLayer {
            layer: 1,
            target: TargetModule::KProj,
        }];
        assert_eq!((k.d_in, k.d_out), (8, 4));
        assert_eq!(k.a, k1_a);
        assert_eq!(k.b, k1_b);
    }

    #[test]
    fn accepts_all_linear_missing_targets_and_layers_to_transform() {
        let all_linear = peft_config_json(2, r#""all-linear""#, r#", "layers_to_transform": 0"#)
            .replace("  \"layers_to_transform\": null,\n", "");
        let dir = folder_with(&all_linear, |_| {});
        let (_, config) = read_peft_adapter(dir.path()).expect("all-linear");
        assert_eq!(config.target_modules, TargetModule::ALL);
        assert_eq!(config.layers_to_transform, Some(vec![0]));

        // No `target_modules` (PEFT would use its Llama default): the tensors decide.
        let minimal = r#"{"peft_type": "LORA", "r": 2}"#;
        let dir = folder_with(minimal, |_| {});
        let (read, config) = read_peft_adapter(dir.path()).expect("minimal");
        assert_eq!(config.target_modules, [TargetModule::QProj]);
        assert_eq!(read.scaling, plain(8.0), "PEFT's default lora_alpha");

        let restricted = peft_config_json(2, r#"["q_proj"]"#, r#", "layers_to_transform": [1, 2]"#)
            .replace("  \"layers_to_transform\": null,\n", "");
        let dir = folder_with(&restricted, |_| {});
        let err = read_err(&dir);
        assert!(
            matches!(&err, PeftError::BadTensor { reason, .. }
                if reason.contains("layers_to_transform")),
            "{err}"
        );
    }

    #[test]
    fn missing_factor_is_reported() {
        let dir = folder_with(&q_config(), |t| {
            t.pop();
        });
        let err = read_err(&dir);
        assert!(
            matches!(&err, PeftError::MissingTensor { tensor, path }
                if tensor == &format!("{Q0}.lora_B.weight") && path.ends_with(WEIGHTS_FILE)),
            "{err}"
        );
        assert!(err.to_string().contains(WEIGHTS_FILE), "{err}");

        let dir = folder_with(&q_config(), |t| {
            t.remove(0);
            t[0].0 = format!("{Q0}.lora_B.default.weight");
        });
        let err = read_err(&dir);
        assert!(
            matches!(&err, PeftError::MissingTensor { tensor, .. }
                if tensor == &format!("{Q0}.lora_A.default.weight")),
            "{err}"
        );
    }

    #[test]
    fn wrong_shapes_are_reported() {
        // Three dimensions.
        let dir = folder_with(&q_config(), |t| t[0].2 = vec![2, 2, 4]);
        let err = read_err(&dir);
        assert!(
            matches!(&err, PeftError::BadTensor { tensor, reason, .. }
                if tensor.ends_with("lora_A.weight") && reason.contains("two dimensions")),
            "{err}"
        );

        // An empty dimension.
        let dir = folder_with(&q_config(), |t| {
            t[1] = f32_tensor(&format!("{Q0}.lora_B.weight"), &[0, 2], &[]);
        });
        let err = read_err(&dir);
        assert!(
            matches!(&err, PeftError::BadTensor { reason, .. } if reason.contains("empty")),
            "{err}"
        );

        // q_proj reads hidden size 8 on layer 0 and 6 on layer 1.
        let dir = folder_with(&q_config(), |t| {
            let q1 = "base_model.model.model.layers.1.self_attn.q_proj";
            t.push(f32_tensor(
                &format!("{q1}.lora_A.weight"),
                &[2, 6],
                &[1.0; 12],
            ));
            t.push(f32_tensor(
                &format!("{q1}.lora_B.weight"),
                &[8, 2],
                &[1.0; 16],
            ));
        });
        let err = read_err(&dir);
        assert!(
            matches!(&err, PeftError::ShapeMismatch { tensor, other, reason, .. }
                if tensor.contains("layers.1.self_attn.q_proj.lora_A")
                    && other.contains("layers.0.self_attn.q_proj.lora_A")
                    && reason == "hidden size 6 vs 8"),
            "{err}"
        );

        // k_proj and v_proj of one model disagree on the key/value width.
        let config = peft_config_json(2, r#"["k_proj", "v_proj"]"#, "");
        let dir = folder_with(&config, |t| {
            let k = "base_model.model.model.layers.0.self_attn.k_proj";
            let v = "base_model.model.model.layers.0.self_attn.v_proj";
            *t = vec![
                f32_tensor(&format!("{k}.lora_A.weight"), &[2, 8], &[1.0; 16]),
                f32_tensor(&format!("{k}.lora_B.weight"), &[4, 2], &[1.0; 8]),
                f32_tensor(&format!("{v}.lora_A.weight"), &[2, 8], &[1.0; 16]),
                f32_tensor(&format!("{v}.lora_B.weight"), &[3, 2], &[1.0; 6]),
            ];
        });
        let err = read_err(&dir);
        assert!(
            matches!(&err, PeftError::ShapeMismatch { reason, .. }
                if reason.starts_with("key/value width")),
            "{err}"
        );
    }

    #[test]
    fn rank_mismatch_with_config_is_reported() {
        let dir = folder_with(&peft_config_json(4, r#"["q_proj"]"#, ""), |_| {});
        let err = read_err(&dir);
        assert!(
            matches!(&err, PeftError::RankMismatch { expected: 4, found: 2, tensor, .. }
                if tensor.ends_with("lora_A.weight")),
            "{err}"
        );

        // A and B of one pair with different ranks: B is checked against r on its own.
        let dir = folder_with(&q_config(), |t| {
            t[1] = f32_tensor(&format!("{Q0}.lora_B.weight"), &[8, 3], &[0.0; 24]);
        });
        let err = read_err(&dir);
        assert!(
            matches!(&err, PeftError::RankMismatch { expected: 2, found: 3, tensor, .. }
                if tensor.ends_with("lora_B.weight")),
            "{err}"
        );
    }

    #[test]
    fn non_finite_values_are_reported() {
        let dir = folder_with(&q_config(), |t| {
            let mut b = vec![0.25; 16];
            b[5] = f32::NAN;
            t[1] = f32_tensor(&format!("{Q0}.lora_B.weight"), &[8, 2], &b);
        });
        let err = read_err(&dir);
        assert!(
            matches!(&err, PeftError::NonFinite { index: 5, tensor, .. }
                if tensor.ends_with("lora_B.weight")),
            "{err}"
        );

        // f16's infinity widens to f32's.
        let dir = folder_with(&q_config(), |t| {
            let mut bytes: Vec<u8> = [f16::ONE; 16]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            bytes[2..4].copy_from_slice(&f16::INFINITY.to_le_bytes());
            t[0] = (format!("{Q0}.lora_A.weight"), Dtype::F16, vec![2, 8], bytes);
        });
        let err = read_err(&dir);
        assert!(
            matches!(&err, PeftError::NonFinite { index: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn broken_safetensors_files_are_reported() {
        let dir = folder_with(&q_config(), |_| {});
        let weights = dir.path().join(WEIGHTS_FILE);
        let bytes = fs::read(&weights).expect("weights");

        // Truncated data, truncated header, trailing bytes, forged header length, empty file.
        let mut trailing = bytes.clone();
        trailing.extend_from_slice(&[0; 4]);
        let mut forged = bytes.clone();
        forged[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        for broken in [
            bytes[..bytes.len() - 3].to_vec(),
            bytes[..20].to_vec(),
            trailing,
            forged,
            Vec::new(),
        ] {
            fs::write(&weights, &broken).expect("write");
            let err = read_err(&dir);
            assert!(
                matches!(&err, PeftError::Malformed { path, .. } if path == &weights),
                "{err}"
            );
        }

        // A header with no tensors.
        fs::write(
            &weights,
            safetensors::serialize(Vec::<(&str, TensorView<'_>)>::new(), None).expect("empty"),
        )
        .expect("write");
        assert!(matches!(read_err(&dir), PeftError::NoTensors { .. }));

        // Unsupported dtype.
        let dir = folder_with(&q_config(), |t| {
            t[0] = (
                format!("{Q0}.lora_A.weight"),
                Dtype::F64,
                vec![2, 8],
                vec![0; 128],
            );
        });
        let err = read_err(&dir);
        assert!(
            matches!(&err, PeftError::BadTensor { reason, .. } if reason.contains("F64")),
            "{err}"
        );
    }

    #[test]
    fn unexpected_and_duplicate_tensors_are_reported() {
        for stray in [
            "base_model.model.lm_head.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.other.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
            "base_model.model.model.layers.01.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
            "model.layers.0.self_attn.q_proj.lora_A.weight",
        ] {
            let dir = folder_with(&q_config(), |t| t.push(f32_tensor(stray, &[1], &[0.0])));
            let err = read_err(&dir);
            assert!(
                matches!(&err, PeftError::UnexpectedTensor { tensor, .. } if tensor == stray),
                "{stray}: {err}"
            );
        }

        let dir = folder_with(&q_config(), |t| {
            t.push(f32_tensor(
                &format!("{Q0}.lora_A.default.weight"),
                &[2, 8],
                &[0.5; 16],
            ));
        });
        assert!(matches!(read_err(&dir), PeftError::DuplicateTensor { .. }));

        // A projection with tensors that the config does not target.
        let dir = folder_with(&peft_config_json(2, r#"["v_proj"]"#, ""), |_| {});
        let err = read_err(&dir);
        assert!(
            matches!(&err, PeftError::BadTensor { reason, .. }
                if reason.contains("target_modules")),
            "{err}"
        );
    }

    #[test]
    fn bad_config_files_are_reported() {
        type Expect = fn(&PeftError) -> bool;
        let cases: [(&str, Expect); 8] = [
            (r#"{"peft_type": "LORA", "r": 2"#, |e| {
                matches!(e, PeftError::BadJson { .. })
            }),
            ("", |e| matches!(e, PeftError::BadJson { .. })),
            ("[1, 2]", |e| matches!(e, PeftError::BadConfig { .. })),
            (
                r#"{"r": 2}"#,
                |e| matches!(e, PeftError::BadConfig { key, .. } if key == "peft_type"),
            ),
            (
                r#"{"peft_type": "LORA", "r": "2"}"#,
                |e| matches!(e, PeftError::BadConfig { key, .. } if key == "r"),
            ),
            (
                r#"{"peft_type": "LORA", "r": 0}"#,
                |e| matches!(e, PeftError::BadConfig { key, .. } if key == "r"),
            ),
            (
                r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 1e300}"#,
                |e| matches!(e, PeftError::BadConfig { key, .. } if key == "lora_alpha"),
            ),
            (
                r#"{"peft_type": "LORA", "r": 2, "lora_dropout": 1.5}"#,
                |e| matches!(e, PeftError::BadConfig { key, .. } if key == "lora_dropout"),
            ),
        ];
        for (config, expected) in cases {
            let dir = folder_with(config, |_| {});
            let err = read_err(&dir);
            assert!(expected(&err), "{config}: {err}");
            assert!(err.to_string().contains(CONFIG_FILE), "{err}");
        }

        // Missing config; pickled weights only; an oversized config.
        let dir = tempfile::tempdir().expect("tempdir");
        let err = read_err(&dir);
        assert!(
            matches!(&err, PeftError::Io { path, source } if path.ends_with(CONFIG_FILE)
                && source.kind() == io::ErrorKind::NotFound),
            "{err}"
        );
        fs::write(dir.path().join(CONFIG_FILE), q_config()).expect("config");
        fs::write(dir.path().join(PICKLE_WEIGHTS_FILE), b"\x80\x02").expect("bin");
        assert!(matches!(read_err(&dir), PeftError::PickleWeights { .. }));
        fs::write(
            dir.path().join(CONFIG_FILE),
            vec![b' '; MAX_CONFIG_BYTES as usize + 1],
        )
        .expect("config");
        assert!(matches!(read_err(&dir), PeftError::TooLarge { .. }));
    }

    #[test]
    fn unsupported_lora_variants_are_rejected() {
        let set = |key: &str, value: &str| {
            let config = q_config();
            let line = format!("  \"{key}\": ");
            match config.find(&line) {
                Some(start) => {
                    let end = start + config[start..].find('\n').expect("line end");
                    let comma = if config[..end].ends_with(',') {
                        ","
                    } else {
                        ""
                    };
                    format!("{}{line}{value}{comma}{}", &config[..start], &config[end..])
                }
                None => config.replacen('{', &format!("{{\n{line}{value},"), 1),
            }
        };
        let unsupported = [
            ("use_dora", "true"),
            ("fan_in_fan_out", "true"),
            ("rank_pattern", r#"{"q_proj": 4}"#),
            ("alpha_pattern", r#"{"q_proj": 4}"#),
            ("modules_to_save", r#"["lm_head"]"#),
            ("lora_bias", "true"),
            ("layer_replication", "[[0, 4], [2, 6]]"),
            ("bias", r#""all""#),
            ("init_lora_weights", r#""pissa_niter_4""#),
            ("init_lora_weights", r#""olora""#),
            ("init_lora_weights", r#""something_new""#),
            ("target_modules", r#"".*q_proj""#),
        ];
        for (key, value) in unsupported {
            let dir = folder_with(&set(key, value), |_| {});
            let err = read_err(&dir);
            assert!(
                matches!(&err, PeftError::Unsupported { key: k, .. } if k == key),
                "{key} = {value}: {err}"
            );
        }

        let dir = folder_with(&set("peft_type", r#""IA3""#), |_| {});
        assert!(matches!(read_err(&dir), PeftError::NotLora { found, .. } if found == "IA3"));
        let dir = folder_with(&set("target_modules", r#"["q_proj", "lm_head"]"#), |_| {});
        assert!(
            matches!(read_err(&dir), PeftError::UnknownTargetModule { name, .. }
                if name == "lm_head")
        );

        // Their off values are fine, and so are plain initialisations.
        for (key, value) in [
            ("use_dora", "false"),
            ("rank_pattern", "null"),
            ("modules_to_save", "[]"),
            ("init_lora_weights", r#""gaussian""#),
            ("init_lora_weights", "false"),
        ] {
            let dir = folder_with(&set(key, value), |_| {});
            read_peft_adapter(dir.path()).unwrap_or_else(|e| panic!("{key} = {value}: {e}"));
        }
    }

    #[test]
    fn invalid_adapters_and_options_are_not_written() {
        let good = adapter(
            2,
            &[0],
            &[TargetModule::QProj, TargetModule::DownProj],
            plain(4.0),
        );
        let at = AdaptedLayer {
            layer: 0,
            target: TargetModule::QProj,
        };
        let options = PeftExportOptions::new("m");
        let edits: [fn(&mut AdapterWeights, AdaptedLayer); 7] = [
            |w, _| w.rank = 0,
            |w, _| w.layers.clear(),
            |w, _| w.scaling.alpha = f32::INFINITY,
            |w, at| w.layers.get_mut(&at).expect("layer").rank = 3,
            |w, at| {
                w.layers.get_mut(&at).expect("layer").a.pop();
            },
            |w, at| w.layers.get_mut(&at).expect("layer").b[3] = f32::NAN,
            // down_proj writes hidden size 9, q_proj reads 8.
            |w, _| {
                let down = w
                    .layers
                    .get_mut(&AdaptedLayer {
                        layer: 0,
                        target: TargetModule::DownProj,
                    })
                    .expect("layer");
                down.d_out = 9;
                down.b = vec![0.0; 18];
            },
        ];
        for (i, edit) in edits.into_iter().enumerate() {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut bad = good.clone();
            edit(&mut bad, at);
            let err = write_peft_adapter(dir.path(), &bad, &options).unwrap_err();
            assert!(
                matches!(err, PeftError::InvalidAdapter { .. }),
                "case {i}: {err}"
            );
            assert_eq!(
                fs::read_dir(dir.path()).expect("read_dir").count(),
                0,
                "case {i}"
            );
        }
        for dropout in [-0.1, 1.5, f32::NAN] {
            let dir = tempfile::tempdir().expect("tempdir");
            let options = PeftExportOptions {
                lora_dropout: dropout,
                ..options.clone()
            };
            let err = write_peft_adapter(dir.path(), &good, &options).unwrap_err();
            assert!(
                matches!(
                    err,
                    PeftError::InvalidOption {
                        option: "lora_dropout",
                        ..
                    }
                ),
                "{dropout}: {err}"
            );
        }
    }

    #[test]
    fn float_json_is_shortest_and_exact() {
        for x in [
            0.05f32,
            0.1,
            7.3,
            1.0e-7,
            3.0e38,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            -0.0,
        ] {
            let v = float_json(x).expect("finite");
            let back = v.as_f64().expect("number") as f32;
            assert_eq!(back.to_bits(), x.to_bits(), "{x}");
        }
        assert_eq!(float_json(0.05).expect("finite").to_string(), "0.05");
        assert_eq!(alpha_json(32.0).expect("finite").to_string(), "32");
        assert_eq!(alpha_json(-0.0).expect("finite").to_string(), "-0.0");
        assert!(float_json(f32::NAN).is_none());
    }

    /// Loads a fedtune adapter into real PEFT on a tiny random `LlamaForCausalLM` (no download),
    /// checks every factor and the scale, saves it from PEFT and reads that back bit-exactly.
    /// Needs `python3` (or `$PEFT_PYTHON`) with torch, transformers, peft and safetensors.
    const PEFT_INTEROP_SCRIPT: &str = r#"
import json, math, sys, warnings
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import PeftModel
from safetensors.torch import load_file

src, dst = sys.argv[1], sys.argv[2]
# The shapes of the tests' `dims`: hidden 8, 2 heads of 4, 1 key/value head, intermediate 12.
base = LlamaForCausalLM(LlamaConfig(
    vocab_size=32, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = PeftModel.from_pretrained(base, src)
for w in caught:
    print("warning:", w.message, file=sys.stderr)
    assert "missing" not in str(w.message).lower(), w.message
    assert "unexpected" not in str(w.message).lower(), w.message
config = json.load(open(f"{src}/adapter_config.json"))
saved = load_file(f"{src}/adapter_model.safetensors")
state = model.state_dict()
for name, tensor in saved.items():
    live = state[name.replace(".weight", ".default.weight")]
    assert live.dtype == torch.float32 and torch.equal(live, tensor), name
r, alpha = config["r"], config["lora_alpha"]
scale = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
proj = model.base_model.model.model.layers[0].self_attn.q_proj
assert math.isclose(proj.scaling["default"], scale), (proj.scaling, scale)
model.save_pretrained(dst)
print("ok", len(saved), "tensors")
"#;

    #[test]
    #[ignore = "needs python3 with torch, transformers, peft and safetensors"]
    fn peft_loads_and_saves_fedtune_adapters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (src, dst) = (dir.path().join("fedtune"), dir.path().join("peft"));
        let scaling = LoraScaling {
            alpha: 12.0,
            rslora: true,
        };
        let original = adapter(4, &[0, 1], &TargetModule::ALL, scaling);
        let options = PeftExportOptions::new("tiny-random-llama");
        write_peft_adapter(&src, &original, &options).expect("write");

        let python = std::env::var("PEFT_PYTHON").unwrap_or_else(|_| "python3".into());
        let output = std::process::Command::new(python)
            .arg("-c")
            .arg(PEFT_INTEROP_SCRIPT)
            .arg(&src)
            .arg(&dst)
            .output()
            .expect("run python");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "PEFT failed:\n{stderr}");

        let (read, config) = read_peft_adapter(&dst).expect("read PEFT's own folder");
        assert_bit_exact(&original, &read);
        assert_eq!(config.target_modules, TargetModule::ALL);
    }
}
