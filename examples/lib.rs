//! Example programs live beside this file; run one with `cargo run -p fedtune-examples --example NAME`.
