//! Dropout on an adapter's input with masks drawn from a seeded generator.
//!
//! burn's `Dropout` draws its masks from the backend's global random state, which one process
//! shares between all the virtual devices of a simulation and which a run cannot replay: two runs
//! of the same plan trained on different masks. Here every adapter owns a ChaCha stream that the
//! trainer reseeds from the round's seed ([`reseed`]), so a round is a function of its plan.
//! The mask is drawn on the host and uploaded (a few hundred KB a step on a GPU), which on the
//! CPU is also about four times cheaper than burn's per-element Bernoulli sampling.

use std::sync::{Arc, Mutex, PoisonError};

use burn::module::{Flag, Module, Param};
use burn::tensor::{Tensor, TensorData};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Inverted dropout (`x · mask / (1 − p)`), active only while training on an autodiff device.
#[derive(Module, Debug)]
pub struct SeededDropout {
    /// Probability of zeroing an element.
    pub prob: f64,
    /// Off in evaluation mode (`Module::valid`), like burn's own dropout.
    pub training: Param<Flag>,
    /// The mask stream, shared by the clones the optimizer makes of this module so that
    /// successive steps continue one stream rather than repeating its start.
    #[module(skip)]
    rng: Arc<Mutex<ChaCha8Rng>>,
}

impl SeededDropout {
    /// Dropout with probability `prob` whose stream starts at `(seed, stream)`.
    ///
    /// # Panics
    /// When `prob` is not in `[0, 1)`, as burn's `DropoutConfig::init` does.
    pub fn new(prob: f64, seed: u64, stream: u64) -> Self {
        assert!(
            prob.is_finite() && (0.0..1.0).contains(&prob),
            "dropout probability must be in [0, 1), got {prob}"
        );
        Self {
            prob,
            training: Param::from_bool(true),
            rng: Arc::new(Mutex::new(stream_rng(seed, stream))),
        }
    }

    /// Restarts the mask stream at `(seed, stream)`.
    pub fn reseed(&self, seed: u64, stream: u64) {
        *self.rng.lock().unwrap_or_else(PoisonError::into_inner) = stream_rng(seed, stream);
    }

    /// Applies dropout.
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        // The same conditions as burn's dropout: a frozen or evaluating model sees its input.
        if !self.training.is_enabled() || !input.device().is_autodiff() || self.prob == 0.0 {
            return input;
        }
        let keep = 1.0 - self.prob;
        // Keep an element when a uniform 32-bit draw falls below keep · 2³²; folding 1 / keep
        // into the mask makes dropout one multiplication.
        let threshold = (keep * 4_294_967_296.0) as u64;
        let scale = (1.0 / keep) as f32;
        let shape = input.shape();
        let count = shape.num_elements();
        let mut draws = vec![0u32; count];
        {
            let mut rng = self.rng.lock().unwrap_or_else(PoisonError::into_inner);
            rng.fill_bytes(bytemuck::cast_slice_mut::<u32, u8>(&mut draws));
        }
        let mask: Vec<f32> = draws
            .into_iter()
            .map(|d| if u64::from(d) < threshold { scale } else { 0.0 })
            .collect();
        let mask = Tensor::<D>::from_data(TensorData::new(mask, shape), &input.device());
        input * mask
    }
}

fn stream_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    fn values(t: Tensor<2>) -> Vec<f32> {
        t.into_data().try_into_vec_as().expect("float32")
    }

    #[test]
    fn masks_are_seeded_scaled_and_near_the_rate() {
        let device = Device::flex().autodiff();
        let x = Tensor::<2>::ones([64, 256], &device);
        let dropout = SeededDropout::new(0.25, 7, 3);
        let first = values(dropout.forward(x.clone()));
        let kept = first.iter().filter(|&&v| v != 0.0).count() as f64 / first.len() as f64;
        // 16384 Bernoulli(0.75) draws: standard deviation 0.0034.
        assert!((kept - 0.75).abs() < 0.02, "kept {kept}");
        assert!(
            first
                .iter()
                .all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6)
        );
        let second = values(dropout.forward(x.clone()));
        assert_ne!(first, second, "the stream moves on between steps");
        dropout.reseed(7, 3);
        assert_eq!(
            values(dropout.forward(x.clone())),
            first,
            "a reseed replays"
        );
        dropout.reseed(7, 4);
        assert_ne!(values(dropout.forward(x)), first, "streams differ");
    }

    #[test]
    fn passes_through_when_evaluating_or_without_autodiff() {
        let x = Tensor::<2>::ones([4, 4], &Device::flex());
        let dropout = SeededDropout::new(0.5, 1, 0);
        assert_eq!(values(dropout.forward(x.clone())), vec![1.0; 16]);
        let x = Tensor::<2>::ones([4, 4], &Device::flex().autodiff());
        let evaluating = SeededDropout::new(0.5, 1, 0).valid();
        assert_eq!(values(evaluating.forward(x)), vec![1.0; 16]);
    }
}
