//! Adding seed noise to a tensor on whatever device holds it, as one burn operation.
//!
//! burn's own random tensors differ per backend, so fedtune brings its own operation, added to
//! burn through its backend-extension mechanism: on burn-flex it writes the weights' host memory
//! in place ([`add_terms`]); on every CubeCL runtime (wgpu here) a kernel generates the keystream
//! on the device ([`super::noise_kernel`]), so neither the noise nor the weights cross the bus.
//! Both compute the same sequence of exact products and rounded adds, so they agree bit for bit.

use burn::backend::ops::{FloatTensorOps, IntTensorOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Cube, Flex, backend_extension};
use burn::tensor::{Tensor, TensorData};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_flex::FlexTensor;
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::*;

use super::noise_kernel::{self, BINOMIAL_PER_BLOCK, RADEMACHER_PER_BLOCK};
use super::seed_noise::{NoiseDistribution, add_terms, exact_coefficient};

/// What one call adds: `Σ_k c_k · z(seed_k, tensor, ·)`, term by term in order.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseUpdate {
    /// The parameter tensor's index: the keystream's stream.
    pub tensor: u64,
    /// How keystream words become values.
    pub distribution: NoiseDistribution,
    /// `(seed, coefficient)` pairs, applied in this order.
    pub terms: Vec<(u64, f32)>,
}

/// The seed-noise operation, implemented by every backend fedtune runs on.
#[backend_extension(Flex, Cube)]
pub trait SeedNoiseBackend: Backend {
    /// `weight` plus the update, element `i` of the flattened (row-major) tensor receiving
    /// `z(seed, tensor, i)`. Reuses `weight`'s memory when nothing else holds it.
    fn add_seed_noise(weight: FloatTensor<Self>, update: NoiseUpdate) -> FloatTensor<Self>;
}

impl SeedNoiseBackend for Flex {
    fn add_seed_noise(weight: FlexTensor, update: NoiseUpdate) -> FlexTensor {
        let mut weight = if weight.is_contiguous() {
            weight
        } else {
            weight.to_contiguous()
        };
        let (start, end) = weight
            .layout()
            .contiguous_offsets()
            .expect("a contiguous tensor has contiguous offsets");
        // Copies only when another tensor shares the buffer (copy on write).
        let values = &mut weight.storage_mut::<f32>()[start..end];
        add_terms(update.distribution, update.tensor, 0, &update.terms, values);
        weight
    }
}

impl SeedNoiseBackend for Cube {
    fn add_seed_noise(weight: CubeTensor, update: NoiseUpdate) -> CubeTensor {
        if update.terms.is_empty() {
            return weight;
        }
        let mut weight = into_contiguous(weight);
        if !weight.can_mut() {
            weight = weight.copy();
        }
        let device = weight.device.clone();
        // Seeds as 16-bit limbs: exact in whatever integer type the backend stores.
        let limbs: Vec<i32> = update
            .terms
            .iter()
            .flat_map(|&(seed, _)| (0..4).map(move |i| ((seed >> (16 * i)) & 0xFFFF) as i32))
            .collect();
        let coefficients: Vec<f32> = update
            .terms
            .iter()
            .map(|&(_, c)| exact_coefficient(c))
            .collect();
        let n_terms = coefficients.len();
        let limbs = Self::int_from_data(TensorData::new(limbs, [4 * n_terms]), &device);
        let coefficients = Self::float_from_data(TensorData::new(coefficients, [n_terms]), &device);

        let rademacher = update.distribution == NoiseDistribution::Rademacher;
        let per_block = if rademacher {
            RADEMACHER_PER_BLOCK
        } else {
            BINOMIAL_PER_BLOCK
        };
        let len = weight.meta.shape().num_elements();
        let blocks = len.div_ceil(per_block);
        assert!(
            u32::try_from(blocks).is_ok(),
            "a tensor of {len} elements needs more than 2^32 ChaCha blocks"
        );
        let cube_dim = CubeDim::new_1d(256);
        let cube_count = calculate_cube_count_elemwise(&weight.client, blocks, cube_dim);
        let limb_type = burn::backend::cubecl::dtype_to_storage_type(limbs.dtype);
        noise_kernel::add_seed_noise_kernel::launch(
            &weight.client,
            cube_count,
            cube_dim,
            weight.clone().into_tensor_arg(),
            limbs.into_tensor_arg(),
            coefficients.into_tensor_arg(),
            update.tensor as u32,
            (update.tensor >> 32) as u32,
            rademacher,
            limb_type,
        );
        weight
    }
}

/// `tensor` plus `Σ_k c_k · z(seed_k, index, ·)`, computed on `tensor`'s device.
///
/// # Panics
/// When `tensor` is not float32, or lives on a backend without this operation (the autodiff
/// wrapper included: zeroth-order training needs no gradients).
pub fn add_seed_noise<const D: usize>(tensor: Tensor<D>, update: NoiseUpdate) -> Tensor<D> {
    let out = <burn::backend::Dispatch as SeedNoiseBackend>::add_seed_noise(
        tensor.into_dispatch(),
        update,
    );
    Tensor::from_dispatch(out)
}
