//! fedtune's device SDK: what an app (or the `fedtune client` CLI) embeds to take part in
//! federated fine-tuning. It enrolls the device, connects to the pinned server, trains when the
//! app's policy allows, and keeps its state on disk so a killed app resumes.
//!
//! - [`client`] — the main loop ([`Client`], [`ClientHandle`]);
//! - [`connection`] — QUIC with the pinned certificate and the per-connection key proof;
//! - [`trainer`] — the local model and the work a plan asks for;
//! - [`secure`] — the device's side of a secure round (the SecAgg+ phases after training);
//! - [`state`] — the durable state folder;
//! - [`policy`] — when training may run; [`events`]: progress for the app.

#![warn(missing_docs)]

pub mod client;
pub mod connection;
pub mod events;
pub mod policy;
pub mod secure;
pub mod state;
pub mod trainer;

pub use client::{Client, ClientConfig, ClientError, ClientHandle, Outcome};
pub use events::{Event, EventListener};
pub use policy::{Always, ChargingUnmeteredIdle, DeviceConditions, TrainingPolicy};
