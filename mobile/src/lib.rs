//! fedtune-mobile: UniFFI bindings of the client SDK for Android and iOS apps.
//!
//! An empty shell until the mobile issue: it fixes the crate's place in the workspace.

#![warn(missing_docs, unreachable_pub)]
#![forbid(unsafe_code)]
