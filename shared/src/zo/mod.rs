//! Zeroth-order federated tuning (MeZO local steps, FedKSeed seeds and history, FedKSeed-Pro
//! seed importance): plain computations over the model, no I/O.
//!
//! - [`perturb`]: adding seeded noise to every parameter of a model, and replaying seed updates;
//! - [`step`]: successive two-point zeroth-order steps;
//! - [`seed_pool`]: the K candidate seeds and how a client samples them;
//! - [`round`]: what the server sends, what a client reports, and the server's history.
//! - [`federation`]: server and clients in one process.

pub mod federation;
pub mod perturb;
pub mod round;
pub mod seed_pool;
pub mod step;
