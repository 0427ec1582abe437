//! Reading model checkpoints: GGUF files and Hugging Face folders (safetensors), mapped onto
//! fedtune's Llama parameter names.

pub mod export;
pub mod ggml_type;
pub mod gguf;
pub mod hf_folder;
pub mod llama_names;
pub mod reader;
pub mod source;

use std::path::PathBuf;

pub use ggml_type::GgmlType;
pub use gguf::{GgufFile, GgufMetadata, GgufWriter, MetadataValue};
pub use hf_folder::HfFolder;
pub use llama_names::{LayerTensor, LlamaTensor};
pub use source::{GgufSource, MemorySource, WeightSource};

/// Why a checkpoint could not be read. Every variant names the file, and the tensor where one
/// is at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file does not start with the GGUF magic.
    #[error("{}: not a GGUF file (magic bytes {found:02x?}, expected \"GGUF\")", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The first bytes found.
        found: Vec<u8>,
    },
    /// The file's structure is broken (truncated header, forged length, bad UTF-8, …).
    #[error("{}: malformed: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// One tensor is unusable: unsupported type, data past the end of the file, wrong shape.
    #[error("{}: tensor `{tensor}`: {reason}", path.display())]
    BadTensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name in the file.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor the model needs is not in the file.
    #[error("{}: tensor `{tensor}` is missing", path.display())]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name in the file.
        tensor: String,
    },
    /// The model configuration is missing or inconsistent.
    #[error("{}: bad model configuration: {reason}", path.display())]
    BadConfig {
        /// The file (GGUF or config.json).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}
