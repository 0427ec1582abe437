//! Privacy of client updates: secure aggregation (the server learns only the sum) and
//! differential privacy (the sum does not reveal one client's data).
//!
//! Secure aggregation is SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020 for the sparse
//! neighbour graph), built from one concept per module:
//!
//! - [`quantize`]: f32 updates clipped to a documented range and mapped to integers modulo 2^32;
//! - [`shamir`]: t-of-n secret sharing of the mask seeds over a prime field;
//! - [`pairwise_mask`]: X25519 key agreement, HKDF, and ChaCha20 mask expansion;
//! - [`secagg`]: the client and server protocol as I/O-free state machines
//!   (advertise keys → share keys → masked input → unmask);
//! - [`secure_sum`]: an in-process driver of one server and N clients with drop-outs, used by
//!   tests, the bench and the simulation harness.
//!
//! Differential privacy: [`clipping`] (fixed or adaptive L2 clipping), [`gaussian`] (central or
//! distributed Gaussian noise), [`accountant`] (Rényi DP of the subsampled Gaussian mechanism,
//! converted to (ε, δ)) and [`dp`] (the three combined as a server's per-round mechanism).
//!
//! Everything here is plain computation over slices: no I/O, no clocks.

pub mod accountant;
pub mod clipping;
pub mod dp;
pub mod gaussian;
pub mod pairwise_mask;
pub mod quantize;
pub mod secagg;
pub mod secure_sum;
pub mod shamir;
