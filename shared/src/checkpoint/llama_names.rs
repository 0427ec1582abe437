//! Names of a Llama model's tensors, written once: Hugging Face (`model.layers.0.self_attn.q_proj
//! .weight`) and llama.cpp GGUF (`blk.0.attn_q.weight`), plus the shape each must have.
//!
//! Shapes are per layer ([`LlamaConfig::layer`]): a pruned layer has its own head counts and
//! intermediate size, and may have `o_proj` and `down_proj` biases (pruning's compensation), which
//! are part of the checkpoint only where its config says so.

use crate::model::LlamaConfig;

/// A tensor inside one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerTensor {
    /// RMSNorm before attention.
    AttnNorm,
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Attention output projection.
    O,
    /// RMSNorm before the MLP.
    MlpNorm,
    /// SwiGLU gate projection.
    Gate,
    /// SwiGLU up projection.
    Up,
    /// SwiGLU down projection.
    Down,
    /// Bias of the attention output projection (only in pruned layers that have one).
    OBias,
    /// Bias of the SwiGLU down projection (only in pruned layers that have one).
    DownBias,
}

impl LayerTensor {
    /// The tensor's name inside a layer: (Hugging Face, GGUF), up to the `.weight`/`.bias`
    /// suffix.
    fn leaf_names(self) -> (&'static str, &'static str) {
        match self {
            Self::OBias => Self::O.leaf_names(),
            Self::DownBias => Self::Down.leaf_names(),
            Self::AttnNorm => ("input_layernorm", "attn_norm"),
            Self::Q => ("self_attn.q_proj", "attn_q"),
            Self::K => ("self_attn.k_proj", "attn_k"),
            Self::V => ("self_attn.v_proj", "attn_v"),
            Self::O => ("self_attn.o_proj", "attn_output"),
            Self::MlpNorm => ("post_attention_layernorm", "ffn_norm"),
            Self::Gate => ("mlp.gate_proj", "ffn_gate"),
            Self::Up => ("mlp.up_proj", "ffn_up"),
            Self::Down => ("mlp.down_proj", "ffn_down"),
        }
    }

    /// `weight` or `bias`.
    fn suffix(self) -> &'static str {
        match self {
            Self::OBias | Self::DownBias => "bias",
            _ => "weight",
        }
    }

    /// Every weight a layer always has, in checkpoint order (biases, which only some pruned
    /// layers have, are not among them; [`LlamaTensor::all`] adds them where they exist).
    pub const ALL: [LayerTensor; 9] = [
        Self::AttnNorm,
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::MlpNorm,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];
}

/// One tensor of a Llama checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LlamaTensor {
    /// Token embedding `[vocab, hidden]`.
    Embed,
    /// A tensor of decoder layer `.0`.
    Layer(usize, LayerTensor),
    /// Final RMSNorm.
    FinalNorm,
    /// Output head `[vocab, hidden]` (absent when tied to the embedding).
    LmHead,
}

impl LlamaTensor {
    /// Every tensor a model of `config` needs, in checkpoint order.
    pub fn all(config: &LlamaConfig) -> Vec<LlamaTensor> {
        let mut out = vec![Self::Embed];
        for layer in 0..config.num_layers {
            let arch = config.layer(layer);
            for t in LayerTensor::ALL {
                out.push(Self::Layer(layer, t));
                match t {
                    LayerTensor::O if arch.o_proj_bias => {
                        out.push(Self::Layer(layer, LayerTensor::OBias))
                    }
                    LayerTensor::Down if arch.down_proj_bias => {
                        out.push(Self::Layer(layer, LayerTensor::DownBias))
                    }
                    _ => {}
                }
            }
        }
        out.push(Self::FinalNorm);
        if !config.tie_word_embeddings {
            out.push(Self::LmHead);
        }
        out
    }

    /// The Hugging Face `transformers` name.
    pub fn hf_name(&self) -> String {
        match self {
            Self::Embed => "model.embed_tokens.weight".into(),
            Self::FinalNorm => "model.norm.weight".into(),
            Self::LmHead => "lm_head.weight".into(),
            Self::Layer(i, t) => format!("model.layers.{i}.{}.{}", t.leaf_names().0, t.suffix()),
        }
    }

    /// The llama.cpp GGUF name.
    pub fn gguf_name(&self) -> String {
        match self {
            Self::Embed => "token_embd.weight".into(),
            Self::FinalNorm => "output_norm.weight".into(),
            Self::LmHead => "output.weight".into(),
            Self::Layer(i, t) => format!("blk.{i}.{}.{}", t.leaf_names().1, t.suffix()),
        }
    }

    /// The row-major shape (`[out, in]` for projections) the tensor must have under `config`.
    ///
    /// # Panics
    /// When a layer tensor's layer is not below the config's per-layer entries (if it has them).
    pub fn shape(&self, config: &LlamaConfig) -> Vec<usize> {
        let h = config.hidden_size;
        match self {
            Self::Embed | Self::LmHead => vec![config.vocab_size, h],
            Self::FinalNorm => vec![h],
            Self::Layer(i, t) => {
                let arch = config.layer(*i);
                let q = arch.num_heads * config.head_dim;
                let kv = arch.num_kv_heads * config.head_dim;
                let f = arch.intermediate_size;
                match t {
                    LayerTensor::AttnNorm
                    | LayerTensor::MlpNorm
                    | LayerTensor::OBias
                    | LayerTensor::DownBias => vec![h],
                    LayerTensor::Q => vec![q, h],
                    LayerTensor::K | LayerTensor::V => vec![kv, h],
                    LayerTensor::O => vec![h, q],
                    LayerTensor::Gate | LayerTensor::Up => vec![f, h],
                    LayerTensor::Down => vec![h, f],
                }
            }
        }
    }

    /// Heads whose rows llama.cpp's converter permuted for interleaved rotary embeddings:
    /// `Some(num_heads)` for queries, `Some(num_kv_heads)` for keys.
    pub fn rope_permuted_heads(&self, config: &LlamaConfig) -> Option<usize> {
        match self {
            Self::Layer(i, LayerTensor::Q) => Some(config.layer(*i).num_heads),
            Self::Layer(i, LayerTensor::K) => Some(config.layer(*i).num_kv_heads),
            _ => None,
        }
    }
}

/// Undoes llama.cpp's query/key row permutation, in place.
///
/// Hugging Face stores a head's rows as `[first half | second half]` (rotate-half rotary);
/// `convert_hf_to_gguf.py` reorders them to interleaved pairs with
/// `w.reshape(heads, 2, head_dim / 2, cols).swapaxes(1, 2)`. fedtune's model uses the Hugging Face
/// layout (the one PEFT adapters and safetensors share), so GGUF rows are moved back: GGUF row
/// `h*d + 2*j + i` becomes Hugging Face row `h*d + i*d/2 + j`.
pub fn unpermute_rope_rows(values: &mut [f32], heads: usize, cols: usize) {
    move_rope_rows(values, heads, cols, true);
}

/// The inverse of [`unpermute_rope_rows`]: Hugging Face rows to llama.cpp's order (for export).
pub fn permute_rope_rows(values: &mut [f32], heads: usize, cols: usize) {
    move_rope_rows(values, heads, cols, false);
}

fn move_rope_rows(values: &mut [f32], heads: usize, cols: usize, to_hf: bool) {
    let rows = values.len() / cols;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let src = values.to_vec();
    for h in 0..heads {
        for j in 0..half {
            for i in 0..2 {
                let hf = (h * head_dim + i * half + j) * cols;
                let gguf = (h * head_dim + 2 * j + i) * cols;
                let (from, to) = if to_hf { (gguf, hf) } else { (hf, gguf) };
                values[to..to + cols].copy_from_slice(&src[from..from + cols]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_both_conventions() {
        let t = LlamaTensor::Layer(3, LayerTensor::Down);
        assert_eq!(t.hf_name(), "model.layers.3.mlp.down_proj.weight");
        assert_eq!(t.gguf_name(), "blk.3.ffn_down.weight");
        assert_eq!(LlamaTensor::all(&LlamaConfig::tiny()).len(), 1 + 2 * 9 + 1);
        let bias = LlamaTensor::Layer(2, LayerTensor::OBias);
        assert_eq!(bias.hf_name(), "model.layers.2.self_attn.o_proj.bias");
        assert_eq!(bias.gguf_name(), "blk.2.attn_output.bias");
        assert_eq!(
            LlamaTensor::Layer(0, LayerTensor::DownBias).hf_name(),
            "model.layers.0.mlp.down_proj.bias"
        );
    }

    #[test]
    fn pruned_layers_have_their_own_shapes_and_biases() {
        use crate::model::config::LayerArch;
        let base = LlamaConfig::tiny();
        let config = base.clone().with_layers(vec![
            base.uniform_layer(),
            LayerArch {
                num_heads: 2,
                num_kv_heads: 1,
                intermediate_size: 5,
                o_proj_bias: true,
                down_proj_bias: false,
            },
        ]);
        let all = LlamaTensor::all(&config);
        assert_eq!(all.len(), 1 + 2 * 9 + 1 + 1);
        let o = all
            .iter()
            .position(|t| *t == LlamaTensor::Layer(1, LayerTensor::O))
            .unwrap();
        assert_eq!(all[o + 1], LlamaTensor::Layer(1, LayerTensor::OBias));
        let shape = |t| LlamaTensor::Layer(1, t).shape(&config);
        assert_eq!(shape(LayerTensor::Q), vec![16, 32]);
        assert_eq!(shape(LayerTensor::K), vec![8, 32]);
        assert_eq!(shape(LayerTensor::O), vec![32, 16]);
        assert_eq!(shape(LayerTensor::Down), vec![32, 5]);
        assert_eq!(shape(LayerTensor::OBias), vec![32]);
        assert_eq!(
            LlamaTensor::Layer(0, LayerTensor::Q).shape(&config),
            vec![32, 32]
        );
    }

    #[test]
    fn permutation_matches_llama_cpp_and_inverts() {
        // One head of dim 4 with 1 column: HF rows [a0 a1 | b0 b1] become interleaved [a0 b0 a1 b1].
        let mut rows = vec![0.0, 1.0, 10.0, 11.0];
        permute_rope_rows(&mut rows, 1, 1);
        assert_eq!(rows, vec![0.0, 10.0, 1.0, 11.0]);
        unpermute_rope_rows(&mut rows, 1, 1);
        assert_eq!(rows, vec![0.0, 1.0, 10.0, 11.0]);
    }
}
