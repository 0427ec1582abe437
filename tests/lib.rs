//! Integration tests across fedtune's crates live in `tests/`; this library is empty.
