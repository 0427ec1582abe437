//! Seeded perturbation noise that every party regenerates bit for bit from a seed: the basis of
//! FedKSeed, where a gradient travels as `(seed, scalar)` and the noise never crosses the wire.

pub mod device_noise;
mod noise_kernel;
pub mod seed_noise;

pub use device_noise::{NoiseUpdate, add_seed_noise};
pub use seed_noise::{NoiseDistribution, SeedNoise, add_terms, exact_coefficient};
