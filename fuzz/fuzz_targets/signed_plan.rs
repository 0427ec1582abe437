//! Bytes read as a signed plan, verified with a fixed key; then re-signed so the plan decoder is reached.
//! The checks live in `fedtune_shared::protocol::fuzzing`, which `cargo test` also runs on the
//! corpus and the regressions (`shared/tests/fuzz_corpus.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fedtune_shared::protocol::fuzzing::signed_plan(data));
