//! Where a model's weights come from: a GGUF file, a Hugging Face folder, or memory. Each source
//! hands out tensors by their [`LlamaTensor`] name, in the Hugging Face layout, shape-checked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::CheckpointError;
use super::gguf::GgufFile;
use super::llama_names::{LayerTensor, LlamaTensor, unpermute_rope_rows};
use crate::model::LlamaConfig;

/// A checkpoint the model can be built from.
pub trait WeightSource {
    /// The model's hyper-parameters.
    fn config(&self) -> &LlamaConfig;

    /// Where the weights come from, for error messages.
    fn origin(&self) -> &Path;

    /// The tensor's values, row-major in the Hugging Face layout, with its shape checked against
    /// [`LlamaTensor::shape`].
    fn tensor(&self, name: LlamaTensor) -> Result<Vec<f32>, CheckpointError>;
}

/// Checks a loaded tensor's shape and values against what the config requires.
pub(crate) fn check_tensor(
    origin: &Path,
    file_name: &str,
    config: &LlamaConfig,
    name: LlamaTensor,
    shape: &[usize],
    values: &[f32],
) -> Result<(), CheckpointError> {
    let expected = name.shape(config);
    if shape != expected.as_slice() {
        return Err(CheckpointError::BadTensor {
            path: origin.to_path_buf(),
            tensor: file_name.to_string(),
            reason: format!("shape {shape:?} disagrees with the config, which needs {expected:?}"),
        });
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(CheckpointError::BadTensor {
            path: origin.to_path_buf(),
            tensor: file_name.to_string(),
            reason: format!("element {i} is not finite ({})", values[i]),
        });
    }
    Ok(())
}

/// A GGUF file with its config read from the metadata.
#[derive(Debug)]
pub struct GgufSource {
    file: GgufFile,
    config: LlamaConfig,
}

impl GgufSource {
    /// Opens `path` and reads the model config from its metadata.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        let file = GgufFile::open(path)?;
        let has_output = file.tensor_info(&LlamaTensor::LmHead.gguf_name()).is_some();
        let config = LlamaConfig::from_gguf(file.metadata(), has_output).map_err(|reason| {
            CheckpointError::BadConfig {
                path: file.path().to_path_buf(),
                reason,
            }
        })?;
        Ok(Self { file, config })
    }

    /// The parsed file (metadata for the tokenizer, tensor table).
    pub fn file(&self) -> &GgufFile {
        &self.file
    }
}

impl WeightSource for GgufSource {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn origin(&self) -> &Path {
        self.file.path()
    }

    fn tensor(&self, name: LlamaTensor) -> Result<Vec<f32>, CheckpointError> {
        let file_name = name.gguf_name();
        let (shape, mut values) = self.file.tensor_f32(&file_name)?;
        check_tensor(
            self.file.path(),
            &file_name,
            &self.config,
            name,
            &shape,
            &values,
        )?;
        if let Some(heads) = name.rope_permuted_heads(&self.config) {
            unpermute_rope_rows(&mut values, heads, shape[1]);
        }
        Ok(values)
    }
}

/// Weights held in memory under their Hugging Face names: for tests, random initialisation and
/// models assembled by other code.
#[derive(Debug, Clone)]
pub struct MemorySource {
    config: LlamaConfig,
    tensors: HashMap<LlamaTensor, Vec<f32>>,
    origin: PathBuf,
}

impl MemorySource {
    /// An empty source for `config`.
    pub fn new(config: LlamaConfig) -> Self {
        Self {
            config,
            tensors: HashMap::new(),
            origin: PathBuf::from("<memory>"),
        }
    }

    /// A model with deterministic pseudo-random weights (norms near one, biases near zero), as a
    /// test model.
    ///
    /// Values are uniform in `±1/sqrt(fan_in)` from a SplitMix64 stream, so any machine and any
    /// backend build the same model from the same seed.
    pub fn random(config: LlamaConfig, seed: u64) -> Self {
        let mut state = seed;
        let mut next = move || {
            // SplitMix64: tiny, portable, and good enough for test weights.
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let mut source = Self::new(config.clone());
        for name in LlamaTensor::all(&config) {
            let shape = name.shape(&config);
            let n: usize = shape.iter().product();
            let bias = matches!(
                name,
                LlamaTensor::Layer(_, LayerTensor::OBias | LayerTensor::DownBias)
            );
            let values = if bias {
                (0..n).map(|_| 0.1 * next()).collect()
            } else if shape.len() == 1 {
                (0..n).map(|_| 1.0 + 0.1 * next()).collect()
            } else {
                let bound = 1.0 / (shape[1] as f32).sqrt();
                (0..n).map(|_| next() * bound).collect()
            };
            source.tensors.insert(name, values);
        }
        source
    }

    /// Sets one tensor (no check until the model is built).
    pub fn insert(&mut self, name: LlamaTensor, values: Vec<f32>) {
        self.tensors.insert(name, values);
    }
}

impl WeightSource for MemorySource {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn origin(&self) -> &Path {
        &self.origin
    }

    fn tensor(&self, name: LlamaTensor) -> Result<Vec<f32>, CheckpointError> {
        let values = self
            .tensors
            .get(&name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                path: self.origin.clone(),
                tensor: name.hf_name(),
            })?
            .clone();
        let shape = name.shape(&self.config);
        let expected: usize = shape.iter().product();
        if values.len() != expected {
            return Err(CheckpointError::BadTensor {
                path: self.origin.clone(),
                tensor: name.hf_name(),
                reason: format!("{} values, shape {shape:?} needs {expected}", values.len()),
            });
        }
        check_tensor(
            &self.origin,
            &name.hf_name(),
            &self.config,
            name,
            &shape,
            &values,
        )?;
        Ok(values)
    }
}
