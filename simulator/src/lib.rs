//! fedtune-simulator: the one-machine simulation harness.
//!
//! Hundreds of virtual devices share one copy of the frozen base weights; each device is a
//! profile (speed, memory, bandwidth, availability) and a slice of a real data set. The
//! harness drives the daemon's own algorithm drivers and the device SDK's own training code,
//! in process or over loopback QUIC, and writes per-round metrics, plots and reports.

#![warn(missing_docs)]

pub mod config;
pub mod engine;
pub mod evaluation;
pub mod fleet;
pub mod local;
pub mod plot;
pub mod population;
pub mod quic;
pub mod record;
pub mod report;
pub mod run;
