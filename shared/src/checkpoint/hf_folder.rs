//! Hugging Face model folders: `config.json`, one or more `*.safetensors` files (sharded ones
//! listed by `model.safetensors.index.json` or simply all present), `tokenizer.json`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::CheckpointError;
use super::llama_names::LlamaTensor;
use super::source::{WeightSource, check_tensor};
use crate::model::LlamaConfig;

/// An opened Hugging Face folder.
#[derive(Debug)]
pub struct HfFolder {
    dir: PathBuf,
    config: LlamaConfig,
    /// Memory maps of the safetensors files, in file-name order.
    files: Vec<(PathBuf, memmap2::Mmap)>,
    /// Tensor name to index into `files`.
    index: BTreeMap<String, usize>,
}

impl HfFolder {
    /// Reads `config.json` and indexes every `*.safetensors` file in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join("config.json");
        let json = std::fs::read_to_string(&config_path).map_err(|source| CheckpointError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config =
            LlamaConfig::from_hf_json(&json).map_err(|reason| CheckpointError::BadConfig {
                path: config_path.clone(),
                reason,
            })?;

        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|source| CheckpointError::Io {
                path: dir.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(CheckpointError::MissingTensor {
                path: dir.clone(),
                tensor: "*.safetensors (no weight files in the folder)".into(),
            });
        }

        let mut files = Vec::with_capacity(paths.len());
        let mut index = BTreeMap::new();
        for path in paths {
            let file = File::open(&path).map_err(|source| CheckpointError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: read-only private map of a weight file that is not modified while loaded
            // (same reasoning as the GGUF reader).
            #[allow(unsafe_code)]
            let map =
                unsafe { memmap2::Mmap::map(&file) }.map_err(|source| CheckpointError::Io {
                    path: path.clone(),
                    source,
                })?;
            let names = SafeTensors::read_metadata(&map)
                .map_err(|e| CheckpointError::Malformed {
                    path: path.clone(),
                    reason: e.to_string(),
                })?
                .1
                .tensors()
                .into_keys()
                .collect::<Vec<_>>();
            for name in names {
                index.insert(name, files.len());
            }
            files.push((path, map));
        }
        Ok(Self {
            dir,
            config,
            files,
            index,
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `tokenizer.json` in the folder.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }
}

impl WeightSource for HfFolder {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn origin(&self) -> &Path {
        &self.dir
    }

    fn tensor(&self, name: LlamaTensor) -> Result<Vec<f32>, CheckpointError> {
        let tensor_name = name.hf_name();
        let &file_index =
            self.index
                .get(&tensor_name)
                .ok_or_else(|| CheckpointError::MissingTensor {
                    path: self.dir.clone(),
                    tensor: tensor_name.clone(),
                })?;
        let (path, map) = &self.files[file_index];
        let bad = |reason: String| CheckpointError::BadTensor {
            path: path.clone(),
            tensor: tensor_name.clone(),
            reason,
        };
        let tensors = SafeTensors::deserialize(map).map_err(|e| CheckpointError::Malformed {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let view = tensors
            .tensor(&tensor_name)
            .map_err(|e| bad(e.to_string()))?;
        let values = safetensors_values(&view).map_err(bad)?;
        check_tensor(
            path,
            &tensor_name,
            &self.config,
            name,
            view.shape(),
            &values,
        )?;
        Ok(values)
    }
}

/// The values of a safetensors tensor as f32, from F32, F16 or BF16 (little-endian, as the
/// format stores them); the widening from F16 and BF16 is exact. The error names the dtype.
pub(crate) fn safetensors_values(view: &TensorView<'_>) -> Result<Vec<f32>, String> {
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(format!(
                "dtype {other:?} is not supported (F32, F16, BF16 are)"
            ));
        }
    })
}
