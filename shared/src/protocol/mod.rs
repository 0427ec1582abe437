//! The wire protocol between devices and the server: versioned, typed messages, their frames
//! and limits, blobs, and the keys and signatures that say who is talking. No I/O here: the
//! transport (`crate::transport`) moves these bytes over QUIC.
//!
//! # Message flow
//!
//! Every exchange is one request and one response on its own bidirectional QUIC stream, so a
//! slow download never blocks a poll, and a lost stream loses one exchange, never the connection's
//! state. TLS 1.3 (rustls) protects the connection; the device pins the server's certificate.
//!
//! ```text
//! device                                              server
//!   | -- Enroll{token, public key, capabilities} ----->  |  once per device; token checked,
//!   | <------------------------------ Enrolled{id} ----  |  key stored
//!   |                                                    |
//!   | -- Authenticate{id, sig(TLS exporter)} --------->  |  first stream of every connection
//!   | <----------------------------- Authenticated ----  |
//!   | -- Poll{last seen round} ----------------------->  |
//!   | <-- Plan(signed) | Wait{retry after} | Finished -  |  plan: round, seeds, task, deadline
//!   | -- Download{digest, offset} -------------------->  |  LoRA: the global adapter blob,
//!   | <---------------- Blob{total, offset} + bytes ---  |  resumed from `offset` if cut
//!   |        … local training …                          |
//!   | -- UploadStatus{digest} / Upload{…} + bytes ---->  |  LoRA: the trained adapter blob,
//!   | <---------------- UploadOffset / Uploaded -------  |  resumable, digest-checked
//!   | -- Report{run, round, stats, payload} ---------->  |  validated, stored durably, then
//!   | <--------------- Accepted{round, duplicate} -----  |  acknowledged; a resend counts once
//! ```
//!
//! A secure round (`[privacy] secure_aggregation = true`) replaces the report with the four
//! SecAgg+ phases: see [`secure`].
//!
//! Any request can instead be answered with [`Response::Error`], whose [`ErrorCode`] says what
//! to do (re-enroll, drop the round, back off). A frame of another protocol version is answered
//! with a `VersionMismatch` error in the server's version, which the device reports as "server
//! speaks version X, we speak Y"; the server logs the same.

pub mod adapter_blob;
pub mod auth;
pub mod blob;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod message;
pub mod secure;

pub use auth::{DeviceId, PublicKey, Signed, SigningKey};
pub use blob::Digest;
pub use frame::FrameError;
pub use message::*;

/// The protocol version this build speaks. Bump it on any change to a message's encoding.
pub const PROTOCOL_VERSION: u16 = 3;

/// The largest request frame a server accepts: requests are small (reports of FedKSeed are a
/// few KB, larger payloads go as blobs).
pub const MAX_REQUEST_FRAME: usize = 4 << 20;

/// The largest response frame a device accepts: a FedKSeed plan for a device many rounds behind
/// carries every missed round's delta (dense: 4 bytes per seed per round).
pub const MAX_RESPONSE_FRAME: usize = 64 << 20;

/// The largest blob either side accepts by default (a full model in f32 is far below).
pub const MAX_BLOB: u64 = 2 << 30;
