//! fedtune-mobile: fedtune's client SDK inside Android and iOS apps, exported to Kotlin, Swift
//! (and Python, for the tests on Linux) with UniFFI from this one Rust definition.
//!
//! An app creates a [`FedtuneClient`] from [`ClientSettings`] and a [`ProgressListener`],
//! calls [`FedtuneClient::enroll`] once, adds local examples
//! ([`FedtuneClient::add_text_example`], [`FedtuneClient::add_instruction_example`]), reports
//! the phone's [`DeviceConditions`] as they change and calls [`FedtuneClient::start`]; the SDK
//! trains on its own background thread whenever the [`TrainingPolicy`] allows, and
//! [`FedtuneClient::pause`] / [`FedtuneClient::stop`] take effect at the next safe point.
//!
//! - [`settings`] — what a client is created with;
//! - [`conditions`] — the phone's state and the policy deciding when training may run;
//! - [`progress`] — events, the client's state, the listener;
//! - [`client`] — the client object and its background thread;
//! - `example_store` — the on-device examples (never uploaded);
//! - `backend` — CPU or GPU, with the graphics API named per platform (Metal on iOS);
//! - [`error`] — the typed errors apps catch.
//!
//! Doc comments on exported items use plain backticks, no rustdoc links: UniFFI copies them
//! into the Kotlin, Swift and Python sources.

#![warn(missing_docs, unreachable_pub)]
// No `forbid(unsafe_code)`: UniFFI's scaffolding is `extern "C"` functions the macros write.

uniffi::setup_scaffolding!();

mod backend;
pub mod client;
pub mod conditions;
pub mod error;
mod example_store;
pub mod progress;
pub mod settings;

pub use client::FedtuneClient;
pub use conditions::{DeviceConditions, ThermalState, TrainingPolicy};
pub use error::FedtuneError;
pub use progress::{ClientState, ProgressEvent, ProgressListener};
pub use settings::{BackendPreference, ClientSettings, ServerIdentity, parse_server_identity};
