//! The Llama-family architecture's hyper-parameters, read from GGUF metadata or from a Hugging
//! Face `config.json`.

use serde::{Deserialize, Serialize};

use crate::checkpoint::gguf::{GgufMetadata, MetadataError};

/// Hyper-parameters of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU feed-forward layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Base of the rotary embedding frequencies.
    pub rope_theta: f64,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether the output head reuses the input embedding matrix.
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    /// Checks the invariants the model relies on.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_heads ({}) must be a multiple of num_kv_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim ({}) must be even for rotary embeddings",
                self.head_dim
            ));
        }
        // Written to reject NaN too: a NaN is neither positive nor non-positive.
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.rms_norm_eps) || !positive(self.rope_theta) {
            return Err("rms_norm_eps and rope_theta must be positive".into());
        }
        // Guards against configs whose parameter count overflows or exhausts memory.
        if self.num_params_u128() > 1u128 << 40 {
            return Err("model is implausibly large".into());
        }
        Ok(())
    }

    /// Query heads that share one key/value head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Total parameter count (tied embeddings counted once).
    pub fn num_params(&self) -> usize {
        self.num_params_u128() as usize
    }

    fn num_params_u128(&self) -> u128 {
        let (h, f, v) = (
            self.hidden_size as u128,
            self.intermediate_size as u128,
            self.vocab_size as u128,
        );
        let (q, kv) = (
            (self.num_heads * self.head_dim) as u128,
            (self.num_kv_heads * self.head_dim) as u128,
        );
        let layer = h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_layers as u128 * layer + h + head
    }

    /// A tiny model for tests: 2 layers, 4 query heads over 2 key/value heads.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 48,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 128,
            tie_word_embeddings: true,
        }
    }

    /// Reads the configuration from GGUF metadata (`general.architecture` must be `llama`).
    pub fn from_gguf(meta: &GgufMetadata, has_output_tensor: bool) -> Result<Self, String> {
        let err = |e: MetadataError| e.to_string();
        let arch = meta.str("general.architecture").map_err(err)?;
        if arch != "llama" {
            return Err(format!(
                "architecture `{arch}` is not supported (only `llama`)"
            ));
        }
        let key = |k: &str| format!("llama.{k}");
        let hidden_size = meta.usize(&key("embedding_length")).map_err(err)?;
        let num_heads = meta.usize(&key("attention.head_count")).map_err(err)?;
        let num_kv_heads = meta
            .optional(&key("attention.head_count_kv"), GgufMetadata::usize)
            .map_err(err)?
            .unwrap_or(num_heads);
        let head_dim = match meta
            .optional(&key("attention.key_length"), GgufMetadata::usize)
            .map_err(err)?
        {
            Some(d) => d,
            None if num_heads > 0 => hidden_size / num_heads,
            None => return Err("attention.head_count must be positive".into()),
        };
        let vocab_size = match meta
            .optional(&key("vocab_size"), GgufMetadata::usize)
            .map_err(err)?
        {
            Some(v) => v,
            None => meta
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(<[_]>::len)
                .ok_or("neither llama.vocab_size nor tokenizer.ggml.tokens is present")?,
        };
        let config = Self {
            vocab_size,
            hidden_size,
            intermediate_size: meta.usize(&key("feed_forward_length")).map_err(err)?,
            num_layers: meta.usize(&key("block_count")).map_err(err)?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: meta
                .f64(&key("attention.layer_norm_rms_epsilon"))
                .map_err(err)?,
            rope_theta: meta
                .optional(&key("rope.freq_base"), GgufMetadata::f64)
                .map_err(err)?
                .unwrap_or(10_000.0),
            max_position_embeddings: meta
                .optional(&key("context_length"), GgufMetadata::usize)
                .map_err(err)?
                .unwrap_or(2048),
            tie_word_embeddings: !has_output_tensor,
        };
        if let Some(scaling) = meta.get(&key("rope.scaling.type")).and_then(|v| v.as_str())
            && scaling != "none"
        {
            return Err(format!("rope scaling `{scaling}` is not supported"));
        }
        config.validate()?;
        Ok(config)
    }

    /// Reads the configuration from a Hugging Face `config.json`.
    pub fn from_hf_json(json: &str) -> Result<Self, String> {
        let hf: HfLlamaConfig = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if let Some(kind) = hf.model_type.as_deref()
            && !matches!(kind, "llama" | "mistral")
        {
            return Err(format!(
                "model_type `{kind}` is not supported (only Llama-family)"
            ));
        }
        if hf.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err("rope_scaling is not supported yet".into());
        }
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        let head_dim = match hf.head_dim {
            Some(d) => d,
            None if hf.num_attention_heads > 0 => hf.hidden_size / hf.num_attention_heads,
            None => return Err("num_attention_heads must be positive".into()),
        };
        let config = Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        };
        config.validate()?;
        Ok(config)
    }

    /// The Hugging Face `config.json` for this configuration.
    pub fn to_hf_json(&self) -> String {
        let hf = HfLlamaConfig {
            model_type: Some("llama".into()),
            architectures: Some(vec!["LlamaForCausalLM".into()]),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_layers,
            num_attention_heads: self.num_heads,
            num_key_value_heads: Some(self.num_kv_heads),
            head_dim: Some(self.head_dim),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: Some(self.rope_theta),
            max_position_embeddings: Some(self.max_position_embeddings),
            tie_word_embeddings: Some(self.tie_word_embeddings),
            rope_scaling: None,
        };
        serde_json::to_string_pretty(&hf).unwrap_or_default()
    }
}

/// The subset of Hugging Face's `LlamaConfig` fedtune reads.
#[derive(Debug, Serialize, Deserialize)]
struct HfLlamaConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    model_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rope_scaling: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_parameter_count() {
        let config = LlamaConfig {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
        };
        assert_eq!(config.num_params(), 134_515_008);
        let back = LlamaConfig::from_hf_json(&config.to_hf_json()).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn inconsistent_heads_are_rejected() {
        let mut config = LlamaConfig::tiny();
        config.num_kv_heads = 3;
        assert!(
            config
                .validate()
                .unwrap_err()
                .contains("multiple of num_kv_heads")
        );
        let json = r#"{"model_type":"gpt2","vocab_size":1,"hidden_size":1,"intermediate_size":1,
            "num_hidden_layers":1,"num_attention_heads":1,"rms_norm_eps":1e-5}"#;
        assert!(
            LlamaConfig::from_hf_json(json)
                .unwrap_err()
                .contains("gpt2")
        );
    }
}
