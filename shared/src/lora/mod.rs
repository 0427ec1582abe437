//! LoRA: low-rank adapters trained by backprop on a frozen base model, each device with its own
//! rank, aggregated on the server across ranks, and exchanged as Hugging Face PEFT folders.
//!
//! - [`adapter`]: adapters as plain numbers (wire, server, files);
//! - [`layer`]: the trainable adapter on one projection (burn), with [`dropout`] on its input;
//! - [`config`], [`attach`]: which projections get adapters, putting them on a model;
//! - [`train`]: the client's local training loop;
//! - [`aggregation`]: FedAvg, HetLoRA and FlexLoRA on the server;
//! - [`peft`]: PEFT adapter folders in and out.

pub mod adapter;
pub mod aggregation;
pub mod attach;
pub mod config;
pub mod dropout;
pub mod federation;
pub mod layer;
pub mod peft;
pub mod train;

pub use adapter::{AdaptedLayer, AdapterWeights, LoraFactors, LoraScaling, TargetModule};
pub use config::LoraConfig;
pub use layer::LoraLayer;
