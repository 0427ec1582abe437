//! The Llama-family architecture's hyper-parameters, read from GGUF metadata or from a Hugging
//! Face `config.json`.
//!
//! A structurally pruned model has different sizes in different layers, which Hugging Face's
//! `LlamaConfig` cannot say. Its `config.json` keeps the model-wide keys of the model it was
//! pruned from and adds one array per size, one entry per layer ([`LayerArch`]):
//!
//! | key                            | per layer                                    |
//! |--------------------------------|----------------------------------------------|
//! | `fedtune_layer_heads`          | query heads                                  |
//! | `fedtune_layer_kv_heads`       | key/value heads                              |
//! | `fedtune_layer_intermediate`   | MLP intermediate channels                    |
//! | `fedtune_layer_o_proj_bias`    | whether `self_attn.o_proj` has a bias        |
//! | `fedtune_layer_down_proj_bias` | whether `mlp.down_proj` has a bias           |
//!
//! Every array is optional (a missing one means the model-wide value, or no bias); a config
//! without any of them is a uniform model and is written exactly as before. transformers ignores
//! the unknown keys and then fails on the first tensor of the wrong shape, rather than loading a
//! wrong model.

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
    /// Per-layer sizes and biases, one entry per layer, where layers differ from the model-wide
    /// sizes above (a structurally pruned model, whose model-wide sizes stay those of the model
    /// it was pruned from). `None` for a uniform model without biases; [`layer`](Self::layer)
    /// reads either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<LayerArch>>,
}

/// One decoder layer's own sizes, and the biases pruning's compensation gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerArch {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Intermediate channels of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Whether `o_proj` has a bias (`model.layers.N.self_attn.o_proj.bias`).
    pub o_proj_bias: bool,
    /// Whether `down_proj` has a bias (`model.layers.N.mlp.down_proj.bias`).
    pub down_proj_bias: bool,
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
        if let Some(layers) = &self.layers {
            if layers.len() != self.num_layers {
                return Err(format!(
                    "{} per-layer entries for {} layers",
                    layers.len(),
                    self.num_layers
                ));
            }
            for (i, layer) in layers.iter().enumerate() {
                if layer.num_heads == 0 || layer.num_kv_heads == 0 || layer.intermediate_size == 0 {
                    return Err(format!(
                        "layer {i}: head counts and intermediate size must be positive"
                    ));
                }
                if !layer.num_heads.is_multiple_of(layer.num_kv_heads) {
                    return Err(format!(
                        "layer {i}: num_heads ({}) must be a multiple of num_kv_heads ({})",
                        layer.num_heads, layer.num_kv_heads
                    ));
                }
            }
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

    /// Layer `i`'s sizes and biases: its own entry in [`layers`](Self::layers), else the
    /// model-wide sizes without biases.
    ///
    /// # Panics
    /// When there are per-layer entries and `i` is not below their count.
    pub fn layer(&self, i: usize) -> LayerArch {
        match &self.layers {
            Some(layers) => layers[i],
            None => self.uniform_layer(),
        }
    }

    /// A layer with the model-wide sizes and no bias.
    pub fn uniform_layer(&self) -> LayerArch {
        LayerArch {
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            intermediate_size: self.intermediate_size,
            o_proj_bias: false,
            down_proj_bias: false,
        }
    }

    /// The same model-wide sizes with `layers` as the per-layer ones; when every layer is the
    /// [`uniform_layer`](Self::uniform_layer), the config of a uniform model (`layers: None`),
    /// so an unpruned model's config stays exactly as it was.
    pub fn with_layers(mut self, layers: Vec<LayerArch>) -> Self {
        let uniform = self.uniform_layer();
        self.layers = (!layers.iter().all(|l| *l == uniform)).then_some(layers);
        self
    }

    /// Total parameter count (tied embeddings counted once).
    pub fn num_params(&self) -> usize {
        self.num_params_u128() as usize
    }

    fn num_params_u128(&self) -> u128 {
        let (h, v) = (self.hidden_size as u128, self.vocab_size as u128);
        let layer = |arch: &LayerArch| -> u128 {
            let q = (arch.num_heads * self.head_dim) as u128;
            let kv = (arch.num_kv_heads * self.head_dim) as u128;
            let f = arch.intermediate_size as u128;
            let biases = (arch.o_proj_bias as u128 + arch.down_proj_bias as u128) * h;
            h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h + biases
        };
        let layers = match &self.layers {
            Some(layers) => layers.iter().map(layer).sum(),
            None => self.num_layers as u128 * layer(&self.uniform_layer()),
        };
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + layers + h + head
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
            layers: None,
        }
    }

    /// A tiny model for pruning tests: 4 layers (so some can be protected and some pruned),
    /// 6 query heads over 3 key/value heads (groups of two).
    pub fn tiny_gqa() -> Self {
        Self {
            intermediate_size: 64,
            num_layers: 4,
            num_heads: 6,
            num_kv_heads: 3,
            ..Self::tiny()
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
            layers: None,
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
            layers: None,
        };
        let layers = hf.per_layer.layers(&config)?;
        let config = match layers {
            Some(layers) => config.with_layers(layers),
            None => config,
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
            per_layer: HfPerLayer::of(self),
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
    #[serde(flatten)]
    per_layer: HfPerLayer,
}

/// fedtune's per-layer keys (see the module documentation), each absent for a uniform model.
#[derive(Debug, Default, Serialize, Deserialize)]
struct HfPerLayer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fedtune_layer_heads: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fedtune_layer_kv_heads: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fedtune_layer_intermediate: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fedtune_layer_o_proj_bias: Option<Vec<bool>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fedtune_layer_down_proj_bias: Option<Vec<bool>>,
}

impl HfPerLayer {
    /// The keys for `config`: every array when it has per-layer entries, none otherwise.
    fn of(config: &LlamaConfig) -> Self {
        let Some(layers) = &config.layers else {
            return Self::default();
        };
        let each = |f: fn(&LayerArch) -> usize| Some(layers.iter().map(f).collect());
        let flags = |f: fn(&LayerArch) -> bool| Some(layers.iter().map(f).collect());
        Self {
            fedtune_layer_heads: each(|l| l.num_heads),
            fedtune_layer_kv_heads: each(|l| l.num_kv_heads),
            fedtune_layer_intermediate: each(|l| l.intermediate_size),
            fedtune_layer_o_proj_bias: flags(|l| l.o_proj_bias),
            fedtune_layer_down_proj_bias: flags(|l| l.down_proj_bias),
        }
    }

    /// The per-layer entries these keys describe over `base`'s model-wide sizes, `None` when no
    /// key is present.
    fn layers(&self, base: &LlamaConfig) -> Result<Option<Vec<LayerArch>>, String> {
        let n = base.num_layers;
        fn check<T: Copy>(key: &str, values: &Option<Vec<T>>, n: usize) -> Result<(), String> {
            match values {
                Some(v) if v.len() != n => {
                    Err(format!("{key} has {} entries for {n} layers", v.len()))
                }
                _ => Ok(()),
            }
        }
        check("fedtune_layer_heads", &self.fedtune_layer_heads, n)?;
        check("fedtune_layer_kv_heads", &self.fedtune_layer_kv_heads, n)?;
        check(
            "fedtune_layer_intermediate",
            &self.fedtune_layer_intermediate,
            n,
        )?;
        check(
            "fedtune_layer_o_proj_bias",
            &self.fedtune_layer_o_proj_bias,
            n,
        )?;
        check(
            "fedtune_layer_down_proj_bias",
            &self.fedtune_layer_down_proj_bias,
            n,
        )?;
        let any = self.fedtune_layer_heads.is_some()
            || self.fedtune_layer_kv_heads.is_some()
            || self.fedtune_layer_intermediate.is_some()
            || self.fedtune_layer_o_proj_bias.is_some()
            || self.fedtune_layer_down_proj_bias.is_some();
        if !any {
            return Ok(None);
        }
        let pick = |values: &Option<Vec<usize>>, i: usize, default: usize| {
            values.as_ref().map_or(default, |v| v[i])
        };
        let flag = |values: &Option<Vec<bool>>, i: usize| values.as_ref().is_some_and(|v| v[i]);
        Ok(Some(
            (0..n)
                .map(|i| LayerArch {
                    num_heads: pick(&self.fedtune_layer_heads, i, base.num_heads),
                    num_kv_heads: pick(&self.fedtune_layer_kv_heads, i, base.num_kv_heads),
                    intermediate_size: pick(
                        &self.fedtune_layer_intermediate,
                        i,
                        base.intermediate_size,
                    ),
                    o_proj_bias: flag(&self.fedtune_layer_o_proj_bias, i),
                    down_proj_bias: flag(&self.fedtune_layer_down_proj_bias, i),
                })
                .collect(),
        ))
    }
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
            layers: None,
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

    #[test]
    fn per_layer_sizes_round_trip_through_config_json() {
        let uniform = LlamaConfig::tiny();
        let json = uniform.to_hf_json();
        assert!(
            !json.contains("fedtune_"),
            "a uniform model writes no per-layer key"
        );
        // Per-layer entries equal to the model-wide sizes collapse back to a uniform config.
        let same = uniform
            .clone()
            .with_layers(vec![uniform.uniform_layer(); uniform.num_layers]);
        assert_eq!(same, uniform);

        let pruned = uniform.clone().with_layers(vec![
            LayerArch {
                num_heads: 2,
                num_kv_heads: 1,
                intermediate_size: 30,
                o_proj_bias: true,
                down_proj_bias: true,
            },
            LayerArch {
                intermediate_size: 41,
                down_proj_bias: true,
                ..uniform.uniform_layer()
            },
        ]);
        let json = pruned.to_hf_json();
        for key in [
            "\"fedtune_layer_heads\"",
            "\"fedtune_layer_kv_heads\"",
            "\"fedtune_layer_intermediate\"",
            "\"fedtune_layer_o_proj_bias\"",
            "\"fedtune_layer_down_proj_bias\"",
        ] {
            assert!(json.contains(key), "{key} in {json}");
        }
        let back = LlamaConfig::from_hf_json(&json).unwrap();
        assert_eq!(back, pruned);
        assert_eq!(back.layer(0).num_heads, 2);
        assert_eq!(back.layer(1).num_heads, 4);
        // Layer 0 lost a key/value group and 18 channels, layer 1 seven; three biases appeared.
        let removed = 32 * 8 * (2 * 2 + 2) + (18 + 7) * 3 * 32;
        assert_eq!(pruned.num_params(), uniform.num_params() - removed + 3 * 32);

        // Arrays of the wrong length or inconsistent groups are refused.
        let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
        value["fedtune_layer_intermediate"] = serde_json::json!([30]);
        let err = LlamaConfig::from_hf_json(&value.to_string()).unwrap_err();
        assert!(
            err.contains("fedtune_layer_intermediate has 1 entries"),
            "{err}"
        );
        value["fedtune_layer_intermediate"] = serde_json::json!([30, 41]);
        value["fedtune_layer_kv_heads"] = serde_json::json!([3, 2]);
        let err = LlamaConfig::from_hf_json(&value.to_string()).unwrap_err();
        assert!(
            err.contains("layer 0: num_heads (2) must be a multiple"),
            "{err}"
        );
        // A lone key is enough; the others default to the model-wide sizes.
        let mut value: serde_json::Value = serde_json::from_str(&uniform.to_hf_json()).unwrap();
        value["fedtune_layer_intermediate"] = serde_json::json!([48, 20]);
        let lone = LlamaConfig::from_hf_json(&value.to_string()).unwrap();
        assert_eq!(lone.layer(1).intermediate_size, 20);
        assert_eq!(lone.layer(1).num_heads, 4);
        assert!(!lone.layer(1).down_proj_bias);
    }
}
