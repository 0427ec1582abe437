//! Which device the model lives on. burn's automatic graphics choice picks Metal only on macOS
//! (Vulkan, DX12 or GL elsewhere), so on iOS it would look for Vulkan and find nothing: the SDK
//! names the API itself — Metal on iOS, Vulkan on Android, burn's own choice on desktops.

use std::sync::OnceLock;

use burn::tensor::Device;

use crate::error::FedtuneError;
use crate::settings::BackendPreference;

/// The graphics API the GPU backend must use on this platform.
#[cfg(feature = "wgpu")]
fn graphics_api() -> burn::tensor::wgpu::WgpuBackend {
    use burn::tensor::wgpu::WgpuBackend;
    if cfg!(any(target_os = "ios", target_os = "macos")) {
        WgpuBackend::Metal
    } else if cfg!(target_os = "android") {
        WgpuBackend::Vulkan
    } else {
        WgpuBackend::Auto
    }
}

/// The GPU device. wgpu's runtime starts once per process, so the first outcome is kept and
/// every later client (an app may recreate its client) gets the same device or the same error.
#[cfg(feature = "wgpu")]
fn gpu() -> Result<Device, FedtuneError> {
    static GPU: OnceLock<Result<Device, String>> = OnceLock::new();
    GPU.get_or_init(|| {
        Device::wgpu_options()
            .graphics_api(graphics_api())
            .init()
            .map_err(|e| e.to_string())
    })
    .clone()
    .map_err(|reason| FedtuneError::Model {
        reason: format!("no GPU: {reason}"),
    })
}

/// Built without the GPU backend.
#[cfg(not(feature = "wgpu"))]
fn gpu() -> Result<Device, FedtuneError> {
    Err(FedtuneError::Model {
        reason: "this build of the SDK has no GPU backend (feature `wgpu`)".into(),
    })
}

/// The device for `preference` and its name for the server (`cpu` or `wgpu`).
pub(crate) fn device(
    preference: BackendPreference,
) -> Result<(Device, &'static str), FedtuneError> {
    match preference {
        BackendPreference::Cpu => Ok((Device::flex(), "cpu")),
        BackendPreference::Gpu => Ok((gpu()?, "wgpu")),
        BackendPreference::Automatic => match gpu() {
            Ok(device) => Ok((device, "wgpu")),
            Err(e) => {
                tracing::info!(error = %e, "no GPU; training on the CPU");
                Ok((Device::flex(), "cpu"))
            }
        },
    }
}
