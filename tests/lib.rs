//! Integration tests across fedtune's crates live in `tests/`; this library holds what several of
//! them share.

use burn::tensor::Device;
use fedtune_shared::device::BackendKind;

/// The wgpu device, or `None` (with a `SKIPPED:` line) where no adapter exists. With
/// `FEDTUNE_REQUIRE_WGPU=1` (set by CI, where `scripts/test` installs Mesa's lavapipe) a missing
/// adapter fails instead.
pub fn wgpu_device() -> Option<Device> {
    match BackendKind::Wgpu.device() {
        Ok(device) => Some(device),
        Err(e) if std::env::var("FEDTUNE_REQUIRE_WGPU").is_ok_and(|v| v == "1") => {
            panic!("FEDTUNE_REQUIRE_WGPU=1 but {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            None
        }
    }
}
