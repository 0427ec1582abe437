//! The Llama-family decoder: embedding, decoder layers, final norm, output head.

use burn::module::{Module, Param};
use burn::nn::RmsNorm;
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::attention::Attention;
use super::batch::{TokenBatch, attention_bias};
use super::block::{DecoderLayer, ProjectionInput};
use super::config::{LayerArch, LlamaConfig};
use super::kv_cache::KvCache;
use super::linear::Linear;
use super::mlp::Mlp;
use super::rope::RopeTables;
use crate::checkpoint::{CheckpointError, LayerTensor, LlamaTensor, MemorySource, WeightSource};
use crate::ops::frozen_matmul::frozen_matmul;
use crate::ops::rms_norm;

/// What [`Llama::hidden_observed`] shows each layer's projection inputs to, as
/// `observe(layer, which, input)`.
pub type LayerObserver<'a> = dyn FnMut(usize, ProjectionInput, &Tensor<3>) + 'a;

/// A Llama-family causal language model.
#[derive(Module, Debug)]
pub struct Llama {
    /// Token embedding `[vocab, hidden]`.
    pub embed_tokens: Param<Tensor<2>>,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Final RMSNorm.
    pub norm: RmsNorm,
    /// Untied output head `[vocab, hidden]`; `None` when the head reuses `embed_tokens`.
    pub lm_head: Option<Linear>,
    /// Rotary base.
    pub rope_theta: f64,
}

impl Llama {
    /// Builds the model from a checkpoint on `device`, calling `progress(done, total)` after
    /// each tensor (for a progress bar).
    pub fn load(
        source: &dyn WeightSource,
        device: &Device,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self, CheckpointError> {
        let config = source.config().clone();
        let names = LlamaTensor::all(&config);
        let total = names.len();
        let mut done = 0;
        let mut next = |name: LlamaTensor| -> Result<(Vec<f32>, Vec<usize>), CheckpointError> {
            let values = source.tensor(name)?;
            done += 1;
            progress(done, total);
            Ok((values, name.shape(&config)))
        };
        let linear = |(values, shape): (Vec<f32>, Vec<usize>)| {
            Linear::from_checkpoint(&values, shape[0], shape[1], device)
        };
        let norm = |(values, shape): (Vec<f32>, Vec<usize>)| RmsNorm {
            gamma: Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device)),
            epsilon: config.rms_norm_eps,
        };

        let (embed, shape) = next(LlamaTensor::Embed)?;
        let embed_tokens =
            Param::from_tensor(Tensor::from_data(TensorData::new(embed, shape), device));
        let bias = |(values, shape): (Vec<f32>, Vec<usize>)| {
            Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
        };
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let arch = config.layer(i);
            let mut t = |t: LayerTensor| next(LlamaTensor::Layer(i, t));
            let input_norm = norm(t(LayerTensor::AttnNorm)?);
            let (q_proj, k_proj, v_proj) = (
                linear(t(LayerTensor::Q)?),
                linear(t(LayerTensor::K)?),
                linear(t(LayerTensor::V)?),
            );
            let mut o_proj = linear(t(LayerTensor::O)?);
            if arch.o_proj_bias {
                o_proj.bias = Some(bias(t(LayerTensor::OBias)?));
            }
            let attention = Attention {
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                num_heads: arch.num_heads,
                num_kv_heads: arch.num_kv_heads,
                head_dim: config.head_dim,
            };
            let post_attention_norm = norm(t(LayerTensor::MlpNorm)?);
            let (gate_proj, up_proj) = (linear(t(LayerTensor::Gate)?), linear(t(LayerTensor::Up)?));
            let mut down_proj = linear(t(LayerTensor::Down)?);
            if arch.down_proj_bias {
                down_proj.bias = Some(bias(t(LayerTensor::DownBias)?));
            }
            let mlp = Mlp {
                gate_proj,
                up_proj,
                down_proj,
            };
            layers.push(DecoderLayer {
                input_norm,
                attention,
                post_attention_norm,
                mlp,
            });
        }
        let norm = norm(next(LlamaTensor::FinalNorm)?);
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(linear(next(LlamaTensor::LmHead)?))
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope_theta: config.rope_theta,
        })
    }

    /// This model's configuration: `base` (the configuration it was loaded with, or that of the
    /// model it was pruned from) with each layer's head counts, intermediate size and biases
    /// read from its tensors. For a model with the sizes of `base` and no bias, `base` itself.
    pub fn architecture(&self, base: &LlamaConfig) -> LlamaConfig {
        let layers = self
            .layers
            .iter()
            .map(|layer| LayerArch {
                num_heads: layer.attention.num_heads,
                num_kv_heads: layer.attention.num_kv_heads,
                intermediate_size: layer.mlp.intermediate_size(),
                o_proj_bias: layer.attention.o_proj.bias.is_some(),
                down_proj_bias: layer.mlp.down_proj.bias.is_some(),
            })
            .collect();
        LlamaConfig {
            num_layers: self.layers.len(),
            ..base.clone()
        }
        .with_layers(layers)
    }

    /// The weights as a checkpoint holds them (Hugging Face names and orientation), for export,
    /// under this model's [`architecture`](Self::architecture) over `config` (the configuration
    /// it was loaded with, or that of the model it was pruned from): a pruned model's per-layer
    /// sizes and `o_proj`/`down_proj` biases are part of it.
    ///
    /// LoRA adapters are not exported (merge them first).
    ///
    /// # Panics
    /// When a projection other than `o_proj` and `down_proj` has a bias: no checkpoint name
    /// holds one.
    pub fn to_source(&self, config: &LlamaConfig) -> MemorySource {
        let values = |t: Tensor<1>| -> Vec<f32> {
            t.into_data()
                .try_into_vec_as()
                .expect("weights are float32")
        };
        let config = self.architecture(config);
        let mut source = MemorySource::new(config);
        source.insert(
            LlamaTensor::Embed,
            values(self.embed_tokens.val().flatten(0, 1)),
        );
        for (i, layer) in self.layers.iter().enumerate() {
            let mut put = |t: LayerTensor, v: Vec<f32>| source.insert(LlamaTensor::Layer(i, t), v);
            put(LayerTensor::AttnNorm, values(layer.input_norm.gamma.val()));
            put(LayerTensor::Q, layer.attention.q_proj.checkpoint_values());
            put(LayerTensor::K, layer.attention.k_proj.checkpoint_values());
            put(LayerTensor::V, layer.attention.v_proj.checkpoint_values());
            let unnamed = [
                &layer.attention.q_proj,
                &layer.attention.k_proj,
                &layer.attention.v_proj,
                &layer.mlp.gate_proj,
                &layer.mlp.up_proj,
            ];
            assert!(
                unnamed.iter().all(|p| p.bias.is_none()),
                "layer {i}: only o_proj and down_proj biases can be exported"
            );
            put(LayerTensor::O, layer.attention.o_proj.checkpoint_values());
            if let Some(bias) = &layer.attention.o_proj.bias {
                put(LayerTensor::OBias, values(bias.val()));
            }
            put(
                LayerTensor::MlpNorm,
                values(layer.post_attention_norm.gamma.val()),
            );
            put(LayerTensor::Gate, layer.mlp.gate_proj.checkpoint_values());
            put(LayerTensor::Up, layer.mlp.up_proj.checkpoint_values());
            put(LayerTensor::Down, layer.mlp.down_proj.checkpoint_values());
            if let Some(bias) = &layer.mlp.down_proj.bias {
                put(LayerTensor::DownBias, values(bias.val()));
            }
        }
        source.insert(LlamaTensor::FinalNorm, values(self.norm.gamma.val()));
        if let Some(head) = &self.lm_head {
            source.insert(LlamaTensor::LmHead, head.checkpoint_values());
        }
        source
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.embed_tokens.val().device()
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.embed_tokens.dims()[0]
    }

    /// Hidden states after the final norm, for every position.
    ///
    /// `lengths` marks right padding (see [`TokenBatch`]); `cache`, when given, holds earlier
    /// positions and receives these.
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn hidden(
        &self,
        ids: Tensor<2, Int>,
        lengths: Option<&[usize]>,
        cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        self.hidden_observed(ids, lengths, cache, None)
    }

    /// [`hidden`](Self::hidden), showing `observe` each layer's `o_proj` and `down_proj`
    /// inputs (as `observe(layer, which, input)`) when one is given: how pruning calibration
    /// reads activations. Padding positions are shown too; `lengths` says which they are.
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn hidden_observed(
        &self,
        ids: Tensor<2, Int>,
        lengths: Option<&[usize]>,
        mut cache: Option<&mut KvCache>,
        mut observe: Option<&mut LayerObserver<'_>>,
    ) -> Tensor<3> {
        let device = ids.device();
        let [_, seq] = ids.dims();
        let past = cache.as_ref().map_or(0, |c| c.len());
        let head_dim = self.layers.first().map_or(2, |l| l.attention.head_dim);
        let rope = RopeTables::new(head_dim, self.rope_theta, past, seq, &device);
        let bias = attention_bias(seq, past, lengths, &device);

        let mut x = burn::tensor::module::embedding(self.embed_tokens.val(), ids);
        for (i, layer) in self.layers.iter().enumerate() {
            let cache = cache.as_deref_mut().map(|c| (c, i));
            x = match observe.as_deref_mut() {
                Some(observe) => {
                    let mut observe_layer = |which, input: &Tensor<3>| observe(i, which, input);
                    layer.forward_observed(x, &rope, &bias, cache, &mut observe_layer)
                }
                None => layer.forward(x, &rope, &bias, cache),
            };
        }
        rms_norm::apply(&self.norm, x)
    }

    /// Next-token logits from hidden states.
    ///
    /// # Shapes
    /// - hidden: `[batch, seq, hidden]`
    /// - output: `[batch, seq, vocab]`
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let embedding = self.embed_tokens.val();
                if !embedding.is_require_grad() {
                    return frozen_matmul(hidden, embedding, true);
                }
                let [batch, seq, width] = hidden.dims();
                let vocab = self.vocab_size();
                // logitsᵀ = E hᵀ: the embedding `[vocab, hidden]` is the left operand, read
                // row-major as stored; only the small hidden-state matrix goes through a
                // transposed view. (`h Eᵀ` would make gemm gather all of E element by element.)
                embedding
                    .matmul(hidden.reshape([batch * seq, width]).transpose())
                    .transpose()
                    .reshape([batch, seq, vocab])
            }
        }
    }

    /// Logits for every position of `ids`.
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`
    /// - output: `[batch, seq, vocab]`
    pub fn forward(&self, ids: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.logits(self.hidden(ids, None, cache))
    }

    /// Logits for every position of a padded batch (padding positions produce logits too;
    /// callers mask them out of losses).
    pub fn forward_batch(&self, batch: &TokenBatch) -> Tensor<3> {
        let lengths = batch.is_padded().then_some(batch.lengths.as_slice());
        self.logits(self.hidden(batch.ids.clone(), lengths, None))
    }

    /// An empty KV cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }
}
