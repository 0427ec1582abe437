//! Choosing where tensors live. burn 0.22 dispatches every operation on the tensor's device, so
//! this is the only place fedtune names a backend.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use burn::tensor::Device;

/// A compute backend fedtune can run on.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// burn-flex: pure-Rust SIMD kernels on every CPU core.
    #[default]
    Cpu,
    /// burn-wgpu: Vulkan, Metal or DX12, whichever the machine offers.
    Wgpu,
    /// The deprecated burn-ndarray CPU backend, built only to be measured against burn-flex.
    #[cfg(feature = "ndarray-comparison")]
    NdArray,
}

/// The requested backend could not be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the {backend} backend: {reason}")]
pub struct DeviceError {
    /// The backend asked for.
    pub backend: BackendKind,
    /// Why it failed.
    pub reason: String,
}

impl BackendKind {
    /// Opens the backend's default device. For wgpu this initialises the adapter now, so a
    /// machine without a usable GPU driver gets an error here instead of a panic later.
    ///
    /// wgpu's runtime can be initialised once per process (a second `init` fails with "Service
    /// already initialized"), so the first outcome is kept and every later call, from any
    /// thread, gets the same device or the same error.
    pub fn device(self) -> Result<Device, DeviceError> {
        static WGPU: OnceLock<Result<Device, String>> = OnceLock::new();
        match self {
            Self::Cpu => Ok(Device::flex()),
            Self::Wgpu => WGPU
                .get_or_init(|| Device::wgpu_options().init().map_err(|e| e.to_string()))
                .clone()
                .map_err(|reason| DeviceError {
                    backend: self,
                    reason,
                }),
            #[cfg(feature = "ndarray-comparison")]
            #[allow(deprecated)] // measuring the deprecated backend is the point
            Self::NdArray => Ok(Device::ndarray()),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Wgpu => "wgpu",
            #[cfg(feature = "ndarray-comparison")]
            Self::NdArray => "ndarray",
        })
    }
}

impl FromStr for BackendKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            #[cfg(feature = "ndarray-comparison")]
            "ndarray" => Ok(Self::NdArray),
            other => Err(format!("unknown backend `{other}` (cpu or wgpu)")),
        }
    }
}
