//! Adding seeded noise to every float parameter of a model, in place of the parameter.
//!
//! Parameters are numbered in the order burn's module visitor reaches them (the field order of
//! the model's structs); that number is the `tensor` of [`SeedNoise`], so every party addresses
//! the same noise for the same weight.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::Tensor;

use crate::noise::{NoiseUpdate, SeedNoise, add_seed_noise};

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
        param.map(|mut weight| {
            // One device operation per run of terms sharing a distribution (in practice the
            // whole list): terms apply one after the other either way, so splitting the list
            // changes nothing.
            for run in terms.chunk_by(|a, b| a.0.distribution() == b.0.distribution()) {
                let update = NoiseUpdate {
                    tensor: index,
                    distribution: run[0].0.distribution(),
                    terms: run.iter().map(|(n, c)| (n.seed(), *c)).collect(),
                };
                weight = add_seed_noise(weight, update);
            }
            weight
        })
    }
}

/// `w ← w + c_1 z_1 + c_2 z_2 + …` (left to right) for every float parameter `w` of `module`,
/// on the device that holds it.
///
/// One pass over the weights however many terms: a perturbation is one term, a replay of a
/// round's seed updates is many. Each term is an exact product and a rounded add, in order
/// (see [`crate::noise::add_terms`]), so the result depends only on `module` and `terms`, on
/// every backend.
pub fn add_noise<M: Module>(module: M, terms: &[(SeedNoise, f32)]) -> M {
    if terms.is_empty() {
        return module;
    }
    module.map(&mut AddNoise { terms, tensor: 0 })
}
