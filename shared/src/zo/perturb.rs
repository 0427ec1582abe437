//! Adding seeded noise to every float parameter of a model, in place of the parameter.
//!
//! Parameters are numbered in the order burn's module visitor reaches them (the field order of
//! the model's structs); that number is the `tensor` of [`SeedNoise`], so every party addresses
//! the same noise for the same weight.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Tensor, TensorData};

use crate::noise::SeedNoise;

/// Adds `Σ coefficient · z(seed, tensor, ·)` to every float parameter.
struct AddNoise<'a> {
    terms: &'a [(SeedNoise, f32)],
    tensor: u64,
}

impl ModuleMapper for AddNoise<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let index = self.tensor;
        self.tensor += 1;
        let terms = self.terms;
        param.map(|weight| {
            let shape = weight.shape();
            let n = shape.num_elements();
            // The sum is formed on the host, term by term in the order given, each term one
            // correctly rounded multiply and add: the same bits on every machine. Then one add
            // on the parameter's device.
            let mut update = vec![0.0f32; n];
            for (i, (noise, coefficient)) in terms.iter().enumerate() {
                if i == 0 {
                    noise.fill_scaled(index, 0, *coefficient, &mut update);
                } else {
                    noise.accumulate_scaled(index, 0, *coefficient, &mut update);
                }
            }
            let device = weight.device();
            weight + Tensor::from_data(TensorData::new(update, shape), &device)
        })
    }
}

/// `w ← w + Σ_k coefficient_k · z_k` for every float parameter `w` of `module`.
///
/// One pass over the weights however many terms: a perturbation is one term, a replay of a
/// round's seed updates is many. The parameter's new value is `w + u` with `u` rounded once
/// per term on the host, so the result depends only on `module` and `terms` (in order).
pub fn add_noise<M: Module>(module: M, terms: &[(SeedNoise, f32)]) -> M {
    if terms.is_empty() {
        return module;
    }
    module.map(&mut AddNoise { terms, tensor: 0 })
}
