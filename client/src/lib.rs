//! fedtune-client: the SDK a device embeds to take part in federated fine-tuning.
//!
//! Today it re-exports the shared model stack; the local training loops, on-device state and the
//! client side of the protocol arrive with the algorithm and network issues.

#![warn(missing_docs, unreachable_pub)]
#![forbid(unsafe_code)]

pub use fedtune_shared as shared;
