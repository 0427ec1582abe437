//! fedtune's own burn operations for the training step's hot paths, each a backend extension
//! with a fused CPU kernel (in `fedtune-kernels`), burn's own operations composed on other
//! backends, and a hand-written backward for the autodiff wrapper.

pub mod attention;
pub mod frozen_matmul;
mod host_tensor;
pub mod rms_norm;
pub mod swiglu;
pub mod token_nll;
