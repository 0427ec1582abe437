//! A model and its tokenizer opened together from a GGUF file or a Hugging Face folder.

use std::path::{Path, PathBuf};

use burn::tensor::Device;

use crate::checkpoint::{CheckpointError, GgufSource, HfFolder, WeightSource};
use crate::model::{Llama, LlamaConfig};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// Why a pretrained model could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PretrainedError {
    /// The weights or config are unusable.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The tokenizer is unusable.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The path is neither a GGUF file nor a folder with `config.json`.
    #[error("{}: not a model (expected a .gguf file or a folder with config.json)", .0.display())]
    UnknownFormat(PathBuf),
}

/// A loaded model, its tokenizer and its configuration.
#[derive(Debug)]
pub struct Pretrained {
    /// The network, on the device it was loaded to.
    pub model: Llama,
    /// The tokenizer that came with it.
    pub tokenizer: Tokenizer,
    /// Its hyper-parameters.
    pub config: LlamaConfig,
    /// Where it was read from.
    pub path: PathBuf,
}

impl Pretrained {
    /// Opens a `.gguf` file or a Hugging Face folder and loads the weights onto `device`,
    /// reporting `progress(done, total)` per tensor.
    pub fn open(
        path: impl AsRef<Path>,
        device: &Device,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self, PretrainedError> {
        let path = path.as_ref();
        if path.is_dir() {
            let folder = HfFolder::open(path)?;
            let tokenizer = Tokenizer::from_tokenizer_json(&folder.tokenizer_path())?;
            Self::build(&folder, tokenizer, device, progress)
        } else if path.extension().is_some_and(|e| e == "gguf") || path.is_file() {
            let source = GgufSource::open(path)?;
            let tokenizer = Tokenizer::from_gguf(source.file().metadata(), path)?;
            Self::build(&source, tokenizer, device, progress)
        } else {
            Err(PretrainedError::UnknownFormat(path.to_path_buf()))
        }
    }

    /// Only the tokenizer of a model (no weights are read).
    pub fn open_tokenizer(path: impl AsRef<Path>) -> Result<Tokenizer, PretrainedError> {
        let path = path.as_ref();
        if path.is_dir() {
            Ok(Tokenizer::from_tokenizer_json(
                &path.join("tokenizer.json"),
            )?)
        } else {
            let file = crate::checkpoint::GgufFile::open(path)?;
            Ok(Tokenizer::from_gguf(file.metadata(), path)?)
        }
    }

    fn build(
        source: &dyn WeightSource,
        tokenizer: Tokenizer,
        device: &Device,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self, PretrainedError> {
        let model = Llama::load(source, device, progress)?;
        Ok(Self {
            model,
            tokenizer,
            config: source.config().clone(),
            path: source.origin().to_path_buf(),
        })
    }
}
