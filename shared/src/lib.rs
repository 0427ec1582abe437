//! fedtune-shared: what fedtune's client and server both need: the Llama-family model in burn,
//! checkpoint readers, the tokenizer, the federated algorithms (FedKSeed in [`zo`], LoRA in
//! [`lora`], the per-device [`bandit`]) and, in later modules, the wire protocol.

#![warn(missing_docs, unreachable_pub)]
// One audited `unsafe` block per checkpoint format maps files into memory (see `checkpoint`).
#![deny(unsafe_code)]

pub mod bandit;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod eval;
pub mod generate;
pub mod lora;
pub mod model;
pub mod noise;
pub mod ops;
pub mod peak_memory;
pub mod pretrained;
pub mod privacy;
pub mod progress;
pub mod protocol;
pub mod prune;
pub mod robust;
pub mod tokenizer;
#[cfg(feature = "net")]
pub mod transport;
pub mod zo;
