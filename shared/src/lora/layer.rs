//! A LoRA adapter on one projection: `y = x W + s · dropout(x) A B`, computed as two thin
//! matmuls and never as the dense `A B` (burn's `apply_lora` materialises `W + A B` in every
//! forward, a full weight's worth of memory and time for a rank-8 update).

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData};
use rand::Rng;

use super::adapter::LoraFactors;
use super::dropout::SeededDropout;

/// The trainable factors of one adapted projection.
///
/// Stored in the orientation the forward pass wants (`A` `[d_in, r]`, `B` `[r, d_out]`, like
/// fedtune's `[in, out]` weights); PEFT's `[r, d_in]`/`[d_out, r]` appear only in
/// [`LoraFactors`].
#[derive(Module, Debug)]
pub struct LoraLayer {
    /// `A`, `[d_in, rank]`.
    pub a: Param<Tensor<2>>,
    /// `B`, `[rank, d_out]`.
    pub b: Param<Tensor<2>>,
    /// `s` in `ΔW = s · A B`.
    pub scale: f32,
    /// Dropout on the adapter's input (PEFT's `lora_dropout`); active only while training. Its
    /// stream starts at seed 0 until [`super::attach::reseed_dropout`] gives it the round's.
    pub dropout: SeededDropout,
}

impl LoraLayer {
    /// A fresh adapter as PEFT initialises one: `A` Kaiming-uniform (`a = √5`, so bound
    /// `1/√d_in`), `B` zero, so the adapted model starts equal to the base model.
    pub fn init(
        d_in: usize,
        d_out: usize,
        rank: usize,
        scale: f32,
        dropout: f64,
        rng: &mut impl Rng,
        device: &Device,
    ) -> Self {
        let bound = 1.0 / (d_in as f32).sqrt();
        // Drawn on the host from the caller's seeded generator: burn's random tensors differ by
        // backend, and an adapter must start the same everywhere.
        let a: Vec<f32> = (0..d_in * rank)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        Self {
            a: Param::from_tensor(Tensor::from_data(TensorData::new(a, [d_in, rank]), device)),
            b: Param::from_tensor(Tensor::zeros([rank, d_out], device)),
            scale,
            dropout: SeededDropout::new(dropout, 0, 0),
        }
    }

    /// The adapter holding `factors` (PEFT orientation).
    pub fn from_factors(factors: &LoraFactors, scale: f32, dropout: f64, device: &Device) -> Self {
        let (r, d_in, d_out) = (factors.rank, factors.d_in, factors.d_out);
        let a = Tensor::<2>::from_data(TensorData::new(factors.a.clone(), [r, d_in]), device);
        let b = Tensor::<2>::from_data(TensorData::new(factors.b.clone(), [d_out, r]), device);
        Self {
            a: Param::from_tensor(a.transpose()),
            b: Param::from_tensor(b.transpose()),
            scale,
            dropout: SeededDropout::new(dropout, 0, 0),
        }
    }

    /// The factors in PEFT's orientation.
    pub fn factors(&self) -> LoraFactors {
        let [d_in, rank] = self.a.dims();
        let [_, d_out] = self.b.dims();
        let values = |t: Tensor<2>| -> Vec<f32> {
            t.transpose()
                .into_data()
                .try_into_vec_as()
                .expect("adapters are float32")
        };
        LoraFactors {
            rank,
            d_in,
            d_out,
            a: values(self.a.val()),
            b: values(self.b.val()),
        }
    }

    /// The rank.
    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }

    /// `s · dropout(x) A B`.
    ///
    /// # Shapes
    /// - input: `[..., d_in]`
    /// - output: `[..., d_out]`
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let low = burn::tensor::module::linear(self.dropout.forward(input), self.a.val(), None);
        burn::tensor::module::linear(low, self.b.val(), None) * self.scale
    }

    /// `s · A B`, `[d_in, d_out]`: what merging adds to the base weight.
    pub fn delta(&self) -> Tensor<2> {
        self.a.val().matmul(self.b.val()) * self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn factors_round_trip_and_forward_matches_the_dense_product() {
        let device = Device::flex();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let fresh = LoraLayer::init(6, 4, 3, 2.0, 0.0, &mut rng, &device);
        let f = fresh.factors();
        assert!(f.is_consistent());
        assert!(f.b.iter().all(|&v| v == 0.0), "B starts at zero");
        assert!(f.a.iter().all(|&v| v.abs() <= 1.0 / 6f32.sqrt()));

        let factors = LoraFactors {
            rank: 2,
            d_in: 3,
            d_out: 2,
            a: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            b: vec![1.0, 0.0, 0.5, 2.0],
        };
        let layer = LoraLayer::from_factors(&factors, 0.5, 0.0, &device);
        assert_eq!(layer.factors(), factors);
        // ΔW (PEFT [d_out, d_in]) = s B A = 0.5 [[1, 2, 3], [8.5, 11, 13.5]]; y = x ΔWᵀ.
        let x = Tensor::<2>::from_data([[1.0, 0.0, -1.0]], &device);
        let y: Vec<f32> = layer.forward(x).into_data().try_into_vec_as().unwrap();
        assert_eq!(y, vec![-1.0, -2.5]);
        let delta: Vec<f32> = layer.delta().into_data().try_into_vec_as().unwrap();
        assert_eq!(delta, vec![0.5, 4.25, 1.0, 5.5, 1.5, 6.75]);
    }
}
