//! fedtune-server: the aggregation daemon.
//!
//! Round orchestration, the device registry, the durable store and the QUIC transport arrive with
//! the network issue; this crate already depends on the shared model stack it will drive.

#![warn(missing_docs, unreachable_pub)]
#![forbid(unsafe_code)]

pub use fedtune_shared as shared;
