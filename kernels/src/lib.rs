//! fedtune-kernels: the CPU kernels behind fedtune's custom burn operations, kept in their own
//! crate so that they are compiled optimised and without debug checks in every profile (see
//! the root `Cargo.toml`): a matrix product for frozen weights, attention's core, the SwiGLU
//! activation and the fused next-token loss.

#![warn(missing_docs)]

pub mod attention;
pub mod cross_entropy;
pub mod pool;
pub mod rms_norm;
pub mod sgemm;
pub mod swiglu;
#[cfg(test)]
mod test_values;
