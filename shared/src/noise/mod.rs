//! Seeded perturbation noise that every party regenerates bit for bit from a seed: the basis of
//! FedKSeed, where a gradient travels as `(seed, scalar)` and the noise never crosses the wire.

pub mod seed_noise;

pub use seed_noise::{NoiseDistribution, SeedNoise};
