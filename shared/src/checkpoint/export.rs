//! Writing a model back out: GGUF in llama.cpp's conventions (so the result runs in llama.cpp
//! and reloads here) and Hugging Face folders (config.json + model.safetensors).

use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype;
use safetensors::tensor::TensorView;

use super::CheckpointError;
use super::ggml_type::GgmlType;
use super::gguf::{GgufMetadata, GgufWriter, MetadataValue};
use super::llama_names::{LlamaTensor, permute_rope_rows};
use super::source::WeightSource;
use crate::model::LlamaConfig;

/// The `llama.*` metadata that describes `config`.
pub fn llama_gguf_metadata(config: &LlamaConfig) -> GgufMetadata {
    let mut meta = GgufMetadata::default();
    let u32_of = |v: usize| MetadataValue::U32(v as u32);
    meta.insert(
        "general.architecture",
        MetadataValue::String("llama".into()),
    );
    meta.insert("llama.vocab_size", u32_of(config.vocab_size));
    meta.insert("llama.embedding_length", u32_of(config.hidden_size));
    meta.insert(
        "llama.feed_forward_length",
        u32_of(config.intermediate_size),
    );
    meta.insert("llama.block_count", u32_of(config.num_layers));
    meta.insert("llama.attention.head_count", u32_of(config.num_heads));
    meta.insert("llama.attention.head_count_kv", u32_of(config.num_kv_heads));
    meta.insert("llama.attention.key_length", u32_of(config.head_dim));
    meta.insert("llama.rope.dimension_count", u32_of(config.head_dim));
    meta.insert(
        "llama.attention.layer_norm_rms_epsilon",
        MetadataValue::F32(config.rms_norm_eps as f32),
    );
    meta.insert(
        "llama.rope.freq_base",
        MetadataValue::F32(config.rope_theta as f32),
    );
    meta.insert(
        "llama.context_length",
        u32_of(config.max_position_embeddings),
    );
    meta
}

/// Writes every tensor of `source` to a GGUF file: matrices as `matrix_type`, norms as F32,
/// query/key rows permuted the way llama.cpp expects. `extra` metadata (a tokenizer, say) is
/// added as given.
///
/// # Errors
/// [`CheckpointError::BadConfig`] for a model with per-layer sizes (a pruned model): fedtune's
/// GGUF metadata has one size per model; write a Hugging Face folder instead.
pub fn write_gguf(
    source: &dyn WeightSource,
    matrix_type: GgmlType,
    extra: &GgufMetadata,
    path: &Path,
) -> Result<(), CheckpointError> {
    let config = source.config();
    if config.layers.is_some() {
        return Err(CheckpointError::BadConfig {
            path: path.to_path_buf(),
            reason: "a model with per-layer sizes (a pruned model) cannot be written as GGUF \
                     yet; write a Hugging Face folder"
                .into(),
        });
    }
    let mut writer = GgufWriter::new();
    for (key, value) in llama_gguf_metadata(config)
        .entries()
        .iter()
        .chain(extra.entries())
    {
        writer.metadata(key.clone(), value.clone());
    }
    for name in LlamaTensor::all(config) {
        let mut values = source.tensor(name)?;
        let shape = name.shape(config);
        if let Some(heads) = name.rope_permuted_heads(config) {
            permute_rope_rows(&mut values, heads, shape[1]);
        }
        let ty = if shape.len() == 1 {
            GgmlType::F32
        } else {
            matrix_type
        };
        let bytes = ty
            .quantize(&values)
            .ok_or_else(|| CheckpointError::BadTensor {
                path: path.to_path_buf(),
                tensor: name.gguf_name(),
                reason: format!("cannot write {} values as {ty:?}", values.len()),
            })?;
        writer.raw_tensor(&name.gguf_name(), &shape, ty.id(), bytes);
    }
    writer.write(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `source` as a Hugging Face folder: `config.json` and one F32 `model.safetensors`.
///
/// A pruned model's per-layer sizes go into `config.json` as fedtune's per-layer keys (see
/// [`crate::model::config`]) and its biases into `model.safetensors` as
/// `model.layers.N.self_attn.o_proj.bias` / `model.layers.N.mlp.down_proj.bias`; a uniform
/// model's files have neither.
pub fn write_hf_folder(source: &dyn WeightSource, dir: &Path) -> Result<(), CheckpointError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CheckpointError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let config = source.config();
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, config.to_hf_json()).map_err(io(&config_path))?;

    let names = LlamaTensor::all(config);
    let mut bytes: HashMap<String, (Vec<u8>, Vec<usize>)> = HashMap::new();
    for name in &names {
        let values = source.tensor(*name)?;
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        bytes.insert(name.hf_name(), (raw, name.shape(config)));
    }
    let weights_path = dir.join("model.safetensors");
    let bad = |e: safetensors::SafeTensorError| CheckpointError::Malformed {
        path: weights_path.clone(),
        reason: e.to_string(),
    };
    let views = bytes
        .iter()
        .map(|(name, (raw, shape))| {
            Ok((
                name.as_str(),
                TensorView::new(Dtype::F32, shape.clone(), raw).map_err(bad)?,
            ))
        })
        .collect::<Result<Vec<_>, CheckpointError>>()?;
    let data = safetensors::tensor::serialize(views, None).map_err(bad)?;
    std::fs::write(&weights_path, data).map_err(io(&weights_path))
}
