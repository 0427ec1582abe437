//! The Llama-family decoder in burn, one code path for every device: burn dispatches each
//! operation on the device the tensors live on (burn-flex on CPUs, wgpu on GPUs).
//!
//! Files follow the paper's blocks: [`config`], [`linear`], [`rope`], [`attention`], [`mlp`],
//! [`block`] (one decoder layer), [`llama`] (the whole model), plus [`batch`] (padding and masks)
//! and [`kv_cache`] (generation).

pub mod attention;
pub mod batch;
pub mod block;
pub mod config;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod mlp;
pub mod rope;

pub use batch::TokenBatch;
pub use config::LlamaConfig;
pub use kv_cache::KvCache;
pub use llama::Llama;
