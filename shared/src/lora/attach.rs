//! Putting adapters on a [`Llama`], reading them off, and folding them into the base weights.
//!
//! Attaching freezes every base parameter first, so autodiff tracks only the adapters: gradient
//! and optimizer memory are proportional to the adapters, not to the model.

use burn::module::Module;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::adapter::{AdaptedLayer, AdapterWeights, LoraScaling, TargetModule};
use super::config::LoraConfig;
use super::layer::LoraLayer;
use crate::model::Llama;
use crate::model::block::DecoderLayer;
use crate::model::linear::Linear;

/// Adapters that do not fit the model.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AttachError {
    /// The adapter names a layer the model does not have.
    #[error("the adapter has layer {layer}, the model {layers} layers")]
    NoSuchLayer {
        /// The adapter's layer.
        layer: usize,
        /// The model's layer count.
        layers: usize,
    },
    /// Factor shapes disagree with the projection.
    #[error(
        "adapter for layer {layer} {target}: factors are {d_out}x{d_in}, the projection {want_out}x{want_in}"
    )]
    Shape {
        /// Layer.
        layer: usize,
        /// Projection.
        target: TargetModule,
        /// The factors' output size.
        d_out: usize,
        /// The factors' input size.
        d_in: usize,
        /// The projection's output size.
        want_out: usize,
        /// The projection's input size.
        want_in: usize,
    },
    /// Factor lengths disagree with their declared shape.
    #[error("adapter for layer {layer} {target}: factor lengths disagree with rank and shape")]
    Inconsistent {
        /// Layer.
        layer: usize,
        /// Projection.
        target: TargetModule,
    },
}

/// The projection `target` of `layer`.
pub fn projection_mut(layer: &mut DecoderLayer, target: TargetModule) -> &mut Linear {
    match target {
        TargetModule::QProj => &mut layer.attention.q_proj,
        TargetModule::KProj => &mut layer.attention.k_proj,
        TargetModule::VProj => &mut layer.attention.v_proj,
        TargetModule::OProj => &mut layer.attention.o_proj,
        TargetModule::GateProj => &mut layer.mlp.gate_proj,
        TargetModule::UpProj => &mut layer.mlp.up_proj,
        TargetModule::DownProj => &mut layer.mlp.down_proj,
    }
}

/// The projection `target` of `layer`.
pub fn projection(layer: &DecoderLayer, target: TargetModule) -> &Linear {
    match target {
        TargetModule::QProj => &layer.attention.q_proj,
        TargetModule::KProj => &layer.attention.k_proj,
        TargetModule::VProj => &layer.attention.v_proj,
        TargetModule::OProj => &layer.attention.o_proj,
        TargetModule::GateProj => &layer.mlp.gate_proj,
        TargetModule::UpProj => &layer.mlp.up_proj,
        TargetModule::DownProj => &layer.mlp.down_proj,
    }
}

/// Freezes `model` and gives every target projection a fresh adapter (`A` random from `seed`,
/// `B` zero), replacing any it had.
pub fn attach_fresh(model: Llama, config: &LoraConfig, seed: u64) -> Llama {
    let mut model = model.no_grad();
    let device = model.device();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let scale = config.scale();
    for layer in &mut model.layers {
        for &target in &config.targets {
            let linear = projection_mut(layer, target);
            let (d_in, d_out) = linear.dims();
            linear.adapter = Some(LoraLayer::init(
                d_in,
                d_out,
                config.rank,
                scale,
                config.dropout,
                &mut rng,
                &device,
            ));
        }
    }
    seed_dropout(&model, seed);
    model
}

/// Restarts every adapter's dropout stream from a seed drawn from `rng`, each adapter on its own
/// stream: a trainer passes its round's generator so the round's masks follow from the plan.
///
/// Draws nothing when no adapter has dropout, so a run without dropout samples its batches as
/// it did before masks were seeded.
pub fn reseed_dropout(model: &Llama, rng: &mut impl rand::RngCore) {
    if adapter_streams(model).all(|(_, a)| a.dropout.prob == 0.0) {
        return;
    }
    seed_dropout(model, rng.next_u64());
}

/// Restarts every adapter's dropout stream from `seed`, each adapter on its own stream.
pub fn seed_dropout(model: &Llama, seed: u64) {
    for (stream, adapter) in adapter_streams(model) {
        adapter.dropout.reseed(seed, stream);
    }
}

/// Every adapter with its dropout stream number, fixed by its layer and projection.
fn adapter_streams(model: &Llama) -> impl Iterator<Item = (u64, &LoraLayer)> {
    model.layers.iter().enumerate().flat_map(|(i, decoder)| {
        TargetModule::ALL
            .iter()
            .enumerate()
            .filter_map(move |(t, &target)| {
                let stream = (i * TargetModule::ALL.len() + t) as u64;
                projection(decoder, target)
                    .adapter
                    .as_ref()
                    .map(|a| (stream, a))
            })
    })
}

/// Freezes `model` and installs `weights` as its adapters (removing any others): how a client
/// takes the global adapter the server sent for its rank.
pub fn attach_weights(
    model: Llama,
    weights: &AdapterWeights,
    dropout: f64,
) -> Result<Llama, AttachError> {
    let mut model = detach(model).no_grad();
    let device = model.device();
    let layers = model.layers.len();
    let scale = weights.scale();
    for (&AdaptedLayer { layer, target }, factors) in &weights.layers {
        let decoder = model
            .layers
            .get_mut(layer)
            .ok_or(AttachError::NoSuchLayer { layer, layers })?;
        let linear = projection_mut(decoder, target);
        let (want_in, want_out) = linear.dims();
        if !factors.is_consistent() {
            return Err(AttachError::Inconsistent { layer, target });
        }
        if (factors.d_in, factors.d_out) != (want_in, want_out) {
            return Err(AttachError::Shape {
                layer,
                target,
                d_out: factors.d_out,
                d_in: factors.d_in,
                want_out,
                want_in,
            });
        }
        linear.adapter = Some(LoraLayer::from_factors(factors, scale, dropout, &device));
    }
    Ok(model)
}

/// The model's adapters as plain numbers; `None` when it has none or their ranks differ.
pub fn adapter_weights(model: &Llama, scaling: LoraScaling) -> Option<AdapterWeights> {
    let mut layers = std::collections::BTreeMap::new();
    let mut rank = None;
    for (i, decoder) in model.layers.iter().enumerate() {
        for target in TargetModule::ALL {
            if let Some(adapter) = &projection(decoder, target).adapter {
                let factors = adapter.factors();
                if *rank.get_or_insert(factors.rank) != factors.rank {
                    return None;
                }
                layers.insert(AdaptedLayer { layer: i, target }, factors);
            }
        }
    }
    Some(AdapterWeights {
        rank: rank?,
        scaling,
        layers,
    })
}

/// Removes every adapter.
pub fn detach(mut model: Llama) -> Llama {
    for decoder in &mut model.layers {
        for target in TargetModule::ALL {
            projection_mut(decoder, target).adapter = None;
        }
    }
    model
}

/// Folds every adapter into its base weight (`W ← W + s A B`) and removes it: the merged model
/// computes what the adapted one did, at the base model's cost.
pub fn merge(mut model: Llama) -> Llama {
    for decoder in &mut model.layers {
        for target in TargetModule::ALL {
            let linear = projection_mut(decoder, target);
            if let Some(adapter) = linear.adapter.take() {
                let delta = adapter.delta();
                linear.weight = linear.weight.clone().map(|w| w + delta);
            }
        }
    }
    model
}
